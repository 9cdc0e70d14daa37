"""The core: pure, traceable Adam/AdamW and SGD updates over lists of tensors.

Both engines run these functions: eagerly, or compiled once by ``torch.compile`` into
fused kernels. Every value a scheduler may change arrives as a tensor (``hyper_t``, one
row per param group), so a new lr never recompiles; structure (amsgrad, maximize, ...)
arrives as a frozen config, so changing it does. The only effects are in-place updates
of the tensors passed in: no ``.item()``, no branching on tensor values, no allocation
of persistent state. What they compute first (the step count, the skip mask, the
per-parameter coefficients) is ``_prologue``'s.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._prologue import (
    Hypers,
    _coefficients,
    _per_param,
    _skip_mask,
    adam_prologue,
    compute_dtype,
)
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
    # A traced step keeps momentum on where buffers exist (Note [traced groups] in
    # ``_specs``); a group's momentum set to 0 then skips them at run time, as
    # torch's step does (the buffer kept, the gradient used as it is).
    momentum_may_be_zero: bool = False


def _unscale(grad: Tensor, grad_scale_t: Tensor | None, maximize: bool) -> Tensor:
    """Undo the GradScaler's scale (as torch's fused kernels do), then negate."""
    if grad_scale_t is not None:
        grad = grad / grad_scale_t
    return -grad if maximize else grad


def _noise(
    sr_seeds_t: Tensor | None,
    step: Tensor,
    segment_t: Tensor | None,
    local_index_t: Tensor | None,
    params: Sequence[Tensor],
    shards: Sequence[ShardPlace | None] | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """Per parameter, the (index, k1, k2) of its stochastic-rounding stream.

    A parameter's stream is keyed by its own seed and step, and indexed by the
    element's position in the parameter, so the bits do not depend on how the engine
    laid the parameters out (Note [stochastic rounding] in ``_rounding``). ``shards``:
    per parameter, where its local shard sits in the full parameter (None: it is
    whole), so that a shard draws the full parameter's bits (Note [shard streams]).
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
            _positions(p, shards[i] if shards else None),
            k1s[i],
            k2s[i],
        )
        for i, p in enumerate(params)
    ]


# A local shard's place in its full parameter: (the full shape, the shard's offset).
ShardPlace = tuple[tuple[int, ...], tuple[int, ...]]


def _positions(p: Tensor, shard: ShardPlace | None) -> Tensor:
    """Each element's flat position in its full parameter, shaped like ``p``.

    Note [shard streams]: an FSDP2 or tensor-parallel step updates local shards
    (Note [sharded parameters] in ``_calls``); counted from 0 in each shard, every
    shard of a parameter drew the same bits, unlike one process. The position is
    the sum over dims of (local index + the shard's offset) times the full shape's
    stride, built by broadcasting (no full-size tensor).
    """
    full = p.shape if shard is None else shard[0]
    dtype = torch.int32 if math.prod(full) < 2**31 else torch.int64
    if shard is None or len(full) != p.ndim:
        return torch.arange(p.numel(), dtype=dtype, device=p.device).view(p.shape)
    index = torch.zeros((), dtype=dtype, device=p.device)
    stride = 1
    for d in reversed(range(p.ndim)):
        n = p.shape[d]
        along = (torch.arange(n, dtype=dtype, device=p.device) + shard[1][d]) * stride
        index = index + along.view([n if k == d else 1 for k in range(p.ndim)])
        stride *= full[d]
    return index.expand(p.shape)


def _store(
    param: Tensor, value: Tensor, noise: tuple[Tensor, Tensor, Tensor] | None
) -> None:
    """Write an update computed in float32 back to a low-precision parameter."""
    if noise is not None and param.dtype == torch.bfloat16:
        value = round_bf16_with_bits(value.float(), bits16(*noise))
    param.copy_(value)


