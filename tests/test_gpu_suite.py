"""``benchmarks/gpu_suite.sh``, the one command for a lent GPU, kept working on a CPU.

Its dry run prints every command it would run; each Python command must parse (its
module's own ``parse_args``), the time limits must fit in eight minutes, and the
measuring module runs here on the CPU on a tiny workload.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STEP = re.compile(r"^\+ \[([\w.-]+), (\d+)s\] (.*)$")


def dry_run(tmp_path: Path) -> list[tuple[str, int, list[str]]]:
    done = subprocess.run(
        ["bash", str(SUITE), "--dry-run"],
        cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    steps = []
    for line in done.stdout.splitlines():
        match = STEP.match(line)
        assert match, line
        name, limit, command = match.groups()
        steps.append((name, int(limit), shlex.split(command)))
    return steps


def test_dry_run_lists_every_step_within_eight_minutes(tmp_path: Path) -> None:
    steps = dry_run(tmp_path)
    names = [name for name, _, _ in steps]
    assert names[:3] == ["install", "env", "gpu-tests"]
    assert "measure" in names and names[-1] == "codegen"
    assert sum(name.startswith("harness-") for name in names) == 3
    wheels = 30 + 5  # the wheel step, when wheels/ holds one
    assert sum(limit + 5 for _, limit, _ in steps) + wheels <= 8 * 60


def test_every_python_command_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import gpu_codegen, gpu_measure, step

    # the harness refuses its GPU-only workloads on a machine without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parsers = {
        "benchmarks": step.parse_args,  # python -m benchmarks <step workload> ...
        "benchmarks.gpu_measure": gpu_measure.parse_args,
        "benchmarks.gpu_codegen": gpu_codegen.parse_args,
    }
    seen = set()
    for _, _, command in dry_run(tmp_path):
        if command[1:3] == ["-m", "pytest"]:
            assert (ROOT / command[-2]).is_dir(), command
            continue
        if command[1:2] != ["-m"] or command[2] not in parsers:
            continue
        parsers[command[2]](command[3:])  # argparse exits on a bad argument
        seen.add(command[2])
    assert seen == set(parsers)


def test_measure_runs_on_the_cpu() -> None:
    from benchmarks import gpu_measure

    result = gpu_measure.measure(
        "many-small-mini",
        "fp32",
        torch.device("cpu"),
        repeats=2,
        warmup=1,
        compile=False,
    )
    assert result["params"] == 32 * 1024
    assert result["umup_ms"] > 0 and result["torch_fused_ms"] > 0
    assert result["umup_kernels"] is None  # counted on CUDA only
    assert result["umup_sync_check"].startswith("not checked")
