"""The traced step: ``opt.step()`` inside the user's own ``torch.compile``.

Note [nested compile]: while an outer ``torch.compile`` traces the step, nothing is
cached (a cache written during tracing would be Python state the graph never replays):
each step gathers, takes the list path and inlines the raw functional update into the
outer graph. Hyper-parameters come from an opaque custom op, or from tensor ops under
``capturable=True`` (Note [traced hypers]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from ._calls import BucketPlan, bucket_call, shard_places
from ._gather import gather
from ._hypers import HyperTable
from ._prepare import Work, amp_kwargs, call_args, call_kwargs, sharded
from ._specs import AlgorithmSpec
from ._step_clip import StepClip

Group = dict[str, Any]
State = dict[str, Any]

# Note [nested compile] needs Dynamo features of torch 2.11 (tested on 2.11 and 2.13;
# 2.6 cannot trace the gather's dict of buckets). Before, a traced step raises, which
# under fullgraph=False breaks the graph there and runs the step untraced.
TRACED_STEP_SUPPORTED = TorchVersion(torch.__version__) >= "2.11"


def traced_step(
    spec: AlgorithmSpec,
    hypers: HyperTable,
    clip: StepClip,
    groups: Sequence[Group],
    state: dict[Tensor, State],
    amp: dict[str, Tensor | None],
    *,
    capturable: bool,
    name: str,
) -> None:
    """A step inside an outer ``torch.compile``: lists only, nothing cached, the
    raw update inlined into the outer graph (Note [nested compile]).

    ``capturable``: whether the optimizer asked for it (in a trace, Dynamo sets
    every group's flag).
    """
    if not capturable:  # Note [edits in the traced frame]
        _comptime(_break_on_edited_groups)
    buckets = gather(groups, state, spec, traced=True, optimizer_name=name)
    hyper: dict[torch.device, Tensor] = {}
    amp_kw: dict[torch.device, dict[str, Tensor]] = {}
    works: list[Work] = []
    for bucket in buckets:
        device = bucket.device
        if device not in hyper:  # Note [traced hypers]
            amp_kw[device] = amp_kwargs(amp, device)
            hyper[device] = (
                hypers.traced(groups, device)
                if capturable
                else hypers.at_run_time(groups, device)
            )
        keys = spec.active_keys(bucket.config)
        plan = BucketPlan(bucket, keys, [])
        call = bucket_call(bucket, keys, groups)
        base = {"config": bucket.config, **amp_kw[device]}
        kwargs = call_kwargs(spec, base, call)
        if spec.fresh_matters(bucket.config) and any(bucket.fresh):
            kwargs["fresh_buffers"] = list(bucket.fresh)
        if bucket.sharded and "sr_seeds_t" in kwargs:  # Note [shard streams]
            kwargs["shards"] = shard_places(bucket.params)
        args = call_args(spec, plan, call, bucket.grads, hyper[device])
        works.append(
            Work(args, kwargs, device, None, sharded=sharded(bucket, bucket.grads))
        )
    clip(works, amp_kw, None)
    for work in works:
        spec.update(*work.args, **work.kwargs)


# Note [edits in the traced frame]: the custom op reads the groups' values when the
# graph runs, but Dynamo writes the traced frame's own dict edits (``g["lr"] = ...``
# before ``opt.step()`` in one compiled function, or in a step pre-hook) back only
# after the graph: the step used the last values (0.13 off torch after 5 steps). So
# while tracing, a group edited in the frame breaks the graph before the step (the
# step then runs after the edits); under ``fullgraph=True`` that raises, naming the
# fix. Dynamo's internals, feature-detected: without them, no check.
def _comptime(fn: Any) -> None:
    try:
        from torch._dynamo.comptime import comptime
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    comptime(fn)


def _break_on_edited_groups(ctx: Any) -> None:
    try:
        tx = ctx._i_will_not_complain_if_bc_breaks_InstructionTranslator()
        groups = ctx.get_local("groups", stacklevel=1)._ComptimeVar__variable
        edited = any(map(tx.output.side_effects.is_modified, groups.items))
    except Exception:  # noqa: BLE001 - Dynamo internals moved: no check
        return
    if edited:
        ctx.graph_break(
            "umup_compile: a param group was edited in the compiled function before "
            "opt.step(); the step reads the groups when the graph runs, before "
            "Dynamo writes the edit back. Edit the groups outside the compiled "
            "function (or use fullgraph=False, which breaks the graph here)."
        )
