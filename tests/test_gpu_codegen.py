"""The CUDA path on a CPU: ``python -m benchmarks.gpu_codegen`` in a subprocess.

Three small configurations, lowered by Inductor for sm_90 without a GPU (the stand-ins
of ``benchmarks.gpu_standins``), their kernels built to cubin and run in Triton's
interpreter against the eager engine:

- ``gpt-mini:fp32:capturable``: the unrolled unit (large tensors and the folded small
  ones), float32;
- ``gpt-mini:fp32``: the same, uncaptured: its hyper-parameters are 0-d host inputs
  (Note [host hypers]), kernel arguments, so nothing is copied to the device;
- ``many-small-mini:bf16-fp32state-sr:capturable:clip``: the pack, bf16 parameters with
  float32 state and stochastic rounding, and the clip graph.

The kernel and launch counts are pinned (``EXPECTTEST_ACCEPT=1`` regenerates them: a
changed table is a reviewed change of the CUDA code), and the goals that hold for them
are checked: no fallbacks, no host syncs, no cudagraph fail reasons, cubin built,
interpreter == eager. The counts belong to one torch/Triton pair (Inductor's codegen
changes between releases): elsewhere the test skips, saying so. The large workloads
(gpt, gpt-124m, gpt-1.2b, many-small) run with ``--run-slow`` or from the command line
(``benchmarks/results/paper-sm90``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline

from benchmarks.gpu_codegen import BUILT_FOR
from umup_compile._codegen_hints import DISPATCH_CHAIN

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = (
    "gpt-mini:fp32:capturable,many-small-mini:bf16-fp32state-sr:capturable:clip,"
    "gpt-mini:fp32"
)


def _skip_reason() -> str | None:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "Triton wheels are Linux x86-64 only"
    try:
        import triton
    except ImportError:
        return "Triton is not installed (the test extra pins triton==3.9.0)"
    have = (torch.__version__.split("+")[0], triton.__version__)
    if have != BUILT_FOR:
        return (
            f"the pinned counts are for torch {BUILT_FOR[0]} + Triton {BUILT_FOR[1]}, "
            f"this is torch {have[0]} + Triton {have[1]}: Inductor's code differs"
        )
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))


def run_module(module: str, *argv: str) -> str:
    """``python -m <module> <argv>`` from the repository root; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def run_tool(tmp: Path, *argv: str) -> dict[str, Any]:
    out = tmp / "result.json"
    run_module("benchmarks.gpu_codegen", *argv, "--json", str(out))
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("gpu_codegen")
    return run_tool(
        tmp, "--config", CONFIGS, "--interpret", "all", "--code-dir", str(tmp / "code")
    )


def table(results: list[dict[str, Any]]) -> str:
    """Per configuration: what its step runs on the device, per step."""
    from tabulate import tabulate

    rows = [
        [
            r["name"],
            r["graphs"],
            r["graph_calls"],
            r["kernels"],
            r["launches"],
            r["eager_launches"],
            r["torch_fused_launches"],
            f"{r['total_bytes'] / r['ideal_bytes']:.4f}",
        ]
        for r in results
    ]
    header = [
        "config",
        "graphs",
        "calls",
        "kernels",
        "launches",
        "eager",
        "fused",
        "bytes/ideal",
    ]
    return tabulate(rows, header, tablefmt="plain")


def test_counts_are_pinned(small: dict[str, Any]) -> None:
    assert_expected_inline(
        table(small["results"]),
        """\
config                                               graphs    calls    kernels    launches    eager    fused    bytes/ideal
gpt-mini-fp32-capturable                                  1        1          2           2        1        2         1.0061
many-small-mini-bf16-fp32state-sr-capturable-clip         2        2          3           3        7        2         1.6477
gpt-mini-fp32                                             1        1          2           2        0        2         1.0061""",
    )


def test_goals_hold(small: dict[str, Any]) -> None:
    for r in small["results"]:
        goals = r["goals"]
        assert goals["no_fallbacks"], (r["name"], r["fallbacks"])
        assert goals["no_host_syncs"], (r["name"], r["per_graph"])
        assert goals["cudagraphs_ok"], (r["name"], r["cudagraph_fail_reasons"])
        assert r["cubin_ok"], (r["name"], r["cubin"])
        assert all(b["spill_bytes"] == 0 for b in r["cubin"]), r["name"]
        assert goals["interpreter_ok"], (r["name"], r["interpreter"])
    unrolled = small["results"][0]  # no clip: every byte is the update's
    assert unrolled["goals"]["bytes_ok"], unrolled["goals"]
    # Notes [stacked counters] and [combo kernel arguments]: its graph launches no
    # more kernels than torch fused (its hyper-parameter refresh is eager)
    assert unrolled["launches"] <= unrolled["torch_fused_launches"], unrolled["name"]
    # Note [host hypers]: uncaptured, the whole step launches no more than torch fused
    host = small["results"][2]
    assert host["eager_launches"] == 0, host["eager_ops"]
    assert host["goals"]["launches_ok"] and host["goals"]["bytes_ok"], host["goals"]


