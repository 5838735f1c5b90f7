"""The Winograd F(2x2, 3x3) and F(2x2, 5x5) paths of conv2d (3x3 or 5x5, stride 1, dilation
1) against the naive reference.  fastconv takes them only for 16+ channels and 8x8+ outputs;
here the thresholds are lowered to 1 so that every shape goes through them (5x5: with at least
2 channels on one side): odd and tiny outputs (partial 2x2 tiles),
paddings larger than the kernel, groups, bias, both dtypes, one or more threads, and inputs
with infinities or NaN (those images fall back to im2col, whose results are the
definition's)."""
import contextlib
import os
import time
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
import fastconv.nn as nn
from fastconv import _kernels
from fastconv import functional as F
import reference as ref
from _helpers import close, num_threads, run_threads


@pytest.fixture
def everywhere(monkeypatch):
    monkeypatch.setattr(F, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(F, "_WINOGRAD_MIN_SIZE", 1)
    monkeypatch.setattr(F, "_WGRAD_WINO_MIN_SIZE", 1)


def test_thresholds_pick_winograd_only_where_it_pays(monkeypatch):
    x = np.zeros((1, 64, 32, 32), np.float32)
    for w in [(64, 64, 3, 3), (64, 64, 5, 5), (64, 32, 5, 5), (32, 16, 5, 5)]:
        geo = F._conv_setup("t", x[:, :w[1]], np.zeros(w), 1, 1, 1, 1)
        assert F._use_winograd(geo, np.zeros(w)), w
        # grad_x (channel roles swapped): 5x5 only for batches (its flipped kernel is
        # transformed anew every call)
        assert F._use_winograd(geo, np.zeros(w), backward=True) == (w[1] <= 2 * w[0]), w
        assert F._use_winograd(geo, np.zeros(w), backward=True, n=1) == (w[2] == 3), w
        assert F._use_winograd(geo, np.zeros(w), n=1), w      # forward: batch 1 too
    for w, kw in [((64, 64, 3, 3), dict(stride=2)), ((64, 64, 3, 3), dict(dilation=2)),
                  ((64, 64, 5, 5), dict(stride=2)), ((64, 64, 5, 5), dict(dilation=2)),
                  ((64, 64, 7, 7), {}), ((8, 8, 3, 3), {}), ((128, 32, 3, 3), {}),
                  ((16, 16, 5, 5), {}), ((128, 32, 5, 5), {})]:
        xx = x[:, :w[1]]
        geo = F._conv_setup("t", xx, np.zeros(w), kw.get("stride", 1), 1,
                            kw.get("dilation", 1), 1)
        assert not F._use_winograd(geo, np.zeros(w)), (w, kw)
    monkeypatch.setattr(F, "_WINOGRAD5", False)
    geo = F._conv_setup("t", x, np.zeros((64, 64, 5, 5)), 1, 1, 1, 1)
    assert not F._use_winograd(geo, np.zeros((64, 64, 5, 5)))


@pytest.mark.usefixtures("everywhere", "tiny_grain")
@given(n=st.integers(1, 3), cg=st.integers(1, 5), lg=st.integers(1, 5),
       groups=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       ph=st.integers(0, 4), pw=st.integers(0, 4), bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), threads=st.sampled_from([1, 2, 3]),
       chunk=st.sampled_from([0, 1, 2, 5]), k=st.sampled_from([3, 5]),
       seed=st.integers(0, 2**32 - 1))
def test_winograd_matches_reference(n, cg, lg, groups, h, w, ph, pw, bias, dtype, threads,
                                    chunk, k, seed):
    """chunk: tiles per chunk of an image (0: the default rule, whole images unless the
    images are fewer than twice the threads); 1, 2, 5 cut even these small images in many
    chunks, with a partial last one, spread over the threads of the caller-runs pool.  The
    5x5's blocks of 8 tiles cross tile rows and chunks end mid-block."""
    if h + 2 * ph < k or w + 2 * pw < k:
        return
    lg = min(lg, 2 * cg)            # fastconv keeps im2col when out-channels > 2x in-channels
    if k == 5:                      # (5x5: batches of 2 and more, 2+ channels on a side)
        n, cg, lg = max(n, 2), max(cg, 2), max(lg, 2)
    r = np.random.default_rng(seed)
    x = r.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    wt = r.uniform(-1, 1, (lg * groups, cg, k, k)).astype(dtype)
    b = r.uniform(-1, 1, lg * groups).astype(dtype) if bias else None
    geo = F._conv_setup("t", x, wt, 1, (ph, pw), 1, groups)
    assert F._use_winograd(geo, wt, n=n)
    with num_threads(threads), wino_chunk(chunk):
        got = fc.conv2d(x, wt, b, padding=(ph, pw), groups=groups)
    close(got, ref.conv2d(x, wt, b, padding=(ph, pw), groups=groups), np.dtype(dtype))


@contextlib.contextmanager
def wino_chunk(tiles):
    old = _kernels.set_wino_chunk(tiles)
    try:
        yield
    finally:
        _kernels.set_wino_chunk(old)


