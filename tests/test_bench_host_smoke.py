"""``python -m benchmarks host --smoke`` runs end to end and writes its table and CSV."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_host_smoke_writes_table_and_csv(tmp_path: Path) -> None:
    out = tmp_path / "host.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "host", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| n_params | contestant |" in proc.stdout
    with out.open() as f:
        rows = list(csv.DictReader(f))
    by_name = {r["contestant"]: r for r in rows}
    assert set(by_name) == {
        "umup-compiled",
        "umup-compiled-groups",
        "umup-eager",
        "umup-eager-groups",
        "torch-fused",
        "torch-foreach",
    }
    assert all(float(r["us_per_param"]) > 0 for r in rows)
    assert by_name["torch-fused"]["ratio_vs_torch_fused"] == "1.00"
    assert by_name["umup-compiled-groups"]["vs_one_group"] != "-"
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# bench_host")
    assert f"- command: `python -m benchmarks host --smoke --out {out}`" in md
