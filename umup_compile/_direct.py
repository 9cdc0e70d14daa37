"""Direct calls: a steady step runs its compiled graph without going through Dynamo.

Note [direct calls]: a compiled call costs Dynamo's frame evaluation, its guards (a
dtype/shape/stride/aliasing check of every input tensor) and its wrappers before the
graph runs: ~0.4 ms of a 16.8 ms GPT-like step at 1 thread (51 parameters, 204
tensors), which made it 1.07x torch's fused Adam. The runner already knows most of
what those guards check: a call site (one unit call of a layout) is rebuilt whenever
its ``SteadyCheck`` fails, so at a steady step the site's list arguments hold the same
parameters and state tensors (same dtype, device, shape and strides), and gradients
of the same dtype, device and shape that reach the graph contiguous, as at the site's
first call. That first call goes through Dynamo; :class:`Capture` (the backend
wrapper) records which compiled graph ran and where each of its inputs came from (the
placeholders' sources: ``L['grads'][3]``, or ``L['params'][0].size()[0]`` for a
symbolic size). Later calls at the site pick the inputs straight from the arguments
and call that graph (AOTAutograd's and Inductor's wrappers included).

A site checks what the runner does not vouch for before each direct call: the
arguments' structure (list lengths, which optional tensors are given, and the
keywords' names in order: two 0-d float32 keywords, a GradScaler's ``grad_scale_t``
and ``found_inf_t``, have the same structure, and Dynamo matches them by name), the
dtype/device/shape/strides of its loose tensors (hyper-parameter rows, factor vectors,
scales), grad mode, Dynamo's stance, the absence of torch function and dispatch modes,
and that ``torch._dynamo.reset()`` has not emptied Dynamo's cache (after a reset the
next call compiles again, as any compiled function's would). A graph it cannot read
(an input from elsewhere than an argument, its item or a size; outputs; one tensor
passed twice) leaves the site on the Dynamo path.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import re
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._gather import picker

# Dynamo's names for an argument, an item of a list argument, and a dimension's size
# of either (a dynamic-shape graph's symbolic sizes).
_SOURCE = re.compile(r"^L\['(\w+)'\](?:\[(\d+)\])?(?:\.size\(\)\[(\d+)\])?$")
Source = tuple[str, int | None, int | None]  # argument, item, dimension
_NONE, _TENSOR, _OTHER = -1, -2, -3

try:  # Dynamo's cache of a code object (emptied by torch._dynamo.reset())
    from torch._C._dynamo.eval_frame import (
        _debug_get_cache_entry_list as _cache_entries,
    )
except ImportError:  # pragma: no cover - every supported torch has it

    def _cache_entries(code: types.CodeType) -> list[Any]:  # type: ignore[misc]
        return [code]


def _name(source: Any) -> str:
    name = source.name  # a method before torch 2.10, a property after
    return str(name() if callable(name) else name)


class Graph:
    """A compiled graph and, per input, its :data:`Source`; ``sources`` is None when
    some input comes from elsewhere (no direct calls)."""

    def __init__(self, gm: torch.fx.GraphModule, compiled: Callable[..., Any]) -> None:
        self.compiled = compiled
        self.sources: list[Source] | None = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                arg = node.meta.get("grapharg")
                match = _SOURCE.match(_name(arg.source)) if arg is not None else None
                if match is None:
                    self.sources = None
                    return
                name, item, dim = match.groups()
                self.sources.append(
                    (
                        name,
                        None if item is None else int(item),
                        None if dim is None else int(dim),
                    )
                )
            elif node.op == "output" and node.args not in (((),), ([],), (None,)):
                self.sources = None  # Dynamo would do something with the outputs
                return


class Capture:
    """A ``torch.compile`` backend wrapping ``inner`` that records, in :attr:`last`,
    the :class:`Graph` each compiled call ran (several exist after recompiles)."""

    def __init__(self, inner: Any, code: types.CodeType | None = None) -> None:
        self.inner = inner
        self.code = code  # of the compiled function: its cache tells of a reset
        self.last: Graph | None = None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        compiled = self.inner(gm, example_inputs)
        graph = Graph(gm, compiled)

        def run(*args: Any) -> Any:
            self.last = graph
            return compiled(*args)

        return run

    def __getattr__(self, name: str) -> Any:  # compiler_name, get_compiler_config...
        if "inner" not in self.__dict__:  # not yet initialised (copy, pickle)
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)


def _shape_of(value: Any) -> int:
    """A slot's structure: its length (a list), or whether it is a tensor or None."""
    if type(value) in (list, tuple):
        return len(value)
    if value is None:
        return _NONE
    return _TENSOR if isinstance(value, Tensor) else _OTHER


def _meta(t: Tensor) -> tuple[Any, ...]:
    return (t.dtype, t.device, t.shape, t.stride())


# Looked up once: _device_modes_only runs at every direct call under a default device.
# Private names of torch 2.6 to 2.13; without them every torch function mode counts.
_function_modes: Callable[[], list[Any]] | None = getattr(
    torch.overrides, "_get_current_function_mode_stack", None
)
_DEVICE_MODES: tuple[type, ...]
try:
    from torch.utils._device import DeviceContext

    _DEVICE_MODES = (DeviceContext,)
except ImportError:  # pragma: no cover - torch 2.6 to 2.13 have it
    _DEVICE_MODES = ()


