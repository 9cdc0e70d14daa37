"""The CUDA path on a CPU with 8-bit Adam state (``state_dtype=torch.int8``, issue 26).

``gpt-mini:int8-state`` through ``python -m benchmarks.gpu_codegen``: its graphs lowered
by Inductor for sm_90 (the unrolled unit's quantized tensors, the pack's small ones
with float32 moments), its kernels built to cubin and run in Triton's interpreter
against eager: the codes bit for bit, float32 within the tool's bound. The bytes the
kernels move stay within 1.05x the 8-bit ideal (:meth:`benchmarks.gpu_record.DType.ideal`,
checked here against a hand count). The larger workloads' figures are committed in
``benchmarks/results/paper-sm90/*_sm90_int8.*``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_record
from tests.test_gpu_codegen import SKIP_REASON, run_tool


def test_ideal_of_the_float_dtypes_is_unchanged() -> None:
    per_element = {
        "fp32": 28,
        "bf16-fp32state": 22,
        "bf16-fp32state-sr": 22,
        "bf16": 14,
    }
    for name, bytes_ in per_element.items():
        dtype = gpu_record.DTYPES[name]
        assert [dtype.ideal(n) for n in (1, 4096, 4097)] == [
            bytes_,
            4096 * bytes_,
            4097 * bytes_,
        ]


@pytest.mark.parametrize(
    ("name", "param_bytes"), [("int8-state", 4), ("bf16-int8state-sr", 2)]
)
def test_ideal_of_8bit_state_counts_codes_and_block_scales(
    name: str, param_bytes: int
) -> None:
    dtype = gpu_record.DTYPES[name]
    # p read + written, g read; m, v codes read + written; 2 float32 scales per
    # block of 128 read + written (the last block partial)
    quantized = 3 * param_bytes + 4
    assert dtype.ideal(4096) == 4096 * quantized + 32 * 16
    assert dtype.ideal(4097) == 4097 * quantized + 33 * 16
    # fewer than 4096 elements: float32 moments (_state8.MIN_NUMEL)
    assert dtype.ideal(4095) == 4095 * (3 * param_bytes + 16)
    assert dtype.ideal_bytes([4095, 4096]) == dtype.ideal(4095) + dtype.ideal(4096)


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    tmp = tmp_path_factory.mktemp("gpu_codegen_int8")
    document = run_tool(
        tmp,
        "--config",
        "gpt-mini:int8-state",
        "--interpret",
        "all",
        "--code-dir",
        str(tmp / "code"),
    )
    return document["results"][0]  # type: ignore[no-any-return]


def test_int8_kernels_build_and_meet_the_byte_goal(mini: dict[str, Any]) -> None:
    goals = mini["goals"]
    assert mini["ideal_bytes"] == gpu_record.DTYPES["int8-state"].ideal_bytes(
        [math.prod(s.shape) for s in gpu_record.workload_specs("gpt-mini")]
    )
    assert goals["bytes_limit"] == 1.05
    assert goals["bytes_ok"], goals
    assert goals["no_fallbacks"] and goals["no_host_syncs"], mini["per_graph"]
    assert goals["cudagraphs_ok"], mini["cudagraph_fail_reasons"]
    assert mini["cubin_ok"], mini.get("cubin_error")
    assert all(b["spill_bytes"] == 0 for b in mini["cubin"])
    # Note [persistent block reductions]: the block rows stay in registers
    unit = mini["per_graph"][0]
    assert "persistent_reduction" in unit["heuristics"], unit["heuristics"]


def test_int8_interpreter_matches_eager(mini: dict[str, Any]) -> None:
    numerics = mini["interpreter"]
    assert not numerics["errors"], numerics["errors"]
    assert [c["kind"].split(":")[0].split("@")[0] for c in numerics["calls"]] == [
        "static",
        "pack",
    ]
    assert numerics["mismatches"] == 0  # int8 and uint8 codes, bit for bit
    assert numerics["max_rel_err"] <= 1e-6  # parameters and scales (float32)
    assert mini["goals"]["interpreter_ok"]


@pytest.mark.slow
def test_gpt_int8_meets_the_byte_goal(tmp_path: Path) -> None:
    result = run_tool(tmp_path, "--config", "gpt:int8-state", "--no-cubin")
    goals = result["results"][0]["goals"]
    assert goals["bytes_ok"] and goals["bytes_limit"] == 1.05, goals
