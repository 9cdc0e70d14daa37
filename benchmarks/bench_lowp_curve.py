"""Training curves with bf16 parameters: stochastic rounding vs round-to-nearest.

Trains ``umup_compile.demo``'s ``TinyUmupLM`` on its synthetic batches with
``umup_compile.optim.Adam`` in several precision settings, from the same initial
weights (the float32 model, cast), on the same batches, with the same seed:

- ``fp32``: float32 parameters and state (the reference);
- ``bf16-fp32state-sr``: bf16 parameters, float32 moments, stochastic rounding;
- ``bf16-fp32state-rtn``: bf16 parameters, float32 moments, round-to-nearest;
- ``bf16-bf16state``: bf16 parameters and moments (torch's semantics), round-to-nearest.

By default the forward and backward run in float32 on every setting (bf16 parameters
are upcast for the forward; their gradients arrive in bf16), so the settings differ
only in how parameters and moments are stored and rounded by the optimizer, and a
CPU without fast bf16 matmuls stays quick; ``--compute param`` runs the model in the
parameters' dtype instead (about 5x slower per bf16 step on an AVX2 CPU).

The lr follows a short linear warm-up then a cosine decay to ``--min-lr``: late in
training the update is far below half a bf16 ulp of most weights, where
round-to-nearest writes back the old value (the weight stalls) while stochastic
rounding still moves it by the right amount on average.

Writes ``<date>_lowp_curve_t<threads>.{csv,md,png}`` into ``--out`` (default
``benchmarks/results/<device>/``): loss per step and setting, and a summary with the
final loss, the mean |loss - fp32 loss| over the last 20 % of the steps, and the
fraction of parameter elements the last step changed.

Examples (from the repository root):
    python -m benchmarks lowp-curve --threads 2
    python -m benchmarks lowp-curve --smoke --out /tmp/curve
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import umup_compile.optim as uo
from benchmarks import common
from umup_compile.demo import TinyUmupLM, batches


@dataclass(frozen=True)
class Setting:
    """One precision setting: parameter dtype, state dtype, rounding."""

    param_dtype: torch.dtype
    state_dtype: torch.dtype | None
    stochastic_rounding: bool
    description: str


REFERENCE = "fp32"
SETTINGS = {
    REFERENCE: Setting(torch.float32, None, False, "float32 params and state"),
    "bf16-fp32state-sr": Setting(
        torch.bfloat16,
        torch.float32,
        True,
        "bf16 params, float32 state, stochastic rounding",
    ),
    "bf16-fp32state-rtn": Setting(
        torch.bfloat16,
        torch.float32,
        False,
        "bf16 params, float32 state, round-to-nearest",
    ),
    "bf16-bf16state": Setting(
        torch.bfloat16, None, False, "bf16 params and state, round-to-nearest"
    ),
}
TAIL = 0.2  # the share of the steps the summary averages over


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks lowp-curve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05, help="peak lr")
    parser.add_argument("--min-lr", type=float, default=2.5e-4, help="final lr")
    parser.add_argument("--warmup", type=float, default=0.05, help="share of steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compute",
        choices=["float32", "param"],
        default="float32",
        help="dtype of the forward/backward: float32 (bf16 parameters upcast) or the "
        "parameters' own dtype",
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"comma-separated, from: {', '.join(SETTINGS)} ({REFERENCE} is the "
        "reference and always runs)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compiled optimizer engine (default: eager; same numbers, and on a small "
        "CPU the compiles would cost more than the training)",
    )
    parser.add_argument("--threads", type=int, default=None)
    common.add_out_argument(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, 8 steps: checks it runs"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    args.settings = [REFERENCE] + [n for n in names if n != REFERENCE]
    if args.smoke:
        args.steps, args.width, args.depth, args.vocab = 8, 16, 1, 32
        args.batch, args.seq = 4, 8
    return args


def lr_factor(step: int, steps: int, warmup: float, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` (a factor of the peak lr)."""
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return (step + 1) / n_warm
    t = (step - n_warm) / max(1, steps - n_warm - 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def forward(model: nn.Module, tokens: Tensor, compute: str) -> Tensor:
    """Logits; with ``compute="float32"`` low-precision parameters are upcast first.

    The upcast goes through autograd, so each parameter's gradient comes back in the
    parameter's own dtype, as it would from a bf16 forward.
    """
    if compute == "param":
        logits: Tensor = model(tokens)
        return logits
    params = {
        n: p if p.dtype == torch.float32 else p.float()
        for n, p in model.named_parameters()
    }
    out: Tensor = torch.func.functional_call(model, params, (tokens,))
    return out


def train(
    base: nn.Module,
    data: list[Tensor],
    setting: Setting,
    args: argparse.Namespace,
) -> tuple[list[float], float, float]:
    """Losses per step, fraction of elements the last step changed, seconds."""
    model = copy.deepcopy(base).to(setting.param_dtype)  # keeps the u-μP tags
    torch.manual_seed(args.seed)  # the stochastic-rounding streams' seed
    opt = uo.Adam(
        model.parameters(),
        lr=args.lr,
        state_dtype=setting.state_dtype,
        stochastic_rounding=setting.stochastic_rounding,
        compile=args.compile,
    )
    floor = args.min_lr / args.lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, len(data), args.warmup, floor)
    )
    losses: list[float] = []
    changed = 0.0
    t0 = time.perf_counter()
    for i, tokens in enumerate(data):
        logits = forward(model, tokens[:, :-1], args.compute)
        loss = nn.functional.cross_entropy(
            logits.float().flatten(0, 1), tokens[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        last = i == len(data) - 1
        before = [p.detach().clone() for p in model.parameters()] if last else []
        opt.step()
        sched.step()
        losses.append(loss.item())
        if last:
            params = list(model.parameters())
            n_changed = sum(int((p != b).sum()) for p, b in zip(params, before))
            changed = n_changed / sum(p.numel() for p in params)
    return losses, changed, time.perf_counter() - t0


def summarize(
    curves: dict[str, list[float]], changed: dict[str, float], seconds: dict[str, float]
) -> list[dict[str, object]]:
    """One row per setting: final loss, tail gap to the reference, last-step updates."""
    ref = curves[REFERENCE]
    n = len(ref)
    tail = slice(n - max(1, round(TAIL * n)), n)
    ref_tail = sum(ref[tail]) / len(ref[tail])
    rows = []
    for name, losses in curves.items():
        gaps = [abs(a - b) for a, b in zip(losses[tail], ref[tail])]
        tail_mean = sum(losses[tail]) / len(gaps)
        rows.append(
            {
                "setting": name,
                "description": SETTINGS[name].description,
                "final_loss": f"{losses[-1]:.4g}",
                "tail_mean_loss": f"{tail_mean:.4g}",
                "tail_loss_vs_fp32": f"{tail_mean / ref_tail:.3f}x",
                "tail_mean_abs_gap_vs_fp32": f"{sum(gaps) / len(gaps):.3g}",
                "changed_by_last_step": f"{100 * changed[name]:.3g} %",
                "seconds": f"{seconds[name]:.1f}",
            }
        )
    return rows


def write_png(
    path: Path, curves: dict[str, list[float]], lrs: list[float], title: str
) -> None:
    """Loss per step (log y) per setting, with the lr schedule on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    # bf16 state tracks round-to-nearest closely: dashed, so both stay visible.
    styles = {
        REFERENCE: ("k", "-", 2.0),
        "bf16-fp32state-sr": ("tab:red", "-", 1.2),
        "bf16-fp32state-rtn": ("tab:orange", "-", 1.6),
        "bf16-bf16state": ("tab:green", "--", 1.2),
    }
    for name, losses in curves.items():
        color, ls, lw = styles[name]
        ax.plot(losses, color=color, linestyle=ls, linewidth=lw, label=name)
    n = len(lrs)
    ax.axvspan(n - max(1, round(TAIL * n)), n, color="0.9", zorder=0)
    ax.set(xlabel="step", ylabel="training loss", yscale="log")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(lrs, color="0.6", linestyle=":", linewidth=1)
    ax2.set_ylabel("peak lr x schedule (dotted)", color="0.5")
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    head = common.header(device)

    torch.manual_seed(args.seed)
    base = TinyUmupLM(args.vocab, args.width, args.depth)
    data = batches(args.vocab, args.seq, args.batch, args.steps, seed=args.seed + 1)
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"# bench_lowp_curve: {n_params:,} parameters, {args.steps} steps, "
        f"lr {args.lr} -> {args.min_lr}, compile={args.compile}",
        flush=True,
    )
    curves: dict[str, list[float]] = {}
    changed: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name in args.settings:
        curves[name], changed[name], seconds[name] = train(
            base, data, SETTINGS[name], args
        )
        print(
            f"  {name:20s} final loss {curves[name][-1]:.4f} ({seconds[name]:.1f} s)",
            flush=True,
        )
    floor = args.min_lr / args.lr
    lrs = [
        args.lr * lr_factor(s, args.steps, args.warmup, floor)
        for s in range(args.steps)
    ]
    rows = summarize(curves, changed, seconds)

    out = common.output_dir(args.out, args.smoke, head, "lowp_curve")
    stem = f"{head['date']}_lowp_curve_t{head['threads']}"
    columns = ["step", "lr", *(f"loss_{n}" for n in curves)]
    per_step = [
        {
            "step": s,
            "lr": f"{lrs[s]:.6g}",
            **{f"loss_{n}": f"{c[s]:.6f}" for n, c in curves.items()},
        }
        for s in range(args.steps)
    ]
    common.write_csv(out / f"{stem}.csv", per_step, columns)

    columns = list(rows[0])
    table = common.markdown_table(rows, columns)
    run = {
        "model": f"umup_compile.demo.TinyUmupLM(vocab={args.vocab}, "
        f"width={args.width}, depth={args.depth}), {n_params:,} parameters",
        "data": f"umup_compile.demo.batches(batch={args.batch}, seq={args.seq}, "
        f"seed={args.seed + 1})",
        "optimizer": "umup_compile.optim.Adam (no weight decay), "
        + ("compiled" if args.compile else "eager engine (compile=False)"),
        "compute": "float32 forward/backward (bf16 parameters upcast, bf16 grads)"
        if args.compute == "float32"
        else "forward/backward in the parameters' dtype",
        "schedule": f"linear warm-up {args.warmup:.0%} of the steps to lr {args.lr}, "
        f"cosine decay to {args.min_lr}",
        "steps": args.steps,
        "seed": args.seed,
    }
    full_command = f"python -m benchmarks lowp-curve {command}".strip()
    md = (
        common.md_head("bench_lowp_curve", head, run, full_command, args.smoke)
        + "Loss is the training loss of each step's batch. Tail = the last "
        + f"{TAIL:.0%} of the steps (shaded in the plot); gap = mean |loss - "
        + f"{REFERENCE} loss| over the tail; tail vs fp32 = tail mean loss / the "
        + f"{REFERENCE} tail mean loss; changed = share of parameter elements "
        + "whose stored value the last optimizer step changed.\n\n"
        + table
        + f"\n\n![loss curves]({stem}.png)\n"
    )
    (out / f"{stem}.md").write_text(md)
    title = (
        f"TinyUmupLM ({n_params:,} params), u-μP Adam, {args.steps} steps, "
        f"lr {args.lr} -> {args.min_lr}\n{head['device_name']}, "
        f"{head['threads']} threads, torch {head['torch']}, commit {head['commit']}"
    )
    write_png(out / f"{stem}.png", curves, lrs, title)
    print()
    print(table)
    print(f"\nwrote {out / stem}.{{csv,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
