"""Property tests: every fastconv function against the naive reference, under hypothesis.

Shapes, kernel sizes, strides, paddings, dilations, groups, output_padding, ceil_mode,
count_include_pad, divisor overrides, label smoothing, class weights, reductions and dtypes are
all drawn; forward and backward results must match ``reference.py`` (float64 to ~1e-10, float32
to ~1e-4 relative).
"""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastconv as fc
import reference as ref

# small shapes must still exercise the multi-threaded paths (the finite-difference tests,
# which make thousands of tiny calls, keep the default: one thread for tiny calls)
parallel = pytest.mark.usefixtures("tiny_grain")

DTYPES = st.sampled_from([np.float32, np.float64])


def assert_close(actual, expected, dtype):
    """Tolerances keyed by dtype; scaled by the magnitude of the expected values."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape
    assert actual.dtype == np.dtype(dtype)
    scale = 1.0 + (np.abs(expected).max() if expected.size else 0.0)
    if np.dtype(dtype) == np.float64:
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-11 * scale)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def rand(data, shape, dtype, lo=-1.0, hi=1.0):
    """A random array drawn through hypothesis (so failures shrink and replay)."""
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    return rng.uniform(lo, hi, size=shape).astype(dtype)


def pair(data, lo, hi, label):
    a = data.draw(st.integers(lo, hi), label=label + "_h")
    same = data.draw(st.booleans(), label=label + "_square")
    return (a, a) if same else (a, data.draw(st.integers(lo, hi), label=label + "_w"))


def as_arg(p):
    return p[0] if p[0] == p[1] else p


# --------------------------------------------------------------------------------------------
# convolution
# --------------------------------------------------------------------------------------------

@st.composite
def conv_case(draw, transposed=False):
    g = draw(st.integers(1, 3), label="groups")
    cin_g = draw(st.integers(1, 3), label="in_per_group")
    cout_g = draw(st.integers(1, 3), label="out_per_group")
    k = (draw(st.integers(1, 4), label="kH"), draw(st.integers(1, 4), label="kW"))
    s = (draw(st.integers(1, 3), label="sH"), draw(st.integers(1, 3), label="sW"))
    d = (draw(st.integers(1, 3), label="dH"), draw(st.integers(1, 3), label="dW"))
    kind = draw(st.sampled_from(["int", "pair", "valid", "same"]) if not transposed
                else st.sampled_from(["int", "pair"]), label="padding_kind")
    if kind == "same":
        s = (1, 1)
    if kind == "int":
        p = draw(st.integers(0, 3), label="padding")
        pads = (p, p)
        padding = p
    elif kind == "pair":
        pads = (draw(st.integers(0, 3), label="pH"), draw(st.integers(0, 3), label="pW"))
        padding = pads
    elif kind == "valid":
        pads, padding = (0, 0), "valid"
    else:
        pads, padding = (0, 0), "same"
    size = []
    for i in range(2):
        span = d[i] * (k[i] - 1) + 1
        if transposed:
            # output (h-1)s - 2p + span + op >= 1
            lo = 1
            while (lo - 1) * s[i] - 2 * pads[i] + span < 1:
                lo += 1
        else:
            lo = max(1, span - 2 * pads[i]) if kind != "same" else 1
        size.append(lo + draw(st.integers(0, 4), label=f"extra{i}"))
    n = draw(st.integers(1, 3), label="N")
    op = (0, 0)
    if transposed:
        op = tuple(draw(st.integers(0, max(s[i], d[i]) - 1), label=f"output_padding{i}")
                   for i in range(2))
    dtype = draw(DTYPES, label="dtype")
    bias = draw(st.booleans(), label="bias")
    return dict(g=g, cin_g=cin_g, cout_g=cout_g, k=k, s=s, d=d, padding=padding, n=n,
                size=tuple(size), op=op, dtype=dtype, bias=bias)


@parallel
@given(case=conv_case(), data=st.data())
def test_conv2d_matches_reference(case, data):
    c = case
    C, L = c["g"] * c["cin_g"], c["g"] * c["cout_g"]
    x = rand(data, (c["n"], C) + c["size"], c["dtype"])
    w = rand(data, (L, c["cin_g"]) + c["k"], c["dtype"])
    b = rand(data, (L,), c["dtype"]) if c["bias"] else None
    kw = dict(stride=as_arg(c["s"]), padding=c["padding"], dilation=as_arg(c["d"]),
              groups=c["g"])
    y = fc.conv2d(x, w, b, **kw)
    assert_close(y, ref.conv2d(x, w, b, **kw), c["dtype"])
    gy = rand(data, y.shape, c["dtype"])
    got = fc.conv2d_backward(gy, x, w, **kw)
    want = ref.conv2d_backward(gy, x, w, **kw)
    for a, e in zip(got, want):
        assert_close(a, e, c["dtype"])


@parallel
@given(case=conv_case(transposed=True), data=st.data())
def test_conv_transpose2d_matches_reference(case, data):
    c = case
    Cin, Cout = c["g"] * c["cin_g"], c["g"] * c["cout_g"]
    x = rand(data, (c["n"], Cin) + c["size"], c["dtype"])
    w = rand(data, (Cin, c["cout_g"]) + c["k"], c["dtype"])
    b = rand(data, (Cout,), c["dtype"]) if c["bias"] else None
    kw = dict(stride=as_arg(c["s"]), padding=c["padding"], output_padding=as_arg(c["op"]),
              groups=c["g"], dilation=as_arg(c["d"]))
    y = fc.conv_transpose2d(x, w, b, **kw)
    assert_close(y, ref.conv_transpose2d(x, w, b, **kw), c["dtype"])
    gy = rand(data, y.shape, c["dtype"])
    got = fc.conv_transpose2d_backward(gy, x, w, **kw)
    want = ref.conv_transpose2d_backward(gy, x, w, **kw)
    for a, e in zip(got, want):
        assert_close(a, e, c["dtype"])


# --------------------------------------------------------------------------------------------
# pooling and upsampling
# --------------------------------------------------------------------------------------------

@st.composite
def pool_case(draw, with_dilation):
    k = (draw(st.integers(1, 4), label="kH"), draw(st.integers(1, 4), label="kW"))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),
                  label="stride")
    s = k if stride is None else stride
    p = (draw(st.integers(0, k[0] // 2), label="pH"), draw(st.integers(0, k[1] // 2), label="pW"))
    d = (1, 1)
    if with_dilation:
        d = (draw(st.integers(1, 3), label="dH"), draw(st.integers(1, 3), label="dW"))
    size = tuple(max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]) + draw(st.integers(0, 5),
                                                                 label=f"extra{i}")
                 for i in range(2))
    shape = (draw(st.integers(1, 2), label="N"), draw(st.integers(1, 3), label="C")) + size
    ceil_mode = draw(st.booleans(), label="ceil_mode")
    return dict(kernel_size=as_arg(k), stride=None if stride is None else as_arg(s),
                padding=as_arg(p), dilation=as_arg(d), ceil_mode=ceil_mode, shape=shape,
                dtype=draw(DTYPES, label="dtype"))


@parallel
@given(case=pool_case(with_dilation=True), data=st.data(), ties=st.booleans())
def test_max_pool2d_matches_reference(case, data, ties):
    c = dict(case)
    shape, dtype = c.pop("shape"), c.pop("dtype")
    x = rand(data, shape, dtype)
    if ties:  # few distinct values: the first maximum of a window must win
        x = np.round(x * 2).astype(dtype)
    y, idx = fc.max_pool2d(x, return_indices=True, **c)
    y_ref, idx_ref = ref.max_pool2d(x, return_indices=True, **c)
    assert_close(y, y_ref, dtype)
    np.testing.assert_array_equal(idx, idx_ref)
    assert idx.dtype == np.int64
    assert_close(fc.max_pool2d(x, **c), y_ref, dtype)
    gy = rand(data, y.shape, dtype)
    assert_close(fc.max_pool2d_backward(gy, x, **c), ref.max_pool2d_backward(gy, x, **c), dtype)


@parallel
@given(case=pool_case(with_dilation=False), data=st.data(), count_include_pad=st.booleans(),
       divisor_override=st.one_of(st.none(), st.integers(-3, 7).filter(bool)))
def test_avg_pool2d_matches_reference(case, data, count_include_pad, divisor_override):
    c = dict(case)
    shape, dtype = c.pop("shape"), c.pop("dtype")
    c.pop("dilation")
    c.update(count_include_pad=count_include_pad, divisor_override=divisor_override)
    x = rand(data, shape, dtype)
    y = fc.avg_pool2d(x, **c)
    assert_close(y, ref.avg_pool2d(x, **c), dtype)
    gy = rand(data, y.shape, dtype)
    assert_close(fc.avg_pool2d_backward(gy, x, **c), ref.avg_pool2d_backward(gy, x, **c), dtype)


@parallel
@given(data=st.data(), dtype=DTYPES,
       scale=st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4))),
       shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6),
                       st.integers(1, 6)))
def test_upsample_nearest2d_matches_reference(data, dtype, scale, shape):
    x = rand(data, shape, dtype)
    y = fc.upsample_nearest2d(x, scale)
    assert_close(y, ref.upsample_nearest2d(x, scale), dtype)
    gy = rand(data, y.shape, dtype)
    assert_close(fc.upsample_nearest2d_backward(gy, scale),
                 ref.upsample_nearest2d_backward(gy, scale), dtype)


# --------------------------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------------------------

@st.composite
def ce_case(draw):
    n = draw(st.integers(1, 6), label="N")
    # few classes mostly; sometimes enough for the vector loops, their tails and blocks
    c = draw(st.integers(1, 6) | st.integers(7, 300), label="C")
    dtype = draw(DTYPES, label="dtype")
    probs = draw(st.booleans(), label="prob_targets")
    reduction = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    smoothing = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(0, 1), label="eps")
    weighted = draw(st.booleans(), label="weighted")
    ignore_index = -100
    if not probs:
        ignore_index = draw(st.sampled_from([-100, 0, c - 1]), label="ignore_index")
    return dict(n=n, c=c, dtype=dtype, probs=probs, reduction=reduction, smoothing=smoothing,
                weighted=weighted, ignore_index=ignore_index)


@parallel
@given(case=ce_case(), data=st.data())
def test_cross_entropy_matches_reference(case, data):
    c = case
    dtype = c["dtype"]
    logits = rand(data, (c["n"], c["c"]), dtype, -5, 5)
    if c["probs"]:
        t = rand(data, (c["n"], c["c"]), dtype, 0, 1)
        target = (t / t.sum(axis=1, keepdims=True)).astype(dtype)
    else:
        seed = data.draw(st.integers(0, 2**32 - 1), label="label_seed")
        target = np.random.default_rng(seed).integers(0, c["c"], c["n"])
    weight = rand(data, (c["c"],), dtype, 0.1, 2.0) if c["weighted"] else None
    kw = dict(weight=weight, reduction=c["reduction"], label_smoothing=c["smoothing"],
              ignore_index=c["ignore_index"])
    loss = fc.cross_entropy(logits, target, **kw)
    want = ref.cross_entropy(logits, target, **kw)
    if c["reduction"] == "none":
        assert_close(loss, want, dtype)
        go = rand(data, (c["n"],), dtype)
    else:
        assert isinstance(loss, np.generic) and loss.dtype == dtype
        assert_close(np.asarray(loss), np.asarray(want), dtype)
        go = float(rand(data, (1,), np.float64)[0])
    got = fc.cross_entropy_backward(logits, target, grad_output=go, **kw)
    assert_close(got, ref.cross_entropy_backward(logits, target, grad_output=go, **kw), dtype)


# --------------------------------------------------------------------------------------------
# every backward against central finite differences (float64)
# --------------------------------------------------------------------------------------------

def numeric_grad(f, a, eps=1e-6):
    """d f / d a by central differences, f a scalar function of the array a."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        hi = f()
        flat[i] = old - eps
        lo = f()
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * eps)
    return g


