"""Gloo CPU processes for test bodies (2 by default); single-process reference runs.

:func:`launch` starts ``WORLD_SIZE`` processes (or ``world_size``); they meet through a
file in a fresh temporary folder (no port to race for) and run ``body(rank, *args)``.
An exception in any rank fails the test with its traceback. The processes fork from a
forkserver that has imported torch and this module once per test session: a launch
then costs ~0.2 s instead of a fresh interpreter importing torch per rank (a 2-rank
launch took 20-23 s on the shared 2-core machine, ~12 s of CPU; this suite's CPU time
went from 315 s to 118 s). The ranks inherit the environment of the first launch.

Every rank trains on its slice of the same global batch; :func:`train_reference` trains
the same model on the whole batch in one process. Losses are means and DDP/FSDP2 average
gradients over ranks, so both see the same gradient up to float rounding.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._inductor.config
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from tests.helpers import TOLERANCES, ToyUmupNet, use_backend
from umup_compile.distributed import keep_tags
from umup_compile.optim import SGD, Adam, AdamW

WORLD_SIZE = 2
GLOBAL_BATCH = 8
SEQ = 4
# Odd sizes: FSDP2 shards dim 0 unevenly (embed 33 rows -> 17 + 16, bias 15 -> 8 + 7),
# so a factor taken from a local shard's shape could not pass for the global one.
VOCAB, WIDTH, DEPTH = 33, 15, 2

# (id, class, kwargs): one case per algorithm and per state layout.
OPTIMIZERS: list[tuple[str, type[torch.optim.Optimizer], dict[str, Any]]] = [
    ("adam", Adam, {"lr": 0.02}),
    ("adamw_amsgrad", AdamW, {"lr": 0.02, "weight_decay": 0.1, "amsgrad": True}),
    (
        "sgd_momentum",
        SGD,
        {"lr": 0.01, "momentum": 0.9, "readout_constraint": "to_output_scale"},
    ),
]

# engine id -> (compile backend or None for compile=False, dtype of the run)
ENGINES: dict[str, tuple[str | None, torch.dtype]] = {
    "eager": (None, torch.float64),
    "aot_eager": ("aot_eager", torch.float32),
    "inductor": ("inductor", torch.float32),
}

# FSDP2 in CPU processes records events on the CPU stream, which torch 2.6 cannot
# (no torch.cpu.Stream.record_event; it came with 2.7): those tests skip there.
needs_fsdp2_on_cpu = pytest.mark.skipif(
    not hasattr(torch.cpu.current_stream(), "record_event"),
    reason="FSDP2 in CPU (gloo) processes needs torch >= 2.7 "
    "(torch.cpu.Stream.record_event)",
)

Snapshot = dict[str, Tensor]
Body = Callable[..., None]


def launch(body: Body, *args: Any, world_size: int = WORLD_SIZE) -> None:
    """Run ``body(rank, *args)`` in ``world_size`` gloo processes; re-raise failures."""
    # Takes effect when the forkserver starts (the first launch of the session).
    multiprocessing.set_forkserver_preload([__name__])
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _run_rank,
            args=(body, os.path.join(tmp, "rendezvous"), world_size, args),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )


def _run_rank(
    rank: int, body: Body, init_file: str, world_size: int, args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(1)  # 2 processes share the CPU cores
    # Compile in this process: a pool of compile workers per rank costs more than the
    # few small kernels it would build in parallel.
    torch._inductor.config.compile_threads = 1
    # A private Inductor cache per rank: two ranks compiling the same graph at once
    # must not write and load the same cached artifacts (crashes seen under load).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        os.path.dirname(init_file), f"inductor_rank{rank}"
    )
    torch.manual_seed(0)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        body(rank, *args)
        # Neither rank tears gloo down while the other still talks to it (a rank
        # then aborted with "terminate called without an active exception"). On a
        # failure there is no barrier: spawn ends the other rank.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_model(dtype: torch.dtype, seed: int = 0) -> ToyUmupNet:
    """The tagged toy model, identical on every rank for a given seed."""
    torch.manual_seed(seed)
    return ToyUmupNet(VOCAB, WIDTH, DEPTH).to(dtype)  # .to keeps the Parameter objects


def make_sharded_model(dtype: torch.dtype, seed: int = 0) -> ToyUmupNet:
    """:func:`make_model` under FSDP2 (parameters sharded on dim 0), tags restored."""
    model = make_model(dtype, seed)
    with keep_tags(model):
        fully_shard(model)
    return model


def make_optimizer(
    model: nn.Module, engine: str, cls: type[torch.optim.Optimizer], **kwargs: Any
) -> torch.optim.Optimizer:
    """Build ``cls`` over ``model.named_parameters()`` on the given engine."""
    backend, _ = ENGINES[engine]
    opt = cls(model.named_parameters(), compile=backend is not None, **kwargs)
    if backend is not None:
        use_backend(opt, backend)  # strict: a compile failure raises, never falls back
    return opt


def batch(
    step: int, rank: int | None = None, shares: int = WORLD_SIZE
) -> tuple[Tensor, Tensor]:
    """Step ``step``'s global batch, or share ``rank`` of its ``shares`` equal ones."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
    if rank is None:
        return tokens, targets
    share = GLOBAL_BATCH // shares
    rows = slice(rank * share, (rank + 1) * share)
    return tokens[rows], targets[rows]


def full(t: Tensor) -> Tensor:
    """A detached copy of the whole tensor (gathers a DTensor: collective)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().clone()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> Snapshot:
    """Every parameter and optimizer state tensor, whole, keyed by parameter name."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = full(p)
        for key, value in sorted(opt.state.get(p, {}).items()):
            if isinstance(value, Tensor):
                out[f"{name}/{key}"] = full(value)
    return out


def train(
    forward: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    rank: int | None = None,
    shares: int = WORLD_SIZE,
) -> list[Snapshot]:
    """Train on each step's batch (share ``rank``, or all); snapshot after every step.

    ``forward`` is what is called (a DDP wrapper, or the model); ``model`` is what is
    snapshotted.
    """
    out = []
    for step in steps:
        tokens, targets = batch(step, rank, shares)
        logits = forward(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(snapshot(model, opt))
    return out


def train_reference(
    dtype: torch.dtype,
    cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    steps: int,
    make: Callable[[torch.dtype], nn.Module] = make_model,
) -> list[Snapshot]:
    """Single-process training of the same model (``make(dtype)``) on the whole
    global batch.

    It runs eagerly: the engines agree to rounding (tests/test_engine.py), and each
    rank is spared a second compile.
    """
    model = make(dtype)
    opt = make_optimizer(model, "eager", cls, **kwargs)
    return train(model, model, opt, range(steps))


def assert_snapshots_close(
    got: list[Snapshot], want: list[Snapshot], dtype: torch.dtype, what: str
) -> None:
    """Every tensor of every step agrees within ``TOLERANCES[dtype]``."""
    assert len(got) == len(want), (what, len(got), len(want))
    for step, (g, w) in enumerate(zip(got, want)):
        assert list(g) == list(w), (what, step, list(g), list(w))
        for key in w:
            torch.testing.assert_close(
                g[key],
                w[key],
                **TOLERANCES[dtype],
                msg=lambda m, key=key, step=step: f"{what}, step {step}, {key}: {m}",
            )
