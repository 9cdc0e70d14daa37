"""What an update computes before it touches a tensor: the step count, the skip mask
and the per-parameter coefficients, shared by ``_functional`` and ``_quant_step``.

Note [realized coefficients]: per-parameter scalars (effective lr, bias corrections)
are computed as short vectors and stacked into one ``(k, n)`` tensor before the
per-parameter loop. Inductor materialises a stack as a buffer, so the elementwise
kernels load each coefficient once; left as loose pointwise expressions, Inductor inlines
them into every vector iteration (a double ``pow`` per 8 elements: 10x slower on CPU).
On the CPU the table is realized in the compute dtype: a float64 one was loaded and
converted at every vector iteration (the GPT-like step, 1 thread, 4 alternating runs
each: 0.93-1.02x torch fused before, 0.92-0.94x after).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# The hyper-parameters of a step: the ``(groups, hypers)`` tensor, or its rows as 0-d
# host tensors (Note [host hypers] in ``_hypers``).
Hypers = Tensor | Sequence[Sequence[Tensor]]


def _per_param(
    hyper_t: Hypers, group_index_t: Tensor, lr_scales_t: Tensor
) -> tuple[Tensor, ...]:
    """Expand group rows to one row per parameter, then split the columns."""
    if isinstance(hyper_t, Tensor):
        return hyper_t.index_select(0, group_index_t).unbind(1)
    # 0-d host scalars: a GPU kernel takes them as arguments (Note [host hypers]);
    # each column is built on the parameters' device, a row's value per group. Its
    # zeros are read from the lr scales (finite, so exact): columns read from no
    # buffer share none with the step count, and Inductor gave them a kernel of
    # their own (sm_90: 3 launches instead of 2).
    first = hyper_t[0]
    base = lr_scales_t * 0.0
    columns = []
    for j, value in enumerate(first):
        column = base + value
        for g in range(1, len(hyper_t)):
            column = torch.where(group_index_t == g, hyper_t[g][j], column)
        columns.append(column)
    return tuple(columns)


def _coefficients(
    dtype: torch.dtype,
    segment_t: Tensor | None,
    *vectors: Tensor,
) -> list[tuple[Tensor, ...]]:
    """Stack ``(n,)`` coefficient vectors, then split them per parameter.

    The values are computed in the hyper-parameters' (float64) precision and rounded
    once to the parameters' dtype, as a kernel rounds a Python scalar; a float64 0-d
    coefficient would otherwise promote a 0-d parameter's arithmetic to float64. See
    Note [realized coefficients]. For a pack (``segment_t`` given) each coefficient
    becomes one ``(rows, 1)`` column, gathered by the rows' parameter index, which
    broadcasts over the pack's ``(rows, PACK_ROW)`` tensors: one gather per row, not
    per element (measured: 12 ms instead of 42 ms for 2000 x 4096 elements, 1 thread).
    On the CPU the table is realized in ``dtype``: its vector loops then load each
    coefficient as is, where they would load and convert a float64 one at every
    iteration. On a GPU it is realized in float64 and converted where loaded, once per
    program, and Inductor writes it in the step count's kernel (on sm_90, realized in
    ``dtype`` it took a kernel of its own: ``benchmarks/gpu_codegen.py``). The values
    are the same either way.
    """
    if vectors[0].device.type == "cpu":  # kernels load it without converting
        table = torch.stack([v.to(dtype) for v in vectors])
    else:  # realized in float64, converted where it is loaded
        table = torch.stack(vectors).to(dtype)
    if segment_t is not None:
        return [(row,) for row in table.index_select(1, segment_t).unsqueeze(-1)]
    return [row.unbind() for row in table]


def compute_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """The update's arithmetic dtype: float32 at least (torch's "opmath")."""
    return torch.promote_types(
        torch.promote_types(param_dtype, state_dtype), torch.float32
    )


def _skip_mask(found_inf_t: Tensor | None) -> Tensor | None:
    """A 0-d bool tensor that is True when the step must be skipped."""
    return None if found_inf_t is None else found_inf_t.reshape(()) > 0


def adam_prologue(
    param_dtype: torch.dtype,
    state_dtype: torch.dtype,
    steps: list[Tensor],
    hyper_t: Hypers,
    group_index_t: Tensor,
    lr_scales_t: Tensor,
    wd_scales_t: Tensor,
    *,
    segment_t: Tensor | None = None,
    found_inf_t: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, torch.dtype, list[tuple[Tensor, ...]]]:
    """Count the step; return the skip mask, the step vector, the compute dtype and
    the coefficients ``1 - beta1``, ``1 - beta2``, root scale, scaled eps, L2 factor,
    decoupled decay and ``beta2`` (each per parameter, realized as ``_coefficients``
    says). Shared with ``_quant_step``."""
    skip = _skip_mask(found_inf_t)
    if skip is None:
        torch._foreach_add_(steps, 1)
    else:
        # A list of tensors, not one tensor "scalar": CPU's foreach reads that on the
        # host (``.item()``); elementwise adds stay on the device.
        increment = (~skip).to(steps[0].dtype)
        torch._foreach_add_(steps, [increment] * len(steps))
    lr, beta1, beta2, eps, weight_decay = _per_param(
        hyper_t, group_index_t, lr_scales_t
    )
    lrs = lr * lr_scales_t
    # reshape: 0-d parameters arrive as 1-element views (see UmupOptimizer._run_bucket).
    # (``to``: a meta dry run counts steps on the CPU.)
    step = torch.stack(steps).to(lr_scales_t.device, lr_scales_t.dtype).reshape(-1)
    bias_correction1 = 1 - beta1.pow(step)
    bias_correction2_sqrt = (1 - beta2.pow(step)).sqrt()
    wds = weight_decay * wd_scales_t
    weight1, weight2 = 1 - beta1, 1 - beta2
    # The step size -lr / bc1 is folded into the denominator, as torch's capturable
    # path does: update = m / (sqrt(v) * root_scale + eps_scaled), one addcdiv_.
    neg_inv_step = -bias_correction1 / lrs
    root_scale = neg_inv_step / bias_correction2_sqrt
    eps_scaled = eps * neg_inv_step
    decay = 1 - lrs * wds
    # No update (lr 0, e.g. warm-up, or a skipped step): a denominator of -inf makes
    # the update +-0 even where sqrt(v) is 0, where -inf * 0 would give nan.
    frozen = lrs == 0
    if skip is not None:
        frozen = frozen | skip
        weight1, weight2 = weight1.where(~skip, 0.0), weight2.where(~skip, 0.0)
        beta2 = beta2.where(~skip, 1.0)
        decay = decay.where(~skip, 1.0)
    root_scale = root_scale.where(~frozen, 0.0)
    eps_scaled = eps_scaled.where(~frozen, -math.inf)
    cdt = compute_dtype(param_dtype, state_dtype)
    coefficients = _coefficients(
        cdt,
        segment_t,
        weight1,
        weight2,
        root_scale,
        eps_scaled,
        wds,
        decay,
        beta2,
    )
    return skip, step, cdt, coefficients
