"""Train a small u-μP model with DDP, FSDP2, tensor parallel or FSDP2 × tensor parallel.

Run on CPU (gloo), or on GPUs (nccl, one process per GPU)::

    torchrun --nproc-per-node 2 examples/distributed_train.py --mode fsdp2
    torchrun --nproc-per-node 2 examples/distributed_train.py --mode ddp --no-compile
    torchrun --nproc-per-node 2 examples/distributed_train.py --mode tp
    torchrun --nproc-per-node 4 examples/distributed_train.py --mode fsdp-tp --tp 2

DDP and FSDP2 give each rank its share of the global batch and average the gradients;
tensor parallel shards each weight over ``--tp`` ranks that all see the same batch;
``fsdp-tp`` does both on a 2-D mesh (world size / ``--tp`` data-parallel groups). Every
mode takes the same steps as one process on the whole batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

import umup_compile as uc
from umup_compile.distributed import keep_tags
from umup_compile.optim import AdamW
from umup_compile.parameter import MupType


def tagged_linear(
    fan_in: int, fan_out: int, mup_type: MupType, depth: int | None = None
) -> nn.Linear:
    """An ``nn.Linear`` (what tensor parallel shards) with a unit-scaled tagged weight."""
    layer = nn.Linear(fan_in, fan_out, bias=False)
    layer.weight = uc.Parameter(torch.randn(fan_out, fan_in), mup_type, depth)
    return layer


class Block(nn.Module):
    """A residual MLP block whose weights are u-μP tagged with the model's depth."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.up = tagged_linear(width, 4 * width, "weight", depth)
        self.down = tagged_linear(4 * width, width, "weight", depth)
        self.width, self.depth = width, depth

    def forward(self, x: Tensor) -> Tensor:
        # Scale by the global sizes: under tensor parallel, `h` is a local shard.
        h = nn.functional.gelu(self.up(x) / self.width**0.5)
        return x + self.down(h) / (4 * self.width) ** 0.5 / self.depth**0.5


class TinyLM(nn.Module):
    """Embedding, residual blocks, RMS norm and a readout, all u-μP tagged."""

    def __init__(self, vocab: int, width: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.embed.weight = uc.Parameter(torch.randn(vocab, width), "weight")
        self.blocks = nn.ModuleList(Block(width, depth) for _ in range(depth))
        self.norm = uc.Parameter(torch.ones(width), "norm")
        self.head = tagged_linear(width, vocab, "output")
        self.width = width

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        x = nn.functional.rms_norm(x, (self.width,)) * self.norm
        return self.head(x) / self.width


def tp_plan(model: TinyLM) -> dict[str, ParallelStyle]:
    """Shard the embedding by rows (vocabulary), each block's up projection by
    columns and down projection by rows, and the readout by columns, gathering the
    logits; the norm weight stays replicated."""
    plan: dict[str, ParallelStyle] = {
        "embed": RowwiseParallel(input_layouts=Replicate()),
        "head": ColwiseParallel(output_layouts=Replicate()),
    }
    for i in range(len(model.blocks)):
        plan[f"blocks.{i}.up"] = ColwiseParallel()
        plan[f"blocks.{i}.down"] = RowwiseParallel()
    return plan


def parallelize(
    model: TinyLM, mode: str, tp: int, device: str
) -> tuple[nn.Module, int, int]:
    """Wrap ``model`` for ``mode``, u-μP tags kept.

    Returns:
        ``(forward, dp_rank, dp_size)``: the module to call, and which share of the
        global batch this rank trains on, out of how many.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if mode == "ddp":
        return DistributedDataParallel(model), rank, world  # keeps the tags
    if mode == "fsdp2":
        # fully_shard replaces the parameters by DTensors; keep_tags re-tags them.
        with keep_tags(model):
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        return model, rank, world
    if world % tp:
        raise SystemExit(f"--tp {tp} must divide the world size {world}")
    mesh = init_device_mesh(device, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    # parallelize_module, like fully_shard, builds new DTensor parameters: keep_tags
    # re-tags them. The u-μP factors come from the global shapes DTensors report.
    with keep_tags(model):
        parallelize_module(model, mesh["tp"], tp_plan(model))
        if mode == "fsdp-tp":
            for block in model.blocks:
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
    return model, mesh["dp"].get_local_rank(), mesh["dp"].size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=["ddp", "fsdp2", "tp", "fsdp-tp"], default="fsdp2"
    )
    parser.add_argument(
        "--tp", type=int, default=2, help="tensor-parallel degree (tp, fsdp-tp)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2**-4)
    parser.add_argument(
        "--no-compile", action="store_true", help="eager optimizer engine"
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if args.mode == "tp" and args.tp != world:
        raise SystemExit(f"--mode tp shards over every rank: pass --tp {world}")

    torch.manual_seed(0)  # the same initial weights on every rank
    vocab = 128
    model = TinyLM(vocab, args.width, args.depth).to(device)
    forward, dp_rank, dp_size = parallelize(model, args.mode, args.tp, device.type)
    if args.batch % dp_size:
        raise SystemExit(f"--batch {args.batch} must divide by {dp_size} shares")
    # Build the optimizer after wrapping, over the (sharded) parameters it will update.
    opt = AdamW(
        model.named_parameters(),
        lr=args.lr,
        weight_decay=2**-13,
        compile=not args.no_compile,
    )
    if rank == 0:
        print(opt.describe())

    gen = torch.Generator().manual_seed(1)  # the same global batches on every rank
    share = args.batch // dp_size
    for step in range(args.steps):
        # A learnable task: each sequence counts up from a random start, mod vocab.
        start = torch.randint(0, vocab, (args.batch, 1), generator=gen)
        tokens = (start + torch.arange(33)) % vocab
        mine = tokens[dp_rank * share : (dp_rank + 1) * share].to(device)
        logits = forward(mine[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        # gloo has no AVG: sum, then divide (tensor-parallel ranks hold equal losses).
        dist.all_reduce(loss)
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item() / world:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
