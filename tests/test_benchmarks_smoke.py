"""bench_step.py --smoke runs end to end and writes its table and CSV."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step.py"

# Eager contestants plus one Inductor compile of the tiny set (~15-30 s on 2 cores).
SMOKE_CONTESTANTS = ["umup-compiled", "umup-eager", "us-default", "torch-fused"]


def test_bench_step_smoke_writes_table_and_csv(tmp_path: Path) -> None:
    pytest.importorskip("unit_scaling")
    out = tmp_path / "smoke.csv"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--smoke",
            "--contestants",
            ",".join(SMOKE_CONTESTANTS),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| contestant |" in proc.stdout
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["contestant"] for r in rows] == SMOKE_CONTESTANTS
    for row in rows:
        assert float(row["median_ms"]) > 0
        assert row["graphs_later"] == "0", (
            f"{row['contestant']} recompiled under LambdaLR"
        )
        assert "FELL BACK" not in row["note"], row["note"]
    assert out.with_suffix(".md").read_text().startswith("# bench_step")


def test_bench_step_help_lists_options() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for option in (
        "--set",
        "--repeats",
        "--threads",
        "--out",
        "--contestants",
        "--smoke",
    ):
        assert option in proc.stdout
