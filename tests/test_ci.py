"""The README's two commands are what CI runs, in a fresh venv, and nothing else.

README.md marks its set-up block (``<!-- readme-commands``); ``.ci/run`` extracts the
block from README.md, creates a fresh venv and runs each line in it as written. These
tests pin that contract without running it: the block holds exactly the two commands
(install with torch pinned, then the demo; the test suite), ``.ci/run --print`` shows
those very lines, and ``.ci/run`` installs nothing of its own.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-commands"


def _readme_commands() -> list[str]:
    """The lines of the fenced block after README.md's marker."""
    text = (ROOT / "README.md").read_text()
    assert text.count(MARKER) == 1, f"README.md must hold one {MARKER!r} marker"
    after = text.split(MARKER, 1)[1].split("\n", 1)[1]
    block = re.match(r"```bash\n(.*?)\n```", after, re.DOTALL)
    assert block, "the marker must sit on the line above a ```bash block"
    return [line for line in block[1].splitlines() if line.strip()]


def test_readme_block_holds_the_install_and_demo_then_the_tests() -> None:
    install, tests = _readme_commands()  # exactly two commands
    setup, demo = (shlex.split(part) for part in install.split(" && "))
    assert setup[:2] == ["pip", "install"], install
    # Pinned: on the CI machines only torch==2.13.0 is a local CPU build; an
    # unpinned torch would download a CUDA build of several GB.
    assert any(re.fullmatch(r"torch==\d+\.\d+\.\d+", arg) for arg in setup), install
    assert "-e" in setup and ".[test]" in setup, install
    assert demo == ["python", "-m", "umup_compile.demo"], install
    assert shlex.split(tests) == ["python", "-m", "pytest", "-q"], tests


def test_ci_runs_the_readme_commands_in_a_fresh_venv() -> None:
    done = subprocess.run(
        ["bash", ".ci/run", "--print"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == _readme_commands()
    script = (ROOT / ".ci" / "run").read_text()
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert any(" -m venv " in line for line in code)
    # Nothing installed beside the README's own commands.
    installs = [line for line in code if re.search(r"\bpip\b|install", line)]
    assert installs == [], "install steps belong in the README's commands"


def test_the_suite_runs_across_workers_file_by_file() -> None:
    """The README's ``python -m pytest -q`` runs on the machine's cores through
    pytest-xdist (a test extra); ``--dist loadfile`` keeps a file on one worker, so
    its module fixtures (the sm_90 lowering, ~25-40 s) are built once."""
    import tomllib

    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)
    extras = project["project"]["optional-dependencies"]["test"]
    assert any(req.startswith("pytest-xdist") for req in extras), extras
    opts = shlex.split(project["tool"]["pytest"]["ini_options"]["addopts"])
    assert opts[opts.index("-n") + 1] == "auto", opts
    assert opts[opts.index("--dist") + 1] == "loadfile", opts
    assert any(o.startswith("--maxprocesses=") for o in opts), opts
