"""``python -m benchmarks transfer --smoke`` trains both sides and writes its files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE_WIDTHS = [16, 32]
SMOKE_GRIDS = {"u-μP": [-1, 0, 1], "SP": [-8, -7, -6]}


def test_transfer_smoke_writes_md_csv_json_png(tmp_path: Path) -> None:
    pytest.importorskip("unit_scaling", reason="the u-μP model is unit_scaling's")
    pytest.importorskip("matplotlib")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "transfer", "--smoke", "--threads", "1"]
        + ["--no-progress", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ext in ("md", "csv", "json", "png"):
        assert len(list(tmp_path.glob(f"*_transfer_t1.{ext}"))) == 1, ext

    # One seed-0 row per (parametrization, width, lr); --smoke reruns every optimum
    # and its neighbours with a 2nd seed.
    (csv_path,) = tmp_path.glob("*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    seed0 = sorted(
        (r["parametrization"], int(r["width"]), int(r["log2_lr"]))
        for r in rows
        if r["seed"] == "0"
    )
    expected = sorted(
        (kind, w, k)
        for kind, ks in SMOKE_GRIDS.items()
        for w in SMOKE_WIDTHS
        for k in ks
    )
    assert seed0 == expected
    assert any(r["seed"] == "1" for r in rows)
    for r in rows:
        assert r["diverged"] == "False", r
        assert 0 < float(r["val_loss"]) < 10, r
        assert float(2 ** int(r["log2_lr"])) == pytest.approx(float(r["lr"]))
        assert r["threads"] == "1" and r["torch"]
    # Same init, batches and schedule per seed: the SP and u-μP models are the same
    # size at each width.
    n = {(r["parametrization"], r["width"]): r["n_params"] for r in rows}
    assert all(n[("SP", str(w))] == n[("u-μP", str(w))] for w in SMOKE_WIDTHS)

    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {"header", "run", "runs", "points", "optima", "verdict"} <= set(doc)
    optima = {(o["parametrization"], o["width"]) for o in doc["optima"]}
    assert optima == {(k, w) for k in SMOKE_GRIDS for w in SMOKE_WIDTHS}
    for o in doc["optima"]:
        assert o["log2_lr"] in SMOKE_GRIDS[o["parametrization"]]
        assert o["seeds"] == 2
    assert set(doc["verdict"]) == set(SMOKE_GRIDS)
    assert doc["run"]["command"].startswith("python -m benchmarks transfer --smoke")
    assert "compiled" in doc["run"]["u-μP optimizer"]

    md = next(tmp_path.glob("*.md")).read_text()
    assert "## Optima" in md and "## Reading" in md and "![lr transfer]" in md
    png = next(tmp_path.glob("*.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_sp_model_mirrors_unit_scaling_transformer_decoder() -> None:
    """The SP baseline has unit_scaling's module names and shapes, without tags."""
    uu = pytest.importorskip("unit_scaling")
    from benchmarks.transfer_model import SpTransformerDecoder

    ref = uu.TransformerDecoder(32, 256, 2, 4)
    sp = SpTransformerDecoder(32, 256, 2, 4)
    assert [(n, p.shape) for n, p in sp.named_parameters()] == [
        (n, p.shape) for n, p in ref.named_parameters()
    ]
    assert not any(hasattr(p, "mup_type") for p in sp.parameters())
