"""The optimizer's CUDA step on paper: lowered for sm_90 without a GPU, counted, and
timed by a roofline model (a simulation, not a measurement).

For each workload and dtype, a subprocess (the stand-ins of ``gpu_standins`` are
process-wide) records the steady step a ``umup_compile`` Adam makes for CUDA
parameters (``gpu_record``), lowers every graph of it through Inductor for sm_90 and
builds its kernels to cubin (``gpu_step``, ``gpu_cubin``). This process adds the
paper times and the goals (``gpu_report``) and writes a JSON file and a markdown
summary.

Paper step time = bytes / bandwidth + launches x launch cost, at nominal HBM
bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s), beside torch's fused Adam on the same
tensors at its ideal bytes and its multi-tensor launches (``gpu_record``). The launch
cost (``--launch-us``, default 2 us) is the order of one small kernel's share of a
dependent sequence on an H100 (launch latency plus the tail of a grid, ~1-3 us;
host-side launches cost more, CUDA-graph replays less): it is a parameter of the
simulation, printed with every result.

Examples (from the repository root):
    python -m benchmarks.gpu_codegen --workload gpt --dtype fp32
    python -m benchmarks.gpu_codegen --workload many-small --capturable --json /tmp/m.json
    python -m benchmarks.gpu_codegen --workload all --dtype fp32,bf16-fp32state \\
        --out benchmarks/results/paper-sm90
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
MAIN_WORKLOADS = ("gpt", "gpt-124m", "gpt-1.2b", "many-small")
# torch, Triton: the pair tests/test_gpu_codegen.py's pinned counts were made with
BUILT_FOR = ("2.13.0", "3.9.0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.gpu_record import DTYPES, WORKLOADS

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks gpu-codegen",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--workload",
        default="gpt",
        help=f"comma-separated, from {', '.join(WORKLOADS)}, or 'all' "
        f"({', '.join(MAIN_WORKLOADS)})",
    )
    parser.add_argument(
        "--dtype", default="fp32", help=f"comma-separated, from {', '.join(DTYPES)}"
    )
    parser.add_argument(
        "--capturable", action="store_true", help="capturable=True, a device lr"
    )
    parser.add_argument(
        "--clip", action="store_true", help="max_grad_norm=1.0 (the clip graph)"
    )
    parser.add_argument("--arch", choices=["sm90"], default="sm90")
    parser.add_argument("--launch-us", type=float, default=2.0, help="launch cost")
    parser.add_argument(
        "--no-cubin", action="store_true", help="skip the sm_90 cubin build"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="comma-separated WORKLOAD:DTYPE[:capturable][:clip] entries, instead "
        "of --workload x --dtype with --capturable/--clip",
    )
    parser.add_argument(
        "--interpret",
        default="",
        help="comma-separated workloads whose kernels also run in Triton's "
        "interpreter against eager ('all': every one; keep them small)",
    )
    parser.add_argument(
        "--code-dir",
        type=Path,
        default=None,
        help="where the generated wrappers go (default: a temporary folder)",
    )
    parser.add_argument("--json", type=Path, default=None, help="JSON output file")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a results folder: writes <name>.json and <name>.md there",
    )
    parser.add_argument(
        "--inductor-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="an experiment: an Inductor option added to the engine's (e.g. "
        "combo_kernels=true); recorded in the results' header",
    )
    parser.add_argument(
        "--layout-option",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="an experiment: a constant of umup_compile._layout set in the worker "
        "(e.g. UNROLL_MAX=128); recorded in the results' header",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="file name stem under --out (default: date_workloads)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.config:
        configs = [Config.parse(text) for text in args.config.split(",")]
    else:
        workloads = (
            list(MAIN_WORKLOADS) if args.workload == "all" else args.workload.split(",")
        )
        configs = [
            Config(w, d, args.capturable, args.clip)
            for w in workloads
            for d in args.dtype.split(",")
        ]
    bad = [
        c.name for c in configs if c.workload not in WORKLOADS or c.dtype not in DTYPES
    ]
    if bad:
        parser.error(f"unknown workload or dtype in {bad}")
    args.configs = configs
    try:
        args.options = {
            key: json.loads(value)
            for key, value in (o.split("=", 1) for o in args.inductor_option)
        }
        args.layout = {
            key: int(value)
            for key, value in (o.split("=", 1) for o in args.layout_option)
        }
    except ValueError as e:
        parser.error(f"--inductor-option takes KEY=JSON, --layout-option NAME=INT: {e}")
    if args.code_dir is None:
        args.code_dir = Path(tempfile.mkdtemp(prefix="umup-gpu-codegen-"))
    return args


def versions() -> dict[str, str]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {"torch": torch.__version__.split("+")[0], "triton": triton_version}


class Config(NamedTuple):
    """One configuration: a workload, a dtype, and the optimizer's flags."""

    workload: str
    dtype: str
    capturable: bool = False
    clip: bool = False

    @property
    def name(self) -> str:
        flags = ["capturable"] * self.capturable + ["clip"] * self.clip
        return "-".join([self.workload, self.dtype, *flags])

    @property
    def spec(self) -> str:
        flags = [":capturable"] * self.capturable + [":clip"] * self.clip
        return ":".join([self.workload, self.dtype]) + "".join(flags)

    @staticmethod
    def parse(text: str) -> Config:
        workload, dtype, *flags = text.split(":")
        unknown = set(flags) - {"capturable", "clip"}
        if unknown:
            raise SystemExit(f"unknown flag(s) {sorted(unknown)} in {text!r}")
        return Config(workload, dtype, "capturable" in flags, "clip" in flags)


