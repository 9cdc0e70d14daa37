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

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._base import Bucket, UmupOptimizer, check_tensor_scalar, params_list, step_dtype
from ._functional import (
    ADAM_HYPERS,
    SGD_HYPERS,
    AdamConfig,
    SGDConfig,
    WeightDecayMode,
    adam_step_,
    sgd_step_,
)
from ._plan import as_float
from ._rules import lr_scale_func_adam, lr_scale_func_sgd


def _check_lr(lr: Any, where: str) -> None:
    if lr is None:
        raise ValueError(
            f"{where}: lr is None; pass lr=<float> or give the group an 'lr'."
        )
    check_tensor_scalar(lr, "lr")
    if not as_float(lr, "lr") >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr} ({where}); lr must be >= 0.")


def _check_nonneg(value: Any, name: str, where: str) -> None:
    check_tensor_scalar(value, name)
    if not as_float(value, name) >= 0.0:
        raise ValueError(f"Invalid {name} value: {value} ({where}); it must be >= 0.")


def _check_exclusive_flags(group: dict[str, Any], where: str) -> None:
    if group.get("fused") and group.get("foreach"):
        raise ValueError(f"`fused` and `foreach` cannot be `True` together ({where}).")
    if group.get("fused") and group.get("differentiable"):
        raise ValueError(f"`fused` does not support `differentiable` ({where}).")


def _zeros_state(p: Tensor, group: dict[str, Any]) -> Tensor:
    """A zero state tensor like ``p``, in the group's ``state_dtype``."""
    dtype = group.get("state_dtype") or p.dtype
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def _default_seed() -> int:
    """The rounding seed: reproducible under ``torch.manual_seed``, 31 bits."""
    return torch.initial_seed() & 0x7FFFFFFF


class Adam(UmupOptimizer, torch.optim.Adam):
    """u-μP Adam: ``torch.optim.Adam`` with per-parameter u-μP lr and weight-decay scales.

    Drop-in for ``unit_scaling.optim.Adam`` (same numbers) that keeps your param groups,
    so lr schedulers keep the u-μP ratios between parameters. The update runs as
    compiled fused kernels by default (``compile=False`` or ``UMUP_COMPILE=0`` for the
    eager engine, same numbers). See the module docstring for the scaling rules.

    Args:
        params: tagged parameters (``umup_compile.Parameter`` or any ``nn.Parameter``
            with ``mup_type``/``mup_scaling_depth``), named parameters, or groups.
        lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable,
            differentiable, fused, decoupled_weight_decay: as ``torch.optim.Adam``
            (``foreach``/``fused`` are accepted for compatibility; the engine decides).
        state_dtype: dtype of the moments (``None``: the parameter's), e.g.
            ``torch.float32`` for bf16 parameters; the update is computed in float32.
        stochastic_rounding: round bf16 parameters stochastically on write-back
            (unbiased); the streams are seeded from ``torch.initial_seed()`` at
            construction (group key ``sr_seed``, saved in checkpoints).
        independent_weight_decay: divide weight decay by each parameter's initial
            effective lr (unit_scaling's default).
        allow_non_unit_scaling_params: give untagged parameters lr scale 1 instead of
            raising.
        compile: ``True`` (compiled, eager fallback with a warning), ``"strict"``
            (compiled, raise on failure) or ``False`` (eager).

    Raises:
        TypeError, ValueError: invalid options or parameters, naming the culprit.
    """

    _hyper_names = ADAM_HYPERS
    _functional = staticmethod(adam_step_)

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
        compile: bool | str = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
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
        self._check_hypers(defaults, "optimizer defaults")
        self._setup_umup(
            lr_scale_func=lr_scale_func_adam,
            independent_weight_decay=independent_weight_decay,
            allow_non_unit_scaling_params=allow_non_unit_scaling_params,
            compile=compile,
            differentiable=differentiable,
        )
        torch.optim.Optimizer.__init__(self, params_list(params), defaults)
        self._step_supports_amp_scaling = True  # see UmupOptimizer._amp_kwargs

    def _check_hypers(self, group: dict[str, Any], where: str) -> None:
        _check_lr(group["lr"], where)
        _check_nonneg(group["eps"], "epsilon", where)
        _check_nonneg(group["weight_decay"], "weight_decay", where)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(
                f"betas must be a pair (beta1, beta2), got {betas!r} ({where})."
            )
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError(
                f"betas must be either both floats or both Tensors ({where})."
            )
        for k, beta in enumerate(betas):
            check_tensor_scalar(beta, f"betas[{k}]")
            if not 0.0 <= as_float(beta, f"betas[{k}]") < 1.0:
                raise ValueError(
                    f"Invalid beta parameter at index {k}: {as_float(beta, 'beta')} "
                    f"({where}); betas must lie in [0, 1)."
                )
        _check_exclusive_flags(group, where)

    def _hyper_row(self, group: dict[str, Any]) -> list[float | Tensor]:
        beta1, beta2 = group["betas"]
        return [group["lr"], beta1, beta2, group["eps"], group["weight_decay"]]

    def _config(self, group: dict[str, Any]) -> Hashable:
        mode: WeightDecayMode
        if group["weight_decay"] == 0:
            mode = "none"
        elif group["decoupled_weight_decay"]:
            mode = "decoupled"
        else:
            mode = "l2"
        return AdamConfig(
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
            weight_decay=mode,
            stochastic_rounding=bool(group.get("stochastic_rounding", False)),
        )

    def _init_state(
        self, p: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> bool:
        created = "step" not in state
        if created:
            state["step"] = torch.zeros((), dtype=step_dtype(), device=p.device)
            state["exp_avg"] = _zeros_state(p, group)
            state["exp_avg_sq"] = _zeros_state(p, group)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = _zeros_state(p, group)
        return created

    _scalar_state_keys = frozenset({"step"})

    def _state_keys(self, config: Hashable) -> tuple[str | None, ...]:
        amsgrad = config.amsgrad  # type: ignore[attr-defined]
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad else None, "step")


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
            compile=compile,
        )


