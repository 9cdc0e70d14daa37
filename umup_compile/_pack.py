"""Buffers and copies of a layout (``_layout`` decides who goes where).

The **pack** holds its small parameters' state in one buffer per state key
(``state[p][key]`` is a view into it, so ``state_dict`` keeps torch's per-parameter
layout); gradients and parameters are copied into scratch buffers, updated by one
dynamic-shape kernel, and copied back. Buffers are ``(rows, width)``, each parameter
starting a row, and ``segment_t`` maps each row to its parameter's coefficients.

Note [pack copies]: with many small tensors the copies, not the update, are the step:
``torch._foreach_copy_`` costs ~0.7 µs per tensor on CPU (a dispatch each), while
``torch.stack`` into a dense block costs ~0.1 µs per tensor. So the row width is the
largest of :data:`ROW_WIDTHS` that most members' sizes are multiples of (no padding),
members are ordered by shape, and each run of equal-shape unpadded members is copied
in by one ``stack`` (gradients and parameters); the rest, and the copy back out, use
``_foreach_copy_``. Measured (8,000 tensors of 16 elements, 1 thread): copies
2.3 -> 1.0 µs per tensor.
Parameters are copied rather than re-pointed into the pack (``p.data = view``): a view
would make ``torch.save(model.state_dict())`` write the whole pack per parameter, and
safetensors refuses shared storage.

The other **units** pass their members' tensors to the engine: as they are (the
unrolled and strided units) or as flat aliases (chunks), so one graph serves every
shape of a size; their step counters, like the pack's, as one vector whose 0-d views
are the members' ``state["step"]`` (Note [stacked counters]).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._aliases import flat_alias as _flat
from ._aliases import rows_alias as _rows_alias
from ._aliases import same as _same
from ._aliases import scalar_flat as _scalar_flat
from ._layout import (
    PACK_KIND,
    STRIDED_KIND,
    UnitKind,
    UnrolledKinds,
    is_large,
    plan_units,
)

_CONTIGUOUS = Tensor.contiguous  # a C-level call per gradient in map()
_RESOLVE_NEG = Tensor.resolve_neg

PACK_ROW = 128
# Row widths a pack may take, widest first (see Note [pack copies]).
ROW_WIDTHS = (PACK_ROW, 64, 32, 16)

State = dict[str, Tensor]
TensorLists = tuple[list[Tensor], ...]


@dataclass
class Unit:
    """One compiled call: its members (bucket indices), kind and state lists.

    ``state_lists`` has one list per state key of the layout, in order: the members'
    tensors (unrolled), their flat aliases (chunks) or the pack's one buffer.
    """

    members: list[int]
    kind: UnitKind
    state_lists: list[list[Tensor]]
    # How a step passes the members' parameters and gradients (None: as they are
    # for ``kind.as_is``, else flat aliases); see Note [block rows].
    alias: Callable[[Tensor], Tensor] | None = None
    # Keys whose list holds one vector, the members' state being 0-d views of it
    # (Note [stacked counters]); a steady step checks those views' storage.
    stacked: frozenset[str] = frozenset()


@dataclass
class Pack:
    """Small parameters' state and scratch buffers, ``(rows, PACK_ROW)`` each."""

    unit: Unit
    params: list[Tensor]  # the members, in unit order
    runs: list[tuple[int, int, Tensor, Tensor]]  # stacked runs: start, end, blocks
    loose: list[int]  # unit positions of the members copied one by one
    segment_t: Tensor  # each row's parameter
    local_index_t: Tensor  # each row's first element's index within its parameter
    # 8-bit moments (``block``): each row's elements of its parameter, the rest
    # padding (Note [pack padding] in ``_quant_step``); None otherwise
    row_widths_t: Tensor | None
    flat_param: Tensor
    flat_grad: Tensor
    param_views: list[Tensor]
    grad_views: list[Tensor]


@dataclass
class Layout:
    """A bucket's units: the pack (when it has small parameters), then the others."""

    pack: Pack | None
    units: list[Unit]
    # The bucket's parameters, state dicts and keys, for :func:`release`
    params: Sequence[Tensor] = ()
    states: Sequence[State] = ()
    keys: Sequence[str] = ()


