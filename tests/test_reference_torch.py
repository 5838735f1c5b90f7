"""Cross-check the naive reference (tests/reference.py) against PyTorch.

Validates the oracle itself, not fastconv: every reference function, forward
and backward (backward via torch.autograd), is compared in float64 with
torch.nn.functional on fixed and randomly drawn small cases.  Skipped when
torch is not installed.
"""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

pytestmark = pytest.mark.torch

TOL = dict(rtol=1e-10, atol=1e-10)


def T(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64, requires_grad=grad)


def close(actual, expected):
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(actual, expected, equal_nan=True, **TOL)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ---------------------------------------------------------------- conv2d

def _conv_cases():
    # (N, C, H, W, L, kH, kW, stride, padding, dilation, groups)
    cases = [
        (2, 3, 5, 6, 4, 3, 3, 1, 0, 1, 1),
        (1, 4, 7, 7, 6, 3, 2, (2, 1), (1, 2), (2, 1), 2),
        (2, 6, 6, 5, 3, 1, 1, 1, 0, 1, 3),        # 1x1, groups 3
        (1, 4, 5, 5, 4, 3, 3, 2, 1, 1, 4),        # depthwise
        (1, 2, 9, 8, 2, 3, 3, 3, 2, 2, 1),
    ]
    for seed in range(8):
        rs = np.random.RandomState(seed)
        g = int(rs.randint(1, 4))
        C, L = g * int(rs.randint(1, 3)), g * int(rs.randint(1, 3))
        kH, kW = (int(v) for v in rs.randint(1, 4, size=2))
        s = tuple(int(v) for v in rs.randint(1, 4, size=2))
        p = tuple(int(v) for v in rs.randint(0, 3, size=2))
        d = tuple(int(v) for v in rs.randint(1, 3, size=2))
        H = max(1, d[0] * (kH - 1) + 1 - 2 * p[0]) + int(rs.randint(0, 5))
        W = max(1, d[1] * (kW - 1) + 1 - 2 * p[1]) + int(rs.randint(0, 5))
        cases.append((int(rs.randint(1, 3)), C, H, W, L, kH, kW, s, p, d, g))
    return cases


@pytest.mark.parametrize("case", _conv_cases())
def test_conv2d(case):
    N, C, H, W, L, kH, kW, s, p, d, g = case
    rs = np.random.RandomState(H * 100 + W)
    x, w, b = rs.randn(N, C, H, W), rs.randn(L, C // g, kH, kW), rs.randn(L)
    tx, tw, tb = T(x, True), T(w, True), T(b, True)
    out = F.conv2d(tx, tw, tb, stride=s, padding=p, dilation=d, groups=g)
    close(ref.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g), out)
    close(ref.conv2d(x, w, None, stride=s, padding=p, dilation=d, groups=g),
          F.conv2d(tx, tw, None, stride=s, padding=p, dilation=d, groups=g))
    go = rs.randn(*out.shape)
    out.backward(T(go))
    gx, gw, gb = ref.conv2d_backward(go, x, w, stride=s, padding=p, dilation=d, groups=g)
    close(gx, tx.grad)
    close(gw, tw.grad)
    close(gb, tb.grad)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("k,d,g", [((2, 4), (1, 1), 1), ((4, 3), (1, 2), 2), ((3, 3), (2, 3), 1),
                                   ((1, 2), (3, 3), 2)])
