"""Checkpoint conversion, as torch's ``load_state_dict`` pre- and post-hooks.

The pre-hook validates the checkpoint against the optimizer before torch changes
anything, maps unit_scaling's one-group-per-parameter layout onto our groups, and
remembers what torch's loading would lose; the post-hook puts that back: the u-μP
group keys (a torch checkpoint has none) and the saved dtype of floating state (torch
casts it to the parameter's dtype, which would round float32 moments of bf16
parameters). Step counters move to the parameters' device.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ._plan import describe_param
from ._quant import num_blocks
from ._specs import AlgorithmSpec, step_dtype
from ._state8 import (
    CODE_DTYPES,
    INT8,
    SCALES_KEY,
    dequantize_moments,
    float_state_dtype,
    keeps_float,
    place_scales,
    quantize_moments,
)

# Group keys this package adds to torch's; kept when a checkpoint lacks them.
UMUP_GROUP_KEYS = (
    "lr_scales",
    "wd_scales",
    "state_dtype",
    "stochastic_rounding",
    "sr_seed",
)

StateDict = dict[str, Any]
_PENDING = "_umup_pending_load"  # the pre-hook's notes for the post-hook


@contextlib.contextmanager
def loading(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Convert around one ``load_state_dict`` of ``optimizer``.

    Our pre-hook runs after every pre-hook registered on the optimizer: those see the
    dict as given, as with torch.optim, and may return another, which is what we
    validate and convert. Our post-hook runs before every post-hook, which then see
    the converted state. Registered for the call only, so that hooks registered
    later cannot take either place.
    """
    pre = optimizer.register_load_state_dict_pre_hook(_pre_load)
    post = optimizer.register_load_state_dict_post_hook(_post_load, prepend=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()
        optimizer.__dict__.pop(_PENDING, None)


@contextlib.contextmanager
def saving(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around one ``state_dict`` of ``optimizer``: the saved groups' ``state_dtype``
    becomes its name (``"int8"``), before the post-hooks registered on it run.

    A ``torch.dtype`` is not among the values torch.distributed's state-dict tools
    take (``get_optimizer_state_dict`` with ``full_state_dict`` or ``cpu_offload``,
    ``_copy_state_dict``); a string is. Loading keeps this run's state dtype anyway.
    """
    handle = optimizer.register_state_dict_post_hook(_name_state_dtypes, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def _name_state_dtypes(
    optimizer: torch.optim.Optimizer, state_dict: StateDict
) -> StateDict:
    for group in state_dict["param_groups"]:  # torch's copies, not the live groups
        dtype = group.get("state_dtype")
        if isinstance(dtype, torch.dtype):
            group["state_dtype"] = str(dtype).removeprefix("torch.")
    return state_dict


def _pre_load(optimizer: torch.optim.Optimizer, state_dict: StateDict) -> StateDict:
    """Validate and convert ``state_dict``; nothing is changed when it raises."""
    state_dict = regroup_per_param(optimizer.param_groups, state_dict)
    check_compatible(optimizer.param_groups, state_dict)
    spec: AlgorithmSpec = optimizer._spec  # type: ignore[attr-defined]
    check_state_keys(optimizer.param_groups, state_dict, spec)
    kept = [
        {k: g[k] for k in UMUP_GROUP_KEYS if k in g} for g in optimizer.param_groups
    ]
    setattr(optimizer, _PENDING, (state_dict, kept))
    return state_dict


def _post_load(optimizer: torch.optim.Optimizer) -> None:
    """Restore the u-μP keys and saved state dtypes after torch's loading."""
    state_dict, kept = optimizer.__dict__.pop(_PENDING)
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_of = dict(zip(map(id, params), saved_ids))
    converted: set[str] = set()
    for group, keep in zip(optimizer.param_groups, kept):
        for k, v in keep.items():  # a torch checkpoint lacks the u-μP keys
            group.setdefault(k, v)
        # The state dtype is this run's memory layout, not a saved setting.
        group["state_dtype"] = keep.get("state_dtype")
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                saved = state_dict["state"].get(saved_of[id(p)], {})
                _restore(p, state, saved, group, converted)
    if converted:
        warnings.warn(
            "umup_compile: the loaded optimizer state was converted to this "
            f"optimizer's state dtype ({', '.join(sorted(converted))}); pass the "
            "checkpoint's state_dtype (torch.int8 for 8-bit moments) to keep it as "
            "saved.",
            UserWarning,
            stacklevel=3,
        )


def _restore(
    p: Tensor,
    state: dict[str, Any],
    saved: dict[str, Any],
    group: dict[str, Any],
    converted: set[str],
) -> None:
    """Put back what torch's loading changed in one parameter's ``state``: the
    saved dtypes (torch casts floating state to the parameter's dtype), 8-bit
    codes and scales, or their conversion to this group's state dtype (Note [8-bit
    state])."""
    state_dtype = group.get("state_dtype")
    saved8 = SCALES_KEY in saved
    want8 = state_dtype == INT8 and p.is_floating_point() and keeps_float(p) is None
    moments = "exp_avg" in saved and "exp_avg_sq" in saved
    if moments and saved8 and want8:
        for key in CODE_DTYPES:
            state[key] = saved[key].to(device=p.device).contiguous()
        state[SCALES_KEY] = place_scales(p, saved[SCALES_KEY])
    elif moments and saved8:
        dtype = float_state_dtype(state_dtype, p)
        state.pop(SCALES_KEY, None)
        state.update(dequantize_moments(p, saved, dtype))
        converted.add(f"8-bit -> {dtype} (dequantized)")
    elif moments and want8:
        state.pop("max_exp_avg_sq", None)  # 8-bit state has no amsgrad maximum
        state.update(quantize_moments(p, saved["exp_avg"], saved["exp_avg_sq"]))
        converted.add(f"{saved['exp_avg'].dtype} -> 8-bit (quantized)")
    for k, v in state.items():
        if not isinstance(v, Tensor) or k in CODE_DTYPES and (saved8 or want8):
            continue
        if k == "step":  # 0-d as ours are, even where saved as (1,)
            state[k] = v.to(device=p.device, dtype=step_dtype()).reshape(())
        elif k != SCALES_KEY and v.is_floating_point() and p.is_floating_point():
            v = saved.get(k, v)
            dtype = float_state_dtype(state_dtype, p)
            if v.dtype != dtype:
                converted.add(f"{v.dtype} -> {dtype}")
            state[k] = v.to(device=p.device, dtype=dtype)


def regroup_per_param(
    param_groups: list[dict[str, Any]], state_dict: StateDict
) -> StateDict:
    """Map a one-group-per-parameter checkpoint (unit_scaling's) onto our groups.

    Its groups hold ``lr × scale`` and ``weight_decay / lr``; ours hold the base
    values and the factors, so only the per-parameter state is taken, in order.
    """
    saved = state_dict["param_groups"]
    flat = [p for g in param_groups for p in g["params"]]
    if (
        len(saved) == len(param_groups)
        or len(saved) != len(flat)
        or any(len(g["params"]) != 1 or "lr_scales" in g for g in saved)
    ):
        return state_dict
    groups, start = [], 0
    for group in param_groups:
        n = len(group["params"])
        groups.append({**group, "params": list(range(start, start + n))})
        start += n
    saved_state = state_dict["state"]
    state = {
        k: saved_state[g["params"][0]]
        for k, g in enumerate(saved)
        if g["params"][0] in saved_state
    }
    return {"state": state, "param_groups": groups}


def check_compatible(param_groups: list[dict[str, Any]], state_dict: StateDict) -> None:
    """Raise ``ValueError`` when the checkpoint's groups or state shapes differ."""
    saved = state_dict["param_groups"]
    if len(saved) != len(param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for g, (ours, theirs) in enumerate(zip(param_groups, saved)):
        if len(ours["params"]) != len(theirs["params"]):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the "
                f"size of optimizer's group (param group {g}: "
                f"{len(theirs['params'])} saved, {len(ours['params'])} here)"
            )
        for key in ("lr_scales", "wd_scales"):
            if key in theirs and len(theirs[key]) != len(ours["params"]):
                raise ValueError(
                    f"loaded state dict's param group {g} has {len(theirs[key])} "
                    f"{key} for {len(ours['params'])} parameters; it was saved from "
                    "another model."
                )
    ids = (i for g in saved for i in g["params"])
    flat = (p for g in param_groups for p in g["params"])
    for k, (i, p) in enumerate(zip(ids, flat)):
        for key, value in state_dict["state"].get(i, {}).items():
            if key == SCALES_KEY:
                _check_scales(value, p, k)
            elif key == "step":  # torch takes any one-element counter
                if isinstance(value, Tensor) and value.numel() != 1:
                    raise ValueError(
                        f"loaded state dict's 'step' for parameter {k} has shape "
                        f"{tuple(value.shape)}; a step counter has one element."
                    )
            elif isinstance(value, Tensor) and value.ndim and value.shape != p.shape:
                raise ValueError(
                    f"loaded state dict's {key!r} for parameter {k} has shape "
                    f"{tuple(value.shape)}, but the parameter has shape "
                    f"{tuple(p.shape)}; the checkpoint is from another model."
                )


def _check_scales(value: Any, p: Tensor, k: int) -> None:
    """8-bit moments' scales: two per block of the parameter (any leading shape:
    ``(blocks, 2)``, or FSDP2's ``(rows, blocks per row, 2)``)."""
    blocks = num_blocks(p.numel())
    if not isinstance(value, Tensor) or value.numel() != 2 * blocks:
        raise ValueError(
            f"loaded state dict's {SCALES_KEY!r} for parameter {k} has shape "
            f"{tuple(getattr(value, 'shape', ()))}, but a parameter of shape "
            f"{tuple(p.shape)} has {blocks} blocks of 8-bit moments ({blocks}, 2); "
            "the checkpoint is from another model."
        )


def check_state_keys(
    param_groups: list[dict[str, Any]], state_dict: StateDict, spec: AlgorithmSpec
) -> None:
    """Raise ``ValueError`` when a parameter's saved state lacks a key its update
    needs (torch fails later, with a ``KeyError`` at the next step)."""
    saved = state_dict["param_groups"]
    for g, (group, theirs) in enumerate(zip(param_groups, saved)):
        # The group as loading leaves it: the checkpoint's options win, as torch's
        # (amsgrad saved False keeps no maximum), but not its state dtype
        # (_post_load).
        loaded = {**group, **theirs, "params": group["params"]}
        loaded["state_dtype"] = group.get("state_dtype")
        required = spec.required_keys(spec.config(loaded))
        names = group.get("param_names")
        for i, (p, k) in enumerate(zip(group["params"], theirs["params"])):
            state = state_dict["state"].get(k)
            if not state:
                continue
            missing = [key for key in required if key not in state]
            if missing:
                label = describe_param(p, names[i] if names else None, g, i)
                raise ValueError(
                    f"loaded state dict's state for {label} lacks {missing[0]!r} (it "
                    f"has {sorted(state)}); it was saved with other options (e.g. "
                    "amsgrad) or by another optimizer; load a matching checkpoint."
                )
