"""nn.Linear's arithmetic (functional._linear / _linear_backward: blocks of BLAS calls on
fastconv's threads, BLAS itself held at one thread) against the naive reference: row blocks
and column blocks with partial last blocks, 1-3 threads, both dtypes, bias or none,
non-contiguous and read-only inputs through the layer, leading batch dimensions; and the
reason it exists: no OpenBLAS thread is left spinning after a Linear layer."""
import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv.nn as nn
from fastconv import _kernels
from fastconv import functional as F
import reference as ref
from _helpers import close, num_threads

LEVELS = [lv for lv in ("blas", "avx2", "avx512")
          if _kernels.set_gemm(lv) == lv or lv == "blas"]
_kernels.set_gemm("avx512")
BEST = _kernels.gemm_level()
# the own GEMM's levels here (a skipped placeholder where there is none)
OWN_LEVELS = [lv for lv in LEVELS if lv != "blas"] or [
    pytest.param("none", marks=pytest.mark.skip("no own GEMM here"))]


@contextlib.contextmanager
def gemm_at(level):
    """The backward's products by the own GEMM at this level, or by BLAS ('blas')."""
    _kernels.set_gemm(level)
    try:
        yield
    finally:
        _kernels.set_gemm(BEST)


@pytest.mark.usefixtures("tiny_grain")
@given(n=st.integers(0, 70), i=st.integers(1, 150), o=st.integers(1, 70),
       bias=st.booleans(), need_x=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), threads=st.sampled_from([1, 2, 3]),
       level=st.sampled_from(LEVELS), seed=st.integers(0, 2**32 - 1))
def test_linear_kernels_match_reference(n, i, o, bias, need_x, dtype, threads, level, seed):
    r = np.random.default_rng(seed)
    x = r.uniform(-1, 1, (n, i)).astype(dtype)
    w = r.uniform(-1, 1, (o, i)).astype(dtype)
    b = r.uniform(-1, 1, o).astype(dtype) if bias else None
    g = r.uniform(-1, 1, (n, o)).astype(dtype)
    with num_threads(threads), gemm_at(level):
        y = F._linear(x, w, b)
        gx, gw = F._linear_backward(g, x, w, True, need_x)
    close(y, ref.linear(x, w, b), np.dtype(dtype))
    want_gx, want_gw, _ = ref.linear_backward(g, x, w)
    close(gw, want_gw, np.dtype(dtype))
    if need_x:
        close(gx, want_gx, np.dtype(dtype))
    else:
        assert gx is None


