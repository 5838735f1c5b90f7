"""The hand-vectorised loops (src/fastconv/_simd.h) against the naive reference, at both SIMD
levels this machine offers (AVX2+FMA where the CPU has it, and the portable code), on row
lengths that cover the full vectors, the masked tails and the blocked partial sums, and on the
values that take special paths: NaN, +-inf, huge logits, and arguments near exp's underflow."""
import contextlib

import numpy as np
import pytest

import fastconv as fc
from fastconv import _kernels
import reference as ref
from _helpers import num_threads

LEVELS = ["baseline"] + (["avx2"] if _kernels.set_simd(True) == "avx2" else [])
SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 255, 256, 257, 300, 1000]


@contextlib.contextmanager
def simd(level):
    before = _kernels.simd_level()
    try:
        assert _kernels.set_simd(level == "avx2") == level
        yield
    finally:
        _kernels.set_simd(before == "avx2")


# the levels of the cross-entropy rows: "avx512" is the AVX2 level with the rows' AVX-512 build
# on (set_simd512), "avx2" the same level with it off
XLEVELS = LEVELS + (["avx512"] if len(LEVELS) > 1 and _kernels.set_simd512(True) else [])


@contextlib.contextmanager
def xsimd(level):
    old512 = _kernels.set_simd512(level == "avx512")
    try:
        with simd("baseline" if level == "baseline" else "avx2"):
            yield
    finally:
        _kernels.set_simd512(old512)


def close(actual, expected, dtype):
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual)
    assert actual.dtype == np.dtype(dtype)
    scale = 1.0 + (np.nanmax(np.abs(np.where(np.isinf(expected), 0, expected)))
                   if expected.size else 0.0)
    if np.dtype(dtype) == np.float64:
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-11 * scale)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def test_levels_reported():
    assert _kernels.simd_level() in ("avx2", "baseline")
    assert LEVELS[0] == "baseline"
    with simd("baseline"):
        assert _kernels.simd_level() == "baseline"


