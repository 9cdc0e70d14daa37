"""``python -m benchmarks gpt --smoke`` runs end to end and writes its md, CSV, JSON, PNG."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import step

REPO = Path(__file__).resolve().parent.parent

# The smoke list: eager contestants plus one tiny Inductor compile.
SMOKE_CONTESTANTS = ["umup-compiled", "umup-eager", "us-default", "torch-fused"]
CONTESTANT_FIELDS = {
    "contestant",
    "median_ms",
    "iqr_ms",
    "first_step_ms",
    "ratio_vs_torch_fused",
    "graphs_later",
    "state_bytes",
    "peak_extra_bytes",
    "bytes_per_step",
    "achieved_gb_s",
    "pct_copy_bw",
}


def test_harness_smoke_writes_md_json_png(tmp_path: Path) -> None:
    pytest.importorskip("unit_scaling")
    pytest.importorskip("matplotlib")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "gpt", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| contestant |" in proc.stdout
    for ext in ("md", "csv", "json", "png"):
        assert len(list(tmp_path.glob(f"*_gpt_*.{ext}"))) == 1, ext
    (js,) = tmp_path.glob("*.json")
    doc = json.loads(js.read_text())
    assert doc["baseline"] == "torch-fused"
    assert {"device", "device_name", "torch", "threads", "commit"} <= set(doc["header"])
    run = doc["run"]
    assert run["workload"] == "gpt" and run["smoke"] is True
    assert run["copy_bandwidth_gb_s"] > 0
    assert run["bytes_per_step"] == 7 * 4 * run["numel"]  # float32 Adam: 28 B/element
    rows = doc["contestants"]
    assert [r["contestant"] for r in rows] == SMOKE_CONTESTANTS
    for row in rows:
        assert CONTESTANT_FIELDS <= set(row), set(row) ^ CONTESTANT_FIELDS
        assert row["median_ms"] > 0 and row["bytes_per_step"] > 0
        # The smoke set is ~1K elements: a step slowed by a loaded machine moves so
        # few bytes per second that the share (one decimal) rounds to 0.
        assert row["pct_copy_bw"] >= 0 and row["achieved_gb_s"] >= 0
        # exp_avg + exp_avg_sq: twice the parameters (plus step counters).
        assert row["state_bytes"] >= 2 * 4 * run["numel"]
        assert row["peak_extra_bytes"] is None  # CPU: no allocator peak
        assert row["graphs_later"] == 0, (
            f"{row['contestant']} recompiled under LambdaLR"
        )
        assert "FELL BACK" not in row["note"], row["note"]
    # Each share is of the measured copy bandwidth, within the two roundings (not a
    # speed: a loaded machine rounds the smoke set's shares to 0).
    copy_bw = run["copy_bandwidth_gb_s"]
    for row in rows:
        share = 100 * row["achieved_gb_s"] / copy_bw
        slack = 0.05 + 100 * 0.005 / copy_bw + 1e-9
        assert abs(row["pct_copy_bw"] - share) <= slack, row["contestant"]
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = next(tmp_path.glob("*.md")).read_text()
    assert md.startswith("# benchmarks: gpt") and "![step time]" in md
    assert f"- command: `python -m benchmarks gpt --smoke --out {tmp_path}`" in md


# The low-precision smoke list: eager only (no compile), so it stays fast.
LOWP_SMOKE = [
    ("umup-fp32state-sr-eager", 22),  # bf16 param/grad, float32 moments: 2+2+2+8+8
    ("torch-fused-fp32", 28),  # float32 everything: 7 x 4
    ("torch-fused-bf16", 14),  # bf16 everything: 7 x 2
]


def test_harness_smoke_bf16_fp32state_bytes_per_contestant(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "gpt",
            "--smoke",
            "--dtype",
            "bf16-fp32state",
        ]
        + ["--out", str(tmp_path), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ext in ("md", "csv", "json", "png"):
        assert len(list(tmp_path.glob(f"*_bf16-fp32state.{ext}"))) == 1, ext
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["baseline"] == "torch-fused-fp32"
    numel = doc["run"]["numel"]
    rows = {r["contestant"]: r for r in doc["contestants"]}
    for name, per_element in LOWP_SMOKE:
        assert rows[name]["bytes_per_step"] == per_element * numel, name
        assert rows[name]["median_ms"] > 0
    assert rows["torch-fused-fp32"]["ratio_vs_torch_fused"] == 1.0
    assert rows["umup-fp32state-sr-eager"]["param_dtype"] == "bfloat16"
    # float32 moments on bf16 parameters: 8 B of state per element.
    assert rows["umup-fp32state-sr-eager"]["state_bytes"] >= 8 * numel
    if importlib.util.find_spec("heavyball") is None:  # optional: a row, no timings
        assert rows["heavyball-adamw"]["median_ms"] is None
        assert "skipped" in rows["heavyball-adamw"]["note"]
    csv_rows = list(csv.DictReader(next(tmp_path.glob("*.csv")).open()))
    assert [r["contestant"] for r in csv_rows] == list(rows)


def test_harness_smoke_int8_state_rows_and_bytes(tmp_path: Path) -> None:
    """``--dtype int8-state``: ours with 8-bit moments moves 16 B per element (4 + 4
    param, 4 grad, 1 + 1 per code) against torch fused's 28; the peers run when
    installed, else a row says why (torchao compiles per shape for ~45 s: run
    here only when missing)."""
    pytest.importorskip("matplotlib")
    names = ["umup-int8-eager", "torch-fused", "bnb-adamw8bit"]
    if importlib.util.find_spec("torchao") is None:
        names.append("torchao-adamw8bit")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "gpt", "--smoke", "--dtype"]
        + ["int8-state", "--contestants", ",".join(names)]
        + ["--out", str(tmp_path), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(next(tmp_path.glob("*_int8-state.json")).read_text())
    numel = doc["run"]["numel"]
    rows = {r["contestant"]: r for r in doc["contestants"]}
    assert list(rows) == names
    # tensors under 4096 elements (the norms) keep float32 moments: 28 B
    from benchmarks.sets import gpt_like_specs

    sizes = [math.prod(s.shape) for s in gpt_like_specs(64, 1, 64)]
    small = sum(n for n in sizes if n < 4096)
    assert rows["umup-int8-eager"]["bytes_per_step"] == 16 * numel + 12 * small
    assert rows["umup-int8-eager"]["state_bytes"] <= 2.2 * numel
    assert rows["torch-fused"]["bytes_per_step"] == 28 * numel
    for name, package in (("bnb-adamw8bit", "bitsandbytes"), ("torchao-adamw8bit",
                                                               "torchao")):  # fmt: skip
        if name not in rows:
            continue
        if importlib.util.find_spec(package) is None:
            assert rows[name]["median_ms"] is None
            assert f"pip install {package}" in rows[name]["note"]
        else:
            assert rows[name]["median_ms"] > 0 and rows[name]["state_bytes"] > 0
    md = next(tmp_path.glob("*_int8-state.md")).read_text()
    assert "umup-int8" in md


def test_int8_peers_missing_package_is_a_row_that_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import contestants

    real = importlib.util.find_spec
    monkeypatch.setattr(
        contestants.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("torchao", "bitsandbytes") else real(name),
    )
    cpu = torch.device("cpu")
    assert "pip install torchao" in str(
        contestants.skip_reason("torchao-adamw8bit", cpu)
    )
    assert "bitsandbytes" in str(contestants.skip_reason("bnb-adamw8bit", cpu))
    assert contestants.skip_reason("umup-int8", cpu) is None


def test_harness_refuses_gpu_workloads_on_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs the GPU workloads")
    with pytest.raises(SystemExit) as exit_info:
        step.parse_args(["gpt-124m"])
    assert exit_info.value.code == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_harness_help_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        step.parse_args(["gpt", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--device",
        "--dtype",
        "--repeats",
        "--window",
        "--contestants",
        "--baseline",
        "--n-small",
        "--time-scheduler",
        "--warm-cache",
        "--out",
        "--smoke",
    ):
        assert option in out
    for workload in ("gpt-124m", "gpt-1.2b", "many-small"):
        assert workload in out


def test_harness_capturable_contestant(tmp_path: Path) -> None:
    """The CUDA-graph contestant: replayed on CUDA, a skipped row elsewhere.

    Also the options that only change how the timer runs: the scheduler inside the
    timed window, the usual Inductor cache, two steps per sample.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "many-small", "--smoke", "--no-progress"]
        + ["--contestants", "umup-capturable,torch-fused", "--out", str(tmp_path)]
        + ["--time-scheduler", "--warm-cache", "--window", "2"]
        + (["--device", "cuda"] if torch.cuda.is_available() else []),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    run = doc["run"]
    assert run["workload"] == "many-small" and run["window"] == 2
    assert run["time_scheduler"] is True and run["inductor_cache"] == "warm"
    row = {r["contestant"]: r for r in doc["contestants"]}["umup-capturable"]
    if torch.cuda.is_available():
        assert row["median_ms"] > 0
    else:
        assert (
            row["median_ms"] is None and row["note"] == "skipped: needs a CUDA device"
        )


def test_step_bytes_counts_gradients_a_contestant_cleared() -> None:
    # HeavyBall clears .grad in its step; the harness divided by zero bytes then.
    from benchmarks.bandwidth import step_bytes

    p = torch.nn.Parameter(torch.zeros(8, 4, dtype=torch.bfloat16))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    with_grad = step_bytes(opt)
    p.grad = None
    assert step_bytes(opt) == with_grad
    # bf16 parameter and gradient, bf16 moments: 2 * 2 + 2 + 2 * (2 + 2) per element
    assert with_grad == (32 * 14, 32 * 2)
