"""One optimizer step for CUDA parameters, lowered and counted (run in a subprocess).

:func:`account` records a steady step (``gpu_record``), lowers each distinct call
(``gpu_lower``), writes every generated wrapper to the code folder (``gpu_cubin``
builds their kernels from there, in a process of its own) and adds it all up per
step: a graph the step calls k times (chunks of one size) counts k times. The result is a plain
dict, the per-configuration part of ``gpu_codegen``'s JSON.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from benchmarks import gpu_cost, gpu_lower, gpu_record


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:80]


def _kind(call: gpu_record.Call) -> str:
    """The call's engine kind as it reads on CUDA (recorded on meta)."""
    return call.kind.replace("@meta:", "@cuda:")


def account(
    workload: str,
    dtype: str,
    capturable: bool,
    clip: bool,
    code_dir: Path,
    interpret: bool = False,
) -> dict[str, Any]:
    """Lower and count one configuration's steady step (see the module docstring);
    with ``interpret``, also run its kernels in Triton's interpreter against eager
    (``gpu_interpret``: the process must have ``TRITON_INTERPRET=1``)."""
    t0 = time.perf_counter()
    step = gpu_record.record(workload, dtype, capturable, clip)
    code_dir.mkdir(parents=True, exist_ok=True)
    lowered: dict[Any, tuple[gpu_lower.Lowering, str]] = {}
    graphs: list[dict[str, Any]] = []
    for call in step.calls:
        if call.key in lowered:
            lowering, name = lowered[call.key]
            next(g for g in graphs if g["file"] == name)["calls"] += 1
            continue
        lowering = gpu_lower.lower(call, cudagraphs=capturable)
        name = f"{len(lowered):02d}-{call.fn.__name__}-{_slug(_kind(call))}.py"
        lowered[call.key] = (lowering, name)
        (code_dir / name).write_text(
            "\n\n# ---- next graph ----\n\n".join(lowering.sources)
        )
        kernels = [k for w in lowering.wrappers for k in w.kernels]
        graphs.append(
            {
                "file": name,
                "function": call.fn.__name__,
                "kind": _kind(call),
                "static": call.static,
                "calls": 1,
                # parameters (or a pack's buffers) the graph updates
                "tensors": len(call.args[0]) if isinstance(call.args[0], list) else 1,
                "compiled_graphs": len(lowering.sources),
                "kernels": len(kernels),
                "launches": sum(w.launches for w in lowering.wrappers),
                "bytes": sum(w.bytes for w in lowering.wrappers),
                "kernel_num_gb": {k.name: k.num_gb for k in kernels},
                "heuristics": sorted({k.heuristic for k in kernels}),
                "fallbacks": [f for w in lowering.wrappers for f in w.fallbacks],
                "host_syncs": [s for w in lowering.wrappers for s in w.host_syncs]
                + (
                    ["traced: " + (lowering.error or "")]
                    if lowering.host_sync_error
                    else []
                ),
                "cpu_buffers": sum(w.cpu_buffers for w in lowering.wrappers),
                "cudagraphs": lowering.cudagraphs,
                "error": lowering.error,
            }
        )
    lowered_at = time.perf_counter()  # recorded and lowered; numerics may follow
    numerics = None
    if interpret:
        from benchmarks import gpu_interpret

        cache = {key: lowering for key, (lowering, _) in lowered.items()}

        def lower(call: gpu_record.Call) -> gpu_lower.Lowering:
            if call.key not in cache:  # an uncaptured CPU optimizer's call
                cache[call.key] = gpu_lower.lower(call, cudagraphs=False)
            return cache[call.key]

        numerics = gpu_interpret.check(
            workload, dtype, clip, lower, code_dir / "interpreter"
        )
    ideal = gpu_record.DTYPES[dtype].ideal_bytes(step.numels)
    per_param = ideal / step.params  # 8-bit state: not a whole number
    graph_bytes = sum(g["bytes"] * g["calls"] for g in graphs)
    eager_bytes = sum(op.bytes for op in step.ops)
    reasons = sorted(
        {
            reason
            for g in graphs
            for cg in g["cudagraphs"]
            for reason in (cg["fail_reasons"] or [])
            + ([cg["disabled_reason"]] if cg["disabled_reason"] else [])
        }
        | {f"{g['file']}: not lowered" for g in graphs if g["error"]}
    )
    return {
        "workload": workload,
        "dtype": dtype,
        "capturable": capturable,
        "clip": clip,
        "params": step.params,
        "tensors": len(step.numels),
        "ideal_bytes_per_param": int(per_param)
        if per_param.is_integer()
        else round(per_param, 4),
        "ideal_bytes": ideal,
        "graph_bytes": int(graph_bytes),
        "eager_bytes": eager_bytes,
        "total_bytes": int(graph_bytes) + eager_bytes,
        "graph_calls": sum(g["calls"] for g in graphs),
        "graphs": len(graphs),
        "kernels": sum(g["kernels"] * g["calls"] for g in graphs),
        "launches": sum(g["launches"] * g["calls"] for g in graphs),
        "eager_launches": sum(op.launches for op in step.ops),
        "eager_ops": [[op.name, op.launches, op.bytes] for op in step.ops],
        "torch_fused_launches": gpu_cost.torch_fused_launches(step.numels),
        "fallbacks": sorted({f for g in graphs for f in g["fallbacks"]}),
        "host_syncs": sum(len(g["host_syncs"]) for g in graphs)
        + sum(op.host_sync for op in step.ops),
        "cudagraph_fail_reasons": reasons,
        "lowering_errors": [g["error"] for g in graphs if g["error"]],
        "interpreter_max_rel_err": None
        if numerics is None
        else numerics["max_rel_err"],
        "interpreter": numerics,
        "per_graph": graphs,
        "code_dir": str(code_dir),
        "seconds": round(time.perf_counter() - t0, 1),
        "lowering_seconds": round(lowered_at - t0, 1),
    }
