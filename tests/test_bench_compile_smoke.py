"""``python -m benchmarks compile --smoke`` runs and writes its md, CSV, JSON and PNG."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import bench_compile

REPO = Path(__file__).resolve().parent.parent
CONTESTANTS = ["umup", "unit_scaling_compiled"]
SMOKE_COUNTS = [4, 8]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "compile", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_compile_smoke_writes_table_csv_json_png(tmp_path: Path) -> None:
    pytest.importorskip("unit_scaling")
    pytest.importorskip("matplotlib")
    # In-process with aot_eager: one interpreter, ~20 s on 2 cores (a fresh process per
    # point would double that; the subprocess path has its own test below).
    proc = _run("--smoke", "--in-process", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| n_tensors | contestant |" in proc.stdout
    for ext in ("md", "csv", "json", "png"):
        assert len(list(tmp_path.glob(f"*_compile_t2_aot_eager.{ext}"))) == 1, ext

    expected = [(n, c) for n in SMOKE_COUNTS for c in CONTESTANTS]
    (csv_path,) = tmp_path.glob("*.csv")
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["n_tensors"]), r["contestant"]) for r in rows] == expected
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["first_step_s"]) > 0 and float(row["steady_ms"]) > 0
        assert row["graphs_later"] == "0", f"{row['contestant']} recompiled"
        assert "FELL BACK" not in row["note"], row["note"]

    (md,) = tmp_path.glob("*.md")
    table_rows = [
        tuple(cell.strip() for cell in line.strip("|").split("|")[:2])
        for line in md.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| n_tensors")
    ]
    assert table_rows == [(str(n), c) for n, c in expected]

    (js,) = tmp_path.glob("*.json")
    doc = json.loads(js.read_text())
    assert {"device", "device_name", "torch", "threads", "commit"} <= set(doc["header"])
    assert doc["run"]["backend"] == "aot_eager" and doc["run"]["smoke"] is True
    assert all(isinstance(p["first_step_s"], float) for p in doc["points"])


@pytest.fixture
def keep_threads() -> Iterator[None]:
    """main() pins torch's thread count for its workers; restore it for other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("keep_threads")
def test_bench_compile_timeout_is_recorded_not_raised(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    # The driver runs here; its fresh worker process cannot even import torch in
    # 0.5 s, so the point must come back as a timeout row and the files still be written.
    argv = ["--counts", "4", "--contestants", "umup", "--backend", "aot_eager"]
    assert bench_compile.main([*argv, "--timeout", "0.5", "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("*.csv")
    with csv_path.open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "timeout"
    assert row["first_step_s"] == "timeout (> 0.5 s)"
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_bench_compile_help_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_compile.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--counts",
        "--contestants",
        "--threads",
        "--timeout",
        "--backend",
        "--out",
        "--smoke",
    ):
        assert option in out