@pytest.mark.usefixtures("tiny_grain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_layer_hard_inputs(dtype, threads):
    """A (2, 3, 40) input sliced non-contiguously and read-only, through the layer, forward
    and backward, against the reference on the flattened rows; inputs unchanged."""
    r = np.random.default_rng(4)
    lin = nn.Linear(40, 33, dtype=dtype, rng=5)
    big = r.standard_normal((2, 3, 80)).astype(dtype)
    x = big[:, :, ::2]
    x.flags.writeable = False
    g = np.asfortranarray(r.standard_normal((2, 3, 33)).astype(dtype))
    keep_x, keep_g = x.copy(), g.copy()
    with num_threads(threads):
        y = lin(x)
        gx = lin.backward(g)
    x2, g2 = x.reshape(6, 40), g.reshape(6, 33)
    close(y.reshape(6, 33), ref.linear(x2, lin.weight.data, lin.bias.data), np.dtype(dtype))
    want_gx, want_gw, want_gb = ref.linear_backward(g2, x2, lin.weight.data)
    close(gx.reshape(6, 40), want_gx, np.dtype(dtype))
    close(lin.weight.grad, want_gw, np.dtype(dtype))
    close(lin.bias.grad, want_gb, np.dtype(dtype))
    assert y.shape == (2, 3, 33) and gx.shape == (2, 3, 40)
    np.testing.assert_array_equal(x, keep_x)
    np.testing.assert_array_equal(g, keep_g)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("rows", [4, 32])
def test_linear_layer_leaves_no_blas_thread_running(level, rows):
    """Forward and backward of a Linear layer on 2 threads call BLAS at one thread only, so
    that no OpenBLAS worker is woken (and then spins for ~0.1 s, stealing a core from the next
    kernel).  Checked by the BLAS thread counts while the kernels run: every BLAS library is
    held at 1 thread, except in a forward that makes no BLAS call (an own GEMM level: the
    row dot products or the own GEMM, where holding BLAS would only cost time)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = []
    real = F._kernels.linear_forward, F._kernels.linear_backward

    def spy(kernel, name):
        def call(*a):
            seen.append((name, [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                                if lib["user_api"] == "blas"]))
            return kernel(*a)
        return call

    lin = nn.Linear(64, 48, dtype=np.float32, rng=1)
    x = np.random.default_rng(2).standard_normal((rows, 64)).astype(np.float32)
    try:
        F._kernels.linear_forward = spy(real[0], "forward")
        F._kernels.linear_backward = spy(real[1], "backward")
        with gemm_at(level), num_threads(2):
            lin.backward(np.ones_like(lin(x)))
    finally:
        F._kernels.linear_forward, F._kernels.linear_backward = real
    assert [name for name, _ in seen] == ["forward", "backward"], seen
    for name, counts in seen:
        if name == "backward" or level == "blas":
            assert all(n == 1 for n in counts), seen


@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_forward_own_gemm(level, dtype, threads):
    """The forward by the own GEMM, x read in place and weight as B transposed (FC_GEMM_BT:
    each K block's strip transposed into the strip buffer): output columns that fill whole
    strips, half and quarter strips and masked ones (o), K blocks whole and partial and
    rows that are no multiple of the transposes' 8 or 4 (i), row blocks that are no multiple
    of the micro-kernel's rows (n); against the reference and against BLAS (own=False)."""
    r = np.random.default_rng(11)
    dt = np.dtype(dtype)
    for n, i, o in [(16, 1, 1), (17, 7, 9), (40, 129, 33), (23, 300, 70), (64, 260, 128),
                    (9, 5, 31), (70, 128, 8), (33, 257, 65)]:
        x = r.uniform(-1, 1, (n, i)).astype(dtype)
        w = r.uniform(-1, 1, (o, i)).astype(dtype)
        b = r.uniform(-1, 1, o).astype(dtype)
        keep_x, keep_w = x.copy(), w.copy()
        want = ref.linear(x, w, b)
        for path in (_kernels.LIN_GEMM, _kernels.LIN_BLAS):
            y = np.full((n, o), np.nan, dtype)
            with gemm_at(level):
                _kernels.linear_forward(x, w, b, y, True, threads, path)
            close(y, want, dt)
        np.testing.assert_array_equal(x, keep_x)
        np.testing.assert_array_equal(w, keep_w)


@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_forward_rows(level, dtype, threads):
    """The forward for a few rows (LIN_ROWS: dot products of x's rows with the weight's rows,
    both read in place): every row count up to 15 (blocks of up to 6 / 2 rows at AVX-512 /
    AVX2 and their remainders), output columns in blocks of 4 and single ones (o), the sum
    over i in whole vectors, a masked last one, fewer values than a vector, and over the
    4 KiB blocks of i (1024 floats, 512 doubles) with partial ones; one row (batch 1: its
    own kernel) over i of every kind of tail; with and without bias,
    against the reference, and NaN / inf where they belong; inputs unchanged."""
    r = np.random.default_rng(12)
    dt = np.dtype(dtype)
    shapes = [(1, 1, 1), (2, 5, 3), (3, 16, 4), (4, 17, 5), (5, 33, 9), (6, 100, 8),
              (7, 512, 7), (8, 513, 12), (9, 1024, 13), (10, 1025, 2), (11, 2100, 17),
              (12, 3136, 16), (13, 7, 1), (14, 300, 33), (15, 1500, 6),
              # one row (its own kernel, all of i at once, two sums per output): i in pairs
              # of vectors, one more vector, a masked last one
              (1, 8, 4), (1, 7, 5), (1, 24, 9), (1, 29, 3), (1, 40, 6), (1, 3136, 130)]
    for n, i, o in shapes:
        x = r.uniform(-1, 1, (n, i)).astype(dtype)
        w = r.uniform(-1, 1, (o, i)).astype(dtype)
        b = r.uniform(-1, 1, o).astype(dtype)
        keep_x, keep_w, keep_b = x.copy(), w.copy(), b.copy()
        for has_bias in (True, False):
            want = ref.linear(x, w, b if has_bias else None)
            y = np.full((n, o), np.nan, dtype)
            with gemm_at(level):
                _kernels.linear_forward(x, w, b if has_bias else F._EMPTY[dt.char], y,
                                        has_bias, threads, _kernels.LIN_ROWS)
            close(y, want, dt)
        np.testing.assert_array_equal(x, keep_x)
        np.testing.assert_array_equal(w, keep_w)
        np.testing.assert_array_equal(b, keep_b)
    # NaN in one row of x spoils that row only; inf in one weight row spoils its column only
    n, i, o = 5, 1100, 9
    x = r.uniform(-1, 1, (n, i)).astype(dtype)
    w = r.uniform(-1, 1, (o, i)).astype(dtype)
    x[3, 1050] = np.nan
    w[6, 7] = np.inf
    x[:, 7] = np.abs(x[:, 7]) + 0.5            # inf * positive: +inf, never inf - inf
    y = np.zeros((n, o), dtype)
    with gemm_at(level):
        _kernels.linear_forward(x, w, F._EMPTY[dt.char], y, False, threads, _kernels.LIN_ROWS)
    want = ref.linear(np.nan_to_num(x, nan=0.0), np.nan_to_num(w, posinf=0.0), None)
    assert np.isnan(y[3]).all()
    assert np.isposinf(np.delete(y, 3, axis=0)[:, 6]).all()
    rest = np.delete(np.delete(y, 3, axis=0), 6, axis=1)
    close(rest, np.delete(np.delete(want, 3, axis=0), 6, axis=1), dt)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_layer_few_rows(dtype):
    """nn.Linear on 1-15 rows (the rows path) and from 16 (the own GEMM), through the layer:
    leading batch dimensions, a non-contiguous read-only input, against the reference."""
    dt = np.dtype(dtype)
    lin = nn.Linear(200, 37, dtype=dtype, rng=3)
    r = np.random.default_rng(4)
    for n in (1, 2, 3, 7, 15, 16, 17):
        x = r.standard_normal((n, 2, 400)).astype(dtype)[:, 1, ::2]
        x.setflags(write=False)
        close(lin(x), ref.linear(x, lin.weight.data, lin.bias.data), dt)
    x = r.standard_normal((3, 2, 200)).astype(dtype)
    close(lin(x), ref.linear(x.reshape(6, 200), lin.weight.data,
                             lin.bias.data).reshape(3, 2, 37), dt)


@pytest.mark.parametrize("level", OWN_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_forward_rows_in_row_blocks(level, dtype):
    """More rows than outputs on 2-3 threads: the rows path in blocks of rows, each item
    only its own rows (items that each computed every row raced on y, adding a K block's
    sums twice: 15 wrong answers in 300 for 12 x 2048 -> 10).  Many repetitions, bit for bit
    the one-thread answer (each row's sums do not depend on the blocking), which matches the
    reference."""
    r = np.random.default_rng(13)
    for n, i, o in [(12, 2048, 10), (9, 4096, 8), (15, 3000, 3)]:
        x = r.uniform(-1, 1, (n, i)).astype(dtype)
        w = r.uniform(-1, 1, (o, i)).astype(dtype)
        b = r.uniform(-1, 1, o).astype(dtype)
        one = np.empty((n, o), dtype)
        with gemm_at(level):
            _kernels.linear_forward(x, w, b, one, True, 1, _kernels.LIN_ROWS)
            close(one, ref.linear(x, w, b), np.dtype(dtype))
            for rep in range(60):
                y = np.full((n, o), np.nan, dtype)
                _kernels.linear_forward(x, w, b, y, True, 2 + rep % 2, _kernels.LIN_ROWS)
                np.testing.assert_array_equal(y, one)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_backward_one_row(dtype, threads):
    """One row (LIN_ROWS): grad_w is the outer product g^T x, each value one product (bit for
    bit numpy's), grad_x = g @ w as the reference's, for widths across the 256-column
    sub-blocks and the threads' column blocks, either gradient alone, with NaN and inf."""
    r = np.random.default_rng(31)
    for i, o in ((1, 1), (255, 5), (256, 3), (257, 128), (3136, 128), (1000, 2)):
        x = r.uniform(-1, 1, (1, i)).astype(dtype)
        w = r.uniform(-1, 1, (o, i)).astype(dtype)
        g = r.uniform(-1, 1, (1, o)).astype(dtype)
        if i > 3:
            x[0, 2], w[0, 3] = np.nan, np.inf
        for need_w, need_x in ((True, True), (True, False), (False, True)):
            with num_threads(threads):
                gx, gw = F._linear_backward(g, x, w, need_w, need_x)
            want_gx, _, _ = ref.linear_backward(g, x, w)
            if need_w:
                np.testing.assert_array_equal(gw, g.T * x)
            else:
                assert gw is None
            if need_x:
                finite = np.isfinite(want_gx)
                np.testing.assert_array_equal(gx[~finite], want_gx[~finite])
                close(np.where(finite, gx, 0), np.where(finite, want_gx, 0), np.dtype(dtype))
            else:
                assert gx is None
