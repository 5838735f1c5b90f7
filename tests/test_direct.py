"""The direct convolution kernels (_direct.h: tiles of 2 vectors of output channels x up to 14
pixels of one output row, summed over all taps in registers, the input read through zero-padded
rows) against im2col + GEMM, bit for bit, and against the naive reference."""
import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
import fastconv.functional as F
import fastconv.nn as nn
from fastconv import _kernels
import reference as ref
from _helpers import close as _close, num_threads

pytestmark = pytest.mark.skipif(not _kernels.direct_ok(),
                                reason="the direct kernels need the AVX-512 or AVX2 level")

# the own GEMM's levels here, each with its own tiles (AVX-512: 2 x 16 float / 2 x 8 double
# channels x up to 14 pixels; AVX2: 2 x 8 / 2 x 4 x up to 6)
BEST = _kernels.gemm_level()
DIRECT_LEVELS = [lv for lv in ("avx512", "avx2") if _kernels.set_gemm(lv) == lv]
_kernels.set_gemm(BEST)


@contextlib.contextmanager
def at_level(level):
    _kernels.set_gemm(level)
    try:
        yield
    finally:
        _kernels.set_gemm(BEST)


@pytest.fixture(params=DIRECT_LEVELS or ["none"])
def level(request):
    with at_level(request.param):
        yield request.param


@contextlib.contextmanager
def chunks(taps, block, dtype):
    """The direct kernels' K blocking in chunks of `taps` taps (None: as set), at every
    stride (AVX2's stride 2 has its own setting)."""
    if taps is None:
        yield
        return
    nbytes = taps * block * np.dtype(dtype).itemsize
    old = _kernels.set_direct_kc(nbytes, 0)
    old2 = _kernels.set_direct_kc(nbytes, 0, stride2=True)
    try:
        yield
    finally:
        _kernels.set_direct_kc(*old)
        _kernels.set_direct_kc(*old2, stride2=True)


