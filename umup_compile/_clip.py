"""Global-norm gradient clipping, folded into the update (``max_grad_norm=``).

Note [fused clipping]: ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` reads every
gradient for the norm, then reads and writes every gradient again to scale it, before
the optimizer reads it a third time. Here the norm is one read of the gradients the
update is about to see (the pack's flat gradient buffer, or the lists), and the
coefficient ``min(1, max_norm / (norm + 1e-6))`` (torch's formula) joins the
GradScaler's divisor: the update divides each gradient by ``scale / coefficient``,
which it does anyway, so no pass rewrites the gradients. Everything stays on the
device: no host sync. The norm is of the unscaled gradients (a GradScaler's scale is
divided out), and a step the scaler skips stays skipped (its mask does not depend on
the divisor). Sharded gradients (FSDP2, tensor parallel) contribute their local
squares, summed over the mesh dimensions they are sharded on (replicated ones count
once); DDP's gradients are already all-reduced.
With the compiled engine on one device, everything after the per-tensor norms is one
compiled call (:func:`coefficient_into`): GPT-like set, 1 thread, the clipped step went
from 0.85x to 0.83x of ``clip_grad_norm_`` + torch fused. The norm's read itself runs
at what one core streams (~36 GB/s here), compiled or ``_foreach_norm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# torch's clip_grad_norm_ adds this to the norm before dividing.
EPS = 1e-6


def check_max_grad_norm(value: Any) -> float | None:
    """``max_grad_norm`` as a float, or ``None`` (no clipping).

    Raises:
        TypeError, ValueError: not a number, or negative, nan or infinite.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"max_grad_norm must be None or a float, got {value!r}; pass e.g. "
            "max_grad_norm=1.0."
        )
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"max_grad_norm must be a finite number >= 0, got {value!r}; pass None "
            "to turn clipping off."
        )
    return float(value)


def tensor_norms(grads: Sequence[Tensor]) -> Tensor:
    """Each gradient's L2 norm, stacked: one ``_foreach_norm`` over them all.

    Complex gradients arrive as real views; padding in a pack is zero.
    """
    return torch.stack(torch._foreach_norm(list(grads)))


def squared_norm(grads: Sequence[Tensor]) -> Tensor:
    """The sum of the squares of ``grads`` (a 0-d tensor on their device, in
    :func:`accumulate_dtype`)."""
    return _sum_of_squares(tensor_norms(grads))


def accumulate_dtype(device: torch.device) -> torch.dtype:
    """What the norms are squared and summed in (Note [norm precision])."""
    return torch.float32 if device.type == "mps" else torch.float64


def norm_dtype(norms: Tensor) -> torch.dtype:
    """The dtype of the norm and the divisor: the gradients' (their per-tensor norms
    are), float32 at least, as ``clip_grad_norm_`` computes in."""
    return torch.promote_types(norms.dtype, torch.float32)


# Note [norm precision]: the per-tensor norms are squared and summed in float64 (not
# on MPS), then the norm and the divisor are rounded to the gradients' dtype (float32
# at least). Under a GradScaler these are norms of scaled gradients, and in float32
# the squares of 16 tensors' norms of ~1e19 summed to inf: the coefficient was 0 and
# every update 0, silently, where torch (unscale_, clip, step) clips. A scale grows
# that far in long bf16 runs, which rarely overflow, so the scaler keeps doubling
# (2**60 after ~90k steps from 2**16). With float64 gradients the norm is float64,
# as torch's (it was float32: 1e-8 off). What remains is each tensor's own norm
# (a pack's is its whole buffer's): ``_foreach_norm`` accumulates float32 in
# float32 (CPU and CUDA), so one scaled norm over 1.8e19 is still inf; its float64
# form converts every tensor first (11x slower on the CPU). ``scaler.unscale_(opt)``
# before the step avoids it (docs/clipping.rst).
def _sum_of_squares(norms: Tensor) -> Tensor:
    return norms.to(accumulate_dtype(norms.device)).square().sum()