def release(layout: Layout, keep: frozenset[int] | set[int] = frozenset()) -> None:
    """Note [released buffers]: members of ``layout`` whose parameter's ``id`` is not
    in ``keep`` get their own state back.

    A pack's members' state are views of its buffers, and every unit's step counters
    views of its vector (Note [stacked counters]). A parameter left out of the next
    layout (no gradient at that step: a mixture of experts' unrouted experts) would
    keep viewing the old ones, and keep each whole buffer alive: 8x the state's memory
    after 60 steps of top-2 routing, and as much in ``torch.save(opt.state_dict())``,
    which writes a view's whole storage. Run before the next plan is made (a list
    call takes the state tensors as they are then); the members kept are rebound to
    the next layout's buffers when it is built. Not where a bucket is or just was
    aliased (``Layouts.retain``): a parameter may then be a view of another's state
    (Note [aliased parameters]), which a copy would cut.
    """
    units = ([layout.pack.unit] if layout.pack else []) + layout.units
    owned: dict[int, Tensor] = {}
    for unit in units:
        for key, tensors in zip(layout.keys, unit.state_lists):
            if unit.kind is PACK_KIND or key in unit.stacked:
                owned[id(tensors[0])] = tensors[0]
    clones: dict[int, Tensor] = {}  # a view two members share stays shared
    for unit in units:
        for k in unit.members:
            if id(layout.params[k]) in keep:
                continue
            state = layout.states[k]
            for key in layout.keys:
                t = state.get(key)
                if isinstance(t, Tensor) and id(t._base) in owned:
                    if id(t) not in clones:
                        clones[id(t)] = t.clone()
                    state[key] = clones[id(t)]


def build_layout(
    params: Sequence[Tensor],
    states: Sequence[State],
    keys: Sequence[str],
    scalar_keys: frozenset[str],
    unrolled: UnrolledKinds,
    block_keys: frozenset[str] = frozenset(),
    block: int = 0,
) -> Layout:
    """Lay out one bucket, moving its small parameters' state into flat buffers.

    Args:
        params, states: the bucket's parameters and their state dicts, aligned.
        keys: the state keys the update reads, in the functional's order.
        scalar_keys: keys holding one 0-d tensor per parameter (e.g. ``step``).
        unrolled: the unrolled kinds this optimizer compiled (see ``plan_units``).
        block_keys: keys holding one row per block of ``block`` elements (8-bit
            moments' scales); when ``keys`` has one, the layout keeps blocks whole
            (Note [block rows]).
    """
    block = block if block_keys & set(keys) else 0
    # A parameter with its negative bit set (a lazy negation, e.g. ``z.conj().imag``)
    # joins the pack, whose copies read and write through the bit: compiled graphs
    # ignore it (Note [what a graph reads]).
    lazy = {k for k, p in enumerate(params) if p.is_neg()}
    dense = [k for k, p in enumerate(params) if p.is_contiguous() and k not in lazy]
    strided = [
        k for k, p in enumerate(params) if not p.is_contiguous() and k not in lazy
    ]
    small = [k for k in dense if not is_large(params[k])]
    large = [k for k in dense if is_large(params[k])]
    large_set = set(large)
    planned = plan_units(large, params, unrolled, small)
    placed = {k for members, _ in planned for k in members}
    small = [k for k in small if k not in placed] + sorted(lazy)
    stacked = scalar_keys & frozenset(keys)  # Note [stacked counters]
    pack = (
        _build_pack(small, params, states, keys, stacked, block_keys, block)
        if small
        else None
    )
    if strided:
        planned.append((strided, STRIDED_KIND))
    for members, _ in planned:
        for k in members:
            for key in keys:
                if key not in stacked:
                    states[k][key] = _unit_state(states[k][key], k in large_set)
    units = []
    for members, kind in planned:
        rows = _rows_alias(kind, block) if block else None
        if rows is None and kind.as_is and any(params[k].ndim == 0 for k in members):
            rows = _scalar_flat  # 0-d members as one-element aliases (see there)
        alias = rows or ((lambda t: t) if kind.as_is else _flat)
        lists = [
            [stack_scalars([states[k] for k in members], key)]
            if key in stacked
            else [
                (_same if key in block_keys else alias)(states[k][key]) for k in members
            ]
            for key in keys
        ]
        units.append(Unit(members, kind, lists, rows, stacked))
    return Layout(pack, units, params, states, tuple(keys))


