"""Gathering: the parameters that have gradients, in buckets, with their state.

:func:`gather` is the full pass: it walks every group once, validates each parameter
with a gradient, sorts it into a bucket of equal (device, dtype, static config, state
dtype) and creates its missing state. :class:`SteadyCheck` is what later steps run
instead while nothing structural changed: one walk over the parameters to collect the
gradients, with C-level checks that the membership, the groups' static options, the
parameters' and gradients' dtype, device, shape and strides, and the state tensors
are those the layouts were built for. Anything else sends the step back to
:func:`gather`.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._hypers import Position
from ._plan import describe_param
from ._specs import AlgorithmSpec

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor as DTensor
else:  # a torch build without torch.distributed has no DTensor parameters
    DTensor = ()  # type: ignore[assignment,misc]

Group = dict[str, Any]
State = dict[str, Any]
# (device, param dtype, static config, state dtype, grad dtype)
BucketKey = tuple[torch.device, torch.dtype, Hashable, Any, torch.dtype]

# Devices whose kernels can be captured into graphs (torch.optim's list, less xla).
CAPTURABLE_DEVICES = ("cuda", "xpu", "hpu")
# Group keys besides the spec's config that fix a step's structure.
_STRUCTURE_KEYS = ("state_dtype", "capturable", "differentiable", "sr_seed")

_GRAD = operator.attrgetter("grad")
_PARAMS = operator.itemgetter("params")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_SHAPE = operator.attrgetter("shape")
_IS_SPARSE = operator.attrgetter("is_sparse")
_STRIDE = torch.Tensor.stride


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

    @property
    def device(self) -> torch.device:
        return self.key[0]

    @property
    def mixed(self) -> bool:
        """Whether the gradients' dtype differs from the parameters'."""
        return self.key[1] != self.key[4]


@dataclass(frozen=True)
class Structure:
    """What fixes a step's structure in a group: the spec's config keys and
    :data:`_STRUCTURE_KEYS`. :meth:`raw` reads their values (compared at every
    step); :meth:`derived` what they mean (compared when raw values changed: a
    scheduled weight decay changes ``weight_decay`` but not the config)."""

    spec: AlgorithmSpec
    getter: Any
    extra: Any

    # The hyper-parameter keys whose values ``raw`` covers: all but ``lr`` (which
    # schedulers change at every step), so that one pass over the groups checks them
    # with the structure and the hyper table compares only the lr column.
    covered: frozenset[str]

    @staticmethod
    def of(spec: AlgorithmSpec, defaults: Group) -> Structure:
        extra = tuple(k for k in _STRUCTURE_KEYS if k in defaults)
        hyper_keys = list(dict.fromkeys(key for key, _ in spec.hyper_columns))
        more = tuple(k for k in hyper_keys if k != "lr" and k not in spec.config_keys)
        # Membership (the params lists) is checked per parameter by SteadyCheck.
        return Structure(
            spec,
            operator.itemgetter(*spec.config_keys, *extra, *more),
            operator.itemgetter(*extra) if extra else (lambda g: ()),
            frozenset(k for k in hyper_keys if k != "lr"),
        )

    def raw(self, groups: Sequence[Group]) -> list[Any]:
        return list(map(self.getter, groups))

    def derived(self, groups: Sequence[Group]) -> list[tuple[Any, ...]]:
        return [(self.spec.config(g), self.extra(g)) for g in groups]


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
        ValueError: a sparse gradient, or ``capturable=True`` on a device that
            graph capture does not support; raised before any state is created.
    """
    buckets: dict[BucketKey, Bucket] = {}
    todo: list[tuple[Bucket, Tensor, Tensor, Group]] = []
    flat = 0
    for g, group in enumerate(groups):
        _check_admitted(group, g)
        # Dynamo sets "capturable" on the groups of optimizers it traces, any device.
        capturable = group.get("capturable") and not traced
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
            entries.append((i, p, grad))
        # After the gradients: a traced config may look at the state, and Dynamo
        # must first meet the parameters through the groups (a parameter it first
        # meets as a state key gets its .grad guarded by identity, and a step
        # compiled alone would recompile at every call).
        config = spec.traced_config(group, state) if traced else spec.config(group)
        local: dict[tuple[torch.device, torch.dtype, torch.dtype], Bucket] = {}
        for i, p, grad in entries:
            bucket = local.get((p.device, p.dtype, grad.dtype))
            if bucket is None:
                key = (p.device, p.dtype, config, group.get("state_dtype"), grad.dtype)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = Bucket(key, config)
                local[(p.device, p.dtype, grad.dtype)] = bucket
            bucket.has_scalars |= p.ndim == 0
            bucket.sharded |= isinstance(p, DTensor)
            bucket.params.append(p)
            bucket.grads.append(grad)
            bucket.positions.append(Position(g, i, flat + i))
            todo.append((bucket, p, grad, group))
        flat += len(group["params"])
    # State is created only once every parameter passed its checks.
    for bucket, p, grad, group in todo:
        s = state[p]
        bucket.states.append(s)
        bucket.fresh.append(spec.init_state(p, grad, s, group))
    return list(buckets.values())


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
    if grad.dtype != p.dtype and not spec.grad_dtype_may_differ:
        raise TypeError(
            f"{label} is {p.dtype} but its gradient is {grad.dtype}; {spec.name} "
            "needs gradients of the parameter's dtype (cast the gradient, e.g. "
            "p.grad = p.grad.to(p.dtype))."
        )


