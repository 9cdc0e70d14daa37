"""The sdist and wheel build, and the wheel works on its own from a fresh venv.

``python -m build`` runs without isolation (the test extra installs ``build`` and a
recent setuptools), on a copy of the checkout so the work tree stays untouched. The
wheel goes into a venv that sees the system's torch (``--system-site-packages``, no
download), and the check runs from a temporary folder with ``python -I``, so nothing
can be imported from the source tree: ``umup_compile.__file__`` must lie in the venv.
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import umup_compile

ROOT = Path(__file__).resolve().parents[1]
# Build outputs, caches and VCS data of the checkout: never part of a distribution.
JUNK = shutil.ignore_patterns(
    ".git", "*.egg-info", "build", "dist", "_build", "__pycache__", ".*cache",
    ".hypothesis", ".benchmarks",
)  # fmt: skip

# Run inside the venv: import, check the version and the typing marker, step.
SMOKE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import umup_compile as uc
    from umup_compile.optim import AdamW

    pkg = Path(uc.__file__).resolve().parent
    assert pkg.is_relative_to(Path(sys.prefix).resolve()), (pkg, sys.prefix)
    assert (pkg / "py.typed").is_file()
    w = uc.Parameter(torch.randn(8, 4), "weight", mup_scaling_depth=2)
    before = w.detach().clone()
    opt = AdamW([w], lr=0.1, weight_decay=0.01, compile=False)
    w.square().sum().backward()
    opt.step()
    assert not torch.equal(w, before)
    print(uc.__version__, pkg)
    """
)


def _run(*cmd: str | Path, cwd: Path) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Build the sdist, then the wheel from it (build's default), from a copy."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=JUNK)
    out = tmp / "dist"
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src, cwd=tmp)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def test_wheel_has_version_license_and_typing_marker(dists: tuple[Path, Path]) -> None:
    sdist, wheel = dists
    version = umup_compile.__version__
    assert wheel.name == f"umup_compile-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"umup_compile-{version}.dist-info"
        metadata = email.message_from_bytes(zf.read(f"{info}/METADATA"))
        license_text = zf.read(f"{info}/licenses/LICENSE").decode()
    assert "umup_compile/py.typed" in names
    assert metadata["Version"] == version
    assert metadata["License-Expression"] == "MIT"
    assert license_text == (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"LICENSE", "pyproject.toml", "umup_compile/py.typed"} <= members


def test_wheel_imports_and_steps_in_a_fresh_venv(
    dists: tuple[Path, Path], tmp_path: Path
) -> None:
    _, wheel = dists
    venv = tmp_path / "venv"
    _run(
        sys.executable,
        "-m",
        "venv",
        "--system-site-packages",
        "--without-pip",
        venv,
        cwd=tmp_path,
    )
    python = venv / "bin" / "python"
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
        "--no-index", "--force-reinstall", "--quiet", wheel, cwd=tmp_path,
    )  # fmt: skip
    out = _run(python, "-I", "-c", SMOKE, cwd=tmp_path)
    version, location = out.split()
    assert version == umup_compile.__version__
    assert Path(location).is_relative_to(venv.resolve())
