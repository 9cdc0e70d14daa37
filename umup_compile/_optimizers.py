"""The public optimizer classes: u-μP ``Adam``, ``AdamW`` and ``SGD``.

Each subclasses the matching ``torch.optim`` class (same positional order, state keys
and hooks) and runs the functional core of ``_functional`` through an engine.

u-μP rules (see ``_rules``), with ``depth_scale = mup_scaling_depth ** -0.5`` (1 when
None):

=========  =========================  ===================================
mup_type   Adam / AdamW lr scale      SGD lr scale (``to_output_scale``)
=========  =========================  ===================================
weight     depth_scale / sqrt(fan_in)  depth_scale * sqrt(fan_in)
bias       depth_scale                depth_scale * width
norm       depth_scale                depth_scale * width
output     depth_scale                depth_scale
=========  =========================  ===================================

With ``independent_weight_decay=True`` (default) each parameter's weight decay is
divided by its initial effective lr, as in unit_scaling.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import _specs
from ._base import UmupOptimizer
from ._rules import lr_scale_func_adam, lr_scale_func_sgd


def _default_seed() -> int:
    """The rounding seed: reproducible under ``torch.manual_seed``, 31 bits."""
    return torch.initial_seed() & 0x7FFFFFFF


class Adam(UmupOptimizer, torch.optim.Adam):
    """u-μP Adam: ``torch.optim.Adam`` with per-parameter u-μP lr and weight-decay scales.

    Drop-in for ``unit_scaling.optim.Adam`` (same numbers) that keeps your param groups,
    so lr schedulers keep the u-μP ratios between parameters. The update runs as
    compiled fused kernels by default (``compile=False`` or ``UMUP_COMPILE=0`` for the
    eager engine, same numbers). See :mod:`umup_compile.optim` for the scaling rules.

    Args:
        params: tagged parameters (``umup_compile.Parameter`` or any ``nn.Parameter``
            with ``mup_type``/``mup_scaling_depth``), named parameters, or groups.
        lr, betas, eps, weight_decay, amsgrad: as ``torch.optim.Adam``.
        maximize, capturable, differentiable, decoupled_weight_decay: as torch's.
        foreach, fused: accepted for compatibility; the engine decides.
        state_dtype: dtype of the moments (``None``: the parameter's), e.g.
            ``torch.float32`` for bf16 parameters; the update is computed in float32.
            ``torch.int8``: 8-bit moments, int8/uint8 codes with float32 scales per
            block of 128 elements (``exp_avg_scales``); parameters under 4096
            elements keep float32 moments (see the low-precision guide).
        stochastic_rounding: round bf16 parameters stochastically on write-back
            (unbiased); the streams are seeded from ``torch.initial_seed()`` at
            construction (group key ``sr_seed``, saved in checkpoints).
        independent_weight_decay: divide weight decay by each parameter's initial
            effective lr (unit_scaling's default).
        allow_non_unit_scaling_params: give untagged parameters lr scale 1 instead of
            raising.
        max_grad_norm: clip by the global L2 norm of all the optimizer's gradients,
            as ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` before the
            step, but fused into it (no pass rewrites the gradients, no host sync);
            the norm is then ``last_grad_norm``. ``None`` (default): no clipping.
        compile: ``True`` (compiled, eager fallback with a warning), ``"strict"``
            (compiled, raise on failure) or ``False`` (eager).

    Raises:
        TypeError, ValueError: invalid options or parameters, naming the culprit.
    """

    _spec = _specs.ADAM

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        independent_weight_decay: bool = True,
        allow_non_unit_scaling_params: bool = False,
        max_grad_norm: float | None = None,
        compile: bool | str = True,
    ) -> None:
        defaults = {
            "lr": lr,
            # a tuple, as torch's (a list could be edited in place; torch also takes
            # a numpy array or a 1-d tensor, each beta then a 0-d tensor)
            "betas": _specs.as_pair(betas) or betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            "state_dtype": state_dtype,
            "stochastic_rounding": stochastic_rounding,
            "sr_seed": _default_seed(),
        }
        self._init_umup(
            params,
            defaults,
            lr_scale_func=lr_scale_func_adam,
            independent_weight_decay=independent_weight_decay,
            allow_non_unit_scaling_params=allow_non_unit_scaling_params,
            max_grad_norm=max_grad_norm,
            compile=compile,
        )


class AdamW(Adam, torch.optim.AdamW):
    """u-μP AdamW: Adam with decoupled weight decay (see :class:`Adam`).

    ``weight_decay`` defaults to 0, as in unit_scaling: with independent weight decay,
    torch's 0.01 would remove 1 % of every weight per step.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        independent_weight_decay: bool = True,
        allow_non_unit_scaling_params: bool = False,
        max_grad_norm: float | None = None,
        compile: bool | str = True,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            independent_weight_decay=independent_weight_decay,
            allow_non_unit_scaling_params=allow_non_unit_scaling_params,
            max_grad_norm=max_grad_norm,
            compile=compile,
        )


class SGD(UmupOptimizer, torch.optim.SGD):
    """u-μP SGD: ``torch.optim.SGD`` with per-parameter u-μP lr and weight-decay scales.

    ``readout_constraint`` must match the ``constraint`` of unit_scaling's
    ``LinearReadout``: ``None`` uses the Adam rule, ``"to_output_scale"`` the SGD rule
    (see :mod:`umup_compile.optim`). Other arguments as :class:`Adam` and
    ``torch.optim.SGD``.

    Steps that create momentum buffers run eagerly (Note [first SGD step] in
    ``_specs``); every later step runs in the chosen engine.
    """

    _spec = _specs.SGD
    _EXTRA_ATTRS = ("readout_constraint",)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        independent_weight_decay: bool = True,
        allow_non_unit_scaling_params: bool = False,
        readout_constraint: str | None = None,
        max_grad_norm: float | None = None,
        compile: bool | str = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "state_dtype": state_dtype,
        }
        self.readout_constraint = readout_constraint
        self._init_umup(
            params,
            defaults,
            lr_scale_func=lr_scale_func_sgd(readout_constraint),
            independent_weight_decay=independent_weight_decay,
            allow_non_unit_scaling_params=allow_non_unit_scaling_params,
            max_grad_norm=max_grad_norm,
            compile=compile,
        )
