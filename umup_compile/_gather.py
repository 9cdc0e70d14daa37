"""Gathering: the parameters that have gradients, in buckets, with their state.

:func:`gather` is the full pass: it walks every group once, validates each parameter
with a gradient (its gradient, its existing state, torch's ``fused=True`` rule),
creates its missing state, and sorts it into a bucket of equal (device, dtype, static
config, state dtypes, gradient dtype). Later steps run ``_steady``'s check instead
while nothing structural changed.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._hypers import Position
from ._plan import as_float, describe_param
from ._specs import AlgorithmSpec
from ._tensor_check import overlapping

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor as DTensor
else:  # a torch build without torch.distributed has no DTensor parameters
    DTensor = ()  # type: ignore[assignment,misc]

Group = dict[str, Any]
State = dict[str, Any]
# (device, param dtype, static config, state dtypes, grad dtype); the state dtypes are
# those of the state tensors the config uses, in the spec's order.
BucketKey = tuple[torch.device, torch.dtype, Hashable, Any, torch.dtype]

# Devices whose kernels can be captured into graphs (torch.optim's list, less xla),
# and the CPU: torch's fused CPU kernels take capturable=True, and Dynamo writes it
# into the groups of the optimizers it traces, which a later untraced step meets.
CAPTURABLE_DEVICES = ("cuda", "xpu", "hpu", "cpu")

Picker = Callable[[Sequence[Any]], list[Any]]


def picker(indices: Sequence[int]) -> Picker:
    """A C-level ``lambda xs: [xs[k] for k in indices]``."""
    if not indices:
        return lambda xs: []
    if len(indices) == 1:
        k = indices[0]
        return lambda xs: [xs[k]]
    get = operator.itemgetter(*indices)
    return lambda xs: list(get(xs))


@dataclass
class Bucket:
    """Parameters that share (device, dtype, static config, state dtype)."""

    key: BucketKey
    config: Hashable
    params: list[Tensor] = field(default_factory=list)
    positions: list[Position] = field(default_factory=list)
    states: list[State] = field(default_factory=list)
    fresh: list[bool] = field(default_factory=list)  # state created this step
    grads: list[Tensor] = field(default_factory=list)  # this step's
    has_scalars: bool = False
    sharded: bool = False
    aliased: bool = False  # Note [aliased parameters]

    @property
    def device(self) -> torch.device:
        return self.key[0]

    @property
    def mixed(self) -> bool:
        """Whether the gradients' dtype differs from the parameters'."""
        return self.key[1] != self.key[4]


def gather(
    groups: Sequence[Group],
    state: dict[Tensor, State],
    spec: AlgorithmSpec,
    *,
    traced: bool,
    optimizer_name: str,
) -> list[Bucket]:
    """Bucket the parameters that have gradients and create their missing state.

    Raises:
        ValueError: a sparse gradient, a state tensor of another shape or device than
            its parameter, or ``capturable=True`` on a device that graph capture does
            not support.
        RuntimeError: ``fused=True`` with a parameter torch's fused kernels refuse,
            or an inference tensor (parameter or state) updated outside
            ``torch.inference_mode()``, as torch raises them.
        All are raised before any state is created or changed.
    """
    checked: list[tuple[Tensor, Tensor, Group, Hashable, Position]] = []
    found: list[tuple[int, Group, int, list[tuple[int, Tensor, Tensor]]]] = []
    check_inference = not traced and not torch.is_inference_mode_enabled()
    flat = 0
    for g, group in enumerate(groups):
        _check_admitted(group, g)
        # Dynamo sets "capturable" on the groups of optimizers it traces, any device.
        capturable = group.get("capturable") and not traced
        fused = group.get("fused") and not traced
        entries: list[tuple[int, Tensor, Tensor]] = []
        for i, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if capturable and p.device.type not in CAPTURABLE_DEVICES:
                raise ValueError(
                    "capturable=True needs parameters on a device that graph capture "
                    f"supports ({', '.join(CAPTURABLE_DEVICES)}), but "
                    f"{_describe(p, group, g, i)} is on {p.device}; pass "
                    "capturable=False (the default) there."
                )
            if grad.is_sparse:
                raise ValueError(
                    f"{_describe(p, group, g, i)} has a sparse gradient, which "
                    f"{optimizer_name} does not support; use a dense gradient (e.g. "
                    "nn.Embedding(sparse=False))."
                )
            _check_grad(p, grad, spec, _describe(p, group, g, i))
            if fused:
                _check_fused(p, _describe(p, group, g, i))
            if not traced:
                _check_state(
                    p, state.get(p), spec, _describe(p, group, g, i), check_inference
                )
            entries.append((i, p, grad))
        found.append((g, group, flat, entries))
        flat += len(group["params"])
    # After every group's gradients: a traced config may look at the state (which
    # walks all its keys), and Dynamo must first meet the parameters through the
    # groups (a parameter it first meets as a state key gets its .grad guarded by
    # identity, and a step compiled alone would recompile at every call).
    for g, group, start, entries in found:
        config = spec.traced_config(group, state) if traced else spec.config(group)
        checked += [
            (p, grad, group, config, Position(g, i, start + i))
            for i, p, grad in entries
        ]
    # State is created only once every parameter passed its checks; then the
    # buckets, by the dtypes the state has (a state tensor rebound to another dtype
    # through ``.data`` is updated in its dtype, as torch.optim does).
    buckets: dict[BucketKey, Bucket] = {}
    converted: set[str] = set()
    for p, grad, group, config, position in checked:
        s = state[p]
        if s and not traced and (done := spec.follow_state_dtype(p, s, group)):
            converted.add(done)  # Note [state dtype edited] in _state8
        fresh = spec.init_state(p, grad, s, group)
        for k in spec.scalar_keys:  # a (1,) step (torch.tensor([n.])), 0-d as ours
            if isinstance(t := s.get(k), Tensor) and t.ndim:
                s[k] = t.reshape(())
        own = spec.state_config(config, s)  # e.g. 8-bit moments (Note [8-bit state])
        state_dtypes = tuple(s[k].dtype for k in spec.active_keys(own))
        key = (p.device, p.dtype, own, state_dtypes, grad.dtype)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(key, own)
        bucket.has_scalars |= p.ndim == 0
        bucket.sharded |= isinstance(p, DTensor)
        bucket.params.append(p)
        bucket.grads.append(grad)
        bucket.positions.append(position)
        bucket.states.append(s)
        bucket.fresh.append(fresh)
    if converted:
        warnings.warn(
            f"umup_compile: {optimizer_name}'s existing state was converted to its "
            f"group's state_dtype ({', '.join(sorted(converted))}).",
            UserWarning,
            stacklevel=4,
        )
    out = list(buckets.values())
    if not traced:
        _mark_aliased(out)
        out = _in_turn(out)
    return out


# Note [aliased parameters]: parameters may share memory (``b.weight.data =
# a.weight.data``, overlapping views of one buffer), with each other or with state
# (two parameters' ``exp_avg`` the same tensor) or a gradient. torch.optim then
# updates them in turn, each reading what the one before wrote. A graph over several
# of them reads them all before it writes (Inductor assumes that what it writes
# overlaps nothing else it reads), and a pack copies each out of its own row (the
# last copy wins): updates would be lost. So a bucket whose parameters or state
# overlap anything the step reads or writes runs its update eagerly over lists, as
# the eager engine does (in turn, as torch.optim; where several buckets are aliased,
# one parameter per bucket, in the groups' order: ``_in_turn``).
# Views of one buffer that do not overlap (a flat parameter's members) and gradients
# that share memory with each other only (read, never written) are not affected.
# Found at a gather: a steady step checks the storage of the parameters and state it
# updates (``_steady``), so memory shared through them later is found then, but not a
# later step's gradient given a parameter's memory (``p.grad = p.data``).
def _mark_aliased(buckets: Sequence[Bucket]) -> None:
    owners: list[tuple[Bucket | None, Tensor]] = []
    for b in buckets:
        if b.sharded:
            continue
        owners += [(b, p) for p in b.params]
        owners += [
            (b, t) for s in b.states for t in s.values() if isinstance(t, Tensor)
        ]
        owners += [(None, g) for g in b.grads]  # read only
    for k in overlapping([t for _, t in owners]):
        bucket = owners[k][0]
        if bucket is not None:
            bucket.aliased = True


def _in_turn(buckets: list[Bucket]) -> list[Bucket]:
    """Note [aliased parameters]: where several buckets are aliased (tied parameters
    in groups of other static options), their parameters run one per bucket, in the
    groups' order, as torch.optim updates them (the rest of the order is free)."""
    aliased = [b for b in buckets if b.aliased]
    if len(aliased) < 2:
        return buckets
    singles = [
        Bucket(
            b.key,
            b.config,
            [p],
            [position],
            [s],
            [fresh],
            [grad],
            has_scalars=p.ndim == 0,
            aliased=True,
        )
        for b in aliased
        for p, position, s, fresh, grad in zip(
            b.params, b.positions, b.states, b.fresh, b.grads
        )
    ]
    singles.sort(key=lambda b: b.positions[0].flat)
    return [b for b in buckets if not b.aliased] + singles


