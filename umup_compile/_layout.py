"""Layout policy: which of a bucket's parameters go to the pack, the unrolled unit or
chunks, and with which graph kind. Decisions only; ``_pack`` makes the buffers.

Compiling one graph that unrolls every parameter costs ~0.9 s per tensor on a 2-core
CPU (500 tensors: minutes). A layout instead splits a bucket into *units* whose graphs
are reused, so the number of graphs does not grow with the parameter count:

- the **pack**: small contiguous parameters (fewer than :data:`PACK_MAX_NUMEL`
  elements), updated by one dynamic-shape kernel over flat buffers (see ``_pack``).
  Packing copies (~24 B/element) only pay off below ~16K elements, hence the threshold.
- the **strided unit**: parameters that are not contiguous (transposed views,
  channels_last convolution weights), passed as they are so that their state keeps
  their memory format, as torch's ``zeros_like(p, preserve_format)`` does.
- the **unrolled unit**: when a bucket has at most :data:`UNROLL_MAX` large contiguous
  parameters, one static-shape graph over all of them, passed as they are. Its kind
  names their shapes, so another membership would compile another graph: beyond
  :data:`MAX_UNROLLED_KINDS` per optimizer, other memberships use chunks. A few small
  parameters join it instead of a pack (Note [small into the unrolled unit]).
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

Note [unrolled unit on a GPU]: CUDA parameters take the same limits. There a unit's
members share combo kernels (Note [combo kernels] in ``_engine``), and every chunk
call adds 2 launches, a pack 5 (its copies and its graph), so unrolling more would
launch fewer kernels: with the limits at 128, gpt-124m's step (50 large tensors, 25
small) is 4 + 0 launches instead of 18 + 3 (torch fused: 3), 34 us less an H100 step
on paper, gpt-1.2b's 7 + 0 instead of 27 + 3 (10), 46 us less; with combo kernels of
up to 128 members and 2048 argument slots besides, 2 + 0 and 5 + 0. But a combo
kernel's build time grows faster than its members (Note [combo kernel arguments] in
``_engine``): the first compile, from empty caches on one core of a 2-core CPU
(dispatch by chains of 4, Note [flat combo dispatch]), goes from 14 s to 29 s for
gpt-124m (lowering 9.6 -> 15.8 s, cubin builds 4.0 -> 12.7 s, the slowest 0.4 -> 5.2
s; 37 s, the slowest build 9.4 s, for 2 + 0) and from 14 s to 51 s for gpt-1.2b (66 s
for 5 + 0). With a GPU machine's parallel builds that is 11-17 s more for gpt-124m
and 24-36 s for gpt-1.2b, repaid after 3-7 x 10^5 steps of 2 us a launch. Measured
with ``python -m benchmarks.gpu_codegen --layout-option UNROLL_MAX=128 ...``
(``benchmarks/results/paper-sm90``, ``_experiment_gpu-unroll128`` and
``-args2048``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PACK_MAX_NUMEL = 16384
CHUNK = 8
MAX_STATIC_SIZES = 8
UNROLL_MAX = 48
FOLD_SMALL_MAX = 32  # Note [small into the unrolled unit]
UNROLL_WITH_SMALL_MAX = 64
MAX_UNROLLED_KINDS = 1


class UnitClass(enum.Enum):
    """How a unit's members reach its compiled graph."""

    PACK = "pack"  # copied into flat buffers, dynamic shapes
    UNROLLED = "unrolled"  # passed as they are, one static graph over all of them
    STRIDED = "strided"  # not contiguous: passed as they are, dynamic shapes
    SIZED = "sized"  # flat aliases of one size, static shapes
    DYNAMIC = "dynamic"  # flat aliases of mixed sizes, dynamic shapes


@dataclass(frozen=True)
class UnitKind:
    """A unit's graph class: each kind is one compiled callable of the engine.

    ``name`` is ``"pack"``, ``"static:<count>*<shape>+..."`` (unrolled),
    ``"static<k>x<numel>"`` (sized) or ``"chunk<k>"`` (dynamic).
    """

    cls: UnitClass
    name: str

    @property
    def static(self) -> bool:
        """Whether the graph is compiled with static shapes."""
        return self.cls in (UnitClass.UNROLLED, UnitClass.SIZED)

    @property
    def as_is(self) -> bool:
        """Whether the members are passed as they are (not as flat aliases)."""
        return self.cls in (UnitClass.UNROLLED, UnitClass.STRIDED)


