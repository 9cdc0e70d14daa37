"""The benchmarks' front door: ``python -m benchmarks <workload> [options]``.

Every workload of the registry shows its own ``--help``; the list shows without
importing torch; the committed results sit in one folder per device, and the
command each one names (the newest, where a file names two) still parses.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, step_report
from benchmarks.__main__ import WORKLOADS, main

REPO = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"^- command(?: \(since [\d-]+\))?: `([^`]*)`", re.M)
RESULT_NAME = re.compile(r"\d{4}-\d\d-\d\d_[a-z0-9_.-]+\.(md|csv|json|png)")


def test_front_door_lists_every_workload_without_importing_torch() -> None:
    code = (
        "import sys; from benchmarks.__main__ import main; rc = main(['--help']); "
        "assert 'torch' not in sys.modules, 'the list imported torch'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = re.findall(r"^  (\S+)  ", proc.stdout, re.M)
    assert listed == list(WORKLOADS)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_front_door_help_of_each_workload(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m benchmarks {name} ")
    assert "--" in out  # its options, not the front door's list


def test_front_door_refuses_an_unknown_workload_and_names_the_new_form(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["gtp"]) == 2
    assert "unknown workload 'gtp'" in capsys.readouterr().err
    # The step harness's old flag: the workload now comes first.
    assert main(["--workload", "many-small", "--threads", "1"]) == 2
    assert "python -m benchmarks many-small [options]" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.parametrize(
    ("workload", "n_small", "device", "dtype", "stem"),
    [
        ("gpt", 256, "cpu", "float32", "D_gpt_t2"),
        ("gpt", 256, "cpu", "bf16-fp32state", "D_gpt_t2_bf16-fp32state"),
        ("many-small", 256, "cpu", "float32", "D_many-small_t2"),
        ("many-small", 2000, "cpu", "float32", "D_many-small2000_t2"),
        ("gpt-124m", 256, "cuda", "float32", "D_gpt-124m"),
    ],
)
def test_step_report_names_files_by_date_workload_and_settings(
    workload: str, n_small: int, device: str, dtype: str, stem: str
) -> None:
    args = argparse.Namespace(
        workload=workload, n_small=n_small, device=device, dtype=dtype
    )
    assert step_report.stem(args, {"date": "D", "threads": "2"}) == stem


def _committed_commands() -> list[tuple[Path, str]]:
    found = []
    for md in sorted(common.RESULTS.rglob("*.md")):
        commands = COMMAND.findall(md.read_text())
        if commands:
            found.append((md, commands[-1]))  # the "since" line follows the original
    return found


COMMITTED = _committed_commands()


def test_results_are_one_folder_per_device_named_by_date_and_workload() -> None:
    files = [p for p in common.RESULTS.rglob("*") if p.is_file()]
    assert files
    for path in files:
        device = path.relative_to(common.RESULTS).parts[0]
        assert path.parent == common.RESULTS / device, path
        if path.name == "README.md":  # a folder may say how its files were made
            continue
        assert RESULT_NAME.fullmatch(path.name), path.name
        assert device not in path.name, path.name  # the folder names the device
    assert len(COMMITTED) >= 30


@pytest.mark.parametrize(
    ("md", "command"), COMMITTED, ids=[md.stem for md, _ in COMMITTED]
)
def test_committed_result_names_a_command_that_parses(md: Path, command: str) -> None:
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    if words[2] == "benchmarks":  # the front door
        workload = WORKLOADS[words[3]]
        module, argv = workload.module, [*workload.args, *words[4:]]
    else:  # a workload's module run directly: python -m benchmarks.<module>
        module, argv = words[2], words[3:]
    assert importlib.import_module(module).parse_args(argv) is not None


def test_benchmark_modules_use_only_names_their_sibling_modules_have() -> None:
    """``module.name`` in each benchmark script names something that module has:
    a helper moved between ``common`` and ``sets`` once broke ``sr-shapes`` at its
    first line, and only a run of that workload would have shown it."""
    root = Path(common.__file__).parent
    missing = []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        siblings = {
            alias.asname or alias.name: alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks"
            for alias in node.names
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in siblings
            ):
                module = importlib.import_module(
                    f"benchmarks.{siblings[node.value.id]}"
                )
                if not hasattr(module, node.attr):
                    missing.append(
                        f"{path.name}:{node.lineno} {node.value.id}.{node.attr}"
                    )
    assert not missing, missing
