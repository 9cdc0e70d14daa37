"""The package's CUDA host code, run on fake CUDA tensors (a script, not a test module).

``tests/test_cuda_host.py`` runs it in a subprocess, because the stand-ins it installs
(``benchmarks.gpu_standins``) are process-wide, and reads the JSON it prints: one entry
per check, each the facts the test asserts. No kernel runs; what runs is the host
code around them, on tensors that say ``device='cuda'``:

- ``host``: float hyper-parameters of a few groups reach an uncaptured step as 0-d
  host tensors, copied nowhere (Note [host hypers]);
- ``pinned``: with more groups, a float lr changed by a scheduler is refreshed through
  pinned memory (``HyperTable.tensor``: ``pin_memory`` then a non-blocking
  host-to-device copy), and a device lr tensor by a copy on the device into a view of
  the table (capturable; Note [tensor hyper refresh]).
- ``state``: state on the device, ``step`` included (capturable).
- ``amp_clip``: a GradScaler's scale and inf flag on the device, and clipping, whose
  norm stays on the device.
- ``capture_guard``: ``hyper_values`` refuses to run while a CUDA graph captures, and
  so does the step of an optimizer that is not capturable.
- ``direct``: a steady call site calls its compiled CUDA graph directly, with the
  inputs Dynamo's path gave it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from benchmarks import gpu_standins


def _counted(cls: type, name: str, fake: Any = None) -> list[tuple[Any, ...]]:
    """Replace method ``cls.name`` by one that records its calls' arguments (and
    calls ``fake`` instead of it for fake tensors, where given)."""
    original = getattr(cls, name)
    calls: list[tuple[Any, ...]] = []

    def method(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        if fake is not None and isinstance(args[0], FakeTensor):
            return fake(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(cls, name, method)
    return calls


def _tensor_on_cuda() -> None:
    """``torch.tensor(data, device='cuda')`` makes a real CUDA tensor even under a
    fake mode: make it on the CPU, then copy it into a fake CUDA tensor."""
    original = torch.tensor

    def tensor(data: Any, *args: Any, device: Any = None, **kwargs: Any) -> Any:
        if device is not None and torch.device(device).type == "cuda":
            host = original(data, *args, **kwargs)
            out = torch.empty(host.shape, dtype=host.dtype, device=device)
            return torch.ops.aten.copy_.default(out, host)  # not counted below
        return original(data, *args, device=device, **kwargs)

    torch.tensor = tensor  # type: ignore[assignment]


def _params(mode: FakeTensorMode) -> list[torch.nn.Parameter]:
    import umup_compile as uc

    with mode:
        params = []
        # 40 small ones make a pack (past FOLD_SMALL_MAX), the large one a unit
        shapes = [((64, 32), "weight"), ((32,), "norm"), ((20000,), "weight")]
        for shape, tag in shapes + [((16, 16), "weight")] * 40:
            p = uc.Parameter(torch.randn(shape, device="cuda"), tag, None)
            p.grad = torch.randn(shape, device="cuda")
            params.append(p)
    return params


def pinned_and_state(capturable: bool, groups: int = 1) -> dict[str, Any]:
    """Three steps under a LambdaLR; capturable: the compiled engine (which runs
    eagerly under the fake mode) with its layouts (a pack and a unit). ``groups``:
    the parameters split into that many param groups."""
    from umup_compile import _prologue
    from umup_compile.optim import Adam

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    params = _params(mode)
    # a fake tensor has no memory to pin: pinning returns it (the stand-in)
    pin = _counted(torch.Tensor, "pin_memory", fake=lambda t: t)
    copy = _counted(torch.Tensor, "copy_")
    index_put = _counted(torch.Tensor, "index_put_")
    per_param = _prologue._per_param
    seen: list[Any] = []  # what the update read its hyper-parameters from

    def recorded(hyper_t: Any, *rest: torch.Tensor) -> Any:
        if isinstance(hyper_t, torch.Tensor):
            seen.append(f"tensor:{hyper_t.device.type}")
        else:  # Note [host hypers]: rows of 0-d host tensors, one per group
            seen.append(
                [sorted({f"{t.device.type}:{t.ndim}" for t in row}) for row in hyper_t]
            )
        return per_param(hyper_t, *rest)

    _prologue._per_param = recorded
    with mode:
        split = [params[k::groups] for k in range(groups)]
        opt = Adam(
            [{"params": ps} for ps in split],
            lr=1e-3,
            capturable=capturable,
            compile=capturable,
        )
        if capturable:  # a device lr (validated on the host at construction)
            opt.param_groups[0]["lr"] = torch.full((), 1e-3, device="cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k))
        for _ in range(3):
            opt.step()
            sched.step()
    _prologue._per_param = per_param
    host_to_device = [  # the package's own (the stand-in's are not counted)
        kw.get("non_blocking", a[2] if len(a) > 2 else False)
        for a, kw in copy
        if a[0].device.type == "cuda" and a[1].device.type == "cpu"
    ]
    return {
        "pin_memory": len(pin),
        "host_to_device_copies": len(host_to_device),
        "all_non_blocking": all(host_to_device),
        "index_put_on_device": sum(a[0].device.type == "cuda" for a, _ in index_put),
        # a 0-d view of the table written from a device tensor: the lr tensor
        "device_copies_into_table": sum(
            a[0].device.type == "cuda" and a[1].device.type == "cuda" and a[0].ndim == 0
            for a, _ in copy
        ),
        "state_devices": sorted(
            {f"{k}:{v.device.type}" for s in opt.state.values() for k, v in s.items()}
        ),
        "hypers_seen": seen,
    }


def amp_and_clip() -> dict[str, Any]:
    """A GradScaler's device tensors and global-norm clipping (compiled engine,
    eager under the fake mode: the clip's one-device path)."""
    from umup_compile.optim import Adam

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    params = _params(mode)
    with mode:
        opt = Adam(params, lr=1e-3, max_grad_norm=1.0)
        opt.grad_scale = torch.full((), 1024.0, device="cuda")  # type: ignore[attr-defined]
        opt.found_inf = torch.zeros((), device="cuda")  # type: ignore[attr-defined]
        for _ in range(2):
            opt.step()
    norm = opt.last_grad_norm
    return {"norm_device": None if norm is None else norm.device.type}


