"""``python -m benchmarks lowp-curve --smoke`` trains every setting and writes."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SETTINGS = ["fp32", "bf16-fp32state-sr", "bf16-fp32state-rtn", "bf16-bf16state"]


def test_bench_lowp_curve_smoke_writes_csv_md_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "lowp-curve", "--smoke"]
        + ["--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (csv_path,) = tmp_path.glob("*_lowp_curve_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 8  # --smoke: 8 steps
    assert list(rows[0]) == ["step", "lr", *(f"loss_{s}" for s in SETTINGS)]
    for row in rows:
        assert all(float(row[f"loss_{s}"]) > 0 for s in SETTINGS)
    # Same weights and batch: the first losses differ only by the bf16 forward.
    first = [float(rows[0][f"loss_{s}"]) for s in SETTINGS]
    assert max(first) - min(first) < 0.1
    md = next(tmp_path.glob("*.md")).read_text()
    assert "tail_mean_abs_gap_vs_fp32" in md and "![loss curves]" in md
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
