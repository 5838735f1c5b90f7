"""Tests of fastconv.nn: layers, Sequential, state dicts, initialisation, modes and errors.

Every layer's ``backward`` is checked against central finite differences in float64 of the
scalar objective ``sum(layer(x) * r)`` (random ``r``): the returned input gradient and each
parameter's accumulated ``.grad``.  No PyTorch needed (tests/test_nn_torch.py compares with it).
"""
import math

import numpy as np
import pytest

import fastconv as fc
import fastconv.nn as nn
from fastconv.optim import SGD

EPS = 1e-6


# ------------------------------------------------------------------------------- helpers

def numeric_grad(f, a, eps=EPS):
    """Central differences of the scalar ``f()`` with respect to every element of ``a``
    (perturbed in place and restored)."""
    g = np.zeros(a.shape, np.float64)
    flat = a.reshape(-1)            # a view: a is contiguous
    assert np.shares_memory(flat, a)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        g.flat[i] = (fp - fm) / (2 * eps)
    return g


def assert_grad_close(analytic, numeric, what, rtol=1e-6, atol=1e-7):
    assert analytic is not None, f"{what}: no gradient"
    assert analytic.shape == numeric.shape, what
    scale = max(1.0, float(np.abs(numeric).max()))
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol * scale, err_msg=what)


