"""fastconv's own GEMM (_gemm.h: AVX-512F and AVX2+FMA micro-kernels, vector im2col) at every
level this CPU has, and BLAS, against the reference: shapes that reach the kernel's edges
(rows past a multiple of MR, columns past a multiple of NR, K past the K block of 128, output
rows wider than a vector), groups, strides, dilations, paddings, bias, both dtypes, one and two
threads (with fewer images than threads the threads share each image's GEMM by panels)."""
import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import _kernels
from fastconv import functional as F
import reference as ref
from _helpers import close as _close, num_threads

LEVELS = [lv for lv in ("blas", "avx2", "avx512")
          if _kernels.set_gemm(lv) == lv or lv == "blas"]
_kernels.set_gemm("avx512")
BEST = _kernels.gemm_level()
# the own GEMM's levels here (a skipped placeholder where there is none)
OWN_LEVELS = [lv for lv in LEVELS if lv != "blas"] or [
    pytest.param("none", marks=pytest.mark.skip("no own GEMM here"))]


# each level; "-masked": im2col always by masked loads, never through the zero-padded copy of
# the rows that small images take
VARIANTS = LEVELS + [lv + "-masked" for lv in LEVELS if lv != "blas"]


@contextlib.contextmanager
def gemm_at(variant):
    level, _, masked = variant.partition("-")
    _kernels.set_gemm(level)
    old = _kernels.set_im2col_padded(not masked)
    try:
        yield
    finally:
        _kernels.set_gemm(BEST)
        _kernels.set_im2col_padded(old)


@pytest.fixture(params=VARIANTS)
def level(request):
    with gemm_at(request.param):
        yield request.param.partition("-")[0]


def close(actual, expected, dtype):
    # sums over up to 1000 float32 products: a little more absolute slack than elsewhere
    _close(actual, expected, dtype, atol32=2e-5)