def check_fd(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)


@given(case=conv_case(), data=st.data())
def test_conv2d_backward_finite_differences(case, data):
    c = case
    C, L = c["g"] * c["cin_g"], c["g"] * c["cout_g"]
    x = rand(data, (c["n"], C) + c["size"], np.float64)
    w = rand(data, (L, c["cin_g"]) + c["k"], np.float64)
    b = rand(data, (L,), np.float64)
    kw = dict(stride=c["s"], padding=c["padding"], dilation=c["d"], groups=c["g"])
    r = rand(data, fc.conv2d(x, w, b, **kw).shape, np.float64)

    def f():
        return float((fc.conv2d(x, w, b, **kw) * r).sum())

    gx, gw, gb = fc.conv2d_backward(r, x, w, **kw)
    check_fd(gx, numeric_grad(f, x))
    check_fd(gw, numeric_grad(f, w))
    check_fd(gb, numeric_grad(f, b))


@given(case=conv_case(transposed=True), data=st.data())
def test_conv_transpose2d_backward_finite_differences(case, data):
    c = case
    Cin, Cout = c["g"] * c["cin_g"], c["g"] * c["cout_g"]
    x = rand(data, (c["n"], Cin) + c["size"], np.float64)
    w = rand(data, (Cin, c["cout_g"]) + c["k"], np.float64)
    b = rand(data, (Cout,), np.float64)
    kw = dict(stride=c["s"], padding=c["padding"], output_padding=c["op"], groups=c["g"],
              dilation=c["d"])
    r = rand(data, fc.conv_transpose2d(x, w, b, **kw).shape, np.float64)

    def f():
        return float((fc.conv_transpose2d(x, w, b, **kw) * r).sum())

    gx, gw, gb = fc.conv_transpose2d_backward(r, x, w, **kw)
    check_fd(gx, numeric_grad(f, x))
    check_fd(gw, numeric_grad(f, w))
    check_fd(gb, numeric_grad(f, b))


