"""Layouts for the compiled engine: few calls per step, each over many tensors.

Compiling one graph that unrolls every parameter costs ~0.9 s per tensor on a 2-core
CPU (500 tensors: minutes). A layout instead splits a bucket into *units* whose graphs
are reused, so the number of graphs does not grow with the parameter count:

- the **pack**: small parameters (fewer than :data:`PACK_MAX_NUMEL` elements, or not
  contiguous). Their state lives in one buffer per state key (``state[p][key]`` is a
  view into it, so ``state_dict`` keeps torch's per-parameter layout); gradients and
  parameters are copied into scratch buffers, updated by one dynamic-shape kernel, and
  copied back. Buffers are ``(rows, PACK_ROW)``, each parameter starting a row, and
  ``segment_t`` maps each row to its parameter's coefficients.
- the **unrolled unit**: when a bucket has at most :data:`UNROLL_MAX` large contiguous
  parameters, one static-shape graph over all of them, passed as they are. Its kind
  names their shapes, so another membership would compile another graph: beyond
  :data:`MAX_UNROLLED_KINDS` per optimizer, other memberships use chunks.
- **chunks** (more large parameters, or after that): up to :data:`CHUNK` parameters of
  one size, passed as flat aliases (no copies; one graph serves every shape of that
  size), compiled with static shapes (C++ guards). Sizes beyond the
  :data:`MAX_STATIC_SIZES` most frequent share dynamic-shape chunks (Python shape
  guards). Chunk lengths are powers of two, so a size has at most ``log2(CHUNK) + 1``
  graphs, whatever the membership.

Why both: on CPU each compiled call costs ~0.5-1 ms of Python, because the kernel
before it has streamed the caches empty (measured: the same call takes 0.2 ms warm and
0.9 ms after copying 64 MB). On the GPT-like benchmark (34 large tensors of 4 sizes,
1 thread, one process) six calls per step (pack + five chunks) ran 1.16-1.24x torch
fused, two (pack + unrolled unit) 1.01-1.12x, one graph over every tensor 1.05-1.13x.
The unrolled unit compiles as fast there (42 s vs 43 s for chunks, fresh cache, 2
threads) but grows ~0.8 s per tensor (66 tensors: 71 s against 46 s), hence the limit.

Measured on 2 CPU cores (torch 2.13), first step with a cold cache: 500 and 2000
tensors of 64x64 in ~14 s, where the graph unrolled over every tensor took minutes.
Packing copies (~24 B/element) only pay off below ~16K elements, hence the threshold.
Parameters are copied rather than re-pointed into the pack (``p.data = view``): a view
would make ``torch.save(model.state_dict())`` write the whole pack per parameter, and
safetensors refuses shared storage.

A layout is cached per bucket and rebuilt (counted in ``layout_builds``) when the set
of parameters with gradients changes, a parameter's state is created, or a state tensor
was replaced behind our back (e.g. ``load_state_dict``).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PACK_MAX_NUMEL = 16384
PACK_ROW = 128
CHUNK = 8
MAX_STATIC_SIZES = 8
UNROLL_MAX = 48
MAX_UNROLLED_KINDS = 1

# A state key is elementwise (shaped like the parameter) unless listed as scalar.
State = dict[str, Tensor]


# Per parameter: group index, lr scale, wd scale, stochastic-rounding seed.
Factors = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass
class Unit:
    """One compiled call: the members' bucket indices and their factor tensors."""

    members: list[int]
    factors: Factors
    state_views: list[list[Tensor]]  # per state key: see ``chunk_lists``
    kind: str  # the graph class: "pack", "static:<shapes>", "static<k>x<numel>", "chunk<k>"

    @property
    def unrolled(self) -> bool:
        """Whether the members are passed as they are (not as flat aliases)."""
        return is_unrolled(self.kind)


