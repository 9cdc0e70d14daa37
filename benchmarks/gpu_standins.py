"""Stand-ins that let Inductor lower graphs for an sm_90 GPU on a machine without one.

Used by ``benchmarks.gpu_codegen`` in a subprocess of its own: every stand-in is
process-wide (``torch.cuda.is_available``, ``Tensor.copy_``) and none is undone.
Nothing here compiles or launches a kernel on a device; Inductor writes its Python
wrapper and Triton sources, and stops before it imports them.

Private APIs read or replaced (each looked up first; :func:`install` raises
:class:`StandInError` naming the one that is missing, and the tool reports it
instead of guessing):

- ``torch.cuda.{is_available, device_count, current_device, get_device_capability,
  get_device_properties, get_rng_state, set_rng_state, _exchange_device,
  _maybe_exchange_device}``: a CPU-only wheel has no CUDA runtime to ask.
- ``torch._dynamo.device_interface``: ``CudaInterface``'s static methods and the
  worker caches of device properties and current device (Inductor reads the SM
  count, warp size and registers per SM from there).
- ``torch._C._cuda_cudaCachingAllocator_is_enabled`` (Inductor's cudagraph check)
  and ``torch._C._cuda_getCurrentRawStream`` (imported by generated modules).
- ``Tensor.copy_`` and ``Tensor.__invert__``: their hand-written Python bindings
  enter a CUDA device guard, which a CPU-only build cannot make; for CUDA tensors
  (only ever fake here) the stand-ins call the aten op directly.
- ``torch._inductor.fx_passes.joint_graph.lazy_init``: its pattern inits trace
  attention/padding patterns with real tensors on the graph's device; they are traced
  on the CPU instead (none of them matches an optimizer step). Likewise
  ``joint_graph.UniformValueConstantFolder.run`` evaluates constants on the CPU.
- Triton's active driver: a stand-in whose target is ``GPUTarget("cuda", 90, 32)``.
- ``umup_compile._engine.cuda_driver_version``: :data:`DRIVER`, a driver with 32 KB
  kernel arguments (as the torch fused launches counted beside ours assume).
- ``PyCodeCache.load_by_key_path`` (the generated module is recorded, not imported)
  and ``output_code.cudagraph_post_compile`` / ``cudagraph_partition_post_compile``
  (recorded, not run: see :class:`Lowered`).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# H100 SXM5 80GB (sm_90): what Inductor reads from the device properties.
H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (stand-in)",
    major=9,
    minor=0,
    multi_processor_count=132,
    total_memory=80 * 2**30,
    max_threads_per_multi_processor=2048,
    max_threads_per_block=1024,
    warp_size=32,
    regs_per_multiprocessor=65536,
    shared_memory_per_block=48 * 1024,
    shared_memory_per_block_optin=227 * 1024,
    shared_memory_per_multiprocessor=228 * 1024,
    L2_cache_size=50 * 2**20,
    clock_rate=1_980_000,
    memory_clock_rate=2_619_000,
    memory_bus_width=5120,
    gcnArchName="",
    uuid="00000000-0000-0000-0000-000000000000",
    is_integrated=False,
)
ARCH = 90
DRIVER = 12080  # CUDA 12.8's driver API version (r570): 32 KB kernel arguments


class StandInError(RuntimeError):
    """A hook this module replaces is missing from this torch/Triton."""


@dataclass
class Lowered:
    """What one compile left behind: the generated wrapper source(s) and the
    cudagraph checks Inductor made (the post-compile it would have run)."""

    sources: list[str] = field(default_factory=list)
    cudagraphs: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[list[Any]] = field(default_factory=list)  # what each ``call`` got


RECORD = Lowered()  # filled by the stand-ins; the caller swaps it per lowering


def _require(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        raise StandInError(f"{getattr(obj, '__name__', obj)}.{name} is missing")
    return getattr(obj, name)


def _cuda_runtime() -> None:
    cuda = torch.cuda
    for name in (
        "is_available",
        "device_count",
        "current_device",
        "get_device_capability",
        "get_device_properties",
        "get_rng_state",
        "set_rng_state",
        "_exchange_device",
        "_maybe_exchange_device",
    ):
        _require(cuda, name)
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.get_device_capability = lambda device=None: (H100.major, H100.minor)
    cuda.get_device_properties = lambda device=None: H100
    # Dynamo saves and restores the RNG state around each frame it traces.
    cuda.get_rng_state = lambda device="cuda": torch.zeros(16, dtype=torch.uint8)
    cuda.set_rng_state = lambda new_state, device="cuda": None
    cuda._exchange_device = lambda device: 0
    cuda._maybe_exchange_device = lambda device: 0
    torch._C._cuda_cudaCachingAllocator_is_enabled = lambda: True
    # imported by every generated kernel module (and its wrapper)
    torch._C._cuda_getCurrentRawStream = lambda device: 0


def _device_interface() -> None:
    import torch._dynamo.device_interface as di

    cls = _require(di, "CudaInterface")
    _require(di, "caching_worker_device_properties")["cuda"] = [H100]
    _require(di, "caching_worker_current_devices")["cuda"] = 0
    for name, fn in (
        ("get_device_properties", lambda device=None: H100),
        ("current_device", lambda: 0),
        ("device_count", lambda: 1),
        ("is_available", lambda: True),
        ("synchronize", lambda device=None: None),
        ("exchange_device", lambda device: 0),
        ("maybe_exchange_device", lambda device: 0),
    ):
        _require(cls, name)
        setattr(cls, name, staticmethod(fn))


def _on_cuda(*tensors: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tensors)


def _bindings() -> None:
    """Hand-written Python bindings that enter a device guard (a CPU-only build has
    none for CUDA) call the aten op directly for CUDA tensors."""
    tensor = torch.Tensor
    copy, invert = tensor.copy_, tensor.__invert__

    def copy_(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> Any:
        if _on_cuda(self, src):
            return torch.ops.aten.copy_.default(self, src, non_blocking)
        return copy(self, src, non_blocking)

    def __invert__(self: torch.Tensor) -> Any:  # noqa: N807
        if _on_cuda(self):
            return torch.ops.aten.bitwise_not.default(self)
        return invert(self)

    getitem = tensor.__getitem__

    def __getitem__(self: torch.Tensor, index: Any) -> Any:  # noqa: N807
        if not _on_cuda(self):
            return getitem(self, index)
        return _index(self, index if isinstance(index, tuple) else (index,))

    tensor.copy_ = copy_  # type: ignore[method-assign,assignment]
    tensor.__invert__ = __invert__  # type: ignore[method-assign,assignment]
    tensor.__getitem__ = __getitem__  # type: ignore[method-assign,assignment]


def _index(t: torch.Tensor, index: tuple[Any, ...]) -> torch.Tensor:
    """Indexing with ints, slices, None, ``...`` and one index tensor, through aten
    ops."""
    aten = torch.ops.aten
    if sum(isinstance(i, torch.Tensor) for i in index) > 1:
        raise StandInError("indexing a fake CUDA tensor with several index tensors")
    consumed = sum(
        (i.ndim if i.dtype == torch.bool else 1) if isinstance(i, torch.Tensor) else 1
        for i in index
        if i is not None and i is not Ellipsis
    )
    if Ellipsis in index:
        k = index.index(Ellipsis)
        fill = (slice(None),) * (t.ndim - consumed)
        index = index[:k] + fill + index[k + 1 :]
    dim = 0
    for i in index:
        if i is None:
            t = aten.unsqueeze.default(t, dim)
            dim += 1
        elif isinstance(i, (int, torch.SymInt)) and not isinstance(i, bool):
            t = aten.select.int(t, dim, i)
        elif isinstance(i, slice):
            t = aten.slice.Tensor(t, dim, i.start, i.stop, i.step or 1)
            dim += 1
        elif isinstance(i, torch.Tensor):
            t = aten.index.Tensor(t, [None] * dim + [i])
            dim += 1 if i.dtype == torch.bool else i.ndim
        else:
            raise StandInError(f"indexing a fake CUDA tensor with {i!r}")
    return t


def _pattern_inits() -> None:
    import torch._inductor.fx_passes.joint_graph as joint_graph

    original = _require(joint_graph, "lazy_init")

    def lazy_init(input_device: Any = None) -> Any:
        if input_device is not None and torch.device(input_device).type == "cuda":
            input_device = torch.device("cpu")
        return original(input_device)

    joint_graph.lazy_init = lazy_init

    # Constant folding evaluates small constant subgraphs with real tensors on the
    # graph's device, to read their values: on the CPU here (the folded value is the
    # same; the replacement takes its device from the node's fake value).
    folder = _require(joint_graph, "UniformValueConstantFolder")
    run = folder.run

    def run_on_cpu(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _CudaOnCpu():
            return run(self, *args, **kwargs)

    folder.run = run_on_cpu


class _CudaOnCpu(TorchDispatchMode):
    """Runs ops asked for on CUDA on the CPU instead (real tensors only)."""

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = torch.device("cpu")
        return func(*args, **kwargs)


class _Driver:
    """Triton's driver, as far as code generation asks it: the target."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", ARCH, 32)

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda", 0)

    def get_device_interface(self) -> Any:
        return torch.cuda

    def is_active(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"the Triton driver stand-in has no {name}")


