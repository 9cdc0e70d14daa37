"""Algorithms as data: one frozen :class:`AlgorithmSpec` per update rule.

A spec says everything the shared machinery needs about an algorithm: how to check a
group's options, which group values become hyper-parameter columns (dynamic: a change
never recompiles) and which become the static config (a change recompiles on purpose),
the state it keeps and how it starts, and the functional update of ``_functional``.
The optimizer, the gatherer and the runner read specs and never call back into a
subclass. Adding an algorithm means one spec and one functional update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._functional import (
    ADAM_HYPERS,
    SGD_HYPERS,
    AdamConfig,
    SGDConfig,
    WeightDecayMode,
    sgd_step_,
)
from ._plan import as_float, check_tensor_scalar
from ._quant import BLOCK
from ._state8 import (
    INT8,
    SCALES_KEY,
    adam_update_,
    check_state8,
    float_state_dtype,
    follow_state_dtype,
    init_state8_,
)

Group = dict[str, Any]
State = dict[str, Any]


@dataclass(frozen=True)
class AlgorithmSpec:
    """One update rule, as data.

    Attributes:
        name: for messages.
        update: the functional update (``params, grads, *state lists, hyper_t,
            group_index_t, lr_scales_t, wd_scales_t, *, config, ...``).
        hyper_names: the columns of ``hyper_t``.
        hyper_columns: where each column's value is in a group: ``(key, None)`` for
            ``group[key]``, ``(key, i)`` for ``group[key][i]`` (floats or 1-element
            tensors).
        config_keys: the group keys ``config`` reads.
        config: a group's static config (frozen, hashable).
        traced_config: the config a step traced by an outer ``torch.compile`` uses,
            given the group and the optimizer's state: decided without reading float
            values where it can (Dynamo guards on every float it reads, and each
            scheduled change would recompile; Note [traced hypers]).
        state_slots: the update's positional state arguments, in order.
        active_keys: the state keys a config uses (the other slots get empty lists).
        scalar_keys: state keys holding one 0-d tensor per parameter.
        init_state: create a parameter's missing state, given its gradient; return
            whether any was made.
        required_keys: the state keys a resumed parameter must have, for a config
            (a checkpoint without them is refused at load).
        grad_dtype_may_differ: whether a gradient may have another dtype than its
            parameter (torch's SGD accepts it; Adam's kernels do not).
        check_group: raise ``ValueError``/``TypeError`` for bad options (``where``
            names the group).
        fresh_matters: whether, for a config, a step that creates state must tell
            the update which state is new (SGD's first momentum step, run eagerly).
        rounds: whether a config rounds bf16 parameters stochastically.
        state_config: a parameter's config, given its group's and its state (8-bit
            moments, Note [8-bit state], are a parameter's own structure).
        check_state: raise ``ValueError`` for existing state the update cannot
            follow, beyond the shapes the gatherer checks (``label`` names it).
        block_keys: state keys holding one row per block of :attr:`block` elements
            (not shaped like the parameter).
        block: the elements per block of :attr:`block_keys` (0: none).
        off_tensors: a group's tensor hyper-parameters whose value 0 turned an
            option of its config off (Note [options off by a tensor's zero]).
        follow_state_dtype: convert a parameter's existing state to its group's
            ``state_dtype``; return what was done, or None (Note [state dtype
            edited] in ``_state8``).
    """

    name: str
    update: Callable[..., None]
    hyper_names: tuple[str, ...]
    hyper_columns: tuple[tuple[str, int | None], ...]
    config_keys: tuple[str, ...]
    config: Callable[[Group], Hashable]
    traced_config: Callable[[Group, dict[Tensor, State]], Hashable]
    state_slots: tuple[str, ...]
    active_keys: Callable[[Any], tuple[str, ...]]
    scalar_keys: frozenset[str]
    init_state: Callable[[Tensor, Tensor, State, Group], bool]
    required_keys: Callable[[Any], tuple[str, ...]]
    grad_dtype_may_differ: bool
    check_group: Callable[[Group, str], None]
    fresh_matters: Callable[[Any], bool]
    rounds: Callable[[Any], bool]
    state_config: Callable[[Any, State], Hashable] = lambda config, state: config
    check_state: Callable[[Tensor, State, str], None] = lambda p, state, label: None
    block_keys: frozenset[str] = frozenset()
    block: int = 0
    off_tensors: Callable[[Group], list[Tensor]] = lambda group: []
    follow_state_dtype: Callable[[Tensor, State, Group], str | None] = (
        lambda p, state, group: None
    )

    def predict_state(self, p: Tensor, group: Group) -> State | None:
        """The state a first step makes for ``p`` (tensors on the meta device, the
        step counter's on the CPU): its dtypes and sizes. None for a sharded
        parameter (``describe`` shows its state once it exists)."""
        if hasattr(p, "device_mesh"):
            return None
        meta = torch.empty_like(p, device="meta")
        state: State = {}
        self.init_state(meta, meta, state, group)
        return state


def step_dtype() -> torch.dtype:
    """Dtype of the ``step`` state, as torch.optim chooses it."""
    return (
        torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    )


def _zeros_state(p: Tensor, group: Group) -> Tensor:
    """A zero state tensor like ``p``, in the group's (floating) ``state_dtype``."""
    dtype = float_state_dtype(group.get("state_dtype"), p)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


# -- checks shared by the specs ---------------------------------------------------------


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


def _check_exclusive_flags(group: Group, where: str) -> None:
    if group.get("fused") and group.get("foreach"):
        raise ValueError(f"`fused` and `foreach` cannot be `True` together ({where}).")
    if group.get("fused") and group.get("differentiable"):
        raise ValueError(f"`fused` does not support `differentiable` ({where}).")


# -- Adam / AdamW -----------------------------------------------------------------------


def as_pair(betas: Any) -> tuple[Any, Any] | None:
    """``betas`` as a tuple where it is a pair, as torch indexes it (a list, a numpy
    array, a 1-d tensor of two elements: 0-d tensors then), else None."""
    if isinstance(betas, tuple):
        return betas if len(betas) == 2 else None
    if isinstance(betas, (str, bytes, dict)) or (
        isinstance(betas, Tensor) and betas.ndim != 1
    ):
        return None
    try:
        pair = tuple(betas)
    except TypeError:
        return None
    return pair if len(pair) == 2 else None


def _adam_check(group: Group, where: str) -> None:
    _check_lr(group["lr"], where)
    _check_nonneg(group["eps"], "epsilon", where)
    _check_nonneg(group["weight_decay"], "weight_decay", where)
    betas = as_pair(group["betas"])
    if betas is None:
        raise ValueError(
            f"betas must be a pair (beta1, beta2), got {group['betas']!r} ({where})."
        )
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError(f"betas must be either both floats or both Tensors ({where}).")
    for k, beta in enumerate(betas):
        check_tensor_scalar(beta, f"betas[{k}]")
        if not 0.0 <= as_float(beta, f"betas[{k}]") < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {k}: {as_float(beta, 'beta')} "
                f"({where}); betas must lie in [0, 1)."
            )
    _check_exclusive_flags(group, where)
    if group.get("state_dtype") == INT8:
        if group["amsgrad"]:
            raise ValueError(
                f"amsgrad=True keeps the running maximum of the second moment, which "
                f"state_dtype=torch.int8 cannot hold ({where}); pass amsgrad=False, or "
                "state_dtype=torch.float32 (or None) for amsgrad."
            )
        if group.get("differentiable"):
            raise ValueError(
                f"differentiable=True cannot differentiate through 8-bit codes "
                f"({where}); pass state_dtype=None (or a floating dtype) with "
                "differentiable=True."
            )


def _adam_config(group: Group) -> AdamConfig:
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


# Note [options off by a tensor's zero]: torch reads ``weight_decay != 0`` (and SGD's
# ``momentum != 0``) at every step, so a 0-d tensor of 0 filled in place later (as
# torch's schedulers fill a tensor hyper-parameter) turns decay or momentum on at that
# step. A config reads them once; the steady check compares these tensors' values with
# 0 at every step (a host read each, only while such a tensor is 0) and gathers again
# when one is not, where the config turns the option on (a fresh SGD buffer starts as
# the gradient, as torch's). A tensor that turns 0 needs nothing: 0 decays nothing, and
# a zero momentum is seen at run time (``momentum_may_be_zero``). Only CPU tensors are
# watched: a device tensor's read is a sync, which a capturable step must not make
# (its zero is read when the step gathers, as before).
def _zero_tensors(group: Group, keys: tuple[str, ...]) -> list[Tensor]:
    return [
        value
        for key in keys
        if isinstance(value := group[key], Tensor)
        and value.device.type == "cpu"
        and not bool(value != 0)
    ]


def _adam_traced_config(group: Group, state: dict[Tensor, State]) -> AdamConfig:
    # Weight decay always applied: a zero decay adds 0 * p, the same numbers.
    mode: WeightDecayMode = "decoupled" if group["decoupled_weight_decay"] else "l2"
    return AdamConfig(
        amsgrad=bool(group["amsgrad"]),
        maximize=bool(group["maximize"]),
        weight_decay=mode,
        stochastic_rounding=bool(group.get("stochastic_rounding", False)),
    )


def _step_device(p: Tensor) -> torch.device:
    """Where ``step`` lives: on the parameter's device (no host sync to read it),
    except for meta parameters, whose dry runs still count steps (as torch's, on
    the CPU)."""
    return torch.device("cpu") if p.device.type == "meta" else p.device


def _adam_init(p: Tensor, grad: Tensor, state: State, group: Group) -> bool:
    created = "step" not in state
    if created:
        state["step"] = torch.zeros((), dtype=step_dtype(), device=_step_device(p))
        if group.get("state_dtype") != INT8 or not init_state8_(p, state):
            state["exp_avg"] = _zeros_state(p, group)
            state["exp_avg_sq"] = _zeros_state(p, group)
    if group["amsgrad"] and "max_exp_avg_sq" not in state:
        state["max_exp_avg_sq"] = _zeros_state(p, group)
        created = True
    return created


def _adam_state_config(config: AdamConfig, state: State) -> AdamConfig:
    """8-bit moments (Note [8-bit state]) where the state has scales."""
    if SCALES_KEY in state:
        return dataclasses.replace(config, int8_state=True)
    return config


def _adam_keys(config: AdamConfig) -> tuple[str, ...]:
    if config.int8_state:
        return ("exp_avg", "exp_avg_sq", SCALES_KEY, "step")
    if config.amsgrad:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
    return ("exp_avg", "exp_avg_sq", "step")


ADAM = AlgorithmSpec(
    name="Adam",
    update=adam_update_,
    hyper_names=ADAM_HYPERS,
    hyper_columns=(
        ("lr", None),
        ("betas", 0),
        ("betas", 1),
        ("eps", None),
        ("weight_decay", None),
    ),
    config_keys=(
        "amsgrad",
        "maximize",
        "weight_decay",
        "decoupled_weight_decay",
        "stochastic_rounding",
    ),
    config=_adam_config,
    traced_config=_adam_traced_config,
    state_slots=("exp_avg", "exp_avg_sq", "max_exp_avg_sq", SCALES_KEY, "step"),
    active_keys=_adam_keys,
    scalar_keys=frozenset({"step"}),
    init_state=_adam_init,
    required_keys=_adam_keys,
    grad_dtype_may_differ=False,
    check_group=_adam_check,
    fresh_matters=lambda config: False,
    rounds=lambda config: bool(config.stochastic_rounding),
    state_config=_adam_state_config,
    check_state=check_state8,
    block_keys=frozenset({SCALES_KEY}),
    block=BLOCK,
    off_tensors=lambda group: _zero_tensors(group, ("weight_decay",)),
    follow_state_dtype=follow_state_dtype,
)


# -- SGD ----------------------------------------------------------------------------


def _sgd_check(group: Group, where: str) -> None:
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
    if group.get("state_dtype") == INT8:
        raise ValueError(
            f"state_dtype=torch.int8 (8-bit moments) is supported by Adam and AdamW, "
            f"not by SGD ({where}); pass state_dtype=None or a floating dtype such as "
            "torch.bfloat16 for SGD's momentum buffer."
        )
    if group.get("stochastic_rounding"):  # the constructor has no such argument
        raise ValueError(
            f"stochastic_rounding=True is supported by Adam and AdamW, not by SGD "
            f"({where}); drop the key (SGD rounds bfloat16 parameters to nearest)."
        )


def _sgd_config(group: Group) -> SGDConfig:
    # Read as torch's ``if momentum != 0`` reads them (a tensor's value, not a tensor:
    # a graph would branch on it). A tensor momentum may be set to 0 in place: seen
    # at run time, as in traced configs.
    momentum = group["momentum"]
    on = bool(momentum != 0)  # one read: a device tensor's is a sync
    return SGDConfig(
        momentum=on,
        nesterov=bool(group["nesterov"]),
        maximize=bool(group["maximize"]),
        weight_decay=bool(group["weight_decay"] != 0),
        momentum_may_be_zero=on and isinstance(momentum, Tensor),
    )


def _sgd_traced_config(group: Group, state: dict[Tensor, State]) -> SGDConfig:
    # Momentum is on where buffers exist, so that a traced steady step never reads
    # the (scheduled) momentum: a momentum of 0 is then seen at run time
    # (``momentum_may_be_zero``). Weight decay is always applied (0 * p adds nothing).
    buffered = any(
        state[p].get("momentum_buffer") is not None
        for p in group["params"]
        if p in state
    )
    return SGDConfig(
        momentum=buffered or group["momentum"] != 0,
        nesterov=bool(group["nesterov"]),
        maximize=bool(group["maximize"]),
        weight_decay=True,
        momentum_may_be_zero=buffered,
    )


def _sgd_init(p: Tensor, grad: Tensor, state: State, group: Group) -> bool:
    # The buffer is looked up first: a traced step then reads the momentum only
    # where it creates a buffer.
    if state.get("momentum_buffer") is None and group["momentum"] != 0:
        # torch starts the buffer as a clone of the (weight-decayed) gradient: its
        # layout, and the dtype of ``grad + weight_decay * p``. A DTensor gradient
        # placed unlike its parameter (tensor parallel) gives the parameter's
        # placements: the update runs on local shards (Note [sharded parameters]).
        dtype = grad.dtype
        if group["weight_decay"] != 0:
            dtype = torch.promote_types(dtype, p.dtype)
        placed = getattr(grad, "placements", None) == getattr(p, "placements", None)
        state["momentum_buffer"] = torch.zeros_like(
            grad if placed else p,
            dtype=group.get("state_dtype") or dtype,
            memory_format=torch.preserve_format,
        )
        return True
    return False


# Note [first SGD step]: torch starts a momentum buffer as a copy of the first
# gradient, not as a damped update of zeros. Steps that create buffers therefore run
# eagerly (once per parameter) with ``fresh_buffers``; every later step runs in the
# chosen engine.
SGD = AlgorithmSpec(
    name="SGD",
    update=sgd_step_,
    hyper_names=SGD_HYPERS,
    hyper_columns=tuple((name, None) for name in SGD_HYPERS),
    config_keys=("momentum", "nesterov", "maximize", "weight_decay"),
    config=_sgd_config,
    traced_config=_sgd_traced_config,
    state_slots=("momentum_buffer",),
    active_keys=lambda config: ("momentum_buffer",) if config.momentum else (),
    scalar_keys=frozenset(),
    init_state=_sgd_init,
    required_keys=lambda config: (),  # a missing buffer starts again, as in torch
    grad_dtype_may_differ=True,
    check_group=_sgd_check,
    fresh_matters=lambda config: bool(config.momentum),
    rounds=lambda config: False,
    off_tensors=lambda group: _zero_tensors(group, ("momentum", "weight_decay")),
)