@dataclass
class Pack:
    """Small parameters' state and scratch buffers, ``(rows, PACK_ROW)`` each."""

    unit: Unit
    segment_t: Tensor  # each row's parameter
    local_index_t: Tensor  # each row's first element's index within its parameter
    flat_param: Tensor
    flat_grad: Tensor
    param_views: list[Tensor]
    grad_views: list[Tensor]


@dataclass
class Layout:
    """A bucket's units, valid while membership and state tensors stay the same."""

    positions: tuple[tuple[int, int], ...]
    states: list[list[Tensor]]  # per state key, the members' tensors (identity check)
    pack: Pack | None
    chunks: list[Unit]


def is_large(p: Tensor) -> bool:
    """Whether ``p`` is updated through flat views (else it joins the pack)."""
    return p.numel() >= PACK_MAX_NUMEL and p.is_contiguous()


def _chunks(
    large: list[int], params: Sequence[Tensor], unrolled: set[str]
) -> list[tuple[list[int], str]]:
    """Units of large parameters with their graph kind (see the module docstring).

    ``unrolled`` holds the unrolled kinds this optimizer has compiled; a new one is
    added while there are fewer than :data:`MAX_UNROLLED_KINDS`.

    Parameters of the :data:`MAX_STATIC_SIZES` most frequent sizes are chunked by
    size, into static-shape graphs (C++ guards, ~0.15 ms a call); the rest share
    dynamic-shape graphs, whose Python shape guards cost ~0.3-0.7 ms a call.
    """
    if 0 < len(large) <= UNROLL_MAX:
        members = sorted(large, key=lambda k: (params[k].numel(), params[k].shape))
        kind = _unrolled_kind([params[k].shape for k in members])
        if kind in unrolled or len(unrolled) < MAX_UNROLLED_KINDS:
            unrolled.add(kind)
            return [(members, kind)]
    by_size: dict[int, list[int]] = {}
    for k in large:
        by_size.setdefault(params[k].numel(), []).append(k)
    frequent = sorted(by_size, key=lambda n: -len(by_size[n]))[:MAX_STATIC_SIZES]
    out, rest = [], []
    for numel, members in by_size.items():
        if numel not in frequent:
            rest += members
            continue
        for chunk in _split(members):
            out.append((chunk, f"static{len(chunk)}x{numel}"))
    out += [(chunk, f"chunk{len(chunk)}") for chunk in _split(sorted(rest))]
    return out


def is_unrolled(kind: str) -> bool:
    """Whether ``kind`` names an unrolled unit (see ``_unrolled_kind``)."""
    return kind.startswith("static:")


def _unrolled_kind(shapes: list[torch.Size]) -> str:
    """``"static:2*16x32+1*64x64"`` for sorted shapes (16, 32), (16, 32), (64, 64)."""
    runs: list[tuple[int, torch.Size]] = []
    for shape in shapes:
        if runs and runs[-1][1] == shape:
            runs[-1] = (runs[-1][0] + 1, shape)
        else:
            runs.append((1, shape))
    return "static:" + "+".join(
        f"{count}*{'x'.join(map(str, shape))}" for count, shape in runs
    )


def _split(members: list[int]) -> list[list[int]]:
    chunks, start = [], 0
    for size in chunk_sizes(len(members)):
        chunks.append(members[start : start + size])
        start += size
    return chunks


