"""Planning a bucket's calls: which engine calls a step makes over a bucket.

Under the compiled engine a bucket runs as the units of its layout (``_layout`` decides,
``_pack`` builds; :class:`Layouts` caches a bucket's layout while it still describes
the bucket), each a :class:`Call` with the graph kind it compiles to, its factor
vectors and its direct-call :class:`~umup_compile._direct.Site`. Sharded, complex and
mixed-dtype buckets, and the eager engine, take the *list path*: one call over the
bucket's per-parameter lists. A plan lives until the next full gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._direct import Site
from ._gather import Bucket, BucketKey, DTensor, Picker, picker
from ._hypers import FactorVectors, factor_vectors
from ._layout import UnrolledKinds
from ._pack import Layout, Pack, Unit, build_layout, release
from ._specs import AlgorithmSpec
from ._steady import Watch, layout_of

try:  # an internal helper of torch's (Note [shard streams] in ``_functional``)
    from torch.distributed.tensor._utils import (
        compute_local_shape_and_global_offset as _shard_offset,
    )
except ImportError:  # pragma: no cover - no torch.distributed, or the helper moved
    _shard_offset = None  # type: ignore[assignment]

Group = dict[str, Any]


def local_shard(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (FSDP2's params, grads, state), else ``t``.

    Note [sharded parameters]: the update is elementwise, so each rank runs it on its
    shards as plain tensors: no DTensor dispatch per op, no DTensor mixed with the
    plain hyper-parameter tensors. ``to_local()`` is a view, so the in-place update
    lands in the DTensor. The u-μP factors come from ``p.shape``, which a DTensor
    reports globally: those of the full weight. Sharded buckets take the list path,
    rebuilt at every step, not packs: a pack rebinds the state to views of its flat
    buffer, and the state must stay DTensors for ``state_dict``/DCP. A gradient can
    be placed unlike its parameter (tensor parallel's ``RowwiseParallel`` embedding
    gets a ``Replicate`` gradient for its ``Shard(0)`` weight): :func:`placed_like`
    first redistributes it to the parameter's placements, as torch.optim's DTensor
    ops would (a local slice; a ``Partial`` gradient would be reduced).
    """
    return t.to_local() if isinstance(t, DTensor) else t


def shard_places(params: Sequence[Tensor]) -> list[Any] | None:
    """Per parameter, (its full shape, its local shard's offset) for a ``DTensor``,
    else None (Note [shard streams] in ``_functional``); None without torch's
    helper (an internal API: the shards then count from 0, as before)."""
    if _shard_offset is None:
        return None
    return [
        (tuple(p.shape), tuple(_shard_offset(p.shape, p.device_mesh, p.placements)[1]))
        if isinstance(p, DTensor)
        else None
        for p in params
    ]


