"""The steady-step check: what a step runs instead of a full gather.

:class:`SteadyCheck` walks the parameters once to collect the gradients, with C-level
checks (``map`` over C callables, list comparisons) that nothing a step's plan was
built for has changed: membership, the groups' static options, the parameters' and
gradients' dtype, device and shape, inference mode, and every tensor a compiled graph
reads or writes (Note [what a graph reads]). Anything else sends the step back to
``_gather.gather``, which validates again and rebuilds what changed.

Note [what a graph reads]: a steady step calls its compiled graphs without Dynamo's
guards (Note [direct calls]), so every tensor a graph reads or writes must be checked
here, by how it reaches the graph:

- *graph tensors*, passed as they are or as flat aliases (the unrolled, strided and
  chunk units' parameters and state): their storage (``data_ptr``), dtype, shape,
  strides and negative bit (``_tensor_check``), and the state tensors' identity. A state tensor rebound
  through ``.data`` (another dtype, other strides, or a copy a flat alias does not
  follow) sends the step to a gather, where the layout is rebuilt from what the
  tensors are now.
- *views* of a pack's buffers (the pack's members' state) and of a unit's step
  vector (Note [stacked counters] in ``_pack``): their identity and storage. A view
  rebound through ``.data`` or replaced (by another view of the same memory too:
  ``exp_avg.t()``, a slice, ``None``) no longer shows what the graph updates, so the
  layout is rebuilt (from the values the state holds now, checked as at a first
  step) rather than left updating buffers no one sees. Not checked: a view's shape
  or strides changed in place at the same address (``exp_avg.t_()``, ``.data =`` a
  transposed view of itself): comparing every view's metadata, as graph tensors'
  are, made a step over 2,000 one-tensor groups 25 % slower (4.0 -> 5.1 ms).
- the parameters a pack copies in and out: their storage. The pack follows a
  parameter rebound through ``.data``, but a gather must see whether it now shares
  memory with another (Note [aliased parameters] in ``_gather``).
- the *list path*'s state (eager engine, sharded buckets): identity and dtype. Its
  calls pass the state tensors themselves, whatever storage they were rebound to, but
  a bucket's state of one dtype is updated as such (a rebound dtype means another
  bucket).

Gradients reach graphs contiguous (made so at each step), flattened or copied into a
pack, with negative bits resolved (``_pack.unit_lists``): their strides and storage may
change at every step (DDP's bucket views do).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._gather import Bucket, picker
from ._hypers import VOLATILE_KEYS
from ._specs import AlgorithmSpec
from ._tensor_check import TensorsLike

Group = dict[str, Any]
State = dict[str, Any]

# Group keys besides the spec's config that fix a step's structure.
_STRUCTURE_KEYS = ("state_dtype", "capturable", "differentiable", "sr_seed")

_GRAD = operator.attrgetter("grad")
_PARAMS = operator.itemgetter("params")
_DTYPE = operator.attrgetter("dtype")
_DATA_PTR = torch.Tensor.data_ptr


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
            # Note [hyper fingerprints]: the hyper table compares these every step
            frozenset(k for k in hyper_keys if k not in VOLATILE_KEYS),
        )

    def raw(self, groups: Sequence[Group]) -> list[Any]:
        return list(map(self.getter, groups))

    def derived(self, groups: Sequence[Group]) -> list[tuple[Any, ...]]:
        return [(self.spec.config(g), self.extra(g)) for g in groups]


def layout_of(t: Tensor) -> tuple[Any, ...]:
    """What a graph that reads ``t`` as it is (or through a flat alias) is built
    for: its storage, dtype, shape, strides and negative bit."""
    return (t.data_ptr(), t.dtype, t.shape, t.stride(), t.is_neg())


@dataclass
class Watch:
    """What a steady step checks beyond membership, by how graphs reach it (Note
    [what a graph reads]): ``(state dict, key)`` pairs of graph tensors, of a pack's
    views and of the list path, the parameters graphs receive and those a pack
    copies."""

    graph_states: list[tuple[State, str]]
    views: list[tuple[State, str]]
    listed: list[tuple[State, str]]
    graph_params: list[Tensor]
    copied: list[Tensor]


def _by_key(pairs: Sequence[tuple[State, str]]) -> list[tuple[Any, list[State]]]:
    """``pairs`` grouped by key: ``(itemgetter(key), states)``."""
    out: dict[str, tuple[Any, list[State]]] = {}
    for s, key in pairs:
        out.setdefault(key, (operator.itemgetter(key), []))[1].append(s)
    return list(out.values())


class _Tensors:
    """The state tensors under one key of some states, as a step finds them."""

    def __init__(self, get: Any, states: list[State]) -> None:
        self.get, self.states = get, states
        self.tensors = self.now()

    def now(self) -> list[Tensor]:
        return list(map(self.get, self.states))


class SteadyCheck:
    """The checks and lists a steady step reuses (see the module docstring).

    Built after the layouts, from the state tensors they use (a pack replaces
    small parameters' state with views of its buffers).
    """

    def __init__(
        self,
        groups: Sequence[Group],
        buckets: Sequence[Bucket],
        structure: Structure,
        state: dict[Tensor, State],
        watch: Watch,
    ) -> None:
        self._structure = structure
        # The state's keys and values, compared by identity: a tensor-keyed lookup
        # per parameter would call Tensor.__hash__, a Python function, each time.
        self._state_keys = list(state)
        self._state_values = list(state.values())
        self._raw = structure.raw(groups)
        self._derived = structure.derived(groups)
        # Note [options off by a tensor's zero] in _specs
        self._off = [t for g in groups for t in structure.spec.off_tensors(g)]
        self._inference = torch.is_inference_mode_enabled()
        self._members = [p for b in buckets for p in b.params]
        # Every parameter in group order, and pickers of the members (bucket order)
        # and of the rest (which must stay without gradients) from it.
        self._flat = [p for g in groups for p in g["params"]]
        # ... and where each group ends: moving a parameter to the neighbouring group
        # keeps that order, not its group's hyper-parameters.
        self._lengths = [len(g["params"]) for g in groups]
        at = {id(p): k for k, p in enumerate(self._flat)}
        member_at = [at[id(p)] for p in self._members]
        member_set = set(member_at)
        self._pick_members = picker(member_at)
        self._pick_rest = picker(
            [k for k in range(len(self._flat)) if k not in member_set]
        )
        self._bounds = list(itertools.accumulate(len(b.params) for b in buckets))
        grads = [g for b in buckets for g in b.grads]
        # dtype, device, type, layout, bits (and the gradients' shapes): C++ loops
        # (sizes and strides: a parameter the pack copies, remapped at the same
        # address, may overlap another: Note [aliased parameters] in ``_gather``)
        self._members_like = TensorsLike(self._members, sizes=True, strides=True)
        self._grads_like = TensorsLike(grads, sizes=True, strides=False)
        # Note [what a graph reads]: graph tensors' layout and storage; views'
        # storage; the list path's identity and dtype.
        self._params = list(watch.graph_params)
        self._params_like = TensorsLike(self._params, sizes=True, strides=True)
        # storage: the graphs' parameters, then those the pack copies
        self._stored = [*self._params, *watch.copied]
        self._stored_ptrs = list(map(_DATA_PTR, self._stored))
        self._graph = [_Tensors(*g) for g in _by_key(watch.graph_states)]
        self._graph_like = [
            TensorsLike(g.tensors, sizes=True, strides=True) for g in self._graph
        ]
        self._graph_ptrs = [list(map(_DATA_PTR, g.tensors)) for g in self._graph]
        self._views = [_Tensors(*g) for g in _by_key(watch.views)]
        self._views_ptrs = [list(map(_DATA_PTR, g.tensors)) for g in self._views]
        self._listed = [_Tensors(*g) for g in _by_key(watch.listed)]
        self._listed_dtypes = [list(map(_DTYPE, g.tensors)) for g in self._listed]

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
        if self._off and any(bool(t != 0) for t in self._off):
            return None  # Note [options off by a tensor's zero] in _specs
        if torch.is_inference_mode_enabled() != self._inference:
            return None  # gather checks inference tensors (Note [what a graph reads])
        members = self._members
        lists = list(map(_PARAMS, groups))
        flat = list(itertools.chain.from_iterable(lists))
        if (
            len(flat) != len(self._flat)
            or not all(map(operator.is_, flat, self._flat))
            or list(map(len, lists)) != self._lengths
        ):
            return None  # membership changed (params lists edited in place)
        every = list(map(_GRAD, flat))
        grads = self._pick_members(every)
        if not all(map(operator.is_not, grads, itertools.repeat(None))):
            return None
        if not all(map(operator.is_, self._pick_rest(every), itertools.repeat(None))):
            return None
        if not (
            self._grads_like.matches(grads)
            and self._members_like.matches(members)
            and self._params_like.matches(self._params)
            and list(map(_DATA_PTR, self._stored)) == self._stored_ptrs
        ):
            return None
        if (
            len(state) != len(self._state_keys)
            or not all(map(operator.is_, state, self._state_keys))
            or not all(map(operator.is_, state.values(), self._state_values))
        ):
            return None
        try:
            for tensors, like, ptrs in zip(
                self._graph, self._graph_like, self._graph_ptrs
            ):
                now = tensors.now()
                if not (
                    all(map(operator.is_, now, tensors.tensors))
                    and like.matches(now)
                    and list(map(_DATA_PTR, now)) == ptrs
                ):
                    return None
            for tensors, ptrs in zip(self._views, self._views_ptrs):
                now = tensors.now()
                if not (
                    all(map(operator.is_, now, tensors.tensors))
                    and list(map(_DATA_PTR, now)) == ptrs
                ):
                    return None
            for tensors, dtypes in zip(self._listed, self._listed_dtypes):
                now = tensors.now()
                if not all(map(operator.is_, now, tensors.tensors)):
                    return None
                if list(map(_DTYPE, now)) != dtypes:
                    return None
        except KeyError:  # a state entry was deleted
            return None
        starts = [0, *self._bounds]
        return [grads[a:b] for a, b in zip(starts, self._bounds)]
