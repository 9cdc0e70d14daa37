"""Clipping a prepared step: global-norm clipping folded into its works' divisors.

The math is ``_clip``'s (Note [fused clipping]); this module applies it to a step's
:class:`~umup_compile._prepare.Work` list: the norm of the gradients the works are
about to read, then the divisor each work's update divides its gradients by (its
``grad_scale_t``). With the compiled engine on one device everything after the
per-tensor norms is one compiled call with a direct-call site of its own; sharded,
multi-device and eager steps compute it eagerly.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ._clip import (
    accumulate_dtype,
    clip_divisors,
    coefficient_into,
    norm_dtype,
    sharded_squared_norm,
    squared_norm,
    tensor_norms,
)
from ._direct import Site
from ._engine import Engine
from ._prepare import Work


class StepClip:
    """The clipping threshold, the last step's norm, and the compiled call's site."""

    def __init__(self) -> None:
        self.max_grad_norm: float | None = None
        self.last_grad_norm: Tensor | None = None
        # max_grad_norm as a tensor, for the compiled engine (see _compiled)
        self._max_norm_t: tuple[float, Tensor] | None = None
        self.site = Site()

    def new_site(self) -> None:
        """A gather rebuilt the step's calls: so is the clip call's (Call.site)."""
        self.site = Site()

    def __call__(
        self,
        works: list[Work],
        amp: dict[torch.device, dict[str, Any]],
        engine: Engine | None,
    ) -> None:
        """Fold clipping into the works' gradient divisors; record the norm.

        ``engine``: the compiled engine to run the coefficient with (None: eagerly).
        """
        if self.max_grad_norm is None:
            return
        if not works:
            self.last_grad_norm = torch.zeros(())
            return
        if (
            engine is not None
            and engine.packs
            and len(amp) == 1
            and all(w.call is not None and w.sharded is None for w in works)
        ):
            self._compiled(works, amp, self.max_grad_norm, engine)
            return
        squares = []
        for work in works:
            if work.sharded is not None:
                squares.append(sharded_squared_norm(work.grads, work.sharded))
            else:
                squares.append(squared_norm(work.grads))
        scales = {d: kw.get("grad_scale_t") for d, kw in amp.items()}
        dtype = functools.reduce(
            torch.promote_types,
            (g.dtype for w in works for g in w.grads),
            torch.float32,
        )
        divisors, self.last_grad_norm = clip_divisors(
            squares, self.max_grad_norm, scales, dtype
        )
        for work in works:
            work.kwargs["grad_scale_t"] = divisors[work.device]

    def _compiled(
        self,
        works: list[Work],
        amp: dict[torch.device, dict[str, Any]],
        max_norm: float,
        engine: Engine,
    ) -> None:
        """One device, compiled engine: the per-tensor norms eagerly (one
        ``_foreach_norm``), the rest one compiled call."""
        ((device, amp_kw),) = amp.items()
        norms = tensor_norms([g for w in works for g in w.grads])
        cached = self._max_norm_t
        if cached is None or cached[0] != max_norm or cached[1].device != device:
            # full, not tensor: a fill kernel, no host copy (capture-safe); in the
            # dtype the norms are summed in (Note [norm precision])
            value = torch.full(
                (), max_norm, dtype=accumulate_dtype(device), device=device
            )
            cached = self._max_norm_t = (max_norm, value)
        dtype = norm_dtype(norms)
        # (1,), viewed as 0-d below: AOTAutograd drops a graph's write into a 0-d
        # float64 CPU input (torch 2.13: it takes those for wrapped numbers)
        divisor = torch.empty((1,), dtype=dtype, device=device)
        norm = torch.empty((1,), dtype=dtype, device=device)
        scale = amp_kw.get("grad_scale_t")
        engine(
            coefficient_into,
            (norms, cached[1], divisor, norm),
            {"config": (), "grad_scale_t": scale},
            f"clip{len(norms)}",
            True,
            self.site,
        )
        self.last_grad_norm = norm.view(())
        for work in works:
            work.kwargs["grad_scale_t"] = divisor.view(())