def test_conv2d_string_padding(padding, k, d, g):
    rs = np.random.RandomState(k[0] * 10 + k[1])
    x, w, b = rs.randn(2, 4, 8, 9), rs.randn(4, 4 // g, *k), rs.randn(4)
    tx, tw, tb = T(x, True), T(w, True), T(b, True)
    out = F.conv2d(tx, tw, tb, padding=padding, dilation=d, groups=g)
    res = ref.conv2d(x, w, b, padding=padding, dilation=d, groups=g)
    assert res.shape == tuple(out.shape)
    close(res, out)
    go = rs.randn(*out.shape)
    out.backward(T(go))
    gx, gw, gb = ref.conv2d_backward(go, x, w, padding=padding, dilation=d, groups=g)
    close(gx, tx.grad)
    close(gw, tw.grad)
    close(gb, tb.grad)


@pytest.mark.parametrize("pad4,s,d", [((0, 1, 2, 0), 1, 1), ((2, 0, 1, 3), (2, 1), (1, 2)),
                                      ((1, 2, 0, 1), 2, 2)])
def test_conv2d_asymmetric_padding(pad4, s, d):
    top, bottom, left, right = pad4
    rs = np.random.RandomState(sum(pad4))
    x, w, b = rs.randn(2, 2, 6, 7), rs.randn(3, 2, 3, 2), rs.randn(3)
    tx, tw, tb = T(x, True), T(w, True), T(b, True)
    out = F.conv2d(F.pad(tx, (left, right, top, bottom)), tw, tb, stride=s, dilation=d)
    close(ref.conv2d(x, w, b, stride=s, padding=pad4, dilation=d), out)
    go = rs.randn(*out.shape)
    out.backward(T(go))
    gx, gw, gb = ref.conv2d_backward(go, x, w, stride=s, padding=pad4, dilation=d)
    close(gx, tx.grad)
    close(gw, tw.grad)
    close(gb, tb.grad)


def test_conv2d_same_requires_stride_1():
    with pytest.raises(ValueError):
        ref.conv2d(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)), stride=2, padding="same")


# ---------------------------------------------------------------- conv_transpose2d