@given(case=pool_case(with_dilation=True), data=st.data())
def test_max_pool2d_backward_finite_differences(case, data):
    c = dict(case)
    shape = c.pop("shape")
    c.pop("dtype")
    # distinct values far apart relative to eps, so no perturbation changes an argmax
    seed = data.draw(st.integers(0, 2**32 - 1), label="perm_seed")
    x = np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape) * 1e-3
    y = fc.max_pool2d(x, **c)
    assume(np.isfinite(y).all())  # a window wholly in the padding is -inf: no derivative
    r = rand(data, y.shape, np.float64)

    def f():
        return float((fc.max_pool2d(x, **c) * r).sum())

    check_fd(fc.max_pool2d_backward(r, x, **c), numeric_grad(f, x))


@given(case=pool_case(with_dilation=False), data=st.data(), count_include_pad=st.booleans())
def test_avg_pool2d_backward_finite_differences(case, data, count_include_pad):
    c = dict(case)
    shape = c.pop("shape")
    c.pop("dtype")
    c.pop("dilation")
    c["count_include_pad"] = count_include_pad
    x = rand(data, shape, np.float64)
    r = rand(data, fc.avg_pool2d(x, **c).shape, np.float64)

    def f():
        return float((fc.avg_pool2d(x, **c) * r).sum())

    check_fd(fc.avg_pool2d_backward(r, x, **c), numeric_grad(f, x))


