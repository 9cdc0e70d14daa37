"""The package's CUDA host code on fake CUDA tensors (``tests/fake_cuda_host.py``).

No GPU: the stand-ins of ``benchmarks.gpu_standins`` let tensors say
``device='cuda'`` on a CPU-only build, and the script runs in a subprocess because
they are process-wide. What runs is the host code only (no kernel does): host
hyper-parameters and the pinned refresh, state and ``step`` on the device, the capture guard of
``hyper_values`` and a direct call of a compiled CUDA graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_gpu_codegen import SKIP_REASON

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))


@pytest.fixture(scope="module")
def checks() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fake_cuda_host.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_float_hypers_of_few_groups_stay_on_the_host(checks: dict) -> None:
    # 3 steps under a LambdaLR, two groups: the update reads rows of 0-d host
    # tensors, and nothing is pinned or copied to the device (Note [host hypers])
    host = checks["host"]
    assert host["pin_memory"] == 0
    assert host["host_to_device_copies"] == 0
    assert host["hypers_seen"] == [[["cpu:0"], ["cpu:0"]]] * 3


def test_float_lr_of_many_groups_refreshes_through_pinned_memory(
    checks: dict,
) -> None:
    # 3 steps under a LambdaLR, 5 groups (past HOST_GROUPS): the lr changes before
    # every step
    pinned = checks["pinned"]
    assert pinned["hypers_seen"] == ["tensor:cuda"] * 3
    assert pinned["pin_memory"] == 3
    assert pinned["host_to_device_copies"] == 3
    assert pinned["all_non_blocking"]
    assert pinned["index_put_on_device"] == 0
    assert pinned["device_copies_into_table"] == 0


def test_device_lr_is_written_on_the_device(checks: dict) -> None:
    capturable = checks["capturable"]
    assert capturable["pin_memory"] == 1  # the float columns, once
    # the lr tensor, every step: one copy into its view of the table (Note [tensor
    # hyper refresh]), not a stack, a conversion and a scatter
    assert capturable["device_copies_into_table"] == 3
    assert capturable["index_put_on_device"] == 0


@pytest.mark.parametrize("check", ["host", "pinned", "capturable"])
def test_state_and_step_live_on_the_device(checks: dict, check: str) -> None:
    assert checks[check]["state_devices"] == [
        "exp_avg:cuda",
        "exp_avg_sq:cuda",
        "step:cuda",
    ]


def test_clip_and_grad_scaler_stay_on_the_device(checks: dict) -> None:
    assert checks["amp_clip"] == {"norm_device": "cuda"}


def test_hyper_values_refuses_to_run_under_capture(checks: dict) -> None:
    guard = checks["capture_guard"]
    if "skipped" in guard:
        pytest.skip(guard["skipped"])
    assert guard["raised"] is not None and "capturable=True" in guard["raised"]


def test_step_of_optimizer_not_capturable_refuses_capture(checks: dict) -> None:
    guard = checks["capture_guard"]
    if "skipped" in guard:
        pytest.skip(guard["skipped"])
    assert guard["step_raised"] is not None
    assert "capturable=True" in guard["step_raised"]
    assert guard["param_unchanged"]


def test_steady_cuda_call_is_direct(checks: dict) -> None:
    direct = checks["direct"]
    assert direct == {"direct_calls": 1, "graphs": 1, "same_inputs": True}
