"""Adam's 8-bit state (``state_dtype=torch.int8``): who quantizes, the state tensors,
the update that runs them, and the conversions of a checkpoint load.

Note [8-bit state]: a parameter's Adam state under ``state_dtype=torch.int8`` is

- ``exp_avg``: int8 codes of the first moment, the parameter's shape, contiguous;
- ``exp_avg_sq``: uint8 log codes of the second moment, likewise;
- ``exp_avg_scales`` (:data:`SCALES_KEY`): float32 ``(num_blocks, 2)``: per block of
  :data:`~umup_compile._quant.BLOCK` consecutive elements of the flattened parameter,
  the first moment's absmax and the second moment's max (Note [8-bit moments]).
  Under FSDP2 (a ``DTensor`` sharded on dim 0) it is ``(rows, blocks per row, 2)``,
  sharded like the parameter, so that every shard holds its own blocks and no block
  crosses a shard boundary;
- ``step``: as torch's.

Parameters keep float32 moments (``exp_avg``/``exp_avg_sq`` as torch's, no scales)
when they have fewer than :data:`MIN_NUMEL` elements (as bitsandbytes and torchao do:
their scales and codes would save little), are not contiguous when their state is
made (channels_last, transposed views), or are sharded where a shard's rows are not
whole blocks (a warning says so). The update of a bucket of 8-bit state is
``_quant_step.adam8_step_``; :func:`adam_update_` is the spec's update and sends each
bucket to its function by its static config (``AdamConfig.int8_state``, set from the
state a parameter has: ``_specs``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._functional import AdamConfig, ShardPlace, adam_step_
from ._prologue import Hypers
from ._quant import BLOCK, dequantize, num_blocks, quantize_
from ._quant_step import adam8_step_

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor as DTensor
    from torch.distributed.tensor import Replicate, Shard
else:  # a torch build without torch.distributed has no DTensor parameters
    DTensor = ()  # type: ignore[assignment,misc]

State = dict[str, Any]

INT8 = torch.int8
MIN_NUMEL = 4096  # smaller parameters keep float32 moments
SCALES_KEY = "exp_avg_scales"
CODE_DTYPES = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}
# Parameter dtypes whose moments quantize (the update runs in float32: a float64
# parameter would be rounded to it; ``_groups`` refuses others at admission).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def float_state_dtype(state_dtype: torch.dtype | None, param: Tensor) -> torch.dtype:
    """The dtype of a parameter's floating moments: the group's ``state_dtype``, the
    parameter's dtype when None, float32 under ``torch.int8`` (the parameters that
    keep float moments)."""
    if state_dtype == INT8:
        return torch.float32
    return state_dtype or param.dtype


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def keeps_float(p: Tensor) -> str | None:
    """Why ``p`` keeps float32 moments under ``state_dtype=torch.int8``, or None
    when its moments are 8-bit (see Note [8-bit state])."""
    if p.numel() < MIN_NUMEL:
        return f"it has fewer than {MIN_NUMEL} elements"
    if p.dtype not in PARAM_DTYPES:  # e.g. made float64 after add_param_group
        return f"it is {p.dtype}"
    if isinstance(p, DTensor):
        placements_ok = all(
            isinstance(x, Replicate) or (isinstance(x, Shard) and x.dim == 0)
            for x in p.placements
        )
        row = p.numel() // max(p.shape[0], 1) if p.ndim else 1
        if not placements_ok or row % BLOCK:
            return (
                f"it is sharded with rows of {row} elements (state_dtype=torch.int8 "
                f"shards blocks of {BLOCK} with dim 0: rows must be whole blocks)"
            )
        local = p.to_local()
        if not local.is_contiguous():
            return "its shard is not contiguous"
        return None
    if not p.is_contiguous():
        return "it is not contiguous"
    return None


def init_state8_(p: Tensor, state: State) -> bool:
    """Make ``p``'s 8-bit moments (zero codes and scales) when it takes them; return
    whether it did (else the caller makes float32 moments)."""
    reason = keeps_float(p)
    if reason is not None:
        if isinstance(p, DTensor) and p.numel() >= MIN_NUMEL:
            warnings.warn(
                "umup_compile: a sharded parameter keeps float32 Adam state under "
                f"state_dtype=torch.int8 because {reason}; shard on dim 0 with rows "
                f"of a multiple of {BLOCK} elements to quantize it.",
                UserWarning,
                stacklevel=6,
            )
        return False
    for key, dtype in CODE_DTYPES.items():
        state[key] = torch.zeros_like(
            p, dtype=dtype, memory_format=torch.contiguous_format
        )
    state[SCALES_KEY] = new_scales(p)
    return True


def new_scales(p: Tensor) -> Tensor:
    """Zero scales for ``p``: ``(num_blocks, 2)``, or sharded like a ``DTensor``."""
    if isinstance(p, DTensor):
        from torch.distributed.tensor import zeros

        rows = p.shape[0]
        return zeros(
            (rows, p.numel() // rows // BLOCK, 2),
            dtype=torch.float32,
            device_mesh=p.device_mesh,
            placements=p.placements,
        )
    return torch.zeros(num_blocks(p.numel()), 2, dtype=torch.float32, device=p.device)


def check_state8(p: Tensor, state: State, label: str) -> None:
    """Raise ``ValueError`` for 8-bit state the update cannot follow: codes of
    another dtype, codes without scales, scales of another size (Note [8-bit
    state])."""
    fix = (
        "Restore it, or clear the parameter's state (optimizer.state[p].clear()) to "
        "start it again."
    )
    scales = state.get(SCALES_KEY)
    dtypes = {k: getattr(state.get(k), "dtype", None) for k in CODE_DTYPES}
    if scales is None:
        coded = [k for k, d in dtypes.items() if d in (torch.int8, torch.uint8)]
        if coded:
            raise ValueError(
                f"state[{coded[0]!r}] of {label} holds 8-bit codes but the state has "
                f"no {SCALES_KEY!r}; 8-bit moments need their block scales. {fix}"
            )
        return
    if dtypes != CODE_DTYPES:
        raise ValueError(
            f"state of {label} has {SCALES_KEY!r} (8-bit moments), but its codes are "
            f"exp_avg: {dtypes['exp_avg']}, exp_avg_sq: {dtypes['exp_avg_sq']}; they "
            f"must be torch.int8 and torch.uint8. {fix}"
        )
    blocks = num_blocks(p.numel())
    if (
        not isinstance(scales, Tensor)
        or scales.dtype != torch.float32
        or scales.numel() != 2 * blocks
        or scales.shape[-1] != 2
        or scales.device != p.device
    ):
        raise ValueError(
            f"state[{SCALES_KEY!r}] of {label} must be float32 of shape ({blocks}, 2) "
            f"on {p.device} (two scales per block of {BLOCK} elements), got "
            f"{getattr(scales, 'dtype', type(scales))} {tuple(scales.shape)} on "
            f"{getattr(scales, 'device', '-')}. {fix}"
        )


# -- the update -------------------------------------------------------------------------


def _contiguous(
    ts: Sequence[Tensor], copies: list[tuple[Tensor, Tensor]]
) -> list[Tensor]:
    """``ts``, each contiguous: a tensor that is not is replaced by a copy, recorded
    in ``copies`` to be written back. (A negative bit needs nothing: eager views
    keep it, and compiled graphs never receive one, Note [what a graph reads].)"""
    out = []
    for t in ts:
        if t.is_contiguous():
            out.append(t)
            continue
        c = t.contiguous()
        copies.append((t, c))
        out.append(c)
    return out


def adam_update_(
    params: list[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    exp_avg_scales: list[Tensor],
    steps: list[Tensor],
    hyper_t: Hypers,
    group_index_t: Tensor,
    lr_scales_t: Tensor,
    wd_scales_t: Tensor,
    *,
    config: AdamConfig,
    segment_t: Tensor | None = None,
    local_index_t: Tensor | None = None,
    row_widths_t: Tensor | None = None,
    sr_seeds_t: Tensor | None = None,
    grad_scale_t: Tensor | None = None,
    found_inf_t: Tensor | None = None,
    shards: Sequence[ShardPlace | None] | None = None,
) -> None:
    """The Adam spec's update: :func:`~umup_compile._functional.adam_step_`, or
    with ``config.int8_state`` :func:`~umup_compile._quant_step.adam8_step_` over
    ``exp_avg_scales``.

    ``adam8_step_`` cuts contiguous tensors into blocks: a parameter or code tensor
    that is not contiguous (a strided parameter, state rebound through ``.data``)
    is updated in a contiguous copy that is written back (decided at trace time:
    strides are static), and scales sharded like a parameter (Note [8-bit state])
    are viewed as ``(blocks, 2)``.
    """
    if not config.int8_state:
        adam_step_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            hyper_t,
            group_index_t,
            lr_scales_t,
            wd_scales_t,
            config=config,
            segment_t=segment_t,
            local_index_t=local_index_t,
            sr_seeds_t=sr_seeds_t,
            grad_scale_t=grad_scale_t,
            found_inf_t=found_inf_t,
            shards=shards,
        )
        return
    copies: list[tuple[Tensor, Tensor]] = []
    scales = [s if s.ndim == 2 else s.view(-1, 2) for s in exp_avg_scales]
    adam8_step_(
        _contiguous(params, copies),
        grads,
        _contiguous(exp_avgs, copies),
        _contiguous(exp_avg_sqs, copies),
        _contiguous(scales, copies),
        steps,
        hyper_t,
        group_index_t,
        lr_scales_t,
        wd_scales_t,
        config=config,
        segment_t=segment_t,
        local_index_t=local_index_t,
        row_widths_t=row_widths_t,
        sr_seeds_t=sr_seeds_t,
        grad_scale_t=grad_scale_t,
        found_inf_t=found_inf_t,
        shards=shards,
    )
    for t, c in copies:
        t.copy_(c)


# -- checkpoints --------------------------------------------------------------------


def quantize_moments(p: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> State:
    """8-bit ``exp_avg``, ``exp_avg_sq`` and scales of float moments of ``p`` (a
    float checkpoint loaded with ``state_dtype=torch.int8``)."""
    out: State = {}
    for key, dtype in CODE_DTYPES.items():
        out[key] = torch.zeros_like(
            p, dtype=dtype, memory_format=torch.contiguous_format
        )
    out[SCALES_KEY] = new_scales(p)
    scales = _local(out[SCALES_KEY]).view(-1, 2)
    for col, (key, x) in enumerate((("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))):
        values = _local(x).detach().to(device=scales.device, dtype=torch.float32)
        quantize_(
            values.contiguous(),
            _local(out[key]),
            scales[:, col : col + 1],
            signed=col == 0,
        )
    return out


def dequantize_moments(p: Tensor, state: State, dtype: torch.dtype) -> State:
    """Float ``exp_avg`` and ``exp_avg_sq`` (``dtype``, shaped and placed like ``p``)
    of 8-bit ``state`` (an 8-bit checkpoint loaded without ``torch.int8``)."""
    scales = _local(state[SCALES_KEY]).reshape(-1, 2)
    out: State = {}
    for col, key in enumerate(CODE_DTYPES):
        codes = _local(state[key])
        values = dequantize(
            codes.contiguous(), scales[:, col : col + 1], signed=col == 0
        )
        t = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        _local(t).copy_(values.to(_local(t).device))
        out[key] = t
    return out


def follow_state_dtype(p: Tensor, state: State, group: dict[str, Any]) -> str | None:
    """Note [state dtype edited]: existing moments follow a group's ``state_dtype``
    edited between steps, as a checkpoint's do at loading: quantized when it turns
    to ``torch.int8``, dequantized when it turns from it. Return what was done (for
    one warning), or None. Float state of another float dtype is left as it is
    (state rebound through ``.data`` is updated in its own dtype, as in torch)."""
    if "exp_avg" not in state or "exp_avg_sq" not in state:
        return None
    state_dtype = group.get("state_dtype")
    want8 = state_dtype == INT8 and p.is_floating_point() and keeps_float(p) is None
    if want8 == (SCALES_KEY in state):
        return None
    if want8:
        dtype = state["exp_avg"].dtype
        state.pop("max_exp_avg_sq", None)  # 8-bit state has no amsgrad maximum
        state.update(quantize_moments(p, state["exp_avg"], state["exp_avg_sq"]))
        return f"{dtype} -> 8-bit (quantized)"
    dtype = float_state_dtype(state_dtype, p)
    state.update(dequantize_moments(p, state, dtype))
    del state[SCALES_KEY]
    return f"8-bit -> {dtype} (dequantized)"


def place_scales(p: Tensor, scales: Tensor) -> Tensor:
    """Saved scales in the layout ``p`` takes (``(blocks, 2)``, or sharded like a
    ``DTensor`` parameter): a checkpoint from FSDP2 loads into one process and back;
    the blocks are the same (rows of whole blocks)."""
    target = new_scales(p)
    if tuple(target.shape) == tuple(scales.shape):
        return scales.to(device=p.device, dtype=torch.float32)
    if isinstance(scales, DTensor):
        scales = scales.full_tensor()
    flat = scales.detach().to(device=p.device, dtype=torch.float32).reshape(-1, 2)
    if isinstance(target, DTensor):
        from torch.distributed.tensor import distribute_tensor

        full = flat.view(target.shape)
        return distribute_tensor(full, target.device_mesh, target.placements)
    return flat.clone()


def state_nbytes(state: State) -> int:
    """The bytes of a parameter's state tensors (a ``DTensor``: its local shard)."""
    return sum(
        _local(t).numel() * t.element_size()
        for t in state.values()
        if isinstance(t, Tensor)
    )