def _describe(p: Tensor, group: Group, g: int, i: int) -> str:
    names = group.get("param_names")
    return describe_param(p, names[i] if names else None, g, i)


class SteadyCheck:
    """The checks and lists a steady step reuses (see the module docstring).

    Built after the layouts, from the state tensors they use (a pack replaces
    small parameters' state with views of its buffers); ``watched`` are the
    parameters whose shapes and strides a compiled graph sees.
    """

    def __init__(
        self,
        groups: Sequence[Group],
        buckets: Sequence[Bucket],
        keys: Sequence[Sequence[str]],
        structure: Structure,
        state: dict[Tensor, State],
        watched: Sequence[Tensor] = (),
    ) -> None:
        self._structure = structure
        # The state's keys and values, compared by identity: a tensor-keyed lookup
        # per parameter would call Tensor.__hash__, a Python function, each time.
        self._state_keys = list(state)
        self._state_values = list(state.values())
        self._raw = structure.raw(groups)
        self._derived = structure.derived(groups)
        self._members = [p for b in buckets for p in b.params]
        # Every parameter in group order, and pickers of the members (bucket order)
        # and of the rest (which must stay without gradients) from it.
        self._flat = [p for g in groups for p in g["params"]]
        at = {id(p): k for k, p in enumerate(self._flat)}
        member_at = [at[id(p)] for p in self._members]
        member_set = set(member_at)
        self._pick_members = picker(member_at)
        self._pick_rest = picker(
            [k for k in range(len(self._flat)) if k not in member_set]
        )
        self._bounds = list(itertools.accumulate(len(b.params) for b in buckets))
        self._dtypes = list(map(_DTYPE, self._members))
        self._devices = list(map(_DEVICE, self._members))
        grads = [g for b in buckets for g in b.grads]
        self._grad_dtypes = list(map(_DTYPE, grads))
        self._shapes = list(map(_SHAPE, self._members))
        # The shapes and strides of the parameters a graph receives as they are (or
        # as views): it is specialised on them, and a steady step calls it without
        # Dynamo's guards (Note [direct calls]); ``p.data = ...`` changes them. Packed
        # parameters reach no graph, and gradients reach one contiguous, flattened or
        # packed (``_pack``): theirs need no check.
        self._watched = list(watched)
        self._watched_meta = (
            list(map(_SHAPE, self._watched)),
            list(map(_STRIDE, self._watched)),
        )
        self._tensors = [
            (operator.itemgetter(key), b.states, [s[key] for s in b.states])
            for b, bucket_keys in zip(buckets, keys)
            for key in bucket_keys
        ]

    def grads(
        self, groups: Sequence[Group], state: dict[Tensor, State]
    ) -> list[list[Tensor]] | None:
        """Each bucket's gradients, or ``None`` when the step must gather again.

        Sets :attr:`stable`: the hyper-parameter keys found unchanged since the last
        step (the hyper table need not compare them again).
        """
        self.stable: frozenset[str] = frozenset()
        raw = self._structure.raw(groups)
        if raw != self._raw:
            if self._structure.derived(groups) != self._derived:
                return None
            self._raw = raw
        else:
            self.stable = self._structure.covered
        members = self._members
        flat = list(itertools.chain.from_iterable(map(_PARAMS, groups)))
        if len(flat) != len(self._flat) or not all(map(operator.is_, flat, self._flat)):
            return None  # membership changed (params lists edited in place)
        every = list(map(_GRAD, flat))
        grads = self._pick_members(every)
        if not all(map(operator.is_not, grads, itertools.repeat(None))):
            return None
        if not all(map(operator.is_, self._pick_rest(every), itertools.repeat(None))):
            return None
        if (
            any(map(_IS_SPARSE, grads))
            or list(map(_DTYPE, members)) != self._dtypes
            or list(map(_DTYPE, grads)) != self._grad_dtypes
            or list(map(_SHAPE, grads)) != self._shapes
            or list(map(_SHAPE, self._watched)) != self._watched_meta[0]
            or list(map(_STRIDE, self._watched)) != self._watched_meta[1]
            or list(map(_DEVICE, grads)) != self._devices
            or list(map(_DEVICE, members)) != self._devices
        ):
            return None
        if (
            len(state) != len(self._state_keys)
            or not all(map(operator.is_, state, self._state_keys))
            or not all(map(operator.is_, state.values(), self._state_values))
        ):
            return None
        try:
            for get, states, tensors in self._tensors:
                if not all(map(operator.is_, map(get, states), tensors)):
                    return None
        except KeyError:  # a state entry was deleted
            return None
        starts = [0, *self._bounds]
        return [grads[a:b] for a, b in zip(starts, self._bounds)]