def chunk_sizes(n: int) -> list[int]:
    """Split ``n`` into chunks of :data:`CHUNK`, then powers of two (8 8 4 1)."""
    sizes = [CHUNK] * (n // CHUNK)
    rest, size = n % CHUNK, CHUNK
    while rest:
        size //= 2
        if rest >= size:
            sizes.append(size)
            rest -= size
    return sizes


def factor_tensors(
    positions: Sequence[tuple[int, int]],
    lr_scales: Sequence[Sequence[float]],
    wd_scales: Sequence[Sequence[float]],
    sr_seeds: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> Factors:
    """(group index, lr scale, wd scale, rounding seed) vectors of the parameters.

    A parameter's rounding seed mixes its group's ``sr_seed`` with its position, so
    every parameter draws its own stream (see ``_rounding``).
    """
    return (
        torch.tensor([g for g, _ in positions], dtype=torch.int64, device=device),
        torch.tensor(
            [lr_scales[g][i] for g, i in positions], dtype=dtype, device=device
        ),
        torch.tensor(
            [wd_scales[g][i] for g, i in positions], dtype=dtype, device=device
        ),
        torch.tensor(
            [(sr_seeds[g] & 0xFFFFFFFF) | (i << 32) | (g << 52) for g, i in positions],
            dtype=torch.int64,
            device=device,
        ),
    )


def build_layout(
    params: Sequence[Tensor],
    positions: Sequence[tuple[int, int]],
    states: Sequence[State],
    keys: Sequence[str | None],
    scalar_keys: frozenset[str],
    lr_scales: Sequence[Sequence[float]],
    wd_scales: Sequence[Sequence[float]],
    sr_seeds: Sequence[int],
    scalar_dtype: torch.dtype,
    unrolled: set[str],
) -> Layout:
    """Lay out one bucket, moving its small parameters' state into flat buffers.

    Args:
        params, positions, states: the bucket's parameters, their (group, index)
            and their state dicts, aligned.
        keys: the state keys in the functional's order (``None``: an empty list).
        scalar_keys: keys holding one 0-d tensor per parameter (e.g. ``step``).
        lr_scales, wd_scales, sr_seeds: every group's u-μP factors and rounding seed.
        scalar_dtype: dtype of the factor tensors.
        unrolled: the unrolled kinds compiled so far (updated, see ``_chunks``).
    """
    device = params[0].device
    small = [k for k, p in enumerate(params) if not is_large(p)]
    large = [k for k, p in enumerate(params) if is_large(p)]
    for k in large:  # flat views need contiguous state
        for key in keys:
            if key is not None and not states[k][key].is_contiguous():
                states[k][key] = states[k][key].contiguous()

    def factors(members: Sequence[int]) -> Factors:
        return factor_tensors(
            [positions[k] for k in members],
            lr_scales,
            wd_scales,
            sr_seeds,
            device,
            scalar_dtype,
        )

    pack = None
    if small:
        pack = _build_pack(
            small,
            factors(small),
            [params[k] for k in small],
            [states[k] for k in small],
            keys,
            scalar_keys,
        )
    chunks = []
    for members, kind in _chunks(large, params, unrolled):
        alias = (lambda t: t) if is_unrolled(kind) else _flat
        views = [
            [alias(states[k][key]) for k in members] if key else [] for key in keys
        ]
        chunks.append(Unit(members, factors(members), views, kind))
    return Layout(
        positions=tuple(positions),
        states=[[s[key] for s in states] if key else [] for key in keys],
        pack=pack,
        chunks=chunks,
    )


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of contiguous ``t`` that is not a view (0-d: one element).

    Dynamo guards on a view's base (its sizes and strides), so flat views of
    differently shaped parameters would recompile; an alias made with ``set_`` shares
    the storage without a base. It also never is 0-d (see ``_base``).
    """
    flat = t.new_empty(0)
    return flat.set_(
        t.untyped_storage(), t.storage_offset(), (max(t.numel(), 1),), (1,)
    )


def _build_pack(
    members: list[int],
    factors: Factors,
    params: Sequence[Tensor],
    states: Sequence[State],
    keys: Sequence[str | None],
    scalar_keys: frozenset[str],
) -> Pack:
    """Small parameters in rows of :data:`PACK_ROW` elements, each starting a row.

    Rows let the kernel gather coefficients once per row (see ``_coefficients``);
    the padding (< PACK_ROW elements per parameter) stays zero in gradients and
    parameters and is never read back.
    """
    p0 = params[0]
    device = p0.device
    row_counts = [-(-p.numel() // PACK_ROW) for p in params]
    rows = sum(row_counts)
    firsts = [0, *itertools.accumulate(row_counts)][:-1]  # each parameter's first row
    counts = torch.tensor(row_counts, device=device)
    segment_t = torch.repeat_interleave(
        torch.arange(len(params), dtype=torch.int32, device=device),
        counts,
        output_size=rows,
    )
    row_starts = torch.repeat_interleave(
        torch.tensor(firsts, device=device), counts, output_size=rows
    )
    local_index_t = ((torch.arange(rows, device=device) - row_starts) * PACK_ROW).to(
        torch.int32
    )
    offsets = [first * PACK_ROW for first in firsts]
    flat_param = torch.zeros(rows, PACK_ROW, dtype=p0.dtype, device=device)
    flat_grad = torch.zeros_like(flat_param)
    flat_state: list[list[Tensor]] = []
    for key in keys:
        if key is None:
            flat_state.append([])
            continue
        if key in scalar_keys:
            flat = torch.stack([s[key].reshape(()) for s in states])
            views = list(flat.unbind())
        else:
            flat = torch.zeros(
                rows, PACK_ROW, dtype=states[0][key].dtype, device=device
            )
            views = _views(flat, offsets, params)
            torch._foreach_copy_(views, [s[key] for s in states])
        for s, view in zip(states, views):
            s[key] = view  # state_dict keeps per-parameter tensors: views
        flat_state.append([flat])
    return Pack(
        unit=Unit(members, factors, flat_state, "pack"),
        segment_t=segment_t,
        local_index_t=local_index_t,
        flat_param=flat_param,
        flat_grad=flat_grad,
        param_views=_views(flat_param, offsets, params),
        grad_views=_views(flat_grad, offsets, params),
    )


def _views(
    flat: Tensor, offsets: Sequence[int], params: Sequence[Tensor]
) -> list[Tensor]:
    """Each parameter's region of a pack buffer, shaped like the parameter."""
    elements = flat.view(-1)
    return [
        elements[start : start + p.numel()].view(p.shape)
        for start, p in zip(offsets, params)
    ]


def is_current(
    layout: Layout,
    positions: Sequence[tuple[int, int]],
    states: Sequence[State],
    keys: Sequence[str | None],
) -> bool:
    """Whether ``layout`` still describes the bucket (same members, same tensors)."""
    if layout.positions != tuple(positions):
        return False
    for j, key in enumerate(keys):
        if key is not None and not all(
            map(operator.is_, map(operator.itemgetter(key), states), layout.states[j])
        ):
            return False
    return True


TensorLists = tuple[list[Tensor], ...]


def pack_lists(
    pack: Pack, params: Sequence[Tensor], grads: Sequence[Tensor]
) -> TensorLists:
    """Copy the members' parameters and gradients in; return the call's tensor lists."""
    members = pack.unit.members
    torch._foreach_copy_(pack.grad_views, [grads[k] for k in members])
    torch._foreach_copy_(pack.param_views, [params[k] for k in members])
    return ([pack.flat_param], [pack.flat_grad], *pack.unit.state_views)


def unpack(pack: Pack, params: Sequence[Tensor]) -> None:
    """Copy the updated parameters back out of the pack."""
    torch._foreach_copy_([params[k] for k in pack.unit.members], pack.param_views)


def chunk_lists(
    unit: Unit, params: Sequence[Tensor], grads: Sequence[Tensor]
) -> TensorLists:
    """A unit's parameters, gradients and state: flat aliases for a chunk, the
    tensors themselves for the unrolled unit (gradients made contiguous).

    Updates through an alias do not bump the parameter's version counter, so it is
    bumped here, as an in-place update would (autograd then catches a step taken
    between a forward and its backward).
    """
    chunk = [params[k] for k in unit.members]
    torch.autograd.graph.increment_version(chunk)
    grad_list = (grads[k] for k in unit.members)
    if unit.unrolled:
        return (chunk, [g.contiguous() for g in grad_list], *unit.state_views)
    return (
        [_flat(p) for p in chunk],
        [_flat(g) if g.is_contiguous() else g.reshape(-1) for g in grad_list],
        *unit.state_views,
    )