def _triton_driver() -> None:
    try:
        from triton.runtime import driver
    except ImportError as e:
        raise StandInError(f"Triton is not importable: {e}") from e
    _require(driver, "set_active")(_Driver())


def _module_load() -> None:
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.graph import GraphLowering

    _require(GraphLowering, "save_output_code")
    GraphLowering.save_output_code = staticmethod(  # type: ignore[assignment]
        lambda code: RECORD.sources.append(code)
    )
    _require(PyCodeCache, "load_by_key_path")

    def load_by_key_path(key: str, path: str, *args: Any, **kwargs: Any) -> Any:
        module = types.ModuleType(f"not_imported_{key}")
        module.__file__ = path

        def call(args: list[Any]) -> list[Any]:  # records its inputs, runs nothing
            RECORD.inputs.append(list(args))
            args.clear()
            return []

        module.call = call  # type: ignore[attr-defined]
        return module

    PyCodeCache.load_by_key_path = staticmethod(load_by_key_path)  # type: ignore[assignment]


def _cudagraph_record(
    example_inputs: Any,
    compiled_graph: Any,
    cudagraphs: Any,
    constants: Any,
    boxed_forward_device_index: Any,
) -> None:
    info = compiled_graph.cudagraph_info
    runner = getattr(compiled_graph, "compiled_fn_runner", None)
    RECORD.cudagraphs.append(
        {
            "fail_reasons": list(info.cudagraph_fail_reasons) if info else None,
            "disabled_reason": compiled_graph.disabled_cudagraphs_reason,
            "partitions": len(getattr(runner, "partitions", ()) or ()),
            "mutated_inputs": sorted(compiled_graph.mutated_input_idxs),
            "static_inputs": list(
                compiled_graph.fx_kwargs.get("static_input_idxs") or ()
            ),
        }
    )


