"""The demo's model and data: a byte-level u-μP transformer, and text every Python has.

``demo`` trains it; ``benchmarks`` reuse it (``TinyUmupLM``, ``batches``).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
from torch import Tensor, nn

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


def corpus() -> tuple[Tensor, str]:
    """Bytes of text every Python has: ``pydoc_data.topics``, else the stdlib's docs.

    Returns:
        The bytes as a 1-D ``uint8`` tensor, and where they came from.
    """
    try:
        from pydoc_data.topics import topics

        text, source = "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data"
    except ImportError:  # some distributions package pydoc_data separately
        modules = (argparse, copy, math, statistics, time)
        text = "\n\n".join(
            obj.__doc__ or "" for m in modules for obj in vars(m).values()
        )
        source = "stdlib docstrings"
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
    return data, source


def text_batches(
    data: Tensor, seq: int, batch: int, steps: int, seed: int
) -> list[Tensor]:
    """Random windows of ``seq + 1`` bytes: inputs and next-byte targets."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq + 1)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch, 1), generator=gen)
        out.append(data[starts + offsets].long())
    return out
