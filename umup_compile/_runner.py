"""The step runner: owns the engine, the layouts and what a steady step reuses.

One :meth:`StepRunner.step` is: collect this step's gradients (the cached plan's
:class:`~umup_compile._gather.SteadyCheck`, or a full :func:`~umup_compile._gather.gather`
that also creates state and rebuilds the plan), refresh the hyper-parameter tensor of
each device, then make each prepared call: the pack (copy in, update, copy out) and the
other units of every bucket's layout under the compiled engine, or one call over each
bucket's lists under the eager engine. Whether an outer ``torch.compile`` traces the
step is asked once; then nothing is cached (Note [nested compile]).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from ._clip import (
    clip_divisors,
    coefficient_into,
    reduce_sharded,
    squared_norm,
    tensor_norms,
)
from ._direct import Site
from ._engine import Engine
from ._gather import (
    Bucket,
    BucketKey,
    DTensor,
    Picker,
    SteadyCheck,
    Structure,
    gather,
    picker,
)
from ._hypers import FactorVectors, HyperTable, Position, factor_vectors
from ._layout import UnrolledKinds
from ._pack import Layout, Pack, Unit, build_layout, pack_in, pack_out, unit_lists
from ._specs import AlgorithmSpec

Group = dict[str, Any]
State = dict[str, Any]


def local_shard(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (FSDP2's params, grads, state), else ``t``.

    Note [sharded parameters]: the update is elementwise, so each rank runs it on its
    shards as plain tensors: no DTensor dispatch per op, no DTensor mixed with the
    plain hyper-parameter tensors. ``to_local()`` is a view, so the in-place update
    lands in the DTensor. The u-μP factors come from ``p.shape``, which a DTensor
    reports globally: those of the full weight. Sharded buckets take the list path,
    rebuilt at every step, not packs: a pack rebinds the state to views of its flat
    buffer, and the state must stay DTensors for ``state_dict``/DCP.
    """
    return t.to_local() if isinstance(t, DTensor) else t


def _at_least_1d(t: Tensor) -> Tensor:
    # Dynamo (torch 2.13) drops in-place updates of 0-d float64 graph inputs;
    # 1-element views of them update correctly, in both engines alike.
    return t.view(1) if t.ndim == 0 else t


