"""Sphinx configuration: API reference (autodoc + napoleon) and guides (doctested).

Build: ``python -m sphinx -W --keep-going docs docs/_build/html``; run the examples:
``python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest``.
``tests/test_docs.py`` runs both, so CI fails on a warning or a wrong example.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

# Build from a checkout without installing: the package sits beside docs/.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

import umup_compile  # noqa: E402

project = "umup_compile"
author = "The umup_compile authors"
copyright = "2026, The umup_compile authors"
release = umup_compile.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build"]
html_theme = "alabaster"  # built in: no extra dependency
html_theme_options = {"page_width": "1200px", "sidebar_width": "240px"}
html_static_path: list[str] = []

# Google-style docstrings (STYLE.md §5).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"exclude-members": "__init__, __new__"}

# Examples run on CPU from a fixed seed, on one thread (tiny tensors; and no OpenMP
# stalls on a busy CI machine); ``examples/tiny_lm.py`` (shown in the quick start)
# provides the model. UMUP_COMPILE is cleared so that each example's own ``compile=``
# choice is what runs.
_EXAMPLES = os.path.join(_HERE, "examples")
doctest_global_setup = f"""
import os, sys
os.environ.pop("UMUP_COMPILE", None)
sys.path.insert(0, {_EXAMPLES!r})
import torch
from tiny_lm import TinyLM, batch
torch.set_num_threads(1)
torch.manual_seed(0)
"""
doctest_default_flags = 0  # exact output: no ELLIPSIS unless a block asks for it


def _public_bases(
    app: Any, name: str, obj: Any, options: Any, bases: list[Any]
) -> None:
    """Show ``torch.optim.Adam``, not the private mixin, as an optimizer's base."""
    bases[:] = [
        f"``{b.__module__.rsplit('.', 1)[0]}.{b.__qualname__}``"
        if b.__module__.startswith("torch.optim.")
        else b
        for b in bases
        if not b.__module__.startswith("umup_compile._")
    ]


# An Args entry whose parameter names wrap onto a second, deeper-indented line
# ("lr, betas, ...,\n    fused: as torch") reads as two entries to napoleon; join them.
_WRAPPED_NAMES = re.compile(r"\s+[\w, ]+,")
_NAMES_TAIL = re.compile(r"\s+[\w, ]+:\s.*")


def _join_wrapped_names(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Join a parameter-name list wrapped over two lines before napoleon parses it."""
    i = 0
    while i < len(lines) - 1:
        line, nxt = lines[i], lines[i + 1]
        indent = len(line) - len(line.lstrip())
        deeper = len(nxt) - len(nxt.lstrip()) > indent
        if _WRAPPED_NAMES.fullmatch(line) and deeper and _NAMES_TAIL.fullmatch(nxt):
            lines[i : i + 2] = [f"{line.rstrip()} {nxt.strip()}"]
        else:
            i += 1


def setup(app: Any) -> None:
    app.connect("autodoc-process-bases", _public_bases)
    # Before napoleon's own handler (priority 500) turns the sections into fields.
    app.connect("autodoc-process-docstring", _join_wrapped_names, priority=400)
