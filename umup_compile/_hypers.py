"""The tensors a step's values arrive in: hyper-parameters and per-parameter factors.

Note [hyper tensor]: every value a scheduler may change reaches the update as a column
of one ``(groups, hypers)`` tensor per device, so a new lr never recompiles. Python
floats are cached and the tensor is refreshed in place only when one changes, through
pinned memory on accelerators (an asynchronous copy, no host sync). Tensor
hyper-parameters (``lr=torch.tensor(...)``, filled in place by schedulers) are written
into it on the device at every step, so a CUDA graph that captured the step reads
their current values at replay. While an outer ``torch.compile`` traces the step, see
Note [traced hypers].

Note [traced hypers]: Dynamo guards on the value of every Python float a traced
function reads, so a step traced inside the user's ``torch.compile`` that read
``group["lr"]`` would recompile at each scheduler step. There the hyper tensor comes
from the custom op ``umup_compile::hyper_values`` instead: opaque to Dynamo, it runs
:meth:`HyperTable.tensor` when the compiled graph runs, reading the groups' current
values (floats and tensors alike), so no value is a graph constant and none is
guarded. Its work is on the host, which CUDA graphs cannot replay: with
``capturable=True`` the values are stacked with tensor ops in the graph instead
(tensor hyper-parameters then replay correctly; floats are constants, as in torch).

Note [host hypers]: on CUDA, when there are at most :data:`HOST_GROUPS` groups and
every hyper-parameter is a Python number, a step that is not captured
(``capturable=False``) takes them as 0-d host tensors, views of the host mirror,
instead of the device tensor: Inductor passes a 0-d CPU input of a GPU kernel by
value (``.item()`` when it launches the kernel: host memory, no sync), and an eager
CUDA op reads a 0-d CPU operand the same way. The step then copies nothing to the
device, as torch's fused Adam passes a float lr: on paper (sm_90) the GPT-like step
is 2 launches instead of 2 + 1. Each group adds a row of kernel arguments and a
``where`` per column to the step-count kernel, hence the bound; more groups, tensor
values (which a captured step must read on the device) and a capturable step keep
the device tensor. A CUDA graph captured around such a step would freeze the values:
the optimizer refuses to be captured unless ``capturable=True``, as torch's do.

The u-μP factors and rounding seeds are per parameter and change only with the
layout: :func:`factor_vectors` builds them once per unit.
"""

from __future__ import annotations

import array
import inspect
import itertools
import math
import numbers
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._prologue import Hypers
from ._rounding import parameter_seeds
from ._specs import AlgorithmSpec

Group = dict[str, Any]