def test_levels_report_what_is_in_use():
    assert BEST in ("blas", "avx2", "avx512")
    assert _kernels.set_gemm("blas") == "blas"
    assert _kernels.gemm_packed_size(10, 7) == 0
    _kernels.set_gemm(BEST)
    if BEST != "blas":
        mr = 8 if BEST == "avx512" else 6
        assert _kernels.gemm_packed_size(10, 7) == -(-10 // mr) * mr * 7


@given(n=st.integers(1, 2), c=st.integers(1, 4), l=st.integers(1, 4),
       h=st.integers(1, 6), w=st.integers(1, 6), k=st.integers(1, 3),
       groups=st.integers(1, 2), bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_taps_reference_is_the_loop_reference(n, c, l, h, w, k, groups, bias, dtype, seed):
    """The slice-and-einsum reference used for big shapes below is the loop reference."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c * groups, h + k, w + k))
    wt = rng.standard_normal((l * groups, c, k, k))
    b = rng.standard_normal(l * groups) if bias else None
    for kw in (dict(padding=1), dict(stride=2, dilation=(1, 2), padding=(0, 2))):
        np.testing.assert_allclose(ref.conv2d_taps(x, wt, b, groups=groups, **kw),
                                   ref.conv2d(x, wt, b, groups=groups, **kw), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", VARIANTS)
@given(data=st.data())
def test_conv2d_big_shapes_match_reference(level, data):
    draw = data.draw
    groups = draw(st.integers(1, 2), label="groups")
    cg = draw(st.integers(1, 40), label="in_per_group")       # K = cg * kH * kW up to 1000
    lg = draw(st.integers(1, 20), label="out_per_group")      # rows: MR tails
    kh, kw = draw(st.integers(1, 5), label="kH"), draw(st.integers(1, 5), label="kW")
    s = draw(st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2), (2, 1)]), label="stride")
    d = draw(st.sampled_from([(1, 1), (1, 1), (2, 1)]), label="dilation")
    p = (draw(st.integers(0, 3), label="pH"), draw(st.integers(0, 3), label="pW"))
    h = max(1, d[0] * (kh - 1) + 1 - 2 * p[0]) + draw(st.integers(0, 6), label="dh")
    w = max(1, d[1] * (kw - 1) + 1 - 2 * p[1]) + draw(st.integers(0, 40), label="dw")
    n = draw(st.integers(1, 3), label="N")
    threads = draw(st.integers(1, 2), label="threads")
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    rng = np.random.default_rng(draw(st.integers(0, 2**31), label="seed"))
    x = rng.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (lg * groups, cg, kh, kw)).astype(dtype)
    b = rng.uniform(-1, 1, lg * groups).astype(dtype) if draw(st.booleans(), "bias") else None
    kwargs = dict(stride=s, padding=p, dilation=d, groups=groups)
    with num_threads(threads), gemm_at(level):
        y = fc.conv2d(x, wt, b, **kwargs)
    close(y, ref.conv2d_taps(x, wt, b, **kwargs), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [
    # (N, C, H, W, L, k, padding): K = 300 and 1200 cross the K block; L = 17 and 9 leave
    # row tails; 37 and 70 wide rows leave column tails in the vector im2col; 1x1 reads x
    (1, 12, 9, 37, 17, 5, 2), (2, 48, 7, 7, 9, 5, 2), (1, 3, 4, 70, 33, 3, 1),
    (3, 260, 5, 6, 10, 1, 0), (1, 1, 1, 1, 1, 1, 0), (2, 5, 3, 3, 8, 3, 4),
    # 48 and 24 pixels: last panels of exactly half the width (unmasked half-width kernel)
    (2, 7, 4, 12, 19, 3, 1), (2, 7, 2, 12, 19, 3, 1),
    # 40 and 196 pixels: last panels of a quarter of the width or less (AVX-512's 256-bit
    # quarter kernel: 8 floats unmasked, 4 floats / 4 doubles)
    (2, 9, 5, 8, 13, 3, 1), (1, 20, 14, 14, 17, 5, 2),
])
def test_conv2d_edges_match_reference(level, threads, dtype, shape):
    n, c, h, w, l, k, p = shape
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (l, c, k, k)).astype(dtype)
    b = rng.uniform(-1, 1, l).astype(dtype)
    with num_threads(threads):
        y = fc.conv2d(x, wt, b, padding=p)
        y0 = fc.conv2d(x, wt, padding=p)
    close(y, ref.conv2d_taps(x, wt, b, padding=p), dtype)
    close(y0, ref.conv2d_taps(x, wt, padding=p), dtype)


@pytest.mark.usefixtures("tiny_grain", "small_blocks")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("w", [1, 2, 5, 9, 16, 17, 31, 33, 34, 35, 64, 67])
def test_conv2d_stride2_columns_match_reference(level, dtype, w):
    """Stride-2 im2col columns (two masked loads and a permute of the even lanes): widths
    that give one lane, whole vectors and tails at both the left and right padding, with
    dilation, against the reference."""
    rng = np.random.default_rng(w)
    x = rng.uniform(-1, 1, (2, 3, 5, w)).astype(dtype)
    for k, p, d in ((3, 1, 1), (3, 0, 1), (5, 2, 1), (3, 2, 2), (2, 0, 1), (1, 0, 1)):
        if (w + 2 * p - d * (k - 1) - 1) < 0 or (5 + 2 * p - d * (k - 1) - 1) < 0:
            continue
        wt = rng.uniform(-1, 1, (4, 3, k, k)).astype(dtype)
        kw = dict(stride=(1, 2), padding=p, dilation=d)
        close(fc.conv2d(x, wt, **kw), ref.conv2d_taps(x, wt, **kw), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_padded_rows_and_their_fallback(level, dtype):
    """im2col through the zero-padded copy of the rows: 'same' padding of even kernels (the
    right padding larger than the left), stride 2 with dilation, images whose rows just fit
    the copy and ones too large for it (the masked path by itself), against the reference."""
    rng = np.random.default_rng(5)
    for (h, w), k, kw in (((5, 7), (2, 4), dict(padding="same")),
                          ((6, 9), (4, 3), dict(padding="same", dilation=(1, 2))),
                          ((9, 12), (3, 3), dict(stride=(1, 2), padding=(1, 2), dilation=2)),
                          ((30, 120), (3, 3), dict(padding=1)),        # 32 x 122 > the copy
                          ((40, 150), (5, 5), dict(stride=2, padding=2)),
                          ((3, 2000), (1, 3), dict(padding=(0, 1)))):
        x = rng.uniform(-1, 1, (2, 3, h, w)).astype(dtype)
        wt = rng.uniform(-1, 1, (5, 3) + k).astype(dtype)
        close(fc.conv2d(x, wt, **kw), ref.conv2d_taps(x, wt, **kw), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("blocks", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_fused_relu(level, blocks, dtype):
    """conv2d followed by max(y, 0) in the same call (nn.Sequential's Conv2d -> ReLU): in
    each work item (whole images or one-panel blocks), after the BLAS path's GEMMs, or one
    pass after Winograd, depthwise and 1x1 convolutions, also into an out= that overlaps x;
    against the reference with np.maximum (NaN stays NaN, -0 becomes +0)."""
    from fastconv.functional import _conv2d
    old = _kernels.set_gemm_block(blocks)
    try:
        rng = np.random.default_rng(9)
        for (n, c, h, w), (l, k), kw in (((2, 5, 9, 13), (11, 3), dict(padding=1, stride=2)),
                                         ((1, 3, 14, 14), (9, 5), dict(padding=2)),
                                         ((2, 16, 6, 6), (16, 3), dict(padding=1)),
                                         ((2, 4, 5, 5), (4, 3), dict(padding=1, groups=4)),
                                         ((2, 6, 4, 4), (3, 1), dict())):
            x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
            x[0, 0, 1, 1] = np.nan
            wt = rng.uniform(-1, 1, (l, c // kw.get("groups", 1), k, k)).astype(dtype)
            b = rng.uniform(-1, 1, l).astype(dtype)
            kwargs = dict(stride=1, padding=0, dilation=1, groups=1)
            kwargs.update(kw)
            args = [kwargs[a] for a in ("stride", "padding", "dilation", "groups")]
            expected = np.maximum(ref.conv2d_taps(x, wt, b, **kw), 0)
            nan = np.isnan(expected)

            def check(y):
                np.testing.assert_array_equal(np.isnan(y), nan)
                close(np.where(nan, 0, y), np.where(nan, 0, expected), dtype)
                assert nan.any() and (y == 0).any() and not np.signbit(y).any()

            check(_conv2d(x, wt, b, *args, None, True))
            if l == c and kw.get("stride", 1) == 1 and k % 2:    # same shape: out=x
                xo = x.copy()
                assert _conv2d(xo, wt, b, *args, xo, True) is xo
                check(xo)
    finally:
        _kernels.set_gemm_block(old)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", VARIANTS)
@given(data=st.data())
def test_conv2d_fused_maxpool_matches_reference(level, data):
    """conv2d [+ ReLU] + a max-pool whose windows tile the output (nn.Sequential's Conv2d ->
    [ReLU ->] MaxPool2d in one call): each block of output rows pooled while in cache, with
    the convolution's output kept or only in the thread's scratch, blocks of whole bands
    (forced small: one band per block) or whole images, 1-3 threads, rows and columns past
    the last whole window dropped, NaN and -0 inputs; against the loop reference, and bit
    for bit equal to conv2d then max_pool2d.  On the BLAS level (and for Winograd /
    depthwise shapes) the pooling is a max_pool2d call after the convolution."""
    from fastconv.functional import _conv2d
    draw = data.draw
    groups = draw(st.integers(1, 2), label="groups")
    cg, lg = draw(st.integers(1, 6), label="cg"), draw(st.integers(1, 9), label="lg")
    k = draw(st.sampled_from([1, 3, 5]), label="k")
    s = draw(st.sampled_from([1, 2]), label="stride")
    p = draw(st.integers(0, k // 2), label="padding")
    pk = (draw(st.integers(1, 3), label="pool kH"), draw(st.integers(1, 3), label="pool kW"))
    h, w = draw(st.integers(k, 13), label="h"), draw(st.integers(k, 13), label="w")
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    n = draw(st.integers(0, 3), label="N")
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    threads = draw(st.integers(1, 3), label="threads")
    relu, keep = draw(st.booleans(), label="relu"), draw(st.booleans(), label="keep")
    blocks = draw(st.sampled_from([0, 1, 40]), label="block columns")
    rng = np.random.default_rng(draw(st.integers(0, 2**31), label="seed"))
    x = rng.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    if n and draw(st.booleans(), label="nan"):
        x[0, 0, h // 2, w // 2] = np.nan
        x[-1, -1, 0] = -0.0
    wt = rng.uniform(-1, 1, (lg * groups, cg, k, k)).astype(dtype)
    b = rng.uniform(-1, 1, lg * groups).astype(dtype)
    args = (s, p, 1, groups)
    old = _kernels.set_gemm_block(blocks)
    try:
        with num_threads(threads), gemm_at(level):
            if oh < pk[0] or ow < pk[1]:      # the max-pool's own error
                with pytest.raises(ValueError, match="max_pool2d"):
                    _conv2d(x, wt, b, *args, None, relu, pk, keep)
                return
            y, pooled = _conv2d(x, wt, b, *args, None, relu, pk, keep)
            y0 = _conv2d(x, wt, b, *args, None, relu)
            p0 = fc.max_pool2d(y0, pk)
    finally:
        _kernels.set_gemm_block(old)
    assert (y is None) != keep
    if keep:
        np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(pooled, p0)
    expected = ref.conv2d(x, wt, b, stride=s, padding=p, groups=groups)
    if relu:
        expected = np.maximum(expected, 0)
    expected = ref.max_pool2d(expected, pk)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(pooled), nan)
    close(np.where(nan, 0, pooled), np.where(nan, 0, expected), dtype)


@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("relu", [False, True])
def test_gemm_tail_kernel_same_numbers(level, relu):
    """The own GEMM's last panel of 1-4 float32 columns by the rows-in-lanes tail kernel (32
    rows a call over all of K at AVX-512, 18 at AVX2; at AVX2 a single column has a step of
    its own): bit for bit the quarter-width (AVX2: half-width) kernel's numbers and close to
    the reference, for 1-70 output channels (row
    groups of 1-4 panels, rows past M), K across the K block, with and without bias and the
    fused ReLU, B by rows and through the im2col row table; conv2d_backward's grad_x (the
    same GEMM with P columns) too."""
    from fastconv.functional import _conv2d
    rng = np.random.default_rng(21)
    _kernels.set_gemm(level)
    try:
        for l in (1, 7, 8, 9, 17, 31, 32, 33, 64, 70):
            for (h, w), c, k in (((1, 33), 3, 1), ((2, 17), 20, 3), ((5, 7), 2, 3),
                                 ((14, 14), 9, 5), ((2, 2), 150, 1), ((6, 6), 3, 3)):
                x = rng.uniform(-1, 1, (2, c, h, w)).astype(np.float32)
                wt = rng.uniform(-1, 1, (l, c, k, k)).astype(np.float32)
                b = rng.uniform(-1, 1, l).astype(np.float32) if l % 2 else None
                got = {}
                gy = rng.uniform(-1, 1, (2, l, h + 2 * (k // 2) - k + 1,
                                         w + 2 * (k // 2) - k + 1)).astype(np.float32)
                for on in (True, False):
                    _kernels.set_gemm_tail(on)
                    y = _conv2d(x, wt, b, 1, k // 2, 1, 1, None, relu)
                    got[on] = (y, fc.conv2d_backward(gy, x, wt, padding=k // 2,
                                                     output_mask=(True, False, False))[0])
                np.testing.assert_array_equal(got[True][0], got[False][0])
                np.testing.assert_array_equal(got[True][1], got[False][1])
                expected = ref.conv2d_taps(x, wt, b, padding=k // 2)
                close(got[True][0], np.maximum(expected, 0) if relu else expected, np.float32)
    finally:
        _kernels.set_gemm_tail(True)
        _kernels.set_gemm(BEST)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", OWN_LEVELS)
@given(data=st.data())
def test_conv2d_shared_im2col_rows_same_numbers(level, data):
    """Stride-1 (along the height) forward convolutions and weight gradients make im2col rows
    once per (channel, column tap) and read row tap kh as a shift of kh * dH * OW columns:
    bit for bit the numbers of the whole im2col matrix (every gradient), and the reference's
    (output and weight gradient), for kernels 2-5 high (1-5 wide),
    column strides 1-2, dilation, asymmetric 'same' padding, groups, blocks of columns
    (forced small and whole images), 1-3 threads, bias, the fused ReLU and max-pool."""
    from fastconv.functional import _conv2d
    draw = data.draw
    groups = draw(st.integers(1, 2), label="groups")
    cg, lg = draw(st.integers(1, 6), label="cg"), draw(st.integers(1, 12), label="lg")
    kh, kw = draw(st.integers(2, 5), label="kH"), draw(st.integers(1, 5), label="kW")
    sw = draw(st.integers(1, 2), label="sW")
    d = (draw(st.integers(1, 2), label="dH"), draw(st.integers(1, 2), label="dW"))
    same = sw == 1 and draw(st.booleans(), label="same")
    p = "same" if same else (draw(st.integers(0, 2), label="pH"), draw(st.integers(0, 2), "pW"))
    h = d[0] * (kh - 1) + 1 + draw(st.integers(0, 12), label="dh")
    w = d[1] * (kw - 1) + 1 + draw(st.integers(0, 30), label="dw")
    n = draw(st.integers(1, 3), label="N")
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    threads = draw(st.integers(1, 3), label="threads")
    blocks = draw(st.sampled_from([0, 1, 40]), label="block columns")
    relu = draw(st.booleans(), label="relu")
    rng = np.random.default_rng(draw(st.integers(0, 2**31), label="seed"))
    x = rng.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (lg * groups, cg, kh, kw)).astype(dtype)
    b = rng.uniform(-1, 1, lg * groups).astype(dtype) if draw(st.booleans(), "bias") else None
    args = ((1, sw), p, d, groups)
    got = {}
    old = _kernels.set_gemm_block(blocks)
    try:
        with num_threads(threads), gemm_at(level):
            for on in (True, False):
                _kernels.set_im2col_rows(on)
                y = _conv2d(x, wt, b, *args, None, relu)
                pooled = (_conv2d(x, wt, b, *args, None, relu, (2, 1), False)[1]
                          if y.shape[2] >= 2 else None)
                gy = gy if on is False else rng.uniform(-1, 1, y.shape).astype(dtype)
                grads = fc.conv2d_backward(gy, x, wt, stride=(1, sw), padding=p, dilation=d,
                                           groups=groups)
                got[on] = (y, pooled) + tuple(grads)
    finally:
        _kernels.set_im2col_rows(True)
        _kernels.set_gemm_block(old)
    for a, e in zip(got[True], got[False]):
        if a is not None:
            np.testing.assert_array_equal(a, e)
    kw = dict(stride=(1, sw), padding=p, dilation=d, groups=groups)
    expected = ref.conv2d_taps(x, wt, b, **kw)
    close(got[True][0], np.maximum(expected, 0) if relu else expected, dtype)
    close(got[True][3], ref.conv2d_weight_grad_taps(gy, x, wt.shape, **kw), dtype)


def test_conv2d_forward_rejects_a_pool_out_of_another_shape():
    """The fused max-pool's output array must match (N, L, OH // pkH, OW // pkW) exactly:
    fewer images, channels, rows or columns is a ValueError, not a write past its end."""
    x = np.ones((4, 2, 8, 8), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    b = np.zeros(3, np.float32)
    if not _kernels.gemm_packed_size(3, 18):
        pytest.skip("no own GEMM here")
    wp = np.empty(_kernels.gemm_packed_size(3, 18), np.float32)
    sc = np.empty((1, _kernels.conv_block_scratch(18, 64, 3, 4, 1, 4, 16, False, False)),
                  np.float32)
    ok = np.empty((4, 3, 4, 4), np.float32)
    _kernels.conv2d_forward(x, w, b, None, sc, wp, 1, 1, 1, 1, 1, 1, 1, False, 1, False, ok,
                            2, 2, 8, 8)
    np.testing.assert_array_equal(ok, np.full(ok.shape, 18.0, np.float32))  # 18 ones inside
    for shape in ((2, 3, 4, 4), (4, 2, 4, 4), (4, 3, 3, 4), (4, 3, 4, 5)):
        with pytest.raises(ValueError, match="pool_out"):
            _kernels.conv2d_forward(x, w, b, None, sc, wp, 1, 1, 1, 1, 1, 1, 1, False, 1,
                                    False, np.empty(shape, np.float32), 2, 2, 8, 8)


def test_conv2d_writes_nothing_outside_out(level):
    """The masked tails store nothing past the output: out= inside a larger array keeps the
    values around it."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 7, 5, 13)).astype(np.float32)
    wt = rng.standard_normal((11, 7, 3, 3)).astype(np.float32)
    big = np.full(3 * 11 * 5 * 13, 7.0, np.float32)
    out = big[11 * 5 * 13:2 * 11 * 5 * 13].reshape(1, 11, 5, 13)
    fc.conv2d(x, wt, padding=1, out=out)
    assert (big[:11 * 5 * 13] == 7).all() and (big[2 * 11 * 5 * 13:] == 7).all()
    close(out, ref.conv2d_taps(x, wt, padding=1), np.float32)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 20, 9, 11, 13), (3, 17, 6, 40, 9), (2, 3, 5, 5, 70)])
