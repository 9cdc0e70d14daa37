"""The documentation builds with warnings as errors, and its examples are true.

Runs the two commands of ``docs/conf.py`` in subprocesses (the examples change global
torch state): the HTML build, with ``-W --keep-going``, and Sphinx's doctest builder,
which executes every ``testcode`` block of the guides and compares its output. Then
every public symbol must have its own entry in the API reference. The README's Python
example runs too, and every docs page it links to exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import umup_compile
import umup_compile.distributed
import umup_compile.optim
from tests.helpers import needs_traced_step

# The test extra installs the docs extra; CI (CI=true) must never skip this silently.
if os.environ.get("CI"):
    import sphinx  # noqa: F401
else:
    pytest.importorskip("sphinx", reason="the docs extra: pip install -e '.[docs]'")

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = [
    "quickstart", "rules", "engines", "schedulers", "gradscaler", "clipping",
    "compiled_step", "low_precision", "distributed", "migration", "benchmarks",
    "troubleshooting", "development", "gpu_on_cpu",
]  # fmt: skip
README = DOCS.parent / "README.md"
# distributed has no __all__: its public functions, and the Tags alias.
DISTRIBUTED_API = [
    name
    for name, obj in vars(umup_compile.distributed).items()
    if not name.startswith("_")
    and getattr(obj, "__module__", None) == umup_compile.distributed.__name__
] + ["Tags"]


def _sphinx(builder: str, out: Path) -> str:
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder]
    done = subprocess.run(
        [*cmd, str(DOCS), str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"sphinx -b {builder} failed:\n{done.stderr[-6000:]}"
    return done.stderr


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html")
    _sphinx("html", out)
    return out


@needs_traced_step  # the pages show a user-compiled step, and FSDP2 on CPU (2.7+)
def test_docs_examples_run_and_print_what_they_show(tmp_path: Path) -> None:
    _sphinx("doctest", tmp_path)
    summary = (tmp_path / "output.txt").read_text()
    totals = re.search(r"Doctest summary\s+=+\s+(\d+) tests", summary)
    assert totals, summary
    tests = int(totals[1])
    assert tests >= 20, summary
    assert "0 failures in tests" in summary, summary


def test_docs_reference_every_public_symbol(html: Path) -> None:
    api = (html / "api.html").read_text()
    public = [f"umup_compile.{n}" for n in umup_compile.__all__ if n != "optim"]
    public += [f"umup_compile.optim.{n}" for n in umup_compile.optim.__all__]
    public += [f"umup_compile.distributed.{n}" for n in DISTRIBUTED_API]
    public.append("umup_compile.__version__")
    missing = [name for name in public if f'id="{name}"' not in api]
    assert not missing, f"no API entry for {missing}"
    for method in ("step", "zero_grad", "add_param_group", "load_state_dict"):
        assert f'id="umup_compile.optim.AdamW.{method}"' in api


def test_docs_have_every_guide_and_the_benchmark_plots(html: Path) -> None:
    index = (html / "index.html").read_text()
    assert all(f'href="{guide}.html"' in index for guide in GUIDES)
    plots = re.findall(
        r'src="_images/([^"]+\.png)"', (html / "benchmarks.html").read_text()
    )
    assert len(plots) == 4 and all((html / "_images" / p).stat().st_size for p in plots)


def test_readme_links_exist_and_its_python_example_runs(tmp_path: Path) -> None:
    text = README.read_text()
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", text)
    assert {f"docs/{guide}.rst" for guide in GUIDES} <= set(links)
    missing = [link for link in links if not (README.parent / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    script = tmp_path / "readme_example.py"
    script.write_text("\n".join(blocks))
    # The eager engine runs the same update without the compile (the doctests compile):
    # this checks the example's API, in seconds.
    env = {**os.environ, "UMUP_COMPILE": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lr scale" in done.stdout  # the describe() table it prints
