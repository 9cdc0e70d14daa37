"""How a unit's members reach its compiled graph: flat and row aliases.

An alias shares its tensor's storage without being a view (``set_``), so Dynamo
guards on no base: one graph serves every shape of a size (``_pack``'s units).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ._layout import UnitClass, UnitKind


def flat_alias(t: Tensor) -> Tensor:
    """A 1-D alias of contiguous ``t`` that is not a view (0-d: one element).

    Dynamo guards on a view's base (its sizes and strides), so flat views of
    differently shaped parameters would recompile; an alias made with ``set_`` shares
    the storage without a base. It also never is 0-d (see ``_runner``).
    """
    flat = t.new_empty(0)
    return flat.set_(
        t.untyped_storage(), t.storage_offset(), (max(t.numel(), 1),), (1,)
    )


def same(t: Tensor) -> Tensor:
    """``t`` itself (a member passed as it is)."""
    return t


def scalar_flat(t: Tensor) -> Tensor:
    """``t`` itself, or its one-element :func:`flat_alias` where it is 0-d: a graph's
    in-place update of a 0-d float64 CPU input is dropped (torch 2.13's AOTAutograd
    takes such a tensor for a wrapped Python number), so a float64 0-d parameter in
    the unrolled unit was never updated by the compiled engine. (The list path views
    them instead, ``_calls._at_least_1d``: a view keeps autograd for
    ``differentiable=True``, which the eager engine runs.)"""
    return flat_alias(t) if t.ndim == 0 else t


def rows_alias(kind: UnitKind, block: int) -> Callable[[Tensor], Tensor] | None:
    """Note [block rows]: a unit of 8-bit moments passes each member whose size is
    whole blocks as a ``(blocks, block)`` alias (``_quant_step``'s Note [one pass]:
    Inductor then writes each tensor's update as one loop over its blocks); the
    others as they are (the unrolled unit, whose kind names every shape) or flat.
    Strided members stay as they are. Measured (1 thread, loaded 2-core Xeon, one
    process): 8 tensors of 512x512 and 8 of 1536x512 in dynamic chunks, 14.9 ms a
    step with row aliases, 30.4 ms flat.

    The units are the float32 state's (``_layout.plan_units``): on the GPT-like set,
    1 thread, one process, the unrolled unit stepped in 55 ms, chunks of 8 (sized)
    in 60, chunks of 4 in 59, float32 state 45; first compiled steps (fresh cache):
    unrolled 46 s, chunks of 8 37 s, chunks of 4 29 s, float32 state 28-36 s."""
    if kind.cls == UnitClass.STRIDED:
        return None
    other = scalar_flat if kind.as_is else flat_alias

    def alias(t: Tensor) -> Tensor:
        n = t.numel()
        if n % block or not t.is_contiguous():
            return other(t)
        rows = t.new_empty(0)
        return rows.set_(
            t.untyped_storage(), t.storage_offset(), (n // block, block), (block, 1)
        )

    return alias