def scalar_dtype(device: torch.device) -> torch.dtype:
    """Dtype of hyper-parameter arithmetic: float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class Position:
    """Where a parameter sits: group ``group``, index ``index`` in it, and ``flat``
    in the optimizer (counted across groups)."""

    group: int
    index: int
    flat: int


@dataclass(frozen=True)
class FactorVectors:
    """Per-parameter vectors of one call: group row, u-μP lr and wd scales, seed."""

    group_index_t: Tensor
    lr_scales_t: Tensor
    wd_scales_t: Tensor
    sr_seeds_t: Tensor


def factor_vectors(
    positions: Sequence[Position], groups: Sequence[Group], device: torch.device
) -> FactorVectors:
    """The factor vectors of the parameters at ``positions``."""
    dtype = scalar_dtype(device)
    seeds = parameter_seeds(
        [groups[p.group].get("sr_seed", 0) for p in positions],
        [p.flat for p in positions],
    )
    return FactorVectors(
        torch.tensor([p.group for p in positions], dtype=torch.int64, device=device),
        torch.tensor(
            [groups[p.group]["lr_scales"][p.index] for p in positions],
            dtype=dtype,
            device=device,
        ),
        torch.tensor(
            [groups[p.group]["wd_scales"][p.index] for p in positions],
            dtype=dtype,
            device=device,
        ),
        torch.tensor(seeds, dtype=torch.int64, device=device),
    )


# Note [hyper fingerprints]: a step finds the hyper-parameters edited since the last
# one by comparing the groups' values with the last step's (``==``, in C). Equality
# misses two edits torch sees: a float replaced by a tensor of equal value
# (``0.01 == torch.tensor(0.01)`` compares in float32, and torch then computes with
# the tensor's 0.0099999998), and a list edited in place (the last step's values hold
# the same list). Only the keys torch takes a tensor for can meet either (lr and
# betas, betas the only sequence): the hyper table compares them at every step (the
# steady check leaves them out of its ``covered`` keys), first by identity (the same
# objects: unchanged, unless one is a list), then, where every value is equal, by
# hash: a tensor hashes by identity, a number by value, a list not at all (changed).
# Measured: an Adam step over 2,000 groups of one 4x4 tensor, LambdaLR, 3.57 ->
# 3.61 ms (hashing every key, in the steady check too, had cost 0.6 ms).
VOLATILE_KEYS = frozenset({"lr", "betas"})


def _unchanged(values: list[Any], old: list[Any] | None, lists: bool) -> bool:
    """Whether a volatile key's ``values`` are still ``old`` (Note [hyper
    fingerprints]); ``lists``: whether ``old`` holds a list."""
    if old is None or len(values) != len(old):
        return False
    if all(map(operator.is_, values, old)):
        return not lists
    if values != old:
        return False
    try:
        return list(map(hash, values)) == list(map(hash, old))
    except TypeError:  # a list
        return False


_PLAIN = {float, int, bool}
# Note [host hypers]: at most this many groups take host scalars, on these devices.
HOST_GROUPS = 4
HOST_DEVICES: tuple[str, ...] = ("cuda",)


class _DeviceTable:
    """The hyper tensor of one device, with the values it was last filled from."""

    def __init__(self, n_groups: int, n_columns: int, device: torch.device) -> None:
        dtype = scalar_dtype(device)
        self.hyper_t = torch.zeros((n_groups, n_columns), dtype=dtype, device=device)
        # A host mirror to refresh columns in (the tensor itself on CPU; meta tensors
        # hold no values to copy).
        self.host = (
            self.hyper_t
            if device.type == "cpu"
            else torch.zeros((n_groups, n_columns), dtype=dtype)
        )
        # Note [host hypers]: the mirror's entries as 0-d views, by row (few groups)
        self.scalars = (
            [list(row.unbind()) for row in self.host.unbind()]
            if device.type in HOST_DEVICES and n_groups <= HOST_GROUPS
            else None
        )
        self.stale = False  # the mirror has values the device tensor lacks
        self.raw: dict[str, list[Any]] = {}  # group key -> the groups' values
        self.lists: set[str] = set()  # keys holding a list (Note [hyper fingerprints])
        # (row, column) -> the group's tensor value (1 element), read at each step
        self.tensors: dict[tuple[int, int], Tensor] = {}
        self.shaped = False  # whether one of them is not 0-d (read through reshape)
        # where they go (Note [tensor hyper refresh]): 0-d views of the table, or
        # index tensors (rows, columns) to scatter them at
        self.targets: list[Tensor] | tuple[Tensor, Tensor] | None = None


def _tracked(table: _DeviceTable, values: list[Tensor]) -> Tensor:
    """A copy of the table holding ``values``, for autograd (``differentiable=True``
    with a hyper-parameter that requires grad, e.g. a learned lr). Written in place,
    the table would join every step's graph into one: a chain of copies that grows
    with the steps, and a second tensor's copy into a view failed ("a leaf Variable
    that requires grad is being used in an in-place operation")."""
    out = table.hyper_t.clone()
    for (row, column), value in zip(table.tensors, values):
        out[row, column] = value
    return out


