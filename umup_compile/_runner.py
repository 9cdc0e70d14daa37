"""The step runner: owns the engine, the layouts and what a steady step reuses.

One :meth:`StepRunner.step` is: collect this step's gradients (the cached plan's
:class:`~umup_compile._steady.SteadyCheck`, or a full :func:`~umup_compile._gather.gather`
that also creates state and plans each bucket's calls, ``_calls``), refresh the
hyper-parameter tensor of each device, prepare each call's arguments (``_prepare``),
fold clipping into them (``_step_clip``), then make the calls: the pack (copy in,
update, copy out) and the other units of every bucket's layout under the compiled
engine, or one call over each bucket's lists under the eager engine. Whether an outer
``torch.compile`` traces the step is asked once; then nothing is cached (``_traced``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._calls import BucketPlan, Layouts, plan_bucket, watch_of
from ._engine import Engine
from ._gather import Admitted, Rescale, gather
from ._hypers import HyperTable
from ._pack import pack_out
from ._prepare import Work, amp_kwargs, prepare
from ._prologue import Hypers
from ._specs import AlgorithmSpec
from ._steady import SteadyCheck, Structure
from ._step_clip import StepClip
from ._traced import TRACED_STEP_SUPPORTED, traced_step

Group = dict[str, Any]
State = dict[str, Any]


class StepRunner:
    """Runs steps of one optimizer (see the module docstring).

    Args:
        spec: the algorithm.
        engine: runs the functional update (eager or compiled).
        structure: what fixes a step's structure in a group (``_steady.Structure``).
        rescale: scales a parameter put in a group's list in place (Note [admitted
            order]).
    """

    def __init__(
        self,
        spec: AlgorithmSpec,
        engine: Engine,
        structure: Structure,
        rescale: Rescale,
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.hypers = HyperTable(spec)
        self.layouts = Layouts()
        self.clip = StepClip()  # Note [fused clipping]
        self._structure = structure
        self.plans: list[BucketPlan] | None = None
        self._check: SteadyCheck | None = None
        # Grad mode during a step: the defaults' differentiable, as torch.optim's
        # (``_use_grad_for_differentiable``), not a group's (set by the optimizer)
        self.differentiable = False
        # The optimizer's param_groups and whether they ask for capturable=True (see
        # set_groups).
        self.groups: Sequence[Group] = []
        self.capturable = False
        self._admitted = Admitted(rescale)  # Note [admitted order]

    @property
    def layout_builds(self) -> int:
        """How often a bucket's layout was built (tests bound it)."""
        return self.layouts.builds

    def set_groups(self, groups: Sequence[Group]) -> None:
        """Groups were added or loaded: keep the list, read what a traced step
        cannot, then :meth:`invalidate`.

        Note [traced groups]: a traced step reaches the groups through
        :attr:`groups`, not ``optimizer.param_groups``: Dynamo special-cases that
        attribute of optimizers, guarding on every value in the groups (a float lr
        edited at call 10 would recompile there) and reporting ``capturable=True``
        for each group.
        """
        self.groups = groups
        self.capturable = any(g.get("capturable") for g in groups)
        self._admitted.admit(groups)
        self.invalidate()

    def invalidate(self) -> None:
        """Forget every cache (groups were added, a checkpoint was loaded)."""
        self.plans = None
        self._check = None
        self.layouts.clear()
        self.hypers.invalidate()

    def step(
        self,
        groups: Sequence[Group],
        state: dict[Tensor, State],
        *,
        amp: dict[str, Tensor | None],
        name: str,
    ) -> None:
        """Run one step over ``groups`` (gradients read from ``.grad``)."""
        if torch.compiler.is_compiling():
            if not TRACED_STEP_SUPPORTED:  # Note [untraced step]
                _untraced_step(self, groups, state, amp=amp, name=name)
                return
            with torch.set_grad_enabled(self.differentiable):
                traced_step(
                    self.spec,
                    self.hypers,
                    self.clip,
                    groups,
                    state,
                    amp,
                    capturable=self.capturable,
                    name=name,
                )
            return
        grads = None if self._check is None else self._check.grads(groups, state)
        fresh_step = grads is None
        stable = (
            self._check.stable if grads is not None and self._check else frozenset()
        )
        plans = self.plans
        if grads is None or plans is None:
            plans, grads = self._gather(groups, state, name)
        hyper: dict[torch.device, tuple[Hypers, dict[str, Tensor]]] = {}
        with torch.set_grad_enabled(self.differentiable):
            works: list[Work] = []
            for plan, bucket_grads in zip(plans, grads):
                device = plan.bucket.device
                if device not in hyper:
                    hyper[device] = (
                        # Note [host hypers]: a step no CUDA graph captures
                        self.hypers.values(
                            groups, device, stable=stable, host=not self.capturable
                        ),
                        amp_kwargs(amp, device),
                    )
                works += prepare(
                    self.spec, plan, bucket_grads, groups, *hyper[device], fresh_step
                )
            self.clip(
                works, {d: kw for d, (_, kw) in hyper.items()}, self._compiled_engine
            )
            for work in works:
                self._execute(work)
        found_inf = amp.get("found_inf_t")
        if fresh_step and found_inf is not None:
            self._forget_skipped_state(plans, state, found_inf)

    def _forget_skipped_state(
        self,
        plans: Sequence[BucketPlan],
        state: dict[Tensor, State],
        found_inf: Tensor,
    ) -> None:
        """Note [skipped first step]: a GradScaler does not call the step of a
        torch.optim optimizer that it skips (an inf or nan in the gradients), so torch
        creates no state there. SGD's buffers created at such a step would hold zeros
        and the next step would damp the gradient into them, where torch starts the
        buffer as the gradient itself (Note [first SGD step]). So the buffers made at
        a skipped step are dropped again: one host read of ``found_inf`` at a step
        that creates SGD buffers, never at a steady step. (A step traced into the
        user's graph cannot read it: there the buffers keep their zeros.)"""
        made = [
            (p, s)
            for plan in plans
            if self.spec.fresh_matters(plan.bucket.config)
            for p, s, fresh in zip(
                plan.bucket.params, plan.bucket.states, plan.bucket.fresh
            )
            if fresh
        ]
        if not made or not bool(found_inf.item()):
            return
        for p, s in made:
            for key in self.spec.state_slots:
                s.pop(key, None)
            if not s:
                state.pop(p, None)
        self.invalidate()

    @property
    def _compiled_engine(self) -> Engine | None:
        return self.engine if self.engine.packs else None

    def _gather(
        self, groups: Sequence[Group], state: dict[Tensor, State], name: str
    ) -> tuple[list[BucketPlan], list[list[Tensor]]]:
        """The full pass: gather, plan every bucket's calls, build the steady check;
        return the plans and each bucket's gradients."""
        self._admitted.check(groups)
        buckets = gather(groups, state, self.spec, traced=False, optimizer_name=name)
        layouts = self.layouts if self.engine.packs else None
        if layouts is not None:  # Note [released buffers] in _pack
            layouts.retain(buckets)
        plans = [plan_bucket(b, groups, self.spec, layouts) for b in buckets]
        self.plans = plans
        self.clip.new_site()
        self._check = SteadyCheck(
            groups, buckets, self._structure, state, watch_of(plans)
        )
        return plans, [b.grads for b in buckets]

    def _execute(self, work: Work) -> None:
        """Run one prepared update call (then copy a pack's parameters out)."""
        if work.call is None:  # eagerly, whatever the engine
            self.spec.update(*work.args, **work.kwargs)
            return
        call = work.call
        if work.sharded is not None:  # a list call, rebuilt each step: no kind
            self.engine(self.spec.update, work.args, work.kwargs)
            return
        self.engine(
            self.spec.update, work.args, work.kwargs, call.kind, call.static, call.site
        )
        if call.pack is not None:
            pack_out(call.pack)


# Note [untraced step]: where the traced step is unsupported (torch < 2.11), a step
# met by Dynamo (the user's torch.compile without fullgraph, torch.compile(opt.step))
# runs untraced, with the optimizer's own compiled graphs, through a disabled call:
# Dynamo breaks its graph there and leaves every frame below alone (where nothing is
# compiling, so the call takes the untraced path). It raised to break the graph
# before, and Dynamo then traced the frames the step called (minutes of tracing, then
# a failure at ``maybe_mark_dynamic``). Under fullgraph=True Dynamo reports the
# disabled call.
@torch.compiler.disable  # type: ignore[untyped-decorator]
def _untraced_step(runner: StepRunner, *args: Any, **kwargs: Any) -> None:
    """``opt.step()`` needs torch >= 2.11 to join a torch.compile graph: here it runs
    outside it (compile the forward and backward only, or use fullgraph=False)."""
    runner.step(*args, **kwargs)
