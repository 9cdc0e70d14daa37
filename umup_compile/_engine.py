"""Engines that run a functional update: eager, or compiled once per static config.

``torch.compile`` appears only in :func:`_compile`. A compiled engine keeps one compiled
callable per (function, config); hyper-parameters are tensors, so schedules never
recompile. Fallbacks are chosen in one place, :func:`choose_engine`, and announced once.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

StepFn = Callable[..., None]


def run_eager(fn: StepFn, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Run ``fn`` directly (also the path used when an outer compile is tracing)."""
    fn(*args, **kwargs)


def _compile(fn: StepFn, config: Hashable) -> StepFn:
    """Compile ``fn`` with its static config bound: one graph, no dynamic shapes."""
    bound = functools.partial(fn, config=config)
    return torch.compile(bound, fullgraph=True, dynamic=False)  # type: ignore[return-value]


class CompiledEngine:
    """Runs functional updates through ``torch.compile``; falls back to eager once.

    Args:
        strict: raise instead of falling back when compilation fails.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.failed: str | None = None
        self._cache: dict[tuple[StepFn, Hashable], StepFn] = {}

    def __call__(self, fn: StepFn, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        config = kwargs["config"]
        rest = {k: v for k, v in kwargs.items() if k != "config"}
        # Note [nested compile]: inside a user's compiled region, inline the raw function.
        if self.failed is not None or torch.compiler.is_compiling():
            fn(*args, **kwargs)
            return
        key = (fn, config)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._cache[key] = _compile(fn, config)
        try:
            compiled(*args, **rest)
        except Exception as e:  # noqa: BLE001 - any backend failure means "cannot compile"
            if self.strict or not _is_compile_failure(e):
                raise
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(
                "umup_compile: torch.compile failed, falling back to the eager engine "
                f"(same numbers, slower). Reason: {self.failed}. Pass compile=False to "
                "choose eager silently, or compile='strict' to raise instead.",
                RuntimeWarning,
                stacklevel=3,
            )
            fn(*args, **kwargs)


def _is_compile_failure(e: Exception) -> bool:
    """Whether ``e`` came from Dynamo/Inductor rather than from the update itself."""
    module = type(e).__module__ or ""
    if module.startswith(("torch._dynamo", "torch._inductor")):
        return True
    return "compile" in type(e).__name__.lower() or "inductor" in str(e).lower()


Engine = Callable[[StepFn, tuple[Any, ...], dict[str, Any]], None]


def choose_engine(
    compile: bool | str, *, env: bool | str | None, differentiable: bool
) -> tuple[Engine, str | None]:
    """Pick the engine; return it with the reason when eager replaces compiled.

    Args:
        compile: ``True`` (compiled, falling back to eager on failure), ``"strict"``
            (compiled, raising on failure) or ``False`` (eager).
        env: the value of ``UMUP_COMPILE`` (``None`` when unset); it overrides
            ``compile``.
        differentiable: autograd through the step needs the eager engine.

    Raises:
        ValueError: ``compile`` is not one of the accepted values.
    """
    if compile not in (True, False, "strict"):
        raise ValueError(f"compile={compile!r} is not supported; use True, False or 'strict'.")
    mode = compile if env is None else env
    if mode is False:
        return run_eager, None
    if differentiable:
        return run_eager, "differentiable=True needs autograd through the step"
    return CompiledEngine(strict=mode == "strict"), None
