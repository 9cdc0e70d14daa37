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

from ._calls import BucketPlan, bucket_call
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
        args = call_args(spec, plan, call, bucket.grads, hyper[device])
        works.append(
            Work(args, kwargs, device, None, sharded=sharded(bucket, bucket.grads))
        )
    clip(works, amp_kw, None)
    for work in works:
        spec.update(*work.args, **work.kwargs)