@pytest.mark.parametrize("k", [3, 5])
def test_winograd_gemms_match_reference(level, threads, dtype, shape, k, monkeypatch):
    """Winograd's 16 (3x3) or 36 (5x5) GEMMs per image (forward, and conv2d_backward's
    grad_x; its weight gradient's 16 or 36 GEMMs with B transposed, summed over tiles and
    images, 5x5 on batches of 2 and more) at this level; the thresholds lowered so that every shape takes Winograd."""
    from fastconv import functional as F

    monkeypatch.setattr(F, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(F, "_WINOGRAD_MIN_SIZE", 1)
    monkeypatch.setattr(F, "_WGRAD_WINO_MIN_SIZE", 1)
    n, c, h, w, l = shape
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (l, c, k, k)).astype(dtype)
    b = rng.uniform(-1, 1, l).astype(dtype)
    p = k // 2
    assert F._use_winograd(F._conv_setup("t", x, wt, 1, p, 1, 1), wt, n=n) == (
        l <= 2 * c)                              # (the forward: batch 1 too)
    with num_threads(threads):
        y = fc.conv2d(x, wt, b, padding=p)
        gy = rng.uniform(-1, 1, y.shape).astype(dtype)
        gx, gw, gb = fc.conv2d_backward(gy, x, wt, padding=p)
    close(y, ref.conv2d_taps(x, wt, b, padding=p), dtype)
    # grad_x is the convolution of grad_out by the flipped, transposed kernel
    wf = np.ascontiguousarray(np.flip(wt, (2, 3)).transpose(1, 0, 2, 3))
    close(gx, ref.conv2d_taps(gy, wf, padding=p), dtype)
    assert F._use_winograd_wgrad(F._conv_setup("t", x, wt, 1, p, 1, 1), wt, n) == (
        k == 3 or n >= 2)
    # (5x5 Winograd: about 3-9x im2col's rounding)
    _close(gw, ref.conv2d_weight_grad_taps(gy, x, wt.shape, padding=p), dtype,
           atol32=3e-5 if k == 5 else 2e-5)
    close(gb, gy.astype(np.float64).sum((0, 2, 3)), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", VARIANTS)
@given(data=st.data())
def test_gradients_and_transposed_match_reference(level, data):
    """conv2d_backward's grad_x (weight^T packed: im2col path and 1x1) and conv_transpose2d
    forward and backward at this GEMM level, against the loop reference."""
    draw = data.draw
    groups = draw(st.integers(1, 2), label="groups")
    cg, lg = draw(st.integers(1, 10), label="cg"), draw(st.integers(1, 10), label="lg")
    k = draw(st.sampled_from([1, 2, 3]), label="k")
    s = draw(st.sampled_from([1, 2]), label="stride")
    p = draw(st.integers(0, k - 1), label="padding")
    h, w = draw(st.integers(k, 6), label="h"), draw(st.integers(k, 7), label="w")
    n = draw(st.integers(1, 2), label="N")
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    threads = draw(st.integers(1, 2), label="threads")
    rng = np.random.default_rng(draw(st.integers(0, 2**31), label="seed"))
    x = rng.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (lg * groups, cg, k, k)).astype(dtype)
    kw = dict(stride=s, padding=p, groups=groups)
    with num_threads(threads), gemm_at(level):
        y = fc.conv2d(x, wt, **kw)
        gy = rng.uniform(-1, 1, y.shape).astype(dtype)
        got = fc.conv2d_backward(gy, x, wt, **kw)
        b = rng.uniform(-1, 1, cg * groups).astype(dtype)
        yt = fc.conv_transpose2d(gy, wt, b, **kw)      # weight (in=L, out/groups=Cg, k, k)
        gyt = rng.uniform(-1, 1, yt.shape).astype(dtype)
        gott = fc.conv_transpose2d_backward(gyt, gy, wt, **kw)
    for a, e in zip(got, ref.conv2d_backward(gy, x, wt, **kw)):
        close(a, e, dtype)
    close(yt, ref.conv_transpose2d(gy, wt, b, **kw), dtype)
    for a, e in zip(gott, ref.conv_transpose2d_backward(gyt, gy, wt, **kw)):
        close(a, e, dtype)


