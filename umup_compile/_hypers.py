"""The tensors a step's values arrive in: hyper-parameters and per-parameter factors.

Note [hyper tensor]: every value a scheduler may change reaches the update as a column
of one ``(groups, hypers)`` tensor per device, so a new lr never recompiles. Python
floats are cached and the tensor is refreshed in place only when one changes, through
pinned memory on accelerators (an asynchronous copy, no host sync). Tensor
hyper-parameters (``lr=torch.tensor(...)``, filled in place by schedulers) are written
into it on the device at every step, so a CUDA graph that captured the step reads
their current values at replay. While an outer ``torch.compile`` traces the step, the
values are stacked with tensor ops instead and no cache is kept.

The u-μP factors and rounding seeds are per parameter and change only with the
layout: :func:`factor_vectors` builds them once per unit.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

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


@dataclass
class _Cached:
    raw: list[tuple[Any, ...]]
    hyper_t: Tensor
    tensor_at: tuple[Tensor, Tensor] | None  # (rows, columns) of tensor values
    tensors: list[Tensor]


class HyperTable:
    """The ``(groups, hypers)`` tensor of an optimizer, per device (Note [hyper tensor])."""

    def __init__(self, spec: AlgorithmSpec) -> None:
        self._raw_of: Callable[[Group], Any] = _getter(spec.hyper_keys)
        self._row = spec.hyper_row
        self._columns = len(spec.hyper_names)
        self._cache: dict[torch.device, _Cached] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    def tensor(self, groups: Sequence[Group], device: torch.device) -> Tensor:
        """The current values on ``device``, without a host-device sync."""
        raw = list(map(self._raw_of, groups))
        cached = self._cache.get(device)
        if cached is None or cached.raw != raw:
            cached = self._refresh(groups, raw, device, cached)
        if cached.tensor_at is not None:
            values = torch.stack(cached.tensors)
            cached.hyper_t.index_put_(
                cached.tensor_at, values.to(device=device, dtype=cached.hyper_t.dtype)
            )
        return cached.hyper_t

    def _refresh(
        self,
        groups: Sequence[Group],
        raw: list[tuple[Any, ...]],
        device: torch.device,
        cached: _Cached | None,
    ) -> _Cached:
        dtype = scalar_dtype(device)
        floats: list[list[float]] = []
        rows, columns, tensors = [], [], []
        for g, group in enumerate(groups):
            row = []
            for j, v in enumerate(self._row(group)):
                if isinstance(v, Tensor):
                    rows.append(g)
                    columns.append(j)
                    tensors.append(v.reshape(()))  # a view: sees in-place fills
                    v = 0.0
                row.append(v)
            floats.append(row)
        shape = (len(groups), self._columns)
        hyper_t = (
            cached.hyper_t
            if cached is not None and cached.hyper_t.shape == shape
            else torch.empty(shape, dtype=dtype, device=device)
        )
        host = torch.tensor(floats, dtype=dtype).reshape(shape)
        if device.type != "cpu":
            host = host.pin_memory()
        hyper_t.copy_(host, non_blocking=True)
        tensor_at = None
        if tensors:
            tensor_at = (
                torch.tensor(rows, device=device),
                torch.tensor(columns, device=device),
            )
        fresh = _Cached(raw, hyper_t, tensor_at, tensors)
        self._cache[device] = fresh
        return fresh

    def traced(self, groups: Sequence[Group], device: torch.device) -> Tensor:
        """The values stacked with tensor ops, for a step an outer compile traces:
        floats become graph constants and no guard is placed on the cache."""
        dtype = scalar_dtype(device)
        return torch.stack(
            [
                torch.stack(
                    [
                        torch.as_tensor(v, dtype=dtype, device=device).reshape(())
                        for v in self._row(group)
                    ]
                )
                for group in groups
            ]
        )


def _getter(keys: Sequence[str]) -> Callable[[Group], Any]:
    """A C-level getter of ``keys`` (one key: the value itself, compared alike)."""
    return operator.itemgetter(*keys)