@pytest.mark.usefixtures("everywhere", "tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads,chunk", [(1, 0), (2, 0), (2, 1), (3, 4)])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("k", [3, 5])
def test_winograd_non_finite_inputs(dtype, threads, chunk, n, k):
    """inf - inf inside the transforms would give NaN where the convolution is +-inf: such
    images are convolved directly, and clean images in the same batch are not affected.
    With chunks, the first chunk of an image to run decides and the others follow, whichever
    thread runs them (the non-finite values sit in the last tiles' rows too)."""
    r = np.random.default_rng(3)
    x = r.standard_normal((4, 3, 6, 7)).astype(dtype)
    w = r.standard_normal((2, 3, k, k)).astype(dtype)
    x[0, 1, 2, 3] = np.inf
    x[1, 0, 0, 0] = -np.inf
    x[2, 2, 5, 6] = np.nan
    if n == 1:
        x = x[2:3]
    p = k // 2
    assert F._use_winograd(F._conv_setup("t", x, w, 1, p, 1, 1), w, n=len(x))
    with num_threads(threads), wino_chunk(chunk):
        got = fc.conv2d(x, w, padding=p)
    with np.errstate(invalid="ignore"):
        want = ref.conv2d(x, w, padding=p)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    ok = np.isfinite(want)
    close(got[ok], want[ok], np.dtype(dtype))
    if n == 4:
        close(got[3], want[3], np.dtype(dtype))


