"""Concurrent calls from many Python threads give exactly the serial results.

Eight Python threads call the same function (forward and backward) at the same moment, each on
its own inputs (different values and batch sizes), for several rounds; then eight threads call
*different* functions at once.  Every result must equal the result of the same call made
serially: bitwise for forwards and input gradients, within a tiny tolerance for weight/bias
gradients (they are sums of per-OpenMP-thread partials, so only the order of a sum may differ).

The kernels run with ``fastconv.set_num_threads(2)`` and ``fastconv.functional._GRAIN = 1`` (so
that even these small calls take the OpenMP-parallel code paths, BLAS thread switching and the
per-Python-thread im2col workspaces), i.e. 8 Python threads x 2 OpenMP threads each.
"""
import numpy as np
import pytest

import fastconv as fc
import fastconv.functional
from _helpers import run_threads

N_PY_THREADS = 8
ROUNDS = 4


@pytest.fixture(autouse=True)
def parallel_paths(monkeypatch):
    monkeypatch.setattr(fastconv.functional, "_GRAIN", 1)
    old = fc.get_num_threads()
    fc.set_num_threads(2)
    yield
    fc.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# cases: name -> make(rng, dtype, n) -> (call, summed) where call() returns a tuple of arrays and
# `summed` holds the positions in that tuple that are sums of per-thread partials
# --------------------------------------------------------------------------------------------

CASES = {}


def case(name):
    def deco(f):
        CASES[name] = f
        return f
    return deco


