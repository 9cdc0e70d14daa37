"""The transfer workload's two sides, its data and one training run.

u-μP: ``unit_scaling.TransformerDecoder`` trained with ``umup_compile.optim.AdamW``;
SP: the same architecture in plain torch modules (``SpTransformerDecoder``) with
``torch.optim.AdamW``. Data: ``pydoc_data.topics`` as bytes, a fixed train/validation
split. ``train_run`` trains one (parametrization, width, lr, seed) point and returns
its CSV row.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

import umup_compile.optim as uo

UMUP, SP = "u-μP", "SP"
KINDS = (UMUP, SP)
VOCAB = 256  # bytes
CHUNK, VAL_EVERY = 4096, 10  # every 10th 4 KiB chunk of the corpus is validation
TAIL = 0.1  # train_loss: mean over the last 10 % of the steps


class SpAttention(nn.Module):
    """Causal multi-head self-attention: fused qkv, torch's 1/sqrt(d_head) scale."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.linear_qkv = nn.Linear(width, 3 * width, bias=False)
        self.linear_o = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        qkv = self.linear_qkv(x).view(b, s, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # as unit_scaling: "b s (z h d)"
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        o: Tensor = self.linear_o(out.transpose(1, 2).reshape(b, s, d))
        return o


class SpMLP(nn.Module):
    """SwiGLU MLP, 4x expansion: ``linear_2(linear_1(x) * silu(linear_gate(x)))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(width, 4 * width, bias=False)
        self.linear_gate = nn.Linear(width, 4 * width, bias=False)
        self.linear_2 = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.linear_2(
            self.linear_1(x) * nn.functional.silu(self.linear_gate(x))
        )
        return y


class SpLayer(nn.Module):
    """Pre-norm decoder layer with plain residual adds ``x + f(norm(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.mhsa_norm = nn.RMSNorm(width, eps=1e-5, elementwise_affine=False)
        self.mhsa = SpAttention(width, heads)
        self.mlp_norm = nn.RMSNorm(width, eps=1e-5, elementwise_affine=False)
        self.mlp = SpMLP(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mhsa(self.mhsa_norm(x))
        y: Tensor = x + self.mlp(self.mlp_norm(x))
        return y


class SpTransformerDecoder(nn.Sequential):
    """``unit_scaling.TransformerDecoder``'s architecture in plain torch modules.

    Same module names and parameter shapes; torch's default init (embedding N(0, 1),
    linears U(±1/sqrt(fan_in))), no unit-scaling factors, no residual taus.
    """

    def __init__(self, width: int, vocab: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.layers = nn.Sequential(*(SpLayer(width, heads) for _ in range(layers)))
        self.final_norm = nn.RMSNorm(width, eps=1e-5, elementwise_affine=False)
        self.projection = nn.Linear(width, vocab, bias=False)


def build_model(kind: str, width: int, args: argparse.Namespace) -> nn.Module:
    if kind == SP:
        return SpTransformerDecoder(width, VOCAB, args.depth, args.heads)
    try:
        import unit_scaling as uu  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - the bench extra installs it
        raise SystemExit(
            "benchmarks.transfer needs unit_scaling (its TransformerDecoder is the "
            "u-μP model): pip install -e '.[bench]'"
        ) from e
    model: nn.Module = uu.TransformerDecoder(width, VOCAB, args.depth, args.heads)
    return model


def build_optimizer(
    kind: str, model: nn.Module, lr: float, args: argparse.Namespace
) -> torch.optim.Optimizer:
    if kind == SP:
        return torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=args.sp_weight_decay
        )
    return uo.AdamW(
        model.parameters(),
        lr=lr,
        weight_decay=args.weight_decay,
        independent_weight_decay=True,
        state_dtype=getattr(torch, getattr(args, "state_dtype", "float32")),
        compile=False if args.eager else "strict",
    )


@dataclass(frozen=True)
class Corpus:
    """Byte tensors of the fixed train/validation split."""

    train: Tensor
    val: Tensor
    source: str


def load_corpus() -> Corpus:
    """``pydoc_data.topics`` (topics sorted by name) as bytes, split by 4 KiB chunks."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    val = [c for i, c in enumerate(chunks) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [c for i, c in enumerate(chunks) if i % VAL_EVERY != VAL_EVERY - 1]
    source = (
        f"pydoc_data.topics (Python {sys.version.split()[0]}): {len(topics)} topics, "
        f"{len(text):,} bytes; every {VAL_EVERY}th {CHUNK}-byte chunk is validation"
    )
    return Corpus(torch.cat(train), torch.cat(val), source)


def train_batches(corpus: Corpus, args: argparse.Namespace, seed: int) -> Tensor:
    """(steps, batch, seq + 1) random windows of the training split; fixed per seed."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    n = len(corpus.train) - args.seq - 1
    starts = torch.randint(0, n, (args.steps, args.batch), generator=gen)
    return corpus.train[starts[..., None] + torch.arange(args.seq + 1)]


def val_windows(corpus: Corpus, args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """Non-overlapping (inputs, targets) windows of ``seq`` bytes from the val split."""
    n = min(args.val_tokens, len(corpus.val) - 1) // args.seq
    flat = corpus.val[: n * args.seq + 1]
    return flat[:-1].view(n, args.seq), flat[1:].view(n, args.seq)


def warmup_cosine(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 0."""
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return (step + 1) / n_warm
    t = (step - n_warm) / max(1, steps - n_warm)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Next-byte cross entropy (mean, nats) of ``tokens`` (batch, seq + 1)."""
    loss_fn: Callable[[Tensor], Tensor] | None = getattr(model, "loss", None)
    if loss_fn is not None:  # unit_scaling's model: its unit-scaled cross entropy
        return loss_fn(tokens)
    logits = model(tokens)[:, :-1].float()
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
    """Mean next-byte cross entropy (nats) over the validation windows."""
    total = 0.0
    for i in range(0, len(inputs), 64):
        logits = model(inputs[i : i + 64]).float()
        total += nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[i : i + 64].flatten(), reduction="sum"
        ).item()
    return total / targets.numel()


def train_run(
    kind: str,
    width: int,
    lr: float,
    seed: int,
    corpus: Corpus,
    val: tuple[Tensor, Tensor],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train one model and return its CSV row (final validation loss and timings)."""
    torch.manual_seed(seed)
    model = build_model(kind, width, args)
    opt = build_optimizer(kind, model, lr, args)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, partial(warmup_cosine, steps=args.steps, warmup=args.warmup)
    )
    losses: list[float] = []
    first_step = 0.0
    t0 = time.perf_counter()
    for i, tokens in enumerate(train_batches(corpus, args, seed)):
        loss = lm_loss(model, tokens)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        losses.append(loss.item())
        if i == 0:
            first_step = time.perf_counter() - t0
        if not math.isfinite(losses[-1]):
            break  # diverged: the rest of the run would be NaN
    diverged = not math.isfinite(losses[-1])
    val_loss = math.nan if diverged else evaluate(model, *val)
    diverged = diverged or not math.isfinite(val_loss)
    tail = losses[-max(1, round(TAIL * len(losses))) :]
    return {
        "parametrization": kind,
        "width": width,
        "lr": f"{lr:.6g}",
        "log2_lr": round(math.log2(lr)),
        "seed": seed,
        "val_loss": f"{val_loss:.4f}",
        "train_loss": f"{statistics.fmean(tail):.4f}",
        "diverged": diverged,
        "n_params": sum(p.numel() for p in model.parameters()),
        "first_step_s": f"{first_step:.2f}",
        "run_s": f"{time.perf_counter() - t0:.2f}",
    }
