"""What a step runs on a CUDA device outside its compiled graphs, in launches and bytes.

:class:`DeviceOps` records the aten ops of the code it wraps that touch a device
tensor; :func:`device_cost` turns each into CUDA launches and bytes by torch's own
rules: ``foreach`` ops by multi-tensor apply (64K-element chunks, 32 KB kernel
arguments), ``cat``/``stack`` by their batches of inputs, views and allocations none,
any other op one launch reading its inputs and writing its outputs.
:func:`torch_fused_launches` counts ``torch.optim.Adam(fused=True)``'s launches by the
same rules. Used by ``gpu_record`` (the pack's copies, the clip's norms, the
hyper-parameter refresh) and ``gpu_step``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class DeviceOp:
    """An aten op of the step on device tensors, outside the engine's calls."""

    name: str
    launches: int
    bytes: int
    host_sync: bool = False


# The CUDA multi-tensor-apply limits (ATen/native/cuda/MultiTensorApply.cuh), with
# 32 KB kernel arguments (CUDA >= 12.1 and a driver >= 530, any sm_90 machine): per
# depth (tensor lists), the tensors and the 64K-element chunks one launch takes.
CHUNK = 65536
MAX_TENSORS = {1: 770, 2: 448, 3: 336, 4: 252, 5: 210}
MAX_BLOCKS = 2240
CAT_BATCH = 128  # ATen/native/cuda/Shape.cu: inputs one cat/stack launch copies


def mta_launches(numels: Sequence[int], depth: int) -> int:
    """Launches of one ``multi_tensor_apply`` over tensors of ``numels`` elements:
    a launch whenever the launch's tensors or its chunks are full, then the rest."""
    launches = tensors = blocks = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = -(-numel // CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last = chunk == chunks - 1
            if (tensors == MAX_TENSORS[depth] and last) or blocks == MAX_BLOCKS:
                launches += 1
                blocks = 0
                tensors = 0 if last else 1
    return launches + (blocks > 0)


def torch_fused_launches(numels: Sequence[int]) -> int:
    """torch.optim.Adam(fused=True) on CUDA, one device and dtype: the step counters'
    ``_foreach_add_`` (depth 1), then ``_fused_adam_`` (depth 4: p, g, m, v)."""
    return mta_launches([1] * len(numels), 1) + mta_launches(numels, 4)


_FREE = {  # no kernel: allocation, metadata, aliasing
    "empty",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "set_",
    "detach",
    "alias",
    "lift_fresh",
    "_local_scalar_dense",
}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _nbytes(ts: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def device_cost(
    func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any
) -> DeviceOp:
    """The CUDA launches and bytes of one aten op (see the module docstring):
    foreach ops by the multi-tensor-apply rules, ``cat``/``stack`` by its batches,
    views and allocations none, any other op one launch reading its inputs and
    writing its outputs."""
    name = func.overloadpacket.__name__
    inputs, outputs = _tensors((args, kwargs)), _tensors(out)
    # a host sync: a value read on the host, or a copy from the device to the host
    sync = name == "_local_scalar_dense" or (
        any(t.device.type != "cpu" for t in inputs)
        and any(t.device.type == "cpu" for t in outputs)
    )
    views = [r.alias_info for r in func._schema.returns]
    if name in _FREE or (
        views and all(a is not None and not a.is_write for a in views)
    ):
        return DeviceOp(name, 0, 0, sync)
    if name in ("copy_", "_foreach_copy_"):  # the destination is written, not read
        return DeviceOp(
            name,
            mta_launches([t.numel() for t in args[1]], 2)
            if name == "_foreach_copy_"
            else 1,
            2 * _nbytes(_tensors(args[1])),
        )
    if name.startswith("_foreach_"):
        lists = [a for a in args if isinstance(a, (list, tuple)) and a]
        depth = len(lists) + (0 if name.endswith("_") else 1)
        numels = [t.numel() for t in lists[0]]
        launches = mta_launches(numels, min(depth, 5))
        if name == "_foreach_norm":
            launches += 1  # the per-tensor cleanup kernel
        # in place: the first list is written back; else the outputs are written
        written = _nbytes(lists[0]) if name.endswith("_") else _nbytes(outputs)
        return DeviceOp(name, launches, _nbytes(inputs) + written)
    if name in ("cat", "stack"):
        n = len(args[0])
        return DeviceOp(name, -(-n // CAT_BATCH), 2 * _nbytes(outputs))
    return DeviceOp(name, 1, _nbytes(inputs) + _nbytes(outputs), sync)


class DeviceOps(TorchDispatchMode):
    """Records the device ops (see :func:`device_cost`) of the code it wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[DeviceOp] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(t.device.type != "cpu" for t in _tensors((args, kwargs, out))):
            op = device_cost(func, args, kwargs, out)
            if op.launches or op.host_sync:
                self.ops.append(op)
        return out
