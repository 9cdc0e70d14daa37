"""Shared machinery of the u-μP optimizers: groups, state, gathering, engines.

A class built on :class:`UmupOptimizer` keeps ``param_groups`` as the user gave them
and adds two float lists per group, ``lr_scales`` and ``wd_scales`` (see ``_plan``).
Each ``step()`` gathers the parameters that have gradients into buckets of equal
(device, dtype, static config), refreshes one hyper-parameter tensor per device (rows =
groups, filled in place, so schedules never recompile), and hands each bucket to the
engine as plain tensor lists.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._describe import param_row, render
from ._engine import Engine, StepFn, choose_engine
from ._env import compile_from_env
from ._pack import (
    Factors,
    Layout,
    build_layout,
    chunk_lists,
    factor_tensors,
    is_current,
    pack_lists,
    unpack,
)
from ._plan import as_float, describe_param, group_scales
from ._rules import LrScaleFunc

# Group keys this package adds to torch's; kept when a checkpoint lacks them.
UMUP_GROUP_KEYS = (
    "lr_scales",
    "wd_scales",
    "state_dtype",
    "stochastic_rounding",
    "sr_seed",
)

# Devices whose kernels can be captured into graphs (torch.optim's list, less xla).
CAPTURABLE_DEVICES = ("cuda", "xpu", "hpu")


if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # a torch build without torch.distributed has no DTensor parameters
    DTensor = ()  # type: ignore[assignment,misc]


def local_shard(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (FSDP2's params, grads, state), else ``t``.

    Note [sharded parameters]: the update is elementwise, so each rank runs it on its
    shards as plain tensors: no DTensor dispatch per op, no DTensor mixed with the
    plain hyper-parameter tensors. ``to_local()`` is a view, so the in-place update
    lands in the DTensor. The u-μP factors come from ``p.shape``, which a DTensor
    reports globally: those of the full weight. Sharded buckets take the list path,
    not packs: a pack rebinds the state to views of its flat buffer, and the state
    must stay DTensors for ``state_dict``/``torch.distributed.checkpoint``.
    """
    return t.to_local() if isinstance(t, DTensor) else t


