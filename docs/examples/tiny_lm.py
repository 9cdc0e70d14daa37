"""A tiny u-μP language model: the model every example in these docs trains."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import umup_compile as uc


class TinyLM(nn.Module):
    """Embedding, ``depth`` residual MLP blocks, RMS norm and a readout, all tagged."""

    def __init__(self, vocab: int = 64, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = uc.Parameter(torch.randn(vocab, width), "weight")
        # Weights inside the residual blocks scale with the depth they are shared over.
        self.blocks = nn.ParameterList(
            uc.Parameter(torch.randn(width, width), "weight", mup_scaling_depth=depth)
            for _ in range(depth)
        )
        self.norm = uc.Parameter(torch.ones(width), "norm")
        self.head = uc.Parameter(torch.randn(vocab, width), "output")

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed[tokens]
        for w in self.blocks:
            h = nn.functional.gelu(x @ w.T / x.shape[-1] ** 0.5)  # unit-scaled matmul
            x = x + h / len(self.blocks) ** 0.5
        x = nn.functional.rms_norm(x, (x.shape[-1],)) * self.norm
        return x @ self.head.T / x.shape[-1]

    def loss(self, tokens: Tensor) -> Tensor:
        """Next-token cross-entropy on a batch of sequences."""
        logits = self(tokens[:, :-1])
        return nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[:, 1:].flatten()
        )


def batch(step: int, vocab: int = 64, size: int = 8, seq: int = 16) -> Tensor:
    """Sequences following ``t[i+1] = (3 t[i] + 1) mod vocab``, seeded by ``step``."""
    gen = torch.Generator().manual_seed(step)
    tokens = [torch.randint(0, vocab, (size,), generator=gen)]
    for _ in range(seq):
        tokens.append((3 * tokens[-1] + 1) % vocab)
    return torch.stack(tokens, dim=1)