def _run(cmd: list[str], env: dict[str, str], out: Path) -> Any:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode or not out.exists():
        return (done.stderr or done.stdout)[-4000:]
    return json.loads(out.read_text())


def run_worker(
    args: argparse.Namespace, todo: list[Config], interpret: list[bool]
) -> list[dict[str, Any]]:
    """The configurations in one fresh interpreter (its stand-ins die with it), under
    ``TRITON_INTERPRET=1`` when any is checked in the interpreter; then their
    kernels built to cubin by ``gpu_cubin`` in another (unless ``--no-cubin``)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if any(interpret):
        env["TRITON_INTERPRET"] = "1"
    names = [c.name for c in todo]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        # an empty Inductor cache: lowering timed as a first compile
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor-cache")
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.gpu_codegen",
            "--worker",
            "--config",
            ",".join(c.spec for c in todo),
            "--interpret",
            ",".join(str(int(i)) for i in interpret),
            "--code-dir",
            str(args.code_dir),
            "--json",
            str(out),
            *[f"--inductor-option={o}" for o in args.inductor_option],
            *[f"--layout-option={o}" for o in args.layout_option],
        ]
        results = _run(cmd, env, out)
        if isinstance(results, str):
            return [{**c._asdict(), "error": results} for c in todo]
        if not args.no_cubin:
            env.pop("TRITON_INTERPRET", None)
            dirs = [str(args.code_dir / name) for name in names]
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.gpu_cubin",
                *dirs,
                "--json",
                str(out),
            ]
            built = _run(cmd, env, out)
            for name, result in zip(names, results):
                if isinstance(built, str):
                    result.update(cubin_ok=False, cubin_error=built)
                else:
                    result.update(built[name])
    return results  # type: ignore[no-any-return]


def worker(args: argparse.Namespace) -> None:
    """The worker's loop: the k-th workload with the k-th dtype."""
    import torch

    from benchmarks import gpu_lower, gpu_step

    gpu_lower.EXTRA.update(args.options)
    if args.layout:
        from umup_compile import _layout

        for name, value in args.layout.items():
            if not hasattr(_layout, name):
                raise SystemExit(f"umup_compile._layout has no {name}")
            setattr(_layout, name, value)
    results = []
    checks = [flag == "1" for flag in args.interpret.split(",")]
    for config, check in zip(args.configs, checks):
        results.append(
            gpu_step.account(
                config.workload,
                config.dtype,
                config.capturable,
                config.clip,
                args.code_dir / config.name,
                interpret=check,
            )
        )
        torch._dynamo.reset()  # each configuration's graphs are its own
    args.json.write_text(json.dumps(results, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from benchmarks import common
    from benchmarks.gpu_report import goals, markdown, paper

    header = {
        **versions(),
        "commit": common.git_commit(),
        "date": common._dt.date.today().isoformat(),
        "arch": args.arch,
        "launch_us": args.launch_us,
        "simulation": True,
        "command": "python -m benchmarks.gpu_codegen " + " ".join(argv or sys.argv[1:]),
        "inductor_options": args.options,  # experiments beyond the engine's own
        "layout_options": args.layout,
        "code_dir": str(args.code_dir),
    }
    todo = args.configs
    chosen = args.interpret.split(",")
    interpret = [args.interpret == "all" or c.workload in chosen for c in todo]
    if not args.no_progress:
        print(f"lowering {len(todo)} configuration(s)...", file=sys.stderr)
    results = run_worker(args, todo, interpret)
    for config, result in zip(todo, results):
        result["name"] = config.name
        if "error" not in result:
            result["paper"] = paper(result, args.launch_us)
            result["goals"] = goals(result)
    document = {"header": header, "results": results}
    text = markdown(results, header)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1, default=str))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.name or "_".join(
            [header["date"], *sorted({c.workload for c in todo})]
        )
        (args.out / f"{stem}.json").write_text(
            json.dumps(document, indent=1, default=str)
        )
        (args.out / f"{stem}.md").write_text(text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