@pytest.mark.usefixtures("everywhere", "tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("h,w", [(16, 16), (16, 32), (32, 32)])
@pytest.mark.parametrize("k", [3, 5])
def test_winograd_padded_tile_rows(dtype, threads, h, w, k):
    """Tile counts whose rows of V and M would be a multiple of 512 bytes apart (64 tiles of
    doubles, 128 or 256 of floats) are laid out one cache line wider (col_ld): the
    transforms and the 16 GEMMs must agree on that stride, in the per-image path (2 images)
    and in the batch-1 path that shares an image between the threads."""
    r = np.random.default_rng(h * w + threads)
    for n in (1, 2):
        x = r.uniform(-1, 1, (n, 3, h, w)).astype(dtype)
        wt = r.uniform(-1, 1, (4, 3, k, k)).astype(dtype)
        b = r.uniform(-1, 1, 4).astype(dtype)
        with num_threads(threads):
            got = fc.conv2d(x, wt, b, padding=k // 2)
        close(got, ref.conv2d(x, wt, b, padding=k // 2), np.dtype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_default_thresholds_bench_shapes(dtype, monkeypatch):
    """The benchmark suite's shapes, at the default thresholds, against the im2col path
    (itself checked against the reference by the property tests; the naive reference is too
    slow at these sizes)."""
    r = np.random.default_rng(5)
    for n, c, l, hw, k in [(2, 64, 64, 32, 3), (1, 128, 128, 28, 3), (2, 16, 16, 9, 3),
                           (3, 32, 64, 14, 5), (2, 16, 32, 32, 5), (2, 64, 64, 28, 5)]:
        x = r.standard_normal((n, c, hw, hw)).astype(dtype)
        w = r.standard_normal((l, c, k, k)).astype(dtype) / (8 * k)
        b = r.standard_normal(l).astype(dtype)
        geo = F._conv_setup("t", x, w, 1, k // 2, 1, 1)
        assert F._use_winograd(geo, w, n=n)
        got = fc.conv2d(x, w, b, padding=k // 2)
        with monkeypatch.context() as m:
            m.setattr(F, "_WINOGRAD_MIN_CHANNELS", 10**9)
            want = fc.conv2d(x, w, b, padding=k // 2)
        close(got, want, np.dtype(dtype))


def test_wgrad_thresholds_pick_winograd_only_where_it_pays():
    x = np.zeros((1, 512, 32, 32), np.float32)
    for w, hw, kw in [((64, 64, 3, 3), 32, {}), ((16, 16, 3, 3), 32, {}),
                      ((16, 512, 3, 3), 7, {}), ((64, 64, 3, 3), 6, dict(padding=0)),
                      ((64, 64, 3, 3), 32, dict(padding=(0, 3))), ((64, 64, 3, 3), 32,
                      dict(n=1)), ((64, 32, 5, 5), 14, dict(padding=2)),
                      ((16, 32, 5, 5), 32, dict(padding=2)), ((64, 64, 5, 5), 8, {})]:
        geo = F._conv_setup("t", x[:, :w[1], :hw, :hw], np.zeros(w), 1, kw.get("padding", 1),
                            1, 1)
        assert F._use_winograd_wgrad(geo, np.zeros(w), kw.get("n", 2)), (w, hw, kw)
    for w, hw, kw in [((64, 64, 3, 3), 32, dict(stride=2)), ((64, 64, 3, 3), 32,
                      dict(dilation=2)), ((64, 64, 7, 7), 32, {}), ((64, 64, 1, 1), 32, {}),
                      ((8, 8, 3, 3), 32, {}), ((64, 3, 3, 3), 32, {}), ((3, 64, 3, 3), 32, {}),
                      ((64, 64, 3, 3), 3, {}), ((64, 64, 3, 3), 4, dict(padding=(0, 1))),
                      ((16, 16, 5, 5), 32, {}), ((64, 32, 5, 5), 14, dict(n=1)),
                      ((64, 64, 5, 5), 32, dict(stride=2)), ((64, 8, 5, 5), 32, {})]:
        geo = F._conv_setup("t", x[:, :w[1], :hw, :hw], np.zeros(w), kw.get("stride", 1),
                            kw.get("padding", 1), kw.get("dilation", 1), 1)
        assert not F._use_winograd_wgrad(geo, np.zeros(w), kw.get("n", 2)), (w, hw, kw)


@contextlib.contextmanager
def wgrad_split(chunk, most):
    """conv2d_winograd_wgrad's chunks: `chunk` tiles of an image (0: the default rule), at
    most `most` tiles when small images join one chunk."""
    old = _kernels.set_wgrad_wino_chunk(chunk), _kernels.set_wgrad_wino_k(most)
    try:
        yield
    finally:
        _kernels.set_wgrad_wino_chunk(old[0])
        _kernels.set_wgrad_wino_k(old[1])


@contextlib.contextmanager
def wgrad_calls():
    """The results (True: done by Winograd; False: an infinity or NaN, nothing written) of
    conv2d_winograd_wgrad's calls in the block."""
    seen, real = [], _kernels.conv2d_winograd_wgrad

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_kernels, "conv2d_winograd_wgrad", spy)
        yield seen


@pytest.mark.usefixtures("everywhere", "tiny_grain")
@given(n=st.integers(1, 5), cg=st.integers(1, 5), lg=st.integers(1, 5),
       groups=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9),
       ph=st.integers(0, 4), pw=st.integers(0, 4), need_x=st.booleans(),
       need_b=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       threads=st.sampled_from([1, 2, 3]), chunk=st.sampled_from([0, 1, 2, 5]),
       most=st.sampled_from([128, 1, 3, 20]), k=st.sampled_from([3, 5]),
       seed=st.integers(0, 2**32 - 1))
def test_winograd_wgrad_matches_reference(n, cg, lg, groups, h, w, ph, pw, need_x, need_b,
                                          dtype, threads, chunk, most, k, seed):
    """conv2d_backward's weight and bias gradients by the transposition of Winograd
    F(2x2, 3x3) and F(2x2, 5x5) (conv2d_winograd_wgrad): partial tiles at odd sizes,
    paddings past the kernel, groups, the threads' partial sums, an image cut in chunks of
    1, 2 or 5 tiles with a partial last one, or several small images joined into one chunk
    (most: at most that many tiles, a chunk of 1 image when fewer than 2 fit; the 5x5 input
    transform's stores past an image's last tile; float32 5x5: each chunk's products added
    to double sums), against the reference.  5x5: batches of 2 and more, 2+ channels on a
    side."""
    if h + 2 * ph < k or w + 2 * pw < k:
        return
    if k == 5:
        n, lg = max(n, 2), max(lg, 2)
    r = np.random.default_rng(seed)
    x = r.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    wt = r.uniform(-1, 1, (lg * groups, cg, k, k)).astype(dtype)
    geo = F._conv_setup("t", x, wt, 1, (ph, pw), 1, groups)
    if F._is_depthwise(geo, wt):            # (the depthwise kernels' own backward)
        return
    assert F._use_winograd_wgrad(geo, wt, n)
    gy = r.uniform(-1, 1, (n, lg * groups, geo["OH"], geo["OW"])).astype(dtype)
    with num_threads(threads), wgrad_split(chunk, most), wgrad_calls() as seen:
        gx, gw, gb = fc.conv2d_backward(gy, x, wt, padding=(ph, pw), groups=groups,
                                        output_mask=(need_x, True, need_b))
    assert seen == [True]
    want = ref.conv2d_backward(gy, x, wt, padding=(ph, pw), groups=groups)
    close(gw, want[1], np.dtype(dtype))
    if need_x:
        close(gx, want[0], np.dtype(dtype))
    else:
        assert gx is None
    if need_b:
        close(gb, want[2], np.dtype(dtype))
    else:
        assert gb is None


@pytest.mark.usefixtures("everywhere", "tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads,chunk,most", [(1, 0, 128), (2, 0, 128), (2, 1, 128),
                                                (3, 4, 128), (2, 0, 200)])
@pytest.mark.parametrize("where", ["x", "grad_out"])
@pytest.mark.parametrize("k", [3, 5])
def test_winograd_wgrad_non_finite_inputs(dtype, threads, chunk, most, where, k, monkeypatch):
    """An infinity or NaN in x or grad_out (in the last image, the last chunk's tiles, or
    the first image of a joined chunk): Winograd would mix it into NaN where the sums give
    +-inf, and into every tap; the kernel finds its result non-finite and says so, and
    conv2d_backward computes both gradients the usual way, bit for bit (for x: the reference's infinities
    and NaN, and its values elsewhere; a NaN in grad_out reaches, through im2col's zeros,
    the taps that the reference's loops skip at the padding too)."""
    r = np.random.default_rng(4)
    x = r.standard_normal((4, 3, 6, 7)).astype(dtype)
    w = r.standard_normal((2, 3, k, k)).astype(dtype)
    gy = r.standard_normal((4, 2, 6, 7)).astype(dtype)
    bad = x if where == "x" else gy
    p = k // 2
    bad[3, 1, 5, 6] = np.inf
    bad[0, 0, 2, 3] = -np.inf if most == 200 else 1.0
    bad[3, 0, 0, 1] = np.nan
    with num_threads(threads), wgrad_split(chunk, most), wgrad_calls() as seen:
        _, gw, gb = fc.conv2d_backward(gy, x, w, padding=p, output_mask=(False, True, True))
    assert seen == [False]
    monkeypatch.setattr(F, "_WGRAD_WINO", False)
    with num_threads(threads):
        usual = fc.conv2d_backward(gy, x, w, padding=p, output_mask=(False, True, True))
    np.testing.assert_array_equal(gw, usual[1])
    np.testing.assert_array_equal(gb, usual[2])
    assert np.isnan(gw).any() and np.isinf(gw).any()
    if where == "x":
        with np.errstate(invalid="ignore"):
            want = ref.conv2d_backward(gy, x, w, padding=p)
        np.testing.assert_array_equal(np.isnan(gw), np.isnan(want[1]))
        np.testing.assert_array_equal(np.isposinf(gw), np.isposinf(want[1]))
        np.testing.assert_array_equal(np.isneginf(gw), np.isneginf(want[1]))
        ok = np.isfinite(want[1])
        close(gw[ok], want[1][ok], np.dtype(dtype))
        close(gb, want[2], np.dtype(dtype))


@pytest.mark.usefixtures("everywhere")
@pytest.mark.parametrize("threads", [1, 2])
def test_winograd_wgrad_overflow_goes_the_usual_way(threads, monkeypatch):
    """Finite inputs whose Winograd terms overflow float32 (a 2e20 pixel meeting a 1.5e18
    gradient: the direct sums' largest term is 3e38, the transforms' sums of several such
    pass 3.4e38) while the direct sums do not: the kernel's result is not finite, and both
    gradients come the usual way, bit for bit."""
    r = np.random.default_rng(0)
    x = r.uniform(-1, 1, (1, 2, 6, 6)).astype(np.float32)
    gy = r.uniform(-1, 1, (1, 3, 6, 6)).astype(np.float32)
    w = np.zeros((3, 2, 3, 3), np.float32)
    x[0, 1, 2, 2], gy[0, 2, 2, 2] = 2e20, 1.5e18
    with num_threads(threads), wgrad_calls() as seen:
        got = fc.conv2d_backward(gy, x, w, padding=1)
    assert seen == [False]
    monkeypatch.setattr(F, "_WGRAD_WINO", False)
    with num_threads(threads):
        usual = fc.conv2d_backward(gy, x, w, padding=1)
    assert np.isfinite(usual[1]).all() and np.abs(usual[1]).max() > 1e38
    for a, b in zip(got, usual):
        np.testing.assert_array_equal(a, b)
    close(got[1], ref.conv2d_weight_grad_taps(gy, x, w.shape, padding=1), np.float32)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("h,w", [(16, 16), (16, 32), (32, 32), (8, 8)])
@pytest.mark.parametrize("k", [3, 5])
def test_winograd_wgrad_padded_tile_rows(dtype, threads, h, w, k):
    """Chunks whose rows of V and Z would be a multiple of 512 bytes apart (64 tiles of
    doubles, 128 or 256 of floats: one image, or several small ones joined) are laid out
    one cache line wider: the transforms and the GEMMs agree on that stride (against the
    reference's weight gradient by taps, the loops being too slow at these sizes)."""
    r = np.random.default_rng(h * w + threads)
    for n in (1, 2, 4, 8):
        x = r.uniform(-1, 1, (n, 16, h, w)).astype(dtype)
        wt = r.uniform(-1, 1, (32, 16, k, k)).astype(dtype)
        gy = r.uniform(-1, 1, (n, 32, h, w)).astype(dtype)
        with num_threads(threads), wgrad_calls() as seen:
            _, gw, gb = fc.conv2d_backward(gy, x, wt, padding=k // 2,
                                           output_mask=(False, True, True))
        assert seen == ([True] if k == 3 or n > 1 else [])
        close(gw, ref.conv2d_weight_grad_taps(gy, x, wt.shape, padding=k // 2),
              np.dtype(dtype), atol32=3e-5 if k == 5 else 1e-5)
        close(gb, gy.astype(np.float64).sum((0, 2, 3)), np.dtype(dtype))


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("n", [1, 3, 8])
def test_winograd_wgrad_is_deterministic(n):
    """The threads' partial sums follow fixed lanes of chunks, whichever thread runs a lane
    (a worker that wakes late leaves its items to the caller): repeated calls on 2 threads,
    also while other Python threads keep the pool busy, give the same bits."""
    r = np.random.default_rng(n)
    x = r.standard_normal((n, 16, 10, 9)).astype(np.float32)
    w = r.standard_normal((16, 16, 3, 3)).astype(np.float32)
    gy = r.standard_normal((n, 16, 10, 9)).astype(np.float32)

    def grads():
        return fc.conv2d_backward(gy, x, w, padding=1, output_mask=(False, True, True))[1:]
    with num_threads(2), wgrad_calls() as seen:
        first = grads()
        runs = [grads() for _ in range(20)] + sum(run_threads([grads] * 4, 3), [])
    assert all(seen)
    for got in runs:
        np.testing.assert_array_equal(got[0], first[0])
        np.testing.assert_array_equal(got[1], first[1])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,h,w,p", [(2, 14, 14, 2), (3, 9, 7, 0), (1, 8, 8, 3)])
def test_winograd5_wgrad_float32(threads, n, h, w, p):
    """conv2d_winograd_wgrad for 5x5 in float32, called directly, the kernel's scratch full
    of NaN: each chunk's products added to double sums keep its rounding within 3e-5 of the
    largest value of the reference (its float32 sums over every tile had reached 3e-5 on
    LeNet's conv2 at batch 64, 1.5e-5 on 16 -> 32 channels)."""
    r = np.random.default_rng(n * h + p)
    x = r.standard_normal((n, 16, h, w)).astype(np.float32)
    oh, ow = h + 2 * p - 4, w + 2 * p - 4
    gy = r.standard_normal((n, 32, oh, ow)).astype(np.float32)
    scratch = np.full((threads, _kernels.wgrad_wino_cols(n, 1, 16, 32, oh, ow, threads, 4, 5)),
                      np.nan, np.float32)
    gw = np.full((32, 16, 5, 5), np.nan, np.float32)
    gb = np.full(32, np.nan, np.float32)
    assert _kernels.conv2d_winograd_wgrad(gy, x, gw, gb, scratch, p, p, 1, threads)
    close(gw, ref.conv2d_weight_grad_taps(gy, x, gw.shape, padding=p), np.float32, atol32=3e-5)
    close(gb, gy.astype(np.float64).sum((0, 2, 3)), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_wgrad_default_thresholds_bench_shapes(dtype, monkeypatch):
    """Shapes like the benchmark suite's and a network's (many channels on small planes:
    several images a chunk), at the default thresholds and threads, against the im2col path
    (itself checked against the reference by the property tests)."""
    r = np.random.default_rng(6)
    for n, c, l, hw, k in [(2, 64, 64, 32, 3), (1, 128, 128, 28, 3), (9, 16, 16, 9, 3),
                           (8, 64, 32, 7, 3), (3, 256, 16, 4, 3), (1, 16, 64, 56, 3),
                           (16, 32, 64, 14, 5), (2, 64, 64, 28, 5), (3, 16, 32, 32, 5)]:
        x = r.standard_normal((n, c, hw, hw)).astype(dtype)
        w = r.standard_normal((l, c, k, k)).astype(dtype) / (8 * k)
        gy = r.standard_normal((n, l, hw, hw)).astype(dtype)
        assert F._use_winograd_wgrad(F._conv_setup("t", x, w, 1, k // 2, 1, 1), w, n)
        with wgrad_calls() as seen:
            got = fc.conv2d_backward(gy, x, w, padding=k // 2)
        assert seen == [True]
        with monkeypatch.context() as m:
            m.setattr(F, "_WGRAD_WINO", False)
            want = fc.conv2d_backward(gy, x, w, padding=k // 2)
        for a, b in zip(got, want):
            close(a, b, np.dtype(dtype), atol32=3e-5 if k == 5 else 1e-5)


@pytest.mark.usefixtures("everywhere", "tiny_grain")
@given(n=st.integers(1, 2), cg=st.integers(1, 4), lg=st.integers(1, 4),
       groups=st.integers(1, 2), h=st.integers(1, 8), w=st.integers(1, 8),
       ph=st.integers(0, 6), pw=st.integers(0, 6), need_w=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), threads=st.sampled_from([1, 2]),
       k=st.sampled_from([3, 5]), seed=st.integers(0, 2**32 - 1))
def test_winograd_backward_grad_x(n, cg, lg, groups, h, w, ph, pw, need_w, dtype, threads,
                                  k, seed):
    """conv2d_backward's grad_x as the Winograd convolution of grad_out by the flipped,
    transposed kernel with padding k - 1 - p (negative: cropping, when p > k - 1); 5x5 only
    for batches of 2 and more (which calls take it is asserted)."""
    if h + 2 * ph < k or w + 2 * pw < k:
        return
    if k == 5 and max(cg, lg) < 2:
        cg, lg = 2, 2
    r = np.random.default_rng(seed)
    x = r.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    wt = r.uniform(-1, 1, (lg * groups, cg, k, k)).astype(dtype)
    geo = F._conv_setup("t", x, wt, 1, (ph, pw), 1, groups)
    assert F._use_winograd(geo, wt, backward=True, n=n) == ((k == 3 or n >= 2)
                                                            and cg <= 2 * lg)
    gy = r.uniform(-1, 1, (n, lg * groups, geo["OH"], geo["OW"])).astype(dtype)
    with num_threads(threads):
        got = fc.conv2d_backward(gy, x, wt, padding=(ph, pw), groups=groups,
                                 output_mask=(True, need_w, True))
    want = ref.conv2d_backward(gy, x, wt, padding=(ph, pw), groups=groups)
    close(got[0], want[0], np.dtype(dtype))
    if need_w:
        close(got[1], want[1], np.dtype(dtype))
    close(got[2], want[2], np.dtype(dtype))



@pytest.mark.usefixtures("everywhere", "tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("h,w", [(30, 600), (9, 1001), (5, 2800)])
@pytest.mark.parametrize("k", [3, 5])
def test_winograd_wide_images(dtype, h, w, k):
    """Wide images: the input transform's zero-padded copy in blocks of tile rows (600 and
    1001 wide) and, when one tile row's padded rows do not fit (2800), the bounds-checked
    path; forward and grad_x (the correlation of grad_out with the flipped, transposed
    kernel, padding k - 1 - p; 5x5: a batch of 2, which grad_x needs), against the
    reference."""
    r = np.random.default_rng(h + w)
    n = 1 if k == 3 else 2
    x = r.uniform(-1, 1, (n, 2, h, w)).astype(dtype)
    wt = r.uniform(-1, 1, (3, 2, k, k)).astype(dtype)
    flipped = np.ascontiguousarray(wt[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    for p in ((k // 2, k // 2), (0, k - 1), (k - 1, 0)):
        geo = F._conv_setup("t", x, wt, 1, p, 1, 1)
        assert F._use_winograd(geo, wt, n=n) and F._use_winograd(geo, wt, backward=True, n=n)
        close(fc.conv2d(x, wt, padding=p), ref.conv2d_taps(x, wt, padding=p), np.dtype(dtype))
        gy = r.uniform(-1, 1, (n, 3, geo["OH"], geo["OW"])).astype(dtype)
        got = fc.conv2d_backward(gy, x, wt, padding=p, output_mask=(True, False, False))[0]
        close(got, ref.conv2d_taps(gy, flipped, padding=(k - 1 - p[0], k - 1 - p[1])),
              np.dtype(dtype))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_pool_after_fork(dtype):
    """The caller-runs pool's workers do not survive fork(): a child that convolves on 2
    threads after the parent did must start its own (not wait forever for the parent's) and
    get the parent's numbers."""
    r = np.random.default_rng(11)
    x = r.standard_normal((1, 16, 12, 12)).astype(dtype)
    w = r.standard_normal((16, 16, 3, 3)).astype(dtype)
    assert F._use_winograd(F._conv_setup("t", x, w, 1, 1, 1, 1), w)
    with num_threads(2), warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process may deadlock the child:
        # that is the very thing checked here
        warnings.simplefilter("ignore", DeprecationWarning)
        want = fc.conv2d(x, w, padding=1)
        pid = os.fork()
        if pid == 0:                                  # the child: never return to pytest
            code = 3
            try:
                code = 0 if np.array_equal(fc.conv2d(x, w, padding=1), want) else 1
            finally:
                os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in conv2d")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    close(want, ref.conv2d(x, w, padding=1), np.dtype(dtype))


@pytest.fixture
def wino_cache(monkeypatch):
    """An empty Winograd weight cache for this thread (restored after)."""
    monkeypatch.setattr(F, "_wino_cache", __import__("threading").local())
    return F


def _spy_ready(monkeypatch):
    """Records the kernel's ready flag (whether it reused the cached transform) per call."""
    seen = []
    real = _kernels.conv2d_winograd_forward

    def spy(*args):
        seen.append(bool(args[12]) if len(args) >= 13 else False)      # (ready, relu)
        return real(*args)
    monkeypatch.setattr(_kernels, "conv2d_winograd_forward", spy)
    return seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.usefixtures("everywhere")
def test_winograd_weight_cache(dtype, threads, wino_cache, monkeypatch):
    """Small batches reuse the transform of the same weight bytes from an array's second call
    on (the kernel is told so), and every change to the weights is seen: in place (one value, the last one, a 0 made
    -0, all of them as an optimizer step does), another array at the same address, arrays
    alternating, a view of the same memory; weights that change call after call skip the
    cache for _WINO_SKIP calls; results always the reference's."""
    ready = _spy_ready(monkeypatch)
    r = np.random.default_rng(3)
    x = r.uniform(-1, 1, (1, 5, 6, 5)).astype(dtype)
    w = r.uniform(-1, 1, (9, 5, 3, 3)).astype(dtype)
    w2 = r.uniform(-1, 1, (9, 5, 3, 3)).astype(dtype)
    b = r.uniform(-1, 1, 9).astype(dtype)

    def check(weight, expect_ready):
        with num_threads(threads):
            got = fc.conv2d(x, weight, b, padding=1)
        assert ready[-1] == expect_ready
        close(got, ref.conv2d(x, weight, b, padding=1), np.dtype(dtype))
        return got

    monkeypatch.setattr(F, "_WINO_SKIP", 2)
    first = check(w, False)                                   # first sight: noted only
    np.testing.assert_array_equal(check(w, False), first)      # second: kept
    np.testing.assert_array_equal(check(w, True), first)       # the same numbers
    w[3, 2, 1, 1] += 0.5                                      # one value changed in place
    check(w, False)
    check(w, True)
    w[-1, -1, -1, -1] = -w[-1, -1, -1, -1]                    # the very last one
    check(w, False)
    check(w, True)
    w[0, 0, 0, 0] = 0.0
    check(w, False)
    check(w, True)
    w[0, 0, 0, 0] = -0.0                                      # only the sign bit differs
    check(w, False)
    check(w, True)
    w -= 0.01 * w2                                            # SGD-like steps, every call:
    check(w, False)
    w -= 0.01 * w2
    check(w, False)                                           # changed twice in a row:
    w -= 0.01 * w2
    check(w, False)                                           # _WINO_SKIP calls uncached,
    check(w, False)
    check(w, False)                                           # then kept again
    check(w, True)
    check(w2, False)                                          # alternating arrays
    check(w, True)
    check(w2, False)
    check(w, True)
    check(w2, True)
    check(w[...], True)                                       # a view: same memory, same bytes
    old = w.copy()
    del w
    w3 = r.uniform(-1, 1, old.shape).astype(dtype)            # perhaps at the freed address
    check(w3, False)
    # larger batches and converted weights (a copy each call) are not cached
    xb = r.uniform(-1, 1, (F._WINO_CACHE_MAX_N + 1, 5, 6, 5)).astype(dtype)
    for _ in range(2):
        with num_threads(threads):
            got = fc.conv2d(xb, w2, b, padding=1)
        assert ready[-1] is False
        close(got, ref.conv2d(xb, w2, b, padding=1), np.dtype(dtype))
    wl = w2.astype(np.float32 if dtype == np.float64 else np.float64)
    with pytest.raises(TypeError):
        fc.conv2d(x, wl, b, padding=1)                        # mixed dtypes stay an error
    wf = np.asfortranarray(w2)
    for _ in range(2):
        with num_threads(threads):
            got = fc.conv2d(x, wf, b, padding=1)
        assert ready[-1] is False
        close(got, ref.conv2d(x, wf, b, padding=1), np.dtype(dtype))


@pytest.mark.usefixtures("everywhere")
def test_winograd_weight_cache_is_bounded(wino_cache, monkeypatch):
    """Least recently used entries leave once the cache holds more than _WINO_CACHE_BYTES;
    an entry bigger than that is never kept; results stay the reference's."""
    ready = _spy_ready(monkeypatch)
    r = np.random.default_rng(4)
    x = r.uniform(-1, 1, (1, 4, 5, 5)).astype(np.float32)
    ws = [r.uniform(-1, 1, (6, 4, 3, 3)).astype(np.float32) for _ in range(4)]
    for _ in range(2):
        fc.conv2d(x, ws[0], padding=1)                        # kept from its second call
    one = sum(e["bytes"] for e in F._wino_cache.entries.values())
    assert one > 0
    monkeypatch.setattr(F, "_WINO_CACHE_BYTES", 2 * one)
    for w in ws:
        for _ in range(2):
            close(fc.conv2d(x, w, padding=1), ref.conv2d(x, w, padding=1),
                  np.dtype(np.float32))
    assert len(F._wino_cache.entries) == 2
    fc.conv2d(x, ws[3], padding=1)
    assert ready[-1] is True                                  # the most recent: kept
    fc.conv2d(x, ws[0], padding=1)
    assert ready[-1] is False                                 # the oldest: evicted
    monkeypatch.setattr(F, "_WINO_CACHE_BYTES", one - 1)
    F._wino_cache.entries.clear()
    for _ in range(3):
        close(fc.conv2d(x, ws[1], padding=1), ref.conv2d(x, ws[1], padding=1),
              np.dtype(np.float32))
        assert ready[-1] is False
    assert len(F._wino_cache.entries) == 0


@pytest.mark.usefixtures("everywhere")
def test_winograd_weight_cache_per_thread(wino_cache):
    """Python threads keep their own caches: concurrent batch-1 calls with weights that one
    thread changes in place between its calls give every thread the reference's numbers."""
    r = np.random.default_rng(5)
    x = r.uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)

    def work(seed):
        rr = np.random.default_rng(seed)
        w = rr.uniform(-1, 1, (6, 4, 3, 3)).astype(np.float32)

        def call():
            for i in range(20):
                if i % 3 == 2:
                    w[...] *= 1.5
                np.testing.assert_allclose(fc.conv2d(x, w, padding=1),
                                           ref.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
        return call
    run_threads([work(s) for s in range(3)], 1)


@pytest.mark.usefixtures("everywhere")
def test_winograd_weight_cache_new_array_each_call(wino_cache, monkeypatch):
    """Weights made anew for every call (w = w - lr * g) are noted, not kept, on first
    sight (only addresses that NumPy's allocator hands out again get entries), never taken
    for ready, and every result is the reference's; the kept bytes stay under the bound."""
    ready = _spy_ready(monkeypatch)
    r = np.random.default_rng(6)
    x = r.uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    w = r.uniform(-1, 1, (6, 4, 3, 3)).astype(np.float32)
    g = r.uniform(-1, 1, w.shape).astype(np.float32)
    for _ in range(12):
        w = w - np.float32(0.01) * g
        close(fc.conv2d(x, w, padding=1), ref.conv2d(x, w, padding=1), np.dtype(np.float32))
        assert ready[-1] is False
    entries = getattr(F._wino_cache, "entries", {})
    assert len(entries) < 12
    assert sum(e["bytes"] for e in entries.values()) <= F._WINO_CACHE_BYTES


@pytest.mark.usefixtures("everywhere")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_weight_cache_follows_levels(dtype, wino_cache, monkeypatch):
    """The packed weights follow the GEMM level's packing (and the transform the SIMD
    levels): the same array, same bytes, under another level is transformed again
    (transform_tag is in the key), with the reference's results at every level."""
    ready = _spy_ready(monkeypatch)
    levels = [lv for lv in ("avx512", "avx2", "blas") if _kernels.set_gemm(lv) == lv]
    r = np.random.default_rng(7)
    x = r.uniform(-1, 1, (1, 5, 7, 6)).astype(dtype)
    w = r.uniform(-1, 1, (10, 5, 3, 3)).astype(dtype)
    old512 = _kernels.set_simd512(True)
    has512 = _kernels.set_simd512(True)     # (on only where the CPU has AVX-512)
    try:
        for i, lv in enumerate(levels + levels[:1]):
            for simd512 in (True, False) if has512 else (True,):
                _kernels.set_gemm(lv)
                _kernels.set_simd512(simd512)
                for k in range(3):
                    close(fc.conv2d(x, w, padding=1), ref.conv2d(x, w, padding=1),
                          np.dtype(dtype))
                # new levels: noted, kept, reused; the first level again: still kept
                assert ready[-3:] == ([True] * 3 if i == len(levels) else [False, False, True])
    finally:
        _kernels.set_gemm(levels[0])
        _kernels.set_simd512(old512)


@pytest.mark.usefixtures("everywhere", "tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_winograd5_fused_relu(dtype, threads):
    """Conv2d -> ReLU (nn.Sequential's fused call) by F(2x2, 5x5) applies the ReLU in the
    output transform: against the reference's max(y, 0), odd output sizes (partial tiles),
    an image holding a NaN (convolved directly, then the ReLU: NaN kept where its windows
    reach) beside clean ones, and as nn.Sequential's layers."""
    r = np.random.default_rng(21)
    x = r.uniform(-1, 1, (3, 4, 9, 7)).astype(dtype)
    w = r.uniform(-1, 1, (6, 4, 5, 5)).astype(dtype)
    b = r.uniform(-1, 1, 6).astype(dtype)
    x[1, 2, 4, 3] = np.nan
    assert F._use_winograd(F._conv_setup("t", x, w, 1, 2, 1, 1), w, n=3)
    with np.errstate(invalid="ignore"):
        want = np.maximum(ref.conv2d(x, w, b, padding=2), 0)
    with num_threads(threads):
        got = F._conv2d(x, w, b, 1, 2, 1, 1, None, True)
        layers = nn.Sequential(nn.Conv2d(4, 6, 5, padding=2, dtype=dtype), nn.ReLU())
        layers[0].weight.data[...] = w
        layers[0].bias.data[...] = b
        seq = layers(x)
    for y in (got, seq):
        np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
        ok = ~np.isnan(want)
        assert (y[ok] >= 0).all()
        close(y[ok], want[ok], np.dtype(dtype))


@pytest.mark.usefixtures("everywhere", "tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("hw", [(9, 7), (8, 12)])
def test_winograd5_fused_pool(dtype, threads, relu, keep, hw):
    """Conv2d [-> ReLU] -> MaxPool2d(2) (nn.Sequential's fused call) by F(2x2, 5x5) pools
    each output tile (one window) in the output transform, the convolution's output stored
    only with keep: bit for bit the unfused Winograd call then max_pool2d, close to the
    reference; odd sizes (the last tile row / column outside the floor-mode windows), an
    image with a NaN (convolved directly into the scratch when the output is not kept, then
    pooled: NaN kept) beside clean ones; and as nn.Sequential's layers in inference and
    training mode."""
    r = np.random.default_rng(22)
    x = r.uniform(-1, 1, (3, 4) + hw).astype(dtype)
    w = r.uniform(-1, 1, (6, 4, 5, 5)).astype(dtype)
    b = r.uniform(-1, 1, 6).astype(dtype)
    x[1, 2, 4, 3] = np.nan
    assert F._use_winograd(F._conv_setup("t", x, w, 1, 2, 1, 1), w, n=3)
    with np.errstate(invalid="ignore"):
        y = ref.conv2d(x, w, b, padding=2)
        want = ref.max_pool2d(np.maximum(y, 0) if relu else y, 2)
    with num_threads(threads):
        y_got, got = F._conv2d(x, w, b, 1, 2, 1, 1, None, relu, (2, 2), keep)
        y_sep = F._conv2d(x, w, b, 1, 2, 1, 1, None, relu)
        sep = fc.max_pool2d(y_sep, 2)
        layers = nn.Sequential(nn.Conv2d(4, 6, 5, padding=2, dtype=dtype),
                               *([nn.ReLU()] if relu else []), nn.MaxPool2d(2))
        layers[0].weight.data[...] = w
        layers[0].bias.data[...] = b
        with nn.no_grad():
            seq_inf = layers(x)
        seq_train = layers(x)
    assert (y_got is not None) == keep
    if keep:
        np.testing.assert_array_equal(y_got, y_sep)
    for p in (got, seq_inf, seq_train):
        np.testing.assert_array_equal(p, sep)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    close(got[ok], want[ok], np.dtype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [3, 5])
def test_winograd_plans(dtype, k):
    """conv2d's Winograd calls keep a plan (F._WinoPlan: the second call with the same shapes,
    dtypes and arguments skips the checks and choices): bit for bit the call without one
    (_PLANS emptied first), with ReLU, the fused pool (5x5, kept or not), a bias or none,
    Fortran-order and int inputs, new weight values in place (the transform cache sees
    them), 1 and 2 threads; against the reference."""
    rng = np.random.default_rng(41 + k)
    plans = F._PLANS
    cin, cout, p = (16, 32, (2, 1)) if k == 5 else (16, 16, (1, 0))   # (pT != pL)

    def fresh(*args, **kw):
        plans.clear()
        return F._conv2d(*args, **kw)

    for step, threads in enumerate((1, 2, 1)):
        x = rng.uniform(-1, 1, (1 + step, cin, 10, 11)).astype(dtype)
        w = rng.uniform(-1, 1, (cout, cin, k, k)).astype(dtype)
        b = rng.uniform(-1, 1, cout).astype(dtype) if step != 1 else None
        xs = [x, np.asfortranarray(x), (x * 4).astype(np.int32)][step]
        geo = F._conv_setup("t", x, w, 1, p, 1, 1)
        assert F._use_winograd(geo, w, n=len(x))
        with num_threads(threads):
            for relu in (False, True):
                want = ref.conv2d_taps(xs, w, b, padding=p)
                want = np.maximum(want, 0) if relu else want
                args = (xs, w, b, 1, p, 1, 1, None, relu)
                first = fresh(*args)
                assert [type(v) for v in plans.values()] == [F._WinoPlan]
                for _ in range(3):                  # (the transform kept from call 2 on)
                    np.testing.assert_array_equal(F._conv2d(*args), first)
                close(first, want, dtype, atol32=1e-4)
                w[3] = -w[3]                        # new values, same plan and array
                want = ref.conv2d_taps(xs, w, b, padding=p)
                want = np.maximum(want, 0) if relu else want
                close(F._conv2d(*args), want, dtype, atol32=1e-4)
                if k == 5:
                    for keep in (True, False):
                        one = fresh(*args, pool=(2, 2), keep=keep)
                        two = F._conv2d(*args, pool=(2, 2), keep=keep)
                        assert (two[0] is None) == (one[0] is None) == (not keep)
                        if keep:
                            np.testing.assert_array_equal(two[0], one[0])
                        np.testing.assert_array_equal(two[1], one[1])
                        close(two[1], ref.max_pool2d(want, 2), dtype, atol32=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd5_batch1_changing_weights_go_direct(dtype, monkeypatch):
    """A 5x5 on one image whose weights change call after call (training) runs the direct
    kernels (or the GEMM) while the transform cache skips that array (_WINO_SKIP calls,
    counted down by those calls too), then Winograd again; the plan of each path kept side
    by side (the second call of each is planned); results always the reference's."""
    if _kernels.gemm_level() == "blas":
        pytest.skip("no own GEMM: no plans")
    monkeypatch.setattr(F, "_WINO_SKIP", 3)
    F._wino_cache.__dict__.clear()
    F._PLANS.clear()
    paths = []
    for name, tag in (("_conv2d_wino", "wino"), ("_conv2d_own", "own")):
        real = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _r=real, _t=tag, **k: paths.append(_t)
                            or _r(*a, **k))
    r = np.random.default_rng(5)
    x = r.uniform(-1, 1, (1, 16, 10, 11)).astype(dtype)
    w = r.uniform(-1, 1, (32, 16, 5, 5)).astype(dtype)
    b = r.uniform(-1, 1, 32).astype(dtype)
    for step in range(12):
        if step >= 2:
            w -= 0.01 * np.sign(w)                  # an optimizer step between calls
        got = F._conv2d(x, w, b, 1, 2, 1, 1, None, True)
        close(got, np.maximum(ref.conv2d_taps(x, w, b, padding=2), 0), dtype, atol32=1e-4)
    # calls 1-2 noted / kept, 3 changed once, 4 twice (the skip starts), 5-7 skipped
    # (direct), 8 Winograd again (kept anew), 9 changed once, 10 twice, 11-12 direct
    assert paths == ["wino"] * 4 + ["own"] * 3 + ["wino"] * 3 + ["own"] * 2, str(paths)
    kinds = sorted(type(p).__name__ for p in F._PLANS.values())
    assert kinds == ["_ConvPlan", "_WinoPlan"], kinds
