"""Train a small u-μP model with DDP or FSDP2 and umup_compile's AdamW.

Run on CPU with 2 processes (gloo), or on GPUs (nccl, one process per GPU)::

    torchrun --nproc-per-node 2 examples/distributed_train.py --mode fsdp2
    torchrun --nproc-per-node 2 examples/distributed_train.py --mode ddp --no-compile

Each rank trains on its share of the global batch; DDP and FSDP2 average the gradients,
so the run takes the same steps as one process on the whole batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import umup_compile as uc
from umup_compile.distributed import keep_tags
from umup_compile.optim import AdamW


class Block(nn.Module):
    """A residual MLP block whose weights are u-μP tagged with the model's depth."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.w_in = uc.Parameter(torch.randn(4 * width, width), "weight", depth)
        self.w_out = uc.Parameter(torch.randn(width, 4 * width), "weight", depth)
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.gelu(x @ self.w_in.T / x.shape[-1] ** 0.5)
        return x + (h @ self.w_out.T / h.shape[-1] ** 0.5) / self.depth**0.5


class TinyLM(nn.Module):
    """Embedding, residual blocks, RMS norm and a readout, all u-μP tagged."""

    def __init__(self, vocab: int, width: int, depth: int) -> None:
        super().__init__()
        self.embed = uc.Parameter(torch.randn(vocab, width), "weight")
        self.blocks = nn.ModuleList(Block(width, depth) for _ in range(depth))
        self.norm = uc.Parameter(torch.ones(width), "norm")
        self.head = uc.Parameter(torch.randn(vocab, width), "output")

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed[tokens]
        for block in self.blocks:
            x = block(x)
        x = nn.functional.rms_norm(x, (x.shape[-1],)) * self.norm
        return x @ self.head.T / x.shape[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="fsdp2")
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
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must divide by world size {world}")

    torch.manual_seed(0)  # the same initial weights on every rank
    vocab = 128
    model = TinyLM(vocab, args.width, args.depth).to(device)
    if args.mode == "ddp":
        forward: nn.Module = DistributedDataParallel(model)  # keeps the tags
    else:
        # fully_shard replaces the parameters by DTensors; keep_tags re-tags them.
        with keep_tags(model):
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        forward = model
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
    share = args.batch // world
    for step in range(args.steps):
        # A learnable task: each sequence counts up from a random start, mod vocab.
        start = torch.randint(0, vocab, (args.batch, 1), generator=gen)
        tokens = (start + torch.arange(33)) % vocab
        mine = tokens[rank * share : (rank + 1) * share].to(device)
        logits = forward(mine[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss)  # gloo has no AVG: sum, then divide
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item() / world:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