def check_layer(layer, x, fwd=None, seed=0, rtol=1e-6, atol=1e-7):
    """Compare ``layer.backward`` (input gradient and parameter .grad) with finite
    differences of ``sum(fwd(x) * r)``; ``fwd`` defaults to the layer itself."""
    fwd = layer if fwd is None else fwd
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = layer(x)
    assert y.dtype == np.float64
    r = np.random.default_rng(seed).standard_normal(y.shape)
    layer.zero_grad()
    gx = layer.backward(r)
    analytic = {name: p.grad.copy() for name, p in layer.named_parameters()}

    def objective():
        return float(np.sum(fwd(x) * r))

    assert gx.shape == x.shape
    assert_grad_close(gx, numeric_grad(objective, x), "input gradient", rtol, atol)
    for name, p in layer.named_parameters():
        assert p.dtype == np.float64
        assert_grad_close(analytic[name], numeric_grad(objective, p.data), name, rtol, atol)
    return y, gx


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def distinct(*shape, seed=0):
    """Values pairwise at least 0.01 apart (so that no max-pool tie flips under EPS)."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) * 0.01 - n * 0.005).reshape(shape)


def small_cnn(dtype=np.float32, rng=0, n_classes=5):
    """Conv2d -> ReLU -> MaxPool2d -> Conv2d -> ReLU -> Flatten -> Linear on (N, 1, 8, 8)."""
    g = np.random.default_rng(rng)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, dtype=dtype, rng=g),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, dtype=dtype, rng=g),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, n_classes, dtype=dtype, rng=g),
    )


CNN_KEYS = ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias"]


def batch(n=6, seed=1, dtype=np.float64, n_classes=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(dtype), rng.integers(0, n_classes, n)


# ------------------------------------------------------------------ layer gradients

CONV_CASES = [
    dict(cin=3, cout=4, k=3, x=(2, 3, 6, 7), kw={}),
    dict(cin=2, cout=3, k=3, x=(2, 2, 7, 6), kw=dict(stride=2, padding=1)),
    dict(cin=2, cout=3, k=(2, 3), x=(1, 2, 7, 8),
         kw=dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1))),
    dict(cin=4, cout=6, k=3, x=(2, 4, 5, 5), kw=dict(groups=2, padding=1)),
    dict(cin=3, cout=6, k=3, x=(1, 3, 6, 6), kw=dict(groups=3, stride=2)),   # depthwise x2
    dict(cin=2, cout=3, k=4, x=(1, 2, 6, 5), kw=dict(padding="same")),       # even kernel
    dict(cin=2, cout=2, k=3, x=(1, 2, 7, 7), kw=dict(padding="same", dilation=2)),
    dict(cin=2, cout=3, k=(3, 2), x=(2, 2, 5, 6), kw=dict(padding="valid", bias=False)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: str(c["kw"]) or "plain")
def test_conv2d_gradients(case):
    conv = nn.Conv2d(case["cin"], case["cout"], case["k"], dtype=np.float64, rng=1,
                     **case["kw"])
    y, _ = check_layer(conv, randn(*case["x"]))
    if case["kw"].get("padding") == "same":
        assert y.shape[2:] == case["x"][2:]
    assert [n for n, _ in conv.named_parameters()] == \
        (["weight"] if case["kw"].get("bias") is False else ["weight", "bias"])


CONVT_CASES = [
    dict(cin=3, cout=2, k=3, x=(2, 3, 4, 5), kw={}),
    dict(cin=2, cout=3, k=3, x=(1, 2, 4, 3), kw=dict(stride=2, padding=1, output_padding=1)),
    dict(cin=4, cout=6, k=(2, 3), x=(2, 4, 3, 4), kw=dict(groups=2, stride=(2, 1))),
    dict(cin=2, cout=2, k=3, x=(1, 2, 3, 3),
         kw=dict(stride=3, output_padding=(2, 1), dilation=2, padding=1)),
    dict(cin=2, cout=4, k=2, x=(1, 2, 3, 4), kw=dict(groups=2, bias=False, stride=2)),
]


@pytest.mark.parametrize("case", CONVT_CASES, ids=lambda c: str(c["kw"]) or "plain")
def test_conv_transpose2d_gradients(case):
    conv = nn.ConvTranspose2d(case["cin"], case["cout"], case["k"], dtype=np.float64, rng=2,
                              **case["kw"])
    k = conv.kernel_size
    assert conv.weight.shape == (case["cin"], case["cout"] // conv.groups) + k
    check_layer(conv, randn(*case["x"]))


@pytest.mark.parametrize("kw", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1)),
    dict(kernel_size=3, stride=2, ceil_mode=True),
])
def test_maxpool2d_gradients(kw):
    check_layer(nn.MaxPool2d(**kw), distinct(2, 3, 7, 8))


@pytest.mark.parametrize("kw", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
    dict(kernel_size=(2, 3), stride=(1, 2), divisor_override=5),
])
def test_avgpool2d_gradients(kw):
    check_layer(nn.AvgPool2d(**kw), randn(2, 3, 7, 8))


@pytest.mark.parametrize("scale", [2, (2, 3), (1, 2), 2.0])
def test_upsample_gradients(scale):
    x = randn(2, 3, 3, 4)
    y, _ = check_layer(nn.Upsample(scale_factor=scale), x)
    s = scale if isinstance(scale, tuple) else (int(scale),) * 2
    assert y.shape == (2, 3, 3 * s[0], 4 * s[1])
    np.testing.assert_array_equal(y, x.repeat(s[0], axis=2).repeat(s[1], axis=3))


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (4,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(shape, bias):
    lin = nn.Linear(4, 3, bias=bias, dtype=np.float64, rng=3)
    x = randn(*shape)
    y, _ = check_layer(lin, x)
    expected = x @ lin.weight.data.T + (lin.bias.data if bias else 0)
    np.testing.assert_allclose(y, expected, rtol=1e-14, atol=1e-14)
    assert y.shape == shape[:-1] + (3,)


def test_relu_gradients():
    x = randn(3, 4, 5)
    x = np.sign(x) * (0.1 + np.abs(x))      # away from the kink at 0
    y, _ = check_layer(nn.ReLU(), x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_relu_forward_hard_inputs(dtype, threads):
    """nn.ReLU's forward (one kernel pass) equals np.maximum(x, 0) bit for bit, sign of zero
    included (-0 -> +0, NaN stays NaN, +-inf), on C, Fortran-order, strided and read-only
    inputs, a size of several 16384-value blocks with a tail, an empty batch and integers;
    the input is left as it was and the output is a new array."""
    r = np.random.default_rng(5)
    base = r.standard_normal(3 * 16384 + 77).astype(dtype)
    base[:6] = [np.nan, -0.0, 0.0, np.inf, -np.inf, -np.nan]
    inputs = [base.reshape(-1, 1), np.asfortranarray(base[:4096].reshape(64, 64)),
              base[::3], base.reshape(-1, 1)[:0]]
    ro = base.copy()
    ro.flags.writeable = False
    inputs.append(ro)
    old = fc.get_num_threads()
    fc.set_num_threads(threads)
    try:
        for x in inputs:
            before = x.copy()
            y = nn.ReLU()(x)
            want = np.maximum(x, 0)
            assert y.dtype == dtype and y.shape == x.shape
            assert not np.shares_memory(y, x)
            np.testing.assert_array_equal(y, want)
            np.testing.assert_array_equal(np.signbit(y), np.signbit(want))
            np.testing.assert_array_equal(x, before)
        xi = np.arange(-3, 4)
        np.testing.assert_array_equal(nn.ReLU()(xi), np.maximum(xi, 0))
    finally:
        fc.set_num_threads(old)


@pytest.mark.parametrize("kw,out", [({}, (2, 60)), (dict(start_dim=2), (2, 3, 20)),
                                    (dict(start_dim=1, end_dim=2), (2, 12, 5)),
                                    (dict(start_dim=0), (120,))])
def test_flatten_gradients(kw, out):
    y, _ = check_layer(nn.Flatten(**kw), randn(2, 3, 4, 5))
    assert y.shape == out


def test_dropout_train_gradients():
    p = 0.4
    x = randn(4, 5, 6) + 0.5
    layer = nn.Dropout(p, rng=123)
    # every forward of a Dropout seeded 123 draws the same mask, so the objective is smooth
    check_layer(layer, x, fwd=lambda a: nn.Dropout(p, rng=123)(a))
    # and directly: backward is mask * grad with mask in {0, 1/(1-p)}
    layer = nn.Dropout(p, rng=7)
    y = layer(x)
    kept = y != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-15)
    g = randn(4, 5, 6, seed=5)
    np.testing.assert_allclose(layer.backward(g), np.where(kept, g / (1 - p), 0), rtol=1e-15)


def test_dropout_eval_gradients():
    layer = nn.Dropout(0.5, rng=0).eval()
    x = randn(3, 4)
    y, _ = check_layer(layer, x)
    np.testing.assert_array_equal(y, x)
    g = randn(3, 4, seed=9)
    layer(x)
    np.testing.assert_array_equal(layer.backward(g), g)


def test_float32_layers_keep_dtype_and_match_float64():
    x = randn(2, 3, 8, 8).astype(np.float32)
    for make in (lambda dt: nn.Conv2d(3, 4, 3, padding=1, dtype=dt, rng=0),
                 lambda dt: nn.ConvTranspose2d(3, 4, 3, stride=2, dtype=dt, rng=0)):
        l32, l64 = make(np.float32), make(np.float64)
        y32, y64 = l32(x), l64(x.astype(np.float64))
        assert y32.dtype == np.float32 and l32.weight.dtype == np.float32
        np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
        g = np.ones_like(y32)
        gx32, gx64 = l32.backward(g), l64.backward(g.astype(np.float64))
        assert gx32.dtype == np.float32 and l32.weight.grad.dtype == np.float32
        np.testing.assert_allclose(gx32, gx64, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(l32.weight.grad, l64.weight.grad, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------ whole model

def test_sequential_cnn_gradients_against_finite_differences():
    model = small_cnn(np.float64, rng=3)
    assert all(p.dtype == np.float64 for p in model.parameters())
    x, t = batch(4, seed=2)
    loss_fn = nn.CrossEntropyLoss()

    def loss():
        return float(loss_fn(model(x), t))

    model.zero_grad()
    loss()
    gx = model.backward(loss_fn.backward())
    analytic = {n: p.grad.copy() for n, p in model.named_parameters()}
    assert list(analytic) == CNN_KEYS
    assert_grad_close(gx, numeric_grad(loss, x), "input gradient")
    for name, p in model.named_parameters():
        assert_grad_close(analytic[name], numeric_grad(loss, p.data), name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequential_fuses_conv2d_relu_with_the_same_numbers(dtype):
    """Sequential runs Conv2d -> ReLU as one fused call (the ReLU inside the convolution's
    work items, or one in-place pass for Winograd and depthwise); outputs and gradients are
    bit for bit those of the layers run one by one, with NaN, -0 and negative values."""
    rng = np.random.default_rng(8)
    for conv, shape in ((nn.Conv2d(3, 12, 5, padding=2, dtype=dtype, rng=1), (3, 3, 9, 11)),
                        (nn.Conv2d(16, 16, 3, padding=1, dtype=dtype, rng=2), (2, 16, 8, 8)),
                        (nn.Conv2d(6, 6, 3, padding=1, groups=6, dtype=dtype, rng=3),
                         (2, 6, 7, 7)),
                        (nn.Conv2d(8, 5, 1, bias=False, dtype=dtype, rng=4), (2, 8, 6, 6)),
                        (nn.Conv2d(4, 7, 3, stride=2, dtype=dtype, rng=5), (1, 4, 9, 9))):
        relu, flat = nn.ReLU(), nn.Flatten()
        model = nn.Sequential(conv, relu, flat)
        x = rng.uniform(-1, 1, shape).astype(dtype)
        x[0, 0, 1, 1] = np.nan
        x[-1, -1] = -0.0
        y = model(x)
        expected = np.maximum(conv.forward(x), 0, dtype=dtype).reshape(y.shape)
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(np.signbit(y), np.signbit(expected))
        assert np.isnan(y).any() and (y == 0).any()
        g = rng.uniform(-1, 1, y.shape).astype(dtype)
        model.zero_grad()
        model(x)
        gx = model.backward(g)
        grads = [p.grad.copy() for p in model.parameters()]
        model.zero_grad()
        conv.forward(x)                                   # unfused: one layer at a time
        relu.forward(conv.forward(x))
        flat.forward(relu._y)
        gx1 = conv.backward(relu.backward(flat.backward(g)))
        np.testing.assert_array_equal(gx, gx1)
        for a, b in zip(grads, [p.grad for p in model.parameters()]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequential_relu_maxpool_backward_is_fused_with_the_same_numbers(dtype):
    """Sequential's backward through ReLU -> MaxPool2d applies ReLU's mask to grad_out on the
    pooled values (the windows' maxima) and skips ReLU's own pass: gradients bit for bit those
    of the layers run one by one, with NaN, -0, windows of only non-positive values,
    overlapping and padded windows, ceil_mode, and after a fused Conv2d -> ReLU."""
    rng = np.random.default_rng(9)
    for pool, conv in ((nn.MaxPool2d(2), None), (nn.MaxPool2d(3, 2, padding=1), None),
                       (nn.MaxPool2d(2, ceil_mode=True), None),
                       (nn.MaxPool2d(2), nn.Conv2d(3, 4, 5, padding=2, dtype=dtype, rng=1))):
        relu, flat = nn.ReLU(), nn.Flatten()
        layers = ([conv] if conv is not None else []) + [relu, pool, flat]
        model = nn.Sequential(*layers)
        x = rng.uniform(-1, 1, (2, 3, 9, 11)).astype(dtype)
        x[0, 0, 1, 1] = np.nan
        x[0, 1, :4, :4] = -rng.uniform(0, 1, (4, 4))      # windows with no positive value
        x[-1, -1, 2:6, 2:6] = -0.0
        y = model(x)
        g = rng.uniform(-1, 1, y.shape).astype(dtype)
        model.zero_grad()
        gx = model.backward(g)
        grads = [p.grad.copy() for p in model.parameters()]
        model.zero_grad()
        h = x if conv is None else conv.forward(x)          # unfused: one layer at a time
        flat.forward(pool.forward(relu.forward(h)))
        gh = relu.backward(pool.backward(flat.backward(g)))
        gx1 = gh if conv is None else conv.backward(gh)
        np.testing.assert_array_equal(gx, gx1)
        np.testing.assert_array_equal(np.signbit(gx), np.signbit(gx1))
        for a, b in zip(grads, [p.grad for p in model.parameters()]):
            np.testing.assert_array_equal(a, b)
        assert (gh == 0).any() and (gh != 0).any()
    # a grad_out of the wrong shape (here one that would broadcast against the pooled values)
    # gets the max-pool's error, as without the fusion
    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    y = model(rng.uniform(-1, 1, (2, 3, 8, 8)).astype(dtype))
    with pytest.raises(ValueError, match="grad_out"):
        model.backward(np.ones((1,) + y.shape[1:], dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequential_fuses_conv2d_relu_maxpool_with_the_same_numbers(dtype):
    """Sequential runs Conv2d [-> ReLU] -> MaxPool2d whose windows tile the output as one
    call (each block pooled while in cache): outputs and gradients bit for bit those of the
    layers one by one, also under no_grad() (where the convolution's output is never
    stored), with odd sizes (rows past the last window dropped), NaN and -0; pools that do
    not tile (overlapping, padded, ceil_mode) and Winograd / depthwise convolutions take
    their own paths with the same numbers."""
    rng = np.random.default_rng(10)
    cases = ((nn.Conv2d(3, 12, 5, padding=2, dtype=dtype, rng=1), True, nn.MaxPool2d(2),
              (3, 3, 9, 11)),
             (nn.Conv2d(3, 8, 3, stride=2, dtype=dtype, rng=2), False, nn.MaxPool2d((3, 2)),
              (2, 3, 15, 12)),
             (nn.Conv2d(8, 5, 1, bias=False, dtype=dtype, rng=3), True,
              nn.MaxPool2d(2, stride=(2, 2)), (2, 8, 6, 7)),
             (nn.Conv2d(16, 16, 3, padding=1, dtype=dtype, rng=4), True, nn.MaxPool2d(2),
              (2, 16, 8, 8)),                                                   # Winograd
             (nn.Conv2d(6, 6, 3, padding=1, groups=6, dtype=dtype, rng=5), True,
              nn.MaxPool2d(2), (2, 6, 7, 7)),                                   # depthwise
             (nn.Conv2d(3, 4, 3, padding=1, dtype=dtype, rng=6), True, nn.MaxPool2d(3, 2),
              (2, 3, 9, 9)),                                                    # overlapping
             (nn.Conv2d(3, 4, 3, padding=1, dtype=dtype, rng=7), True,
              nn.MaxPool2d(2, ceil_mode=True), (2, 3, 9, 9)))
    for conv, with_relu, pool, shape in cases:
        relu, flat = nn.ReLU(), nn.Flatten()
        layers = [conv] + ([relu] if with_relu else []) + [pool, flat]
        model = nn.Sequential(*layers)
        x = rng.uniform(-1, 1, shape).astype(dtype)
        x[0, 0, 1, 1] = np.nan
        x[-1, -1, 2:6, 2:6] = -0.0
        h = conv.forward(x)                                 # unfused: one layer at a time
        if with_relu:
            h = relu.forward(h)
        expected = flat.forward(pool.forward(h))
        g = rng.uniform(-1, 1, expected.shape).astype(dtype)
        gh = pool.backward(flat.backward(g))
        gx1 = conv.backward(relu.backward(gh) if with_relu else gh)
        grads1 = [p.grad.copy() for p in model.parameters()]
        model.zero_grad()
        y = model(x)
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(np.signbit(y), np.signbit(expected))
        assert np.isnan(y).any()
        gx = model.backward(g)
        np.testing.assert_array_equal(gx, gx1)
        for a, b in zip(grads1, [p.grad for p in model.parameters()]):
            np.testing.assert_array_equal(a, b)
        model.zero_grad()
        with nn.no_grad():
            y2 = model(x)
        np.testing.assert_array_equal(y2, expected)
        assert all(m.__dict__.get(a) is None for m in layers for a in m._cache_attrs)


def test_no_grad_keeps_nothing_and_backward_says_so():
    """Under no_grad() modules keep no activations (nested and decorator forms restore the
    mode; it is per Python thread), and backward afterwards raises RuntimeError."""
    import threading
    model = small_cnn(np.float64, rng=2)
    x, _ = batch(3)
    y = model(x)
    assert nn.is_grad_enabled()
    with nn.no_grad():
        assert not nn.is_grad_enabled()
        with nn.no_grad():
            pass
        assert not nn.is_grad_enabled()
        seen = []
        t = threading.Thread(target=lambda: seen.append(nn.is_grad_enabled()))
        t.start()
        t.join()
        assert seen == [True]
        y2 = model(x)
    assert nn.is_grad_enabled()
    np.testing.assert_array_equal(y, y2)
    assert all(m.__dict__.get(a) is None for m in model for a in m._cache_attrs)
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward(np.ones_like(y))

    @nn.no_grad()
    def predict(inp):
        assert not nn.is_grad_enabled()
        return model(inp)

    np.testing.assert_array_equal(predict(x), y)
    assert nn.is_grad_enabled()
    model(x)                                     # and training works again afterwards
    assert model.backward(np.ones_like(y)).shape == x.shape


def test_double_converts_a_float32_model():
    m32 = small_cnn(np.float32, rng=4)
    m64 = small_cnn(np.float32, rng=4).double()
    assert m64.double() is m64
    assert all(p.dtype == np.float64 for p in m64.parameters())
    for (_, a), (_, b) in zip(m32.named_parameters(), m64.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    x, _ = batch(3)
    np.testing.assert_allclose(m32(x.astype(np.float32)), m64(x), rtol=1e-4, atol=1e-5)
    assert m64.float() is m64 and m64(x.astype(np.float32)).dtype == np.float32
    with pytest.raises(TypeError):
        m64.to(np.int32)


# ------------------------------------------------------------------ accumulation

def _grads(model):
    return {n: None if p.grad is None else p.grad.copy() for n, p in model.named_parameters()}


def test_gradients_accumulate_and_zero_grad():
    model = small_cnn(np.float64, rng=5)
    x, t = batch(4)
    loss_fn = nn.CrossEntropyLoss()
    assert all(p.grad is None for p in model.parameters())

    def step():
        loss_fn(model(x), t)
        return model.backward(loss_fn.backward())

    gx1 = step()
    g1 = _grads(model)
    gx2 = step()
    g2 = _grads(model)
    np.testing.assert_array_equal(gx1, gx2)    # input gradients are returned, not summed
    for n in g1:
        np.testing.assert_allclose(g2[n], 2 * g1[n], rtol=1e-14, atol=1e-15)

    held = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=False)
    for n, p in model.named_parameters():
        assert p.grad is held[n]                 # zeroed in place, same array
        assert not p.grad.any()
    step()
    for n, g in _grads(model).items():
        np.testing.assert_allclose(g, g1[n], rtol=1e-14, atol=1e-15)

    model.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=False)          # None stays None
    assert all(p.grad is None for p in model.parameters())
    step()
    model.zero_grad()                            # default: set_to_none=True as PyTorch 2
    assert all(p.grad is None for p in model.parameters())


def test_first_gradient_is_a_private_copy():
    lin = nn.Linear(3, 2, dtype=np.float64, rng=0)
    x = randn(4, 3)
    lin(x)
    lin.backward(np.ones((4, 2)))
    g = lin.bias.grad
    lin(x)
    lin.backward(np.ones((4, 2)))
    assert lin.bias.grad is g
    np.testing.assert_array_equal(g, [8.0, 8.0])


# ------------------------------------------------------------------ Sequential

def test_sequential_container():
    model = small_cnn()
    assert len(model) == 7
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[-1], nn.Linear)
    assert [type(m).__name__ for m in model] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d",
                                                 "ReLU", "Flatten", "Linear"]
    assert [n for n, _ in model.named_modules()] == ["", "0", "1", "2", "3", "4", "5", "6"]
    assert len(model.parameters()) == 6
    assert "(3): Conv2d(4, 6, kernel_size=(3, 3)" in repr(model)
    model.append(nn.ReLU())
    assert len(model) == 8 and list(model.state_dict()) == CNN_KEYS
    with pytest.raises(TypeError):
        nn.Sequential(nn.ReLU(), np.zeros(3))
    from collections import OrderedDict
    named = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 2, 3)), ("act", nn.ReLU())]))
    assert list(named.state_dict()) == ["conv.weight", "conv.bias"]


def test_sequential_slice_keeps_pytorch_names():
    # torch.nn.Sequential(...)[3:] keeps the original keys ('3.weight', ..., '6.weight')
    model = small_cnn()
    tail = model[3:]
    assert len(tail) == 4
    assert list(tail.state_dict()) == ["3.weight", "3.bias", "6.weight", "6.bias"]


def test_nested_state_dict_names():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Flatten(),
                          nn.Linear(2, 3, bias=False))
    assert list(model.state_dict()) == ["0.0.weight", "0.0.bias", "2.weight"]


# ------------------------------------------------------------------ state dicts

def test_state_dict_keys_shapes_and_copies():
    model = small_cnn()
    sd = model.state_dict()
    assert list(sd) == CNN_KEYS
    assert [v.shape for v in sd.values()] == [(4, 1, 3, 3), (4,), (6, 4, 3, 3), (6,), (5, 24),
                                             (5,)]
    assert all(v.dtype == np.float32 for v in sd.values())
    sd["0.weight"][...] = 0                      # a copy: the model is untouched
    assert model[0].weight.data.any()


def test_state_dict_round_trip_gives_identical_outputs():
    src, dst = small_cnn(rng=0), small_cnn(rng=1)
    x, _ = batch(3, dtype=np.float32)
    assert not np.array_equal(src(x), dst(x))
    sd = src.state_dict()
    assert dst.load_state_dict(sd) is dst
    np.testing.assert_array_equal(dst(x), src(x))
    for k, v in dst.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    sd["0.weight"] += 1                          # load copied: the model is untouched
    np.testing.assert_array_equal(dst(x), src(x))


def test_load_state_dict_casts_to_the_parameter_dtype():
    m32 = small_cnn(np.float32, rng=0)
    m64 = small_cnn(np.float64, rng=1)
    m32.load_state_dict(m64.state_dict())
    assert all(p.dtype == np.float32 for p in m32.parameters())
    np.testing.assert_array_equal(m32[0].weight.data, m64[0].weight.data.astype(np.float32))
    m32.load_state_dict({k: v.tolist() for k, v in m64.state_dict().items()})  # nested lists
    np.testing.assert_array_equal(m32[6].bias.data, m64[6].bias.data.astype(np.float32))


def test_save_and_load(tmp_path):
    src, dst = small_cnn(rng=0), small_cnn(rng=1)
    path = tmp_path / "model.npz"
    src.save(path)
    assert dst.load(path) is dst
    x, _ = batch(2, dtype=np.float32)
    np.testing.assert_array_equal(dst(x), src(x))
    with np.load(path) as f:
        assert sorted(f.files) == sorted(CNN_KEYS)
    dst2 = small_cnn(rng=2)
    dst2.load(str(path))
    np.testing.assert_array_equal(dst2(x), src(x))


def test_save_and_load_same_path_without_npz_suffix(tmp_path):
    # save(path) followed by load(path) must round-trip whatever the file name
    src, dst = small_cnn(rng=0), small_cnn(rng=1)
    path = tmp_path / "weights"
    src.save(path)
    dst.load(path)
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[k], v)


def _unchanged(model, before):
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_key_errors_and_strict_false():
    model = small_cnn(rng=0)
    before = model.state_dict()
    new = {k: v + 1 for k, v in small_cnn(rng=1).state_dict().items()}

    missing = dict(new)
    del missing["6.bias"]
    with pytest.raises(KeyError, match="6.bias"):
        model.load_state_dict(missing)
    _unchanged(model, before)

    extra = dict(new, **{"7.weight": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match="7.weight"):
        model.load_state_dict(extra)
    _unchanged(model, before)

    model.load_state_dict(missing, strict=False)     # loads what is there
    np.testing.assert_array_equal(model[0].weight.data, new["0.weight"])
    np.testing.assert_array_equal(model[6].bias.data, before["6.bias"])
    model.load_state_dict(extra, strict=False)       # ignores the unexpected key
    np.testing.assert_array_equal(model[6].bias.data, new["6.bias"])


def test_load_state_dict_shape_mismatch_loads_nothing():
    model = small_cnn(rng=0)
    before = model.state_dict()
    bad = {k: v + 1 for k, v in small_cnn(rng=1).state_dict().items()}
    bad["6.weight"] = np.zeros((5, 23), np.float32)     # a late key: earlier ones are valid
    with pytest.raises(ValueError, match=r"6\.weight"):
        model.load_state_dict(bad)
    _unchanged(model, before)
    with pytest.raises(ValueError):
        model.load_state_dict(bad, strict=False)
    _unchanged(model, before)
    bad["6.weight"] = np.zeros((5, 24, 1), np.float32)
    with pytest.raises(ValueError):
        model.load_state_dict(bad)
    _unchanged(model, before)


def test_load_state_dict_unconvertible_value_loads_nothing():
    # every value is checked before anything is copied: a value that cannot become a float
    # array (here strings, of the right shape) must leave the model as it was
    model = small_cnn(rng=0)
    before = model.state_dict()
    bad = {k: v + 1 for k, v in small_cnn(rng=1).state_dict().items()}
    bad["6.bias"] = np.array(["a", "b", "c", "d", "e"])
    with pytest.raises((ValueError, TypeError)):
        model.load_state_dict(bad)
    _unchanged(model, before)


# ------------------------------------------------------------------ initialisation

def _assert_uniform(a, bound, what, tight=True):
    a = np.asarray(a, np.float64)
    assert np.all(np.abs(a) <= bound * (1 + 1e-6)), f"{what}: outside +-{bound}"
    if tight:      # many samples: fills the interval with a uniform's mean and variance
        assert np.abs(a).max() > 0.98 * bound, what
        assert abs(a.mean()) < 4 * bound / math.sqrt(3 * a.size), what
        assert abs(a.var() / (bound ** 2 / 3) - 1) < 0.08, what
    else:
        assert np.abs(a).max() > 0.5 * bound, what


@pytest.mark.parametrize("make,fan_in", [
    (lambda **kw: nn.Conv2d(16, 32, 3, **kw), 16 * 9),
    (lambda **kw: nn.Conv2d(12, 40, (3, 5), groups=4, **kw), 3 * 15),
    (lambda **kw: nn.Conv2d(64, 64, 3, groups=64, **kw), 9),
    (lambda **kw: nn.ConvTranspose2d(16, 24, 3, **kw), 24 * 9),
    (lambda **kw: nn.ConvTranspose2d(32, 20, (2, 4), groups=4, stride=2, **kw), 5 * 8),
    (lambda **kw: nn.Linear(100, 60, **kw), 100),
])
def test_initialisation_bounds(make, fan_in):
    layer = make(rng=0)
    bound = 1 / math.sqrt(fan_in)
    assert layer.weight.dtype == np.float32 and layer.bias.dtype == np.float32
    _assert_uniform(layer.weight.data, bound, "weight")
    _assert_uniform(layer.bias.data, bound, "bias", tight=False)
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    assert layer.bias.shape == (out,)

    l64 = make(rng=0, dtype=np.float64)
    assert l64.weight.dtype == np.float64 and l64.bias.dtype == np.float64
    _assert_uniform(l64.weight.data, bound, "weight float64")
    # reproducible with an int seed, and with a Generator
    np.testing.assert_array_equal(make(rng=0).weight.data, layer.weight.data)
    np.testing.assert_array_equal(make(rng=0).bias.data, layer.bias.data)
    np.testing.assert_array_equal(make(rng=np.random.default_rng(0)).weight.data,
                                  layer.weight.data)
    assert not np.array_equal(make(rng=1).weight.data, layer.weight.data)


def test_manual_seed_reproducible():
    nn.manual_seed(1234)
    a = [nn.Conv2d(3, 4, 3), nn.Linear(5, 6), nn.ConvTranspose2d(2, 3, 2)]
    nn.manual_seed(1234)
    b = [nn.Conv2d(3, 4, 3), nn.Linear(5, 6), nn.ConvTranspose2d(2, 3, 2)]
    c = [nn.Conv2d(3, 4, 3), nn.Linear(5, 6), nn.ConvTranspose2d(2, 3, 2)]
    for la, lb, lc in zip(a, b, c):
        np.testing.assert_array_equal(la.weight.data, lb.weight.data)
        np.testing.assert_array_equal(la.bias.data, lb.bias.data)
        assert not np.array_equal(la.weight.data, lc.weight.data)
    # Dropout without its own rng draws from the manual_seed generator
    x = np.ones((50,))
    nn.manual_seed(7)
    m1 = nn.Dropout(0.5)(x)
    nn.manual_seed(7)
    m2 = nn.Dropout(0.5)(x)
    np.testing.assert_array_equal(m1, m2)


def test_bad_dtype_rejected():
    for make in (lambda: nn.Conv2d(1, 1, 1, dtype=np.int32),
                 lambda: nn.Linear(2, 2, dtype=np.float16),
                 lambda: nn.ConvTranspose2d(1, 1, 1, dtype=np.complex128)):
        with pytest.raises(TypeError):
            make()


# ------------------------------------------------------------------ modes and dropout

def test_train_eval_propagate():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Dropout(0.5), nn.ReLU()),
                          nn.Flatten())
    mods = [m for _, m in model.named_modules()]
    assert len(mods) == 6 and all(m.training for m in mods)
    assert model.eval() is model
    assert not any(m.training for m in mods)
    assert model.train() is model
    assert all(m.training for m in mods)
    model.train(False)
    assert not any(m.training for m in mods)
    model[1].train()                      # only that sub-tree
    assert model[1][0].training and not model.training and not model[0].training


def test_dropout_identity_in_eval():
    d = nn.Dropout(0.9, rng=0)
    x = randn(20, 30)
    d.eval()
    np.testing.assert_array_equal(d(x), x)
    d.train()
    assert (d(x) == 0).mean() > 0.8


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_p0_p1_and_statistics(dtype):
    x = (np.abs(randn(200, 50)) + 0.1).astype(dtype)
    g = randn(200, 50, seed=1).astype(dtype)
    d0 = nn.Dropout(0.0, rng=0)
    y = d0(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(d0.backward(g), g)
    d1 = nn.Dropout(1.0, rng=0)
    y = d1(x)
    assert y.dtype == dtype and y.shape == x.shape and not y.any()
    gx = d1.backward(g)
    assert not gx.any() and not np.isnan(gx).any()
    d = nn.Dropout(0.25, rng=0)
    y = d(x)
    assert y.dtype == dtype
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
    assert d.backward(g).dtype == dtype
    assert not np.array_equal(nn.Dropout(0.25, rng=1)(x) != 0, kept)
    # successive forwards draw fresh masks
    assert not np.array_equal(d(x) != 0, kept)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_dropout_bad_p(p):
    with pytest.raises(ValueError):
        nn.Dropout(p)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(3, 4, 3), (2, 5, 8, 8)),
    (nn.ConvTranspose2d(3, 4, 3), (2, 2, 6, 7)),
    (nn.Conv2d(3, 4, 3), (3, 8, 8)),
    (nn.Linear(6, 2), (4, 7)),
])
def test_wrong_input_channels(layer, shape):
    with pytest.raises(ValueError, match=r"got shape " + re_shape(shape)):
        layer(np.zeros(shape, np.float32))


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_sequential_reports_the_bad_shape():
    with pytest.raises(ValueError, match=re_shape((2, 3, 8, 8))):
        small_cnn()(np.zeros((2, 3, 8, 8), np.float32))


@pytest.mark.parametrize("layer", [
    nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(1, 2, 3), nn.MaxPool2d(2), nn.AvgPool2d(2),
    nn.Upsample(scale_factor=2), nn.Linear(2, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
    nn.Sequential(nn.Linear(2, 3), nn.ReLU()),
], ids=lambda m: type(m).__name__)
def test_backward_before_forward(layer):
    with pytest.raises(RuntimeError, match="before"):
        layer.backward(np.zeros((1, 2, 4, 4), np.float32))


@pytest.mark.parametrize("layer,x,g", [
    (nn.Linear(4, 3, dtype=np.float64), np.zeros((2, 4)), np.zeros((2, 4))),
    (nn.Conv2d(1, 2, 3, dtype=np.float64), np.zeros((1, 1, 5, 5)), np.zeros((1, 2, 4, 4))),
    (nn.ConvTranspose2d(1, 2, 3, dtype=np.float64), np.zeros((1, 1, 3, 3)),
     np.zeros((1, 2, 4, 4))),
    (nn.MaxPool2d(2), np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3))),
    (nn.AvgPool2d(2), np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3))),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_backward_with_wrong_grad_shape(layer, x, g):
    layer(x)
    with pytest.raises(ValueError):
        layer.backward(g)


def test_loss_backward_before_forward():
    with pytest.raises(RuntimeError):
        nn.CrossEntropyLoss().backward()


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(2, 4, 3, stride=0),
    lambda: nn.Conv2d(2, 4, 3, stride=(1, 0)),
    lambda: nn.Conv2d(2, 4, 0),
    lambda: nn.Conv2d(2, 4, 3, dilation=0),
    lambda: nn.Conv2d(2, 4, 3, padding=-1),
    lambda: nn.Conv2d(3, 4, 3, groups=2),          # in_channels not divisible
    lambda: nn.Conv2d(4, 3, 3, groups=2),          # out_channels not divisible
    lambda: nn.Conv2d(2, 4, 3, groups=0),
    lambda: nn.Conv2d(2, 4, 3, stride=2, padding="same"),
    lambda: nn.Conv2d(2, 4, 3, padding="full"),
    lambda: nn.Conv2d(0, 4, 3),
    lambda: nn.ConvTranspose2d(2, 4, 3, stride=0),
    lambda: nn.ConvTranspose2d(3, 4, 3, groups=2),
    lambda: nn.ConvTranspose2d(4, 3, 3, groups=2),
    lambda: nn.ConvTranspose2d(2, 4, 3, stride=2, output_padding=2),
    lambda: nn.ConvTranspose2d(2, 4, 3, padding="same"),
    lambda: nn.Linear(0, 3),
    lambda: nn.Upsample(scale_factor=2, mode="bilinear"),
    lambda: nn.Upsample(scale_factor=0),
    lambda: nn.Upsample(scale_factor=1.5),
    lambda: nn.CrossEntropyLoss(reduction="avg"),
])
def test_bad_constructor_arguments(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("make", [
    lambda: nn.MaxPool2d(2, stride=0), lambda: nn.MaxPool2d(2, padding=2),
    lambda: nn.AvgPool2d(0), lambda: nn.AvgPool2d(3, stride=(0, 1)),
])
def test_bad_pooling_arguments(make):
    # as PyTorch, pooling arguments may be checked at construction or at the first call
    with pytest.raises(ValueError):
        make()(np.zeros((1, 1, 6, 6), np.float32))


@pytest.mark.parametrize("make,xshape", [
    (lambda dt: nn.Conv2d(2, 3, 3, dtype=dt), (1, 2, 5, 5)),
    (lambda dt: nn.ConvTranspose2d(2, 3, 3, dtype=dt), (1, 2, 5, 5)),
    (lambda dt: nn.Linear(4, 3, dtype=dt), (2, 4)),
])
def test_dtype_mismatch(make, xshape):
    with pytest.raises(TypeError):
        make(np.float32)(np.zeros(xshape, np.float64))
    with pytest.raises(TypeError):
        make(np.float64)(np.zeros(xshape, np.float32))
    assert make(np.float64)(np.zeros(xshape, np.float64)).dtype == np.float64


def test_sequential_float32_model_rejects_float64_input():
    with pytest.raises(TypeError):
        small_cnn(np.float32)(np.zeros((1, 1, 8, 8)))


# ------------------------------------------------------------------ optimisation

def test_sgd_reduces_the_loss():
    model = small_cnn(np.float32, rng=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 1, 8, 8)).astype(np.float32)
    t = rng.integers(0, 5, 32)
    loss_fn = nn.CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(x), t)
        assert loss.dtype == np.float32
        losses.append(float(loss))
        model.backward(loss_fn.backward())
        opt.step()
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_sequential_backward_can_skip_the_input_gradient():
    from fastconv.models import small_cnn

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 1, 8, 8))
    full, lean = small_cnn(dtype=np.float64, rng=1), small_cnn(dtype=np.float64, rng=1)
    g = rng.standard_normal((3, 10))
    gx = full.backward(g) if full(x) is not None else None
    lean(x)
    assert lean.backward(g, need_input_grad=False) is None
    assert gx.shape == x.shape
    for (name, a), (_, b) in zip(full.named_parameters(), lean.named_parameters()):
        np.testing.assert_array_equal(a.grad, b.grad, err_msg=name)


@pytest.mark.parametrize("layer", [nn.Conv2d, nn.ConvTranspose2d])
@pytest.mark.parametrize("kernel_size, exc", [((), ValueError), ((1, 2, 3), ValueError),
                                              (0, ValueError), (2.5, TypeError)])
def test_conv_layers_validate_kernel_size(layer, kernel_size, exc):
    # found by the fuzz soak: () raised IndexError, (1, 2, 3) silently dropped the 3
    with pytest.raises(exc, match="kernel_size"):
        layer(1, 1, kernel_size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_kernel_matches_threshold_backward(dtype):
    """ReLU.backward's one-pass kernel: grad where the output is > 0 or NaN, else 0 (torch's
    threshold_backward), for contiguous and strided gradients, NaN and inf anywhere, and
    sizes around the kernel's block length."""
    r = np.random.default_rng(0)
    for n in (1, 7, 16384, 16385, 40000):
        x = r.standard_normal(n).astype(dtype)
        x[:: 97] = np.nan
        x[5:: 101] = 0.0
        g = r.standard_normal(2 * n).astype(dtype)[::2]        # strided
        g[3:: 89] = np.inf
        g[4:: 83] = np.nan
        relu = nn.ReLU()
        y = relu(x)
        got = relu.backward(g)
        want = np.where(y <= 0, dtype(0), g)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == dtype and got.flags.c_contiguous


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fresh_gradients_become_grad_without_a_copy(dtype):
    """The layers hand their kernels' new gradient arrays to Parameter.accumulate(fresh=True):
    on first use they become .grad (no copy); each parameter's grad is its own array, the
    right values (a second backward adds, a grad kept from before zero_grad() is left as it
    was), and a caller's array passed without fresh is still copied."""
    rng = np.random.default_rng(41)
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=dtype, rng=1)
    lin = nn.Linear(5, 6, dtype=dtype, rng=2)
    x = rng.standard_normal((2, 3, 6, 6)).astype(dtype)
    v = rng.standard_normal((3, 5)).astype(dtype)
    gy = rng.standard_normal((2, 4, 6, 6)).astype(dtype)
    gv = rng.standard_normal((3, 6)).astype(dtype)
    conv(x)
    conv.backward(gy)
    lin(v)
    lin.backward(gv)
    params = conv.parameters() + lin.parameters()
    grads = [p.grad.copy() for p in params]
    for p in params:
        assert p.grad.dtype == dtype and p.grad.shape == p.data.shape
        assert not np.may_share_memory(p.grad, p.data)
        for q in params:
            assert q is p or not np.may_share_memory(p.grad, q.grad)
    np.testing.assert_allclose(lin.weight.grad, gv.T @ v, rtol=1e-5)
    np.testing.assert_allclose(lin.bias.grad, gv.sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(conv.bias.grad, gy.sum(axis=(0, 2, 3)), rtol=1e-5)
    kept = [p.grad for p in params]
    conv.backward(gy)                           # accumulates in place
    lin.backward(gv)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-5)
    SGD(params, lr=0.1).zero_grad()
    conv(x)
    conv.backward(gy)
    lin(v)
    lin.backward(gv)
    for p, k, g in zip(params, kept, grads):
        assert p.grad is not k
        np.testing.assert_allclose(k, 2 * g, rtol=1e-5)     # the old grad untouched
        np.testing.assert_allclose(p.grad, g, rtol=1e-5)
    mine = np.ones(6, dtype)
    b = nn.Parameter(np.zeros(6, dtype))
    b.accumulate(mine)
    assert b.grad is not mine and not np.may_share_memory(b.grad, mine)
    b.accumulate(mine)
    np.testing.assert_array_equal(mine, np.ones(6, dtype))