def _convt_cases():
    # (N, Cin, H, W, Cout, kH, kW, stride, padding, output_padding, groups, dilation)
    cases = [
        (2, 3, 4, 5, 2, 3, 3, 1, 0, 0, 1, 1),
        (1, 4, 3, 4, 6, 3, 2, 2, 1, 1, 2, 1),
        (1, 2, 4, 3, 2, 3, 3, 1, 0, 1, 1, 2),             # output_padding >= stride, < dilation
        (2, 2, 3, 3, 4, 2, 3, (1, 3), (0, 1), (1, 2), 2, (2, 1)),
        (1, 3, 3, 4, 3, 3, 3, 3, 2, 2, 3, 2),
    ]
    for seed in range(8):
        rs = np.random.RandomState(100 + seed)
        g = int(rs.randint(1, 4))
        Cin, Cout = g * int(rs.randint(1, 3)), g * int(rs.randint(1, 3))
        kH, kW = (int(v) for v in rs.randint(1, 4, size=2))
        s = tuple(int(v) for v in rs.randint(1, 4, size=2))
        d = tuple(int(v) for v in rs.randint(1, 3, size=2))
        op = tuple(int(rs.randint(0, max(s[i], d[i]))) for i in range(2))
        H, W = (int(v) for v in rs.randint(1, 5, size=2))
        p = []
        for size, k, si, di, oi in ((H, kH, s[0], d[0], op[0]), (W, kW, s[1], d[1], op[1])):
            full = (size - 1) * si + di * (k - 1) + oi + 1
            p.append(int(rs.randint(0, (full - 1) // 2 + 1)))
        cases.append((int(rs.randint(1, 3)), Cin, H, W, Cout, kH, kW, s, tuple(p), op, g, d))
    return cases


@pytest.mark.parametrize("case", _convt_cases())
def test_conv_transpose2d(case):
    N, Cin, H, W, Cout, kH, kW, s, p, op, g, d = case
    rs = np.random.RandomState(H * 10 + W + Cin)
    x, w, b = rs.randn(N, Cin, H, W), rs.randn(Cin, Cout // g, kH, kW), rs.randn(Cout)
    tx, tw, tb = T(x, True), T(w, True), T(b, True)
    kw = dict(stride=s, padding=p, output_padding=op, groups=g, dilation=d)
    out = F.conv_transpose2d(tx, tw, tb, **kw)
    res = ref.conv_transpose2d(x, w, b, **kw)
    assert res.shape == tuple(out.shape)
    close(res, out)
    close(ref.conv_transpose2d(x, w, None, **kw), F.conv_transpose2d(tx, tw, None, **kw))
    go = rs.randn(*out.shape)
    out.backward(T(go))
    gx, gw, gb = ref.conv_transpose2d_backward(go, x, w, **kw)
    close(gx, tx.grad)
    close(gw, tw.grad)
    close(gb, tb.grad)


# ---------------------------------------------------------------- max_pool2d

def _pool_cases(seed0, with_dilation):
    # (H, W, kernel, stride, padding, dilation, ceil_mode)
    cases = [
        (5, 5, 2, 2, 1, 1, True),       # ceil_mode drops the window starting in the padding
        (6, 7, 3, 2, 1, 1, True),
        (4, 6, (2, 3), None, 0, 1, False),
        (7, 6, 3, (2, 1), (1, 0), 1, False),
    ]
    if with_dilation:
        cases += [(8, 7, 3, 2, 1, 2, True), (7, 9, (2, 3), (3, 2), (1, 1), (3, 2), False)]
    for seed in range(8):
        rs = np.random.RandomState(seed0 + seed)
        k = tuple(int(v) for v in rs.randint(1, 4, size=2))
        s = tuple(int(v) for v in rs.randint(1, 4, size=2))
        p = tuple(int(rs.randint(0, k[i] // 2 + 1)) for i in range(2))
        d = tuple(int(v) for v in rs.randint(1, 3, size=2)) if with_dilation else 1
        dd = pair(d)
        H = max(1, dd[0] * (k[0] - 1) + 1 - 2 * p[0]) + int(rs.randint(0, 5))
        W = max(1, dd[1] * (k[1] - 1) + 1 - 2 * p[1]) + int(rs.randint(0, 5))
        cases.append((H, W, k, s, p, d, bool(rs.randint(2))))
    return cases


def _check_max_pool(x, k, s, p, d, ceil, rs):
    kw = dict(stride=s, padding=p, dilation=d, ceil_mode=ceil)
    tx = T(x, True)
    out, idx = F.max_pool2d(tx, k, return_indices=True, **kw)
    r_out, r_idx = ref.max_pool2d(x, k, return_indices=True, **kw)
    assert r_out.shape == tuple(out.shape)
    close(r_out, out)
    assert r_idx.dtype == np.int64
    np.testing.assert_array_equal(r_idx, idx.numpy())
    close(ref.max_pool2d(x, k, **kw), F.max_pool2d(T(x), k, **kw))
    go = rs.randn(*out.shape)
    out.backward(T(go))
    close(ref.max_pool2d_backward(go, x, k, **kw), tx.grad)


@pytest.mark.parametrize("case", _pool_cases(200, True))
def test_max_pool2d(case):
    H, W, k, s, p, d, ceil = case
    rs = np.random.RandomState(H * 10 + W)
    _check_max_pool(rs.randn(2, 2, H, W), k, s, p, d, ceil, rs)
    _check_max_pool(rs.randint(0, 3, size=(2, 2, H, W)).astype(np.float64), k, s, p, d, ceil, rs)


@pytest.mark.parametrize("fill", [1.5, -np.inf, np.nan])
@pytest.mark.parametrize("case", [(5, 6, 3, 2, 1, 1, True), (6, 6, 2, 1, 1, 2, False),
                                  (4, 5, (3, 2), (1, 2), (1, 1), 1, True)])
def test_max_pool2d_constant_input(fill, case):
    # all-equal input: the first in-bounds position of each window wins;
    # all-NaN input: the last one does.
    H, W, k, s, p, d, ceil = case
    _check_max_pool(np.full((1, 2, H, W), fill), k, s, p, d, ceil, np.random.RandomState(0))


@pytest.mark.parametrize("case", [(6, 7, 3, 2, 1, 1, True), (5, 5, 2, 1, 0, 1, False),
                                  (7, 6, 3, 1, 1, 2, False)])
def test_max_pool2d_nan(case):
    H, W, k, s, p, d, ceil = case
    rs = np.random.RandomState(7)
    x = rs.randint(0, 3, size=(2, 2, H, W)).astype(np.float64)
    x[rs.rand(*x.shape) < 0.25] = np.nan
    x[0, 0, 0, 0] = np.inf
    _check_max_pool(x, k, s, p, d, ceil, rs)


# ---------------------------------------------------------------- avg_pool2d

@pytest.mark.parametrize("divisor_override", [None, 1, 3])
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", _pool_cases(300, False))
def test_avg_pool2d(case, count_include_pad, divisor_override):
    H, W, k, s, p, _, ceil = case
    rs = np.random.RandomState(H * 10 + W)
    x = rs.randn(2, 2, H, W)
    kw = dict(stride=s, padding=p, ceil_mode=ceil, count_include_pad=count_include_pad,
              divisor_override=divisor_override)
    tx = T(x, True)
    out = F.avg_pool2d(tx, k, **kw)
    res = ref.avg_pool2d(x, k, **kw)
    assert res.shape == tuple(out.shape)
    close(res, out)
    go = rs.randn(*out.shape)
    out.backward(T(go))
    close(ref.avg_pool2d_backward(go, x, k, **kw), tx.grad)


# ---------------------------------------------------------------- upsample_nearest2d

@pytest.mark.parametrize("scale", [1, 2, 3, (1, 2), (3, 2), (2, 5)])
def test_upsample_nearest2d(scale):
    sh, sw = pair(scale)
    rs = np.random.RandomState(sh * 10 + sw)
    x = rs.randn(2, 3, 4, 5)
    tx = T(x, True)
    out = F.interpolate(tx, scale_factor=(float(sh), float(sw)), mode="nearest")
    res = ref.upsample_nearest2d(x, scale)
    assert res.shape == (2, 3, 4 * sh, 5 * sw)
    close(res, out)
    close(res, F.interpolate(T(x), size=(4 * sh, 5 * sw), mode="nearest"))
    go = rs.randn(*out.shape)
    out.backward(T(go))
    close(ref.upsample_nearest2d_backward(go, scale), tx.grad)


# ---------------------------------------------------------------- cross_entropy

def _ce_check(logits, target, torch_target, weight, reduction, eps, ignore_index, rs,
              ref_ignore_index=None):
    kw = dict(reduction=reduction, label_smoothing=eps)
    if ignore_index is not None:
        kw["ignore_index"] = ignore_index
    tz = T(logits, True)
    loss = F.cross_entropy(tz, torch_target, weight=None if weight is None else T(weight), **kw)
    if ref_ignore_index is not None:
        kw["ignore_index"] = ref_ignore_index
    res = ref.cross_entropy(logits, target, weight=weight, **kw)
    if reduction == "none":
        assert res.shape == (logits.shape[0],)
        go = rs.rand(logits.shape[0]) + 0.5
        loss.backward(T(go))
    else:
        assert isinstance(res, float)
        go = float(rs.rand() + 0.5)
        loss.backward(T(go))
    close(res, loss)
    grad = ref.cross_entropy_backward(logits, target, weight=weight, grad_output=go, **kw)
    close(grad, tz.grad)
    if reduction != "none":  # default grad_output is 1
        grad1 = ref.cross_entropy_backward(logits, target, weight=weight, **kw)
        close(grad1 * go, tz.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("ignore_index", [None, 1])
def test_cross_entropy_int_targets(reduction, eps, use_weight, ignore_index):
    rs = np.random.RandomState(int(eps * 100) + 7 * use_weight)
    N, C = 7, 4
    logits = rs.randn(N, C) * 3
    logits[0] += 800.0  # exercises the max-subtraction trick
    target = rs.randint(0, C, size=N)
    target[2] = 1
    if ignore_index is None:
        target[3] = -100  # the default ignore_index
    weight = rs.rand(C) + 0.2 if use_weight else None
    _ce_check(logits, target, torch.tensor(target, dtype=torch.int64), weight, reduction, eps,
              ignore_index, rs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("use_weight", [False, True])
def test_cross_entropy_all_ignored(reduction, eps, use_weight):
    rs = np.random.RandomState(3)
    logits = rs.randn(3, 4)
    target = np.array([2, 2, 2])
    weight = rs.rand(4) + 0.2 if use_weight else None
    _ce_check(logits, target, torch.tensor(target), weight, reduction, eps, 2, rs)
    if reduction == "mean":
        assert np.isnan(ref.cross_entropy(logits, target, weight=weight, ignore_index=2,
                                          label_smoothing=eps))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.25])
@pytest.mark.parametrize("use_weight", [False, True])
def test_cross_entropy_prob_targets(reduction, eps, use_weight):
    rs = np.random.RandomState(11 + int(eps * 100) + use_weight)
    N, C = 6, 5
    logits = rs.randn(N, C) * 2
    target = rs.dirichlet(np.ones(C), size=N)
    target[1] = np.eye(C)[3]
    weight = rs.rand(C) + 0.2 if use_weight else None
    # ignore_index does not apply to probability targets (torch refuses a
    # non-default one; the reference must simply ignore it)
    _ce_check(logits, target, T(target), weight, reduction, eps, None, rs, ref_ignore_index=3)
