"""A tagged toy model that tensor parallel can shard, its plan, and its meshes.

``parallelize_module`` shards ``nn.Linear`` and ``nn.Embedding`` modules only, so
:class:`TPNet` is ``ToyUmupNet`` built from them, with u-μP tagged weights: an
embedding, residual MLP blocks (a biased up projection, a biased down projection), an
RMS norm and a readout. The plan is the usual one (torchtitan's): the embedding row-wise
(vocabulary sharded, input replicated), each block's up projection column-wise and down
projection row-wise, the readout column-wise with replicated logits; the norm weight
stays a plain tensor. That puts every kind of placement in one bucket: ``Shard(0)``,
``Shard(1)``, ``Replicate`` DTensors and a plain tensor, and an embedding whose gradient
arrives ``Replicate`` for its ``Shard(0)`` weight (Note [sharded parameters]).

Sizes: the vocabulary (33) and width (15) are odd, so dim-0 shards are uneven; the
hidden size is even (22 -> 11 + 11), because a column-wise output is rebuilt from its
local shards as if they were even. ``forward`` scales by the global sizes, never by a
local shard's shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

import umup_compile as uc
from tests.distributed._worker import DEPTH, VOCAB, WIDTH
from umup_compile.distributed import keep_tags
from umup_compile.parameter import MupType

HIDDEN = 22
TP = 2  # the tensor-parallel degree of every layout
# layout -> world size: tensor parallel alone, or FSDP2 over 2 data-parallel groups
LAYOUTS = {"tp": TP, "fsdp2_tp": 2 * TP}


def tagged_linear(
    fan_in: int,
    fan_out: int,
    mup_type: MupType,
    depth: int | None = None,
    bias: bool = False,
) -> nn.Linear:
    """An ``nn.Linear`` whose weight (and bias) are unit-initialised and tagged."""
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    layer.weight = uc.Parameter(torch.randn(fan_out, fan_in), mup_type, depth)
    if bias:
        layer.bias = uc.Parameter(torch.randn(fan_out) / 4, "bias", depth)
    return layer


class TPBlock(nn.Module):
    """A residual MLP block: up projection, tanh, down projection."""

    def __init__(self) -> None:
        super().__init__()
        self.up = tagged_linear(WIDTH, HIDDEN, "weight", DEPTH, bias=True)
        self.down = tagged_linear(HIDDEN, WIDTH, "weight", DEPTH, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.up(x / WIDTH**0.5))
        return x + self.down(h / HIDDEN**0.5) / DEPTH**0.5


class TPNet(nn.Module):
    """Embedding, residual blocks, RMS norm and readout, all u-μP tagged."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.embed.weight = uc.Parameter(torch.randn(VOCAB, WIDTH), "weight")
        self.blocks = nn.ModuleList(TPBlock() for _ in range(DEPTH))
        self.norm = uc.Parameter(torch.ones(WIDTH), "norm")
        self.head = tagged_linear(WIDTH, VOCAB, "output")

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        x = nn.functional.rms_norm(x, (WIDTH,)) * self.norm
        return self.head(x) / WIDTH


def tp_plan() -> dict[str, ParallelStyle]:
    """The tensor-parallel plan of :class:`TPNet` (see the module docstring)."""
    plan: dict[str, ParallelStyle] = {
        "embed": RowwiseParallel(input_layouts=Replicate()),
        "head": ColwiseParallel(output_layouts=Replicate()),
    }
    for i in range(DEPTH):
        plan[f"blocks.{i}.up"] = ColwiseParallel()
        plan[f"blocks.{i}.down"] = RowwiseParallel()
    return plan


def make_tp_model(dtype: torch.dtype, seed: int = 0) -> TPNet:
    """The unwrapped model, identical on every rank for a given seed."""
    torch.manual_seed(seed)
    return TPNet().to(dtype)


def make_parallel_model(
    layout: str, dtype: torch.dtype, seed: int = 0
) -> tuple[TPNet, int | None, int]:
    """:func:`make_tp_model` wrapped as ``layout``, tags restored by ``keep_tags``.

    Returns:
        ``(model, share, shares)``: this rank's share of each global batch out of
        ``shares`` (``None``: the whole batch, as under tensor parallel alone, where
        every rank computes the same activations).
    """
    if dist.get_world_size() != LAYOUTS[layout]:
        raise ValueError(f"{layout} runs on {LAYOUTS[layout]} ranks")
    model = make_tp_model(dtype, seed)
    dp_mesh: DeviceMesh | None = None
    if layout == "tp":
        tp_mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    else:
        mesh = init_device_mesh("cpu", (2, TP), mesh_dim_names=("dp", "tp"))
        tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    with keep_tags(model):
        parallelize_module(model, tp_mesh, tp_plan())
        if dp_mesh is not None:
            for block in model.blocks:
                fully_shard(block, mesh=dp_mesh)
            fully_shard(model, mesh=dp_mesh)
    if dp_mesh is None:
        return model, None, 1
    return model, dp_mesh.get_local_rank(), dp_mesh.size()
