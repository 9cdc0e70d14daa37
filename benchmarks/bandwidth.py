"""What a step holds and moves: state bytes, bytes per Adam step, copy bandwidth.

The step workloads add these figures per contestant (``add_figures``): the
optimizer-state size, the bytes one step moves from the contestant's real tensors,
and that traffic over the median step time as a share of the device's copy and
in-place add bandwidth, measured in the same run.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import Tensor

from benchmarks import timer


def _plain(t: Tensor) -> list[Tensor]:
    """The plain tensors holding ``t``'s data: a wrapper subclass (torchao's
    quantized state) through ``__tensor_flatten__``."""
    if type(t) is not Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [x for name in names for x in _plain(getattr(t, name))]
    return [t]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in _tensors(state):
            storage = value.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def copy_bandwidth(
    device: torch.device,
    nbytes: int = 256 * 2**20,
    repeats: int = 10,
    op: str = "copy",
) -> float:
    """Device memory bandwidth in bytes/s, median over ``repeats`` of one large op.

    ``op="copy"``: ``dst.copy_(src)``, counted as ``2 * nbytes`` (one read, one write).
    On a CPU the write to ``dst`` also reads it first (write-allocate), so the real
    traffic is nearer ``3 * nbytes`` and this figure understates the bus.
    ``op="add"``: in place ``dst.add_(src)``, counted as ``3 * nbytes`` (two reads, one
    write to a line already read): no write-allocate, like an in-place Adam step.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.ones_like(src)
    if op == "copy":
        fn, moved = (lambda: dst.copy_(src)), 2 * nbytes
    elif op == "add":
        fn, moved = (lambda: dst.add_(src)), 3 * nbytes
    else:
        raise ValueError(f"op must be 'copy' or 'add', not {op!r}")
    fn()  # warm-up: page faults, first touch
    times = [timer.time_once(fn, device) for _ in range(repeats)]
    return moved / statistics.median(times)


def _tensors(value: Any) -> list[Any]:
    """Tensors in a state entry, looking into dicts, lists and tuples (HeavyBall nests)."""
    if isinstance(value, torch.Tensor):
        return _plain(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def step_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes one Adam step moves, from the contestant's real tensors and dtypes.

    Per parameter: read + write the parameter, read the gradient, and
    read + write each state tensor of the parameter's size (``exp_avg``,
    ``exp_avg_sq``; scalars such as ``step`` are left out). Returns (bytes, bytes of
    the parameters): float32 Adam gives 7 x 4 = 28 B per element, bf16 parameters
    and gradients with float32 moments 2 x 2 + 2 + 2 x (4 + 4) = 22 B.
    """
    moved = params = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            # Every parameter had a gradient when it stepped; a contestant may clear
            # it in its step (HeavyBall does), so a missing one counts as p's dtype.
            grad = p.grad if p.grad is not None else p
            p_bytes = p.numel() * p.element_size()
            params += p_bytes
            moved += 2 * p_bytes + grad.numel() * grad.element_size()
            for t in _tensors(optimizer.state.get(p, {})):
                if t.numel() == p.numel():  # 8-bit codes too (flat or shaped)
                    moved += 2 * t.numel() * t.element_size()
    return moved, params


def add_figures(
    rows: list[dict[str, Any]],
    copy_bw: float,
    add_bw: float,
    optimizers: dict[str, torch.optim.Optimizer],
) -> list[dict[str, Any]]:
    """Per contestant: state size, bytes moved per step, achieved and % copy bandwidth."""
    for row in rows:
        if "_median" not in row:  # skipped (optional package missing)
            row["peak_extra_bytes"] = None
            continue
        numel = int(row["numel"])
        moved, param_bytes = step_bytes(optimizers[row["contestant"]])
        achieved = moved / row["_median"]
        row["bytes_per_step"] = moved
        row["bytes_per_element"] = round(moved / numel, 2)
        row["achieved_gb_s"] = round(achieved / 1e9, 2)
        row["pct_copy_bw"] = round(100 * achieved / copy_bw, 1)
        row["pct_inplace_bw"] = round(100 * achieved / add_bw, 1)
        row["state_over_params"] = round(row["state_bytes"] / param_bytes, 3)
        row["state_MB"] = f"{row['state_bytes'] / 2**20:.1f}"
        peak = row["peak_extra_bytes"]
        row["peak_extra_MB"] = "-" if peak is None else f"{peak / 2**20:.1f}"
    return rows
