"""u-μP tags on ordinary ``nn.Parameter`` objects.

A parameter counts as tagged when it carries ``mup_type`` (one of :data:`MUP_TYPES`) and
``mup_scaling_depth`` (``None`` or a positive ``int``). Tagging is duck-typed exactly like
``unit_scaling.parameter``, so models built with ``unit_scaling`` work unchanged.
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict
from typing import Any, Literal, Protocol, TypeGuard, get_args

import torch
from torch import Tensor, nn

MupType = Literal["weight", "bias", "norm", "output"]
MUP_TYPES: tuple[str, ...] = get_args(MupType)

# Instance attributes that make deepcopy/pickle keep the tags; never pickled themselves.
_HOOK_ATTRS = ("__deepcopy__", "__reduce_ex__")


class ParameterData(Protocol):
    """The fields a tagged parameter carries (beside those of ``nn.Parameter``)."""

    mup_type: MupType
    mup_scaling_depth: int | None
    shape: torch.Size


def has_parameter_data(parameter: Tensor) -> TypeGuard[ParameterData]:
    """Return whether ``parameter`` carries valid u-μP tags.

    Args:
        parameter: any tensor, usually an ``nn.Parameter``.

    Returns:
        ``True`` when ``mup_type`` is one of ``"weight"``, ``"bias"``, ``"norm"``,
        ``"output"`` and ``mup_scaling_depth`` is ``None`` or an ``int``.
    """
    return (
        getattr(parameter, "mup_type", None) in MUP_TYPES
        and hasattr(parameter, "mup_scaling_depth")
        and isinstance(parameter.mup_scaling_depth, (type(None), int))
    )


def check_tags(mup_type: object, mup_scaling_depth: object, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` if the tag values are invalid."""
    if mup_type not in MUP_TYPES:
        raise ValueError(
            f"{where}: mup_type={mup_type!r} is not a u-μP type; "
            f"use one of {', '.join(map(repr, MUP_TYPES))}."
        )
    if mup_scaling_depth is not None and (
        isinstance(mup_scaling_depth, bool)
        or not isinstance(mup_scaling_depth, int)
        or mup_scaling_depth < 1
    ):
        raise ValueError(
            f"{where}: mup_scaling_depth={mup_scaling_depth!r} must be None or a "
            "positive int (the number of residual blocks the parameter is shared over)."
        )


def _deepcopy_tagged(self: nn.Parameter, memo: dict[int, Any]) -> nn.Parameter:
    if id(self) in memo:
        return memo[id(self)]  # type: ignore[no-any-return]
    result = _tagged(
        self.data.clone(memory_format=torch.preserve_format),
        self.mup_type,  # type: ignore[attr-defined]
        self.mup_scaling_depth,  # type: ignore[attr-defined]
        requires_grad=self.requires_grad,
    )
    memo[id(self)] = result
    extra = {k: v for k, v in vars(self).items() if k not in _HOOK_ATTRS}
    for key, value in extra.items():
        setattr(result, key, copy.deepcopy(value, memo))
    return result


def _rebuild_tagged(data: Tensor, requires_grad: bool, state: dict[str, Any]) -> Tensor:
    result = _tagged(
        data, state["mup_type"], state["mup_scaling_depth"], requires_grad=requires_grad
    )
    for key, value in state.items():
        setattr(result, key, value)
    return result


def _reduce_ex_tagged(self: nn.Parameter, protocol: int) -> Any:
    # nn.Parameter pickles its __dict__; ours holds bound methods, which would recurse.
    state = {k: v for k, v in vars(self).items() if k not in _HOOK_ATTRS}
    return (_rebuild_tagged, (self.data, self.requires_grad, OrderedDict(state)))


def Parameter(  # noqa: N802 - a factory named like the class it returns, as in unit_scaling
    data: Tensor,
    mup_type: MupType,
    mup_scaling_depth: int | None = None,
    requires_grad: bool = True,
) -> nn.Parameter:
    """Build an ``nn.Parameter`` tagged for u-μP.

    The tags survive ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load``.

    Args:
        data: the parameter's values.
        mup_type: ``"weight"``, ``"bias"``, ``"norm"`` or ``"output"``.
        mup_scaling_depth: number of residual blocks the parameter's branch is scaled
            over (``None`` when it does not scale with depth).
        requires_grad: as for ``nn.Parameter``.

    Returns:
        A plain ``nn.Parameter`` with ``mup_type`` and ``mup_scaling_depth`` set.

    Raises:
        ValueError: ``mup_type`` or ``mup_scaling_depth`` is invalid.
    """
    check_tags(mup_type, mup_scaling_depth, f"Parameter of shape {tuple(data.shape)}")
    return _tagged(data, mup_type, mup_scaling_depth, requires_grad)


def _tagged(
    data: Tensor, mup_type: object, mup_scaling_depth: object, requires_grad: bool
) -> nn.Parameter:
    """The tagged parameter, its tags unchecked: copies and unpickling keep the tags
    as they are by then (a user may have set them to anything since, as with
    unit_scaling's; the optimizer checks them when it is given the parameter)."""
    p = nn.Parameter(data, requires_grad=requires_grad)
    p.mup_type = mup_type  # type: ignore[attr-defined]
    p.mup_scaling_depth = mup_scaling_depth  # type: ignore[attr-defined]
    p.__deepcopy__ = types.MethodType(_deepcopy_tagged, p)  # type: ignore[method-assign]
    p.__reduce_ex__ = types.MethodType(_reduce_ex_tagged, p)  # type: ignore[method-assign]
    return p
