"""``python -m benchmarks.quant_maps --smoke`` trains every variant and writes its files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_quant_maps_smoke_writes_md_and_csvs(tmp_path: Path) -> None:
    pytest.importorskip("unit_scaling", reason="the model is unit_scaling's")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quant_maps", "--smoke", "--out"]
        + [str(tmp_path), "--maps", "log2,linear", "--rounding", "nearest"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = tmp_path.glob("*_quant_maps_t1.csv")
    rows = list(csv.DictReader(summary.open()))
    assert [(r["model"], r["variant"]) for r in rows] == [
        (model, variant)
        for model in ("TransformerDecoder", "demo TinyUmupLM")
        for variant in ("fp32", "log2/nearest", "linear/nearest")
    ]
    fp32 = [r for r in rows if r["variant"] == "fp32"]
    assert all(r["vs_fp32_pct"] == "+0.00" and r["m_err_max"] == "-" for r in fp32)
    log2 = [r for r in rows if r["variant"] == "log2/nearest"]
    # half a code step of the absmax (the CSV keeps 3 digits)
    assert all(0 < float(r["m_err_max"]) <= 1.01 / 254 for r in log2)
    (errors,) = tmp_path.glob("*_errors.csv")
    assert len(list(csv.DictReader(errors.open()))) == 6 * 24  # every step, each run
    assert len(list(tmp_path.glob("*.md"))) == 1
