"""Demo: train a small u-μP transformer-like model with the eager and compiled engines.

Run ``python -m umup_compile.demo`` (``--help`` for options). Both runs start from the
same weights and see the same synthetic batches, so their losses agree to float32
rounding while the compiled optimizer step is faster.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import Tensor, nn

from .optim import AdamW, describe
from .parameter import Parameter


class Block(nn.Module):
    """A residual attention + MLP block with u-μP-tagged, unit-initialised weights."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.qkv = Parameter(torch.randn(3 * width, width), "weight", depth)
        self.proj = Parameter(torch.randn(width, width), "weight", depth)
        self.up = Parameter(torch.randn(4 * width, width), "weight", depth)
        self.down = Parameter(torch.randn(width, 4 * width), "weight", depth)
        self.norm1 = Parameter(torch.ones(width), "norm", depth)
        self.norm2 = Parameter(torch.ones(width), "norm", depth)
        self.tau = (2 * depth) ** -0.5  # residual branch weight

    def forward(self, x: Tensor) -> Tensor:
        width = x.shape[-1]
        h = nn.functional.rms_norm(x, (width,)) * self.norm1
        q, k, v = (h @ self.qkv.T / width**0.5).chunk(3, dim=-1)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.tau * (attn @ self.proj.T / width**0.5)
        h = nn.functional.rms_norm(x, (width,)) * self.norm2
        h = nn.functional.gelu(h @ self.up.T / width**0.5)
        out: Tensor = x + self.tau * (h @ self.down.T / (4 * width) ** 0.5)
        return out


class TinyUmupLM(nn.Module):
    """Embedding, ``depth`` blocks, final norm and a unit-scaled readout."""

    def __init__(self, vocab: int, width: int, depth: int) -> None:
        super().__init__()
        self.embed = Parameter(torch.randn(vocab, width), "weight")
        self.blocks = nn.ModuleList(Block(width, depth) for _ in range(depth))
        self.norm = Parameter(torch.ones(width), "norm")
        self.readout = Parameter(torch.randn(vocab, width), "output")

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed[tokens]
        for block in self.blocks:
            x = block(x)
        x = nn.functional.rms_norm(x, (x.shape[-1],)) * self.norm
        logits: Tensor = x @ self.readout.T / x.shape[-1]
        return logits


def batches(vocab: int, seq: int, batch: int, steps: int, seed: int) -> list[Tensor]:
    """Synthetic sequences following ``t[i+1] = (3 t[i] + 1) mod vocab``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        seqs = [start]
        for _ in range(seq):
            seqs.append((3 * seqs[-1] + 1) % vocab)
        out.append(torch.cat(seqs, dim=1))
    return out


def progress(label: str, done: int, total: int, loss: float) -> None:
    """Draw a one-line progress bar on stderr."""
    filled = 30 * done // total
    bar = "#" * filled + "." * (30 - filled)
    end = "\n" if done == total else ""
    print(
        f"\r{label:>8} [{bar}] {done}/{total} loss {loss:.4f}", end=end, file=sys.stderr
    )


def train(
    model: TinyUmupLM, data: list[Tensor], *, compile: bool, lr: float, label: str
) -> tuple[list[float], list[float]]:
    """Train on ``data``; return the losses and optimizer-step times (seconds)."""
    opt = AdamW(model.parameters(), lr=lr, weight_decay=1e-4, compile=compile)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(data))
    losses, step_times = [], []
    for tokens in data:
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        start = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - start)
        sched.step()
        losses.append(loss.item())
        if len(losses) % max(1, len(data) // 30) == 0 or len(losses) == len(data):
            progress(label, len(losses), len(data), losses[-1])
    return losses, step_times


def plot(path: str, curves: dict[str, list[float]]) -> None:
    """Write a PNG of the loss curves (needs matplotlib: ``pip install .[demo]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(
            f"--plot needs matplotlib ({e}); pip install matplotlib"
        ) from e
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        ax.plot(losses, label=name, linestyle="--" if name == "compiled" else "-")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="u-μP AdamW")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train both engines, print the side-by-side table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--every", type=int, default=25, help="print every N steps")
    parser.add_argument(
        "--plot", metavar="FILE", help="write a PNG of both loss curves"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyUmupLM(args.vocab, args.width, args.depth)
    data = batches(args.vocab, seq=32, batch=16, steps=args.steps, seed=1)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"u-μP LM: {n_params:,} parameters in {len(list(model.parameters()))} tensors"
    )
    print(describe(model, lr=args.lr, weight_decay=1e-4), "\n", flush=True)
    runs = {}
    for name, compile in (("eager", False), ("compiled", True)):
        runs[name] = train(
            copy.deepcopy(model), data, compile=compile, lr=args.lr, label=name
        )
    (eager_loss, eager_t), (comp_loss, comp_t) = runs["eager"], runs["compiled"]
    print(
        f"\n{'step':>5} | {'loss eager':>10} | {'loss compiled':>13} | "
        f"{'step ms eager':>13} | {'step ms compiled':>16}"
    )
    for i in range(args.every, args.steps + 1, args.every):
        i = min(i, args.steps - 1)
        window = slice(max(1, i - args.every + 1), i + 1)  # step 0 compiles: skip it
        ms_e = 1e3 * sum(eager_t[window]) / max(1, len(eager_t[window]))
        ms_c = 1e3 * sum(comp_t[window]) / max(1, len(comp_t[window]))
        print(
            f"{i:>5} | {eager_loss[i]:>10.4f} | {comp_loss[i]:>13.4f} | "
            f"{ms_e:>13.3f} | {ms_c:>16.3f}"
        )
    steady = slice(1, None)
    print(f"\nfinal loss: eager {eager_loss[-1]:.4f}, compiled {comp_loss[-1]:.4f}")
    print(f"first compiled step (includes compiling): {comp_t[0]:.1f} s")
    median_e = sorted(eager_t[steady])[len(eager_t[steady]) // 2]
    median_c = sorted(comp_t[steady])[len(comp_t[steady]) // 2]
    print(
        f"median optimizer step: eager {1e3 * median_e:.3f} ms, "
        f"compiled {1e3 * median_c:.3f} ms"
    )
    if args.plot:
        plot(args.plot, {"eager": eager_loss, "compiled": comp_loss})


if __name__ == "__main__":
    main()
