"""Readable per-parameter tables of the u-μP factors (``describe``)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from ._plan import as_float, group_scales, split_named
from ._rules import fan_in, lr_scale_func_adam, lr_scale_func_sgd

COLUMNS = (
    "parameter", "shape", "mup_type", "depth", "fan_in",
    "lr scale", "lr", "wd scale", "wd", "bucket",
)  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def _fan_in_or_dash(p: Tensor) -> int | None:
    if getattr(p, "mup_type", None) != "weight":
        return None
    try:
        return fan_in(p)  # type: ignore[arg-type]
    except ValueError:
        return None


def render(
    rows: Sequence[Sequence[Any]],
    numel: int,
    columns: Sequence[str] = COLUMNS,
    total_extra: str = "",
) -> str:
    """Render rows under ``columns`` as an aligned text table with a totals line."""
    cells = [list(columns)] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[c]) for r in cells) for c in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"total: {len(rows)} tensors, {numel:,} elements{total_extra}")
    return "\n".join(lines)


def param_row(
    p: Tensor,
    name: str | None,
    *,
    lr_scale: float,
    lr: float,
    wd_scale: float,
    weight_decay: float,
    bucket: int,
) -> list[Any]:
    """One table row for a parameter."""
    return [
        name or "-",
        tuple(p.shape),
        getattr(p, "mup_type", None),
        getattr(p, "mup_scaling_depth", None),
        _fan_in_or_dash(p),
        lr_scale,
        lr * lr_scale,
        wd_scale,
        weight_decay * wd_scale,
        bucket,
    ]


def describe(
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    readout_constraint: str | None = None,
    independent_weight_decay: bool = True,
    allow_non_unit_scaling_params: bool = False,
) -> str:
    """Tabulate the u-μP factors a model's parameters would get, before any optimizer.

    Args:
        model_or_params: a module (names come from ``named_parameters()``), parameters,
            or ``(name, parameter)`` pairs.
        lr, weight_decay: the base values the effective columns are computed from.
        optimizer: ``"adam"`` or ``"adamw"`` (the same rule) or ``"sgd"``.
        readout_constraint: SGD's readout constraint (see ``lr_scale_func_sgd``).
        independent_weight_decay, allow_non_unit_scaling_params: as the optimizers.

    Returns:
        The table, one row per parameter, with a totals line; buckets are the
        (device, dtype) groups the compiled engine would update together.

    Raises:
        ValueError: as the optimizers would for these parameters or options.
    """
    if optimizer not in ("adam", "adamw", "sgd"):
        raise ValueError(
            f"optimizer={optimizer!r} is not supported; use 'adam', 'adamw' or 'sgd'."
        )
    if optimizer != "sgd" and readout_constraint is not None:
        raise ValueError(
            f"readout_constraint={readout_constraint!r} is SGD's option; Adam and "
            "AdamW have none: leave it None or pass optimizer='sgd'."
        )
    rule = (
        lr_scale_func_sgd(readout_constraint)
        if optimizer == "sgd"
        else lr_scale_func_adam
    )
    if isinstance(model_or_params, nn.Module):
        entries: list[Any] = list(model_or_params.named_parameters())
    else:
        entries = list(model_or_params)
    names, params = split_named(entries)
    lr, weight_decay = as_float(lr, "lr"), as_float(weight_decay, "weight_decay")
    lr_scales, wd_scales = group_scales(
        params,
        names,
        0,
        lr=lr,
        weight_decay=weight_decay,
        lr_scale_func=rule,
        independent_weight_decay=independent_weight_decay,
        allow_non_unit_scaling_params=allow_non_unit_scaling_params,
    )
    buckets: dict[tuple[Any, ...], int] = {}
    rows = []
    for p, name, lr_scale, wd_scale in zip(params, names, lr_scales, wd_scales):
        bucket = buckets.setdefault((p.device, p.dtype), len(buckets))
        rows.append(
            param_row(
                p,
                name,
                lr_scale=lr_scale,
                lr=lr,
                wd_scale=wd_scale,
                weight_decay=weight_decay,
                bucket=bucket,
            )  # fmt: skip
        )
    return render(rows, sum(p.numel() for p in params))


def optimizer_table(
    groups: Sequence[dict[str, Any]],
    config: Callable[[dict[str, Any]], Hashable],
    state: dict[Tensor, dict[str, Any]],
    predict: Callable[[Tensor, dict[str, Any]], dict[str, Any] | None],
    state_config: Callable[[Any, dict[str, Any]], Hashable],
) -> str:
    """The table of an optimizer's parameters: factors, effective values, bucket
    and state bytes.

    Buckets are numbered as the optimizer forms them: by (device, dtype, static
    config from ``config`` refined by ``state_config``, state dtypes). A parameter
    without state yet shows the state ``predict`` says its first step makes
    (``None``: unknown, ``-``).
    """
    buckets: dict[tuple[Any, ...], int] = {}
    rows = []
    total = 0
    for g, group in enumerate(groups):
        group_config = config(group)
        names = group.get("param_names")
        lr = as_float(group["lr"], "lr")
        weight_decay = as_float(group["weight_decay"], "weight_decay")
        for i, p in enumerate(group["params"]):
            own = state.get(p) or predict(p, group)
            nbytes = None if own is None else _nbytes(own)
            total += nbytes or 0
            dtypes = tuple(  # tensors only: a torch checkpoint may hold a None
                (k, t.dtype)
                for k, t in sorted((own or {}).items())
                if k != "step" and isinstance(t, Tensor)
            )
            key = (p.device, p.dtype, state_config(group_config, own or {}), dtypes)
            bucket = buckets.setdefault(key, len(buckets))
            row = param_row(
                p,
                names[i] if names else f"g{g}[{i}]",
                lr_scale=group["lr_scales"][i],
                lr=lr,
                wd_scale=group["wd_scales"][i],
                weight_decay=weight_decay,
                bucket=bucket,
            )
            rows.append([*row, nbytes])
    numel = sum(p.numel() for g in groups for p in g["params"])
    extra = f", state {total:,} B ({total / max(numel, 1):.3g} B per element)"
    return render(rows, numel, (*COLUMNS, "state B"), extra)


def _nbytes(state: dict[str, Any]) -> int:
    """The bytes of a parameter's state tensors (a ``DTensor``: its local shard)."""
    return sum(
        (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
        for t in state.values()
        if isinstance(t, Tensor)
    )