def scalar_dtype(device: torch.device) -> torch.dtype:
    """Dtype of hyper-parameter arithmetic: float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def step_dtype() -> torch.dtype:
    """Dtype of the ``step`` state, as torch.optim chooses it."""
    return (
        torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    )


@dataclass
class Bucket:
    """Parameters that share (device, dtype, static config), gathered for one step."""

    config: Hashable
    has_scalars: bool = False
    sharded: bool = False
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    positions: list[tuple[int, int]] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)  # set by _init_states


class UmupOptimizer(torch.optim.Optimizer):
    """Mixin base for the u-μP optimizers; the concrete classes also subclass torch's.

    Subclasses define ``_hyper_names``, ``_functional`` and the four hooks at the end.
    """

    _hyper_names: tuple[str, ...]
    _functional: StepFn

    def _setup_umup(
        self,
        *,
        lr_scale_func: LrScaleFunc,
        independent_weight_decay: bool,
        allow_non_unit_scaling_params: bool,
        compile: bool | str,
        differentiable: bool,
    ) -> None:
        """Set the u-μP options; must run before ``Optimizer.__init__`` adds groups."""
        for name, flag in (
            ("independent_weight_decay", independent_weight_decay),
            ("allow_non_unit_scaling_params", allow_non_unit_scaling_params),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}.")
        self._umup_options = {
            "lr_scale_func": lr_scale_func,
            "independent_weight_decay": independent_weight_decay,
            "allow_non_unit_scaling_params": allow_non_unit_scaling_params,
            "compile": compile,
            "differentiable": differentiable,
        }
        self._lr_scale_func = lr_scale_func
        self.independent_weight_decay = independent_weight_decay
        self.allow_non_unit_scaling_params = allow_non_unit_scaling_params
        self._engine: Engine
        self._engine, reason = choose_engine(
            compile, env=compile_from_env(), differentiable=differentiable
        )
        if reason is not None and compile is not False:
            warnings.warn(
                f"umup_compile: using the eager engine because {reason}; pass "
                "compile=False to silence this warning.",
                UserWarning,
                stacklevel=3,
            )
        self._hyper: dict[torch.device, tuple[list[list[float]], Tensor]] = {}
        self._factors: dict[tuple[Any, ...], Factors] = {}
        self._layouts: dict[tuple[Any, ...], Layout] = {}
        self.layout_builds = 0  # see ``_pack``: counted so that tests can bound it
        self._unrolled_kinds: set[str] = set()  # see ``_pack._chunks``

    # torch pickles (and deep-copies) only defaults, state and param_groups; the u-μP
    # options travel beside them, and the engine and caches are rebuilt on arrival.
    _EXTRA_ATTRS = ("readout_constraint",)

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
            self._setup_umup(**umup["options"])

    # -- groups ---------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, validating it and applying the u-μP scaling.

        Args:
            param_group: ``{"params": ..., <options>}``; params may be tensors or
                ``(name, tensor)`` pairs, as torch accepts.

        Raises:
            TypeError, ValueError: bad options or parameters, before anything changes.
        """
        if not isinstance(param_group, dict):
            raise TypeError(
                f"param_group must be a dict, but got {type(param_group).__name__}"
            )
        group = dict(param_group)
        entries = group["params"] if "params" in group else None
        if entries is None:
            raise ValueError(
                "param group has no 'params'; pass {'params': [...], ...}."
            )
        if isinstance(entries, Tensor):
            entries = [entries]
        elif isinstance(entries, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but "
                "the ordering of tensors in sets will change between runs. Please use a "
                "list instead."
            )
        entries = list(entries)
        named = [isinstance(e, tuple) for e in entries]
        if any(named) and not all(named):
            raise ValueError(
                "all optimizer params should be with/without names. Some param names "
                "are missing"
            )
        names: list[str | None] = (
            [e[0] for e in entries] if any(named) else [None] * len(entries)
        )
        params: list[Tensor] = [e[1] for e in entries] if any(named) else entries
        g = len(self.param_groups)
        merged = {**self.defaults, **group}
        self._check_hypers(merged, f"param group {g}")
        _check_low_precision(merged, params, names, g)
        self._check_membership(params, names, g)
        lr_scales, wd_scales = group_scales(
            params,
            names,
            g,
            lr=as_float(merged["lr"], "lr"),
            weight_decay=as_float(merged["weight_decay"], "weight_decay"),
            lr_scale_func=self._lr_scale_func,
            independent_weight_decay=self.independent_weight_decay,
            allow_non_unit_scaling_params=self.allow_non_unit_scaling_params,
        )
        group["params"] = entries
        group["lr_scales"] = lr_scales
        group["wd_scales"] = wd_scales
        super().add_param_group(group)
        self._invalidate()

    def _check_membership(
        self, params: list[Tensor], names: list[str | None], g: int
    ) -> None:
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(
                    "optimizer can only optimize Tensors, but one of the params is "
                    f"{torch.typename(p)} (param group {g}, index {i})"
                )
            if id(p) in seen:
                raise ValueError(
                    f"{describe_param(p, names[i], g, i)} appears twice in its param "
                    "group; list each parameter once."
                )
            seen.add(id(p))
        for h, other in enumerate(self.param_groups):
            for q in other["params"]:
                if id(q) in seen:
                    i = next(k for k, p in enumerate(params) if p is q)
                    raise ValueError(
                        "some parameters appear in more than one parameter group: "
                        f"{describe_param(q, names[i], g, i)} is already in param group "
                        f"{h}; put each parameter in one group only."
                    )

    def _invalidate(self) -> None:
        self._hyper.clear()
        self._factors.clear()
        self._layouts.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state from this class, torch.optim, or unit_scaling.optim.

        A torch checkpoint carries no ``lr_scales``/``wd_scales``; the current ones are
        kept. A ``unit_scaling.optim`` checkpoint (one group per parameter) is
        recognised and its per-parameter state loaded into this optimizer's groups,
        which keep their own hyper-parameters (see :meth:`_regroup_per_param`). Step
        counters move to the parameters' device.

        Raises:
            ValueError: the checkpoint's groups or state shapes do not match this
                optimizer's; nothing is changed.
        """
        state_dict = self._regroup_per_param(state_dict)
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(
                "loaded state dict has a different number of parameter groups"
            )
        for g, (ours, theirs) in enumerate(zip(self.param_groups, saved)):
            if len(ours["params"]) != len(theirs["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the "
                    f"size of optimizer's group (param group {g}: "
                    f"{len(theirs['params'])} saved, {len(ours['params'])} here)"
                )
            for key in ("lr_scales", "wd_scales"):
                if key in theirs and len(theirs[key]) != len(ours["params"]):
                    raise ValueError(
                        f"loaded state dict's param group {g} has {len(theirs[key])} "
                        f"{key} for {len(ours['params'])} parameters; it was saved from "
                        "another model."
                    )
        self._check_state_shapes(state_dict)
        kept = [{k: g[k] for k in UMUP_GROUP_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype, which would round the
        # float32 moments of bf16 parameters: take the saved tensors again instead.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_of = dict(zip(map(id, params), saved_ids))
        converted: set[str] = set()
        for group, keep in zip(self.param_groups, kept):
            for k, v in keep.items():  # a torch checkpoint lacks the u-μP keys
                group.setdefault(k, v)
            # The state dtype is this run's memory layout, not a saved setting.
            group["state_dtype"] = keep.get("state_dtype")
            for p in group["params"]:
                state = self.state.get(p, {})
                saved = state_dict["state"].get(saved_of[id(p)], {})
                for k, v in state.items():
                    if not isinstance(v, Tensor):
                        continue
                    if k == "step":
                        state[k] = v.to(device=p.device, dtype=step_dtype())
                    elif v.is_floating_point() and p.is_floating_point():
                        v = saved.get(k, v)
                        dtype = group.get("state_dtype") or p.dtype
                        if v.dtype != dtype:
                            converted.add(f"{v.dtype} -> {dtype}")
                        state[k] = v.to(device=p.device, dtype=dtype)
        if converted:
            warnings.warn(
                "umup_compile: the loaded optimizer state was converted to this "
                f"optimizer's state dtype ({', '.join(sorted(converted))}); pass "
                "state_dtype=<the checkpoint's dtype> to keep it.",
                UserWarning,
                stacklevel=2,
            )
        self._invalidate()

    def _regroup_per_param(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Map a one-group-per-parameter checkpoint (unit_scaling's) onto our groups.

        Its groups hold ``lr × scale`` and ``weight_decay / lr``; ours hold the base
        values and the factors, so only the per-parameter state is taken, in order.
        """
        saved = state_dict["param_groups"]
        flat = [p for g in self.param_groups for p in g["params"]]
        if (
            len(saved) == len(self.param_groups)
            or len(saved) != len(flat)
            or any(len(g["params"]) != 1 or "lr_scales" in g for g in saved)
        ):
            return state_dict
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**group, "params": list(range(start, start + n))})
            start += n
        saved_state = state_dict["state"]
        state = {
            k: saved_state[g["params"][0]]
            for k, g in enumerate(saved)
            if g["params"][0] in saved_state
        }
        return {"state": state, "param_groups": groups}

    def _check_state_shapes(self, state_dict: dict[str, Any]) -> None:
        ids = (i for g in state_dict["param_groups"] for i in g["params"])
        flat = (p for g in self.param_groups for p in g["params"])
        for k, (i, p) in enumerate(zip(ids, flat)):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, Tensor) and value.ndim and value.shape != p.shape:
                    raise ValueError(
                        f"loaded state dict's {key!r} for parameter {k} has shape "
                        f"{tuple(value.shape)}, but the parameter has shape "
                        f"{tuple(p.shape)}; the checkpoint is from another model."
                    )

    def describe(self) -> str:
        """Tabulate every parameter's u-μP factors, effective lr/weight decay and bucket.

        Returns:
            One row per parameter (named when the optimizer was given
            ``named_parameters()``, else ``g<group>[<index>]``), with a totals line.
        """
        buckets: dict[tuple[Any, ...], int] = {}
        rows = []
        for g, group in enumerate(self.param_groups):
            config = self._config(group)
            names = group.get("param_names")
            lr = as_float(group["lr"], "lr")
            weight_decay = as_float(group["weight_decay"], "weight_decay")
            for i, p in enumerate(group["params"]):
                bucket = buckets.setdefault(
                    (p.device, p.dtype, config, group.get("state_dtype")), len(buckets)
                )
                rows.append(
                    param_row(
                        p,
                        names[i] if names else f"g{g}[{i}]",
                        lr_scale=group["lr_scales"][i],
                        lr=lr,
                        wd_scale=group["wd_scales"][i],
                        weight_decay=weight_decay,
                        bucket=bucket,
                    )
                )
        return render(
            rows, sum(p.numel() for g in self.param_groups for p in g["params"])
        )

    # -- step -----------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad on).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            ValueError: a sparse gradient, raised before anything is updated.
        """
        self._opt_called = True  # what an lr scheduler's wrapper would record
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._gather()
        fresh = self._init_states(buckets)
        differentiable = any(g["differentiable"] for g in self.param_groups)
        # Hyper-parameters and a GradScaler's tensors are per device, not per bucket.
        per_device: dict[torch.device, tuple[Tensor, dict[str, Tensor]]] = {}
        with torch.set_grad_enabled(differentiable):
            for key, bucket in buckets.items():
                device = key[0]
                if device not in per_device:
                    per_device[device] = (
                        self._hyper_tensor(device),
                        self._amp_kwargs(device),
                    )
                self._run_bucket(key, bucket, fresh, *per_device[device])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all optimized parameters, as torch's ``zero_grad``.

        Unlike torch's, it can be traced (see Note [fullgraph step]).

        Args:
            set_to_none: set ``.grad`` to ``None`` instead of filling it with zeros.
        """
        grads = []
        for group in self.param_groups:
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

    # Note [fullgraph step]: ``torch.compile(train_step, fullgraph=True)`` can include
    # ``opt.step()`` and ``opt.zero_grad()``. torch's ``zero_grad`` is Dynamo-disabled,
    # so ours is a plain loop; lr schedulers wrap ``opt.step`` in a function from a file
    # Dynamo never traces, so this step records the call itself (``_opt_called`` above)
    # and is marked as already wrapped, which makes schedulers leave it alone. Dynamo
    # drops attribute writes on optimizers inside a traced region, so there the
    # scheduler's one-time "lr_scheduler.step() before optimizer.step()" warning shows
    # spuriously; and, as for torch's optimizers, a float lr is a graph constant there:
    # pass ``lr=torch.tensor(...)`` so that schedulers fill it in place.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def _gather(self) -> dict[tuple[Any, ...], Bucket]:
        buckets: dict[tuple[Any, ...], Bucket] = {}
        for g, group in enumerate(self.param_groups):
            config = self._config(group)
            # Dynamo sets "capturable" on the groups of optimizers it traces, any device.
            capturable = group.get("capturable") and not torch.compiler.is_compiling()
            # (device, dtype) -> bucket, so that the config is hashed once per group
            local: dict[tuple[torch.device, torch.dtype], Bucket] = {}
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if capturable and p.device.type not in CAPTURABLE_DEVICES:
                    names = group.get("param_names")
                    raise ValueError(
                        "capturable=True needs parameters on a device that graph "
                        f"capture supports ({', '.join(CAPTURABLE_DEVICES)}), but "
                        f"{describe_param(p, names[i] if names else None, g, i)} is on "
                        f"{p.device}; pass capturable=False (the default) there."
                    )
                if grad.is_sparse:
                    names = group.get("param_names")
                    raise ValueError(
                        f"{describe_param(p, names[i] if names else None, g, i)} has a "
                        f"sparse gradient, which {type(self).__name__} does not support; "
                        "use a dense gradient (e.g. nn.Embedding(sparse=False))."
                    )
                bucket = local.get((p.device, p.dtype))
                if bucket is None:
                    key = (p.device, p.dtype, config, group.get("state_dtype"))
                    bucket = buckets.get(key)
                    if bucket is None:
                        bucket = buckets[key] = Bucket(config)
                    local[(p.device, p.dtype)] = bucket
                bucket.has_scalars |= p.ndim == 0
                bucket.sharded |= isinstance(p, DTensor)
                bucket.params.append(p)
                bucket.grads.append(grad)
                bucket.positions.append((g, i))
        return buckets

    def _init_states(self, buckets: dict[tuple[Any, ...], Bucket]) -> set[int]:
        """Create missing state; return the ids of parameters whose state is new."""
        fresh: set[int] = set()
        for bucket in buckets.values():
            bucket.states = [self.state[p] for p in bucket.params]
            for p, state, (g, _) in zip(bucket.params, bucket.states, bucket.positions):
                if self._init_state(p, state, self.param_groups[g]):
                    fresh.add(id(p))
        return fresh

    def _hyper_tensor(self, device: torch.device) -> Tensor:
        """The (groups, hypers) tensor for ``device``, without a host-device sync.

        Python floats live in one cached tensor, refreshed only when they change,
        through pinned memory on accelerators (an asynchronous copy). Tensor
        hyper-parameters (a scheduled ``lr=torch.tensor(...)``) are written over a
        copy of it on the device at every step, so a CUDA graph that captured the
        step reads their current values at replay. While an outer ``torch.compile``
        traces us, every value is stacked with tensor ops instead: floats become
        graph constants and no guard is placed on the cache.
        """
        rows = [self._hyper_row(group) for group in self.param_groups]
        dtype = scalar_dtype(device)
        if torch.compiler.is_compiling():
            return torch.stack(
                [
                    torch.stack(
                        [
                            torch.as_tensor(v, dtype=dtype, device=device).reshape(())
                            for v in row
                        ]
                    )
                    for row in rows
                ]
            )
        floats = [[0.0 if isinstance(v, Tensor) else v for v in row] for row in rows]
        cached = self._hyper.get(device)
        if cached is None or cached[0] != floats:
            hyper_t = (
                torch.empty(
                    (len(rows), len(self._hyper_names)), dtype=dtype, device=device
                )
                if cached is None
                else cached[1]
            )
            host = torch.tensor(floats, dtype=dtype)
            if device.type != "cpu":
                host = host.pin_memory()
            hyper_t.copy_(host, non_blocking=True)
            cached = self._hyper[device] = (floats, hyper_t)
        hyper_t = cached[1]
        tensors = [
            (g, j, v)
            for g, row in enumerate(rows)
            for j, v in enumerate(row)
            if isinstance(v, Tensor)
        ]
        if tensors:
            hyper_t = hyper_t.clone()
            for g, j, v in tensors:
                hyper_t[g, j] = v.reshape(())
        return hyper_t

    def _factor_tensors(self, device: torch.device, bucket: Bucket) -> Factors:
        """Per-bucket (group index, lr scale, wd scale, rounding seed) vectors, built
        once per layout."""
        key = (device, bucket.config, tuple(bucket.positions))
        cached = self._factors.get(key)
        if cached is None or torch.compiler.is_compiling():
            cached = factor_tensors(
                bucket.positions, *self._group_factors(), device, scalar_dtype(device)
            )
            if not torch.compiler.is_compiling():  # traced: graph constants, no cache
                self._factors[key] = cached
        return cached

    def _run_bucket(
        self,
        key: tuple[Any, ...],
        bucket: Bucket,
        fresh: set[int],
        hyper_t: Tensor,
        amp_kwargs: dict[str, Tensor],
    ) -> None:
        extra = self._extra_kwargs(bucket, fresh)
        kwargs = {"config": bucket.config, **extra, **amp_kwargs}
        fn = type(self)._functional
        if (
            self._engine.packs
            and not extra
            and not bucket.sharded  # Note [sharded parameters]
            and not torch.compiler.is_compiling()
        ):
            self._run_layout(key, bucket, fresh, hyper_t, kwargs)
            return
        args, kwargs = _call(
            self._list_args(bucket),
            hyper_t,
            self._factor_tensors(key[0], bucket),
            kwargs,
            _rounds(bucket),
        )
        if extra:  # Note [first SGD step]: state-creating steps run eagerly.
            fn(*args, **kwargs)
        else:
            self._engine(fn, args, kwargs)

    def _list_args(self, bucket: Bucket) -> tuple[list[Tensor], ...]:
        """One list per tensor argument, one entry per parameter (eager, traced)."""
        states = bucket.states
        tensor_lists = (
            bucket.params,
            bucket.grads,
            *([s[k] for s in states] if k else [] for k in self._keys(bucket)),
        )
        if bucket.sharded:  # Note [sharded parameters]
            tensor_lists = tuple([local_shard(t) for t in ts] for ts in tensor_lists)
        if bucket.has_scalars:
            # Dynamo (torch 2.13) drops in-place updates of 0-d float64 graph inputs;
            # 1-element views of them update correctly, in both engines alike.
            tensor_lists = tuple([_at_least_1d(t) for t in ts] for ts in tensor_lists)
        return tensor_lists

    def _run_layout(
        self,
        key: tuple[Any, ...],
        bucket: Bucket,
        fresh: set[int],
        hyper_t: Tensor,
        kwargs: dict[str, Any],
    ) -> None:
        """Run the bucket as the compiled engine's units (see ``_pack``)."""
        states = bucket.states
        keys = self._keys(bucket)
        layout = self._layouts.get(key)
        if (
            layout is None
            or fresh.intersection(map(id, bucket.params))
            or not is_current(layout, bucket.positions, states, keys)
        ):
            layout = self._layouts[key] = build_layout(
                bucket.params,
                bucket.positions,
                states,
                keys,
                self._scalar_state_keys,
                *self._group_factors(),
                scalar_dtype(key[0]),
                self._unrolled_kinds,
            )
            self.layout_builds += 1
        fn = type(self)._functional
        rounds = _rounds(bucket)
        pack = layout.pack
        if pack is not None:
            pack_kwargs = {**kwargs, "segment_t": pack.segment_t}
            if rounds:
                pack_kwargs["local_index_t"] = pack.local_index_t
            self._engine(
                fn,
                *_call(
                    pack_lists(pack, bucket.params, bucket.grads),
                    hyper_t,
                    pack.unit.factors,
                    pack_kwargs,
                    rounds,
                ),
                "pack",
            )
            unpack(pack, bucket.params)
        for unit in layout.chunks:
            self._engine(
                fn,
                *_call(
                    chunk_lists(unit, bucket.params, bucket.grads),
                    hyper_t,
                    unit.factors,
                    kwargs,
                    rounds,
                ),
                unit.kind,
            )

    def _group_factors(
        self,
    ) -> tuple[list[list[float]], list[list[float]], list[int]]:
        """Every group's lr scales, wd scales and rounding seed (``_pack`` layouts)."""
        groups = self.param_groups
        return (
            [g["lr_scales"] for g in groups],
            [g["wd_scales"] for g in groups],
            [g.get("sr_seed", 0) for g in groups],
        )

    def _keys(self, bucket: Bucket) -> tuple[str | None, ...]:
        return self._state_keys(bucket.config)

    def _amp_kwargs(self, device: torch.device) -> dict[str, Tensor]:
        """A GradScaler's ``grad_scale``/``found_inf``, set on us for this step only.

        With ``_step_supports_amp_scaling`` the scaler neither unscales nor syncs; the
        core divides by the scale and masks a step with infs (Note [skipped steps]).
        """
        out = {}
        for attr, key in (("grad_scale", "grad_scale_t"), ("found_inf", "found_inf_t")):
            value = getattr(self, attr, None)
            if value is not None:
                out[key] = value.to(
                    device=device, dtype=torch.float32, non_blocking=True
                )
        return out

    # -- hooks for the concrete classes -----------------------------------------------

    def _hyper_row(self, group: dict[str, Any]) -> list[float | Tensor]:
        """The group's values in ``_hyper_names`` order, floats or 1-element tensors."""
        raise NotImplementedError

    def _check_hypers(self, group: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def _config(self, group: dict[str, Any]) -> Hashable:
        raise NotImplementedError

    def _init_state(
        self, p: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> bool:
        """Create missing state entries for ``p``; return whether any was created."""
        raise NotImplementedError

    _scalar_state_keys: frozenset[str] = frozenset()

    def _state_keys(self, config: Hashable) -> tuple[str | None, ...]:
        """State keys in the functional's argument order; ``None``: an empty list."""
        raise NotImplementedError

    def _extra_kwargs(self, bucket: Bucket, fresh: set[int]) -> dict[str, Any]:
        """Extra keyword arguments of the functional for this bucket and step."""
        return {}


def _check_low_precision(
    group: dict[str, Any], params: list[Tensor], names: list[str | None], g: int
) -> None:
    """Validate ``state_dtype`` and ``stochastic_rounding`` (Note [low precision])."""
    dtype = group.get("state_dtype")
    if dtype is not None and not (
        isinstance(dtype, torch.dtype) and dtype.is_floating_point
    ):
        raise TypeError(
            f"state_dtype must be None (the parameter's dtype) or a floating dtype such "
            f"as torch.float32, got {dtype!r} (param group {g})."
        )
    rounding = group.get("stochastic_rounding", False)
    if not isinstance(rounding, bool):
        raise TypeError(
            f"stochastic_rounding must be a bool, got {rounding!r} (param group {g})."
        )
    for i, p in enumerate(params):
        if rounding and p.dtype == torch.float16:
            raise ValueError(
                f"stochastic_rounding=True rounds bfloat16 parameters, but "
                f"{describe_param(p, names[i], g, i)} is float16; use bfloat16 "
                "parameters or stochastic_rounding=False."
            )


def _call(
    lists: tuple[list[Tensor], ...],
    hyper_t: Tensor,
    factors: Factors,
    kwargs: dict[str, Any],
    rounds: bool,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The functional's arguments: tensor lists, hypers, then the factors (group
    index, lr and wd scales); the rounding seeds go by keyword, when rounding."""
    args = (*lists, hyper_t, *factors[:3])
    return args, ({**kwargs, "sr_seeds_t": factors[3]} if rounds else kwargs)


def _rounds(bucket: Bucket) -> bool:
    """Whether the bucket's bf16 parameters round stochastically."""
    return bool(getattr(bucket.config, "stochastic_rounding", False))


def _at_least_1d(t: Tensor) -> Tensor:
    return t.view(1) if t.ndim == 0 else t


def check_tensor_scalar(value: Any, what: str) -> None:
    """Raise torch's error for a multi-element tensor hyper-parameter."""
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(
            f"Tensor {what} must be 1-element, got shape {tuple(value.shape)}"
        )


def params_list(params: Iterable[Any]) -> Iterable[Any]:
    """Reject a lone tensor as ``params``, as torch does (it is not an iterable of them)."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or "
            f"dicts, but got {torch.typename(params)}"
        )
    return params
