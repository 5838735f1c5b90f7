"""Tests of fastconv.optim: SGD and Adam with PyTorch's update rules.

The expected values come from the formulas of the torch.optim documentation, written below as
plain whole-array numpy (``ref_sgd``, ``ref_adam``), independently of how optim.py orders its
in-place operations, plus a few cases computed by hand.  The last section runs the same
gradient sequences through torch.optim (``foreach=False``) when torch is installed.
"""
import doctest
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

import fastconv.optim
from fastconv.optim import SGD, Adam, Optimizer

TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-6)}
SHAPES = [(3, 4), (5,), (), (2, 1, 3)]


def P(data, grad=None):
    """A stand-in for fastconv.nn.Parameter: just .data and .grad."""
    return SimpleNamespace(data=data, grad=grad)


def make(dtype, seed=0, n_steps=6, shapes=SHAPES):
    """Initial arrays and a fixed sequence of gradients (one list of arrays per step)."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(n_steps)]
    return init, grads


def run(opt_cls, init, grads, **kw):
    params = [P(a.copy()) for a in init]
    opt = opt_cls(params, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.copy()
        opt.step()
    return params, opt


# -------------------------------------------------------------------- references (formulas)

def ref_sgd(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
            maximize=False):
    p, b = p.copy(), None
    for t, g in enumerate(grads, start=1):
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            b = g.copy() if t == 1 else momentum * b + (1 - dampening) * g
            g = g + momentum * b if nesterov else b
        p = p - lr * g
    return p, b


def ref_adam(p, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
             maximize=False):
    b1, b2 = betas
    p = p.copy()
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        if amsgrad:
            vmax = np.maximum(vmax, v)
            v_hat = vmax / (1 - b2 ** t)
        else:
            v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v, vmax


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.8, nesterov=True),
    dict(lr=0.1, weight_decay=0.01),
    dict(lr=0.1, maximize=True),
    dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.05, maximize=True),
    dict(lr=0.05, momentum=0.7, weight_decay=0.02, nesterov=True, maximize=True),
]
ADAM_CONFIGS = [
    dict(),
    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=0.01, betas=(0.3, 0.9)),     # 1 - beta1 >= 0.5: torch.lerp's other formula
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.01, amsgrad=True),
    dict(lr=0.01, maximize=True),
    dict(lr=0.02, weight_decay=0.05, amsgrad=True, maximize=True),
    dict(lr=0.01, betas=(0.0, 0.0)),
]


# -------------------------------------------------------------------- hand-computed cases

def test_sgd_by_hand():
    # p = 1, g = 0.5, 0.25, 1 ; lr = 0.1
    p = P(np.array([1.0]))
    opt = SGD([p], lr=0.1)
    for g in (0.5, 0.25, 1.0):
        p.grad = np.array([g])
        opt.step()
    assert p.data[0] == pytest.approx(1 - 0.1 * (0.5 + 0.25 + 1.0), abs=1e-15)
    assert len(opt.state) == 0          # no momentum: no state, as PyTorch


def test_sgd_momentum_dampening_by_hand():
    # momentum 0.5, dampening 0.5, lr 1, grads 2, 4, 8:
    # b1 = 2 (no dampening on the first step)  p = 10 - 2 = 8
    # b2 = 0.5*2 + 0.5*4 = 3                   p = 8 - 3 = 5
    # b3 = 0.5*3 + 0.5*8 = 5.5                 p = 5 - 5.5 = -0.5
    p = P(np.array([10.0]))
    opt = SGD([p], lr=1.0, momentum=0.5, dampening=0.5)
    for g, want_b, want_p in ((2, 2, 8), (4, 3, 5), (8, 5.5, -0.5)):
        p.grad = np.array([float(g)])
        opt.step()
        assert opt.state[p]["momentum_buffer"][0] == want_b
        assert p.data[0] == want_p


def test_sgd_nesterov_weight_decay_by_hand():
    # momentum 0.5, nesterov, weight_decay 0.5, lr 0.5, p = 2, grads 1, 1:
    # step 1: g = 1 + 0.5*2 = 2, b = 2, g' = 2 + 0.5*2 = 3, p = 2 - 1.5 = 0.5
    # step 2: g = 1 + 0.25 = 1.25, b = 1 + 1.25 = 2.25, g' = 1.25 + 1.125 = 2.375,
    #         p = 0.5 - 1.1875 = -0.6875
    p = P(np.array([2.0]))
    opt = SGD([p], lr=0.5, momentum=0.5, nesterov=True, weight_decay=0.5)
    p.grad = np.array([1.0])
    opt.step()
    assert p.data[0] == 0.5
    opt.step()
    assert p.data[0] == -0.6875
    assert opt.state[p]["momentum_buffer"][0] == 2.25


def test_adam_by_hand():
    # step 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2: p -= lr * g / (|g| + eps)
    p = P(np.array([1.0, -1.0]))
    opt = Adam([p], lr=0.1, eps=1e-8)
    p.grad = np.array([3.0, -0.5])
    opt.step()
    np.testing.assert_allclose(p.data, [1 - 0.1 * 3 / (3 + 1e-8), -1 + 0.1 * 0.5 / (0.5 + 1e-8)],
                               rtol=1e-14)
    st = opt.state[p]
    assert st["step"] == 1
    np.testing.assert_allclose(st["exp_avg"], [0.3, -0.05], rtol=1e-14)
    np.testing.assert_allclose(st["exp_avg_sq"], [0.009, 0.00025], rtol=1e-14)
    # step 2, same gradient: m_hat = g, v_hat = g^2 again
    before = p.data.copy()
    opt.step()
    np.testing.assert_allclose(p.data, before - 0.1 * np.sign([3.0, -0.5]), rtol=1e-7)
    assert st["step"] == 2


def test_adam_amsgrad_by_hand():
    # betas (0.5, 0.5), eps 0, lr 1: grads 4 then 0
    # t1: m = 2, v = 8, vmax = 8, m_hat = 4, v_hat = 16 -> p = 10 - 4/4 = 9
    # t2: m = 1, v = 4, vmax = 8, m_hat = 4/3, v_hat = 8/0.75 -> p = 9 - (4/3)/sqrt(32/3)
    p = P(np.array([10.0]))
    opt = Adam([p], lr=1.0, betas=(0.5, 0.5), eps=0.0, amsgrad=True)
    p.grad = np.array([4.0])
    opt.step()
    assert p.data[0] == pytest.approx(9.0, abs=1e-14)
    p.grad = np.array([0.0])
    opt.step()
    assert p.data[0] == pytest.approx(9 - (4 / 3) / np.sqrt(32 / 3), abs=1e-14)
    assert opt.state[p]["max_exp_avg_sq"][0] == 8.0
    assert opt.state[p]["exp_avg_sq"][0] == 4.0


# -------------------------------------------------------------------- against the formulas

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=str)
def test_sgd_matches_formulas(cfg, dtype):
    init, grads = make(dtype)
    params, opt = run(SGD, init, grads, **cfg)
    for k, p in enumerate(params):
        want, buf = ref_sgd(init[k], [g[k] for g in grads], **cfg)
        assert p.data.dtype == dtype and p.data.shape == init[k].shape
        np.testing.assert_allclose(p.data, want, **TOL[dtype])
        if cfg.get("momentum", 0):
            got = opt.state[p]["momentum_buffer"]
            assert got.dtype == dtype
            np.testing.assert_allclose(got, buf, **TOL[dtype])
        else:
            assert "momentum_buffer" not in opt.state[p]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=str)
def test_adam_matches_formulas(cfg, dtype):
    init, grads = make(dtype)
    params, opt = run(Adam, init, grads, **cfg)
    for k, p in enumerate(params):
        want, m, v, vmax = ref_adam(init[k], [g[k] for g in grads], **cfg)
        assert p.data.dtype == dtype and p.data.shape == init[k].shape
        np.testing.assert_allclose(p.data, want, **TOL[dtype])
        st = opt.state[p]
        assert st["step"] == len(grads)
        for key, ref in (("exp_avg", m), ("exp_avg_sq", v)):
            assert st[key].dtype == dtype
            np.testing.assert_allclose(st[key], ref, **TOL[dtype])
        if cfg.get("amsgrad"):
            np.testing.assert_allclose(st["max_exp_avg_sq"], vmax, **TOL[dtype])
        else:
            assert "max_exp_avg_sq" not in st


def test_float32_arithmetic_stays_float32():
    # float64 hyperparameters (numpy scalars included) must not promote the update
    p = P(np.ones(4, np.float32), np.full(4, 0.1, np.float64))
    for opt in (SGD([p], lr=np.float64(0.1), momentum=np.float64(0.9), weight_decay=0.01),
                Adam([p], lr=np.float64(0.1), weight_decay=np.float64(0.01), amsgrad=True)):
        for _ in range(2):
            opt.step()
        assert p.data.dtype == np.float32
        assert all(v.dtype == np.float32 for v in opt.state[p].values()
                   if isinstance(v, np.ndarray))
    # float32 arithmetic, not float64 rounded at the end
    p = P(np.array([1.0], np.float32), np.array([1.0], np.float32))
    SGD([p], lr=1e-8).step()
    assert p.data[0] == np.float32(1) - np.float32(1e-8) * np.float32(1)


# -------------------------------------------------------------------- semantics

@pytest.mark.parametrize("make_opt", [
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True),
    lambda ps: Adam(ps, lr=0.1, weight_decay=0.1, maximize=True, amsgrad=True),
])
def test_updates_in_place_and_leaves_grad_alone(make_opt):
    base = np.arange(6.0).reshape(2, 3)
    view = base[:, 1]                            # a layer seeing part of the same memory
    p = P(base, np.ones((2, 3)))
    grad_before = p.grad.copy()
    opt = make_opt([p])
    opt.step()
    opt.step()
    assert p.data is base
    assert not np.array_equal(base, np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(view, base[:, 1])
    np.testing.assert_array_equal(p.grad, grad_before)


def test_non_contiguous_data():
    full = np.arange(12.0).reshape(3, 4)
    p = P(full.T, np.ones((4, 3)))                # a Fortran-ordered view
    opt = Adam([p], lr=0.5)
    opt.step()
    np.testing.assert_allclose(full, np.arange(12.0).reshape(3, 4) - 0.5, rtol=1e-7)


@pytest.mark.parametrize("opt_cls,kw", [(SGD, dict(lr=0.1, momentum=0.9)),
                                        (Adam, dict(lr=0.1))])
def test_grad_none_is_skipped(opt_cls, kw):
    a, b = P(np.ones(3), np.ones(3)), P(np.ones(2), None)
    opt = opt_cls([a, b], **kw)
    opt.step()
    np.testing.assert_array_equal(b.data, np.ones(2))
    assert len(opt.state[b]) == 0 and b not in opt.state
    assert a in opt.state and not any(x is b for x in opt.state)
    # b gets a gradient later: its state starts then (Adam's step count is its own)
    b.grad = np.ones(2)
    opt.step()
    if opt_cls is Adam:
        assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1
        np.testing.assert_allclose(b.data, 1 - 0.1, rtol=1e-7)
    else:
        np.testing.assert_allclose(b.data, 1 - 0.1, rtol=1e-15)
    state_keys = opt.state_dict()["state"].keys()
    assert sorted(state_keys) == [0, 1]


def test_param_groups():
    a, b, c = (P(np.ones(2), np.ones(2)) for _ in range(3))
    opt = SGD([{"params": [a, b]}, {"params": [c], "lr": 0.5, "momentum": 0.5}],
              lr=0.1, momentum=0.0)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[0]["momentum"] == 0.0 and opt.param_groups[1]["momentum"] == 0.5
    assert opt.param_groups[1]["dampening"] == 0.0        # filled from the defaults
    opt.step()
    np.testing.assert_allclose(a.data, 0.9)
    np.testing.assert_allclose(b.data, 0.9)
    np.testing.assert_allclose(c.data, 0.5)
    # a schedule changes a group's lr between steps
    opt.param_groups[0]["lr"] = 0.2
    opt.step()
    np.testing.assert_allclose(a.data, 0.7)
    np.testing.assert_allclose(c.data, 0.5 - 0.5 * 1.5)   # b = 0.5*1 + 1
    # groups given a single parameter, or a tuple, or added later
    d = P(np.ones(1), np.ones(1))
    opt.add_param_group({"params": d, "lr": 1.0})
    opt.step()
    np.testing.assert_allclose(d.data, 0.0)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1, 1]


def test_adam_param_groups_and_extra_keys():
    a, b = P(np.ones(2), np.ones(2)), P(np.ones(2), np.ones(2))
    opt = Adam([{"params": [a], "name": "w"}, {"params": [b], "lr": 0.5, "betas": [0.5, 0.9]}],
               lr=0.1)
    assert opt.param_groups[0]["name"] == "w"
    assert opt.param_groups[1]["betas"] == (0.5, 0.9)
    opt.step()
    np.testing.assert_allclose(a.data, 0.9, rtol=1e-7)
    np.testing.assert_allclose(b.data, 0.5, rtol=1e-7)
    assert opt.state_dict()["param_groups"][0]["name"] == "w"


def test_zero_grad():
    g = np.ones(3)
    a, b = P(np.zeros(3), g), P(np.zeros(2), None)
    opt = SGD([a, b], lr=0.1)
    opt.zero_grad(set_to_none=False)
    assert a.grad is g and not g.any()          # zeroed in place
    assert b.grad is None                       # None stays None
    ro = np.ones(3)
    ro.flags.writeable = False
    a.grad = ro
    opt.zero_grad(set_to_none=False)
    assert a.grad is not ro and a.grad.shape == (3,) and not a.grad.any() and ro.all()
    opt.zero_grad()                             # PyTorch 2.x default: set_to_none=True
    assert a.grad is None and b.grad is None
    opt.step()                                  # nothing to do
    np.testing.assert_array_equal(a.data, 0)


def test_closure_and_repr():
    p = P(np.ones(2), np.ones(2))
    opt = SGD([p], lr=0.1)
    assert opt.step(lambda: 42.0) == 42.0
    assert opt.step() is None
    text = repr(opt)
    assert text.startswith("SGD (") and "Parameter Group 0" in text and "lr: 0.1" in text


def test_grad_dtype_and_type_converted():
    p = P(np.ones(3, np.float32), [1.0, 2.0, 3.0])       # a list, float64 values
    SGD([p], lr=0.5).step()
    assert p.data.dtype == np.float32
    np.testing.assert_array_equal(p.data, np.float32([0.5, 0.0, -0.5]))


# -------------------------------------------------------------------- state dicts

@pytest.mark.parametrize("opt_cls,kw", [
    (SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (SGD, dict(lr=0.05)),
    (Adam, dict(lr=0.01, weight_decay=0.01)),
    (Adam, dict(lr=0.01, amsgrad=True, maximize=True)),
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_dict_round_trip(opt_cls, kw, dtype):
    init, grads = make(dtype, seed=3, n_steps=6)

    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:], "lr": kw["lr"] * 2}]

    whole = [P(a.copy()) for a in init]
    opt_a = opt_cls(groups(whole), **kw)
    first = [P(a.copy()) for a in init]
    opt_b = opt_cls(groups(first), **kw)
    for t, step_grads in enumerate(grads):
        for p, g in zip(whole, step_grads):
            p.grad = g.copy()
        opt_a.step()
        if t < 3:
            for p, g in zip(first, step_grads):
                p.grad = g.copy()
            opt_b.step()
    sd = opt_b.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert sd["param_groups"][1]["lr"] == kw["lr"] * 2
    if opt_cls is Adam:
        keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if kw.get("amsgrad")
                                                   else set())
        assert all(set(s) == keys and s["step"] == 3 for s in sd["state"].values())
        assert sorted(sd["state"]) == [0, 1, 2, 3]
    elif kw.get("momentum"):
        assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())
    else:
        assert sd["state"] == {}
    # the saved arrays are copies: stepping the old optimizer again does not change them
    saved = {i: {k: np.copy(v) for k, v in s.items()} for i, s in sd["state"].items()}
    for p in first:
        p.grad = np.ones_like(p.data)
    opt_b.step()
    for i, s in saved.items():
        for k, v in s.items():
            np.testing.assert_array_equal(sd["state"][i][k], v)
    # a fresh optimizer (different options, which the state dict overrides) continues
    ref = opt_cls(groups([P(a.copy()) for a in init]), **kw)
    for step_grads in grads[:3]:
        for p, g in zip(ref.param_groups[0]["params"] + ref.param_groups[1]["params"],
                        step_grads):
            p.grad = g.copy()
        ref.step()
    resumed = [P(p.data.copy()) for p in
               ref.param_groups[0]["params"] + ref.param_groups[1]["params"]]
    opt_c = opt_cls(groups(resumed), lr=123.0)
    opt_c.load_state_dict(sd)
    assert opt_c.param_groups[1]["lr"] == kw["lr"] * 2
    for key, value in kw.items():
        assert opt_c.param_groups[0][key] == value
    for st in opt_c.state_dict()["state"].values():
        assert all(v.dtype == dtype for v in st.values() if isinstance(v, np.ndarray))
    for step_grads in grads[3:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.copy()
        opt_c.step()
    for p, q in zip(resumed, whole):
        np.testing.assert_array_equal(p.data, q.data)
    # the loaded arrays were copied, not shared with sd
    if sd["state"]:
        key = next(iter(sd["state"][0]))
        if key != "step":
            assert sd["state"][0][key] is not opt_c.state[resumed[0]][key]


def test_load_state_dict_validation():
    a, b = P(np.ones(2), np.ones(2)), P(np.ones(3), np.ones(3))
    opt = Adam([a, b], lr=0.1)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="parameter groups"):
        Adam([{"params": [a]}, {"params": [b]}]).load_state_dict(sd)
    with pytest.raises(ValueError, match="has 2 parameters"):
        Adam([a]).load_state_dict(sd)
    c, d = P(np.ones(3)), P(np.ones(2))             # same count, swapped shapes
    fresh = Adam([c, d])
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0 and fresh.param_groups[0]["lr"] == 1e-3   # unchanged
    bad = opt.state_dict()
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        Adam([a, b]).load_state_dict(bad)
    with pytest.raises(ValueError):
        Adam([a, b]).load_state_dict({"state": {}})


# -------------------------------------------------------------------- validation

@pytest.mark.parametrize("kw,name", [
    (dict(lr=-0.1), "lr"), (dict(lr=0.1, momentum=-0.5), "momentum"),
    (dict(lr=0.1, weight_decay=-1e-4), "weight_decay"), (dict(lr=float("nan")), "lr"),
    (dict(lr=0.1, nesterov=True), "nesterov"),
    (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
])
def test_sgd_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        SGD([P(np.ones(2))], **kw)
    with pytest.raises(ValueError, match=name):     # also in a param group
        SGD([{"params": [P(np.ones(2))], **kw}], lr=0.1)


@pytest.mark.parametrize("kw,name", [
    (dict(lr=-1e-3), "lr"), (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"), (dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"), (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
    (dict(betas=(0.9,)), "betas"),
])
def test_adam_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        Adam([P(np.ones(2))], **kw)
    with pytest.raises(ValueError, match=name):
        Adam([{"params": [P(np.ones(2))], **kw}])


def test_params_validation():
    for opt_cls in (SGD, Adam):
        with pytest.raises(ValueError, match="empty parameter list"):
            opt_cls([], lr=0.1)
        with pytest.raises(ValueError, match="empty parameter list"):
            opt_cls(iter(()), lr=0.1)
    with pytest.raises(TypeError):
        SGD(P(np.ones(2)), lr=0.1)                  # a parameter, not an iterable of them
    with pytest.raises(TypeError):
        SGD([np.ones(2)], lr=0.1)                   # an ndarray's .data is a memoryview
    with pytest.raises(TypeError, match="dtype"):
        SGD([P(np.ones(2, np.int64))], lr=0.1)
    with pytest.raises(TypeError):
        SGD({"params": [P(np.ones(2))]}, lr=0.1)    # a group dict needs a list around it
    class Hashable:                                 # SimpleNamespace is not hashable
        data, grad = np.ones(2), None
    with pytest.raises(TypeError, match="set"):
        SGD([{"params": {Hashable()}}], lr=0.1)
    with pytest.raises(TypeError):
        SGD([P(np.ones(2))], lr="fast")
    p = P(np.ones(2))
    with pytest.raises(ValueError, match="more than once"):
        SGD([p, p], lr=0.1)
    opt = SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [p]})
    with pytest.raises(KeyError):
        opt.state[P(np.ones(2))]


@pytest.mark.parametrize("opt_cls", [SGD, Adam])
def test_grad_shape_mismatch_at_step(opt_cls):
    a, b = P(np.ones(3), np.ones(3)), P(np.ones((2, 2)), np.ones(4))
    opt = opt_cls([a, b], lr=0.1)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(4,\)"):
        opt.step()
    np.testing.assert_array_equal(a.data, 1)    # nothing was updated
    assert len(opt.state) == 0 or all(not s for s in opt.state.values())
    ro = np.ones(3)
    ro.flags.writeable = False
    opt = opt_cls([P(ro, np.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match="read-only"):
        opt.step()


def test_docstring_examples():
    result = doctest.testmod(fastconv.optim, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
    for cls in (Optimizer, SGD, Adam):
        assert ">>>" in cls.__doc__ and "Parameters" in cls.__doc__


# -------------------------------------------------------------------- against PyTorch

def _torch_run(torch, torch_cls, init, grads, kw):
    tp = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    opt = torch_cls(tp, foreach=False, **kw)
    for step_grads in grads:
        for p, g in zip(tp, step_grads):
            p.grad = torch.tensor(g.copy())
        opt.step()
    return [p.detach().numpy() for p in tp], opt


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,kw", list(itertools.chain(
    (("SGD", c) for c in SGD_CONFIGS), (("Adam", c) for c in ADAM_CONFIGS))), ids=str)
def test_matches_torch(name, kw, dtype):
    torch = pytest.importorskip("torch")
    init, grads = make(dtype, seed=7, n_steps=20)
    ours, opt = run({"SGD": SGD, "Adam": Adam}[name], init, grads, **kw)
    theirs, topt = _torch_run(torch, getattr(torch.optim, name), init, grads, kw)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    for p, q, tq in zip(ours, theirs, topt.param_groups[0]["params"]):
        assert p.data.dtype == q.dtype
        np.testing.assert_allclose(p.data, q, **tol)
        tstate = topt.state[tq]
        for key, value in opt.state[p].items():
            if key == "step":
                assert value == int(tstate["step"])
            else:
                np.testing.assert_allclose(value, tstate[key].numpy(), **tol)
        assert set(opt.state[p]) == {k for k, v in tstate.items() if v is not None}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_update_in_one_pass_has_numpys_numbers(dtype):
    """SGD's plain update d -= lr * g runs in one pass (optim._sub_scaled) with numpy's
    numbers bit for bit (g * lr rounded to the dtype, then subtracted; NaN, inf, -0), on 1-2
    threads, without a temporary of the parameter's size; non-contiguous or overlapping
    arrays take numpy's way with the same numbers."""
    import tracemalloc

    import fastconv as fc
    from fastconv import optim
    rng = np.random.default_rng(12)
    n0 = fc.get_num_threads()
    try:
        for threads in (1, 2):
            fc.set_num_threads(threads)
            for n in (7, 16383, 16385, 100_000):
                d = rng.standard_normal(n).astype(dtype)
                g = rng.standard_normal(n).astype(dtype)
                d[:3], g[3:6] = (np.inf, -0.0, 0.0), (np.nan, -0.0, 1e-30)
                for lr in (1e-3, 0.3, 3.0000001):
                    want = d.copy()
                    t = np.empty_like(want)
                    np.multiply(g, lr, out=t)
                    want -= t
                    got = d.copy()
                    tracemalloc.start()
                    optim._sub_scaled(got, g, lr)
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                    assert peak < max(1024, got.nbytes // 4)
                    np.testing.assert_array_equal(got, want)
                    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
        d = rng.standard_normal((40, 30)).astype(dtype)
        buf = np.arange(1, 9, dtype=dtype)
        for got, g in ((d.copy()[:, ::2], d[:, 1::2]), (d.copy(), None), (buf[1:], buf[:-1])):
            g = got[::-1] if g is None else g           # overlapping (the last contiguous)
            want = got.copy()
            t = np.empty_like(want)
            np.multiply(g, 0.5, out=t)              # (from g's values before the update)
            want -= t
            optim._sub_scaled(got, g, 0.5)
            np.testing.assert_array_equal(got, want)
    finally:
        fc.set_num_threads(n0)