def test_interpreter_matches_eager(small: dict[str, Any]) -> None:
    fp32, sr, host = (r["interpreter"] for r in small["results"])
    assert fp32["max_rel_err"] <= 1e-6 and host["max_rel_err"] <= 1e-6
    # stochastic rounding: the hash, shifts and masks agree bit for bit
    assert sr["stochastic_rounding"]
    assert sr["bf16_mismatches"] == 0 and sr["mismatches"] == 0
    assert [c["kind"].split("@")[0] for c in sr["calls"]] == ["clip1", "pack"]


def test_paper_times_are_labelled_a_simulation(small: dict[str, Any]) -> None:
    assert small["header"]["simulation"] is True
    for r in small["results"]:
        times = r["paper"]["times"]
        assert set(times) == {"H100 SXM", "H200"}
        for t in times.values():
            assert t["ours_ms"] > 0 and t["torch_fused_ideal_ms"] > 0


def test_first_compile_is_timed(small: dict[str, Any]) -> None:
    """Lowering and cubin builds are timed from empty caches (a warm Triton cache
    would build nothing and time ~0), every build carrying its share."""
    for r in small["results"]:
        assert r["lowering_seconds"] > 0, r["name"]
        builds = [b["seconds"] for b in r["cubin"]]
        assert all(t > 0 for t in builds), (r["name"], builds)
        assert r["cubin_seconds"] == pytest.approx(sum(builds), abs=0.1 * len(builds))
        assert r["slowest_build_seconds"] == pytest.approx(max(builds), abs=0.06)


def test_summary_table_is_well_formed(small: dict[str, Any]) -> None:
    """Every row of the markdown summary has the header's cells (a delimiter row
    with fewer is not rendered as a table)."""
    from benchmarks.gpu_report import markdown

    rows = [
        line
        for line in markdown(small["results"], small["header"]).splitlines()
        if line.startswith("|")
    ]
    assert len(rows) == 2 + len(small["results"])
    assert {row.count("|") for row in rows} == {rows[0].count("|")}, rows[:2]


def test_wrappers_are_written(small: dict[str, Any]) -> None:
    code = Path(small["header"]["code_dir"])
    for r in small["results"]:
        files = [g["file"] for g in r["per_graph"]]
        for name in files:
            text = (code / r["name"] / name).read_text()
            assert "async_compile.triton(" in text and "'kernel_num_gb'" in text
            # Note [flat combo dispatch]: the engine's combo kernels chain at most
            # DISPATCH_CHAIN members
            chained = re.findall(r"elif pid < num_xblocks_(\d+):", text)
            assert all(int(k) < DISPATCH_CHAIN for k in chained), (r["name"], name)
    combo = (code / "gpt-mini-fp32").glob("*.py")
    assert any("if (pid >= num_xblocks_" in f.read_text() for f in combo)


@pytest.mark.slow
def test_gpt_fp32_meets_the_byte_goal(tmp_path: Path) -> None:
    result = run_tool(tmp_path, "--config", "gpt:fp32", "--no-cubin")["results"][0]
    assert result["goals"]["bytes_ok"], result["goals"]
    assert result["goals"]["no_fallbacks"] and result["goals"]["cudagraphs_ok"]


def test_combo_kernels_stay_within_tritons_dispatch_depth() -> None:
    """Note [combo kernel arguments]: Triton walks a combo kernel's if/elif dispatch
    recursively (160 members exceeded Python's recursion limit, and the compile fell
    back to eager). Twice the engine's cap builds for sm_90 as Inductor chains it (a
    margin for the deeper stack Inductor compiles from, and the chain a torch without
    the hint's hook writes), and four times the cap as the hints write it (Note [flat
    combo dispatch]: nothing recurses per member)."""
    from umup_compile import _engine

    cap = _engine.COMBO_MAX_NODES
    options = _engine._combo_kernels()
    assert options.get("combo_kernel_max_num_nodes", cap) == cap, options
    out = run_module("benchmarks.gpu_cubin", "--dispatch", str(2 * cap))
    assert out.strip().endswith("ok"), out[-500:]
    out = run_module("benchmarks.gpu_cubin", "--dispatch", str(4 * cap), "--flat")
    assert out.strip().endswith("ok"), out[-500:]
