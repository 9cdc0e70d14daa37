"""Lower recorded engine calls for CUDA and read what Inductor generated.

Each distinct call of a step (``gpu_record.Call``: function, config, kind, and its
arguments' shapes, strides and dtypes) is rebuilt as fake CUDA tensors and run through
a fresh ``umup_compile._engine.CompiledEngine``: the package's own path, so the config
binding, ``fullgraph=True``, the dynamic first dimensions (``maybe_mark_dynamic``, no
duck shaping), the codegen hints and the Inductor options are exactly the engine's.
One option is added: ``triton.cudagraphs``, so that Inductor makes its cudagraph
checks (recorded by ``gpu_standins``, not acted on). Inductor then runs in full
(Dynamo, AOTAutograd, the joint and post-grad passes, scheduling, Triton codegen for
sm_90); the wrapper source is recorded and never imported.

:func:`read_wrapper` reads a wrapper: its Triton kernels (with ``kernel_num_gb``, the
bytes Inductor counts for one launch), the launches its ``call`` makes, and anything
that is not a Triton kernel: extern/aten fallbacks and host syncs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import gpu_standins
from benchmarks.gpu_record import Call, TensorSpec

_KERNEL = re.compile(
    r"^(\w+) = async_compile\.triton\('(\w+)', '''(.*?)''', device_str='(\w+)'\)",
    re.S | re.M,
)
_LAUNCH = re.compile(r"^\s+(\w+)\.run\(", re.M)
_NUM_GB = re.compile(r"'kernel_num_gb': ([0-9.eE+-]+)")
_HEURISTIC = re.compile(r"@triton_heuristics\.(\w+)\(")
# Calls in a wrapper's body that are neither a Triton launch nor bookkeeping.
_FALLBACK = re.compile(
    r"\b(extern_kernels\.\w+|aten\.\w+(?:\.\w+)?|torch\.ops\.\w+\.\w+)\("
)
_SYNC = re.compile(
    r"\.item\(\)|\.cpu\(\)|\.tolist\(\)|synchronize\(|_local_scalar_dense"
)
# A graph's inputs on the host (its ``get_args``): a 0-d one is a kernel argument,
# read with ``.item()`` from host memory (Note [host hypers]), not a sync.
_HOST_INPUT = re.compile(r"^\s*(\w+) = rand_strided\(\(\), .*device='cpu'", re.M)


@dataclass
class Kernel:
    """One Triton kernel of a wrapper."""

    name: str
    heuristic: str  # pointwise, reduction, persistent_reduction, foreach, ...
    num_gb: float  # Inductor's bytes per launch / 1e9
    launches: int  # in one call of the wrapper
    source: str


@dataclass
class Wrapper:
    """What one generated wrapper does per call."""

    kernels: list[Kernel]
    fallbacks: list[str]
    host_syncs: list[str]
    cpu_buffers: int  # CPU allocations in a CUDA graph's wrapper

    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.kernels) + len(self.fallbacks)

    @property
    def bytes(self) -> float:
        return sum(k.num_gb * 1e9 * k.launches for k in self.kernels)


def read_wrapper(source: str) -> Wrapper:
    """The kernels, launches, fallbacks and host syncs of a wrapper source."""
    kernels = {}
    for match in _KERNEL.finditer(source):
        name, _, body, _ = match.groups()
        gb = _NUM_GB.search(body)
        heuristic = _HEURISTIC.search(body)
        kernels[name] = Kernel(
            name,
            heuristic.group(1) if heuristic else "?",
            float(gb.group(1)) if gb else float("nan"),
            0,
            body,
        )
    body = _KERNEL.sub("", source)
    # The module's own tail (get_args, benchmark_compiled_module, __main__) only
    # runs as a script: read the code that ``call`` reaches.
    body = body.split("\ndef get_args(")[0] if "class Runner" not in body else body
    body = re.split(r"\ndef benchmark_compiled_module\(", body)[0]
    for name in _LAUNCH.findall(body):
        if name in kernels:
            kernels[name].launches += 1
    reads = body
    for name in _HOST_INPUT.findall(source):
        reads = reads.replace(f"{name}.item()", f"{name}")
    return Wrapper(
        list(kernels.values()),
        _FALLBACK.findall(body),
        _SYNC.findall(reads),
        body.count("empty_strided_cpu("),
    )


@dataclass
class Lowering:
    """One call lowered: its wrappers (one per compiled graph; one expected) and
    the cudagraph checks, or the error that stopped it."""

    call: Call
    sources: list[str] = field(default_factory=list)
    wrappers: list[Wrapper] = field(default_factory=list)
    cudagraphs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    host_sync_error: bool = False  # Dynamo met a value read on the host
    # per wrapper, where each input of its ``call`` comes from: ("arg", i[, j]),
    # ("kwarg", name[, j]) or ("int", value) (a size)
    inputs: list[list[tuple[Any, ...]]] = field(default_factory=list)


def _paths(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int, tuple[Any, ...]]:
    """Each tensor of a call's arguments, by id, with its place in them (rows of host
    hyper-parameters: two indices)."""
    out: dict[int, tuple[Any, ...]] = {}
    for where, key, value in [("arg", i, a) for i, a in enumerate(args)] + [
        ("kwarg", k, v) for k, v in kwargs.items()
    ]:
        if isinstance(value, torch.Tensor):
            out[id(value)] = (where, key)
        elif isinstance(value, (list, tuple)):
            for j, t in enumerate(value):
                out[id(t)] = (where, key, j)
                if isinstance(t, list):
                    for k, u in enumerate(t):
                        out[id(u)] = (where, key, j, k)
    return out


def pick(
    paths: list[tuple[Any, ...]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[Any]:
    """A wrapper's ``call`` inputs, taken from a call's arguments by :attr:`Lowering.inputs`."""
    out = []
    for path in paths:
        if path[0] == "int":
            out.append(path[1])
            continue
        value = args[path[1]] if path[0] == "arg" else kwargs[path[1]]
        for index in path[2:]:
            value = value[index]
        out.append(value)
    return out


def _fake(value: Any) -> Any:
    if isinstance(value, TensorSpec):
        size = value.offset + sum(
            (n - 1) * s for n, s in zip(value.shape, value.stride)
        )
        if value.host:  # Note [host hypers]: a 0-d CPU input of a CUDA graph
            return torch.empty(value.shape, dtype=value.dtype)
        base = torch.empty(size + 1, dtype=value.dtype, device="cuda")
        return base.as_strided(value.shape, value.stride, value.offset)
    if isinstance(value, (list, tuple)):
        return type(value)(_fake(v) for v in value)
    if isinstance(value, dict):
        return {k: _fake(v) for k, v in value.items()}
    return value


# Inductor options added to the engine's for an experiment (``--inductor-option``).
EXTRA: dict[str, Any] = {}


def _backend(dynamic: bool, cudagraphs: bool = True) -> Any:
    """The engine's Inductor backend for this call, plus the cudagraph checks
    (``cudagraphs``: a capturable step's; an uncaptured step is lowered as the engine
    compiles it, which keeps a 0-d host input a kernel argument, Note [host hypers],
    where the cudagraph passes would copy it to the device)."""
    from umup_compile import _engine

    backend = _engine._backend("inductor", dynamic)
    config = getattr(backend, "config", None)
    if not isinstance(config, dict):  # pragma: no cover - torch without the wrapper
        raise gpu_standins.StandInError("torch._TorchCompileInductorWrapper changed")
    backend.config = {**config, "triton.cudagraphs": cudagraphs, **EXTRA}
    return backend


def lower(call: Call, cudagraphs: bool = True) -> Lowering:
    """Lower one call through the compiled engine on fake CUDA tensors (with the
    cudagraph checks where ``cudagraphs``: see :func:`_backend`)."""
    from umup_compile._engine import CompiledEngine

    gpu_standins.install()
    record = gpu_standins.RECORD = gpu_standins.Lowered()
    with FakeTensorMode():
        args, kwargs = _fake(call.args), _fake(call.kwargs)
    engine = CompiledEngine(strict=True, backend=_backend(not call.static, cudagraphs))
    out = Lowering(call)
    try:
        engine(call.fn, args, kwargs, call.kind, call.static, None)
    except Exception as e:  # noqa: BLE001 - reported, with its class
        text = f"{type(e).__name__}: {e}"
        out.error = text[:3000]
        out.host_sync_error = "DataDependent" in text or "_local_scalar_dense" in text
    out.sources = list(record.sources)
    out.wrappers = [read_wrapper(s) for s in record.sources]
    out.cudagraphs = list(record.cudagraphs)
    at = _paths(args, kwargs)
    out.inputs = [
        [
            at.get(id(v), ("int", v) if isinstance(v, int) else ("?", repr(v)[:40]))
            for v in flat
        ]
        for flat in record.inputs
    ]
    return out
