"""Checking many tensors' metadata at once, in one C++ loop where torch has one.

:class:`TensorsLike` remembers a list of tensors' metadata and answers whether another
list matches it: each tensor's Python type, dispatch keys (its device type, sparse
layout, negative and conjugate bits, under the thread's current dispatch state), dtype,
device index, ``requires_grad``, number of dimensions, and optionally sizes and
strides. The steady-step check runs it over every parameter and gradient at every
step (``_steady``).

Internals read: Dynamo's ``torch._C._dynamo.guards.TensorGuards`` (the check behind
Dynamo's tensor guards; its ``check(*tensors)`` loops in C++). A self-test on import
confirms it reports each change this module relies on; where it is missing or
reports otherwise, or while the thread's dispatch state differs from the one the
reference was taken under (a dispatch mode, autocast), the same checks run in Python
(slower, same answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

_TensorGuards: Any
try:
    from torch._C._dynamo import guards as _dynamo_guards

    _TensorGuards = getattr(_dynamo_guards, "TensorGuards", None)
except ImportError:  # pragma: no cover - every supported torch has it
    _TensorGuards = None


def _python_meta(t: Tensor, sizes: bool, strides: bool) -> tuple[Any, ...]:
    return (
        type(t),
        t.dtype,
        t.device,
        t.layout,
        t.requires_grad,
        t.is_neg(),
        t.is_conj(),
        t.shape if sizes else t.ndim,
        t.stride() if strides else None,
    )


class TensorsLike:
    """The metadata of ``tensors``; :meth:`matches` compares another list to it.

    Args:
        tensors: the reference tensors.
        sizes, strides: whether their sizes and strides must match too.
    """

    def __init__(
        self, tensors: Sequence[Tensor], *, sizes: bool, strides: bool
    ) -> None:
        self._n = len(tensors)
        self._sizes, self._strides = sizes, strides
        self._guards = _guards(tensors, sizes, strides) if _USE_GUARDS else None
        # Dynamo's check compares dispatch keys under the thread's dispatch state:
        # under another one (a dispatch mode, autocast) the Python checks answer.
        self._tls = _tls()
        self._meta = [_python_meta(t, sizes, strides) for t in tensors]

    def matches(self, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` (as many, in the same order) match the reference."""
        if len(tensors) != self._n:
            return False
        if self._guards is not None and _tls() == self._tls:
            return bool(self._guards.check(*tensors))
        sizes, strides = self._sizes, self._strides
        return [_python_meta(t, sizes, strides) for t in tensors] == self._meta


def _tls() -> tuple[Any, Any]:
    """The thread's dispatch keys included and excluded (modes, autocast)."""
    return (
        torch._C._dispatch_tls_local_include_set(),
        torch._C._dispatch_tls_local_exclude_set(),
    )


def _guards(tensors: Sequence[Tensor], sizes: bool, strides: bool) -> Any:
    """Dynamo's check of ``tensors``, or None where it cannot be built."""
    if _TensorGuards is None:
        return None
    try:
        return _TensorGuards(
            *tensors,
            dynamic_dims_sizes=[
                list(t.shape) if sizes else [None] * t.ndim for t in tensors
            ],
            dynamic_dims_strides=[
                list(t.stride()) if strides else [None] * t.ndim for t in tensors
            ],
        )
    except Exception:  # noqa: BLE001 - another signature: the Python checks
        return None


def _guards_work() -> bool:
    """Whether Dynamo's check reports every change :class:`TensorsLike` promises."""
    if _TensorGuards is None:
        return False
    try:
        base = torch.zeros(4, 6)
        ref = [base, torch.zeros(3)]
        full = _guards(ref, True, True)
        loose = _guards(ref, False, False)
        if full is None or loose is None:
            return False
        z = torch.complex(torch.zeros(4, 6), torch.zeros(4, 6))
        changed = [
            [base.t().contiguous().t(), ref[1]],  # strides
            [base[:2], ref[1]],  # sizes
            [base.double(), ref[1]],  # dtype
            [z.conj().imag, ref[1]],  # negative bit
            [base.requires_grad_(False).clone().requires_grad_(True), ref[1]],
            [base.to_sparse(), ref[1]],  # layout
            [torch.nn.Parameter(base.clone()), ref[1]],  # type
            [base.reshape(24), ref[1]],  # ndim
        ]
        same = [torch.zeros(4, 6), torch.ones(3)]  # other tensors, same metadata
        return (
            bool(full.check(*ref))
            and bool(full.check(*same))
            and bool(loose.check(base.t().contiguous().t(), ref[1]))
            and not any(full.check(*c) for c in changed)
            and not any(loose.check(*c) for c in changed[2:])
        )
    except Exception:  # noqa: BLE001 - any surprise: the Python checks
        return False


_USE_GUARDS = _guards_work()


def overlapping(tensors: Sequence[Tensor]) -> set[int]:
    """The indices of ``tensors`` whose memory overlaps another's: the bytes from a
    tensor's first element to its last, by its sizes and strides (so interleaved
    views count as overlapping). Tensors without elements or storage (meta) never do.
    """
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + _extent(t) * t.element_size(), k)
        for k, t in enumerate(tensors)
        if t.numel() and t.device.type != "meta"
    )
    out: set[int] = set()
    furthest = -1  # the largest end of the spans before
    for j, (start, end, k) in enumerate(spans):
        if start < furthest:
            out.add(k)
        if j + 1 < len(spans) and spans[j + 1][0] < end:
            out.add(k)
        furthest = max(furthest, end)
    return out


def _extent(t: Tensor) -> int:
    """Elements from ``t``'s first to its last (its storage span)."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