@given(data=st.data(), scale=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_upsample_nearest2d_backward_finite_differences(data, scale):
    x = rand(data, (2, 2, 3, 4), np.float64)
    r = rand(data, fc.upsample_nearest2d(x, scale).shape, np.float64)

    def f():
        return float((fc.upsample_nearest2d(x, scale) * r).sum())

    check_fd(fc.upsample_nearest2d_backward(r, scale), numeric_grad(f, x))


@given(case=ce_case(), data=st.data())
def test_cross_entropy_backward_finite_differences(case, data):
    c = case
    logits = rand(data, (c["n"], c["c"]), np.float64, -5, 5)
    if c["probs"]:
        t = rand(data, (c["n"], c["c"]), np.float64, 0, 1)
        target = t / t.sum(axis=1, keepdims=True)
    else:
        seed = data.draw(st.integers(0, 2**32 - 1), label="label_seed")
        target = np.random.default_rng(seed).integers(0, c["c"], c["n"])
    weight = rand(data, (c["c"],), np.float64, 0.1, 2.0) if c["weighted"] else None
    kw = dict(weight=weight, reduction=c["reduction"], label_smoothing=c["smoothing"],
              ignore_index=c["ignore_index"])
    r = rand(data, (c["n"],), np.float64) if c["reduction"] == "none" else 0.7

    def f():
        loss = fc.cross_entropy(logits, target, **kw)
        return float(np.sum(loss * r))

    if c["reduction"] == "mean" and not c["probs"] and np.all(target == c["ignore_index"]):
        return  # the loss is nan: nothing to differentiate
    got = fc.cross_entropy_backward(logits, target, grad_output=r, **kw)
    check_fd(got, numeric_grad(f, logits))


# --------------------------------------------------------------------------------------------
# explicit regressions and corner cases worth keeping as fixed examples
# --------------------------------------------------------------------------------------------

@parallel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_pointwise_and_depthwise(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6, 5, 4)).astype(dtype)
    for w, kw in [(rng.standard_normal((4, 6, 1, 1)), {}),                 # 1x1: no im2col
                  (rng.standard_normal((6, 1, 3, 3)), dict(groups=6, padding=1)),  # depthwise
                  (rng.standard_normal((12, 1, 3, 3)), dict(groups=6, stride=2))]:
        w = w.astype(dtype)
        assert_close(fc.conv2d(x, w, **kw), ref.conv2d(x, w, **kw), dtype)
        gy = rng.standard_normal(fc.conv2d(x, w, **kw).shape).astype(dtype)
        for a, e in zip(fc.conv2d_backward(gy, x, w, **kw), ref.conv2d_backward(gy, x, w, **kw)):
            assert_close(a, e, dtype)