def adam_step_(
    params: list[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hyper_t: Hypers,
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
    shards: Sequence[ShardPlace | None] | None = None,
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
        shards: per parameter, where its local shard sits (Note [shard streams]).
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
    (
        one_minus_beta1s,
        one_minus_beta2s,
        root_scales,
        eps_scaleds,
        l2s,
        decays,
        beta2s,
    ) = coefficients

    if cdt != params[0].dtype or any(d != cdt for d in dtypes):  # Note [low precision]
        noise = _noise(sr_seeds_t, step, segment_t, local_index_t, params, shards)
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
            # Note [second moment as torch's]
            v = exp_avg_sqs[i].to(cdt) * beta2s[i]
            v = v.addcmul(grad * one_minus_beta2s[i], grad)
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            if config.amsgrad:
                v = torch.maximum(max_exp_avg_sqs[i].to(cdt), v)
                max_exp_avg_sqs[i].copy_(v)
            p = p.addcdiv(m, v.sqrt() * root_scales[i] + eps_scaleds[i])
            _store(param, p, noise[i] if noise else None)
        return
    keep = _kept if torch.is_grad_enabled() else _same  # Note [differentiable steps]
    for i, param in enumerate(params):
        grad = _unscale(grads[i], grad_scale_t, config.maximize)
        if config.weight_decay == "l2":
            grad = grad + l2s[i] * keep(param)
        if skip is not None:
            grad = grad.where(~skip, 0.0)  # drop the infs and nans
        if config.weight_decay == "decoupled":
            param.mul_(decays[i])
        exp_avgs[i].lerp_(grad, one_minus_beta1s[i])
        # Note [second moment as torch's]
        exp_avg_sqs[i].mul_(beta2s[i]).addcmul_(grad.mul(one_minus_beta2s[i]), grad)
        second = exp_avg_sqs[i]
        if config.amsgrad:
            # Not ``out=``: Dynamo refuses a non-contiguous out (a strided parameter).
            max_exp_avg_sqs[i].copy_(
                torch.maximum(keep(max_exp_avg_sqs[i]), keep(second))
            )
            second = max_exp_avg_sqs[i]
        root = second.sqrt()
        # With grad mode on (differentiable=True) autograd keeps sqrt's output: mul,
        # not mul_; off, mul_ (a new tensor per parameter cost the eager GPT-like
        # step ~20 %)
        root = root.mul(root_scales[i]) if keep is _kept else root.mul_(root_scales[i])
        param.addcdiv_(keep(exp_avgs[i]), root.add_(eps_scaleds[i]))


# Note [second moment as torch's]: ``v`` is updated as torch.optim's Adam updates it,
# ``beta2 * v + ((1 - beta2) * g) * g``, each product rounded in that order (eager,
# ``mul_`` then ``addcmul_``: torch's single-tensor CPU step, its default there; ATen
# fuses addcmul's multiply-add, Inductor's code may not: one rounding apart). A
# gradient whose square overflows float32 (past ~5.8e20 in this order, as in torch)
# makes that element's ``v`` inf, and inf then stays inf (``beta2 * inf + x``), so
# the element stops updating, with no guard. ``lerp(g * g, 1 - beta2)``, used before,
# turned an inf ``v`` into ``inf - inf = nan`` at the next step and needed a compare
# per element to keep it inf, which cost the arithmetic-bound bf16 loops 5-15 % on a
# CPU; it also rounded differently from torch. The first moment stays ``lerp``, as
# torch's.


# Note [differentiable steps]: with ``differentiable=True`` (grad mode on; the eager
# engine) autograd saves the inputs of an op whose backward needs them. A state tensor
# or parameter saved so, then updated in place (the next step's ``lerp_``, this step's
# ``copy_``), fails the backward ("modified by an inplace operation"): those reads
# take a copy, as torch's differentiable paths do. Grad mode off (every other step,
# and every traced one): the tensors themselves, no copy.
def _kept(t: Tensor) -> Tensor:
    return t.clone()


def _same(t: Tensor) -> Tensor:
    return t


def sgd_step_(
    params: list[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: list[Tensor],
    hyper_t: Hypers,
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
    lr, momentum, dampening, weight_decay = _per_param(
        hyper_t, group_index_t, lr_scales_t
    )
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
                if config.momentum_may_be_zero:
                    on = momentums[i] != 0
                    b = b.where(on, buf.to(cdt))
                    buf.copy_(b)
                    moved = grad + momentums[i] * b if config.nesterov else b
                    grad = moved.where(on, grad)
                else:
                    buf.copy_(b)
                    grad = grad + momentums[i] * b if config.nesterov else b
            param.copy_(p + grad * neg_lrs[i])
        return
    keep = _kept if torch.is_grad_enabled() else _same  # Note [differentiable steps]
    for i, param in enumerate(params):
        grad = _unscale(grads[i], grad_scale_t, config.maximize)
        if config.weight_decay:
            grad = grad + wds[i] * keep(param)
        if skip is not None:
            grad = grad.where(~skip, 0.0)
        if config.momentum and config.momentum_may_be_zero:
            on = momentums[i] != 0
            buf = momentum_buffers[i]
            if fresh_buffers and fresh_buffers[i]:  # a tensor momentum's first step
                moved_buf = grad.detach()  # as torch's clone(grad).detach()
            else:
                moved_buf = keep(buf) * buffer_decays[i] + grad * grad_weights[i]
            buf.copy_(moved_buf.where(on, keep(buf)))
            moved = grad + momentums[i] * keep(buf) if config.nesterov else keep(buf)
            grad = moved.where(on, grad)
        elif config.momentum:
            buf = momentum_buffers[i]
            if fresh_buffers and fresh_buffers[i]:
                buf.copy_(grad.detach())  # as torch's clone(grad).detach()
            else:
                buf.mul_(buffer_decays[i]).add_(grad * grad_weights[i])
            grad = grad + momentums[i] * keep(buf) if config.nesterov else keep(buf)
        # A gradient of its own dtype (torch 2.13's grad_dtype): torch's add_(alpha=)
        # scales in the wider of the two, where a 0-d coefficient would keep a
        # narrower gradient's dtype and round the update to it.
        if grad.dtype != param.dtype:
            grad = grad.to(torch.promote_types(grad.dtype, param.dtype))
        param.add_(grad * neg_lrs[i])
