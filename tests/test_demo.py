"""The demo runs end to end on a tiny model (eager engine, to stay fast) and plots."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch

from umup_compile import demo

TINY = ["--steps", "12", "--eager-steps", "4", "--every", "4", "--width", "16"]
TINY += ["--depth", "2", "--seq", "16"]


def _loss_rows(text: str) -> dict[int, list[float]]:
    """The side-by-side loss table: step -> the runs' losses."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 1 and cells[0].isdigit():
            rows[int(cells[0])] = [float(c) for c in cells[1:] if c]
    return rows


def _max_differences(text: str) -> dict[str, float]:
    pattern = r"max \|loss difference\| per step, (.+) vs umup compiled: (\S+)"
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text)}


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMUP_COMPILE", "0")  # the compiled engine is tested elsewhere


@pytest.mark.usefixtures("eager")
def test_demo_compares_with_unit_scaling_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "loss.png"
    threads = torch.get_num_threads()
    demo.main([*TINY, "--plot", str(out)])
    assert torch.get_num_threads() == threads  # --threads 1 applied to the demo only
    captured = capsys.readouterr()
    text = captured.out
    assert "bytes of pydoc_data" in text and "; 1 CPU thread(s)" in text
    # The short describe() summary: block 0 and the rest, not every block.
    assert "blocks.0.qkv" in text and "blocks.1.qkv" not in text
    assert "(blocks.1 repeats blocks.0; --describe prints every row)" in text
    rows = _loss_rows(text)
    assert sorted(rows) == [1, 4, 8, 12]
    assert [len(r) for r in rows.values()] == [3, 3, 2, 2]  # eager stops at step 4
    assert rows[1][0] == pytest.approx(5.55, abs=0.1)  # log(256): uniform bytes
    assert rows[12][0] < rows[1][0] - 0.2  # it learned
    diffs = _max_differences(text)
    assert set(diffs) == {"unit_scaling", "umup eager"}
    assert all(d < 1e-4 for d in diffs.values()), diffs
    assert re.search(r"unit_scaling: +[\d.]+ ms \( *[\d.]+x\)", text)
    # Redirected output: plain progress lines, no carriage returns anywhere.
    assert "\r" not in captured.out + captured.err
    assert "umup compiled: step 4/12" in captured.err
    assert out.stat().st_size > 1000


@pytest.mark.usefixtures("eager")
def test_demo_full_describe_and_no_unit_scaling(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "unit_scaling", None)  # import raises
    monkeypatch.setitem(sys.modules, "unit_scaling.optim", None)
    demo.main([*TINY, "--describe"])
    text = capsys.readouterr().out
    assert "blocks.1.qkv" in text and "total: 15 tensors" in text
    assert "unit_scaling is not installed" in text
    assert set(_max_differences(text)) == {"umup eager"}
    assert all(len(r) <= 2 for r in _loss_rows(text).values())


def test_progress_redraws_on_a_terminal_only() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        progress = demo.Progress(stream, every=5)
        for done in range(1, 11):
            progress.update("run", done, 10, 1.0)
    assert tty.getvalue().count("\r") == 10 and tty.getvalue().endswith("\n")
    assert tty.getvalue().count("\n") == 1
    assert log.getvalue().splitlines() == [
        "           run: step 5/10, loss 1.0000",
        "           run: step 10/10, loss 1.0000",
    ]


def test_text_batches_are_windows_of_the_corpus() -> None:
    data, source = demo.corpus()
    assert source == "pydoc_data" and len(data) > 100_000
    (tokens,) = demo.text_batches(data, seq=8, batch=3, steps=1, seed=0)
    assert tokens.shape == (3, 9) and int(tokens.max()) < 256
    text = bytes(data.tolist())
    assert all(bytes(row.tolist()) in text for row in tokens)
