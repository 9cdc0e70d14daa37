"""u-μP learning-rate rules: the single source of truth for fan-in and depth exponents.

Pure functions of a tagged parameter's ``mup_type``, ``mup_scaling_depth`` and shape,
returning Python floats. Same numbers as ``unit_scaling.optim``; clear errors where it
asserts.
"""

from __future__ import annotations

from collections.abc import Callable

from .parameter import ParameterData

LrScaleFunc = Callable[[ParameterData], float]
READOUT_CONSTRAINTS: tuple[str | None, ...] = (None, "to_output_scale")


def fan_in(param: ParameterData) -> int:
    """Return the fan-in u-μP uses for a weight of this shape.

    1-D: ``shape[0]``; 2-D: ``shape[1]`` (for an embedding this is the hidden size);
    3-D: ``shape[1] * shape[2]``.

    Raises:
        ValueError: the parameter is 0-D or has 4 or more dimensions.
    """
    shape = tuple(param.shape)
    if len(shape) == 1:
        return shape[0]
    if len(shape) == 2:
        return shape[1]
    if len(shape) == 3:
        return shape[1] * shape[2]
    raise ValueError(
        f"u-μP has no fan_in rule for a {len(shape)}-D weight of shape {shape}; "
        "reshape it to at most 3 dimensions, or tag it with a mup_type other than "
        "'weight'."
    )


def lr_scale_for_depth(param: ParameterData) -> float:
    """Return the depth part of the lr scale: ``mup_scaling_depth ** -0.5`` (or 1)."""
    if param.mup_scaling_depth is None:
        return 1.0
    return float(param.mup_scaling_depth**-0.5)


def _unknown_type(param: ParameterData) -> ValueError:
    return ValueError(
        f"unknown mup_type {param.mup_type!r} on a parameter of shape "
        f"{tuple(param.shape)}; use 'weight', 'bias', 'norm' or 'output'."
    )


def lr_scale_func_adam(param: ParameterData) -> float:
    """Return the lr scale of a parameter under Adam/AdamW.

    weight: ``depth_scale * fan_in ** -0.5``; bias, norm, output: ``depth_scale``.

    Raises:
        ValueError: unknown ``mup_type`` or a weight with no fan-in rule.
    """
    scale = lr_scale_for_depth(param)
    if param.mup_type in ("bias", "norm", "output"):
        return scale
    if param.mup_type == "weight":
        return scale * float(fan_in(param) ** -0.5)
    raise _unknown_type(param)


def _lr_scale_sgd_to_output(param: ParameterData) -> float:
    scale = lr_scale_for_depth(param)
    if param.mup_type in ("bias", "norm"):
        if len(param.shape) == 0:
            raise ValueError(
                f"a 0-D {param.mup_type!r} parameter has no width for the SGD "
                "'to_output_scale' rule; give it shape (width,)."
            )
        return scale * float(param.shape[0])
    if param.mup_type == "weight":
        return scale * float(fan_in(param) ** 0.5)
    if param.mup_type == "output":
        return scale
    raise _unknown_type(param)


def lr_scale_func_sgd(readout_constraint: str | None) -> LrScaleFunc:
    """Return the lr-scale rule for SGD under a readout constraint.

    Args:
        readout_constraint: ``None`` (unit-scaled gradients: the Adam rule applies) or
            ``"to_output_scale"``, matching ``unit_scaling``'s ``LinearReadout``.

    Raises:
        ValueError: any other ``readout_constraint``.
    """
    if readout_constraint is None:
        return lr_scale_func_adam
    if readout_constraint == "to_output_scale":
        return _lr_scale_sgd_to_output
    raise ValueError(
        f"readout_constraint={readout_constraint!r} is not supported; use one of "
        f"{READOUT_CONSTRAINTS}."
    )