# (parameter, its name, group index, its index) -> (lr_scale, wd_scale), scaled with
# the group's lr and weight decay when it was admitted (``_groups.param_scales``)
Rescale = Callable[..., tuple[float, float]]


class _Record(NamedTuple):
    """A group as admitted: its parameters, lr and weight decay.

    The parameters are held, not weakly: ``torch.utils.swap_tensors`` (``to_empty``
    or ``to()`` under ``swap_module_params_on_conversion``, after the optimizer was
    built on the meta device) refuses a tensor with a weak reference. One removed from
    the group's list is released when the next step's check records the group again.
    """

    group: Group
    params: list[Tensor]
    lr: Any
    weight_decay: Any


def _record(group: Group, lr: Any, weight_decay: Any) -> _Record:
    # their values now: a tensor lr is filled in place by a scheduler
    lr, weight_decay = (
        v.detach().clone() if isinstance(v, Tensor) else v for v in (lr, weight_decay)
    )
    return _Record(group, list(group["params"]), lr, weight_decay)


def _holds(record: _Record, params: Sequence[Tensor]) -> bool:
    """Whether ``record`` was taken of exactly ``params`` (in order)."""
    return len(record.params) == len(params) and all(
        r is p for r, p in zip(record.params, params)
    )


class Admitted:
    """Which parameters each group's ``lr_scales``/``wd_scales`` were computed for,
    in order, recorded when the group is admitted.

    Note [admitted order]: the factors are lists aligned with ``group["params"]``,
    but torch keys everything by the parameter, and a user may reorder a group's
    list, put another parameter in a place, append or remove one, in place. The
    factors then follow their parameters, and a parameter new to the group is scaled
    as the group's own were (its tags, the group's lr and weight decay at
    admission), as ``add_param_group`` would have (``rescale``). A group without a
    record (one a traced step reads) keeps ``_check_admitted``'s length check.
    """

    def __init__(self, rescale: Rescale) -> None:
        self.rescale = rescale
        self._records: dict[int, _Record] = {}  # by id(group)

    def admit(self, groups: Sequence[Group]) -> None:
        """Record groups not seen before; forget the ones no longer there.

        A new group dict in the place of a recorded group with the same parameters
        (``load_state_dict`` makes new dicts) keeps that group's lr and weight decay
        at admission: a scheduled lr has moved since.
        """
        old = self._records
        before = list(old.values())  # in the groups' order
        self._records = {}
        for k, group in enumerate(groups):
            record = old.get(id(group))
            if record is None or record.group is not group:
                lr, wd = group.get("lr"), group.get("weight_decay")
                if k < len(before) and _holds(before[k], group["params"]):
                    lr, wd = before[k].lr, before[k].weight_decay
                record = _record(group, lr, wd)
            self._records[id(group)] = record

    def check(self, groups: Sequence[Group]) -> None:
        """Make each group's factors follow its parameters (see the class), and scale
        a group put in ``param_groups`` directly (appended, or in another's place),
        which torch.optim accepts, as ``add_param_group`` would have."""
        for g, group in enumerate(groups):
            if "lr_scales" not in group:  # as add_param_group would have scaled it
                self._scale(group, g, group["lr"], group["weight_decay"], {})
                continue
            record = self._records.get(id(group))
            if record is None or record.group is not group:
                continue
            params = group["params"]
            if _holds(record, params):
                continue  # unchanged
            admitted = record.params
            if len(group["lr_scales"]) != len(admitted):
                continue  # edited by hand too: _check_admitted reports it
            kept = {
                id(a): (group["lr_scales"][k], group["wd_scales"][k])
                for k, a in enumerate(admitted)
            }
            self._scale(group, g, record.lr, record.weight_decay, kept)

    def _scale(
        self,
        group: Group,
        g: int,
        lr: Any,
        weight_decay: Any,
        kept: dict[int, tuple[float, float]],
    ) -> None:
        """Set the group's factors: ``kept``'s for the parameters it holds (by id),
        the others scaled from their tags with ``lr`` and ``weight_decay`` (the
        group's at admission); then record it. All are computed before the group
        changes: ``rescale`` may raise."""
        scales = []
        for i, p in enumerate(group["params"]):
            old = kept.get(id(p))
            if old is None:
                old = self.rescale(
                    p,
                    _name(group, i),
                    g,
                    i,
                    lr=as_float(lr, "lr"),
                    weight_decay=as_float(weight_decay, "weight_decay"),
                )
            scales.append(old)
        group["lr_scales"] = [s for s, _ in scales]
        group["wd_scales"] = [s for _, s in scales]
        self._records[id(group)] = _record(group, lr, weight_decay)