@pytest.mark.parametrize("level", XLEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", SIZES)
def test_cross_entropy_rows(level, dtype, C):
    rng = np.random.default_rng(C)
    N = 5
    logits = rng.uniform(-8, 8, (N, C)).astype(dtype)
    logits[1] *= 20                        # far spread: many exp arguments underflow
    logits[2] += 1e4                       # huge, shifted logits
    labels = rng.integers(0, C, N)
    probs = rng.uniform(0, 1, (N, C))
    probs = (probs / probs.sum(1, keepdims=True)).astype(dtype)
    w = rng.uniform(0.1, 2, C).astype(dtype)
    with xsimd(level):
        for target in (labels, probs):
            for kw in (dict(), dict(weight=w, label_smoothing=0.1, reduction="none")):
                close(fc.cross_entropy(logits, target, **kw),
                      ref.cross_entropy(logits, target, **kw), dtype)
                close(fc.cross_entropy_backward(logits, target, **kw),
                      ref.cross_entropy_backward(logits, target, **kw), dtype)


@pytest.mark.parametrize("level", XLEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [8, 9, 16, 17, 33, 300])
def test_cross_entropy_special_values(level, dtype, C):
    """NaN anywhere in a row (vector body or tail) makes that row NaN, as in PyTorch; +inf
    too; -inf in another class is a zero probability; exp arguments around the float/double
    underflow limit (-87.3 / -708.4) give the reference's values."""
    rng = np.random.default_rng(100 + C)
    logits = rng.standard_normal((8, C)).astype(dtype)
    logits[0, 0] = np.nan
    logits[1, C - 1] = np.nan                 # in the masked tail for most C
    logits[2, C // 2] = np.inf
    logits[3, 1:] = -np.inf                   # only class 0 is possible
    logits[4, ::2] = -np.inf
    lim = -87.33654 if dtype == np.float32 else -708.3964
    logits[5] = np.linspace(lim - 2, lim + 2, C)
    logits[5, 0] = 0.0
    logits[6] = -np.inf                       # every class impossible: NaN, as in PyTorch
    labels = np.array([1, 0, 0, 0, 1, 3 % C, 0, 2], dtype=np.int64)
    labels[4] = 1                             # a possible class (odd columns are finite)
    with xsimd(level):
        for red in ("none", "sum"):
            got = fc.cross_entropy(logits, labels, reduction=red)
            want = ref.cross_entropy(logits, labels, reduction=red)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            ok = ~np.isnan(np.asarray(want))
            close(np.asarray(got)[ok], np.asarray(want)[ok], dtype)
            g = fc.cross_entropy_backward(logits, labels, reduction=red)
            gw = ref.cross_entropy_backward(logits, labels, reduction=red)
            np.testing.assert_array_equal(np.isnan(g), np.isnan(gw))
            ok = ~np.isnan(gw)
            close(g[ok], gw[ok], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_levels_agree(dtype):
    """The levels compute the same formulas; only the order of partial sums differs."""
    if len(LEVELS) < 2:
        pytest.skip("this CPU has no AVX2+FMA")
    rng = np.random.default_rng(7)
    logits = rng.uniform(-30, 30, (64, 1000)).astype(dtype)
    labels = rng.integers(0, 1000, 64)
    res = {}
    for level in XLEVELS:
        with xsimd(level):
            res[level] = (fc.cross_entropy(logits, labels, reduction="none"),
                          fc.cross_entropy_backward(logits, labels))
    tol = 1e-5 if dtype == np.float32 else 1e-13
    for level in XLEVELS[1:]:
        for a, b in zip(res["baseline"], res[level]):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("level", XLEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_special_values_match_torch(level, dtype):
    """The NaN/inf conventions above are PyTorch's (optional: needs torch)."""
    torch = pytest.importorskip("torch")
    logits = np.array([[0.5, np.inf, 1.0] + [0.0] * 14, [0.5] + [-np.inf] * 16,
                       [-np.inf] * 17, [np.nan] + [1.0] * 16, [1.0] * 16 + [np.nan]], dtype)
    labels = np.zeros(5, dtype=np.int64)
    t = torch.from_numpy(logits).requires_grad_()
    want = torch.nn.functional.cross_entropy(t, torch.from_numpy(labels), reduction="none")
    want.sum().backward()
    with xsimd(level):
        got = fc.cross_entropy(logits, labels, reduction="none")
        g = fc.cross_entropy_backward(logits, labels, reduction="none")
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6, atol=1e-7)


# the GEMM levels this CPU has: at "avx512" the 3x3 stride-2 max-pool backward runs its
# AVX-512 kernel (_gemm.h), below it the portable / AVX2 rows (_simd.h)
GEMM_LEVELS = [lv for lv in ("avx512", "avx2") if _kernels.set_gemm(lv) == lv]
_kernels.set_gemm("avx512")


@contextlib.contextmanager
def gemm_level(level):
    before = _kernels.gemm_level()
    try:
        _kernels.set_gemm(level)
        yield
    finally:
        _kernels.set_gemm(before)


@pytest.mark.parametrize("gemm", GEMM_LEVELS or ["blas"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,pad", [(3, 0), (3, 1), (2, 0)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_stride2_backward(gemm, level, dtype, k, pad, ceil_mode):
    """The stride-2 max-pool backward rows: 3x3 (fc_maxpool33s2_bwd: vector argmax over nine
    taps, accumulation without a scatter; fc_mp33_bwd at the AVX-512 GEMM level: the same in
    one pass on mask registers) and 2x2 (fc_maxpool22_bwd: one write per element) on widths
    that give full vectors, tails and only edge windows, with ties, NaN (the last NaN wins),
    -inf windows, +inf beside -inf, padding rows and ceil_mode overhangs, against the
    reference."""
    r = np.random.default_rng(7 + pad + 2 * ceil_mode + 4 * k)
    with simd(level), gemm_level(gemm):
        for W in (3, 4, 5, 6, 9, 17, 18, 19, 33, 34, 35, 70):
            H = int(r.integers(3, 9))
            x = r.integers(-2, 3, (2, 2, H, W)).astype(dtype)          # many ties
            x[0, 0, r.integers(0, H), r.integers(0, W)] = np.nan
            x[0, 1, r.integers(0, H), :] = np.nan                      # NaN rows
            x[1, 0, :3, :3] = -np.inf
            x[1, 0, 1, 1::2] = np.inf
            x[1, 1] = -np.inf                                          # all -inf plane
            kw = dict(kernel_size=k, stride=2, padding=pad, ceil_mode=ceil_mode)
            y = fc.max_pool2d(x, **kw)
            gy = r.uniform(-1, 1, y.shape).astype(dtype)
            close(fc.max_pool2d_backward(gy, x, **kw),
                  ref.max_pool2d_backward(gy, x, **kw), dtype)


@pytest.mark.skipif(not GEMM_LEVELS, reason="needs AVX2")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_stride2_backward_same_numbers_at_each_level(dtype):
    """The AVX-512 and AVX2 3x3 stride-2 max-pool backward kernels (_gemm.h) and the AVX-512
    2x2 one make the same argmax choices and the same additions in the same order as the
    portable rows (GEMM level 'blas', SIMD rows at each level): bit for bit equal results, on
    widths with 0-3 whole vectors of windows and tails (2x2: 14x14 planes' 7 windows a row,
    odd widths), NaN, -inf planes and ties."""
    r = np.random.default_rng(11)
    for W in (5, 14, 15, 16, 17, 28, 29, 33, 34, 35, 64, 65, 66, 67, 97, 130):
        x = r.integers(-3, 4, (2, 3, 11, W)).astype(dtype)
        x[0, 0, 2, 3] = np.nan
        x[0, 1, :5] = -np.inf
        x[1, 2] = r.standard_normal((11, W))
        for k, pad, ceil_mode in ((3, 1, False), (3, 0, True), (3, 1, True), (2, 0, False),
                                  (2, 0, True)):
            kw = dict(kernel_size=k, stride=2, padding=pad, ceil_mode=ceil_mode)
            gy = r.uniform(-1, 1, fc.max_pool2d(x, **kw).shape).astype(dtype)
            got = {}
            for lv in GEMM_LEVELS + ["blas"]:
                with gemm_level(lv):
                    got[lv] = fc.max_pool2d_backward(gy, x, **kw)
            for lv in GEMM_LEVELS:
                np.testing.assert_array_equal(got[lv], got["blas"], err_msg=lv)
            close(got["blas"], ref.max_pool2d_backward(gy, x, **kw), dtype)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(), dict(divisor_override=3), dict(ceil_mode=True)])
def test_avg_pool_2x2_stride2(level, dtype, kw):
    """The 2x2 stride-2 average-pool row (fc_avgpool22) on widths that give full vectors,
    tails and odd trailing columns, against the reference; ceil_mode overhangs keep the
    general path.  An all -0 window averages to +0, as PyTorch's sum from 0 does."""
    r = np.random.default_rng(3)
    with simd(level):
        for W in (2, 3, 5, 8, 9, 16, 17, 33, 34, 70):
            H = int(r.integers(2, 7))
            x = r.uniform(-1, 1, (2, 3, H, W)).astype(dtype)
            x[1, 2] = -0.0
            y = fc.avg_pool2d(x, 2, **kw)
            close(y, ref.avg_pool2d(x, 2, **kw), dtype)
            assert not np.signbit(y[1, 2]).any()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_2x2_stride2_forward(level, dtype):
    """The 2x2 stride-2 max-pool forward over whole planes (fc_maxpool22: rows folded, then
    pairs of one flat array) on even widths that give vector bodies and tails, several row
    chunks (W = 1000: two rows per chunk), odd widths and odd heights (the general path or
    an uncovered last row), with NaN (propagates), -inf and ties, against the reference."""
    r = np.random.default_rng(5)
    with simd(level):
        for H, W in ((2, 2), (3, 4), (4, 14), (7, 16), (5, 18), (6, 34), (9, 1000),
                     (4, 2048), (4, 2050), (5, 9), (4, 7)):
            x = r.integers(-2, 3, (2, 2, H, W)).astype(dtype)
            x[0, 0, r.integers(0, H), r.integers(0, W)] = np.nan
            x[0, 1, :, : W // 2] = -np.inf
            x[1, 0, 0, :] = np.nan
            close(fc.max_pool2d(x, 2), ref.max_pool2d(x, 2), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_2x2_levels_bit_for_bit(dtype):
    """fc_maxpool22 (the float one hand-written at AVX2) gives the baseline's bits: which of
    +0 / -0 wins a tie, which of two NaN payloads comes out, -inf, on widths with vector
    bodies and tails in both passes and several row chunks."""
    if len(LEVELS) < 2:
        pytest.skip("this CPU has no AVX2+FMA")
    r = np.random.default_rng(23)
    it = np.uint32 if dtype == np.float32 else np.uint64
    for H, W in ((4, 14), (6, 16), (8, 28), (5, 34), (4, 1000), (2, 2)):
        x = r.choice(np.array([0.0, -0.0, 1.0, -1.0, -np.inf], dtype), (3, 2, H, W))
        bits = x.view(it)
        nan_a = np.array(np.nan, dtype).view(it) | 1       # two NaN payloads
        nan_b = np.array(np.nan, dtype).view(it) | 2
        bits[r.random(x.shape) < 0.05] = nan_a
        bits[r.random(x.shape) < 0.05] = nan_b
        got = {}
        for level in LEVELS:
            with simd(level):
                got[level] = fc.max_pool2d(x, 2).view(it)
        np.testing.assert_array_equal(got["avx2"], got["baseline"])
        close(fc.max_pool2d(x, 2), ref.max_pool2d(x, 2), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_pool_forward_stacked_planes(level, dtype, threads):
    """Windows that tile the rows exactly (kernel == stride, no row padding, H = k * OH) pool
    all planes as one tall plane, cut into blocks of whole planes (stacked_rows), and
    fc_maxpool22 folds row pairs a whole number of vectors wide, reading into the next rows:
    each plane here has its own offset, with NaN, -inf and large values on its first and last
    rows, so a window or a fold that crossed into a neighbouring plane would show; odd widths
    (the general row path), column padding, ceil_mode and a single plane (the per-plane
    paths), max and average, against the reference."""
    r = np.random.default_rng(17 + threads)
    shapes = [((3, 5, 14, 14), 2, {}), ((2, 6, 8, 7), 2, {}), ((2, 3, 9, 10), 3, {}),
              ((4, 4, 2, 2), 2, {}), ((2, 3, 6, 18), 2, dict(padding=(0, 1))),
              ((2, 2, 4, 1000), 2, {}), ((2, 3, 7, 14), 2, dict(ceil_mode=True)),
              ((1, 1, 14, 14), 2, {}), ((5, 7, 4, 30), 2, {})]
    with simd(level), num_threads(threads):
        for shape, k, kw in shapes:
            x = r.integers(-3, 4, shape).astype(dtype)
            x += 10 * np.arange(shape[0] * shape[1]).reshape(shape[:2] + (1, 1)).astype(dtype)
            x[0, 0, -1, :] = 1e6
            x[-1, -1, 0, ::2] = np.nan
            x[0, -1, 0, :] = -np.inf
            close(fc.max_pool2d(x, k, **kw), ref.max_pool2d(x, k, **kw), dtype)
            y = fc.avg_pool2d(x, k, **kw)
            close(y, ref.avg_pool2d(x, k, **kw), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_max_pool_forward_small_planes_in_lanes(level, dtype, threads):
    """Planes of at most 256 values and rows shorter than 16 are max-pooled 16 at a time,
    one plane per vector lane (fc_maxpool_lanes), the remaining N*C % 16 planes by the
    per-plane paths: kernels,
    strides, paddings, dilations and ceil_mode overhangs on odd and even small planes, with
    NaN (propagates), +-inf, ties and -0, in planes at every lane position, against the
    reference (values; return_indices keeps the per-plane path and must agree)."""
    r = np.random.default_rng(23 + threads)
    cases = [((2, 17, 7, 7), dict(kernel_size=2)),
             ((3, 16, 14, 14), dict(kernel_size=3, stride=2, padding=1)),
             ((1, 33, 9, 11), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
             ((2, 8, 16, 15), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0))),
             ((1, 40, 6, 5), dict(kernel_size=3, stride=1, padding=1, dilation=2)),
             ((4, 5, 1, 13), dict(kernel_size=(1, 3), stride=1)),
             ((1, 16, 15, 17), dict(kernel_size=3, stride=3, ceil_mode=True)),
             ((2, 9, 4, 4), dict(kernel_size=4)),
             ((1, 18, 10, 10), dict(kernel_size=2, stride=1, padding=1))]
    with simd(level), num_threads(threads):
        for shape, kw in cases:
            x = r.integers(-3, 4, shape).astype(dtype)
            flat = x.reshape(-1, shape[2] * shape[3])
            flat[1, r.integers(0, flat.shape[1])] = np.nan
            flat[5, :] = -np.inf
            flat[6, :: 2] = np.inf
            flat[15, :] = np.nan
            flat[-1, 0] = np.nan
            flat[9] = np.where(flat[9] == 0, -0.0, flat[9])
            expected = ref.max_pool2d(x, **kw)
            y = fc.max_pool2d(x, **kw)
            close(y, expected, dtype)
            assert (np.signbit(y) == np.signbit(expected)).all()
            close(fc.max_pool2d(x, return_indices=True, **kw)[0], expected, dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_forward_small_planes_in_lanes(level, dtype, threads, count_include_pad):
    """Average pooling of small planes 16 at a time in vector lanes (fc_avgpool_lanes, with
    the divisors made once per call), the N*C % 16 others per plane: global pooling, padding
    with and without counting it, divisor_override, ceil_mode overhangs (windows cut by the
    image's edge and by the padding's), with NaN and +-inf in some planes, against the
    reference."""
    r = np.random.default_rng(29 + threads + 2 * count_include_pad)
    cases = [((2, 40, 7, 7), dict(kernel_size=7)),
             ((2, 17, 7, 7), dict(kernel_size=2)),
             ((3, 16, 14, 14), dict(kernel_size=3, stride=2, padding=1)),
             ((1, 33, 9, 11), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
             ((1, 20, 5, 6), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1),
                                  divisor_override=5)),
             ((1, 16, 15, 13), dict(kernel_size=4, stride=3, padding=2, ceil_mode=True)),
             ((4, 5, 1, 13), dict(kernel_size=(1, 3), stride=1))]
    with simd(level), num_threads(threads):
        for shape, kw in cases:
            x = r.uniform(-1, 1, shape).astype(dtype)
            flat = x.reshape(-1, shape[2] * shape[3])
            flat[1, r.integers(0, flat.shape[1])] = np.nan
            flat[5, 0] = np.inf
            flat[6, -1] = -np.inf
            kw = dict(kw, count_include_pad=count_include_pad)
            close(fc.avg_pool2d(x, **kw), ref.avg_pool2d(x, **kw), dtype)


@pytest.mark.parametrize("x512", [True, False])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pad", [0, 1, (0, 1), (1, 0)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_3x3_stride2_forward(x512, level, dtype, pad, ceil_mode):
    """The 3x3 stride-2 max-pool forward (fc_maxpool33s2: rows reduced horizontally once,
    then three rows; the flat path for even widths with column padding 1) on widths that
    give vector bodies, tails and single windows, heights that give several row blocks
    (W = 1000, 999), odd and even sizes, both paddings and ceil_mode overhangs, with NaN
    (propagates), -inf rows, +inf beside -inf and ties, against the reference; values only
    (return_indices keeps the general path, checked against the same reference).  x512: the
    float64 build for AVX-512 where the CPU has it (set_simd512), else the AVX2 one."""
    r = np.random.default_rng(11 + 2 * ceil_mode + (hash(str(pad)) % 5))
    old512 = _kernels.set_simd512(x512)
    try:
        with simd(level):
            for H, W in ((1, 1), (2, 2), (3, 3), (2, 5), (4, 6), (5, 7), (6, 8), (3, 17), (7, 18),
                         (8, 34), (9, 35), (5, 56), (40, 70), (20, 1000), (19, 999), (9, 2)):
                ph, pw = (pad, pad) if isinstance(pad, int) else pad
                if H + 2 * ph < 3 or W + 2 * pw < 3:
                    continue                                    # no window fits
                x = r.integers(-2, 3, (2, 2, H, W)).astype(dtype)
                x[0, 0, r.integers(0, H), r.integers(0, W)] = np.nan
                x[0, 1, r.integers(0, H), :] = np.nan
                x[1, 0, : (H + 1) // 2, :] = -np.inf
                x[1, 0, -1, ::2] = np.inf
                x[1, 1] = -np.inf
                kw = dict(kernel_size=3, stride=2, padding=pad, ceil_mode=ceil_mode)
                expected = ref.max_pool2d(x, **kw)
                close(fc.max_pool2d(x, **kw), expected, dtype)
                close(fc.max_pool2d(x, return_indices=True, **kw)[0], expected, dtype)
    finally:
        _kernels.set_simd512(old512)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_col2im_stride2_tap_pairs(level, dtype):
    """col2im with stride 2 along the width adds taps kw and kw + 1 in one interleaved pass
    (fc_col2im_pair) over their common columns, the rest one by one: transposed
    convolutions (its forward) and conv2d's input gradient with even and odd kernel widths,
    paddings that clip either tap, output_padding, and widths from one column up, against
    the reference."""
    r = np.random.default_rng(13)
    with simd(level):
        for w in (1, 2, 3, 5, 8, 9, 16, 17, 33):
            for k, p, op in ((4, 1, 0), (2, 0, 1), (3, 1, 1), (5, 2, 0), (4, 2, 1), (1, 0, 0)):
                if op >= 2 or (w - 1) * 2 - 2 * p + k + op < 1:
                    continue
                x = r.uniform(-1, 1, (2, 3, 3, w)).astype(dtype)
                wt = r.uniform(-1, 1, (3, 2, 2, k)).astype(dtype)
                kw = dict(stride=(1, 2), padding=(0, p), output_padding=(0, op))
                close(fc.conv_transpose2d(x, wt, **kw), ref.conv_transpose2d(x, wt, **kw),
                      dtype)
                wc = r.uniform(-1, 1, (4, 3, 2, k)).astype(dtype)
                ckw = dict(stride=(1, 2), padding=(0, p))
                if w + 2 * p < k:
                    continue
                y = fc.conv2d(x, wc, **ckw)
                gy = r.uniform(-1, 1, y.shape).astype(dtype)
                gx = fc.conv2d_backward(gy, x, wc, **ckw)[0]
                close(gx, ref.conv2d_backward(gy, x, wc, **ckw)[0], dtype)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_col2im_stride1_row_runs(level, dtype):
    """col2im with stride 1 along the width adds each tap's valid rows in one call
    (fc_col2im_s1): conv2d's input gradient (not Winograd: 5x5, 2x3, dilated, row stride 2)
    and stride-1 transposed convolutions, paddings that clip rows and columns on both sides,
    widths that give full vectors and tails, against the reference."""
    r = np.random.default_rng(19)
    with simd(level):
        for h, w in ((3, 1), (5, 7), (6, 9), (14, 14), (4, 17), (2, 33)):
            for k, p, s, d in (((5, 5), (2, 2), (1, 1), 1), ((2, 3), (0, 1), (2, 1), 1),
                               ((3, 3), (2, 2), (1, 1), 2), ((1, 4), (0, 3), (1, 1), 1)):
                if h + 2 * p[0] < d * (k[0] - 1) + 1 or w + 2 * p[1] < d * (k[1] - 1) + 1:
                    continue
                x = r.uniform(-1, 1, (2, 3, h, w)).astype(dtype)
                wc = r.uniform(-1, 1, (4, 3) + k).astype(dtype)
                ckw = dict(stride=s, padding=p, dilation=d)
                y = fc.conv2d(x, wc, **ckw)
                gy = r.uniform(-1, 1, y.shape).astype(dtype)
                close(fc.conv2d_backward(gy, x, wc, **ckw)[0],
                      ref.conv2d_backward(gy, x, wc, **ckw)[0], dtype)
                wt = r.uniform(-1, 1, (3, 2) + k).astype(dtype)
                tp = (min(p[0], k[0] - 1), min(p[1], k[1] - 1))
                if h - 1 - 2 * tp[0] + k[0] < 1 or w - 1 - 2 * tp[1] + k[1] < 1:
                    continue
                tkw = dict(stride=(1, 1), padding=tp)
                close(fc.conv_transpose2d(x, wt, **tkw), ref.conv_transpose2d(x, wt, **tkw),
                      dtype)


@pytest.mark.parametrize("level", XLEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [3, 5])
def test_winograd_transforms(level, dtype, k, monkeypatch):
    """The Winograd transforms (_winograd.h, compiled for both levels, the float input
    transform's tile rows and even/odd split also in AVX-512 intrinsics): runs of interior
    tiles (vectorised across tiles, 16 a vector and masked tails at "avx512") beside edge
    tiles, odd output sizes, paddings 0-4 and grad_x's cropping (padding k - 1 - p < 0), for
    3x3 and 5x5 kernels, against the reference; at "avx512" also bit for bit against the AVX2
    build (the same additions; 5x5 has no AVX-512 code of its own).  3x3: also the weight
    gradient's transforms (grad_out's, runs of whole tiles beside the bottom and right
    edge's partial ones, and the last step's)."""
    from fastconv import functional as F
    monkeypatch.setattr(F, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(F, "_WINOGRAD_MIN_SIZE", 1)
    monkeypatch.setattr(F, "_WGRAD_WINO_MIN_SIZE", 1)
    r = np.random.default_rng(9)
    with xsimd(level):
        for H, W, p in ((3, 3, 0), (5, 8, 1), (9, 19, 1), (12, 37, 2), (7, 40, 0),
                        (3, 2, 4), (6, 11, 3), (8, 32, 1), (6, 33, 1), (5, 64, 0), (9, 71, 1),
                        (4, 96, (0, 1))):
            x = r.uniform(-1, 1, (2, 3, H, W)).astype(dtype)
            w = r.uniform(-1, 1, (4, 3, k, k)).astype(dtype)
            b = r.uniform(-1, 1, 4).astype(dtype)
            ph, pw = (p, p) if isinstance(p, int) else p
            if min(H + 2 * ph, W + 2 * pw) >= k:
                y = fc.conv2d(x, w, b, padding=p)
                close(y, ref.conv2d(x, w, b, padding=p), dtype)
                gy = r.uniform(-1, 1, y.shape).astype(dtype)
                gx, gw, gb = fc.conv2d_backward(gy, x, w, padding=p)
                want = ref.conv2d_backward(gy, x, w, padding=p)
                close(gx, want[0], dtype)
                close(gw, want[1], dtype)
                close(gb, want[2], dtype)
                if level == "avx512":
                    with xsimd("avx2"):
                        np.testing.assert_array_equal(fc.conv2d(x, w, b, padding=p), y)
                        np.testing.assert_array_equal(
                            fc.conv2d_backward(gy, x, w, padding=p)[0], gx)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depthwise_3x3_padded_planes(level, dtype):
    """3x3 stride-1 depthwise planes through a zero-padded copy (one fc_dw3 pass a row):
    paddings 0-3, planes either side of the copy's size limit (88 + 2 and 90 + 2 wide), and
    a channel with an infinite weight (the padded copy would give inf * 0 = NaN at the
    edges: it keeps the tap-by-tap path), against the reference; and the backward pass with
    paddings up to 4 (its input gradient's forward pass then has a negative padding)."""
    r = np.random.default_rng(4)
    with simd(level):
        for H, W, p in ((3, 3, 0), (4, 9, 1), (7, 17, 2), (5, 33, 3), (88, 88, 1),
                        (90, 90, 1), (90, 90, 0)):
            x = r.uniform(-1, 1, (2, 3, H, W)).astype(dtype)
            w = r.uniform(-1, 1, (3, 1, 3, 3)).astype(dtype)
            b = r.uniform(-1, 1, 3).astype(dtype)
            w[2, 0, 0, 0] = np.inf
            x[1, 2, 0, 0] = np.nan
            close(fc.conv2d(x, w, b, padding=p, groups=3),
                  ref.conv2d(x, w, b, padding=p, groups=3), dtype)
        # the input gradient at stride 1 is a forward pass with the padding 2 - p: negative
        # from p = 3 on (the padded copy then wrote before its stack buffer: SIGSEGV)
        for H, W, p in ((4, 4, 3), (5, 6, (4, 1)), (3, 7, (0, 3)), (6, 5, 2)):
            x = r.uniform(-1, 1, (2, 3, H, W)).astype(dtype)
            w = r.uniform(-1, 1, (3, 1, 3, 3)).astype(dtype)
            y = ref.conv2d(x, w, padding=p, groups=3)
            gy = r.uniform(-1, 1, y.shape).astype(dtype)
            got = fc.conv2d_backward(gy, x, w, padding=p, groups=3)
            for g, e in zip(got, ref.conv2d_backward(gy, x, w, padding=p, groups=3)):
                close(g, e, dtype)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depthwise_3x3_plane_kernels(level, dtype):
    """The whole-plane 3x3 stride-1 kernels over a zero-padded copy (fc_dw33_fwd: two output
    rows a pass, the last of an odd count alone; fc_dw33_gw: the nine weight-gradient taps
    and the bias gradient in one pass): every row tail of a vector of 8 floats / 4 doubles
    (widths 1-19), odd and even heights, paddings 0-2 per axis, a channel multiplier of 2
    (input gradient summed over two planes), NaN in x; and an infinite gy on the border,
    whose padded sums would be inf * 0 = NaN where the definition has no term (that plane
    redone tap by tap), against the reference."""
    r = np.random.default_rng(11)
    with simd(level):
        for W in range(1, 20):
            for H, p, M in ((1 + W % 4, (1, 1), 1), (2 + W % 3, (W % 3, 1), 2),
                            (3 + W % 2, (2, W % 3), 1)):
                x = r.uniform(-1, 1, (2, 3, H, W)).astype(dtype)
                w = r.uniform(-1, 1, (3 * M, 1, 3, 3)).astype(dtype)
                b = r.uniform(-1, 1, 3 * M).astype(dtype)
                kw = dict(padding=p, groups=3)
                if H + 2 * p[0] < 3 or W + 2 * p[1] < 3:
                    continue
                x[1, 2, H // 2, W // 2] = np.nan
                y = fc.conv2d(x, w, b, **kw)
                close(y, ref.conv2d(x, w, b, **kw), dtype)
                gy = r.uniform(-1, 1, y.shape).astype(dtype)
                gy[0, 1, 0, -1] = np.inf           # its taps reach the padding when p > 0
                got = fc.conv2d_backward(gy, x, w, **kw)
                for g, e in zip(got, ref.conv2d_backward(gy, x, w, **kw)):
                    close(g, e, dtype)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depthwise_any_kernel_planes(level, dtype):
    """Depthwise planes of any kernel at stride 1 or 2 along the width over a zero-padded
    copy (fc_dwk_fwd: blocks of 4 x 2, 2 x 4 or 1 x 8 vectors x rows, chosen by the output
    width; fc_dwk_gw: taps in groups of up to 8 a pass; stride 2 through the even and odd
    columns' planes): kernels 1-7 (square and not), strides 1-3 along the height, dilation
    1-2, paddings from 0 to half the kernel, output widths 1-19 (every vector tail) and a
    wide one, a channel multiplier of 2, NaN in x; the input gradient at strides > 1 by
    phases (some with no tap), stored or, with the multiplier, added; an infinite weight
    (forward and input gradient tap by tap) and an infinite gy on the border (weight
    gradient tap by tap), against the reference."""
    r = np.random.default_rng(12)
    cases = []
    for i, (kh, kw) in enumerate([(1, 1), (2, 2), (3, 3), (5, 5), (7, 7), (3, 5), (5, 2),
                                  (4, 3), (1, 3)]):
        for sh, sw in ((1, 1), (2, 2), (1, 2), (3, 1), (2, 1)):
            d = 1 + (i + sh) % 2 if kh * kw > 1 else 1
            cases.append((kh, kw, sh, sw, d, (kh // 2, kw // 2) if i % 2 else (0, kw // 2)))
    with simd(level):
        for j, (kh, kw, sh, sw, d, p) in enumerate(cases):
            W = 1 + j % 19 + (40 if j % 7 == 0 else 0)
            H = 2 + j % 5
            M = 1 + j % 2
            x = r.uniform(-1, 1, (2, 3, H, W)).astype(dtype)
            w = r.uniform(-1, 1, (3 * M, 1, kh, kw)).astype(dtype)
            b = r.uniform(-1, 1, 3 * M).astype(dtype)
            kw_ = dict(stride=(sh, sw), padding=p, dilation=d, groups=3)
            if (H + 2 * p[0] - d * (kh - 1) - 1 < 0) or (W + 2 * p[1] - d * (kw - 1) - 1 < 0):
                continue
            x[1, 2, H // 2, W // 2] = np.nan
            w[-1, 0, 0, 0] = np.inf if j % 3 != 2 else w[-1, 0, 0, 0]
            y = fc.conv2d(x, w, b, **kw_)
            close(y, ref.conv2d(x, w, b, **kw_), dtype)
            if j % 3 != 1:          # (else inf: the input gradient tap by tap)
                w[-1, 0, 0, 0] = 0.5
            gy = r.uniform(-1, 1, y.shape).astype(dtype)
            if j % 2:
                gy[0, 1, 0, -1] = np.inf          # its taps reach the padding when p > 0
            got = fc.conv2d_backward(gy, x, w, **kw_)
            for g, e in zip(got, ref.conv2d_backward(gy, x, w, **kw_)):
                close(g, e, dtype)


@pytest.mark.parametrize("x512", [True, False])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_upsample_x2_rows(x512, level, dtype):
    """Nearest upsampling by 2 along the width (fc_ups2_row: both output rows of x2 along the
    height written in one pass, one row at x1, the rest copied at x3): widths that give no
    full vector, full vectors of 8 doubles / 16 floats and every masked tail of both, with
    NaN and infinities (copied as they are), against the reference; bit for bit, since
    upsampling only copies.  x512: the AVX-512 build where the CPU has it (set_simd512)."""
    r = np.random.default_rng(5)
    old512 = _kernels.set_simd512(x512)
    try:
        with simd(level):
            for W in list(range(1, 41)) + [63, 64, 65, 100]:
                x = r.uniform(-1, 1, (2, 3, 3, W)).astype(dtype)
                x[0, 1, 2, r.integers(0, W)] = np.nan
                x[1, 2, 0, -1] = np.inf
                x[1, 0, 1, 0] = -np.inf
                for scale in (2, (1, 2), (3, 2), (2, 1)):
                    got = fc.upsample_nearest2d(x, scale)
                    np.testing.assert_array_equal(got, ref.upsample_nearest2d(x, scale))
                    # the same rows written into an array with values already in it
                    out = np.full_like(got, 7.0)
                    fc.upsample_nearest2d(x, scale, out=out)
                    np.testing.assert_array_equal(out, got)
    finally:
        _kernels.set_simd512(old512)