@parallel
def test_conv_transpose2d_pointwise_direct_path():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 3, 5))
    w = rng.standard_normal((4, 3, 1, 1))
    b = rng.standard_normal(3)
    assert_close(fc.conv_transpose2d(x, w, b), ref.conv_transpose2d(x, w, b), np.float64)
    gy = rng.standard_normal((2, 3, 3, 5))
    for a, e in zip(fc.conv_transpose2d_backward(gy, x, w),
                    ref.conv_transpose2d_backward(gy, x, w)):
        assert_close(a, e, np.float64)


def test_max_pool2d_nan_and_all_equal_windows():
    x = np.array([[[[1.0, np.nan, 3.0, 3.0],
                    [np.nan, 0.0, 3.0, 3.0]]]])
    y, idx = fc.max_pool2d(x, 2, return_indices=True)
    y_ref, idx_ref = ref.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(y, y_ref)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 4   # the last NaN wins
    assert y[0, 0, 0, 1] == 3 and idx[0, 0, 0, 1] == 2        # the first maximum wins


@parallel
@pytest.mark.parametrize("dtype,hw", [(np.float32, (16, 32)), (np.float64, (16, 16)),
                                      (np.float32, (8, 64))])
def test_conv_im2col_rows_padded_off_2k(dtype, hw):
    """Output planes of 512 floats / 256 doubles: the im2col rows get one cache line of
    padding (col_ld); every convolution path that uses them, against the reference."""
    r = np.random.default_rng(11)
    x = r.uniform(-1, 1, (2, 3, *hw)).astype(dtype)
    w = r.uniform(-1, 1, (4, 3, 3, 3)).astype(dtype)
    y = fc.conv2d(x, w, padding=1)
    assert_close(y, ref.conv2d(x, w, padding=1), dtype)
    gy = r.uniform(-1, 1, y.shape).astype(dtype)
    for got, want in zip(fc.conv2d_backward(gy, x, w, padding=1),
                         ref.conv2d_backward(gy, x, w, padding=1)):
        assert_close(got, want, dtype)
    wt = r.uniform(-1, 1, (3, 2, 3, 3)).astype(dtype)
    yt = fc.conv_transpose2d(x, wt, padding=1)
    assert_close(yt, ref.conv_transpose2d(x, wt, padding=1), dtype)
    for got, want in zip(fc.conv_transpose2d_backward(yt, x, wt, padding=1),
                         ref.conv_transpose2d_backward(yt, x, wt, padding=1)):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("seed", range(4))
def test_pool_backward_tiling_windows(seed):
    """Kernel == stride, no padding: the backward kernels write grad_x once instead of
    accumulating.  Ties, NaN and -inf planes, ceil_mode overhangs (those keep the general
    path), uncovered trailing rows and columns, against the reference."""
    r = np.random.default_rng(seed)
    for _ in range(40):
        k = (int(r.integers(1, 4)), int(r.integers(1, 4)))
        H, W = int(r.integers(k[0], 12)), int(r.integers(k[1], 12))
        ceil = bool(r.integers(0, 2))
        x = r.integers(-2, 3, (2, 3, H, W)).astype(np.float64)       # many ties
        if r.random() < 0.3:
            x[0, 0, r.integers(0, H), r.integers(0, W)] = np.nan
        if r.random() < 0.3:
            x[1, 1] = -np.inf
        y = fc.max_pool2d(x, k, k, 0, ceil_mode=ceil)
        gy = r.standard_normal(y.shape)
        assert_close(fc.max_pool2d_backward(gy, x, k, k, 0, ceil_mode=ceil),
                     ref.max_pool2d_backward(gy, x, k, k, 0, ceil_mode=ceil), np.float64)
        kw = dict(ceil_mode=ceil, count_include_pad=bool(r.integers(0, 2)),
                  divisor_override=None if r.random() < 0.7 else int(r.integers(1, 5)))
        x = r.standard_normal((2, 3, H, W))
        gy = r.standard_normal(fc.avg_pool2d(x, k, k, 0, **kw).shape)
        assert_close(fc.avg_pool2d_backward(gy, x, k, k, 0, **kw),
                     ref.avg_pool2d_backward(gy, x, k, k, 0, **kw), np.float64)