# Note [nested compile] needs Dynamo features of torch 2.11 (tested on 2.11 and 2.13;
# 2.6 cannot trace the gather's dict of buckets). Before, a traced step raises, which
# under fullgraph=False breaks the graph there and runs the step untraced.
TRACED_STEP_SUPPORTED = TorchVersion(torch.__version__) >= "2.11"


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
class Work:
    """One update call, prepared: its arguments (a pack's gradients copied in)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    device: torch.device
    call: Call | None  # None: run the update eagerly (not through the engine)
    sharded: Any = None  # a DTensor gradient of a sharded bucket (its placements)

    @property
    def grads(self) -> Sequence[Tensor]:
        """The gradients the update reads (its second positional argument)."""
        return self.args[1]  # type: ignore[no-any-return]


@dataclass
class _CachedLayout:
    positions: tuple[Position, ...]
    tensors: list[list[Tensor]]  # per key, the members' state tensors
    layout: Layout


class StepRunner:
    """Runs steps of one optimizer (see the module docstring).

    Args:
        spec: the algorithm.
        engine: runs the functional update (eager or compiled).
        structure: what fixes a step's structure in a group (``_gather.Structure``).
    """

    def __init__(
        self, spec: AlgorithmSpec, engine: Engine, structure: Structure
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.hypers = HyperTable(spec)
        self.layout_builds = 0  # counted so that tests can bound it
        self.unrolled = UnrolledKinds()
        self.layouts: dict[BucketKey, _CachedLayout] = {}
        self._structure = structure
        self._plans: list[BucketPlan] | None = None
        self._check: SteadyCheck | None = None
        self._differentiable = False
        # The optimizer's param_groups and whether they ask for capturable=True (see
        # set_groups).
        self.groups: Sequence[Group] = []
        self.capturable = False
        # Note [fused clipping]: the threshold, and the last step's norm
        self.max_grad_norm: float | None = None
        self.last_grad_norm: Tensor | None = None
        # max_grad_norm as a tensor, for the compiled engine (see _clip_compiled)
        self._max_norm_t: tuple[float, Tensor] | None = None
        self._clip_site = Site()

    def set_groups(self, groups: Sequence[Group]) -> None:
        """Groups were added or loaded: keep the list, read what a traced step
        cannot, then :meth:`invalidate`.

        Note [traced groups]: a traced step reaches the groups through
        :attr:`groups`, not ``optimizer.param_groups``: Dynamo special-cases that
        attribute of optimizers, guarding on every value in the groups (a float lr
        edited at call 10 would recompile there) and reporting ``capturable=True``
        for each group.
        """
        self.groups = groups
        self.capturable = any(g.get("capturable") for g in groups)
        self.invalidate()

    def invalidate(self) -> None:
        """Forget every cache (groups were added, a checkpoint was loaded)."""
        self._plans = None
        self._check = None
        self.layouts.clear()
        self.hypers.invalidate()

    def step(
        self,
        groups: Sequence[Group],
        state: dict[Tensor, State],
        *,
        amp: dict[str, Tensor | None],
        name: str,
    ) -> None:
        """Run one step over ``groups`` (gradients read from ``.grad``)."""
        if torch.compiler.is_compiling():
            if not TRACED_STEP_SUPPORTED:  # raising makes Dynamo run the step eagerly
                raise RuntimeError(
                    "umup_compile: opt.step() inside torch.compile needs torch >= "
                    "2.11; compile the forward and backward only, or use "
                    "fullgraph=False"
                )
            with torch.set_grad_enabled(any(g["differentiable"] for g in groups)):
                self._traced_step(groups, state, amp, name)
            return
        grads = None
        if self._check is not None:
            grads = self._check.grads(groups, state)
        fresh_step = grads is None
        stable = (
            self._check.stable if grads is not None and self._check else frozenset()
        )
        if grads is None or self._plans is None:
            buckets = gather(
                groups, state, self.spec, traced=False, optimizer_name=name
            )
            self._plans = [self._plan(b, groups) for b in buckets]
            self._clip_site = Site()  # the clip call's, like the calls' (Call.site)
            self._check = SteadyCheck(
                groups,
                buckets,
                [p.keys for p in self._plans],
                self._structure,
                state,
                watched=[
                    p
                    for plan in self._plans
                    for call in plan.calls
                    if call.site is not None and call.pack is None
                    for p in call.params
                ],
            )
            self._differentiable = any(g["differentiable"] for g in groups)
            grads = [b.grads for b in buckets]
        hyper: dict[torch.device, tuple[Tensor, dict[str, Tensor]]] = {}
        with torch.set_grad_enabled(self._differentiable):
            works: list[Work] = []
            for plan, bucket_grads in zip(self._plans, grads):
                device = plan.bucket.device
                if device not in hyper:
                    hyper[device] = (
                        self.hypers.tensor(groups, device, stable=stable),
                        _amp_kwargs(amp, device),
                    )
                works += self._prepare(
                    plan, bucket_grads, groups, *hyper[device], fresh_step
                )
            self._clip(works, {d: kw for d, (_, kw) in hyper.items()})
            for work in works:
                self._execute(work)

    # -- plans --------------------------------------------------------------------

    def _plan(self, bucket: Bucket, groups: Sequence[Group]) -> BucketPlan:
        keys = self.spec.active_keys(bucket.config)
        # Sharded (Note [sharded parameters]), complex and mixed-dtype buckets take
        # the list path.
        if (
            not self.engine.packs
            or bucket.sharded
            or bucket.mixed
            or bucket.key[1].is_complex
        ):
            call = _bucket_call(bucket, keys, groups)
            return BucketPlan(bucket, keys, [call])
        layout = self._layout(bucket, keys)
        calls = []
        if layout.pack is not None:
            calls.append(self._unit_call(bucket, layout.pack.unit, groups, layout.pack))
        calls += [self._unit_call(bucket, u, groups) for u in layout.units]
        return BucketPlan(bucket, keys, calls)

    @staticmethod
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

    def _layout(self, bucket: Bucket, keys: tuple[str, ...]) -> Layout:
        """The bucket's layout: the cached one while it still describes the bucket."""
        cached = self.layouts.get(bucket.key)
        positions = tuple(bucket.positions)
        if (
            cached is None
            or any(bucket.fresh)
            or cached.positions != positions
            or not all(
                all(map(operator.is_, map(operator.itemgetter(k), bucket.states), ts))
                for k, ts in zip(keys, cached.tensors)
            )
        ):
            layout = build_layout(
                bucket.params, bucket.states, keys, self.spec.scalar_keys, self.unrolled
            )
            self.layout_builds += 1
            cached = self.layouts[bucket.key] = _CachedLayout(
                positions, [[s[k] for s in bucket.states] for k in keys], layout
            )
        return cached.layout

    # -- calls --------------------------------------------------------------------

    def _prepare(
        self,
        plan: BucketPlan,
        grads: list[Tensor],
        groups: Sequence[Group],
        hyper_t: Tensor,
        amp_kwargs: dict[str, Tensor],
        fresh_step: bool,
    ) -> list[Work]:
        """The bucket's update calls, with their gradients copied in (packs)."""
        bucket, spec = plan.bucket, self.spec
        base: dict[str, Any] = {"config": bucket.config, **amp_kwargs}
        device = bucket.device
        if fresh_step and spec.fresh_matters(bucket.config) and any(bucket.fresh):
            # Note [first SGD step]: state-creating steps run eagerly, as lists.
            call = _bucket_call(bucket, plan.keys, groups)
            kwargs = {**self._kwargs(base, call), "fresh_buffers": list(bucket.fresh)}
            args = self._args(plan, call, grads, hyper_t)
            return [Work(args, kwargs, device, None, sharded=_sharded(bucket, grads))]
        if bucket.sharded:  # fresh local views at every step
            call = _bucket_call(bucket, plan.keys, groups)
            args = self._args(plan, call, grads, hyper_t)
            kwargs = self._kwargs(base, call)
            return [Work(args, kwargs, device, call, sharded=_sharded(bucket, grads))]
        if bucket.mixed:  # Dynamo refuses parameters whose .grad has another dtype
            call = plan.calls[0]
            args = self._args(plan, call, grads, hyper_t)
            return [Work(args, self._kwargs(base, call), device, None)]
        return [
            Work(
                self._args(plan, call, call.pick(grads), hyper_t),
                self._kwargs(base, call),
                device,
                call,
            )
            for call in plan.calls
        ]

    def _execute(self, work: Work) -> None:
        """Run one prepared update call (then copy a pack's parameters out)."""
        if work.call is None:  # eagerly, whatever the engine
            self.spec.update(*work.args, **work.kwargs)
            return
        call = work.call
        if work.sharded is not None:  # a list call, rebuilt each step: no kind
            self.engine(self.spec.update, work.args, work.kwargs)
            return
        self.engine(
            self.spec.update, work.args, work.kwargs, call.kind, call.static, call.site
        )
        if call.pack is not None:
            pack_out(call.pack)

    def _clip(self, works: list[Work], amp: dict[torch.device, dict[str, Any]]) -> None:
        """Fold global-norm clipping into the works' gradient divisors (Note
        [fused clipping]); record the norm."""
        if self.max_grad_norm is None:
            return
        if not works:
            self.last_grad_norm = torch.zeros(())
            return
        if (
            self.engine.packs
            and len(amp) == 1
            and all(w.call is not None and w.sharded is None for w in works)
        ):
            self._clip_compiled(works, amp, self.max_grad_norm)
            return
        squares = []
        for work in works:
            sq = squared_norm(work.grads)
            if work.sharded is not None:
                sq = reduce_sharded(sq, work.sharded)
            squares.append(sq)
        scales = {d: kw.get("grad_scale_t") for d, kw in amp.items()}
        divisors, self.last_grad_norm = clip_divisors(
            squares, self.max_grad_norm, scales
        )
        for work in works:
            work.kwargs["grad_scale_t"] = divisors[work.device]

    def _clip_compiled(
        self,
        works: list[Work],
        amp: dict[torch.device, dict[str, Any]],
        max_norm: float,
    ) -> None:
        """:meth:`_clip` on one device with the compiled engine: the per-tensor norms
        eagerly (one ``_foreach_norm``), the rest one compiled call."""
        ((device, amp_kw),) = amp.items()
        norms = tensor_norms([g for w in works for g in w.grads])
        cached = self._max_norm_t
        if cached is None or cached[0] != max_norm or cached[1].device != device:
            # full, not tensor: a fill kernel, no host copy (capture-safe)
            value = torch.full((), max_norm, dtype=torch.float32, device=device)
            cached = self._max_norm_t = (max_norm, value)
        divisor = torch.empty((), dtype=torch.float32, device=device)
        norm = torch.empty((), dtype=torch.float32, device=device)
        scale = amp_kw.get("grad_scale_t")
        self.engine(
            coefficient_into,
            (norms, cached[1], divisor, norm),
            {"config": (), "grad_scale_t": scale},
            f"clip{len(norms)}",
            True,
            self._clip_site,
        )
        self.last_grad_norm = norm
        for work in works:
            work.kwargs["grad_scale_t"] = divisor

    def _args(
        self, plan: BucketPlan, call: Call, grads: list[Tensor], hyper_t: Tensor
    ) -> tuple[Any, ...]:
        """The update's positional arguments for ``call``."""
        if call.pack is not None:
            lists = pack_in(call.pack, grads)
        elif call.unit is not None:
            lists = unit_lists(call.unit, call.params, grads)
        else:
            lists = (call.params, _list_view(plan.bucket, grads), *call.state_lists)
        by_key = dict(zip(plan.keys, lists[2:]))
        f = call.factors
        return (
            *lists[:2],
            *(by_key.get(slot, []) for slot in self.spec.state_slots),
            hyper_t,
            f.group_index_t,
            f.lr_scales_t,
            f.wd_scales_t,
        )

    def _kwargs(self, base: dict[str, Any], call: Call) -> dict[str, Any]:
        kwargs = dict(base)
        rounds = self.spec.rounds(base["config"])
        if call.pack is not None:
            kwargs["segment_t"] = call.pack.segment_t
            if rounds:
                kwargs["local_index_t"] = call.pack.local_index_t
        if rounds:
            kwargs["sr_seeds_t"] = call.factors.sr_seeds_t
        return kwargs

    # -- traced -------------------------------------------------------------------

    def _traced_step(
        self,
        groups: Sequence[Group],
        state: dict[Tensor, State],
        amp: dict[str, Tensor | None],
        name: str,
    ) -> None:
        """A step inside an outer ``torch.compile``: lists only, nothing cached, the
        raw update inlined into the outer graph (Note [nested compile])."""
        buckets = gather(groups, state, self.spec, traced=True, optimizer_name=name)
        capturable = self.capturable  # in a trace, Dynamo sets every group's flag
        hyper: dict[torch.device, Tensor] = {}
        amp_kw: dict[torch.device, dict[str, Tensor]] = {}
        works: list[Work] = []
        for bucket in buckets:
            device = bucket.device
            if device not in hyper:  # Note [traced hypers]
                amp_kw[device] = _amp_kwargs(amp, device)
                hyper[device] = (
                    self.hypers.traced(groups, device)
                    if capturable
                    else self.hypers.at_run_time(groups, device)
                )
            keys = self.spec.active_keys(bucket.config)
            plan = BucketPlan(bucket, keys, [])
            call = _bucket_call(bucket, keys, groups)
            base = {"config": bucket.config, **amp_kw[device]}
            kwargs = self._kwargs(base, call)
            if self.spec.fresh_matters(bucket.config) and any(bucket.fresh):
                kwargs["fresh_buffers"] = list(bucket.fresh)
            args = self._args(plan, call, bucket.grads, hyper[device])
            works.append(
                Work(args, kwargs, device, None, sharded=_sharded(bucket, bucket.grads))
            )
        self._clip(works, amp_kw)
        for work in works:
            self.spec.update(*work.args, **work.kwargs)


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
    device, dtype, _, state_dtype, grad_dtype = bucket.key
    sizes = f"n{min(members, 2)}g{min(len(groups), 2)}"
    tag = f"{name}@{device.type}:{dtype}/{state_dtype}/{grad_dtype}/{sizes}"
    if pack is None:
        return tag
    rows, width = pack.flat_param.shape
    return f"{tag}/w{width}r{min(rows, 2)}"