def _norm_and_coefficient(
    squares: Tensor, max_norm: float | Tensor, scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The norm of the unscaled gradients from their (scaled) ``squares``, and
    torch's coefficient ``min(1, max_norm / (norm + 1e-6))``, in ``squares``'
    dtype."""
    norm = squares.sqrt()
    if scale is not None:
        norm = norm / scale.to(norm.device, norm.dtype)
    return norm, (max_norm / (norm + EPS)).clamp(max=1.0)


def _divisor(coefficient: Tensor, scale: Tensor | None) -> Tensor:
    """What the update divides the gradients by: ``scale / coefficient``."""
    return 1 / coefficient if scale is None else scale / coefficient


def coefficient_into(
    norms: Tensor,
    max_norm_t: Tensor,
    divisor: Tensor,
    total_norm: Tensor,
    grad_scale_t: Tensor | None = None,
    *,
    config: Any = None,
) -> None:
    """:func:`clip_divisors` for one device, written into ``divisor`` and ``total_norm``.

    The compiled engine's form (it runs functions that write their results in place):
    from the per-tensor ``norms`` of :func:`tensor_norms` to the divisor is nine tiny
    ops, ~0.05 ms each eagerly after a step's kernel has emptied the caches, one
    compiled call instead. ``max_norm_t`` is a 0-d float32 tensor, so a new
    ``max_grad_norm`` never recompiles; ``config`` is the engine's static key.
    """
    del config
    norm, coefficient = _norm_and_coefficient(
        _sum_of_squares(norms), max_norm_t, grad_scale_t
    )
    total_norm.copy_(norm)  # rounded to the gradients' dtype (Note [norm precision])
    divisor.copy_(_divisor(coefficient, grad_scale_t))


def sharded_squared_norm(grads: Sequence[Tensor], params: Sequence[Any]) -> Tensor:
    """The sum of the squares of the whole gradients whose local shards are ``grads``,
    placed as ``params``: each placement's local squares summed over the mesh
    dimensions it shards, and counted once over those it replicates (tensor
    parallel mixes sharded, replicated and plain parameters in a bucket). FSDP2 over
    a tensor-parallel mesh shards with ``_StridedShard``, which is no ``Shard``
    (``is_shard()`` is false): a parameter's placement shards unless it replicates.
    Collectives on the device, no host sync; every rank issues the same ones in the
    same order, as the parameters are the same on every rank."""
    import torch.distributed as dist

    subsets: dict[tuple[int, tuple[int, ...]], tuple[Any, list[Tensor]]] = {}
    for g, p in zip(grads, params):
        mesh = getattr(p, "device_mesh", None)
        placements = () if mesh is None else p.placements
        dims = tuple(d for d, pl in enumerate(placements) if not pl.is_replicate())
        subsets.setdefault((id(mesh), dims), (mesh, []))[1].append(g)
    total = []
    for (_, dims), (mesh, subset) in subsets.items():
        squares = squared_norm(subset)
        for dim in dims:
            dist.all_reduce(squares, group=mesh.get_group(dim))
        total.append(squares)
    return torch.stack(total).sum()


def clip_divisors(
    squares: Sequence[Tensor],
    max_norm: float,
    grad_scales: dict[torch.device, Tensor | None],
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[torch.device, Tensor], Tensor]:
    """What each device's update divides its gradients by, and the total norm.

    Args:
        squares: sums of squared (scaled) gradients, on any devices.
        max_norm: the clipping threshold.
        grad_scales: per device, the GradScaler's scale there (or ``None``).
        dtype: of the norm and the divisors (:func:`norm_dtype`).

    Returns:
        ``({device: scale / coefficient}, norm)``; the norm (of the unscaled
        gradients) is on the first device.
    """
    first = next(iter(grad_scales))
    total = torch.stack(
        [s.to(first, accumulate_dtype(first), non_blocking=True) for s in squares]
    ).sum()
    norm, coefficient = _norm_and_coefficient(total, max_norm, grad_scales[first])
    divisors = {
        device: _divisor(coefficient.to(device, non_blocking=True), scale).to(dtype)
        for device, scale in grad_scales.items()
    }
    return divisors, norm.to(dtype)
