"""``_tensor_check.TensorsLike``: every change of metadata the steady check relies on
is reported, through Dynamo's C++ check and through the Python fallback alike, and
under another dispatch state (a dispatch mode, autocast)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from umup_compile import _tensor_check
from umup_compile._tensor_check import TensorsLike


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:  # noqa: ANN401
        return func(*args, **(kwargs or {}))


def _neg(t: Tensor) -> Tensor:
    return torch.complex(torch.zeros_like(t), -t).conj().imag


# (id, change of the first tensor, whether sizes/strides-free checks see it)
CHANGES: list[tuple[str, Callable[[Tensor], Tensor], bool]] = [
    ("strides", lambda t: t.t().contiguous().t(), False),
    ("sizes", lambda t: t[:2], False),
    ("dtype", lambda t: t.double(), True),
    ("negative_bit", _neg, True),
    ("requires_grad", lambda t: t.clone().requires_grad_(True), True),
    ("layout", lambda t: t.to_sparse(), True),
    ("type", lambda t: nn.Parameter(t.clone()), True),
    ("ndim", lambda t: t.reshape(-1), True),
]


@pytest.fixture(params=["guards", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(_tensor_check, "_USE_GUARDS", False)
    elif not _tensor_check._USE_GUARDS:
        pytest.skip(f"Dynamo's TensorGuards is not usable on torch {torch.__version__}")
    return str(request.param)


@pytest.mark.parametrize(
    ("change", "loose_sees"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES]
)
def test_each_change_is_reported(
    path: str, change: Callable[[Tensor], Tensor], loose_sees: bool
) -> None:
    ref = [torch.zeros(4, 6), torch.ones(3)]
    full = TensorsLike(ref, sizes=True, strides=True)
    loose = TensorsLike(ref, sizes=False, strides=False)
    same = [torch.randn(4, 6), torch.randn(3)]  # other tensors, same metadata
    assert full.matches(same) and loose.matches(same)
    changed = [change(ref[0]), ref[1]]
    assert not full.matches(changed)
    assert loose.matches(changed) is not loose_sees
    assert not full.matches(ref[:1])  # another count


@pytest.mark.parametrize(
    "context",
    [_Passthrough, lambda: torch.autocast("cpu")],
    ids=["dispatch-mode", "autocast"],
)
def test_another_dispatch_state_gives_the_same_answers(path: str, context: Any) -> None:
    ref = [torch.zeros(4, 6), torch.ones(3)]
    full = TensorsLike(ref, sizes=True, strides=True)
    with context():
        assert full.matches([torch.randn(4, 6), torch.randn(3)])
        assert not full.matches([ref[0].t().contiguous().t(), ref[1]])
        assert not full.matches([_neg(ref[0]), ref[1]])


def test_dynamos_check_is_used_on_this_torch() -> None:
    """The fast path is the one CI runs (torch 2.13); the self-test accepted it."""
    if torch.__version__.startswith("2.13"):
        assert _tensor_check._USE_GUARDS


def test_overlapping_finds_every_tensor_sharing_memory_and_no_other() -> None:
    """Against a brute-force check of the elements' addresses: tensors sharing
    an element are found, views of one buffer that share none are not, and
    interleaved views (columns of one matrix) count as overlapping (their spans do)."""
    buf = torch.zeros(64)
    m = torch.zeros(6, 8)
    tensors = [
        buf[:10],
        buf[10:20],  # adjacent: apart
        buf[15:18],  # inside the one before
        m[:, :3],  # columns: span rows 0-5 ...
        m[:, 5:],  # ... interleaved with these
        buf[48:56].view(2, 4).t(),  # transposed, alone
        buf[56:],
        torch.zeros(3),
        buf[56:],  # the same view twice
        torch.zeros(0),
        torch.zeros(2, device="meta"),
    ]

    def span(t: Tensor) -> set[int]:
        if t.numel() == 0 or t.device.type == "meta":
            return set()
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return set(range(t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()))

    spans = [span(t) for t in tensors]
    expected = {
        k
        for k, a in enumerate(spans)
        if any(j != k and a & b for j, b in enumerate(spans))
    }
    assert _tensor_check.overlapping(tensors) == expected
    assert expected == {1, 2, 3, 4, 6, 8}
