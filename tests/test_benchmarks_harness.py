"""``python -m benchmarks --smoke`` runs end to end and writes its md, JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# bench_step's smoke list: eager contestants plus one tiny Inductor compile.
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
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| contestant |" in proc.stdout
    for ext in ("md", "json", "png"):
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
        assert row["median_ms"] > 0 and row["pct_copy_bw"] > 0
        # exp_avg + exp_avg_sq: twice the parameters (plus step counters).
        assert row["state_bytes"] >= 2 * 4 * run["numel"]
        assert row["peak_extra_bytes"] is None  # CPU: no allocator peak
        assert row["graphs_later"] == 0
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![step time]" in next(tmp_path.glob("*.md")).read_text()


def test_harness_refuses_gpu_workloads_on_cpu() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--workload", "gpt-124m"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "needs a CUDA device" in proc.stderr


def test_harness_help_lists_options() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for option in (
        "--workload",
        "--device",
        "--dtype",
        "--repeats",
        "--out",
        "--smoke",
    ):
        assert option in proc.stdout
    for workload in ("gpt-124m", "gpt-1.2b", "many-small"):
        assert workload in proc.stdout
