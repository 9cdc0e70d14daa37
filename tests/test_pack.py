"""Compiled-engine layouts (``_pack``): packs and chunks give the eager numbers, with a
bounded number of graphs and layout rebuilds whatever the parameter count."""

from __future__ import annotations

import io

import pytest
import torch
from expecttest import assert_expected_inline
from torch._dynamo.testing import CompileCounter

import umup_compile as uc
from tests.helpers import clone_params, run_steps, set_grads, toy_params, use_backend
from umup_compile import _layout, _pack
from umup_compile.optim import SGD, Adam, AdamW

CASES = [
    ("adam_l2_amsgrad", Adam, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("adamw_maximize", AdamW, {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    ("sgd_nesterov", SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
]


@pytest.fixture(params=["packed", "unrolled", "sized", "dynamic"])
def threshold(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """All toy parameters packed; or the four matrices in one unrolled unit, or
    chunked (static graphs per size; or dynamic-shape graphs), the rest packed."""
    if request.param != "packed":
        monkeypatch.setattr(_layout, "PACK_MAX_NUMEL", 100)
    if request.param in ("sized", "dynamic"):
        monkeypatch.setattr(_layout, "UNROLL_MAX", 0)
    if request.param == "dynamic":
        monkeypatch.setattr(_layout, "MAX_STATIC_SIZES", 0)
    return str(request.param)


def unit_class(kind: _layout.UnitKind) -> str:
    return kind.cls.value


def assert_same(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    """Bitwise equal parameters and state: same ops, only laid out differently."""
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    for i, (x, y) in enumerate(zip(pa, pb)):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"param {i}")
        sx, sy = a.state.get(x, {}), b.state.get(y, {})
        assert set(sx) == set(sy), i
        for key in sx:
            torch.testing.assert_close(sx[key], sy[key], rtol=0, atol=0, msg=key)


def test_chunk_sizes() -> None:
    sizes = {n: _layout.chunk_sizes(n) for n in (0, 1, 3, 7, 8, 9, 15, 20, 34)}
    assert_expected_inline(
        str(sizes),
        """{0: [], 1: [1], 3: [2, 1], 7: [4, 2, 1], 8: [8], 9: [8, 1], 15: [8, 4, 2, 1], 20: [8, 8, 4], 34: [8, 8, 8, 8, 2]}""",
    )


@pytest.mark.parametrize(
    "cls,kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_layout_matches_eager(cls, kwargs, threshold: str) -> None:  # noqa: ANN001
    params = toy_params()
    ref_params = clone_params(params)
    opt = cls(params, **kwargs)
    use_backend(opt, "aot_eager")
    ref = cls(ref_params, compile=False, **kwargs)
    for s in range(4):
        run_steps([opt, ref], [params, ref_params], 1)
        if s == 1:  # a parameter without a gradient is skipped, as in torch
            set_grads([params, ref_params], seed=10)
            params[1].grad = ref_params[1].grad = None
            opt.step()
            ref.step()
        assert_same(opt, ref)
    layout = next(iter(opt._runner.layouts.cached.values())).layout
    classes = {unit_class(u.kind) for u in layout.units}
    assert classes == (set() if threshold == "packed" else {threshold})
    # state_dict keeps torch's per-parameter layout: views shaped like the params
    for i, p in enumerate(params):
        for key, value in opt.state_dict()["state"][i].items():
            if key != "step":
                assert value.shape == p.shape, (i, key)
    # Note [stacked counters]: each unit's steps are 0-d views of its one vector
    steps = [opt.state[p]["step"] for p in params if "step" in opt.state[p]]
    assert all(t.ndim == 0 for t in steps)
    for unit in layout.units + ([layout.pack.unit] if layout.pack else []):
        if "step" in unit.stacked:
            (vector,) = unit.state_lists[-1]  # Adam's keys end with "step"
            ptr = vector.untyped_storage().data_ptr()
            on = [t for t in steps if t.untyped_storage().data_ptr() == ptr]
            assert len(on) == len(unit.members) == vector.numel()
    assert sum("step" in u.stacked for u in layout.units) == (
        len(layout.units) if steps else 0
    )
    # ... which a checkpoint saves and loads as torch's (0-d, the same values)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(loaded["state"][i][key], value, rtol=0, atol=0)


def test_rebuilds_and_graphs_are_bounded(threshold: str) -> None:
    params = toy_params()
    ref_params = clone_params(params)
    opt = Adam(params, lr=0.01, weight_decay=0.1)
    ref = Adam(ref_params, lr=0.01, weight_decay=0.1, compile=False)
    counter = CompileCounter()
    use_backend(opt, counter)
    run_steps([opt, ref], [params, ref_params], 3)
    assert opt.layout_builds == 1
    for s in range(6):  # alternate which parameter lacks a gradient
        set_grads([params, ref_params], seed=20 + s)
        params[s % 2].grad = ref_params[s % 2].grad = None
        opt.step()
        ref.step()
    assert opt.layout_builds == 1 + 6
    params[2].requires_grad_(False)
    ref_params[2].requires_grad_(False)
    for s in range(3):
        set_grads([params, ref_params], seed=30 + s)
        params[2].grad = ref_params[2].grad = None
        opt.step()
        ref.step()
    assert opt.layout_builds == 1 + 6 + 1
    assert_same(opt, ref)
    # one graph per kind (pack, chunk sizes): sizes and membership never recompile;
    # one unrolled unit at most (the first membership), other memberships chunked
    kinds = {k for _, _, k in opt._engine._cache}  # the compiled kinds' names
    assert counter.frame_count == len(kinds), (counter.frame_count, kinds)
    unrolled = [k for k in kinds if k.startswith("static:")]
    assert len(unrolled) == (threshold == "unrolled"), kinds


def _saved_bytes(opt: torch.optim.Optimizer) -> int:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer.tell()


def test_parameters_left_out_of_a_layout_own_their_state(threshold: str) -> None:
    # Note [released buffers]: a mixture of experts' unrouted parameters kept views
    # of the pack (and step vectors) of their last step, and so those buffers alive.
    params = toy_params()
    ref_params = clone_params(params)
    opt = AdamW(params, lr=0.01, weight_decay=0.1)
    use_backend(opt, "aot_eager")
    ref = AdamW(ref_params, lr=0.01, weight_decay=0.1, compile=False)
    run_steps([opt, ref], [params, ref_params], 2)
    saved = _saved_bytes(opt)
    for s in range(8):
        set_grads([params, ref_params], seed=40 + s)
        left_out = {s % len(params), (3 * s + 1) % len(params)}
        for k in left_out:
            params[k].grad = ref_params[k].grad = None
        opt.step()
        ref.step()
        for k in left_out:
            for key, t in opt.state[params[k]].items():
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (
                    s,
                    k,
                    key,
                )
    assert_same(opt, ref)
    assert _saved_bytes(opt) <= 1.1 * saved


def test_static_graph_is_not_recompiled_after_a_dynamic_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dynamic call (the pack) marked the hyper-parameter table it shares with the
    # unrolled unit's static graph, which then recompiled at its next Dynamo call.
    monkeypatch.setattr(_layout, "PACK_MAX_NUMEL", 100)  # an unrolled unit + a pack
    params = toy_params()
    opt = Adam(params, lr=0.01)
    counter = CompileCounter()
    use_backend(opt, counter)
    for s, left_out in enumerate([None, 0, None, 0, None]):
        set_grads([params], seed=s)
        if left_out is not None:  # another membership: chunks and the pack
            params[left_out].grad = None
        opt.step()
    kinds = {k for _, _, k in opt._engine._cache}
    assert any(k.startswith("static:") for k in kinds), kinds
    assert counter.frame_count == len(kinds), (counter.frame_count, kinds)


def test_add_param_group_rebuilds_once() -> None:
    params = toy_params()
    ref_params = clone_params(params)
    opt = Adam(params[:3], lr=0.01)
    ref = Adam(ref_params[:3], lr=0.01, compile=False)
    counter = CompileCounter()
    use_backend(opt, counter)
    run_steps([opt, ref], [params, ref_params], 2)
    opt.add_param_group({"params": params[3:], "lr": 0.02})
    ref.add_param_group({"params": ref_params[3:], "lr": 0.02})
    run_steps([opt, ref], [params, ref_params], 3)
    assert_same(opt, ref)
    assert opt.layout_builds == 2
    assert counter.frame_count <= 2  # the hyper-parameter rows grow once


def test_replaced_state_tensor_is_used(threshold: str) -> None:
    params = toy_params()
    ref_params = clone_params(params)
    opt = Adam(params, lr=0.01)
    use_backend(opt, "aot_eager")
    ref = Adam(ref_params, lr=0.01, compile=False)
    run_steps([opt, ref], [params, ref_params], 2)
    for o, ps in ((opt, params), (ref, ref_params)):
        for p in ps[::2]:
            o.state[p]["exp_avg"] = torch.full_like(p, 0.5)
    run_steps([opt, ref], [params, ref_params], 2)
    assert_same(opt, ref)


def test_checkpoint_roundtrip_resumes_bitwise(threshold: str) -> None:
    params = toy_params()
    twin = clone_params(params)
    opt = Adam(params, lr=0.01, weight_decay=0.1)
    use_backend(opt, "aot_eager")
    run_steps([opt], [params], 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    with torch.no_grad():
        for p, q in zip(twin, params):
            p.copy_(q)
    resumed = Adam(twin, lr=0.01, weight_decay=0.1)
    use_backend(resumed, "aot_eager")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    run_steps([opt, resumed], [params, twin], 3)
    assert_same(opt, resumed)


@pytest.mark.parametrize("unroll_max", [48, 16])
def test_many_tensors_one_pack_graph(
    unroll_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 small tensors and 20 large ones: two graphs (pack, one unrolled unit); or,
    with more large tensors than ``UNROLL_MAX``, three (pack, static8, static4)."""
    monkeypatch.setattr(_layout, "UNROLL_MAX", unroll_max)
    params = [uc.Parameter(torch.randn(4, 4), "weight") for _ in range(600)]
    params += [uc.Parameter(torch.randn(130, 128), "weight") for _ in range(20)]
    opt = Adam(params, lr=0.01)
    counter = CompileCounter()
    use_backend(opt, counter)
    run_steps([opt], [params], 2)
    layout = next(iter(opt._runner.layouts.cached.values())).layout
    assert layout.pack is not None and len(layout.pack.unit.members) == 600
    chunks = [(len(u.members), u.kind.name) for u in layout.units]
    if unroll_max == 48:
        assert chunks == [(20, "static:20*130x128")]
    else:
        assert chunks == [
            (8, "static8x16640"),
            (8, "static8x16640"),
            (4, "static4x16640"),
        ]
    assert counter.frame_count == 1 + len({kind for _, kind in chunks})


@pytest.mark.parametrize(
    "n_small,total_max,packed",
    [(3, 64, False), (4, 64, True), (3, 4, True)],
    ids=["joined", "too_many_small", "unit_too_large"],
)
def test_few_small_params_join_the_unrolled_unit(
    n_small: int, total_max: int, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Note [small into the unrolled unit]: a few small tensors join the unrolled
    unit (one graph, no pack); past FOLD_SMALL_MAX, or past UNROLL_WITH_SMALL_MAX
    members in all, they keep a pack. The numbers are eager's, bitwise."""
    monkeypatch.setattr(_layout, "FOLD_SMALL_MAX", 3)
    monkeypatch.setattr(_layout, "UNROLL_WITH_SMALL_MAX", total_max)
    params = [uc.Parameter(torch.randn(130, 128), "weight") for _ in range(2)]
    params += [uc.Parameter(torch.randn(16), "norm") for _ in range(n_small)]
    ref_params = clone_params(params)
    opt = Adam(params, lr=0.01, weight_decay=0.1)
    counter = CompileCounter()
    use_backend(opt, counter)
    ref = Adam(ref_params, lr=0.01, weight_decay=0.1, compile=False)
    run_steps([opt, ref], [params, ref_params], 3)
    assert_same(opt, ref)
    layout = next(iter(opt._runner.layouts.cached.values())).layout
    assert (layout.pack is not None) == packed
    (unit,) = layout.units
    assert unit_class(unit.kind) == "unrolled"
    assert len(unit.members) == 2 + (0 if packed else n_small)
    assert counter.frame_count == (2 if packed else 1)


def test_pack_rows() -> None:
    """Each packed parameter starts a row of ``PACK_ROW``; the padding stays zero."""
    params = [uc.Parameter(torch.randn(n), "bias") for n in (16, 130, 256)]
    opt = Adam(params, lr=0.01)
    use_backend(opt, "aot_eager")
    run_steps([opt], [params], 3)
    pack = next(iter(opt._runner.layouts.cached.values())).layout.pack
    assert pack is not None
    assert_expected_inline(
        str((pack.segment_t.tolist(), pack.local_index_t.tolist())),
        """([0, 1, 1, 2, 2], [0, 0, 128, 0, 128])""",
    )
    flat = pack.unit.state_lists[0][0]  # exp_avg
    assert flat.shape == (5, _pack.PACK_ROW)
    for buffer in (flat, pack.flat_param, pack.flat_grad):
        rows = buffer.view(-1)
        assert rows[16:128].eq(0).all() and rows[128 + 130 : 384].eq(0).all()
    for p in params:  # state entries are views of the rows
        assert opt.state[p]["exp_avg"].untyped_storage().data_ptr() == (
            flat.untyped_storage().data_ptr()
        )


def test_unit_policy() -> None:
    """Large parameters: one unrolled unit sorted by size, named by its sizes; a second
    membership, or more than ``UNROLL_MAX`` parameters, goes to per-size chunks."""
    params = [torch.empty(n) for n in (3 * 2**16, 2**16, 2**18, 2**18, 3 * 2**16)]
    unrolled = _layout.UnrolledKinds()

    def plan(members: list[int]) -> str:
        units = _layout.plan_units(members, params, unrolled)
        return str([(m, kind.name) for m, kind in units])

    assert_expected_inline(
        plan([0, 1, 2, 3, 4]),
        """[([1, 0, 4, 2, 3], 'static:1*65536+2*196608+2*262144')]""",
    )
    assert_expected_inline(
        plan([0, 1, 2, 3, 4]),
        """[([1, 0, 4, 2, 3], 'static:1*65536+2*196608+2*262144')]""",
    )
    assert_expected_inline(
        plan([0, 2, 3, 4]),
        """[([0, 4], 'static2x196608'), ([2, 3], 'static2x262144')]""",
    )
    assert len(unrolled.names) == _layout.MAX_UNROLLED_KINDS == 1
    params += [torch.empty(2**16)] * _layout.UNROLL_MAX
    assert_expected_inline(
        str(
            [
                kind.name
                for _, kind in _layout.plan_units(
                    list(range(len(params))), params, _layout.UnrolledKinds()
                )
            ]
        ),
        """['static2x196608', 'static8x65536', 'static8x65536', 'static8x65536', 'static8x65536', 'static8x65536', 'static8x65536', 'static1x65536', 'static2x262144']""",
    )