def _check_admitted(group: Group, g: int) -> None:
    """A group's params list edited in place (not through ``add_param_group``) has
    parameters without u-μP factors: say so rather than guess them."""
    n, m = len(group["params"]), len(group["lr_scales"])
    if n != m:
        raise ValueError(
            f"param group {g} has {n} parameters but u-μP scales for {m}: its "
            "'params' list was changed in place. Add parameters with "
            "optimizer.add_param_group({'params': [...]}), which computes their "
            "scales, or build a new optimizer."
        )


def _check_grad(p: Tensor, grad: Tensor, spec: AlgorithmSpec, label: str) -> None:
    """Reject a gradient the update cannot use, as torch's kernels would (later, and
    after changing some parameters): another shape or device, or another dtype where
    the algorithm's state follows the parameter's."""
    if grad.shape != p.shape:
        raise ValueError(
            f"{label} has a gradient of shape {tuple(grad.shape)}; a gradient must "
            "have its parameter's shape (set .grad to a tensor like the parameter)."
        )
    if grad.device != p.device:
        raise ValueError(
            f"{label} is on {p.device} but its gradient is on {grad.device}; move "
            "the gradient to the parameter's device."
        )
    if grad.is_complex() and not p.is_complex():  # SGD would drop its imaginary part
        raise TypeError(
            f"{label} is {p.dtype} but its gradient is {grad.dtype}; a real "
            "parameter needs a real gradient (set .grad to a real tensor)."
        )
    if grad.dtype != p.dtype and not spec.grad_dtype_may_differ:
        raise TypeError(
            f"{label} is {p.dtype} but its gradient is {grad.dtype}; {spec.name} "
            "needs gradients of the parameter's dtype (cast the gradient, e.g. "
            "p.grad = p.grad.to(p.dtype))."
        )


