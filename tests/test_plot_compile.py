"""``python -m benchmarks compile-plot`` combines compile CSVs into one table and plot."""

from __future__ import annotations

from pathlib import Path

from benchmarks.__main__ import main

HEADER = "n_tensors,contestant,first_step_s,load_before,status,timeout_s\n"


def test_plot_compile_combines_runs(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text(HEADER + "50,umup,15.9,1.0,ok,300\n2000,umup,14.4,1.0,ok,300\n")
    b.write_text(
        HEADER + "50,ref,72.3,6.4,ok,600\n2000,ref,timeout (> 600 s),,timeout,600\n"
    )
    assert (
        main(["compile-plot", str(a), str(b), "--out", str(tmp_path / "combined")]) == 0
    )
    table = (tmp_path / "combined.md").read_text()
    assert "| umup | 15.9 (1.0) | 14.4 (1.0) |" in table
    assert "| ref | 72.3 (6.4) | timeout (> 600 s) (?) |" in table
    assert (tmp_path / "combined.png").stat().st_size > 0