class HyperTable:
    """The ``(groups, hypers)`` tensor of an optimizer, per device (Note [hyper tensor]).

    Values are compared and refreshed per group key with C-level list operations, so
    a scheduler that changes every group's lr refreshes one column.
    """

    def __init__(self, spec: AlgorithmSpec) -> None:
        self._columns = spec.hyper_columns
        keys: dict[str, list[tuple[int, int | None]]] = {}
        for j, (key, item) in enumerate(spec.hyper_columns):
            keys.setdefault(key, []).append((j, item))
        self._keys = [
            (key, operator.itemgetter(key), cols) for key, cols in keys.items()
        ]
        self._tables: dict[torch.device, _DeviceTable] = {}
        # Set by a traced step's refresh (Note [traced hypers]): the values it read
        # may differ from those the untraced steps' steady check last compared, so
        # the next untraced refresh compares every key.
        self._traced_since = False

    def invalidate(self) -> None:
        self._tables.clear()

    def tensor(
        self,
        groups: Sequence[Group],
        device: torch.device,
        *,
        stable: frozenset[str] = frozenset(),
    ) -> Tensor:
        """The current values on ``device``, without a host-device sync.

        ``stable``: group keys known unchanged since the last call (the steady check
        compared them); only the others are compared here.
        """
        return self._on_device(self._refresh(groups, device, stable))

    def values(
        self,
        groups: Sequence[Group],
        device: torch.device,
        *,
        stable: frozenset[str] = frozenset(),
        host: bool = False,
    ) -> Hypers:
        """:meth:`tensor`, or with ``host`` (a step no CUDA graph captures) its rows
        of 0-d host tensors where Note [host hypers] allows."""
        table = self._refresh(groups, device, stable)
        if host and table.scalars is not None and not table.tensors:
            return table.scalars
        return self._on_device(table)

    def _refresh(
        self, groups: Sequence[Group], device: torch.device, stable: frozenset[str]
    ) -> _DeviceTable:
        """The device's table, its host mirror holding the groups' current values."""
        if self._traced_since:
            stable, self._traced_since = frozenset(), False
        table = self._tables.get(device)
        if table is None or table.hyper_t.shape[0] != len(groups):
            table = self._tables[device] = _DeviceTable(
                len(groups), len(self._columns), device
            )
            stable = frozenset()
        changed = False
        for key, get, columns in self._keys:
            if key in stable and key in table.raw:
                continue
            values = list(map(get, groups))
            try:
                if key in VOLATILE_KEYS:  # Note [hyper fingerprints]
                    same = _unchanged(values, table.raw.get(key), key in table.lists)
                else:
                    same = values == table.raw.get(key)
                if not same:
                    _check_values(key, values)
                    _fill(table, values, columns)
            except Exception as e:  # Note [edited values]
                del self._tables[device]  # half-filled: built afresh next step
                raise _edited(key, values, columns) or e from e
            if not same:
                table.raw[key] = values
                if key == "betas" and list in set(map(type, values)):  # the sequence
                    table.lists.add(key)
                else:
                    table.lists.discard(key)
                changed = True
        if changed:
            table.stale = table.host is not table.hyper_t and device.type != "meta"
            table.targets = _targets(table, device)
        return table

    @staticmethod
    def _on_device(table: _DeviceTable) -> Tensor:
        """The device tensor, refreshed from the mirror and the tensor values."""
        device = table.hyper_t.device
        if table.stale:
            # through pinned memory: an asynchronous copy, no sync
            table.hyper_t.copy_(table.host.pin_memory(), non_blocking=True)
            table.stale = False
        values = list(table.tensors.values())
        if table.shaped:
            values = [v.reshape(()) for v in values]
        if torch.is_grad_enabled() and any(v.requires_grad for v in values):
            return _tracked(table, values)
        if isinstance(table.targets, list):
            for target, value in zip(table.targets, values):
                target.copy_(value)
        elif table.targets is not None:
            values_t = torch.stack(values)
            table.hyper_t.index_put_(
                table.targets, values_t.to(device=device, dtype=table.hyper_t.dtype)
            )
        return table.hyper_t

    def bind(self, owner: Any) -> None:
        """Let :meth:`at_run_time` find ``owner.param_groups`` (weakly held)."""
        self._key = next(_KEYS)
        _LIVE[self._key] = (weakref.ref(self), weakref.ref(owner))
        weakref.finalize(self, _LIVE.pop, self._key, None)

    def at_run_time(self, groups: Sequence[Group], device: torch.device) -> Tensor:
        """The values, read when the traced graph runs (Note [traced hypers])."""
        anchor = torch.empty(0, device=device, dtype=scalar_dtype(device))
        out: Tensor = torch.ops.umup_compile.hyper_values(
            anchor, self._key, len(groups), len(self._columns)
        )
        return out

    def traced(self, groups: Sequence[Group], device: torch.device) -> Tensor:
        """The values stacked with tensor ops, for a capturable step an outer
        compile traces: floats become graph constants, tensors graph inputs."""
        dtype = scalar_dtype(device)
        return torch.stack(
            [
                torch.stack(
                    [
                        torch.as_tensor(
                            group[key] if item is None else group[key][item],
                            dtype=dtype,
                            device=device,
                        ).reshape(())
                        for key, item in self._columns
                    ]
                )
                for group in groups
            ]
        )


