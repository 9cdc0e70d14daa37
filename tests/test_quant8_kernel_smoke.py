"""``python -m benchmarks quant8-kernel --smoke --floor`` times the 8-bit update beside
torch fused and the bytes floor (the same reads and writes, trivial arithmetic)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quant8_kernel_smoke_writes_the_update_and_its_bytes_floor(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "quant8-kernel", "--smoke", "--floor"]
        + ["--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (table,) = tmp_path.glob("*_quant8_gpt_t1.csv")
    rows = {r["contestant"]: r for r in csv.DictReader(table.open())}
    assert {"torch-fused", "umup 8-bit", "bytes floor"} <= set(rows)
    for name in ("umup 8-bit", "bytes floor"):
        assert float(rows[name]["median_ms"]) > 0
        # the floor moves the update's state: the same bytes per parameter
        assert (
            rows[name]["state_B_per_param"] == rows["umup 8-bit"]["state_B_per_param"]
        )
