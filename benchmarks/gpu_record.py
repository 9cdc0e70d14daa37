"""The calls an optimizer step makes for CUDA parameters, recorded on ``meta`` ones.

A real ``umup_compile`` optimizer steps over parameters on the ``meta`` device (no
memory, no values: gpt-1.2b's 1.2B elements cost nothing) with a :class:`Recorder` as
its engine (the ``Engine`` protocol: ``opt._engine = recorder``). The runner then makes
exactly the calls it would make on CUDA, through its own layout policy (pack, unrolled
unit, chunks), clip call and configs; the recorder keeps each call's function, kind,
static flag and its arguments' shapes, strides and dtypes, for ``gpu_lower`` to rebuild
as fake CUDA tensors. A dispatch mode (``gpu_cost.DeviceOps``) records what the step runs
on the device outside its graphs (the pack's copies, the clip's norms, the hyper-table
refresh); ``gpu_cost.device_cost`` turns each op into CUDA launches and bytes.

One stand-in, marked here: ``_gather.CAPTURABLE_DEVICES`` gains ``"meta"``, so that
``capturable=True`` is accepted as it is on CUDA. Two differences from CUDA, both
outside the graphs and accounted for: ``step`` lives on the CPU for meta parameters
(``_specs._step_device``; the lowering puts it on the device, as CUDA would), and the
hyper table's pinned host-to-device refresh is skipped on meta
(``_hypers.HyperTable.tensor``): :func:`record` adds it as one modeled copy whenever a
float hyper-parameter changed and the step did not take them from the host (Note [host
hypers]; ``_hypers.HOST_DEVICES`` gains ``"meta"`` too, so it does where CUDA would).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import umup_compile as uc
import umup_compile._gather as gather_module
from benchmarks import contestants, sets
from benchmarks.gpu_cost import DeviceOp, DeviceOps
from umup_compile import _hypers, _quant, _state8
from umup_compile._functional import ADAM_HYPERS
from umup_compile.optim import Adam

LR = contestants.LR
MAX_NORM = contestants.MAX_NORM


@dataclass(frozen=True)
class DType:
    """A parameter/state precision of the harness, and what one fused Adam pass must
    move (:meth:`ideal`)."""

    param: torch.dtype
    state: torch.dtype | None  # None: the parameter's; torch.int8: 8-bit moments
    stochastic_rounding: bool

    def ideal(self, numel: int) -> int:
        """The bytes one fused Adam pass must move for a parameter of ``numel``
        elements: read p, g, m, v; write p, m, v. With 8-bit state
        (``_state8``, Note [8-bit state]), a quantized parameter's m and v are 1-byte
        codes and each of its blocks of ``_quant.BLOCK`` elements has two float32
        scales, read and written (16 B per block); a parameter that keeps float32
        moments (:func:`keeps_float`) moves what float32 state moves."""
        p = self.param.itemsize
        if self.state == _state8.INT8:
            if not keeps_float(numel):
                return (3 * p + 4) * numel + 16 * _quant.num_blocks(numel)
            return (3 * p + 4 * 4) * numel
        return (3 * p + 4 * (self.state or self.param).itemsize) * numel

    def ideal_bytes(self, numels: Sequence[int]) -> int:
        """:meth:`ideal` summed over the parameters."""
        return sum(self.ideal(n) for n in numels)


def keeps_float(numel: int) -> bool:
    """Whether a workload's parameter of ``numel`` elements keeps float32 moments
    under ``state_dtype=torch.int8``: the workloads' parameters are contiguous
    float32/bf16 tensors, so only ``_state8.keeps_float``'s size rule applies
    (:func:`record` checks the optimizer's state against it)."""
    return numel < _state8.MIN_NUMEL


DTYPES = {
    "fp32": DType(torch.float32, None, False),  # 28 B per element
    "bf16-fp32state": DType(torch.bfloat16, torch.float32, False),  # 22
    "bf16-fp32state-sr": DType(torch.bfloat16, torch.float32, True),  # 22
    "bf16": DType(torch.bfloat16, None, False),  # 14
    # 8-bit moments: 4 + 4 + 4 + 2 + 2 B per element + 16 B per block of 128
    "int8-state": DType(torch.float32, torch.int8, False),
    # bf16 parameters, 8-bit moments, stochastic rounding: 6 + 4 B + 16 B per block
    "bf16-int8state-sr": DType(torch.bfloat16, torch.int8, True),
}

# Workloads: the harness's (sets.param_specs), plus a scaled-down GPT-like set
# that has both large and small tensors (unrolled unit + folded small ones) for CI
# and Triton's interpreter.
WORKLOADS = ("gpt", "gpt-124m", "gpt-1.2b", "many-small", "gpt-mini", "many-small-mini")


def workload_specs(name: str) -> list[Any]:
    """The parameter specs of a workload (``benchmarks.sets.ParamSpec``)."""
    if name == "gpt-mini":  # 15 tensors, 131,392 elements
        return list(sets.gpt_like_specs(d_model=64, n_layers=2, vocab=256))
    if name == "many-small-mini":  # 32 tensors of 1024: one pack
        return list(sets.many_small_specs(n=32, numel=1024))
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
    return list(sets.param_specs(name, smoke=False))


# -- what the step calls -------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument, without its values."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    host: bool = False  # a 0-d host tensor (Note [host hypers]), else on the device

    @staticmethod
    def of(t: torch.Tensor, host: bool = False) -> TensorSpec:
        return TensorSpec(tuple(t.shape), t.stride(), t.dtype, t.storage_offset(), host)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def describe(value: Any) -> Any:
    """``value`` with every tensor replaced by its :class:`TensorSpec`. Rows of 0-d
    tensors (a list of lists: the hyper-parameters of Note [host hypers], the only
    such argument) stay on the host."""
    if isinstance(value, torch.Tensor):
        return TensorSpec.of(value)
    if _host_rows(value):
        return [[TensorSpec.of(t, host=True) for t in row] for row in value]
    if isinstance(value, (list, tuple)):
        return type(value)(describe(v) for v in value)
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return value


@dataclass
class Call:
    """One engine call of a step."""

    fn: Callable[..., None]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    kind: str
    static: bool

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes two calls the same lowering: the engine's cache key (function,
        config, kind) and every argument's shape, stride and dtype."""
        return (self.fn, self.kind, self.static, repr(self.args), repr(self.kwargs))