def placed_like(params: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
    """``grads``, each placed as its parameter (Note [sharded parameters]); FSDP2's
    already are."""
    return [
        g.redistribute(p.device_mesh, p.placements)
        if isinstance(g, DTensor)
        and isinstance(p, DTensor)
        and (g.placements != p.placements or g.device_mesh != p.device_mesh)
        else g
        for p, g in zip(params, grads)
    ]


def _at_least_1d(t: Tensor) -> Tensor:
    # Dynamo (torch 2.13) drops in-place updates of 0-d float64 graph inputs;
    # 1-element views of them update correctly, in both engines alike.
    return t.view(1) if t.ndim == 0 else t


@dataclass
class Call:
    """One prepared engine call over some of a bucket's parameters."""

    kind: str
    static: bool
    pick: Picker  # the call's gradients from the bucket's
    params: list[Tensor]
    factors: FactorVectors
    unit: Unit | None = None  # a layout unit (else: the list path)
    pack: Pack | None = None
    state_lists: list[list[Tensor]] = field(default_factory=list)  # list path
    # Note [direct calls]: a unit call lives until the next gather, and a steady
    # step's tensors match its first's.
    site: Site | None = None


@dataclass
class BucketPlan:
    """A bucket and how it runs."""

    bucket: Bucket
    keys: tuple[str, ...]  # the state keys its config uses, in slot order
    calls: list[Call]


@dataclass
class _CachedLayout:
    signature: tuple[Any, ...]
    layout: Layout


def _signature(bucket: Bucket, keys: tuple[str, ...]) -> tuple[Any, ...]:
    """What a bucket's layout depends on: the members' positions, their parameters'
    shapes, strides and negative bits (contiguous or not, small or large), and the
    storage and layout of their state tensors (flat aliases and pack views follow
    a storage; Note [what a graph reads])."""
    return (
        tuple(bucket.positions),
        tuple((p.shape, p.stride(), p.is_neg()) for p in bucket.params),
        tuple(tuple(layout_of(s[k]) for s in bucket.states) for k in keys),
    )


class Layouts:
    """Each bucket's layout, kept while it still describes the bucket; ``builds``
    counts the layouts built (tests bound it)."""

    def __init__(self) -> None:
        self.builds = 0
        self.unrolled = UnrolledKinds()
        self.cached: dict[BucketKey, _CachedLayout] = {}
        self._aliased: set[BucketKey] = set()  # the buckets aliased at the last plan

    def clear(self) -> None:
        for cached in self.cached.values():
            release(cached.layout)
        self.cached.clear()

    def retain(self, buckets: Sequence[Bucket]) -> None:
        """Before a plan is made: the members of cached layouts that are no longer in
        their bucket's layout get their own state (Note [released buffers] in
        ``_pack``), and the layouts of buckets gone are forgotten."""
        present = {b.key: b for b in buckets}
        aliased = {b.key for b in buckets if b.aliased}
        for key in list(self.cached):
            bucket = present.get(key)
            if bucket is None:
                layout = self.cached.pop(key).layout
                if key not in self._aliased:
                    release(layout)
            elif uses_layout(bucket) and key not in self._aliased:
                release(self.cached[key].layout, {id(p) for p in bucket.params})
        self._aliased = aliased

    def get(self, bucket: Bucket, keys: tuple[str, ...], spec: AlgorithmSpec) -> Layout:
        """The bucket's layout: the cached one while it still describes the bucket
        (its signature after the build, which rebinds a pack's state to views)."""
        cached = self.cached.get(bucket.key)
        if (
            cached is None
            or any(bucket.fresh)
            or cached.signature != _signature(bucket, keys)
        ):
            layout = build_layout(
                bucket.params,
                bucket.states,
                keys,
                spec.scalar_keys,
                self.unrolled,
                spec.block_keys,
                spec.block,
            )
            self.builds += 1
            cached = self.cached[bucket.key] = _CachedLayout(
                _signature(bucket, keys), layout
            )
        return cached.layout


def uses_layout(bucket: Bucket) -> bool:
    """Whether the compiled engine lays ``bucket`` out in units. Sharded (Note
    [sharded parameters]), complex, mixed-dtype and aliased (Note [aliased
    parameters]) buckets take the list path."""
    return not (
        bucket.sharded or bucket.mixed or bucket.aliased or bucket.key[1].is_complex
    )


def plan_bucket(
    bucket: Bucket,
    groups: Sequence[Group],
    spec: AlgorithmSpec,
    layouts: Layouts | None,
) -> BucketPlan:
    """The calls that run ``bucket``: its layout's units, or (``layouts`` is None:
    an engine without layouts) one call over its lists."""
    keys = spec.active_keys(bucket.config)
    if layouts is None or not uses_layout(bucket):
        return BucketPlan(bucket, keys, [bucket_call(bucket, keys, groups)])
    layout = layouts.get(bucket, keys, spec)
    calls = []
    if layout.pack is not None:
        calls.append(_unit_call(bucket, layout.pack.unit, groups, layout.pack))
    calls += [_unit_call(bucket, u, groups) for u in layout.units]
    return BucketPlan(bucket, keys, calls)


def _unit_call(
    bucket: Bucket, unit: Unit, groups: Sequence[Group], pack: Pack | None = None
) -> Call:
    return Call(
        kind=_engine_kind(bucket, unit.kind.name, len(unit.members), groups, pack),
        static=unit.kind.static,
        pick=picker(unit.members),
        params=[bucket.params[k] for k in unit.members],
        factors=factor_vectors(
            [bucket.positions[k] for k in unit.members], groups, bucket.device
        ),
        unit=unit,
        pack=pack,
        site=Site(),
    )


def bucket_call(bucket: Bucket, keys: tuple[str, ...], groups: Sequence[Group]) -> Call:
    """The whole bucket as one call over per-parameter lists (the list path)."""
    return Call(
        kind=_engine_kind(bucket, "list", len(bucket.params), groups),
        static=False,
        pick=list,
        params=list_view(bucket, bucket.params),
        factors=factor_vectors(bucket.positions, groups, bucket.device),
        state_lists=[list_view(bucket, [s[k] for s in bucket.states]) for k in keys],
    )


def _engine_kind(
    bucket: Bucket,
    name: str,
    members: int,
    groups: Sequence[Group],
    pack: Pack | None = None,
) -> str:
    """The engine's name for a call's graph: the unit kind, plus what else its
    graph specialises on, so that Dynamo's recompile limit counts the variants of
    one graph, not those of every bucket and membership: dtypes, a pack's row
    width, and the size classes 0, 1, many of the dynamic sizes (Dynamo
    specialises sizes 0 and 1 even when marked dynamic): members, groups, rows."""
    device, dtype, _, state_dtypes, grad_dtype = bucket.key
    states = ",".join(str(d).removeprefix("torch.") for d in state_dtypes)
    sizes = f"n{min(members, 2)}g{min(len(groups), 2)}"
    tag = f"{name}@{device.type}:{dtype}/{states}/{grad_dtype}/{sizes}"
    if pack is None:
        return tag
    rows, width = pack.flat_param.shape
    return f"{tag}/w{width}r{min(rows, 2)}"


def list_view(bucket: Bucket, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` as the list path passes them: local shards, complex tensors as
    real views (torch.optim's semantics: the update is elementwise on the real and
    imaginary parts), 0-d as 1-element."""
    out = list(tensors)
    if bucket.sharded:  # Note [sharded parameters]
        out = [local_shard(t) for t in out]
    if bucket.key[1].is_complex:
        out = [torch.view_as_real(t) if t.is_complex() else t for t in out]
    if bucket.has_scalars:
        out = [_at_least_1d(t) for t in out]
    return out


def watch_of(plans: Sequence[BucketPlan]) -> Watch:
    """What a steady step must check of ``plans``' tensors, by how their calls reach
    them (Note [what a graph reads])."""
    watch = Watch([], [], [], [], [])
    for plan in plans:
        states = plan.bucket.states
        for call in plan.calls:
            if call.unit is None:  # the list path
                watch.listed += [(s, key) for s in states for key in plan.keys]
                continue
            members = [states[k] for k in call.unit.members]
            stacked = call.unit.stacked
            pairs = [(s, key) for s in members for key in plan.keys]
            if call.pack is not None:
                watch.views += pairs
                watch.copied += call.params
            else:
                watch.views += [(s, key) for s, key in pairs if key in stacked]
                watch.graph_states += [
                    (s, key) for s, key in pairs if key not in stacked
                ]
                watch.graph_params += call.params
    return watch