def _plain_context() -> bool:
    """Whether the call runs where its graph was compiled for: Dynamo's stance left
    at "default" (``force_eager`` is honoured), no dispatch mode (a
    ``FakeTensorMode`` or ``FlopCounterMode`` must see the ops) and no torch function
    mode but a default device (:func:`_device_modes_only`)."""
    stance = getattr(torch._dynamo.eval_frame, "_stance", None)
    return (
        (stance is None or stance.stance == "default")
        and (not torch._C._is_torch_function_mode_enabled() or _device_modes_only())
        and torch._C._len_torch_dispatch_stack() == 0
    )


def _device_modes_only() -> bool:
    """Whether every torch function mode is a default device
    (``torch.set_default_device("cuda")``, ``with torch.device(...)``): the update
    gives every tensor it makes its device, so its graphs compute the same under
    one, and a step keeps its direct calls (through Dynamo's guards, ~0.3 ms a
    step). Any other mode must see the ops."""
    if _function_modes is None or not _DEVICE_MODES:  # pragma: no cover
        return False
    modes = _function_modes()
    return bool(modes) and all(isinstance(m, _DEVICE_MODES) for m in modes)


class _Plan:
    """How a site's arguments become its graph's inputs."""

    def __init__(
        self,
        compiled: Callable[..., Any],
        code: types.CodeType | None,
        sources: Sequence[Source],
        names: Sequence[str],
        values: Sequence[Any],
        keywords: tuple[str, ...],
    ) -> None:
        self.compiled = compiled
        self.code = code
        self.keywords = keywords
        self.structure = list(map(_shape_of, values))
        if _OTHER in self.structure or any(
            not isinstance(t, Tensor)
            for v in values
            if type(v) in (list, tuple)
            for t in v
        ):
            raise LookupError("an argument is neither a tensor nor a list of them")
        # Position of each (name, item) in the flat chain of the tensor slots.
        at: dict[tuple[str, int | None], int] = {}
        flat: list[Tensor] = []
        for name, value, shape in zip(names, values, self.structure):
            if shape >= 0:
                for k, t in enumerate(value):
                    at[(name, k)] = len(flat)
                    flat.append(t)
            elif shape == _TENSOR:
                at[(name, None)] = len(flat)
                flat.append(value)
        if len({id(t) for t in flat}) != len(flat):
            raise LookupError("one tensor is passed twice")
        # KeyError: not an argument
        self.pick = picker([at[(name, item)] for name, item, _ in sources])
        self.sizes = [(k, d) for k, (_, _, d) in enumerate(sources) if d is not None]
        self.loose = [k for k, s in enumerate(self.structure) if s == _TENSOR]
        self.loose_meta = [_meta(values[k]) for k in self.loose]
        self.grad_enabled = torch.is_grad_enabled()

    def matches(self, values: Sequence[Any], keywords: tuple[str, ...]) -> bool:
        return (
            keywords == self.keywords
            and list(map(_shape_of, values)) == self.structure
            and [_meta(values[k]) for k in self.loose] == self.loose_meta
            and torch.is_grad_enabled() == self.grad_enabled
            and _plain_context()
            # torch._dynamo.reset() means "compile again": so it does here too
            and (self.code is None or bool(_cache_entries(self.code)))
        )

    def __call__(self, values: Sequence[Any]) -> None:
        flat = list(
            itertools.chain.from_iterable(
                v if type(v) in (list, tuple) else (v,) for v in values if v is not None
            )
        )
        inputs = self.pick(flat)
        for k, dim in self.sizes:  # a symbolic size: the tensor's, now
            inputs[k] = inputs[k].shape[dim]
        self.compiled(*inputs)


class Site:
    """One call site's direct call (see Note [direct calls]).

    The caller keeps a site per call site, for as long as the tensors in the list
    arguments it passes keep their dtype, device, shape and strides, and the
    parameters and state tensors stay the same objects; it makes a new site
    otherwise.
    """

    def __init__(self) -> None:
        self.plan: _Plan | None = None
        self.direct_calls = 0  # counted so that tests can see them

    def run(self, args: Sequence[Any], rest: dict[str, Any]) -> bool:
        """Call the graph directly with ``fn(*args, **rest)``'s tensors; False when
        this call must go through Dynamo."""
        plan = self.plan
        if plan is None:
            return False
        values = [*args, *rest.values()]
        if not plan.matches(values, tuple(rest)):
            return False
        plan(values)
        self.direct_calls += 1
        return True

    def record(
        self,
        capture: Capture,
        fn: Callable[..., Any],
        args: Sequence[Any],
        rest: dict[str, Any],
    ) -> None:
        """After a call through Dynamo: plan direct calls of the graph that ran
        (a recompile, or new optional arguments, replace the plan)."""
        graph, capture.last = capture.last, None
        self.plan = None
        if graph is None or graph.sources is None:
            return  # nothing compiled ran (a stance), or its inputs are not readable
        names = [*_positional_names(fn)[: len(args)], *rest]
        try:
            self.plan = _Plan(
                graph.compiled,
                capture.code,
                graph.sources,
                names,
                [*args, *rest.values()],
                tuple(rest),
            )
        except (LookupError, KeyError):
            pass


@functools.cache
def _positional_names(fn: Callable[..., Any]) -> list[str]:
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
