"""Preparing a step's calls: each planned call's arguments, as a :class:`Work`.

A work holds the update's positional arguments (parameters, gradients, state lists,
the hyper-parameter tensor, the factor vectors) and keywords (config, a GradScaler's
tensors, a pack's row maps, rounding seeds), with a pack's gradients and parameters
already copied in. Steps that create SGD momentum buffers, mixed-dtype buckets and
buckets of overlapping parameters run eagerly (``call`` is None); sharded buckets run
a list call rebuilt at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._calls import (
    BucketPlan,
    Call,
    bucket_call,
    list_view,
    placed_like,
    shard_places,
)
from ._gather import Bucket
from ._pack import pack_in, unit_lists
from ._prologue import Hypers
from ._specs import AlgorithmSpec

Group = dict[str, Any]


@dataclass
class Work:
    """One update call, prepared: its arguments (a pack's gradients copied in)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    device: torch.device
    call: Call | None  # None: run the update eagerly (not through the engine)
    sharded: Any = None  # a sharded bucket's parameters (their placements)

    @property
    def grads(self) -> Sequence[Tensor]:
        """The gradients the update reads (its second positional argument)."""
        return self.args[1]  # type: ignore[no-any-return]


def prepare(
    spec: AlgorithmSpec,
    plan: BucketPlan,
    grads: list[Tensor],
    groups: Sequence[Group],
    hyper_t: Hypers,
    amp_kwargs: dict[str, Tensor],
    fresh_step: bool,
) -> list[Work]:
    """The bucket's update calls, with their gradients copied in (packs)."""
    bucket = plan.bucket
    base: dict[str, Any] = {"config": bucket.config, **amp_kwargs}
    device = bucket.device
    if fresh_step and spec.fresh_matters(bucket.config) and any(bucket.fresh):
        # Note [first SGD step]: state-creating steps run eagerly, as lists.
        call = bucket_call(bucket, plan.keys, groups)
        kwargs = {**call_kwargs(spec, base, call), "fresh_buffers": list(bucket.fresh)}
        args = call_args(spec, plan, call, grads, hyper_t)
        return [Work(args, kwargs, device, None, sharded=sharded(bucket, grads))]
    if bucket.sharded:  # fresh local views at every step
        call = bucket_call(bucket, plan.keys, groups)
        args = call_args(spec, plan, call, grads, hyper_t)
        kwargs = call_kwargs(spec, base, call)
        if "sr_seeds_t" in kwargs:  # Note [shard streams] in _functional
            kwargs["shards"] = shard_places(bucket.params)
        return [Work(args, kwargs, device, call, sharded=sharded(bucket, grads))]
    # Dynamo refuses parameters whose .grad has another dtype; overlapping
    # parameters are updated in turn (Note [aliased parameters] in ``_gather``).
    if bucket.mixed or bucket.aliased:
        call = plan.calls[0]
        args = call_args(spec, plan, call, grads, hyper_t)
        return [Work(args, call_kwargs(spec, base, call), device, None)]
    return [
        Work(
            call_args(spec, plan, call, call.pick(grads), hyper_t),
            call_kwargs(spec, base, call),
            device,
            call,
        )
        for call in plan.calls
    ]


def call_args(
    spec: AlgorithmSpec,
    plan: BucketPlan,
    call: Call,
    grads: list[Tensor],
    hyper_t: Hypers,
) -> tuple[Any, ...]:
    """The update's positional arguments for ``call``."""
    if call.pack is not None:
        lists = pack_in(call.pack, grads)
    elif call.unit is not None:
        lists = unit_lists(call.unit, call.params, grads)
    else:
        if plan.bucket.sharded:  # Note [sharded parameters]
            grads = placed_like(plan.bucket.params, grads)
        lists = (call.params, list_view(plan.bucket, grads), *call.state_lists)
    by_key = dict(zip(plan.keys, lists[2:]))
    f = call.factors
    return (
        *lists[:2],
        *(by_key.get(slot, []) for slot in spec.state_slots),
        hyper_t,
        f.group_index_t,
        f.lr_scales_t,
        f.wd_scales_t,
    )


def call_kwargs(
    spec: AlgorithmSpec, base: dict[str, Any], call: Call
) -> dict[str, Any]:
    """The update's keywords for ``call``: ``base`` plus a pack's row maps and the
    rounding seeds."""
    kwargs = dict(base)
    rounds = spec.rounds(base["config"])
    if call.pack is not None:
        kwargs["segment_t"] = call.pack.segment_t
        if call.pack.row_widths_t is not None:  # Note [pack padding] in _quant_step
            kwargs["row_widths_t"] = call.pack.row_widths_t
        if rounds:
            kwargs["local_index_t"] = call.pack.local_index_t
    if rounds:
        kwargs["sr_seeds_t"] = call.factors.sr_seeds_t
    return kwargs


def sharded(bucket: Bucket, grads: Sequence[Tensor]) -> Any:
    """A sharded bucket's parameters, whose placements its gradients take (for
    clipping's reductions), else None."""
    return bucket.params if bucket.sharded and grads else None


def amp_kwargs(
    amp: dict[str, Tensor | None], device: torch.device
) -> dict[str, Tensor]:
    """A GradScaler's ``grad_scale``/``found_inf`` on ``device``, by keyword.

    With ``_step_supports_amp_scaling`` the scaler neither unscales nor syncs; the
    core divides by the scale and masks a step with infs (Note [skipped steps]).
    """
    return {
        key: value.to(device=device, dtype=torch.float32, non_blocking=True)
        for key, value in amp.items()
        if value is not None
    }
