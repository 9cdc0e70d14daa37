"""u-μP front end for parameter groups: validate tags and compute per-parameter factors.

The optimizers keep each group as the user gave it and store, beside ``group["params"]``,
two float lists computed here once: ``lr_scales`` (effective lr = group lr × scale) and
``wd_scales`` (effective weight decay = group weight_decay × scale).
:func:`scaled_parameters` produces unit_scaling's one-group-per-parameter layout from the
same rules, for use with any other optimizer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._rules import LrScaleFunc
from .parameter import MUP_TYPES, check_tags, has_parameter_data


def split_named(entries: Sequence[Any]) -> tuple[list[str | None], list[Tensor]]:
    """Names (None where unnamed) and tensors of ``entries``: tensors or the
    ``(name, tensor)`` pairs of ``named_parameters()``."""
    named = [isinstance(e, tuple) for e in entries]
    names = [e[0] if n else None for e, n in zip(entries, named)]
    return names, [e[1] if n else e for e, n in zip(entries, named)]


def describe_param(p: Tensor, name: str | None, group: int, index: int) -> str:
    """Name a parameter for error messages: its name if known, else group and index."""
    where = repr(name) if name else f"group {group}, index {index}"
    tag = getattr(p, "mup_type", None)
    tag_text = f", mup_type {tag!r}" if tag is not None else ""
    return f"parameter {where} (shape {tuple(p.shape)}{tag_text})"


def check_param(
    p: Tensor,
    label: str,
    *,
    allow_non_unit_scaling_params: bool,
) -> bool:
    """Validate one parameter; return whether it is u-μP tagged.

    Complex parameters are accepted, as torch.optim updates them (as real views);
    their fan-in comes from their own shape.

    Raises:
        TypeError: not a floating-point or complex tensor.
        ValueError: invalid tags, or untagged while untagged parameters are not allowed.
    """
    if not isinstance(p, Tensor):
        raise TypeError(f"{label}: optimizer params must be Tensors, got {type(p)}.")
    if not (p.is_floating_point() or p.is_complex()):
        raise TypeError(
            f"{label}: dtype {p.dtype} is not supported; optimizers update "
            "floating-point or complex parameters."
        )
    if hasattr(p, "mup_type") or hasattr(p, "mup_scaling_depth"):
        check_tags(
            getattr(p, "mup_type", None), getattr(p, "mup_scaling_depth", None), label
        )
    if has_parameter_data(p):
        return True
    if not allow_non_unit_scaling_params:
        raise ValueError(
            f"{label} is not u-μP tagged: set mup_type (one of {', '.join(MUP_TYPES)}) "
            "and mup_scaling_depth on it (umup_compile.Parameter does both), or pass "
            "allow_non_unit_scaling_params=True to give it lr scale 1."
        )
    return False


def group_scales(
    params: Sequence[Tensor],
    names: Sequence[str | None],
    group_index: int,
    *,
    lr: float,
    weight_decay: float,
    lr_scale_func: LrScaleFunc,
    independent_weight_decay: bool,
    allow_non_unit_scaling_params: bool,
    first_index: int = 0,
) -> tuple[list[float], list[float]]:
    """Return ``(lr_scales, wd_scales)`` for one group's parameters (``params`` are
    the group's from index ``first_index`` on, which errors name).

    Independent weight decay divides the decay by the parameter's initial effective lr,
    exactly as unit_scaling does (independent of the peak lr, not of the schedule), for
    untagged parameters too.

    Raises:
        TypeError, ValueError: as :func:`check_param`, or a zero lr with independent
            weight decay (the division is undefined).
    """
    lr_scales: list[float] = []
    wd_scales: list[float] = []
    for i, (p, name) in enumerate(zip(params, names), first_index):
        label = describe_param(p, name, group_index, i)
        tagged = check_param(
            p, label, allow_non_unit_scaling_params=allow_non_unit_scaling_params
        )
        try:
            scale = float(lr_scale_func(p)) if tagged else 1.0  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
        except ZeroDivisionError:
            if p.numel():
                raise
            scale = 0.0
        if not p.numel() and not (math.isfinite(scale) and scale):
            # A zero-element parameter (nothing to update) whose fan-in or width is
            # 0: the rules divide by zero or give 0, where unit_scaling raises (or
            # divides weight decay by it). Scale 1; other zero-element shapes take
            # the rule, as unit_scaling's (which matters if the data is set later).
            scale = 1.0
        lr_scales.append(scale)
        if not independent_weight_decay:
            wd_scales.append(1.0)
        elif lr * scale != 0.0:
            wd_scales.append(1.0 / (lr * scale))
        elif weight_decay == 0.0:
            wd_scales.append(0.0)
        else:
            raise ValueError(
                f"{label}: independent weight decay divides weight_decay by the initial "
                f"lr, which is {lr * scale}; start from a non-zero lr or pass "
                "independent_weight_decay=False."
            )
    return lr_scales, wd_scales


def scaled_parameters(
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr_scale_func: LrScaleFunc,
    lr: float | Tensor | None = None,
    weight_decay: float = 0,
    independent_weight_decay: bool = True,
    allow_non_unit_scaling_params: bool = False,
) -> list[dict[str, Any]]:
    """Create lr-scaled parameter groups for any torch optimizer (unit_scaling layout).

    Each parameter gets its own group with ``lr = lr * lr_scale_func(param)`` and, with
    independent weight decay, ``weight_decay = weight_decay / that lr``. Prefer the
    ``umup_compile.optim`` optimizers, which keep your groups intact.

    Args:
        params: parameters or parameter groups, as passed to a torch optimizer.
        lr_scale_func: the rule, e.g. :func:`lr_scale_func_adam`.
        lr: global learning rate (a group's own ``lr`` overrides it).
        weight_decay: global weight decay (a group's own value overrides it).
        independent_weight_decay: divide weight decay by each parameter's lr.
        allow_non_unit_scaling_params: give untagged parameters lr scale 1 instead of
            raising.

    Returns:
        One group per parameter.

    Raises:
        ValueError: no lr, invalid tags, or untagged parameters (see above).
    """
    if isinstance(params, Tensor):
        raise TypeError(
            "scaled_parameters: params should be an iterable of Tensors or dicts (as "
            f"a torch optimizer takes), but got {torch.typename(params)}"
        )
    result: list[dict[str, Any]] = []
    for g, entry in enumerate(params):
        # A tensor, a (name, tensor) pair of named_parameters(), or a group
        group: dict[str, Any] = (
            {"params": [entry]} if isinstance(entry, (Tensor, tuple)) else dict(entry)  # type: ignore[call-overload]
        )
        group.setdefault("lr", lr)
        group.setdefault("weight_decay", weight_decay)
        if group["lr"] is None:
            raise ValueError(
                f"scaled_parameters: group {g} has no lr; pass lr=... or give every "
                "group an 'lr'."
            )
        group_params = group["params"]
        if isinstance(group_params, Tensor):
            group_params = [group_params]
        entries = list(group_params)
        names, group_params = split_named(entries)
        base_lr = group["lr"]
        lr_scales, _ = group_scales(
            group_params,
            names,
            g,
            lr=float(base_lr),
            weight_decay=float(group["weight_decay"]),
            lr_scale_func=lr_scale_func,
            independent_weight_decay=independent_weight_decay,
            allow_non_unit_scaling_params=allow_non_unit_scaling_params,
        )
        rest = {
            k: v for k, v in group.items() if k not in ("params", "lr", "weight_decay")
        }
        for p, scale in zip(entries, lr_scales):  # pairs stay pairs (torch takes them)
            # Tensor lrs are cloned so that each group's lr can be scheduled on its own.
            p_lr = (
                base_lr.clone() * scale
                if isinstance(base_lr, Tensor)
                else base_lr * scale
            )
            p_wd = group["weight_decay"]
            if independent_weight_decay and p_wd != 0:
                p_wd = p_wd / float(p_lr)  # group_scales rejected a zero lr already
            result.append({"params": [p], "lr": p_lr, "weight_decay": p_wd, **rest})
    return result


def as_float(value: float | Tensor, what: str) -> float:
    """Read a Python float from a float or 1-element tensor hyper-parameter."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Tensor {what} must be 1-element, got shape {tuple(value.shape)}."
            )
        return float(value.item())
    # numbers.Real: numpy's scalars too (np.float32 is no float), as torch takes them
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a float or a 1-element Tensor, got {value!r}.")
    return float(value)


def check_tensor_scalar(value: Any, what: str) -> None:
    """Raise torch's error for a multi-element tensor hyper-parameter."""
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(
            f"Tensor {what} must be 1-element, got shape {tuple(value.shape)}"
        )