def capture_guard() -> dict[str, Any]:
    from umup_compile import _hypers

    body = getattr(_hypers._hyper_values, "_init_fn", None)
    if body is None:  # torch without CustomOpDef._init_fn
        return {"skipped": "CustomOpDef._init_fn is missing"}
    with FakeTensorMode():
        anchor = torch.empty(0, device="cuda", dtype=torch.float64)
    from umup_compile.optim import Adam

    opt = Adam(
        [torch.nn.Parameter(torch.zeros(2))],
        lr=1e-3,
        allow_non_unit_scaling_params=True,
    )
    key = opt._runner.hypers._key  # type: ignore[attr-defined]
    capturing = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: True
    out: dict[str, Any] = {"raised": None, "step_raised": None}
    try:
        body(anchor, key, 1, 5)
    except RuntimeError as e:
        out["raised"] = str(e)
    # the optimizer itself refuses a capture of a step that is not capturable (its
    # hyper-parameters may come from the host: Note [host hypers])
    built, initialized = torch.backends.cuda.is_built, torch.cuda.is_initialized
    torch.backends.cuda.is_built = lambda: True
    torch.cuda.is_initialized = lambda: True
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    try:
        opt.step()
    except RuntimeError as e:
        out["step_raised"] = str(e)
    out["param_unchanged"] = bool((p == 0).all())
    torch.backends.cuda.is_built = built
    torch.cuda.is_initialized = initialized
    torch.cuda.is_current_stream_capturing = capturing
    return out


def direct_calls() -> dict[str, Any]:
    from benchmarks import gpu_lower
    from umup_compile._direct import Site
    from umup_compile._engine import CompiledEngine

    def update(xs: list[torch.Tensor], ys: list[torch.Tensor], *, config: Any) -> None:
        for x, y in zip(xs, ys):
            x.mul_(0.5).add_(y)

    with FakeTensorMode():
        xs = [torch.zeros(8, device="cuda"), torch.zeros(3, 4, device="cuda")]
        ys = [torch.ones(8, device="cuda"), torch.ones(3, 4, device="cuda")]
    engine = CompiledEngine(strict=True, backend=gpu_lower._backend(False))
    site = Site()
    record = gpu_standins.RECORD = gpu_standins.Lowered()
    for _ in range(2):
        engine(update, (xs, ys), {"config": ()}, "test", True, site)
    first, second = record.inputs
    return {
        "direct_calls": site.direct_calls,
        "graphs": len(record.sources),
        "same_inputs": len(first) == len(second)
        and all(a is b for a, b in zip(first, second)),
    }


def main() -> None:
    gpu_standins.install()
    _tensor_on_cuda()
    checks = {
        "direct": direct_calls,
        "host": lambda: pinned_and_state(False, groups=2),
        "pinned": lambda: pinned_and_state(False, groups=5),
        "capturable": lambda: pinned_and_state(True),
        "capture_guard": capture_guard,
        "amp_clip": amp_and_clip,
    }
    names = sys.argv[1:] or list(checks)
    print(json.dumps({name: checks[name]() for name in names}))


if __name__ == "__main__":
    main()
