"""The demo runs end to end (eager engine only, to stay fast) and plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from umup_compile import demo


def test_demo_trains_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UMUP_COMPILE", "0")  # the compiled engine is tested elsewhere
    out = tmp_path / "loss.png"
    demo.main(["--steps", "20", "--every", "10", "--width", "16", "--plot", str(out)])
    text = capsys.readouterr().out
    assert "blocks.0.qkv" in text  # the describe() table
    assert "final loss: eager" in text
    losses = [float(v) for v in text.split("final loss: eager ")[1].split(",")[0:1]]
    assert losses[0] < 5.5  # log(256) ≈ 5.55 at the start: it learned something
    assert out.stat().st_size > 1000
