"""Group admission: validate a new param group and attach its u-μP factors.

Everything here runs before a group joins ``param_groups``, so a rejected group
changes nothing. The group keeps the user's keys; ``lr_scales``/``wd_scales`` are
added (see ``_plan``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._plan import as_float, describe_param, group_scales, split_named
from ._rules import LrScaleFunc
from ._specs import AlgorithmSpec
from ._state8 import PARAM_DTYPES

Group = dict[str, Any]


@dataclass(frozen=True)
class ScalingOptions:
    """The optimizer-wide u-μP options every group is scaled with."""

    lr_scale_func: LrScaleFunc
    independent_weight_decay: bool
    allow_non_unit_scaling_params: bool


def param_scales(
    p: Tensor,
    name: str | None,
    g: int,
    i: int,
    *,
    lr: float,
    weight_decay: float,
    options: ScalingOptions,
) -> tuple[float, float]:
    """``(lr_scale, wd_scale)`` of parameter ``i`` of group ``g``, scaled as its group
    was when admitted (``lr``, ``weight_decay``: the group's values then), for a
    parameter put in a group's list in place (Note [admitted order] in ``_gather``)."""
    lr_scales, wd_scales = group_scales(
        [p],
        [name],
        g,
        lr=lr,
        weight_decay=weight_decay,
        lr_scale_func=options.lr_scale_func,
        independent_weight_decay=options.independent_weight_decay,
        allow_non_unit_scaling_params=options.allow_non_unit_scaling_params,
        first_index=i,
    )
    return lr_scales[0], wd_scales[0]


def params_list(params: Iterable[Any]) -> Iterable[Any]:
    """Reject a lone tensor as ``params``, as torch does (it is not an iterable of them)."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or "
            f"dicts, but got {torch.typename(params)}"
        )
    return params


def admit_group(
    param_group: Any,
    *,
    defaults: Group,
    existing: Sequence[Group],
    spec: AlgorithmSpec,
    options: ScalingOptions,
) -> Group:
    """Validate ``param_group`` and return it, in place, with its params as a list
    and its ``lr_scales``/``wd_scales`` (unchanged if it raises).

    Args:
        param_group: ``{"params": ..., <options>}``; params may be tensors or
            ``(name, tensor)`` pairs, as torch accepts.
        defaults: the optimizer's defaults (a group's own values override them).
        existing: the groups already admitted (a parameter may be in one group only).
        spec: the algorithm, whose option checks run on the merged group.
        options: the u-μP scaling options.

    Raises:
        TypeError, ValueError: bad options or parameters, naming the culprit.
    """
    if not isinstance(param_group, dict):
        raise TypeError(
            f"param_group must be a dict, but got {type(param_group).__name__}"
        )
    entries = param_group.get("params")
    if entries is None:
        raise ValueError("param group has no 'params'; pass {'params': [...], ...}.")
    if isinstance(entries, Tensor):
        entries = [entries]
    elif isinstance(entries, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but "
            "the ordering of tensors in sets will change between runs. Please use a "
            "list instead."
        )
    entries = list(entries)
    if len({isinstance(e, tuple) for e in entries}) > 1:
        raise ValueError(
            "all optimizer params should be with/without names. Some param names "
            "are missing"
        )
    names, params = split_named(entries)
    g = len(existing)
    merged = {**defaults, **param_group}
    spec.check_group(merged, f"param group {g}")
    _check_low_precision(merged, params, names, g)
    _check_membership(params, names, g, existing, bool(merged.get("differentiable")))
    lr_scales, wd_scales = group_scales(
        params,
        names,
        g,
        lr=as_float(merged["lr"], "lr"),
        weight_decay=as_float(merged["weight_decay"], "weight_decay"),
        lr_scale_func=options.lr_scale_func,
        independent_weight_decay=options.independent_weight_decay,
        allow_non_unit_scaling_params=options.allow_non_unit_scaling_params,
    )
    # Filled in place, now that nothing can fail: torch keeps the dict you pass, so
    # your later edits of it (its lr) reach the optimizer.
    param_group.update(params=entries, lr_scales=lr_scales, wd_scales=wd_scales)
    return param_group


def _check_membership(
    params: list[Tensor],
    names: list[str | None],
    g: int,
    existing: Sequence[Group],
    differentiable: bool = False,
) -> None:
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(
                "optimizer can only optimize Tensors, but one of the params is "
                f"{torch.typename(p)} (param group {g}, index {i})"
            )
        # torch's rule: a non-leaf is optimized when it retains its grad, or when
        # the optimizer is differentiable (gradients flow through the step)
        if not (p.is_leaf or p.retains_grad or differentiable):
            raise ValueError(
                f"can't optimize a non-leaf Tensor: {describe_param(p, names[i], g, i)} "
                "has a grad_fn; pass the leaf itself (e.g. an nn.Parameter, or "
                "t.detach().requires_grad_()), call t.retain_grad(), or pass "
                "differentiable=True."
            )
        if id(p) in seen:
            raise ValueError(
                f"{describe_param(p, names[i], g, i)} appears twice in its param "
                "group; list each parameter once."
            )
        seen.add(id(p))
    for h, other in enumerate(existing):
        for q in other["params"]:
            if id(q) in seen:
                i = next(k for k, p in enumerate(params) if p is q)
                raise ValueError(
                    "some parameters appear in more than one parameter group: "
                    f"{describe_param(q, names[i], g, i)} is already in param group "
                    f"{h}; put each parameter in one group only."
                )


def _check_low_precision(
    group: Group, params: list[Tensor], names: list[str | None], g: int
) -> None:
    """Validate ``state_dtype`` and ``stochastic_rounding`` (Note [low precision])."""
    dtype = group.get("state_dtype")
    if dtype is not None and not (
        isinstance(dtype, torch.dtype)
        and (dtype.is_floating_point or dtype == torch.int8)
    ):
        raise TypeError(
            f"state_dtype must be None (the parameter's dtype), a floating dtype such "
            f"as torch.float32, or torch.int8 (8-bit Adam moments), got {dtype!r} "
            f"(param group {g})."
        )
    rounding = group.get("stochastic_rounding", False)
    if not isinstance(rounding, bool):
        raise TypeError(
            f"stochastic_rounding must be a bool, got {rounding!r} (param group {g})."
        )
    for i, p in enumerate(params):
        if dtype is not None and dtype != torch.int8 and p.is_complex():
            raise ValueError(
                f"state_dtype={dtype} sets the state of real parameters, but "
                f"{describe_param(p, names[i], g, i)} is {p.dtype}; put it in a "
                "param group with state_dtype=None (state in its own dtype)."
            )
        if dtype == torch.int8 and p.dtype not in PARAM_DTYPES:
            raise ValueError(
                f"state_dtype=torch.int8 quantizes the moments of float32, bfloat16 "
                f"and float16 parameters, but {describe_param(p, names[i], g, i)} is "
                f"{p.dtype}; put it in a param group with state_dtype=None."
            )
        if rounding and p.dtype == torch.float16:
            raise ValueError(
                f"stochastic_rounding=True rounds bfloat16 parameters, but "
                f"{describe_param(p, names[i], g, i)} is float16; use bfloat16 "
                "parameters or stochastic_rounding=False."
            )
