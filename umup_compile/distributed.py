"""Keep u-μP tags through distributed wrappers (DDP, FSDP2's ``fully_shard``).

``DistributedDataParallel`` keeps the model's parameter objects, so their ``mup_type``
and ``mup_scaling_depth`` tags survive. ``fully_shard`` replaces every parameter with a
new ``nn.Parameter`` holding a ``DTensor`` sharded on dim 0, and the tags are lost.
Capture them by parameter name before wrapping and re-apply them after::

    from torch.distributed.fsdp import fully_shard
    from umup_compile.distributed import keep_tags

    with keep_tags(model):
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = AdamW(model.named_parameters(), lr=2**-6)

The u-μP factors then come from the *global* shape, because a ``DTensor`` reports the
full weight's ``shape`` (its local shard is ``to_local()``), and the optimizer computes
them once, when it is built — so build it after wrapping.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn

from .parameter import MupType, check_tags, has_parameter_data

Tags = tuple[MupType, int | None]
"""A parameter's ``(mup_type, mup_scaling_depth)``."""

# Module attributes wrappers insert between a model and its parameters: torch.compile,
# activation checkpointing and FSDP1. FSDP2 and DDP's inner module add none.
_WRAPPER_PARTS = frozenset(
    {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
)


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel``/``DataParallel`` wrappers."""
    while isinstance(
        module, (nn.parallel.DistributedDataParallel, nn.parallel.DataParallel)
    ):
        module = module.module
    return module


def _clean_name(name: str) -> str:
    """A parameter name without the parts that wrappers insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def capture_tags(module: nn.Module) -> dict[str, Tags]:
    """Record the u-μP tags of a module's parameters by name, before wrapping it.

    Args:
        module: the model (or a ``DistributedDataParallel`` around it).

    Returns:
        ``{name: (mup_type, mup_scaling_depth)}`` for every tagged parameter; names are
        those of ``module.named_parameters()`` without wrapper parts (``_orig_mod``,
        ``_checkpoint_wrapped_module``, ``_fsdp_wrapped_module``).
    """
    return {
        _clean_name(name): (p.mup_type, p.mup_scaling_depth)
        for name, p in _unwrap(module).named_parameters()
        if has_parameter_data(p)
    }


def restore_tags(module: nn.Module, tags: Mapping[str, Tags]) -> list[str]:
    """Re-apply tags captured by :func:`capture_tags` to a wrapped module's parameters.

    Parameters that still carry their tags are left alone.

    Args:
        module: the wrapped model, e.g. after ``fully_shard(model)``.
        tags: the map :func:`capture_tags` returned for the unwrapped model.

    Returns:
        The names of the parameters whose tags were re-applied.

    Raises:
        ValueError: a captured name is missing from the wrapped module, a tag value is
            invalid, or a parameter carries tags that differ from the captured ones.
    """
    params = {_clean_name(n): p for n, p in _unwrap(module).named_parameters()}
    missing = sorted(set(tags) - set(params))
    if missing:
        raise ValueError(
            f"restore_tags: captured parameters {missing} are not in the wrapped module "
            f"(it has {sorted(params)}); capture the tags from the same model you wrap."
        )
    restored = []
    for name, (mup_type, depth) in tags.items():
        p = params[name]
        check_tags(mup_type, depth, f"restore_tags: parameter {name!r}")
        if has_parameter_data(p):
            if (p.mup_type, p.mup_scaling_depth) != (mup_type, depth):
                raise ValueError(
                    f"restore_tags: parameter {name!r} is tagged "
                    f"{(p.mup_type, p.mup_scaling_depth)}, but "
                    f"{(mup_type, depth)} was captured; capture the tags again after "
                    "changing them."
                )
            continue
        p.mup_type = mup_type  # type: ignore[attr-defined]
        p.mup_scaling_depth = depth  # type: ignore[attr-defined]
        restored.append(name)
    return restored


@contextmanager
def keep_tags(module: nn.Module) -> Iterator[dict[str, Tags]]:
    """Capture the tags on entry and re-apply those that wrapping lost on exit.

    Args:
        module: the model that is wrapped in place inside the block (``fully_shard``
            changes the module it is given; it returns the same object).

    Yields:
        The captured ``{name: (mup_type, mup_scaling_depth)}`` map.

    Raises:
        ValueError: as :func:`restore_tags`.
    """
    tags = capture_tags(module)
    yield tags
    restore_tags(module, tags)
