"""``python -m benchmarks first-step --smoke``: cold, warm and portable-artifact steps.

Also the test of what the docs tell users about keeping compile artifacts: a
process on a filled Inductor cache directory, and one that loaded
``torch.compiler.save_cache_artifacts()``'s blob into an empty one, both compile
nothing (FX graph cache hits, no misses).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def test_first_step_cold_warm_and_artifacts(tmp_path: Path) -> None:
    out = tmp_path / "first_step.csv"
    temp = tmp_path / "temp"  # the run's temporary folders
    temp.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "first-step", "--smoke"]
        + ["--steady-steps", "2", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # removed with the run (the artifacts mode's empty cache was left behind)
    assert not [p.name for p in temp.iterdir() if p.name.startswith("first_step")]
    with out.open() as f:
        rows = {r["mode"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"cold", "warm", "artifacts"}, rows
    cold, warm, art = rows["cold"], rows["warm"], rows["artifacts"]
    assert int(cold["fx_cache_misses"]) >= 1 and int(cold["fx_cache_hits"]) == 0
    portable = hasattr(torch.compiler, "save_cache_artifacts")  # torch >= 2.7
    for row in (warm, art) if portable else (warm,):
        assert int(row["fx_cache_hits"]) >= 1, row
        assert int(row["fx_cache_misses"]) == 0, row
        assert int(row["graphs"]) == int(cold["graphs"]), row
    assert float(cold["first_step_s"]) > 0 and float(cold["cpp_compile_s"]) > 0
    assert (out.with_suffix(".md")).read_text().count("| cold |") == 1