def _fill(
    table: _DeviceTable, values: list[Any], columns: list[tuple[int, int | None]]
) -> None:
    """Write one group key's values into their columns of the host mirror."""
    for j, item in columns:
        col = values if item is None else [v[item] for v in values]
        for at in [at for at in table.tensors if at[1] == j]:
            del table.tensors[at]
        if not set(map(type, col)) <= _PLAIN:  # C-level: isinstance(Tensor) is slow
            for r, v in enumerate(col):
                # Read at each step: in-place fills reach the table, and so does a
                # tensor rebound through ``.data`` or ``set_``.
                if isinstance(v, Tensor):
                    table.tensors[(r, j)] = v
            col = [0.0 if isinstance(v, Tensor) else v for v in col]
        # Through an array (plain numbers only: it would call a tensor's __float__,
        # a sync): ~4x faster than torch.tensor(list) on thousands of groups.
        values_a = array.array("d", col)
        table.host[:, j] = torch.frombuffer(values_a, dtype=torch.float64)
    table.shaped = any(t.ndim for t in table.tensors.values())


# Note [edited values]: a group's value edited between steps is checked when the
# table takes it, not at every step: malformed values (None, a string, a tensor of
# several elements, one beta) raise an error naming the group, the key and the fix
# (Python's own named neither), and betas outside [0, 1), which the constructor
# refuses, raise too (torch's step divides by 1 - beta1**t, or takes the square
# root of 1 - beta2**t: an error or silent infs and nans); tensor betas are read as
# they are. Other values out of the constructor's ranges step as torch's do (a
# negative lr ascends).
def _check_values(key: str, values: list[Any]) -> None:
    if key != "betas":
        return
    flat = list(itertools.chain.from_iterable(values))
    if not set(map(type, flat)) <= _PLAIN:
        # Tensor betas are read as they are (a check would sync); numpy scalars (an
        # array's betas, kept as torch keeps them) are numbers like any other.
        flat = [float(b) for b in flat if not isinstance(b, Tensor)]
    # C-level on plain numbers; fsum is nan if one is (min and max may skip a nan)
    if flat and (min(flat) < 0 or max(flat) >= 1 or math.isnan(math.fsum(flat))):
        g = next(g for g, v in enumerate(values) if not all(map(_in_range, v)))
        raise ValueError(
            f"param group {g}'s betas are {tuple(values[g])}: each beta must be in "
            "[0, 1) (as the constructor checks); set them in that range."
        )