def _list_view(bucket: Bucket, tensors: Sequence[Tensor]) -> list[Tensor]:
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


def _bucket_call(
    bucket: Bucket, keys: tuple[str, ...], groups: Sequence[Group]
) -> Call:
    """The whole bucket as one call over per-parameter lists (the list path)."""
    return Call(
        kind=_engine_kind(bucket, "list", len(bucket.params), groups),
        static=False,
        pick=list,
        params=_list_view(bucket, bucket.params),
        factors=factor_vectors(bucket.positions, groups, bucket.device),
        state_lists=[_list_view(bucket, [s[k] for s in bucket.states]) for k in keys],
    )


def _sharded(bucket: Bucket, grads: Sequence[Tensor]) -> Any:
    """A DTensor gradient of a sharded bucket (for its placements), else None."""
    return grads[0] if bucket.sharded and grads else None


def _amp_kwargs(
    amp: dict[str, Tensor | None], device: torch.device
) -> dict[str, Tensor]:
    """A GradScaler's ``grad_scale``/``found_inf`` on ``device``, by keyword.

    With ``_step_supports_amp_scaling`` the scaler neither unscales nor syncs; the
    core divides by the scale and masks a step with infs (Note [skipped steps]).
    """
    return {
        key: value.to(device=device, dtype=torch.float32, non_blocking=True)
        for key, value in amp.items()
        if value is not None
    }