@given(n=st.integers(1, 2), c=st.integers(1, 3), l=st.integers(1, 3),
       h=st.integers(1, 5), w=st.integers(1, 5), k=st.integers(1, 3),
       groups=st.integers(1, 2), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**31))
def test_weight_grad_taps_reference_is_the_loop_reference(n, c, l, h, w, k, groups, dtype,
                                                          seed):
    """The per-tap weight-gradient reference used for big shapes below is the loop one."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c * groups, h + k, w + k))
    wt = rng.standard_normal((l * groups, c, k, k))
    for kw in (dict(padding=1), dict(stride=2, dilation=(1, 2), padding=(0, 2))):
        y = ref.conv2d(x, wt, groups=groups, **kw)
        gy = rng.standard_normal(y.shape)
        np.testing.assert_allclose(
            ref.conv2d_weight_grad_taps(gy, x, wt.shape, groups=groups, **kw),
            ref.conv2d_backward(gy, x, wt, groups=groups, **kw)[1], rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [
    # (N, C, H, W, L, k, stride, padding, groups).  The own GEMM (K >= 16 taps) reads the
    # im2col matrix (or x) in place as A (K rows, in blocks of MR: tails of 3 and 0 rows) and
    # grad_out transposed as B (L columns: a masked, a half and a quarter panel)
    (2, 3, 9, 11, 19, 5, 1, 2, 1), (1, 8, 12, 12, 64, 3, 1, 1, 1),
    # few taps: K = 16 (the fewest for the own GEMM), 18, 25 (LeNet's conv1), 9 (BLAS)
    (3, 1, 10, 9, 20, 4, 1, 2, 1), (2, 2, 9, 8, 33, 3, 1, 1, 1), (4, 1, 12, 12, 32, 5, 1, 2, 1),
    (2, 1, 9, 9, 7, 3, 1, 1, 1),
    # x itself as A (1x1, stride 1); 1x1 stride 2 (im2col); P = 144 and 196 cross the K block
    (2, 64, 4, 5, 9, 1, 1, 0, 1), (1, 70, 6, 6, 33, 1, 2, 0, 1),
    (2, 16, 7, 9, 12, 3, 2, 1, 2), (1, 32, 14, 14, 40, 5, 1, 2, 1),
    # fewer (image, group) items than threads: the weight gradient shared by blocks of input
    # channels (9: one-channel blocks; 2 groups on 3 threads), grad_out transposed in column
    # blocks (P = 552: two of them)
    (1, 9, 24, 23, 5, 3, 1, 1, 1), (1, 18, 10, 10, 8, 3, 1, 1, 2),
])
def test_conv2d_weight_gradient_matches_reference(level, own, threads, dtype, shape):
    """conv2d_backward's weight and bias gradients by the own GEMM (im2col matrix read in
    place, grad_out transposed; own=True) and by BLAS (own=False), against the reference."""
    n, c, h, w, l, k, s, p, g = shape
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (l, c // g, k, k)).astype(dtype)
    kw = dict(stride=s, padding=p, groups=g)
    y = ref.conv2d_taps(x, wt, **kw)
    gy = rng.uniform(-1, 1, y.shape).astype(dtype)
    old = _kernels.set_wgrad_own(own)
    try:
        with num_threads(threads):
            gx, gw, gb = fc.conv2d_backward(gy, x, wt, **kw)
            _, gw1, _ = fc.conv2d_backward(gy, x, wt, output_mask=(False, True, False), **kw)
            gx1, _, _ = fc.conv2d_backward(gy, x, wt, output_mask=(True, False, False), **kw)
    finally:
        _kernels.set_wgrad_own(old)
    expected = ref.conv2d_weight_grad_taps(gy, x, wt.shape, **kw)
    close(gw, expected, dtype)
    close(gw1, expected, dtype)
    close(gb, gy.astype(np.float64).sum(axis=(0, 2, 3)), dtype)
    # grad_out's transpose sits past the im2col matrix that grad_x's GEMM writes: grad_x is
    # the same whether the weight gradient is computed in the same call or not
    np.testing.assert_array_equal(gx, gx1)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_short_last_panel_same_numbers(level, dtype):
    """A last panel of at most 4 rows (MR/2 of AVX-512's 8, 4 of AVX2's 6) by the short
    kernel (set_gemm_short(True), the default) gives bit for bit what the full kernel gives,
    and matches the reference: conv2d_backward's grad_x (M = C kH kW = 25, 9, 27, 4, 12 rows),
    conv2d's forward (M = 25, 26, 22, 11 output channels by the plain drivers at stride 2,
    28, 64 and 29 through the im2col row table at stride 1) with bias and fused ReLU."""
    rng = np.random.default_rng(12)
    with gemm_at(level):
        for shape in [(2, 1, 12, 11, 7, 5, 1, 2), (1, 1, 9, 10, 33, 3, 1, 1),
                      (2, 3, 8, 8, 25, 3, 2, 1), (1, 1, 6, 7, 26, 2, 2, 0),
                      (2, 3, 7, 9, 28, 2, 1, 0), (2, 3, 8, 8, 22, 3, 2, 1),
                      (2, 2, 6, 7, 64, 3, 1, 1), (2, 2, 6, 7, 29, 3, 1, 1),
                      (2, 3, 8, 8, 11, 3, 2, 1)]:
            _same_numbers_both_ways(_kernels.set_gemm_short, rng, dtype, shape)


def _same_numbers_both_ways(setter, rng, dtype, shape, relu=True, bias=True):
    """conv2d_backward's grad_x and conv2d's forward (with the fused ReLU or not) of a drawn
    convolution, shape (N, C, H, W, L, k, stride, padding), with setter(True) and with
    setter(False): bit for bit the same, and close to the reference."""
    from fastconv.functional import _conv2d
    n, c, h, w, l, k, s, p = shape
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (l, c, k, k)).astype(dtype)
    b = rng.uniform(-1, 1, l).astype(dtype) if bias else None
    y = ref.conv2d_taps(x, wt, b, stride=s, padding=p)
    gy = rng.uniform(-1, 1, y.shape).astype(dtype)
    got = []
    for on in (True, False):
        old = setter(on)
        try:
            got.append((fc.conv2d_backward(gy, x, wt, stride=s, padding=p)[0],
                        _conv2d(x, wt, b, s, p, 1, 1, None, relu)))
        finally:
            setter(old)
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])
    close(got[0][0], ref.conv2d_backward(gy, x, wt, stride=s, padding=p)[0], dtype)
    close(got[0][1], np.maximum(y, 0) if relu else y, dtype)


@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_k_blocks_same_numbers(level, dtype):
    """The own GEMM sums over k in order whatever its K blocks (set_gemm_kc): conv2d's forward
    (plain driver, and the im2col row table at stride 1) and backward with K = 300 taps give
    bit for bit the same numbers with blocks of 128 (the default), 7, 100 and 384 rows, and
    match the reference; out-of-range blocks are refused."""
    rng = np.random.default_rng(14)
    x = rng.uniform(-1, 1, (2, 12, 11, 10)).astype(dtype)
    wt = rng.uniform(-1, 1, (14, 12, 5, 5)).astype(dtype)
    b = rng.uniform(-1, 1, 14).astype(dtype)
    with gemm_at(level):
        for s in (1, 2):
            y = ref.conv2d_taps(x, wt, b, stride=s, padding=2)
            gy = rng.uniform(-1, 1, y.shape).astype(dtype)
            got = []
            for kc in (128, 7, 100, 384):
                old = _kernels.set_gemm_kc(kc)
                try:
                    got.append((fc.conv2d(x, wt, b, stride=s, padding=2),)
                               + fc.conv2d_backward(gy, x, wt, stride=s, padding=2))
                finally:
                    _kernels.set_gemm_kc(old)
            for g in got[1:]:
                for a, e in zip(g, got[0]):
                    np.testing.assert_array_equal(a, e)
            close(got[0][0], y, dtype)
            for a, e in zip(got[0][1:], ref.conv2d_backward(gy, x, wt, stride=s, padding=2)):
                close(a, e, dtype)
    for bad in (0, 385):
        with pytest.raises(ValueError, match="kc"):
            _kernels.set_gemm_kc(bad)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_split_last_rows_same_numbers(level, dtype):
    """M = 6 n + 2 at AVX2: the last 8 rows as two 4-row kernels, the second across two
    panels of packed A (set_gemm_split(True), the default), give bit for bit what the 6-row
    and 2-row kernels give, and match the reference: conv2d's forward by the plain drivers
    (stride 2) with M = 8, 14, 20, 32 and 128 output channels, with bias and fused ReLU or
    neither, over 1-3 K blocks (K = 18 .. 300), columns in whole, masked, half and quarter
    panels (P = 16, 9, 25, 49, 2); conv2d_backward's grad_x (M = C kH kW = 8, 20, 32); M = 2
    (one panel: no split).  At AVX-512 (MR = 8) the setting changes nothing."""
    rng = np.random.default_rng(13)
    with gemm_at(level):
        for *shape, bias, relu in [
                (2, 2, 8, 8, 8, 3, 2, 1, True, True), (1, 3, 5, 5, 14, 3, 2, 1, False, False),
                (2, 12, 10, 9, 20, 5, 2, 2, True, False), (1, 25, 13, 13, 32, 3, 2, 1, True, True),
                (1, 16, 7, 7, 128, 3, 2, 1, True, True), (2, 7, 3, 4, 32, 2, 2, 0, False, True),
                (1, 2, 8, 8, 2, 3, 2, 1, True, False), (2, 2, 9, 9, 6, 2, 1, 0, True, False),
                (1, 5, 9, 11, 7, 2, 1, 0, False, False), (1, 8, 9, 9, 5, 2, 1, 1, True, False)]:
            _same_numbers_both_ways(_kernels.set_gemm_split, rng, dtype, shape, relu, bias)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_by_dot_products_matches_reference(level, threads, dtype):
    """Few taps (K < 26): the own weight gradient by dot products along the pixels
    (fc_wdot_*), for conv2d and conv_transpose2d, against the reference and against the GEMM
    (K >= 16) or BLAS (K < 16) that computes it with set_wgrad_dot(0).  Shapes: blocks of 5
    and of 4 taps (K = 25, 9, 20; 16, 12, 8) with a last partial one (K = 7, 9, 23), channels
    past a block of 4 (L = 5, 33) or 3 (AVX2), pixels past a vector (P = 1..1517; 1517 in
    chunks of 4 KiB per row), the shared im2col rows (stride 1, kH > 1) and a whole im2col
    matrix (stride 2, kH = 1), groups, one image on 3 threads (the weight gradient by blocks
    of input channels)."""
    rng = np.random.default_rng(11)
    with gemm_at(level), num_threads(threads):
        for n, c, h, w, l, kh, kw, s, p, g in [
                (3, 1, 12, 11, 33, 5, 5, 1, 2, 1), (2, 1, 9, 9, 5, 3, 3, 1, 1, 1),
                (1, 2, 7, 13, 8, 2, 5, 1, 0, 1), (2, 4, 6, 6, 10, 2, 2, 1, 0, 2),
                (2, 1, 5, 10, 17, 1, 7, 2, 3, 1), (1, 3, 10, 9, 4, 3, 3, 2, 1, 1),
                (2, 1, 1, 1, 3, 3, 3, 1, 1, 1), (1, 2, 8, 8, 6, 4, 4, 1, 1, 2),
                (1, 1, 12, 12, 7, 4, 4, 1, 0, 1), (2, 1, 8, 7, 2, 3, 5, 1, 1, 1),
                (1, 1, 41, 37, 6, 3, 3, 1, 1, 1)]:
            x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
            wt = rng.uniform(-1, 1, (l, c // g, kh, kw)).astype(dtype)
            kwargs = dict(stride=s, padding=p, groups=g)
            gy = rng.uniform(-1, 1, ref.conv2d_taps(x, wt, **kwargs).shape).astype(dtype)
            # the transposed convolution of gy by wt (its weight gradient: c / g * kh * kw
            # taps) and a gradient of its output
            gty = rng.uniform(-1, 1, fc.conv_transpose2d(gy, wt, **kwargs).shape).astype(dtype)
            got = []
            for k in (26, 0):
                old = _kernels.set_wgrad_dot(k)
                try:
                    got.append((fc.conv2d_backward(gy, x, wt, **kwargs)[1],
                                fc.conv2d_backward(gy, x, wt, output_mask=(False, True, False),
                                                   **kwargs)[1],
                                fc.conv_transpose2d_backward(gty, gy, wt, **kwargs)[1]))
                finally:
                    _kernels.set_wgrad_dot(old)
            expected = ref.conv2d_weight_grad_taps(gy, x, wt.shape, **kwargs)
            expected_t = ref.conv2d_weight_grad_taps(gy, gty, wt.shape, **kwargs)
            for dot, other in zip(*got):
                close(dot, other, dtype)
            for gw, gw1, gwt in got:
                close(gw, expected, dtype)
                close(gw1, expected, dtype)
                close(gwt, expected_t, dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("blocks", [0, 40])
def test_weight_gradient_bt_same_numbers(level, dtype, blocks):
    """The own GEMM's weight gradient reading grad_out (x for a transposed convolution) as B
    transposed (FC_GEMM_BT, the default) gives bit for bit what it gives from a transposed
    copy (set_wgrad_bt(False)): the same products summed in the same order.  Shapes: x in
    place (1x1), an im2col matrix, im2col rows shared by the row taps, stride 2; blocks of
    output rows (blocks=40 columns); P and L crossing the K block and the strip widths."""
    rng = np.random.default_rng(7)
    old_block = _kernels.set_gemm_block(blocks)
    try:
        for n, c, h, w, l, k, s, p in [(2, 64, 15, 14, 37, 1, 1, 0), (1, 9, 13, 12, 70, 3, 1, 1),
                                       (2, 16, 12, 11, 33, 3, 2, 1), (1, 8, 9, 20, 9, 5, 1, 2)]:
            x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
            wt = rng.uniform(-1, 1, (l, c, k, k)).astype(dtype)
            gy = rng.uniform(-1, 1, ref.conv2d_taps(x, wt, stride=s, padding=p).shape)
            gy = gy.astype(dtype)
            # the transposed convolution of gy by the same weight, and a gradient of its output
            gty = rng.uniform(-1, 1, ref.conv_transpose2d(gy, wt, stride=s, padding=p).shape)
            gty = gty.astype(dtype)
            got = {}
            for bt in (True, False):
                old = _kernels.set_wgrad_bt(bt)
                try:
                    with gemm_at(level), num_threads(2):
                        got[bt] = (fc.conv2d_backward(gy, x, wt, stride=s, padding=p)[1],
                                   fc.conv_transpose2d_backward(gty, gy, wt, stride=s,
                                                                padding=p)[1])
                finally:
                    _kernels.set_wgrad_bt(old)
            np.testing.assert_array_equal(got[True][0], got[False][0])
            np.testing.assert_array_equal(got[True][1], got[False][1])
            close(got[True][0], ref.conv2d_weight_grad_taps(gy, x, wt.shape, stride=s,
                                                            padding=p), dtype)
    finally:
        _kernels.set_gemm_block(old_block)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [
    # (N, Cin, H, W, Cout, k, stride, padding, output_padding, groups): K = Cout/g * k * k
    # >= 16 taps take the own GEMM (A: im2col of grad_out in place; B: x read transposed)
    (2, 19, 5, 6, 4, 4, 2, 1, 0, 1), (1, 9, 7, 7, 75, 1, 1, 0, 0, 1),
    (2, 12, 4, 5, 16, 3, 2, 1, 1, 2), (1, 33, 6, 9, 8, 3, 1, 1, 0, 1),
])
def test_conv_transpose2d_weight_gradient_matches_reference(level, own, threads, dtype, shape):
    """conv_transpose2d_backward's weight gradient by the own GEMM and by BLAS, against the
    per-tap reference (the weight gradient of the convolution whose input gradient the
    transposed convolution is: grad_out and x swap roles)."""
    n, cin, h, w, cout, k, s, p, op, g = shape
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (n, cin, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (cin, cout // g, k, k)).astype(dtype)
    kw = dict(stride=s, padding=p, groups=g)
    with num_threads(threads):
        y = fc.conv_transpose2d(x, wt, output_padding=op, **kw)
    gy = rng.uniform(-1, 1, y.shape).astype(dtype)
    old = _kernels.set_wgrad_own(own)
    try:
        with num_threads(threads):
            gx, gw, _ = fc.conv_transpose2d_backward(gy, x, wt, output_padding=op, **kw)
            gx1, _, _ = fc.conv_transpose2d_backward(gy, x, wt, output_padding=op,
                                                     output_mask=(True, False, False), **kw)
    finally:
        _kernels.set_wgrad_own(old)
    close(gw, ref.conv2d_weight_grad_taps(x, gy, wt.shape, **kw), dtype)
    np.testing.assert_array_equal(gx, gx1)


@pytest.fixture
def small_blocks():
    """The forward convolution in im2col blocks of one panel (as with batch 1 on many
    threads), instead of a whole image per work item."""
    old = _kernels.set_gemm_block(1)
    yield
    _kernels.set_gemm_block(old)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [
    # (N, C, H, W, L, k, stride, padding, dilation, groups): K >= 16 (weight gradient by the
    # own GEMM, so the blocks apply to it too) and K < 16 (grad_x only in blocks)
    (2, 8, 9, 10, 9, 5, 1, 2, 1, 1), (1, 12, 11, 9, 10, 3, 2, 1, 1, 1),
    (2, 16, 8, 7, 12, 3, 1, 2, 2, 2), (1, 3, 7, 8, 5, 3, 1, 1, 1, 1),
    (1, 1, 7, 8, 5, 3, 1, 1, 1, 1),
])
def test_conv2d_backward_in_row_blocks_matches_reference(rows, threads, dtype, shape):
    """conv2d_backward with its im2col matrix in blocks of `rows` output rows (as a big
    image's is: each block's col2im is the image's with the padding shifted), every
    output_mask, against the loop reference, at the best GEMM level."""
    n, c, h, w, l, k, s, p, d, g = shape
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (l, c // g, k, k)).astype(dtype)
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    y = ref.conv2d(x, wt, **kw)
    gy = rng.uniform(-1, 1, y.shape).astype(dtype)
    expected = ref.conv2d_backward(gy, x, wt, **kw)
    old = _kernels.set_gemm_block(rows * y.shape[3])
    try:
        with num_threads(threads):
            got = [fc.conv2d_backward(gy, x, wt, output_mask=m, **kw)
                   for m in ((True, True, True), (True, False, False), (False, True, False))]
    finally:
        _kernels.set_gemm_block(old)
    for out in got:
        for a, e in zip(out, expected):
            if a is not None:
                close(a, e, dtype)


@pytest.mark.usefixtures("tiny_grain", "small_blocks")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [
    (1, 12, 9, 37, 17, 5, 2, 1), (2, 6, 7, 7, 9, 3, 1, 2), (1, 3, 4, 70, 33, 3, 1, 1),
    (1, 20, 5, 6, 10, 1, 0, 1), (2, 5, 13, 11, 8, 3, 4, 3),
])
def test_conv2d_blocks_match_reference(level, threads, dtype, shape):
    """Blocks start inside output rows (the first segment of a block is a partial row) and
    end at the image's last pixel; stride 2 takes the even-lane path, 3 the element-wise
    one."""
    n, c, h, w, l, k, p, s = shape
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (l, c, k, k)).astype(dtype)
    b = rng.uniform(-1, 1, l).astype(dtype)
    with num_threads(threads):
        y = fc.conv2d(x, wt, b, padding=p, stride=s)
    close(y, ref.conv2d_taps(x, wt, b, padding=p, stride=s), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", OWN_LEVELS)
@given(data=st.data())
def test_gemm_strip_packing_same_numbers(level, data):
    """The own GEMM copies each K block's strip of B into a contiguous buffer when B is read
    in place with rows far apart (a big image in a 1x1 convolution, grad_out in the data
    gradient, x and the weight in Linear's backward): forced here for every row distance,
    bit for bit the numbers of the unpacked path and close to the reference, for M across
    4 * MR (the packing's lower bound), K across the K block and the 64-row minimum, column
    tails of every panel width, groups, bias, the fused ReLU, 1-3 threads, both dtypes."""
    from fastconv.functional import _conv2d, _linear_backward
    draw = data.draw
    groups = draw(st.integers(1, 2), label="groups")
    cg = draw(st.sampled_from([1, 7, 63, 64, 65, 130]), label="cg")
    lg = draw(st.sampled_from([1, 8, 33, 40, 41, 70]), label="lg")
    h, w = draw(st.integers(1, 2), label="H"), draw(st.integers(1, 40), label="W")
    n = draw(st.integers(1, 2), label="N")
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    threads = draw(st.integers(1, 3), label="threads")
    relu = draw(st.booleans(), label="relu")
    rng = np.random.default_rng(draw(st.integers(0, 2**31), label="seed"))
    x = rng.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (lg * groups, cg, 1, 1)).astype(dtype)
    b = rng.uniform(-1, 1, lg * groups).astype(dtype) if draw(st.booleans(), "bias") else None
    gy = rng.uniform(-1, 1, (n, lg * groups, h, w)).astype(dtype)
    tw = rng.uniform(-1, 1, (cg * groups, lg, 1, 1)).astype(dtype)    # transposed layout
    # Linear's backward: grad_w's K is the batch, grad_x's the output features
    ln = draw(st.sampled_from([3, 64, 70]), label="rows")
    lo = draw(st.sampled_from([5, 40, 66]), label="out")
    li = draw(st.integers(1, 80), label="in")
    lx = rng.uniform(-1, 1, (ln, li)).astype(dtype)
    lw = rng.uniform(-1, 1, (lo, li)).astype(dtype)
    lg2 = rng.uniform(-1, 1, (ln, lo)).astype(dtype)
    got = {}
    try:
        with num_threads(threads), gemm_at(level):
            for on in (1, 0):
                _kernels.set_gemm_packb(on)
                y = _conv2d(x, wt, b, 1, 0, 1, groups, None, relu)
                gx = fc.conv2d_backward(gy, x, wt, groups=groups,
                                        output_mask=(True, False, False))[0]
                tx = fc.conv_transpose2d_backward(gy, x, tw, groups=groups,
                                                  output_mask=(True, False, False))[0]
                got[on] = (y, gx, tx) + tuple(_linear_backward(lg2, lx, lw, True, True))
    finally:
        _kernels.set_gemm_packb(2048)
    for a, e in zip(got[1], got[0]):
        if a is not None:
            np.testing.assert_array_equal(a, e)
    y, gx, tx, lgx, lgw = got[1]
    # a 1x1 convolution and its gradients are matrix products over the channels (float64
    # einsums per group here: the naive reference's loops over 130 channels took seconds)

    def per_group(m, a, gin):      # out[n, g*mo + o, ...] = sum_i m[g][o, i] a[n, g*gin + i]
        m = m.astype(np.float64).reshape(groups, -1, gin)
        a = a.astype(np.float64).reshape(a.shape[0], groups, gin, -1)
        return np.einsum("goi,ngip->ngop", m, a).reshape(a.shape[0], -1, h, w)

    expected = per_group(wt[:, :, 0, 0], x, cg)
    if b is not None:
        expected += b.astype(np.float64)[None, :, None, None]
    close(y, np.maximum(expected, 0) if relu else expected, dtype)
    wg = wt[:, :, 0, 0].reshape(groups, lg, cg).transpose(0, 2, 1).reshape(groups * cg, lg)
    close(gx, per_group(wg, gy, lg), dtype)
    close(tx, per_group(tw[:, :, 0, 0], gy, lg), dtype)
    g64, x64, w64 = lg2.astype(np.float64), lx.astype(np.float64), lw.astype(np.float64)
    close(lgx, g64 @ w64, dtype)
    close(lgw, g64.T @ x64, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_wgrad_reduce(dtype, threads):
    """The weight gradient's partial rows summed in order (bit for bit part[0] + part[1] +
    ...) and, for the own GEMM's layout, each group's (K, R) block transposed to (R, K):
    tiles of 32 x 128 whole and partial in both directions, 1-3 rows, 1-3 groups, and the
    untransposed sum in blocks of 4096 with a partial last one."""
    rng = np.random.default_rng(5)
    for rows, groups, K, R in [(1, 1, 1, 1), (2, 1, 256, 256), (3, 2, 33, 129), (2, 3, 70, 5),
                               (2, 1, 9, 300), (1, 2, 64, 128)]:
        part = rng.standard_normal((rows, groups * K * R + 3)).astype(dtype)
        want = part[0, :-3].copy()
        for t in range(1, rows):
            want = want + part[t, :-3]
        for trans in (False, True):
            out = np.full(groups * K * R, np.nan, dtype)
            _kernels.wgrad_reduce(part, out, groups, K, trans, threads)
            expect = want.reshape(groups, K, R).transpose(0, 2, 1).ravel() if trans else want
            np.testing.assert_array_equal(out, expect)
    with pytest.raises(ValueError):
        _kernels.wgrad_reduce(np.zeros((2, 10), dtype), np.zeros(12, dtype), 1, 3, True, 1)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_packs_b_rows_in_the_same_l1_sets(level, dtype):
    """B read in place with rows a multiple of 512 bytes apart (16x16 and 8x16 planes of
    floats; 8x16 and 8x8 of doubles) is copied strip by strip (set_gemm_packb_sets): bit for
    bit the products read in place, for a 1x1 convolution, the gradient of a stride-2
    convolution and a transposed convolution's forward; against the reference once."""
    rng = np.random.default_rng(9)
    for h, w in [(16, 16), (8, 16), (8, 8)]:
        # (the copies start from K blocks of 64 rows: 64 channels summed)
        x = rng.uniform(-1, 1, (1, 64, h, w)).astype(dtype)
        w1 = rng.uniform(-1, 1, (40, 64, 1, 1)).astype(dtype)
        w3 = rng.uniform(-1, 1, (64, 4, 3, 3)).astype(dtype)
        wt = rng.uniform(-1, 1, (64, 3, 4, 4)).astype(dtype)
        gy = rng.uniform(-1, 1, (1, 64, h, w)).astype(dtype)
        x2 = np.zeros((1, 4, 2 * h, 2 * w), dtype)
        got = {}
        for on in (True, False):
            old = _kernels.set_gemm_packb_sets(on)
            try:
                with gemm_at(level), num_threads(2):
                    got[on] = (fc.conv2d(x, w1),
                               fc.conv2d_backward(gy, x2, w3, stride=2, padding=1,
                                                  output_mask=(True, False, False))[0],
                               fc.conv_transpose2d(x, wt, stride=2, padding=1))
            finally:
                _kernels.set_gemm_packb_sets(old)
        for a, e in zip(got[True], got[False]):
            np.testing.assert_array_equal(a, e)
        if (h, w) == (16, 16):
            y, gx, t = got[True]
            close(y, ref.conv2d(x, w1), dtype)
            close(gx, ref.conv_transpose2d(gy, w3, stride=2, padding=1, output_padding=1),
                  dtype)
            close(t, ref.conv_transpose2d(x, wt, stride=2, padding=1), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [2, 3])
def test_conv_forward_channel_blocks(level, dtype, threads):
    """The forward convolution with fewer images than threads by blocks of output channels
    (the first item of each block packs its rows of the weights, the other images' wait for
    it; each thread makes an image's im2col once): bit for bit the blocks of columns it
    replaces (set_conv_chan_blocks off), and against the reference: batch 1 and 2, the
    shared-rows im2col (5x5 stride 1) and the plain one (stride 2), 1x1 read in place,
    groups, channel counts that are no multiple of the blocks, with and without bias, the
    fused ReLU and the fused max-pool with and without keeping the convolution; inputs
    unchanged.  (Batch 2 on 3 threads: items of two images packing the same rows at once
    made some of them read half-packed weights, before the once-flags.)"""
    rng = np.random.default_rng(21)
    cases = [  # C, L, H, W, k, stride, padding, groups
        (1, 32, 28, 28, 5, 1, 2, 1), (6, 20, 14, 14, 5, 1, 2, 1), (8, 40, 9, 11, 3, 2, 1, 1),
        (16, 24, 7, 7, 1, 1, 0, 1), (4, 36, 10, 10, 3, 1, 1, 2), (3, 17, 12, 8, 3, 1, 0, 1)]
    # (batch 2 takes channel blocks on 3 threads only: 2 items, fewer than the threads)
    for (C, L, H, W, k, s, p, g), N in [(c, n) for c in cases
                                        for n in ((1, 2) if threads == 3 else (1,))]:
        x = rng.uniform(-1, 1, (N, C, H, W)).astype(dtype)
        w = rng.uniform(-1, 1, (L, C // g, k, k)).astype(dtype)
        b = rng.uniform(-1, 1, L).astype(dtype)
        keep = x.copy(), w.copy(), b.copy()
        want = ref.conv2d(x, w, b, stride=s, padding=p, groups=g)
        got = {}
        for on in (True, False):
            old = _kernels.set_conv_chan_blocks(on)
            try:
                with gemm_at(level), num_threads(threads):
                    got[on] = (
                        fc.conv2d(x, w, b, stride=s, padding=p, groups=g),
                        fc.conv2d(x, w, None, stride=s, padding=p, groups=g),
                        F._conv2d(x, w, b, s, p, 1, g, None, True),
                        *F._conv2d(x, w, b, s, p, 1, g, None, True, pool=(2, 2)),
                        F._conv2d(x, w, b, s, p, 1, g, None, False, pool=(2, 2), keep=False)[1])
            finally:
                _kernels.set_conv_chan_blocks(old)
        for a, e in zip(got[True], got[False]):
            np.testing.assert_array_equal(a, e)
        y, y0, yr, yk, pk, pn = got[True]
        close(y, want, dtype)
        close(y0, ref.conv2d(x, w, None, stride=s, padding=p, groups=g), dtype)
        close(yr, np.maximum(want, 0), dtype)
        np.testing.assert_array_equal(yk, yr)
        pooled = ref.max_pool2d(np.maximum(want, 0), 2)
        close(pk, pooled, dtype)
        close(pn, ref.max_pool2d(want, 2), dtype)
        for a, e in zip((x, w, b), keep):
            np.testing.assert_array_equal(a, e)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_plans(dtype, monkeypatch):
    """conv2d's own-GEMM calls with a plan (the second call with the same shapes, dtypes and
    arguments) give the numbers of a call without one (_PLANS emptied before each), with new
    weight, bias and input values each time (values are never part of a plan), a bias
    dropped or given, non-contiguous and int inputs, 1-3 threads (the thread count is part
    of the key), the GEMM level changed between calls, the fused ReLU / max-pool with and
    without keeping the convolution; against the reference."""
    rng = np.random.default_rng(31)
    plans = F._PLANS
    monkeypatch.setattr(F, "_DIRECT", "never")     # (the 5x5 stride 2 would go direct)

    def fresh(*args, **kw):
        plans.clear()
        return F._conv2d(*args, **kw)

    for C, L, H, k, s, p in [(3, 24, 12, 3, 1, 1), (8, 16, 10, 5, 2, 2), (16, 20, 6, 1, 1, 0)]:
        for step in range(3):
            x = rng.uniform(-1, 1, (2, C, H, H)).astype(dtype)
            w = rng.uniform(-1, 1, (L, C, k, k)).astype(dtype)
            b = rng.uniform(-1, 1, L).astype(dtype) if step != 1 else None
            xs = [x, np.asfortranarray(x), (x * 4).astype(np.int32)]
            want = ref.conv2d(xs[step], w, b, stride=s, padding=p)
            threads = step + 1
            with num_threads(threads):
                args = (xs[step], w, b, s, p, 1, 1, None, True)
                first = fresh(*args)
                assert len(plans) == 1
                again = F._conv2d(*args)
                np.testing.assert_array_equal(again, first)
                close(again, np.maximum(want, 0), dtype)
                for keep in (True, False):
                    one = fresh(*args, pool=(2, 2), keep=keep)
                    two = F._conv2d(*args, pool=(2, 2), keep=keep)
                    for a, e in zip(two, one):
                        if e is None:
                            assert a is None
                        else:
                            np.testing.assert_array_equal(a, e)
                    close(two[1], ref.max_pool2d(np.maximum(want, 0), 2), dtype)
                if BEST != "blas":
                    with gemm_at("blas"):       # a plan of another level is not used
                        close(F._conv2d(*args), np.maximum(want, 0), dtype)
                w[...] = -w                     # new values, same plan
                close(F._conv2d(*args), np.maximum(ref.conv2d(xs[step], w, b, stride=s,
                                                              padding=p), 0), dtype)
    with num_threads(2):                        # another thread count: another plan
        x = rng.uniform(-1, 1, (1, 4, 9, 9)).astype(dtype)
        w = rng.uniform(-1, 1, (16, 4, 3, 3)).astype(dtype)
        plans.clear()
        F._conv2d(x, w, None, 1, 1, 1, 1, None, False)
        with num_threads(3):
            close(F._conv2d(x, w, None, 1, 1, 1, 1, None, False), ref.conv2d(x, w, padding=1),
                  dtype)
        assert len(plans) == (2 if BEST != "blas" else 0)


@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_prefetches_same_numbers(level, dtype):
    """The prefetches of the next panel's C rows before they are written (set_gemm_cpf, from
    any K by default) and of B's next strip where its rows lie far apart (set_gemm_bpf) change
    no value: short and long K, masked last panels, a row block past a multiple of MR, bias
    and ReLU, input gradients (B: grad_out's planes), one and two threads; bit for bit the
    products without them, and against the reference."""
    rng = np.random.default_rng(11)
    for (n, c, l, h, k, pad) in [(3, 1, 32, 28, 5, 2), (2, 3, 13, 11, 3, 1),
                                 (2, 70, 9, 7, 1, 0), (1, 2, 40, 5, 3, 0),
                                 (2, 40, 17, 20, 1, 0)]:
        x = rng.uniform(-1, 1, (n, c, h, h)).astype(dtype)
        w = rng.uniform(-1, 1, (l, c, k, k)).astype(dtype)
        b = rng.uniform(-1, 1, l).astype(dtype)
        oh = h + 2 * pad - k + 1
        gy = rng.uniform(-1, 1, (n, l, oh, oh)).astype(dtype)
        got = {}
        for on in (1, 0):
            old = _kernels.set_gemm_cpf(on), _kernels.set_gemm_bpf(on * 256)
            try:
                with gemm_at(level), num_threads(2 if n > 1 else 1):
                    got[on] = (fc.conv2d(x, w, b, padding=pad),
                               F._conv2d(x, w, b, 1, pad, 1, 1, None, True),
                               fc.conv2d_backward(gy, x, w, padding=pad,
                                                  output_mask=(True, False, False))[0])
            finally:
                _kernels.set_gemm_cpf(old[0])
                _kernels.set_gemm_bpf(old[1])
        for a, e in zip(got[1], got[0]):
            np.testing.assert_array_equal(a, e)
        expect = ref.conv2d(x, w, b, padding=pad)
        close(got[1][0], expect, dtype)
        close(got[1][1], np.maximum(expect, 0), dtype)
        close(got[1][2], ref.conv2d_backward(gy, x, w, padding=pad)[0], dtype)