def _cudagraph_post_compile() -> None:
    import torch._inductor.output_code as output_code

    names = ("cudagraph_post_compile", "cudagraph_partition_post_compile")
    found = [name for name in names if hasattr(output_code, name)]
    if not found:  # torch 2.13 has both; older ones the first
        raise StandInError("torch._inductor.output_code has no cudagraph_post_compile")
    for name in found:
        setattr(output_code, name, _cudagraph_record)


def _cuda_driver() -> None:
    from umup_compile import _engine

    _require(_engine, "cuda_driver_version")
    _engine.cuda_driver_version = lambda: DRIVER  # type: ignore[assignment]
    _require(_engine, "_combo_kernels").cache_clear()


def _inductor_config() -> None:
    import torch._inductor.config as config

    config.benchmark_kernel = True  # every kernel carries its kernel_num_gb
    config.fx_graph_cache = False  # lower every time: the sources are the result
    config.autotune_local_cache = False
    # No compile workers: they would build kernels for a driver they do not have
    # (and under TRITON_INTERPRET, import the module that is never written).
    config.compile_threads = 1


# (name, installer, needed only without a device)
STAND_INS: tuple[tuple[str, Callable[[], None], bool], ...] = (
    ("cuda runtime", _cuda_runtime, True),
    ("device interface", _device_interface, True),
    ("Tensor bindings", _bindings, True),
    ("pattern inits", _pattern_inits, True),
    ("triton driver", _triton_driver, True),
    ("cuda driver version", _cuda_driver, True),
    ("module load", _module_load, False),
    ("cudagraph post-compile", _cudagraph_post_compile, False),
    ("inductor config", _inductor_config, False),
)


def device_present() -> bool:
    """Whether a real CUDA device is there (then only the recording stand-ins,
    which keep the generated module from running on fake inputs, are installed)."""
    return torch.version.cuda is not None and torch.cuda.is_available()


def install() -> list[str]:
    """Install the stand-ins this machine needs (once per process); return their
    names.

    Raises:
        StandInError: a hook is missing; the message names it.
    """
    done: list[str] | None = getattr(install, "done", None)
    if done is not None:
        return done
    real = device_present()
    names = []
    for name, fn, fake_only in STAND_INS:
        if fake_only and real:
            continue
        fn()
        names.append(name)
    install.done = names  # type: ignore[attr-defined]
    return names
