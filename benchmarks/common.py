"""What every result file carries: the run header, the output folder and the writers.

Kept free of ``test_`` names so that pytest never collects it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import umup_compile as uc

REPO = Path(__file__).resolve().parent.parent
# One folder per device: results/<device slug>/<date>_<workload>_t<threads>[_<tag>].*
RESULTS = Path(__file__).resolve().parent / "results"


# -- header -------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|processor|\d+-core|@.*$", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """Short device name for file names: ``cpu-amd-epyc``, ``cuda-nvidia-h100-...``."""
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    return f"{device.type}-" + _slug(cpu_name())


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def git_commit() -> str:
    """Commit of the ``umup_compile`` that was imported.

    ``<sha>`` when it is this repository's package at HEAD, ``<sha>-dirty`` when
    ``umup_compile/`` has local edits, and ``<path> (repo HEAD <sha>)`` when the package was
    imported from elsewhere (e.g. a ``git archive`` snapshot on ``PYTHONPATH``).
    """
    package = Path(uc.__file__).resolve().parent
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        if package != REPO / "umup_compile":
            return f"{package} (repo HEAD {commit})"
        dirty = _git("status", "--porcelain", "--", "umup_compile")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


# The header facts (see ``header``) that every CSV row repeats, in column order.
RUN_COLUMNS = [
    "date",
    "device",
    "device_name",
    "threads",
    "torch",
    "triton",
    "python",
    "commit",
]


def header(device: torch.device) -> dict[str, str]:
    """Facts every result carries: device, software versions, threads, commit, date."""
    info = {
        "date": _dt.date.today().isoformat(),
        "device": device_slug(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        ),
        "cpu": cpu_name(),
        "cpu_count": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    try:
        import triton  # type: ignore[import-not-found]

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "-"
    return info


# -- output -------------------------------------------------------------------------


def as_number(value: Any, *, text_as_none: bool = False) -> Any:
    """A number kept as a formatted string (for a table) back to a number (for JSON).

    Other strings (a note such as "timeout") stay as they are, or become ``None`` with
    ``text_as_none``.
    """
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return None if text_as_none else value


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(
    path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out FOLDER``, the folder ``output_dir`` resolves."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results/<device>/; with --smoke, a "
        "temporary directory)",
    )


def output_dir(out: Path | None, smoke: bool, head: dict[str, str], name: str) -> Path:
    """``--out``, else a temporary folder for ``--smoke``, else ``results/<device>/``."""
    if out is None and smoke:
        out = Path(tempfile.mkdtemp(prefix=f"bench_{name}_smoke_"))
    elif out is None:
        out = RESULTS / head["device"]
    out.mkdir(parents=True, exist_ok=True)
    return out


def md_head(
    title: str,
    head: dict[str, str],
    run: dict[str, Any],
    command: str,
    smoke: bool,
) -> str:
    """A result file's markdown up to its tables: title, header, run settings, command."""
    smoke_note = "(smoke sizes: the numbers mean nothing)\n\n" if smoke else ""
    return (
        f"# {title}\n\n{smoke_note}"
        + "\n".join(f"- {k}: {v}" for k, v in head.items())
        + "\n"
        + "\n".join(f"- {k}: {v}" for k, v in run.items() if k != "command")
        + f"\n- command: `{command}`\n\n"
    )