def _std(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _conv(name, xs, ws, bias, **geo):
    @case(f"conv2d-{name}")
    def fwd(rng, dt, n):
        x, w = _std(rng, (n,) + xs, dt), _std(rng, ws, dt)
        b = _std(rng, ws[0], dt) if bias else None
        return (lambda: (fc.conv2d(x, w, b, **geo),)), ()

    @case(f"conv2d_backward-{name}")
    def bwd(rng, dt, n):
        x, w = _std(rng, (n,) + xs, dt), _std(rng, ws, dt)
        gy = _std(rng, fc.conv2d(x, w, **geo).shape, dt)
        return (lambda: fc.conv2d_backward(gy, x, w, **geo)), (1, 2)


_conv("groups", (4, 9, 8), (6, 2, 3, 3), True, stride=2, padding=1, groups=2)
_conv("same-dilated", (3, 7, 6), (5, 3, 3, 2), False, padding="same", dilation=2)
_conv("1x1", (3, 5, 6), (4, 3, 1, 1), True)
_conv("winograd", (16, 10, 9), (16, 16, 3, 3), True, padding=1)   # the caller-runs pool
_conv("depthwise", (4, 7, 7), (8, 1, 3, 3), True, padding=1, groups=4)
_conv("strided-asym", (2, 10, 9), (3, 2, 4, 2), True, stride=(3, 2), padding=(2, 1),
      dilation=(1, 2))


def _convt(name, xs, ws, bias, **geo):
    @case(f"conv_transpose2d-{name}")
    def fwd(rng, dt, n):
        x, w = _std(rng, (n,) + xs, dt), _std(rng, ws, dt)
        b = _std(rng, ws[1] * geo.get("groups", 1), dt) if bias else None
        return (lambda: (fc.conv_transpose2d(x, w, b, **geo),)), ()

    @case(f"conv_transpose2d_backward-{name}")
    def bwd(rng, dt, n):
        x, w = _std(rng, (n,) + xs, dt), _std(rng, ws, dt)
        gy = _std(rng, fc.conv_transpose2d(x, w, **geo).shape, dt)
        return (lambda: fc.conv_transpose2d_backward(gy, x, w, **geo)), (1, 2)


_convt("groups", (4, 5, 6), (4, 3, 3, 3), True, stride=2, padding=1, output_padding=1,
       groups=2)
_convt("1x1", (3, 5, 4), (3, 2, 1, 1), False)
_convt("dilated", (2, 4, 5), (2, 3, 2, 3), True, stride=(1, 2), dilation=(2, 1), padding=(0, 1))


@case("max_pool2d")
def _max(rng, dt, n):
    x = _std(rng, (n, 3, 9, 8), dt)
    x[..., ::3, ::2] = x[..., 1::3, ::2]          # ties
    return (lambda: fc.max_pool2d(x, 3, 2, 1, dilation=(1, 2), ceil_mode=True,
                                  return_indices=True)), ()


@case("max_pool2d_backward")
def _max_b(rng, dt, n):
    x = _std(rng, (n, 3, 9, 8), dt)
    gy = _std(rng, fc.max_pool2d(x, (3, 2), 1, (1, 0)).shape, dt)
    return (lambda: (fc.max_pool2d_backward(gy, x, (3, 2), 1, (1, 0)),)), ()


@case("avg_pool2d")
def _avg(rng, dt, n):
    x = _std(rng, (n, 3, 9, 8), dt)
    return (lambda: (fc.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                     fc.avg_pool2d(x, (2, 3), 1, divisor_override=5))), ()


@case("avg_pool2d_backward")
def _avg_b(rng, dt, n):
    x = _std(rng, (n, 3, 9, 8), dt)
    gy = _std(rng, fc.avg_pool2d(x, 3, 2, 1, ceil_mode=True).shape, dt)
    return (lambda: (fc.avg_pool2d_backward(gy, x, 3, 2, 1, ceil_mode=True,
                                            count_include_pad=False),)), ()


@case("upsample_nearest2d")
def _up(rng, dt, n):
    x = _std(rng, (n, 3, 5, 4), dt)
    return (lambda: (fc.upsample_nearest2d(x, (2, 3)),)), ()


@case("upsample_nearest2d_backward")
def _up_b(rng, dt, n):
    gy = _std(rng, (n, 3, 10, 12), dt)
    return (lambda: (fc.upsample_nearest2d_backward(gy, (2, 3)),)), ()


def _ce_inputs(rng, dt, n):
    logits = _std(rng, (4 * n, 7), dt) * 3
    labels = rng.integers(0, 7, 4 * n)
    labels[::5] = -100
    weight = rng.uniform(0.5, 2, 7).astype(dt)
    probs = rng.dirichlet(np.ones(7), 4 * n).astype(dt)
    return logits, labels, weight, probs


@case("cross_entropy")
def _ce(rng, dt, n):
    logits, labels, weight, probs = _ce_inputs(rng, dt, n)
    return (lambda: (fc.cross_entropy(logits, labels, weight, label_smoothing=0.1),
                     fc.cross_entropy(logits, labels, reduction="none"),
                     fc.cross_entropy(logits, probs, weight, reduction="sum"))), ()


@case("cross_entropy_backward")
def _ce_b(rng, dt, n):
    logits, labels, weight, probs = _ce_inputs(rng, dt, n)
    go = rng.standard_normal(4 * n)
    return (lambda: (fc.cross_entropy_backward(logits, labels, weight, label_smoothing=0.1),
                     fc.cross_entropy_backward(logits, labels, reduction="none",
                                               grad_output=go),
                     fc.cross_entropy_backward(logits, probs, weight, reduction="sum",
                                               label_smoothing=0.2))), ()


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

DTYPES = [np.float32, np.float64]


def _make(name, dtype, i):
    """The call of thread i: its own values and batch size (1..4: batch 1 with one group
    runs the single-work-item path where BLAS gets the threads)."""
    rng = np.random.default_rng([sorted(CASES).index(name), i, np.dtype(dtype).itemsize])
    return CASES[name](rng, np.dtype(dtype), 1 + i % 4)


def _compare(expected, got, summed, dtype, what):
    assert len(expected) == len(got), what
    for k, (e, g) in enumerate(zip(expected, got)):
        e, g = np.asarray(e), np.asarray(g)
        assert e.dtype == g.dtype and e.shape == g.shape, f"{what}: output {k}"
        if k in summed:
            # sums of per-thread partials, which threads busy elsewhere split differently:
            # roundings of the order of the largest value's (Winograd's weight gradient
            # sums terms that cancel to small values)
            tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
            scale = 1.0 + (np.abs(e).max() if e.size else 0.0)
            np.testing.assert_allclose(g, e, rtol=tol, atol=tol * scale,
                                       err_msg=f"{what}: output {k}")
        else:
            np.testing.assert_array_equal(g, e, err_msg=f"{what}: output {k} (must be bitwise "
                                                          "equal to the serial call)")




@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_eight_threads_one_function(name, dtype):
    made = [_make(name, dtype, i) for i in range(N_PY_THREADS)]
    serial = [call() for call, _ in made]
    results = run_threads([call for call, _ in made], ROUNDS)
    for i, (_, summed) in enumerate(made):
        for r, got in enumerate(results[i]):
            _compare(serial[i], got, summed, dtype, f"{name} thread {i} round {r}")


def test_eight_threads_all_functions_at_once():
    """Each thread walks through every case (forward and backward, both dtypes) in its own
    rotated order, so that different kernels overlap."""
    names = sorted(CASES)
    jobs = [(name, dt) for name in names for dt in DTYPES]
    per_thread = []
    for i in range(N_PY_THREADS):
        order = jobs[i * 3 % len(jobs):] + jobs[:i * 3 % len(jobs)]
        per_thread.append([(name, dt, _make(name, dt, i)) for name, dt in order])
    serial = [[call() for _, _, (call, _) in mine] for mine in per_thread]

    def runner(mine):
        return lambda: [call() for _, _, (call, _) in mine]

    results = run_threads([runner(mine) for mine in per_thread], rounds=2)
    for i, mine in enumerate(per_thread):
        for r, got in enumerate(results[i]):
            for (name, dt, (_, summed)), e, g in zip(mine, serial[i], got):
                _compare(e, g, summed, dt, f"{name} {np.dtype(dt)} thread {i} round {r}")


def test_blas_threads_restored_after_concurrent_calls():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
              if lib["user_api"] == "blas"]
    made = [_make("conv2d_backward-groups", np.float64, i) for i in range(N_PY_THREADS)]
    run_threads([call for call, _ in made], rounds=2)
    after = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
             if lib["user_api"] == "blas"]
    assert before == after
