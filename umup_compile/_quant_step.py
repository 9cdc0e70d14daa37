"""The core's Adam/AdamW update with 8-bit moments, one fused pass per tensor.

Same arithmetic as ``_functional.adam_step_`` (``_prologue.adam_prologue``, Note
[skipped steps], Note [realized coefficients]), with each moment held as codes and
block scales (``_quant``, Note [8-bit moments]): per block of
:data:`~umup_compile._quant.BLOCK` elements, decode the old moments, update them and
the parameter in float32, then encode the new moments. The parameter update uses the
new float32 moments, not their codes, as bitsandbytes' and torchao's 8-bit Adam do.

Note [one pass]: compiled, each tensor's update is one loop nest over its blocks:
per block, a first inner loop reads the gradient and the first moment's codes and
reduces the block's two maxima, a second recomputes the moments (from the same cache
lines), stores the parameter and the codes; no staging buffer. Per element that moves
4 B of parameter read and written, 4 B of gradient and 1 + 1 B of codes read and
written (28 B for float32 state). Two layout rules make Inductor generate it:

- the tensors reach the graph as ``(blocks, block)`` rows (a chunk's or the unrolled
  unit's aliases, a pack's rows): a parameter of another shape is viewed as rows
  inside the graph, and Inductor then iterates its write-back in the parameter's own
  shape, which no longer matches the reduction's loop (a separate pass per maximum);
- the two scales of a block are the two columns of one ``(blocks, 2)`` tensor: their
  store then iterates ``(blocks, 2)``, not vectorised along the blocks, and joins the
  block loop (Inductor's outer-loop fusion needs equal loop steps at the outer
  level; a ``(blocks,)`` store is vectorised by 16 there).

On CUDA the block stays in registers instead (a Triton persistent reduction: Note
[persistent block reductions] in ``_codegen_hints``): one read of every input, no
staging buffer.

The loop is compute-bound on CPU, not bound by its bytes: every vector instruction
counts (Note [cheap codes]), and the compiled engine's hints prefetch the next blocks'
rows (Note [row prefetch] in ``_codegen_hints``). Measured (``benchmarks/bench_quant8``).

Note [second-moment scale]: the second moment's scale is the exact max of the block's
new values (one more row reduction in the first inner loop, beside the first moment's
absmax). A bound known before the values was tried and measured
(``benchmarks/bench_quant8`` results of 2026-12-07): a power of two above ``beta2 * s +
(1 - beta2) * max(g**2)``, ``s`` the old scale, made the update 0.77x torch fused
instead of 0.83x, but that scale never comes down (``beta2 * s`` rounds up to ``s``
again), so after a gradient spike a block's later values fall below the codes' 32
octaves and store as 0, and the step divides by ``eps``; bounding by the block's
largest old value instead needs a third reduction, which splits Inductor's loop nest
(one pass became four loops per tensor). A test (``test_quant``: the scale follows
the values down after a spike) holds any future bound to not ratcheting.

Note [pack padding]: a pack's rows (``_pack``) end each parameter's last block with
padding, which no element of the parameter reads, except through a block's maxima.
The padding's gradient is 0, and so are its moments, while its parameter is finite:
with ``eps=0`` its update is 0 / 0 (as torch's is for an element whose gradient was
always 0), and L2 weight decay then carried that NaN into the padding's gradient, its
moments and the block's scales, and every element of that block decoded to NaN
(compiled only: the eager engine cuts a parameter's last block short). So a pack's
call passes ``row_widths_t``, each row's count of the parameter's elements, and the
padding's gradient is 0 whatever its parameter holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._functional import AdamConfig, ShardPlace, _noise, _store, _unscale
from ._prologue import Hypers, adam_prologue
from ._quant import (
    BLOCK,
    block_rows,
    decode_signed,
    decode_unsigned,
    encode_signed,
    encode_unsigned,
    scale_rows,
)


def adam8_step_(
    params: list[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scales: list[Tensor],
    steps: list[Tensor],
    hyper_t: Hypers,
    group_index_t: Tensor,
    lr_scales_t: Tensor,
    wd_scales_t: Tensor,
    *,
    config: AdamConfig,
    block: int = BLOCK,
    segment_t: Tensor | None = None,
    local_index_t: Tensor | None = None,
    row_widths_t: Tensor | None = None,
    sr_seeds_t: Tensor | None = None,
    grad_scale_t: Tensor | None = None,
    found_inf_t: Tensor | None = None,
    shards: Sequence[ShardPlace | None] | None = None,
) -> None:
    """Apply one u-μP Adam (or AdamW) step in place, with 8-bit moments.

    Args:
        params, grads: aligned lists of contiguous tensors (float32 or bf16
            parameters), one entry per parameter (or one pack).
        exp_avgs: int8 codes of the first moments, shaped like the parameters.
        exp_avg_sqs: uint8 log codes of the second moments, likewise.
        scales: per parameter, ``(num_blocks(numel, block), 2)`` float32: each
            block's first-moment absmax and second-moment max.
        steps, hyper_t, group_index_t, lr_scales_t, wd_scales_t, grad_scale_t,
            found_inf_t: as for :func:`~umup_compile._functional.adam_step_`.
        config: static structure (``amsgrad`` is not supported with 8-bit
            moments; ``stochastic_rounding`` rounds bf16 parameters, the codes
            round to nearest).
        block: elements per block: consecutive elements of the flattened tensor.
        segment_t: for a pack, as for ``adam_step_``: ``block`` must then be the
            pack's row width, so that each row is one block.
        local_index_t, sr_seeds_t: as for ``adam_step_`` (stochastic rounding of
            bf16 parameters, the same streams as with float32 state).
        row_widths_t: for a pack, each row's count of its parameter's elements
            (the rest is padding, whose gradient is taken as 0: Note [pack
            padding]).
        shards: as for ``adam_step_`` (Note [shard streams]).

    Raises:
        ValueError: for ``amsgrad``.
    """
    if config.amsgrad:
        raise ValueError(
            "8-bit moments do not support amsgrad: keep float32 state for it "
            "(state_dtype=torch.float32)"
        )
    if not params:
        return
    skip, step, _, coefficients = adam_prologue(
        params[0].dtype,
        torch.float32,
        steps,
        hyper_t,
        group_index_t,
        lr_scales_t,
        wd_scales_t,
        segment_t=segment_t,
        found_inf_t=found_inf_t,
    )
    # Views of the prologue's realized table (Note [realized coefficients])
    weight1s, weight2s, root_scales, eps_scaleds, l2s, decays, _ = coefficients
    noise = _noise(sr_seeds_t, step, segment_t, local_index_t, params, shards)
    for i, param in enumerate(params):
        n = param.numel()
        keys = noise[i][1:] if noise else ()
        index_rows: list[Tensor | None] = (
            list(block_rows(noise[i][0], block)) if noise else [None] * 2
        )
        for p_rows, g_rows, m_rows, v_rows, s_rows, i_rows in zip(
            block_rows(param, block),
            block_rows(grads[i], block),
            block_rows(exp_avgs[i], block),
            block_rows(exp_avg_sqs[i], block),
            scale_rows(scales[i], n, block),
            index_rows,
        ):
            grad = _unscale(g_rows.to(torch.float32), grad_scale_t, config.maximize)
            p = p_rows.to(torch.float32)
            if config.weight_decay == "l2":
                grad = grad + l2s[i] * p
            if row_widths_t is not None:  # Note [pack padding]
                width = torch.arange(grad.shape[-1], device=grad.device)
                grad = grad.where(width < row_widths_t.unsqueeze(-1), 0.0)
            if skip is not None:
                grad = grad.where(~skip, 0.0)
            if config.weight_decay == "decoupled":
                p = p * decays[i]
            # Not lerp: ATen's vector lerp fuses a multiply-add that Inductor's code
            # does not, and the codes must not depend on the engine.
            m = decode_signed(m_rows, s_rows[:, :1])
            m = m + weight1s[i] * (grad - m)
            v = decode_unsigned(v_rows, s_rows[:, 1:])
            v = v + weight2s[i] * (grad.square() - v)
            p = p.addcdiv(m, v.sqrt() * root_scales[i] + eps_scaleds[i])
            _store(p_rows, p, None if i_rows is None else (i_rows, *keys))
            m_codes, m_scale = encode_signed(m)
            v_codes, v_scale = encode_unsigned(v)  # Note [second-moment scale]
            new_scales = torch.cat([m_scale, v_scale], dim=-1)
            if skip is not None:  # bitwise unchanged (re-encoding may move a scale)
                m_codes = torch.where(skip, m_rows, m_codes)
                v_codes = torch.where(skip, v_rows, v_codes)
                new_scales = torch.where(skip, s_rows, new_scales)
            m_rows.copy_(m_codes)
            v_rows.copy_(v_codes)
            s_rows.copy_(new_scales)