class Recorder:
    """An engine that records its calls and runs nothing (see the module docstring)."""

    packs = True  # as the compiled engine: the runner lays buckets out in units

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def __call__(
        self,
        fn: Callable[..., None],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: str = "",
        static: bool = False,
        site: Any = None,
    ) -> None:
        self.calls.append(Call(fn, describe(args), describe(kwargs), kind, static))


# -- one step -------------------------------------------------------------------------


@dataclass
class Recorded:
    """A steady step of one optimizer: its engine calls and its other device work."""

    workload: str
    dtype: str
    capturable: bool
    clip: bool
    numels: list[int]
    calls: list[Call]
    ops: list[DeviceOp] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(self.numels)


def meta_params(specs: Sequence[Any], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Tagged parameters (and gradients) on the meta device."""
    params = []
    for spec in specs:
        data = torch.empty(spec.shape, dtype=dtype, device="meta")
        p = uc.Parameter(data, spec.mup_type, spec.depth)
        p.grad = torch.empty_like(data)
        params.append(p)
    return params


def build_optimizer(
    params: list[torch.nn.Parameter], dtype: DType, capturable: bool, clip: bool
) -> Adam:
    """The optimizer as the harness's contestants build it (``contestants``:
    umup-compiled, umup-fp32state(-sr), umup-bf16; umup-capturable takes a device
    lr, so that ``LambdaLR`` fills it in place; umup-compiled-clip clips at
    ``MAX_NORM``)."""
    opt = Adam(
        params,
        lr=LR,
        capturable=capturable,
        state_dtype=dtype.state,
        stochastic_rounding=dtype.stochastic_rounding,
        max_grad_norm=MAX_NORM if clip else None,
    )
    if capturable:
        # Stand-in: the device lr goes in after construction, which validates a
        # tensor lr on the host (``.item()``), and a meta tensor has no value.
        for group in opt.param_groups:
            group["lr"] = torch.full((), LR, device=params[0].device)
    return opt


def _check_state(opt: Adam, params: Sequence[torch.Tensor], dtype: DType) -> None:
    """Raise ``RuntimeError`` where the optimizer's 8-bit state is not what
    :meth:`DType.ideal` counts (:func:`keeps_float`)."""
    if dtype.state != _state8.INT8:
        return
    for i, p in enumerate(params):
        quantized = _state8.SCALES_KEY in opt.state[p]
        if quantized == keeps_float(p.numel()):
            raise RuntimeError(
                f"parameter {i} ({tuple(p.shape)}): 8-bit state {quantized}, but "
                "gpu_record.keeps_float says otherwise; the ideal bytes would be wrong"
            )


def record(workload: str, dtype: str, capturable: bool, clip: bool) -> Recorded:
    """Build the workload on meta, take a first step (state, layouts), change the lr
    with the harness's ``LambdaLR``, and record the second, steady step."""
    if "meta" not in gather_module.CAPTURABLE_DEVICES:  # stand-in: meta is CUDA here
        gather_module.CAPTURABLE_DEVICES = (*gather_module.CAPTURABLE_DEVICES, "meta")
    if "meta" not in _hypers.HOST_DEVICES:  # likewise (Note [host hypers])
        _hypers.HOST_DEVICES = (*_hypers.HOST_DEVICES, "meta")
    spec = DTYPES[dtype]
    params = meta_params(workload_specs(workload), spec.param)
    opt = build_optimizer(params, spec, capturable, clip)
    recorder = Recorder()
    opt._engine = recorder  # type: ignore[attr-defined]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, contestants._schedule)
    opt.step()
    sched.step()
    _check_state(opt, params, spec)
    recorder.calls.clear()
    ops = DeviceOps()
    with ops:
        opt.step()
    out = Recorded(
        workload,
        dtype,
        capturable,
        clip,
        [p.numel() for p in params],
        list(recorder.calls),
        ops.ops,
    )
    if not capturable and not any(map(takes_host_hypers, out.calls)):
        # a float lr changed: HyperTable refreshes through pinned memory
        table = 8 * len(opt.param_groups) * len(ADAM_HYPERS)  # float64 (groups, 5)
        out.ops.append(DeviceOp("hyper refresh (pinned H2D copy)", 1, table))
    return out


def takes_host_hypers(call: Call) -> bool:
    """Whether ``call`` reads its hyper-parameters from the host (no refresh)."""
    return any(map(_host_rows, call.args))


def _host_rows(value: Any) -> bool:
    """Whether ``value`` is rows of host hyper-parameters (a list of lists, the only
    such argument of an update: Note [host hypers])."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, list) for v in value)
    )