def stack_scalars(states: Sequence[State], key: str) -> Tensor:
    """Note [stacked counters]: the members' 0-d ``key`` state (``step``) as one
    vector, each member's state rebound to its 0-d view (``state_dict`` keeps torch's
    per-parameter tensors). A graph then counts a unit's steps and computes its
    coefficients in one kernel: as 0-d tensors they took a ``foreach`` kernel of
    their own, a launch per graph call on a GPU (lowered for sm_90 on a CPU:
    ``benchmarks/gpu_codegen.py``)."""
    flat = torch.stack([s[key].reshape(()) for s in states])
    for s, view in zip(states, flat.unbind()):
        s[key] = view
    return flat


def _unit_state(t: Tensor, large: bool) -> Tensor:
    """A unit member's state tensor as a graph may read it (Note [what a graph
    reads]): its own memory, not a view (a former pack member's state is a view of
    the old pack's buffer, and a view rebound through ``.data`` keeps a stale base,
    which Dynamo refuses), no negative bit (graphs ignore it), and contiguous for
    the flat aliases of large members. Otherwise ``t`` itself."""
    if t._base is not None:
        t = t.clone(memory_format=torch.preserve_format)
    if t.is_neg():
        t = t.resolve_neg()
    if large and not t.is_contiguous():
        t = t.contiguous()
    return t


def _row_width(numels: Sequence[int]) -> int:
    """The widest row that at least 3/4 of the members fill without padding."""
    for width in ROW_WIDTHS:
        if 4 * sum(n % width == 0 for n in numels) >= 3 * len(numels):
            return width
    return PACK_ROW