PACK_KIND = UnitKind(UnitClass.PACK, "pack")
STRIDED_KIND = UnitKind(UnitClass.STRIDED, "strided")


def is_large(p: Tensor) -> bool:
    """Whether contiguous ``p`` is updated in a unit of its own kind (else it joins
    the pack, or the unrolled unit: see :func:`plan_units`)."""
    return p.numel() >= PACK_MAX_NUMEL


class UnrolledKinds:
    """The unrolled kinds one optimizer has compiled: at most
    :data:`MAX_UNROLLED_KINDS`, each a static graph named by its shapes."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def admit(self, kind: UnitKind) -> bool:
        """Whether ``kind`` may be used (recording it when it is new)."""
        if kind.name not in self.names and len(self.names) >= MAX_UNROLLED_KINDS:
            return False
        self.names.add(kind.name)
        return True


def plan_units(
    large: Sequence[int],
    params: Sequence[Tensor],
    unrolled: UnrolledKinds,
    small: Sequence[int] = (),
) -> list[tuple[list[int], UnitKind]]:
    """Units of large parameters (bucket indices) with their graph kind.

    Parameters of the :data:`MAX_STATIC_SIZES` most frequent sizes are chunked by
    size, into static-shape graphs (C++ guards, ~0.15 ms a call); the rest share
    dynamic-shape graphs, whose Python shape guards cost ~0.3-0.7 ms a call.

    Note [small into the unrolled unit]: a few ``small`` parameters join the unrolled
    unit rather than a pack of their own (the caller packs those not placed here).
    A pack is one more compiled call, ~0.3 ms after a step's kernel has emptied the
    caches (see above): on the GPT-like set (34 large tensors, 17 norms of 512), 1
    thread, that was 2 % of the step, and the difference to torch fused. Each small
    member costs about what a pack graph costs to compile once it is past a few
    dozen, hence :data:`FOLD_SMALL_MAX`.
    """
    if 0 < len(large) <= UNROLL_MAX:
        candidates = [list(large)]
        if (
            small
            and len(small) <= FOLD_SMALL_MAX
            and len(large) + len(small) <= UNROLL_WITH_SMALL_MAX
        ):
            candidates.insert(0, [*large, *small])
        for chosen in candidates:
            members = sorted(chosen, key=lambda k: (params[k].numel(), params[k].shape))
            kind = _unrolled_kind([params[k].shape for k in members])
            if unrolled.admit(kind):
                return [(members, kind)]
    by_size: dict[int, list[int]] = {}
    for k in large:
        by_size.setdefault(params[k].numel(), []).append(k)
    frequent = sorted(by_size, key=lambda n: -len(by_size[n]))[:MAX_STATIC_SIZES]
    out: list[tuple[list[int], UnitKind]] = []
    rest: list[int] = []
    for numel, members in by_size.items():
        if numel not in frequent:
            rest += members
            continue
        for chunk in _split(members):
            out.append(
                (chunk, UnitKind(UnitClass.SIZED, f"static{len(chunk)}x{numel}"))
            )
    for chunk in _split(sorted(rest)):
        out.append((chunk, UnitKind(UnitClass.DYNAMIC, f"chunk{len(chunk)}")))
    return out


def _unrolled_kind(shapes: list[torch.Size]) -> UnitKind:
    """``static:2*16x32+1*64x64`` for sorted shapes (16, 32), (16, 32), (64, 64)."""
    runs: list[tuple[int, torch.Size]] = []
    for shape in shapes:
        if runs and runs[-1][1] == shape:
            runs[-1] = (runs[-1][0] + 1, shape)
        else:
            runs.append((1, shape))
    name = "static:" + "+".join(
        f"{count}*{'x'.join(map(str, shape))}" for count, shape in runs
    )
    return UnitKind(UnitClass.UNROLLED, name)


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
