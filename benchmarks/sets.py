"""Parameter sets: tagged shapes (GPT-like, many small), built with fixed gradients.

The step workloads (``python -m benchmarks gpt`` / ``many-small`` / ``gpt-124m`` /
``gpt-1.2b``) each name one set here; every contestant steps copies of the same
parameters and gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import umup_compile as uc

# many-small's default tensor count (a compile takes about 1 s per tensor on CPU).
N_SMALL = 256


@dataclass(frozen=True)
class ParamSpec:
    """One tagged parameter: name, shape and u-μP tags."""

    name: str
    shape: tuple[int, ...]
    mup_type: str
    depth: int | None


def gpt_like_specs(
    d_model: int = 512, n_layers: int = 8, vocab: int = 8192, mlp_ratio: int = 4
) -> list[ParamSpec]:
    """u-μP GPT-like shapes: embedding, per layer qkv/proj/up/down + 2 norms, head.

    Defaults give 51 tensors, 33,563,136 elements (≈33.6M).
    """
    d, h = d_model, mlp_ratio * d_model
    specs = [ParamSpec("embed.weight", (vocab, d), "weight", None)]
    for i in range(n_layers):
        p = f"layers.{i}."
        specs += [
            ParamSpec(p + "attn_norm.weight", (d,), "norm", None),
            ParamSpec(p + "attn.qkv.weight", (3 * d, d), "weight", n_layers),
            ParamSpec(p + "attn.proj.weight", (d, d), "weight", n_layers),
            ParamSpec(p + "mlp_norm.weight", (d,), "norm", None),
            ParamSpec(p + "mlp.up.weight", (h, d), "weight", n_layers),
            ParamSpec(p + "mlp.down.weight", (d, h), "weight", n_layers),
        ]
    specs += [
        ParamSpec("final_norm.weight", (d,), "norm", None),
        ParamSpec("readout.weight", (vocab, d), "output", None),
    ]
    return specs


def many_small_specs(n: int = 256, numel: int = 4096) -> list[ParamSpec]:
    """``n`` weights of ``numel`` elements each (square when possible): launch-bound."""
    side = int(numel**0.5)
    shape = (side, side) if side * side == numel else (numel // 64, 64)
    return [ParamSpec(f"small.{i}.weight", shape, "weight", None) for i in range(n)]


def build_params(
    specs: Sequence[ParamSpec],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[nn.Parameter]:
    """Tagged parameters with random values and random (fixed) gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for spec in specs:
        data = torch.randn(spec.shape, generator=gen, dtype=dtype).to(device)
        p = uc.Parameter(data, spec.mup_type, spec.depth)  # type: ignore[arg-type]
        p.grad = torch.randn(spec.shape, generator=gen, dtype=dtype).to(device)
        params.append(p)
    return params


def copy_params(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Independent copies of tagged parameters and their gradients."""
    out = []
    for p in params:
        q = copy.deepcopy(p)
        q.grad = None if p.grad is None else p.grad.detach().clone()
        out.append(q)
    return out


def count_numel(params: Sequence[Tensor]) -> int:
    return sum(p.numel() for p in params)


def cast_params(params: list[nn.Parameter], dtype: torch.dtype) -> list[nn.Parameter]:
    """Copies of tagged parameters (and gradients) in ``dtype``, same starting values."""
    out = copy_params(params)
    for p in out:
        p.data = p.data.to(dtype)
        if p.grad is not None:
            p.grad = p.grad.to(dtype)
    return out


def param_specs(workload: str, smoke: bool, n_small: int = N_SMALL) -> list[ParamSpec]:
    """The set of a step workload (``--smoke``: a tiny one of the same kind)."""
    # The large GPU workloads (untied head, vocab 50304).
    if workload == "gpt-124m":  # GPT-2 small: 12 x 768 (163M with the untied head)
        return gpt_like_specs(d_model=768, n_layers=12, vocab=50304)
    if workload == "gpt-1.2b":  # 20 x 2048: 1.21B
        return gpt_like_specs(d_model=2048, n_layers=20, vocab=50304)
    if workload == "gpt":
        if smoke:
            return gpt_like_specs(d_model=16, n_layers=1, vocab=32)
        return gpt_like_specs()
    if smoke:
        return many_small_specs(n=8, numel=256)
    return many_small_specs(n=n_small)