class SGD(UmupOptimizer, torch.optim.SGD):
    """u-μP SGD: ``torch.optim.SGD`` with per-parameter u-μP lr and weight-decay scales.

    ``readout_constraint`` must match the ``constraint`` of unit_scaling's
    ``LinearReadout``: ``None`` uses the Adam rule, ``"to_output_scale"`` the SGD rule
    of the module docstring. Other arguments as :class:`Adam` and ``torch.optim.SGD``.

    Note [first SGD step]: torch starts a momentum buffer as a copy of the first
    gradient, not as a damped update of zeros. Steps that create buffers therefore run
    eagerly (once per parameter); every later step runs in the chosen engine.
    """

    _hyper_names = SGD_HYPERS
    _functional = staticmethod(sgd_step_)

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
        self._check_hypers(defaults, "optimizer defaults")
        self.readout_constraint = readout_constraint
        self._setup_umup(
            lr_scale_func=lr_scale_func_sgd(readout_constraint),
            independent_weight_decay=independent_weight_decay,
            allow_non_unit_scaling_params=allow_non_unit_scaling_params,
            compile=compile,
            differentiable=differentiable,
        )
        torch.optim.Optimizer.__init__(self, params_list(params), defaults)
        self._step_supports_amp_scaling = True  # see UmupOptimizer._amp_kwargs

    def _check_hypers(self, group: dict[str, Any], where: str) -> None:
        _check_lr(group["lr"], where)
        _check_nonneg(group["momentum"], "momentum", where)
        _check_nonneg(group["weight_decay"], "weight_decay", where)
        dampening = as_float(group["dampening"], "dampening")
        if group["nesterov"] and (
            as_float(group["momentum"], "momentum") <= 0 or dampening != 0
        ):
            raise ValueError(
                f"Nesterov momentum requires a momentum and zero dampening ({where})."
            )
        _check_exclusive_flags(group, where)

    def _hyper_row(self, group: dict[str, Any]) -> list[float | Tensor]:
        return [group[name] for name in SGD_HYPERS]

    def _config(self, group: dict[str, Any]) -> Hashable:
        return SGDConfig(
            momentum=group["momentum"] != 0,
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            weight_decay=group["weight_decay"] != 0,
        )

    def _init_state(
        self, p: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> bool:
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = _zeros_state(p, group)
            return True
        return False

    def _state_keys(self, config: Hashable) -> tuple[str | None, ...]:
        return ("momentum_buffer" if config.momentum else None,)  # type: ignore[attr-defined]

    def _extra_kwargs(self, bucket: Bucket, fresh: set[int]) -> dict[str, Any]:
        if not fresh or not bucket.config.momentum:  # type: ignore[attr-defined]
            return {}
        return {"fresh_buffers": [id(p) in fresh for p in bucket.params]}