def conv_inputs(draw, dtype, n, groups, cg, lg, h, w, kh, kw):
    """(x, weight, bias or None) of a drawn convolution: uniform values, a NaN in x or not."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31), label="seed"))
    x = rng.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    if draw(st.booleans(), label="nan"):
        x[rng.integers(n), rng.integers(cg * groups), rng.integers(h), rng.integers(w)] = np.nan
    wt = rng.uniform(-1, 1, (lg * groups, cg, kh, kw)).astype(dtype)
    b = rng.uniform(-1, 1, lg * groups).astype(dtype) if draw(st.booleans(), "bias") else None
    return x, wt, b


def close(actual, expected, dtype):
    _close(actual, expected, dtype, atol32=2e-5)


def spy_direct(mp):
    """A list that gets (sH, sW) of every kernel call by the direct kernels (a plan's run
    with no packed weights: _conv2d_own runs every conv2d_direct call) while mp's patch
    holds."""
    calls = []
    real = F._conv2d_own

    def spy(plan, *args, **kwargs):
        if plan.nwpack == 0:
            calls.append((plan.sH, plan.sW))
        return real(plan, *args, **kwargs)

    mp.setattr(F, "_conv2d_own", spy)
    return calls


def both_ways(*args, **kwargs):
    """conv2d by the direct kernels wherever they can run, and never."""
    got = {}
    try:
        for mode in ("always", "never"):
            F._DIRECT = mode
            got[mode] = F._conv2d(*args, **kwargs)
    finally:
        F._DIRECT = "auto"
    return got["always"], got["never"]


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", DIRECT_LEVELS or ["none"])
@given(data=st.data())
def test_direct_same_numbers_as_im2col(level, data):
    """Kernels 1x1 to 7x7, strides 1-3 down and 1-2 across, dilations, paddings (asymmetric
    'same' too), groups, one or two blocks of output channels per group, output rows wider
    than a tile (tails of every width), bias, the fused ReLU, NaN in the input, 1-3 threads
    (bands of rows when there are few images), the taps in one pass or in chunks of 1-25
    (K blocking: the sums kept between chunks), both dtypes, at each level."""
    draw = data.draw
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    with at_level(level):
        block = _kernels.direct_block(np.dtype(dtype).itemsize)
    groups = draw(st.integers(1, 2), label="groups")
    cg = draw(st.integers(1, 5), label="cg")
    lg = block * draw(st.integers(1, 2), label="blocks")
    kh, kw = draw(st.integers(1, 7), label="kH"), draw(st.integers(1, 7), label="kW")
    s = (draw(st.integers(1, 3), label="sH"), draw(st.integers(1, 2), label="sW"))
    d = (draw(st.integers(1, 2), label="dH"), draw(st.integers(1, 2), label="dW"))
    same = s == (1, 1) and draw(st.booleans(), label="same")
    p = "same" if same else (draw(st.integers(0, 3), label="pH"), draw(st.integers(0, 3), "pW"))
    h = d[0] * (kh - 1) + 1 + draw(st.integers(0, 12), label="dh")
    w = d[1] * (kw - 1) + 1 + draw(st.integers(0, 40), label="dw")
    n = draw(st.integers(1, 3), label="N")
    threads = draw(st.integers(1, 3), label="threads")
    relu = draw(st.booleans(), label="relu")
    taps = draw(st.sampled_from([None, 1, 3, 8, 25]), label="chunk")
    x, wt, b = conv_inputs(draw, dtype, n, groups, cg, lg, h, w, kh, kw)
    x0 = x.copy()
    with num_threads(threads), at_level(level), chunks(taps, block, dtype):
        y, y0 = both_ways(x, wt, b, s, p, d, groups, None, relu)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(x, x0)
    expected = ref.conv2d(x, wt, b, stride=s, padding=p, dilation=d, groups=groups)
    if relu:
        expected = np.maximum(expected, 0)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(y), nan)
    close(np.where(nan, 0, y), np.where(nan, 0, expected), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", DIRECT_LEVELS or ["none"])
@given(data=st.data())
def test_direct_fused_max_pool(level, data):
    """Conv2d -> [ReLU ->] MaxPool2d fused into the direct kernels (windows that tile the
    output: kernel == stride, floor mode; each band of rows pooled once computed), keeping
    the convolution's output or not: bit for bit the own GEMM's fused pooling, and the
    reference's max-pool of the convolution: windows 1x1 to 3x3 (rows and columns left over),
    strides, paddings, groups, NaN in the input, 1-3 threads (bands of whole windows when
    there are few images), both dtypes, at each level; inputs unchanged."""
    draw = data.draw
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    with at_level(level):
        block = _kernels.direct_block(np.dtype(dtype).itemsize)
    groups = draw(st.integers(1, 2), label="groups")
    cg = draw(st.integers(groups, 4), label="cg")       # (one channel per group: depthwise)
    lg = block * draw(st.integers(1, 2), label="blocks")
    kh, kw = draw(st.integers(1, 5), label="kH"), draw(st.integers(1, 5), label="kW")
    s = (draw(st.integers(1, 2), label="sH"), draw(st.integers(1, 2), label="sW"))
    p = (draw(st.integers(0, 2), label="pH"), draw(st.integers(0, 2), label="pW"))
    pool = (draw(st.integers(1, 3), label="pkH"), draw(st.integers(1, 3), label="pkW"))
    # output rows / columns: at least one window, some left over
    oh = pool[0] * draw(st.integers(1, 5), label="wh") + draw(st.integers(0, pool[0] - 1), "rh")
    ow = pool[1] * draw(st.integers(1, 8), label="ww") + draw(st.integers(0, pool[1] - 1), "rw")
    h = (oh - 1) * s[0] + kh - 2 * p[0]
    w = (ow - 1) * s[1] + kw - 2 * p[1]
    if h < 1 or w < 1:
        h, w, p = (oh - 1) * s[0] + kh, (ow - 1) * s[1] + kw, (0, 0)
    n = draw(st.integers(1, 3), label="N")
    threads = draw(st.integers(1, 3), label="threads")
    relu = draw(st.booleans(), label="relu")
    keep = draw(st.booleans(), label="keep")
    taps = draw(st.sampled_from([None, 1, 7]), label="chunk")
    x, wt, b = conv_inputs(draw, dtype, n, groups, cg, lg, h, w, kh, kw)
    x0 = x.copy()
    with num_threads(threads), at_level(level), chunks(taps, block, dtype), \
            pytest.MonkeyPatch.context() as mp:
        calls = spy_direct(mp)
        (y, pooled), (y0, pooled0) = both_ways(x, wt, b, s, p, 1, groups, None, relu,
                                               pool=pool, keep=keep)
    assert len(calls) == 1
    np.testing.assert_array_equal(pooled, pooled0)
    np.testing.assert_array_equal(x, x0)
    conv = ref.conv2d(x, wt, b, stride=s, padding=p, groups=groups)
    if relu:
        conv = np.maximum(conv, 0)
    assert conv.shape[2:] == (oh, ow)
    if keep:
        np.testing.assert_array_equal(y, y0)
        nan = np.isnan(conv)
        np.testing.assert_array_equal(np.isnan(y), nan)
        close(np.where(nan, 0, y), np.where(nan, 0, conv), dtype)
    else:
        assert y is None and y0 is None
    expected = ref.max_pool2d(conv, pool)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(pooled), nan)
    close(np.where(nan, 0, pooled), np.where(nan, 0, expected), dtype)


@pytest.mark.parametrize("case,dtype", [
    # (N, C, L, H, W, k, stride, padding): shapes the automatic rule sends to the kernels
    ((4, 8, 32, 10, 12, 5, 1, 2), np.float32),        # 5x5, a batch
    ((4, 8, 32, 10, 12, 5, 1, 2), np.float64),
    ((4, 3, 32, 20, 23, 7, 2, 3), np.float32),        # 7x7 stride 2 from 3 channels
    ((4, 3, 32, 20, 23, 7, 2, 3), np.float64),
    ((1, 16, 32, 9, 26, 3, 2, 1), np.float64),        # 3x3 stride 2, float64
])
def test_direct_automatic_cases(level, case, dtype, monkeypatch):
    """The shapes that _use_direct sends to the direct kernels by itself give the reference's
    numbers through conv2d and nn.Conv2d (with the fused ReLU), with out=, and on a
    non-contiguous, read-only input."""
    N, C, L, H, W, k, s, p = case
    calls = spy_direct(monkeypatch)
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (N, C, H, 2 * W)).astype(dtype)[:, :, :, ::2]    # non-contiguous
    x.flags.writeable = False
    wt = rng.uniform(-1, 1, (L, C, k, k)).astype(dtype)
    b = rng.uniform(-1, 1, L).astype(dtype)
    expected = ref.conv2d(x, wt, b, stride=s, padding=p)
    y = fc.conv2d(x, wt, b, stride=s, padding=p)
    close(y, expected, dtype)
    out = np.empty_like(y)
    assert fc.conv2d(x, wt, b, stride=s, padding=p, out=out) is out
    np.testing.assert_array_equal(out, y)
    conv = nn.Conv2d(C, L, k, stride=s, padding=p, dtype=dtype)
    conv.weight.data[...] = wt
    conv.bias.data[...] = b
    model = nn.Sequential(conv, nn.ReLU())
    close(model(x), np.maximum(expected, 0), dtype)
    assert len(calls) == 3


def test_direct_rule(level):
    """The automatic rule: 5x5s (batch 1 too) and 7x7 stride-2 stems in both dtypes; at
    AVX-512 3x3 stride 2 in float64 and, from at most 64 channels, in float32 over a batch;
    at AVX2 a fused pool at batch 1 too and every 3x3 stride 2 (its taps in chunks);
    never taps that sum fewer than 64 values, output channels off the block size, a stride
    of 3 across, or tiles narrower than 10 pixels (AVX-512) / 4 (AVX2)."""
    avx2 = level == "avx2"
    def use(N, C, L, k, s, dtype, H=20, pool=None, groups=1):
        x = np.zeros((N, C, H, H), dtype)
        w = np.zeros((L, C // groups, k, k), dtype)
        geo = F._conv_setup("conv2d", x, w, s, k // 2, 1, groups, False)
        return F._use_direct(geo, w.shape[1], np.dtype(dtype), pool, N)

    with num_threads(1):
        assert use(8, 32, 64, 5, 1, np.float32)
        assert use(8, 3, 64, 7, 2, np.float32)
        assert use(1, 3, 64, 7, 2, np.float32)          # a stem, even at batch 1
        assert use(1, 16, 32, 3, 2, np.float32) == avx2
        assert use(1, 64, 128, 3, 2, np.float32) == avx2
        assert use(1, 128, 256, 3, 2, np.float32) == avx2
        assert use(1, 64, 128, 3, 2, np.float64)
        assert use(8, 16, 32, 3, 2, np.float32)
        assert use(8, 64, 128, 3, 2, np.float32)
        assert use(8, 128, 256, 3, 2, np.float32) == avx2
        assert use(8, 64, 128, 3, 2, np.float64)
        assert use(8, 128, 256, 3, 2, np.float64)
        assert use(1, 64, 64, 5, 1, np.float64)
        assert use(1, 64, 64, 5, 1, np.float32)         # batch 1 too (since 2026-12-05)
        assert not use(8, 1, 32, 5, 1, np.float32)      # 25 taps
        assert use(8, 32, 64, 5, 1, np.float32, pool=(2, 2))    # the pool fused in too
        assert use(1, 32, 64, 5, 1, np.float32, pool=(2, 2)) == avx2
        assert use(8, 32, 64, 5, 1, np.float64, pool=(2, 2))
        assert use(1, 32, 64, 5, 1, np.float64, pool=(2, 2)) == avx2  # AVX-512: the GEMM's
        assert use(1, 32, 64, 5, 1, np.float64)                     # (without the pool)
        assert not use(8, 32, 40, 5, 1, np.float32)     # 40 channels: not whole blocks
        assert not use(8, 32, 64, 5, (1, 3), np.float32)
        assert not use(8, 32, 64, 3, 1, np.float32)     # 3x3 stride 1: Winograd / GEMM
        # rows of 16: tiles of 8 at AVX-512 (too narrow), of 6, 6 and 4 at AVX2
        assert use(8, 32, 64, 5, 1, np.float32, H=16) == avx2
        assert not use(8, 32, 64, 5, 1, np.float32, H=3)    # rows of 3: tiles of 3


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("level", DIRECT_LEVELS or ["none"])
@given(data=st.data())
def test_direct_grad_x(level, data):
    """conv2d_backward's grad_x of a stride-1 convolution as the direct convolution of
    grad_out by the flipped, transposed kernel with the complementary paddings (and the
    weight and bias gradients beside it): the reference's numbers for kernels 1x1 to 5x5,
    dilations, symmetric, asymmetric ('same') and zero paddings, groups, NaN in grad_out,
    1-3 threads, both dtypes; paddings past the kernel's reach (a negative complementary
    padding) take the GEMM path."""
    draw = data.draw
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    with at_level(level):
        block = _kernels.direct_block(np.dtype(dtype).itemsize)
    groups = draw(st.integers(1, 2), label="groups")
    cg = block * draw(st.integers(1, 2), label="blocks")     # grad_x's output channels
    lg = draw(st.integers(1, 3), label="lg")
    kh, kw = draw(st.integers(1, 5), label="kH"), draw(st.integers(1, 5), label="kW")
    d = (draw(st.integers(1, 2), label="dH"), draw(st.integers(1, 2), label="dW"))
    same = draw(st.booleans(), label="same")
    p = "same" if same else (draw(st.integers(0, 4), label="pH"), draw(st.integers(0, 4), "pW"))
    h = d[0] * (kh - 1) + 1 + draw(st.integers(0, 5), label="dh")
    w = d[1] * (kw - 1) + 1 + draw(st.integers(0, 16), label="dw")
    n = draw(st.integers(1, 2), label="N")
    threads = draw(st.integers(1, 3), label="threads")
    mask = draw(st.sampled_from([(True, False, False), (True, True, True)]), label="mask")
    rng = np.random.default_rng(draw(st.integers(0, 2**31), label="seed"))
    x = rng.uniform(-1, 1, (n, cg * groups, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (lg * groups, cg, kh, kw)).astype(dtype)
    gy = rng.uniform(-1, 1, fc.conv2d(x, wt, padding=p, dilation=d, groups=groups).shape)
    gy = gy.astype(dtype)
    nan_in = draw(st.booleans(), label="nan")
    if nan_in:
        gy[rng.integers(n), rng.integers(lg * groups), rng.integers(gy.shape[2]),
           rng.integers(gy.shape[3])] = np.nan
    try:
        F._DIRECT = "always"
        with num_threads(threads), at_level(level):
            got = fc.conv2d_backward(gy, x, wt, padding=p, dilation=d, groups=groups,
                                     output_mask=mask)
    finally:
        F._DIRECT = "auto"
    expected = ref.conv2d_backward(gy, x, wt, padding=p, dilation=d, groups=groups)
    for i, (a, e, want) in enumerate(zip(got, expected, mask)):
        if not want:
            assert a is None
            continue
        if nan_in and i > 0:
            # a NaN where the output reads only padding: the kernels (as PyTorch) multiply it
            # by the padding's zero (NaN), the reference skips those taps; grad_x agrees
            continue
        nan = np.isnan(e)
        np.testing.assert_array_equal(np.isnan(a), nan)
        close(np.where(nan, 0, a), np.where(nan, 0, e), dtype)


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_channel_blocks(level, dtype):
    """Fewer (image, group) items than threads: items of blocks of output channels over all
    the rows (1 to all of a group's blocks, some blocks shorter) give bit for bit the bands
    of rows' numbers, with the fused pool kept or not, and the reference's."""
    if level == "none":
        pytest.skip("no direct kernels at this level")
    rng = np.random.default_rng(8)
    block = _kernels.direct_block(np.dtype(dtype).itemsize)
    for n, groups, lg, threads, pool in [(1, 1, 4, 2, None), (1, 1, 3, 3, (2, 2)),
                                         (1, 2, 2, 3, (2, 3)), (2, 1, 4, 3, None)]:
        x = rng.uniform(-1, 1, (n, 3 * groups, 11, 13)).astype(dtype)
        wt = rng.uniform(-1, 1, (lg * block * groups, 3, 5, 3)).astype(dtype)
        b = rng.uniform(-1, 1, lg * block * groups).astype(dtype)
        want = ref.conv2d(x, wt, b, padding=(2, 1), groups=groups)
        got = []
        old = _kernels.set_direct_chan_items(0)
        try:
            for items in (0, -1, 1, 2, lg):
                _kernels.set_direct_chan_items(items)
                F._PLANS.clear()            # (a plan holds its scratch's size)
                for keep in ((True, False) if pool else (True,)):
                    with num_threads(threads):
                        got.append((items, keep,
                                    both_ways(x, wt, b, 1, (2, 1), 1, groups, None, False,
                                              pool=pool, keep=keep)[0]))
        finally:
            _kernels.set_direct_chan_items(old)
            F._PLANS.clear()
        for items, keep, y in got:
            first = [g for i, k, g in got if k == keep][0]
            if pool is None:
                np.testing.assert_array_equal(y, first)
                close(y, want, dtype)
                continue
            np.testing.assert_array_equal(y[1], first[1])
            close(y[1], ref.max_pool2d(want, pool), dtype)
            if keep:
                np.testing.assert_array_equal(y[0], first[0])
                close(y[0], want, dtype)


def test_direct_grad_x_is_used(level, monkeypatch):
    """A 5x5 batch's grad_x goes through the direct kernels by the automatic rule."""
    calls = spy_direct(monkeypatch)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (4, 32, 6, 12)).astype(np.float32)
    wt = rng.uniform(-1, 1, (4, 32, 5, 5)).astype(np.float32)
    gy = rng.uniform(-1, 1, (4, 4, 6, 12)).astype(np.float32)
    with num_threads(1):
        gx = fc.conv2d_backward(gy, x, wt, padding=2, output_mask=(True, False, False))[0]
    assert calls == [(1, 1)]
    close(gx, ref.conv2d_backward(gy, x, wt, padding=2)[0], np.float32)



