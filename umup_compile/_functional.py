"""The core: pure, traceable Adam/AdamW and SGD updates over lists of tensors.

Both engines run these functions: eagerly, or compiled once by ``torch.compile`` into
fused kernels. Every value a scheduler may change arrives as a tensor (``hyper_t``, one
row per param group), so a new lr never recompiles; structure (amsgrad, maximize, ...)
arrives as a frozen config, so changing it does. The only effects are in-place updates
of the tensors passed in: no ``.item()``, no branching on tensor values, no allocation
of persistent state.

Note [skipped steps]: under a GradScaler, ``found_inf_t`` (a device tensor) marks a
step to skip. The core cannot branch on it without a host sync, so it masks instead:
gradients become 0, moment weights 0, decays 1, the step counter adds 0 and the step
size vanishes, leaving parameters and state bit-for-bit unchanged (up to the sign of
zero) at no extra memory traffic in a fused kernel.

Note [low precision]: bf16/fp16 parameters or state (``state_dtype``) take a second
loop that loads every tensor, computes the whole update in float32 ("opmath", as torch's
kernels compute a bf16 op) and stores each result once: compiled, one kernel reads and
writes the storage dtypes, so bf16 parameters with float32 moments move 20 bytes per
element instead of fp32 Adam's 28. With ``stochastic_rounding`` the parameter store
rounds bf16 stochastically (``_rounding``), keyed by each parameter's seed and step.
float32/float64 training keeps the in-place loop below (no temporaries when eager).

Note [realized coefficients]: per-parameter scalars (effective lr, bias corrections)
are computed as short vectors and stacked into one ``(k, n)`` tensor before the
per-parameter loop. Inductor materialises a stack as a buffer, so the elementwise
kernels load each coefficient once; left as loose pointwise expressions, Inductor inlines
them into every vector iteration (a double ``pow`` per 8 elements: 10x slower on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._rounding import bits16, round_bf16_with_bits, stream_keys

# Columns of ``hyper_t`` (one row per param group).
ADAM_HYPERS = ("lr", "beta1", "beta2", "eps", "weight_decay")
SGD_HYPERS = ("lr", "momentum", "dampening", "weight_decay")

WeightDecayMode = Literal["none", "l2", "decoupled"]


@dataclass(frozen=True)
class AdamConfig:
    """Static structure of an Adam bucket; changing it recompiles on purpose.

    ``int8_state``: the moments are 8-bit codes with block scales (the update is
    ``_quant_step.adam8_step_``; :func:`adam_step_` never sees such a bucket).
    """

    amsgrad: bool = False
    maximize: bool = False
    weight_decay: WeightDecayMode = "none"
    stochastic_rounding: bool = False
    int8_state: bool = False


@dataclass(frozen=True)
class SGDConfig:
    """Static structure of an SGD bucket; changing it recompiles on purpose."""

    momentum: bool = False
    nesterov: bool = False
    maximize: bool = False
    weight_decay: bool = False


def _per_param(hyper_t: Tensor, group_index_t: Tensor) -> tuple[Tensor, ...]:
    """Expand group rows to one row per parameter, then split the columns."""
    return hyper_t.index_select(0, group_index_t).unbind(1)


def _coefficients(
    dtype: torch.dtype, segment_t: Tensor | None, *vectors: Tensor
) -> list[tuple[Tensor, ...]]:
    """Stack ``(n,)`` coefficient vectors, then split them per parameter.

    The values are computed in the hyper-parameters' (float64) precision and rounded
    once to the parameters' dtype, as a kernel rounds a Python scalar; a float64 0-d
    coefficient would otherwise promote a 0-d parameter's arithmetic to float64. See
    Note [realized coefficients]. For a pack (``segment_t`` given) each coefficient
    becomes one ``(rows, 1)`` column, gathered by the rows' parameter index, which
    broadcasts over the pack's ``(rows, PACK_ROW)`` tensors: one gather per row, not
    per element (measured: 12 ms instead of 42 ms for 2000 x 4096 elements, 1 thread).
    """
    table = torch.stack(vectors).to(dtype)
    if segment_t is not None:
        return [(row,) for row in table.index_select(1, segment_t).unsqueeze(-1)]
    return [row.unbind() for row in table]


def _unscale(grad: Tensor, grad_scale_t: Tensor | None, maximize: bool) -> Tensor:
    """Undo the GradScaler's scale (as torch's fused kernels do), then negate."""
    if grad_scale_t is not None:
        grad = grad / grad_scale_t
    return -grad if maximize else grad


def compute_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """The update's arithmetic dtype: float32 at least (torch's "opmath")."""
    return torch.promote_types(
        torch.promote_types(param_dtype, state_dtype), torch.float32
    )


def _noise(
    sr_seeds_t: Tensor | None,
    step: Tensor,
    segment_t: Tensor | None,
    local_index_t: Tensor | None,
    params: Sequence[Tensor],
) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """Per parameter, the (index, k1, k2) of its stochastic-rounding stream.

    A parameter's stream is keyed by its own seed and step, and indexed by the
    element's position in the parameter, so the bits do not depend on how the engine
    laid the parameters out (Note [stochastic rounding] in ``_rounding``).
    """
    if sr_seeds_t is None:
        return None
    keys = stream_keys(sr_seeds_t, step.to(torch.int64))
    if segment_t is not None and local_index_t is not None:  # a pack: rows
        # pack members are small: int32 indices (Note [32-bit lanes])
        k1, k2 = keys.index_select(1, segment_t).unsqueeze(-1).unbind()
        columns = torch.arange(
            params[0].shape[-1], dtype=torch.int32, device=local_index_t.device
        )
        return [(local_index_t.to(torch.int32).unsqueeze(-1) + columns, k1, k2)]
    k1s, k2s = keys.unbind()
    return [
        (
            torch.arange(
                p.numel(),
                dtype=torch.int32 if p.numel() < 2**31 else torch.int64,
                device=p.device,
            ).view(p.shape),
            k1s[i],
            k2s[i],
        )
        for i, p in enumerate(params)
    ]


def _store(
    param: Tensor, value: Tensor, noise: tuple[Tensor, Tensor, Tensor] | None
) -> None:
    """Write an update computed in float32 back to a low-precision parameter."""
    if noise is not None and param.dtype == torch.bfloat16:
        value = round_bf16_with_bits(value.float(), bits16(*noise))
    param.copy_(value)


def _skip_mask(found_inf_t: Tensor | None) -> Tensor | None:
    """A 0-d bool tensor that is True when the step must be skipped."""
    return None if found_inf_t is None else found_inf_t.reshape(()) > 0


def adam_prologue(
    param_dtype: torch.dtype,
    state_dtype: torch.dtype,
    steps: list[Tensor],
    hyper_t: Tensor,
    group_index_t: Tensor,
    lr_scales_t: Tensor,
    wd_scales_t: Tensor,
    *,
    segment_t: Tensor | None = None,
    found_inf_t: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, torch.dtype, list[tuple[Tensor, ...]]]:
    """Count the step; return the skip mask, the step vector, the compute dtype and
    the coefficients ``1 - beta1``, ``1 - beta2``, root scale, scaled eps, L2 factor
    and decoupled decay (each per parameter). Shared with ``_quant_step``."""
    skip = _skip_mask(found_inf_t)
    if skip is None:
        torch._foreach_add_(steps, 1)
    else:
        # A list of tensors, not one tensor "scalar": CPU's foreach reads that on the
        # host (``.item()``); elementwise adds stay on the device.
        increment = (~skip).to(steps[0].dtype)
        torch._foreach_add_(steps, [increment] * len(steps))
    lr, beta1, beta2, eps, weight_decay = _per_param(hyper_t, group_index_t)
    lrs = lr * lr_scales_t
    # reshape: 0-d parameters arrive as 1-element views (see UmupOptimizer._run_bucket).
    # (``to``: a meta dry run counts steps on the CPU.)
    step = torch.stack(steps).to(hyper_t.device, hyper_t.dtype).reshape(-1)
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
        decay = decay.where(~skip, 1.0)
    root_scale = root_scale.where(~frozen, 0.0)
    eps_scaled = eps_scaled.where(~frozen, -math.inf)
    cdt = compute_dtype(param_dtype, state_dtype)
    coefficients = _coefficients(
        cdt, segment_t, weight1, weight2, root_scale, eps_scaled, wds, decay
    )
    return skip, step, cdt, coefficients


def adam_step_(
    params: list[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hyper_t: Tensor,
    group_index_t: Tensor,
    lr_scales_t: Tensor,
    wd_scales_t: Tensor,
    *,
    config: AdamConfig,
    segment_t: Tensor | None = None,
    local_index_t: Tensor | None = None,
    sr_seeds_t: Tensor | None = None,
    grad_scale_t: Tensor | None = None,
    found_inf_t: Tensor | None = None,
) -> None:
    """Apply one u-μP Adam (or AdamW) step in place.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: aligned lists, one entry per parameter.
        max_exp_avg_sqs: aligned list when ``config.amsgrad``, else empty.
        steps: the step counters, incremented here: one 0-d tensor per parameter
            (the list path) or one ``(n,)`` vector (a layout's unit: Note [stacked
            counters] in ``_pack``).
        hyper_t: ``(groups, 5)`` tensor with columns :data:`ADAM_HYPERS`.
        group_index_t: ``(n,)`` int64, each parameter's row in ``hyper_t``.
        lr_scales_t, wd_scales_t: ``(n,)`` u-μP factors; effective lr is
            ``lr * lr_scale`` and effective weight decay ``weight_decay * wd_scale``.
        config: static structure.
        segment_t: for a pack (see ``_pack``): the lists hold one ``(rows, width)``
            tensor each, holding ``n`` parameters; row ``r`` belongs to parameter
            ``segment_t[r]``.
        local_index_t: for a pack, the index within its parameter of each row's
            first element.
        sr_seeds_t: ``(n,)`` int64 seeds: round bf16 parameters stochastically
            (see Note [low precision]); ``None``: round to nearest.
        grad_scale_t, found_inf_t: a GradScaler's scale (gradients are divided by
            it) and inf flag (the step is skipped, see Note [skipped steps]).
    """
    if not params:
        return
    # The state's dtypes (a state tensor rebound to another dtype is updated in it).
    dtypes = [t[0].dtype for t in (exp_avgs, exp_avg_sqs, max_exp_avg_sqs) if t]
    state_dtype = dtypes[0]
    for dtype in dtypes[1:]:
        state_dtype = torch.promote_types(state_dtype, dtype)
    skip, step, cdt, coefficients = adam_prologue(
        params[0].dtype,
        state_dtype,
        steps,
        hyper_t,
        group_index_t,
        lr_scales_t,
        wd_scales_t,
        segment_t=segment_t,
        found_inf_t=found_inf_t,
    )
    one_minus_beta1s, one_minus_beta2s, root_scales, eps_scaleds, l2s, decays = (
        coefficients
    )

    if cdt != params[0].dtype or any(d != cdt for d in dtypes):  # Note [low precision]
        noise = _noise(sr_seeds_t, step, segment_t, local_index_t, params)
        for i, param in enumerate(params):
            grad = _unscale(grads[i].to(cdt), grad_scale_t, config.maximize)
            p = param.to(cdt)
            if config.weight_decay == "l2":
                grad = grad + l2s[i] * p
            if skip is not None:
                grad = grad.where(~skip, 0.0)
            if config.weight_decay == "decoupled":
                p = p * decays[i]
            m = exp_avgs[i].to(cdt).lerp(grad, one_minus_beta1s[i])
            v = exp_avg_sqs[i].to(cdt).lerp(grad.square(), one_minus_beta2s[i])
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            if config.amsgrad:
                v = torch.maximum(max_exp_avg_sqs[i].to(cdt), v)
                max_exp_avg_sqs[i].copy_(v)
            p = p.addcdiv(m, v.sqrt() * root_scales[i] + eps_scaleds[i])
            _store(param, p, noise[i] if noise else None)
        return
    for i, param in enumerate(params):
        grad = _unscale(grads[i], grad_scale_t, config.maximize)
        if config.weight_decay == "l2":
            grad = grad + l2s[i] * param
        if skip is not None:
            grad = grad.where(~skip, 0.0)  # drop the infs and nans
        if config.weight_decay == "decoupled":
            param.mul_(decays[i])
        exp_avgs[i].lerp_(grad, one_minus_beta1s[i])
        exp_avg_sqs[i].lerp_(grad.square(), one_minus_beta2s[i])
        second = exp_avg_sqs[i]
        if config.amsgrad:
            # Not ``out=``: Dynamo refuses a non-contiguous out (a strided parameter).
            max_exp_avg_sqs[i].copy_(torch.maximum(max_exp_avg_sqs[i], second))
            second = max_exp_avg_sqs[i]
        denom = second.sqrt().mul_(root_scales[i]).add_(eps_scaleds[i])
        param.addcdiv_(exp_avgs[i], denom)


def sgd_step_(
    params: list[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: list[Tensor],
    hyper_t: Tensor,
    group_index_t: Tensor,
    lr_scales_t: Tensor,
    wd_scales_t: Tensor,
    *,
    config: SGDConfig,
    fresh_buffers: Sequence[bool] = (),
    segment_t: Tensor | None = None,
    grad_scale_t: Tensor | None = None,
    found_inf_t: Tensor | None = None,
) -> None:
    """Apply one u-μP SGD step in place.

    Args:
        params, grads: aligned lists, one entry per parameter.
        momentum_buffers: aligned list when ``config.momentum``, else empty.
        hyper_t: ``(groups, 4)`` tensor with columns :data:`SGD_HYPERS`.
        group_index_t, lr_scales_t, wd_scales_t: as for :func:`adam_step_`.
        config: static structure.
        fresh_buffers: per parameter, whether its momentum buffer was just created;
            a fresh buffer takes the gradient itself, as in torch.optim.SGD. Only
            the eager engine passes it (see ``Note [first SGD step]``).
        segment_t, grad_scale_t, found_inf_t: as for :func:`adam_step_`.
    """
    if not params:
        return
    lr, momentum, dampening, weight_decay = _per_param(hyper_t, group_index_t)
    neg_lr, buffer_decay, grad_weight = -(lr * lr_scales_t), momentum, 1 - dampening
    skip = _skip_mask(found_inf_t)
    if skip is not None:  # Note [skipped steps]
        neg_lr = neg_lr.where(~skip, 0.0)
        buffer_decay, grad_weight = (
            momentum.where(~skip, 1.0),
            grad_weight.where(~skip, 0.0),
        )
    state_dtype = momentum_buffers[0].dtype if momentum_buffers else params[0].dtype
    cdt = compute_dtype(params[0].dtype, state_dtype)
    neg_lrs, wds, momentums, buffer_decays, grad_weights = _coefficients(
        cdt,
        segment_t,
        neg_lr,
        weight_decay * wd_scales_t,
        momentum,
        buffer_decay,
        grad_weight,
    )

    if cdt != params[0].dtype or cdt != state_dtype:  # Note [low precision]
        for i, param in enumerate(params):
            grad = _unscale(grads[i].to(cdt), grad_scale_t, config.maximize)
            p = param.to(cdt)
            if config.weight_decay:
                grad = grad + wds[i] * p
            if skip is not None:
                grad = grad.where(~skip, 0.0)
            if config.momentum:
                buf = momentum_buffers[i]
                if fresh_buffers and fresh_buffers[i]:
                    b = grad
                else:
                    b = buf.to(cdt) * buffer_decays[i] + grad * grad_weights[i]
                buf.copy_(b)
                grad = grad + momentums[i] * b if config.nesterov else b
            param.copy_(p + grad * neg_lrs[i])
        return
    for i, param in enumerate(params):
        grad = _unscale(grads[i], grad_scale_t, config.maximize)
        if config.weight_decay:
            grad = grad + wds[i] * param
        if skip is not None:
            grad = grad.where(~skip, 0.0)
        if config.momentum:
            buf = momentum_buffers[i]
            if fresh_buffers and fresh_buffers[i]:
                buf.copy_(grad)
            else:
                buf.mul_(buffer_decays[i]).add_(grad * grad_weights[i])
            grad = grad + momentums[i] * buf if config.nesterov else buf
        param.add_(grad * neg_lrs[i])