def _in_range(beta: Any) -> bool:
    return isinstance(beta, Tensor) or 0 <= beta < 1


def _edited(
    key: str, values: list[Any], columns: list[tuple[int, int | None]]
) -> Exception | None:
    """A clear error for the first group whose ``key`` the table cannot take (Note
    [edited values]); None where every value is well formed."""
    for g, value in enumerate(values):
        try:
            for _, item in columns:
                v = value if item is None else value[item]
                if isinstance(v, Tensor) and v.numel() != 1:
                    raise ValueError
                if not isinstance(v, (Tensor, numbers.Real)):
                    raise TypeError
            if any(item is not None for _, item in columns) and len(value) != len(
                columns
            ):
                raise ValueError
        except (TypeError, ValueError, IndexError, KeyError):
            what = f"{len(columns)} numbers" if len(columns) > 1 else "a number"
            return TypeError(
                f"param group {g}'s {key!r} is {value!r}, which a step cannot use: "
                f"set {what} (floats, or tensors of one element each)."
            )
    return None


# Note [tensor hyper refresh]: a tensor hyper-parameter (a device lr that a scheduler
# fills in place, one per group) is written into the table at every step, on the
# device. A few are copied into 0-d views of the table, one launch each (a copy
# converts the dtype too); more are stacked, converted and scattered, three launches
# whatever their number (one param group per parameter, each with its lr tensor).
FEW_TENSORS = 2


def _targets(
    table: _DeviceTable, device: torch.device
) -> list[Tensor] | tuple[Tensor, Tensor] | None:
    """Where the tensor-valued entries go: views, or index tensors (rows, columns)."""
    if not table.tensors:
        return None
    if len(table.tensors) <= FEW_TENSORS:
        return [table.hyper_t[row, column] for row, column in table.tensors]
    rows, columns = zip(*table.tensors)
    return torch.tensor(rows, device=device), torch.tensor(columns, device=device)


# -- the custom op of Note [traced hypers] --------------------------------------------

_KEYS = itertools.count()
# key -> (the table, the optimizer whose param_groups it reads), both weakly held
_LIVE: dict[int, tuple[weakref.ref[HyperTable], weakref.ref[Any]]] = {}
# Inductor must not put the op's host work into a CUDA graph: the tag where torch
# knows it (and custom_op takes tags: not 2.6); elsewhere the op refuses to run under
# capture.
_TAGGED: dict[str, Any] = (
    {"tags": (torch.Tag.cudagraph_unsafe,)}
    if hasattr(torch.Tag, "cudagraph_unsafe")
    and "tags" in inspect.signature(torch.library.custom_op).parameters
    else {}
)


@torch.library.custom_op("umup_compile::hyper_values", mutates_args=(), **_TAGGED)
def _hyper_values(anchor: Tensor, key: int, groups: int, columns: int) -> Tensor:
    table_ref, owner_ref = _LIVE[key]
    table, owner = table_ref(), owner_ref()
    if table is None or owner is None:
        raise RuntimeError("umup_compile: the optimizer of this graph was deleted")
    if anchor.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "umup_compile: a CUDA graph is capturing a step that reads its "
            "hyper-parameters on the host; pass capturable=True (and tensor "
            "hyper-parameters, e.g. lr=torch.tensor(lr, device='cuda'))."
        )
    owner._opt_called = True  # the step ran (what the untraced step records)
    hyper_t = table.tensor(owner.param_groups, anchor.device)
    table._traced_since = True
    if hyper_t.shape != (groups, columns):  # Dynamo guards the group count
        raise RuntimeError(
            f"umup_compile: the graph expects {groups} param groups, found "
            f"{hyper_t.shape[0]}"
        )
    return hyper_t.clone()


@_hyper_values.register_fake
def _(anchor: Tensor, key: int, groups: int, columns: int) -> Tensor:
    return anchor.new_empty((groups, columns))