@pytest.mark.parametrize("fn", ["conv2d_direct", "conv2d_forward"])
def test_fused_pool_arguments_checked(level, fn):
    """The kernels' fused max-pool arguments are checked before any work: a pool_out of the
    wrong shape, or no output at all (out None without pool_out), raise ValueError."""
    x = np.zeros((2, 4, 8, 8), np.float32)
    w = np.zeros((_kernels.direct_block(4), 4, 3, 3), np.float32)
    L = w.shape[0]
    b = np.arange(L, dtype=np.float32)
    scratch = np.zeros((1, 1 << 16), np.float32)
    kernel = getattr(_kernels, fn)
    extra = () if fn == "conv2d_direct" else (np.zeros(1 << 12, np.float32),)
    args = lambda out, pooled: (x, w, b, out, scratch, *extra, 1, 1, 1, 1, 1, 1, 1, True, 1,
                                False, pooled, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="pool_out does not match"):
        kernel(*args(None, np.zeros((2, L, 3, 4), np.float32)))
    with pytest.raises(ValueError, match="only with pool_out"):
        kernel(*args(None, None))
    pooled = np.zeros((2, L, 4, 4), np.float32)
    kernel(*args(None, pooled))                 # the right shapes: the bias, pooled
    np.testing.assert_array_equal(pooled, np.broadcast_to(b[:, None, None], pooled.shape[1:])
                                  [None].repeat(2, 0))