def _build_pack(
    members: list[int],
    bucket_params: Sequence[Tensor],
    bucket_states: Sequence[State],
    keys: Sequence[str],
    stacked: frozenset[str],
    block_keys: frozenset[str],
    block: int,
) -> Pack:
    """Small parameters in rows, each starting a row (see Note [pack copies]).

    Rows let the kernel gather coefficients once per row (see ``_coefficients`` in
    ``_prologue``); the padding (less than a row per parameter) stays zero in
    gradients and parameters and is never read back. With 8-bit moments (``block``)
    a row is one block: the rows of a block key's buffer are the members' own.
    """
    width = block or _row_width([bucket_params[k].numel() for k in members])

    by_shape: dict[tuple[int, ...], list[int]] = {}  # equal shapes side by side
    for k in members:
        by_shape.setdefault(tuple(bucket_params[k].shape), []).append(k)
    members = [k for run in by_shape.values() for k in run]
    params = [bucket_params[k] for k in members]
    states = [bucket_states[k] for k in members]
    p0 = params[0]
    device = p0.device
    row_counts = [-(-p.numel() // width) for p in params]
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
    local_index_t = ((torch.arange(rows, device=device) - row_starts) * width).to(
        torch.int32
    )
    row_widths_t = None
    if block:
        numels = torch.tensor([p.numel() for p in params], device=device)
        row_widths_t = (
            (numels.repeat_interleave(counts, output_size=rows) - local_index_t)
            .clamp(max=width)
            .to(torch.int32)
        )
    offsets = [first * width for first in firsts]
    flat_param = torch.zeros(rows, width, dtype=p0.dtype, device=device)
    flat_grad = torch.zeros_like(flat_param)
    flat_state: list[list[Tensor]] = []
    for key in keys:
        if key in stacked:
            flat = stack_scalars(states, key)
            flat_state.append([flat])
            continue
        if key in block_keys:
            tail = states[0][key].shape[1:]
            flat = torch.zeros(rows, *tail, dtype=states[0][key].dtype, device=device)
            views = [flat[a : a + n] for a, n in zip(firsts, row_counts)]
            torch._foreach_copy_(
                views, [s[key].reshape(v.shape) for s, v in zip(states, views)]
            )
        else:
            flat = torch.zeros(rows, width, dtype=states[0][key].dtype, device=device)
            views = _views(flat, offsets, params)
            torch._foreach_copy_(views, [s[key] for s in states])
        for s, view in zip(states, views):
            s[key] = view  # state_dict keeps per-parameter tensors: views
        flat_state.append([flat])
    runs, loose = _runs(params, offsets, width, flat_param, flat_grad)
    return Pack(
        unit=Unit(members, PACK_KIND, flat_state, stacked=stacked),
        params=params,
        runs=runs,
        loose=loose,
        segment_t=segment_t,
        local_index_t=local_index_t,
        row_widths_t=row_widths_t,
        flat_param=flat_param,
        flat_grad=flat_grad,
        param_views=_views(flat_param, offsets, params),
        grad_views=_views(flat_grad, offsets, params),
    )


def _runs(
    params: Sequence[Tensor],
    offsets: Sequence[int],
    width: int,
    flat_param: Tensor,
    flat_grad: Tensor,
) -> tuple[list[tuple[int, int, Tensor, Tensor]], list[int]]:
    """Runs of equal-shape unpadded members (copied in by ``stack`` into a dense
    block of each buffer), and the other members' positions."""
    runs: list[tuple[int, int, Tensor, Tensor]] = []
    loose: list[int] = []
    start = 0
    while start < len(params):
        shape, numel = params[start].shape, params[start].numel()
        end = start + 1
        while end < len(params) and params[end].shape == shape:
            end += 1
        if numel % width == 0 and end - start > 1 and params[start].is_contiguous():
            a, b = offsets[start], offsets[start] + (end - start) * numel
            block = (end - start, *shape)
            runs.append(
                (
                    start,
                    end,
                    flat_grad.view(-1)[a:b].view(block),
                    flat_param.view(-1)[a:b].view(block),
                )
            )
        else:
            loose += range(start, end)
        start = end
    return runs, loose


def _views(
    flat: Tensor, offsets: Sequence[int], params: Sequence[Tensor]
) -> list[Tensor]:
    """Each parameter's region of a pack buffer, shaped like the parameter."""
    elements = flat.view(-1)
    return [
        elements[start : start + p.numel()].view(p.shape)
        for start, p in zip(offsets, params)
    ]


def pack_in(pack: Pack, grads: list[Tensor]) -> TensorLists:
    """Copy the members' gradients (in unit order) and parameters in; return the
    call's tensor lists (see Note [pack copies])."""
    params = pack.params
    for start, end, grad_block, param_block in pack.runs:
        torch.stack(grads[start:end], out=grad_block)
        torch.stack(params[start:end], out=param_block)
    if len(pack.loose) == len(params):
        torch._foreach_copy_(pack.grad_views, grads)
        torch._foreach_copy_(pack.param_views, params)
    elif pack.loose:
        loose = pack.loose
        torch._foreach_copy_(
            [pack.grad_views[k] for k in loose], [grads[k] for k in loose]
        )
        torch._foreach_copy_(
            [pack.param_views[k] for k in loose], [params[k] for k in loose]
        )
    return ([pack.flat_param], [pack.flat_grad], *pack.unit.state_lists)


def pack_out(pack: Pack) -> None:
    """Copy the updated parameters back out of the pack."""
    try:
        torch._foreach_copy_(pack.params, pack.param_views)
    except RuntimeError:  # refused before copying: a parameter with its negative bit
        for p, view in zip(pack.params, pack.param_views):
            p.copy_(view)


def unit_lists(unit: Unit, params: list[Tensor], grads: list[Tensor]) -> TensorLists:
    """A unit's parameters, gradients (both in unit order) and state: flat aliases
    for a chunk, the tensors themselves for the unrolled unit (gradients made
    contiguous).

    Updates through an alias do not bump the parameter's version counter, so it is
    bumped here, as an in-place update would (autograd then catches a step taken
    between a forward and its backward).
    """
    torch.autograd.graph.increment_version(params)
    # A gradient's negative bit (a lazy negation) is resolved: graphs ignore it.
    grads = list(map(_RESOLVE_NEG, grads))
    alias = unit.alias
    if alias is not None:  # Note [block rows]
        return (
            list(map(alias, params)),
            [alias(g.contiguous()) for g in grads],
            *unit.state_lists,
        )
    if unit.kind.as_is:
        return (list(params), list(map(_CONTIGUOUS, grads)), *unit.state_lists)
    return (
        [_flat(p) for p in params],
        [_flat(g) if g.is_contiguous() else g.reshape(-1) for g in grads],
        *unit.state_lists,
    )
