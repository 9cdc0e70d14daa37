"""Host cost of a step: many tiny parameters, where Python and dispatch are the step.

Parameters of 16 elements (4x4), 2,000 and 8,000 of them by default, 1 thread: the
update itself is negligible, so the step time per parameter is the per-parameter
overhead of the optimizer's host side. Contestants, in one process on copies of the
same parameters and gradients, round-robin windows (``timer.time_interleaved``), a
``LambdaLR`` changing lr before every step (untimed, as in the step workloads):

- ``umup-compiled`` / ``umup-eager``: ``umup_compile.optim.Adam``, one param group;
- ``umup-compiled-groups`` / ``umup-eager-groups``: one group per parameter (as
  unit_scaling's ``scaled_parameters`` makes them); their ``vs_one_group`` column is
  the ratio to the same engine with one group (param groups must cost nothing);
- ``torch-fused`` / ``torch-foreach``: ``torch.optim.Adam``, one group.

Examples (from the repository root):
    python -m benchmarks host                            # 2000 and 8000, 1 thread
    python -m benchmarks host --counts 8000 --repeats 40
    python -m benchmarks host --smoke --out /tmp/host.csv
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import common, sets, timer

LR = 1e-2
BASELINE = "torch-fused"


def _umup(
    compile_: bool, per_param_groups: bool
) -> Callable[[list[nn.Parameter]], Any]:
    def build(params: list[nn.Parameter]) -> Any:
        from umup_compile.optim import Adam

        groups: Any = [{"params": [p]} for p in params] if per_param_groups else params
        return Adam(groups, lr=LR, compile=compile_)

    return build


def _torch(**kwargs: Any) -> Callable[[list[nn.Parameter]], Any]:
    def build(params: list[nn.Parameter]) -> Any:
        return torch.optim.Adam(params, lr=LR, **kwargs)

    return build


CONTESTANTS: dict[str, tuple[Callable[[list[nn.Parameter]], Any], str]] = {
    "umup-compiled": (_umup(True, False), "umup_compile Adam, compiled, one group"),
    "umup-compiled-groups": (
        _umup(True, True),
        "umup_compile Adam, compiled, one group per parameter",
    ),
    "umup-eager": (_umup(False, False), "umup_compile Adam, compile=False, one group"),
    "umup-eager-groups": (
        _umup(False, True),
        "umup_compile Adam, compile=False, one group per parameter",
    ),
    BASELINE: (_torch(fused=True), "torch.optim.Adam(fused=True)"),
    "torch-foreach": (_torch(foreach=True), "torch.optim.Adam(foreach=True)"),
}
ONE_GROUP = {"umup-compiled-groups": "umup-compiled", "umup-eager-groups": "umup-eager"}
COLUMNS = [
    "n_params",
    "contestant",
    "first_step_ms",
    "median_ms",
    "iqr_ms",
    "us_per_param",
    "ratio_vs_torch_fused",
    "vs_one_group",
    "description",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks host",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--counts", default="2000,8000", help="parameter counts")
    parser.add_argument("--numel", type=int, default=16, help="elements per parameter")
    parser.add_argument(
        "--contestants", default=",".join(CONTESTANTS), help="comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed samples each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps each")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV path (default: benchmarks/results/<device>/<date>_host_t<threads>.csv; "
        "with --smoke, a temporary directory)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny: checks it runs")
    args = parser.parse_args(argv)
    args.counts = [int(n) for n in args.counts.split(",")]
    args.contestants = [n.strip() for n in args.contestants.split(",") if n.strip()]
    unknown = [n for n in args.contestants if n not in CONTESTANTS]
    if unknown:
        parser.error(
            f"unknown contestant(s) {unknown}; choose from {list(CONTESTANTS)}"
        )
    if args.smoke:
        args.counts, args.repeats, args.warmup = [50], 3, 1
    return args


def run_count(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    """Build, first-step and time every contestant on ``n`` parameters."""
    device = torch.device("cpu")
    specs = sets.many_small_specs(n=n, numel=args.numel)
    master = sets.build_params(specs, device=device)
    steps: dict[str, Callable[[], Any]] = {}
    between: dict[str, Callable[[], Any]] = {}
    first: dict[str, float] = {}
    # Every contestant is built before any first step, as a training script builds
    # its optimizer before the first (compiling) step: groups built after another
    # contestant's cold compile would be scattered among the compiler's garbage,
    # and walking them would cost cache misses a real run does not have.
    built = {}
    for name in args.contestants:
        opt = CONTESTANTS[name][0](sets.copy_params(master))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 1e-3 * s))
        built[name] = opt, sched
    for name, (opt, sched) in built.items():
        gc.collect()
        first[name] = timer.time_once(opt.step, device)
        steps[name], between[name] = opt.step, sched.step
        print(f"  n={n} built {name:22s} first step {first[name] * 1e3:9.1f} ms")
    timings = timer.time_interleaved(
        steps, device, warmup=args.warmup, repeats=args.repeats, between=between
    )
    base = timings[BASELINE].median if BASELINE in timings else None
    rows = []
    for name in args.contestants:
        t = timings[name]
        one = ONE_GROUP.get(name)
        rows.append(
            {
                "n_params": n,
                "contestant": name,
                "description": CONTESTANTS[name][1],
                "first_step_ms": f"{first[name] * 1e3:.1f}",
                "median_ms": f"{t.median * 1e3:.3f}",
                "iqr_ms": f"{t.iqr * 1e3:.3f}",
                "us_per_param": f"{t.median * 1e6 / n:.2f}",
                "ratio_vs_torch_fused": "-"
                if base is None
                else f"{t.median / base:.2f}",
                "vs_one_group": (
                    f"{t.median / timings[one].median:.2f}" if one in timings else "-"
                ),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    head = common.header(torch.device("cpu"))
    command = " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench_host_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold first steps
        rows = [row for n in args.counts for row in run_count(args, n)]
    for row in rows:
        row.update(head)
    table = common.markdown_table(rows, COLUMNS)
    print()
    print(table)
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="bench_host_")) / "smoke.csv"
        if args.smoke
        else common.RESULTS
        / head["device"]
        / f"{head['date']}_host_t{head['threads']}.csv"
    )
    common.write_csv(out, rows, COLUMNS + common.RUN_COLUMNS)
    md = out.with_suffix(".md")
    md.write_text(
        "# bench_host: host cost per parameter\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in head.items())
        + f"\n- command: `python -m benchmarks host {command}`\n\n"
        + f"{args.numel} elements per parameter; times per optimizer step, median and "
        + f"IQR of {args.repeats} round-robin samples; us_per_param = median / "
        + "parameters; vs_one_group = median / the same engine with one group.\n\n"
        + table
        + "\n"
    )
    print(f"\nwrote {out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
