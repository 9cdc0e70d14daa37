"""The sdist and wheel build, and the wheel works on its own from a fresh venv.

``python -m build`` runs without isolation (the test extra installs ``build`` and a
recent setuptools), on a copy of the checkout so the work tree stays untouched. The
wheel goes into a fresh venv, installed without an index or dependencies; then a
``.pth`` file adds the site directories of the interpreter running the tests, so the
venv sees the torch the user installed, whatever environment that is (a venv, conda,
uv, the system's Python, the user site), with no download. (``--system-site-packages``
would see only the *base* interpreter's packages: from a venv, no torch.) The check
runs from a temporary folder with ``python -I``, so nothing comes from the source tree
or ``PYTHONPATH``, and the venv's own site directory precedes the added ones:
``umup_compile.__file__`` must lie in the venv, not in the running environment (whose
install may be editable), and ``torch.__file__`` must be the running interpreter's.
"""

from __future__ import annotations

import email
import os
import shutil
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

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
    print(torch.__file__)
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


def _site_dirs() -> list[str]:
    """The running interpreter's site directories (with those of a base interpreter
    whose packages a venv sees, and the user site where it is on)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def test_wheel_imports_and_steps_in_a_fresh_venv(
    dists: tuple[Path, Path], tmp_path: Path
) -> None:
    _, wheel = dists
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
        "--no-index", "--quiet", wheel, cwd=tmp_path,
    )  # fmt: skip
    # After the install, so that pip sees an empty venv. addsitedir also runs the
    # .pth files there (an editable install's among them); they append to sys.path
    # and sys.meta_path, after the venv's own site directory.
    purelib = _run(
        python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
        cwd=tmp_path,
    ).strip()  # fmt: skip
    lines = [f"import site; site.addsitedir({d!r})\n" for d in _site_dirs()]
    (Path(purelib) / "_running_interpreter.pth").write_text("".join(lines))
    out = _run(python, "-I", "-c", SMOKE, cwd=tmp_path)
    torch_file, version, location = out.split()
    assert version == umup_compile.__version__
    assert Path(location).is_relative_to(venv.resolve())
    assert Path(torch_file).resolve() == Path(torch.__file__).resolve()