def _name(group: Group, i: int) -> str | None:
    """Parameter ``i``'s name in a named group (None where a list edited in place
    left it without one)."""
    names = group.get("param_names")
    return names[i] if names and i < len(names) else None


def _describe(p: Tensor, group: Group, g: int, i: int) -> str:
    return describe_param(p, _name(group, i), g, i)


def _check_fused(p: Tensor, label: str) -> None:
    """torch's ``fused=True`` rule, checked at the step as torch does (so that a
    model built on ``meta`` and moved with ``to_empty`` works): floating-point
    parameters on a device its fused kernels support."""
    devices = _fused_devices()
    if not p.is_floating_point() or p.device.type not in devices:
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {devices} but {p.dtype} and {p.device.type} "
            f"({label}); pass fused=None (the engine fuses anyway)."
        )


def _fused_devices() -> list[str]:
    """The device types torch's fused kernels support (torch's own list)."""
    try:
        from torch.optim.optimizer import (  # type: ignore[attr-defined]
            _get_fused_kernels_supported_devices,
        )

        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # an internal helper: keep torch 2.13's list as a fallback
        return ["mps", "cuda", "xpu", "hpu", "cpu"]


def _check_state(
    p: Tensor,
    s: State | None,
    spec: AlgorithmSpec,
    label: str,
    check_inference: bool,
) -> None:
    """Reject existing state the update cannot follow: a state tensor of another
    shape or device than its parameter (rebound through ``.data``, or set by hand),
    and inference tensors outside ``torch.inference_mode()`` (a compiled kernel
    would update them where torch refuses to)."""
    if check_inference and p.is_inference():
        raise RuntimeError(
            f"Inplace update to inference tensor outside InferenceMode is not "
            f"allowed: {label} was created under torch.inference_mode(); create "
            "it outside inference mode (or clone it there) to train it."
        )
    if not s:
        return
    spec.check_state(p, s, label)
    for key in spec.state_slots:
        t = s.get(key)
        if not isinstance(t, Tensor):
            if t is not None:  # torch refuses them too (a float step, say)
                raise TypeError(
                    f"state[{key!r}] of {label} is a {type(t).__name__}, but the "
                    "optimizer's state holds tensors: set a tensor (e.g. "
                    f"torch.tensor({t!r}) for a step count), or clear the "
                    "parameter's state (optimizer.state[p].clear()) to start it again."
                )
            continue
        if check_inference and t.is_inference():
            raise RuntimeError(
                f"Inplace update to inference tensor outside InferenceMode is not "
                f"allowed: state[{key!r}] of {label} was created under "
                "torch.inference_mode() (e.g. by a step taken there); step outside "
                "inference mode from the start, or clear the parameter's state "
                "(optimizer.state[p].clear()) to start it again."
            )
        if key in spec.scalar_keys and t.numel() != 1:
            raise ValueError(
                f"state[{key!r}] of {label} has shape {tuple(t.shape)}, but a step "
                "count is one number: set a 0-d tensor (torch.tensor(n)), or clear "
                "the parameter's state (optimizer.state[p].clear()) to start it again."
            )
        if key in spec.scalar_keys or key in spec.block_keys:
            continue  # their shapes are the spec's to check
        if t.shape != p.shape or t.device != p.device:
            raise ValueError(
                f"state[{key!r}] of {label} has shape {tuple(t.shape)} on "
                f"{t.device}, but the parameter has shape {tuple(p.shape)} on "
                f"{p.device}: a state tensor must match its parameter. Restore it, "
                "or clear the parameter's state (optimizer.state[p].clear()) to "
                "start it again."
            )
