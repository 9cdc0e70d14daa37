"""``python -m benchmarks quant8-train --smoke`` runs the integrated 8-bit optimizer
and writes its table and per-step errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_quant8_train_smoke_writes_rows_and_errors(tmp_path: Path) -> None:
    pytest.importorskip("unit_scaling")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "quant8-train", "--smoke"]
        + ["--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (table,) = tmp_path.glob("*_quant8_train_t1.csv")
    rows = list(csv.DictReader(table.open()))
    assert [(r["model"], r["state"]) for r in rows] == [
        ("TransformerDecoder", "float32"),
        ("TransformerDecoder", "int8"),
        ("demo TinyUmupLM", "float32"),
        ("demo TinyUmupLM", "int8"),
    ]
    for row in rows:
        if row["state"] == "int8":
            assert float(row["state_B_per_param"]) <= 2.2
            # half a code step of the block absmax: 1/254; v: 1/32 of it at most
            # (the max itself encodes exactly: Note [second-moment scale])
            assert 0 < float(row["m_err_max"]) <= 1 / 254 * 1.01
            assert 0 < float(row["v_err_max"]) <= 1 / 32 * 1.01
            assert 0 <= float(row["v_zeroed_max"]) < 0.01
            assert row["v_slack_oct"] == "0.00 / 0.00"
        else:
            assert row["m_err_max"] == "-" and float(row["state_B_per_param"]) == 8
    (errors,) = tmp_path.glob("*_errors.csv")
    steps = [r for r in csv.DictReader(errors.open()) if r["state"] == "int8"]
    assert len(steps) == 24 and all(float(r["m_max"]) > 0 for r in steps)
