"""Tests of ``umup_compile.parameter``: tags, duck typing, tags surviving copies."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import unit_scaling as uu
import unit_scaling.parameter as uu_parameter
from torch import Tensor, nn

import umup_compile as uc
import umup_compile.optim as uo
from tests.helpers import ToyUmupNet, run_steps

# (id, mup_type, mup_scaling_depth)
TAG_CASES: list[tuple[str, str, int | None]] = [
    ("weight", "weight", None),
    ("weight_depth_4", "weight", 4),
    ("bias_depth_1", "bias", 1),
    ("norm", "norm", None),
    ("output", "output", None),
]

# (id, kwargs for uc.Parameter besides data, message regex)
INVALID_TAG_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown_mup_type",
        {"mup_type": "embedding"},
        r"shape \(3, 2\).*mup_type='embedding' is not a u-μP type; "
        r"use one of 'weight', 'bias', 'norm', 'output'",
    ),
    ("mup_type_none", {"mup_type": None}, r"mup_type=None is not a u-μP type; use"),
    (
        "depth_zero",
        {"mup_type": "weight", "mup_scaling_depth": 0},
        r"shape \(3, 2\).*mup_scaling_depth=0 must be None or a positive int",
    ),
    (
        "depth_negative",
        {"mup_type": "bias", "mup_scaling_depth": -2},
        r"mup_scaling_depth=-2 must be None or a positive int",
    ),
    (
        "depth_float",
        {"mup_type": "weight", "mup_scaling_depth": 2.0},
        r"mup_scaling_depth=2.0 must be None or a positive int",
    ),
    (
        "depth_bool",
        {"mup_type": "weight", "mup_scaling_depth": True},
        r"mup_scaling_depth=True must be None or a positive int",
    ),
    (
        "depth_str",
        {"mup_type": "weight", "mup_scaling_depth": "4"},
        r"mup_scaling_depth='4' must be None or a positive int",
    ),
]


def _duck(tensor: Tensor, **attrs: Any) -> Tensor:
    for key, value in attrs.items():
        setattr(tensor, key, value)
    return tensor


# (id, builder, expected has_parameter_data). unit_scaling must agree on every row.
HAS_PARAMETER_DATA_CASES: list[tuple[str, Callable[[], Tensor], bool]] = [
    ("plain_tensor", lambda: torch.zeros(2), False),
    ("plain_parameter", lambda: nn.Parameter(torch.zeros(2)), False),
    ("umup_parameter", lambda: uc.Parameter(torch.zeros(2), "bias", 2), True),
    ("unit_scaling_parameter", lambda: uu.Parameter(torch.zeros(2), "norm"), True),
    (
        "duck_typed_parameter",
        lambda: _duck(
            nn.Parameter(torch.zeros(2, 2)), mup_type="weight", mup_scaling_depth=None
        ),
        True,
    ),
    (
        "duck_typed_tensor",
        lambda: _duck(torch.zeros(2), mup_type="output", mup_scaling_depth=3),
        True,
    ),
    (
        # bool is an int: duck typing accepts it, like unit_scaling (Parameter() rejects it).
        "duck_typed_depth_bool",
        lambda: _duck(
            nn.Parameter(torch.zeros(2)), mup_type="bias", mup_scaling_depth=True
        ),
        True,
    ),
    (
        "missing_depth",
        lambda: _duck(nn.Parameter(torch.zeros(2)), mup_type="weight"),
        False,
    ),
    (
        "missing_mup_type",
        lambda: _duck(nn.Parameter(torch.zeros(2)), mup_scaling_depth=None),
        False,
    ),
    (
        "unknown_mup_type",
        lambda: _duck(
            nn.Parameter(torch.zeros(2)), mup_type="embed", mup_scaling_depth=None
        ),
        False,
    ),
    (
        "mup_type_none",
        lambda: _duck(
            nn.Parameter(torch.zeros(2)), mup_type=None, mup_scaling_depth=None
        ),
        False,
    ),
    (
        "depth_float",
        lambda: _duck(
            nn.Parameter(torch.zeros(2)), mup_type="weight", mup_scaling_depth=2.0
        ),
        False,
    ),
    (
        "depth_str",
        lambda: _duck(
            nn.Parameter(torch.zeros(2)), mup_type="weight", mup_scaling_depth="2"
        ),
        False,
    ),
]


def _torch_save_load(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# (id, copy function)
COPY_FUNCS: list[tuple[str, Callable[[Any], Any]]] = [
    ("deepcopy", copy.deepcopy),
    ("pickle", lambda obj: pickle.loads(pickle.dumps(obj))),
    ("torch_save", _torch_save_load),
]
COPY_IDS = [name for name, _ in COPY_FUNCS]
COPY_FNS = [fn for _, fn in COPY_FUNCS]


def _assert_tagged(p: Any, mup_type: str, depth: int | None) -> None:
    assert type(p) is nn.Parameter
    assert p.mup_type == mup_type
    assert p.mup_scaling_depth == depth
    assert uc.has_parameter_data(p)


@pytest.mark.parametrize(
    ("mup_type", "depth"),
    [case[1:] for case in TAG_CASES],
    ids=[case[0] for case in TAG_CASES],
)
def test_parameter_sets_tags(mup_type: str, depth: int | None) -> None:
    data = torch.randn(3, 2)
    p = uc.Parameter(data, mup_type, depth)  # type: ignore[arg-type]
    _assert_tagged(p, mup_type, depth)
    assert p.requires_grad
    assert p.data_ptr() == data.data_ptr()  # like nn.Parameter: no copy


def test_parameter_depth_defaults_to_none() -> None:
    p = uc.Parameter(torch.zeros(4), "bias")
    _assert_tagged(p, "bias", None)


def test_parameter_honours_requires_grad_false() -> None:
    p = uc.Parameter(torch.zeros(4), "norm", requires_grad=False)
    _assert_tagged(p, "norm", None)
    assert not p.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [case[1:] for case in INVALID_TAG_CASES],
    ids=[case[0] for case in INVALID_TAG_CASES],
)
def test_parameter_rejects_invalid_tags(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        uc.Parameter(torch.zeros(3, 2), **kwargs)


@pytest.mark.parametrize(
    ("build", "expected"),
    [case[1:] for case in HAS_PARAMETER_DATA_CASES],
    ids=[case[0] for case in HAS_PARAMETER_DATA_CASES],
)
def test_has_parameter_data_matches_unit_scaling(
    build: Callable[[], Tensor], expected: bool
) -> None:
    tensor = build()
    assert uc.has_parameter_data(tensor) is expected
    assert uu_parameter.has_parameter_data(tensor) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("copy_fn", COPY_FNS, ids=COPY_IDS)
@pytest.mark.parametrize(
    ("mup_type", "depth"),
    [case[1:] for case in TAG_CASES],
    ids=[case[0] for case in TAG_CASES],
)
def test_parameter_copy_keeps_tags(
    copy_fn: Callable[[Any], Any], mup_type: str, depth: int | None
) -> None:
    p = uc.Parameter(torch.randn(3, 2), mup_type, depth)  # type: ignore[arg-type]
    q = copy_fn(p)
    _assert_tagged(q, mup_type, depth)
    assert q is not p
    assert q.data_ptr() != p.data_ptr()
    assert q.requires_grad
    torch.testing.assert_close(q, p, rtol=0, atol=0)


@pytest.mark.parametrize("copy_fn", COPY_FNS, ids=COPY_IDS)
def test_parameter_copy_keeps_requires_grad_false(
    copy_fn: Callable[[Any], Any],
) -> None:
    q = copy_fn(uc.Parameter(torch.randn(2), "bias", 2, requires_grad=False))
    _assert_tagged(q, "bias", 2)
    assert not q.requires_grad


@pytest.mark.parametrize("copy_fn", COPY_FNS, ids=COPY_IDS)
def test_parameter_copy_keeps_retagged_values_and_extra_attributes(
    copy_fn: Callable[[Any], Any],
) -> None:
    p = uc.Parameter(torch.randn(2, 2), "weight")
    p.mup_scaling_depth = 8  # type: ignore[attr-defined]
    p.note = {"layer": 3}  # type: ignore[attr-defined]
    q = copy_fn(p)
    _assert_tagged(q, "weight", 8)
    assert q.note == {"layer": 3}


@pytest.mark.parametrize("copy_fn", COPY_FNS, ids=COPY_IDS)
def test_parameter_copy_of_copy_keeps_tags(copy_fn: Callable[[Any], Any]) -> None:
    # The copy must carry the copy hooks again, not just the tag values.
    q = copy_fn(copy_fn(uc.Parameter(torch.randn(5), "norm", 3)))
    _assert_tagged(q, "norm", 3)


@pytest.mark.parametrize("copy_fn", COPY_FNS, ids=COPY_IDS)
def test_module_copy_keeps_tags_and_ties(copy_fn: Callable[[Any], Any]) -> None:
    model = ToyUmupNet()
    model.tied_head = model.head  # a tied weight: one parameter, two names
    clone = copy_fn(model)
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(clone.named_parameters(remove_duplicate=False))
    assert list(theirs) == list(ours)
    for name, p in ours.items():
        q = theirs[name]
        assert q is not p, name
        _assert_tagged(q, p.mup_type, p.mup_scaling_depth)  # type: ignore[attr-defined]
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert clone.tied_head is clone.head


@pytest.mark.parametrize(
    "opt_cls", [uo.Adam, uo.AdamW, uo.SGD], ids=["adam", "adamw", "sgd"]
)
def test_optimizer_accepts_unit_scaling_parameters(opt_cls: type) -> None:
    specs = [
        ((8, 4), "weight", 2),
        ((4,), "bias", 2),
        ((4,), "norm", None),
        ((3, 4), "output", None),
    ]
    theirs = [
        uu.Parameter(torch.randn(shape, dtype=torch.float64), t, d)  # type: ignore[arg-type]
        for shape, t, d in specs
    ]
    ours = [
        uc.Parameter(p.detach().clone(), p.mup_type, p.mup_scaling_depth)  # type: ignore[attr-defined]
        for p in theirs
    ]
    opt_theirs = opt_cls(theirs, lr=0.1, weight_decay=0.01, compile=False)
    opt_ours = opt_cls(ours, lr=0.1, weight_decay=0.01, compile=False)
    expected_scales = [uo.lr_scale_func_adam(p) for p in ours]  # type: ignore[arg-type]
    assert opt_theirs.param_groups[0]["lr_scales"] == expected_scales
    assert expected_scales == [2**-0.5 * 4**-0.5, 2**-0.5, 1.0, 1.0]
    initial = [p.detach().clone() for p in theirs]
    run_steps([opt_theirs, opt_ours], [theirs, ours], 2)
    for p, q, p0 in zip(theirs, ours, initial):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize(
    "edit",
    [("mup_scaling_depth", 4.0), ("mup_type", None)],
    ids=["float_depth", "no_type"],
)
def test_tags_edited_after_creation_survive_copies_and_checkpoints(edit) -> None:  # noqa: ANN001
    # Copies rebuilt the parameter through Parameter(), whose tag check refused what
    # the user had set since: torch.save worked and torch.load of its file raised
    # (unit_scaling's load and copy them as they are).
    p = uc.Parameter(torch.randn(3, 4), "weight", 2)
    setattr(p, *edit)
    buffer = io.BytesIO()
    torch.save({"p": p}, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False)["p"], copy.deepcopy(p),
              pickle.loads(pickle.dumps(p))]  # fmt: skip
    for q in copies:
        assert getattr(q, edit[0]) == edit[1] and torch.equal(q, p)
