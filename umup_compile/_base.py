"""The glue of a u-μP ``torch.optim`` subclass: options, groups, step, pickling.

A class built on :class:`UmupOptimizer` names its algorithm as data (``_spec``, see
``_specs``) and keeps ``param_groups`` as the user gave them, plus two float lists per
group, ``lr_scales`` and ``wd_scales`` (see ``_plan``, admitted by ``_groups``).
``step()`` hands the groups to a :class:`~umup_compile._runner.StepRunner`, which owns
the engine and every per-step cache; checkpoints convert through ``_checkpoint``'s
load hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import _checkpoint
from ._clip import check_max_grad_norm
from ._describe import optimizer_table
from ._engine import Engine, make_engine
from ._env import compile_from_env
from ._groups import ScalingOptions, admit_group, param_scales, params_list
from ._rules import LrScaleFunc
from ._runner import StepRunner
from ._specs import AlgorithmSpec
from ._steady import Structure


class UmupOptimizer(torch.optim.Optimizer):
    """Base of the u-μP optimizers; the concrete classes also subclass torch's.

    Subclasses set ``_spec`` and call :meth:`_init_umup` from their constructor.
    """

    _spec: AlgorithmSpec
    # Attributes of a subclass that pickling carries (besides the u-μP options).
    _EXTRA_ATTRS: tuple[str, ...] = ()

    def _init_umup(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        lr_scale_func: LrScaleFunc,
        independent_weight_decay: bool,
        allow_non_unit_scaling_params: bool,
        max_grad_norm: float | None = None,
        compile: bool | str,
    ) -> None:
        """Check the defaults, set the u-μP options and engine, then add the groups."""
        self._spec.check_group(defaults, "optimizer defaults")
        max_grad_norm = check_max_grad_norm(max_grad_norm)
        for name, flag in (
            ("independent_weight_decay", independent_weight_decay),
            ("allow_non_unit_scaling_params", allow_non_unit_scaling_params),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}.")
        options = {
            "lr_scale_func": lr_scale_func,
            "independent_weight_decay": independent_weight_decay,
            "allow_non_unit_scaling_params": allow_non_unit_scaling_params,
            "max_grad_norm": max_grad_norm,
            "compile": compile,
        }
        self._setup(options, defaults)
        torch.optim.Optimizer.__init__(self, params_list(params), defaults)
        self._register_hooks()
        # GradScaler hands us its scale and inf flag instead of unscaling (no sync).
        self._step_supports_amp_scaling = True

    def _setup(self, options: dict[str, Any], defaults: dict[str, Any]) -> None:
        self._umup_options = options
        self._scaling = ScalingOptions(
            lr_scale_func=options["lr_scale_func"],
            independent_weight_decay=options["independent_weight_decay"],
            allow_non_unit_scaling_params=options["allow_non_unit_scaling_params"],
        )
        self.independent_weight_decay = options["independent_weight_decay"]
        self.allow_non_unit_scaling_params = options["allow_non_unit_scaling_params"]
        engine = make_engine(
            options["compile"],
            env=compile_from_env(),
            differentiable=bool(defaults.get("differentiable")),
        )
        self._runner = StepRunner(
            self._spec,
            engine,
            Structure.of(self._spec, defaults),
            rescale=functools.partial(param_scales, options=self._scaling),
        )
        self._runner.differentiable = bool(defaults.get("differentiable"))
        self._runner.hypers.bind(self)  # Note [traced hypers]
        self._runner.clip.max_grad_norm = options.get("max_grad_norm")

    def _register_hooks(self) -> None:
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def _engine(self) -> Engine:
        """The engine the runner uses (tests route it through other backends)."""
        return self._runner.engine

    @_engine.setter
    def _engine(self, engine: Engine) -> None:
        self._runner.engine = engine
        self._runner.invalidate()

    @property
    def max_grad_norm(self) -> float | None:
        """The clipping threshold (``None``: no clipping); settable."""
        return self._runner.clip.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        value = check_max_grad_norm(value)
        self._umup_options["max_grad_norm"] = value
        self._runner.clip.max_grad_norm = value

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the last step with ``max_grad_norm`` (of the
        unscaled gradients, before clipping), as a device tensor: log it without a
        sync. ``None`` before such a step."""
        return self._runner.clip.last_grad_norm

    @property
    def layout_builds(self) -> int:
        """How often a bucket's layout was built (see ``_layout``); tests bound it."""
        return self._runner.layout_builds

    # torch pickles (and deep-copies) only defaults, state and param_groups; the u-μP
    # options travel beside them, and the engine and caches are rebuilt on arrival.
    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        extra = {k: getattr(self, k) for k in self._EXTRA_ATTRS if hasattr(self, k)}
        state["_umup"] = {"options": self._umup_options, "extra": extra}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        umup = state.pop("_umup", None)
        super().__setstate__(state)
        if umup is not None:  # unpickling; load_state_dict passes no "_umup"
            self.__dict__.update(umup["extra"])
            self._setup(umup["options"], self.defaults)
            self._runner.set_groups(self.param_groups)
            self._register_hooks()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, validating it and applying the u-μP scaling.

        Args:
            param_group: ``{"params": ..., <options>}``; params may be tensors or
                ``(name, tensor)`` pairs, as torch accepts.

        Raises:
            TypeError, ValueError: bad options or parameters, before anything changes.
        """
        group = admit_group(
            param_group,
            defaults=self.defaults,
            existing=self.param_groups,
            spec=self._spec,
            options=self._scaling,
        )
        super().add_param_group(group)
        self._runner.set_groups(self.param_groups)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state from this class, torch.optim, or unit_scaling.optim.

        A torch checkpoint carries no ``lr_scales``/``wd_scales``; the current ones are
        kept. A ``unit_scaling.optim`` checkpoint (one group per parameter) is
        recognised and its per-parameter state loaded into this optimizer's groups,
        which keep their own hyper-parameters. The conversions run as load hooks (see
        ``_checkpoint.loading``) after your pre-hooks and before your post-hooks: yours
        see the dict as torch.optim's would, and what they return is loaded.

        Raises:
            ValueError: the checkpoint's groups, state shapes or state keys do not
                match this optimizer's; nothing is changed.
        """
        with _checkpoint.loading(self):
            super().load_state_dict(state_dict)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with each group's ``state_dtype`` saved by name
        (``"int8"``, ``"float32"``; ``None`` when unset): plain values and tensors
        only, as torch.distributed's checkpoint tools require."""
        with _checkpoint.saving(self):
            return super().state_dict()

    def describe(self) -> str:
        """Tabulate every parameter's u-μP factors, effective lr/weight decay and bucket.

        Returns:
            One row per parameter (named when the optimizer was given
            ``named_parameters()``, else ``g<group>[<index>]``), with its state's
            bytes (``state B``: its state tensors, or those its first step will
            make) and a totals line.
        """
        spec = self._spec
        return optimizer_table(
            self.param_groups, spec.config, self.state, spec.predict_state,
            spec.state_config,
        )  # fmt: skip

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad on).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            ValueError: a sparse gradient, raised before anything is updated.
            RuntimeError: a closure inside ``torch.compile`` (under ``fullgraph``;
                otherwise Dynamo runs the step eagerly).
        """
        if closure is not None and torch.compiler.is_compiling():
            # A closure's backward breaks the traced graph, and the step then read
            # wrong gradients (torch's optimizers refuse it too). Raising makes
            # Dynamo run this step eagerly where it may break the graph.
            raise RuntimeError(
                "umup_compile: opt.step(closure) inside torch.compile is not "
                "supported: call the closure first (loss = closure(); "
                "opt.step()) or compile the closure's model instead."
            )
        groups = self._groups()
        if not torch.compiler.is_compiling():
            _refuse_capture(groups, type(self).__name__)
            # What an lr scheduler's wrapper would record; not in a traced step,
            # where Dynamo drops (2.13) or refuses (2.11) attribute writes here.
            self._opt_called = True
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = {
            "grad_scale_t": getattr(self, "grad_scale", None),
            "found_inf_t": getattr(self, "found_inf", None),
        }
        self._runner.step(groups, self.state, amp=amp, name=type(self).__name__)
        return loss

    def _groups(self) -> list[dict[str, Any]]:
        """``param_groups``, reached the way a traced step must (Note [traced
        groups]); a list assigned by hand is seen at the next untraced step."""
        if torch.compiler.is_compiling():
            return self._runner.groups  # type: ignore[return-value]
        if self._runner.groups is not self.param_groups:
            self._runner.set_groups(self.param_groups)
        return self.param_groups

    # Note [fullgraph step]: ``torch.compile(train_step, fullgraph=True)`` can include
    # ``opt.step()`` and ``opt.zero_grad()``. torch's ``zero_grad`` is Dynamo-disabled,
    # so ours is a plain loop; lr schedulers wrap ``opt.step`` in a function from a file
    # Dynamo never traces, so this step records the call itself (``_opt_called`` above)
    # and is marked as already wrapped, which makes schedulers leave it alone. Dynamo
    # drops or refuses attribute writes on optimizers inside a traced region, so there
    # the hyper-parameter op records the call when the graph runs (Note [traced
    # hypers]), which also keeps float hyper-parameters out of the graph's guards.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all optimized parameters, as torch's ``zero_grad``.

        Unlike torch's, it can be traced (see Note [fullgraph step]).

        Args:
            set_to_none: set ``.grad`` to ``None`` instead of filling it with zeros.
        """
        grads = []
        for group in self._groups():
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                    continue
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                grads.append(p.grad)
        if grads:
            torch._foreach_zero_(grads)


def _after_load(optimizer: torch.optim.Optimizer) -> None:
    """Loading replaced groups and state tensors: every step cache is stale."""
    groups = optimizer.param_groups
    for group in groups:  # a checkpoint of another torch version may lack keys
        for key, value in optimizer.defaults.items():
            group.setdefault(key, value)
    optimizer._runner.set_groups(groups)  # type: ignore[attr-defined]


def _refuse_capture(groups: list[dict[str, Any]], name: str) -> None:
    """Raise if a CUDA graph captures a step that is not capturable, as torch's
    optimizers do: its hyper-parameters reach the kernels from the host (Note [host
    hypers]), so a replay would repeat the captured values. Where CUDA is not
    initialized nothing captures (and asking would initialize it: a CPU model on a
    GPU machine)."""
    if (
        torch.backends.cuda.is_built()  # type: ignore[no-untyped-call]
        and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        and torch.cuda.is_current_stream_capturing()
        and not all(g.get("capturable") for g in groups)
    ):
        raise RuntimeError(
            f"umup_compile: a CUDA graph is capturing {name}.step(), but its "
            "param_groups have capturable=False; construct the optimizer with "
            "capturable=True to capture its step"
        )
