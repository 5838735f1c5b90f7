"""Thread counts and concurrent calls give the same results; BLAS settings are restored."""
import os
import threading

import numpy as np
import pytest

import fastconv as fc
import reference as ref


pytestmark = pytest.mark.usefixtures("tiny_grain")


def _workload(dtype, seed=0):
    """Every function once, on inputs big enough to split across threads."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, 4, 9, 8)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    wt = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    wd = rng.standard_normal((8, 1, 3, 3)).astype(dtype)
    logits = rng.standard_normal((7, 5)).astype(dtype)
    labels = rng.integers(0, 5, 7)
    out = {}
    y = fc.conv2d(x, w, b, stride=2, padding=1, groups=2)
    out["conv2d"] = y
    out["conv2d_backward"] = fc.conv2d_backward(np.ones_like(y), x, w, stride=2, padding=1,
                                                groups=2)
    yd = fc.conv2d(x, wd, b[:1].repeat(8), padding=1, groups=4)
    out["depthwise"] = yd
    out["depthwise_backward"] = fc.conv2d_backward(yd, x, wd, padding=1, groups=4)
    yt = fc.conv_transpose2d(x, wt, b, stride=2, padding=1, output_padding=1, groups=2)
    out["conv_transpose2d"] = yt
    out["conv_transpose2d_backward"] = fc.conv_transpose2d_backward(
        yt, x, wt, stride=2, padding=1, output_padding=1, groups=2)
    out["max_pool2d"] = fc.max_pool2d(x, 3, 2, 1, return_indices=True)
    out["max_pool2d_backward"] = fc.max_pool2d_backward(out["max_pool2d"][0], x, 3, 2, 1)
    out["avg_pool2d"] = fc.avg_pool2d(x, 3, 2, 1, ceil_mode=True)
    out["avg_pool2d_backward"] = fc.avg_pool2d_backward(out["avg_pool2d"], x, 3, 2, 1,
                                                        ceil_mode=True)
    out["upsample_nearest2d"] = fc.upsample_nearest2d(x, 2)
    out["upsample_nearest2d_backward"] = fc.upsample_nearest2d_backward(
        out["upsample_nearest2d"], 2)
    out["cross_entropy"] = fc.cross_entropy(logits, labels, label_smoothing=0.1)
    out["cross_entropy_backward"] = fc.cross_entropy_backward(logits, labels,
                                                              label_smoothing=0.1)
    return out


def _flat(result):
    return [np.asarray(a) for a in (result if isinstance(result, tuple) else (result,))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_and_two_threads_agree(dtype, restore_threads):
    fc.set_num_threads(1)
    one = _workload(dtype)
    fc.set_num_threads(2)
    two = _workload(dtype)
    for name in one:
        for a, b in zip(_flat(one[name]), _flat(two[name])):
            if "backward" in name and "conv" in name:
                # weight/bias gradients sum per-thread partials: only the order of the sum
                # may differ
                tol = 1e-5 if dtype == np.float32 else 1e-12
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_more_threads_than_work(restore_threads):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 6, 6))
    w = rng.standard_normal((3, 2, 3, 3))
    fc.set_num_threads(7)
    np.testing.assert_allclose(fc.conv2d(x, w), ref.conv2d(x, w), rtol=1e-12)
    gy = rng.standard_normal((1, 3, 4, 4))
    for a, e in zip(fc.conv2d_backward(gy, x, w), ref.conv2d_backward(gy, x, w)):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def test_concurrent_python_threads_match_serial():
    serial = [_workload(np.float32, seed) for seed in range(8)]
    results = [None] * 8
    errors = []

    def run(i):
        try:
            for _ in range(3):
                results[i] = _workload(np.float32, i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(8):
        for name in serial[i]:
            for a, b in zip(_flat(serial[i][name]), _flat(results[i][name])):
                tol = 1e-5 if "backward" in name and "conv" in name else 0
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)


def test_blas_thread_setting_is_restored():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
              if lib["user_api"] == "blas"]
    _workload(np.float64)
    after = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
             if lib["user_api"] == "blas"]
    assert before == after


def test_set_num_threads_round_trip(restore_threads):
    fc.set_num_threads(3)
    assert fc.get_num_threads() == (3 if fc._kernels.openmp_enabled() else 1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        fc.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int"):
        fc.set_num_threads(2.0)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_parallel_calls_are_stable(dtype, threads, restore_threads):
    """A data race, or partial sums that meet in a different order from one call to the
    next, shows up as a result that changes: every result bit for bit the same in 25 calls,
    including weight gradients of fewer images than threads (shared by blocks of input
    channels on the pool, each image's sums in a row of its own) and 5x5 stride-1 ones (the
    shared im2col rows)."""
    fc.set_num_threads(threads)
    rng = np.random.default_rng(3)
    x2 = rng.standard_normal((2, 6, 11, 10)).astype(dtype)
    w2 = rng.standard_normal((5, 6, 5, 5)).astype(dtype)
    gy2 = rng.standard_normal((2, 5, 11, 10)).astype(dtype)

    def run():
        out = _workload(dtype)
        out["conv2d_backward batch 2"] = fc.conv2d_backward(gy2, x2, w2, padding=2)
        out["conv2d_backward batch 2 strided"] = fc.conv2d_backward(
            gy2[:, :, :6, :5], x2, w2, stride=2, padding=2)
        return out

    first = run()
    for _ in range(25):
        again = run()
        for name in first:
            for a, b in zip(_flat(first[name]), _flat(again[name])):
                np.testing.assert_array_equal(a, b, err_msg=name)


def _env_after_import(env):
    import subprocess
    import sys

    code = ("import os, fastconv; print(os.environ.get('OMP_WAIT_POLICY'), "
            "os.environ.get('GOMP_SPINCOUNT'))")
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=dict(base, **env),
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_sets_a_short_spin_unless_the_user_chose():
    """fastconv's default: OpenMP threads spin briefly, then sleep (PASSIVE); a user's own
    OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is."""
    assert _env_after_import({}) == ["PASSIVE", "1000"]
    assert _env_after_import({"OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "None"]
    assert _env_after_import({"GOMP_SPINCOUNT": "5"}) == ["PASSIVE", "5"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [2, 3])
def test_cross_entropy_pool_rows(dtype, threads, restore_threads):
    """The cross-entropy rows on the caller-runs pool (blocks of rows; row counts that do and
    do not divide into them) give bit for bit the OpenMP loop's numbers, for labels with an
    ignored one and label smoothing, for probabilities, forward and backward, and match the
    reference."""
    from fastconv import _kernels
    rng = np.random.default_rng(threads)
    fc.set_num_threads(threads)
    for N, C in ((64, 10), (67, 33), (9, 300), (1000, 17)):
        logits = rng.uniform(-5, 5, (N, C)).astype(dtype)
        labels = rng.integers(0, C, N)
        labels[N // 2] = -100
        probs = rng.uniform(0, 1, (N, C))
        probs = (probs / probs.sum(1, keepdims=True)).astype(dtype)
        for target, kw in ((labels, dict(label_smoothing=0.1)), (probs, {})):
            got = {}
            for pool in (True, False):
                old = _kernels.set_ce_pool(pool)
                try:
                    got[pool] = (fc.cross_entropy(logits, target, reduction="none", **kw),
                                 fc.cross_entropy_backward(logits, target, **kw))
                finally:
                    _kernels.set_ce_pool(old)
            for a, b in zip(got[True], got[False]):
                np.testing.assert_array_equal(a, b)
            tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10,
                                                                                  atol=1e-12)
            np.testing.assert_allclose(got[True][0], ref.cross_entropy(
                logits, target, reduction="none", **kw), **tol)
            np.testing.assert_allclose(got[True][1], ref.cross_entropy_backward(
                logits, target, **kw), **tol)


@pytest.mark.skipif(not fc._kernels.openmp_enabled(), reason="serial build: no pool")
def test_pool_workers_spin_through_a_burst_and_sleep_after(restore_threads):
    """Inside a burst of calls (a module's forward) the pool's idle workers keep spinning
    (none asleep long after a job, with a long burst spin); when the burst ends they sleep
    after the usual short spin.  A module call that raises still ends its burst."""
    import time

    import fastconv.nn as nn
    k = fc._kernels
    x = np.random.default_rng(5).standard_normal((1, 8, 40, 40)).astype(np.float32)
    w = np.random.default_rng(6).standard_normal((32, 8, 3, 3)).astype(np.float32)

    def wait_until(cond, timeout=10.0):
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                return False
            time.sleep(0.002)
        return True

    fc.set_num_threads(2)
    k.set_pool_spin(1_000_000)                  # 1 ms
    k.set_pool_burst_spin(60_000_000_000)       # a minute
    try:
        assert k.pool_burst(0) == 0
        fc.conv2d(x, w, padding=1)              # make sure a worker exists
        assert wait_until(lambda: k.pool_sleeping() >= 1)
        asleep = 0                              # all asleep: the count steady for 50 ms
        while asleep != k.pool_sleeping():      # (earlier tests may have made more than
            asleep = k.pool_sleeping()          # one worker: a 3-thread test, 2)
            time.sleep(0.05)
        assert asleep >= 1
        assert k.pool_burst(1) == 1
        fc.conv2d(x, w, padding=1)              # wakes them; they then spin through the burst
        time.sleep(0.1)
        assert k.pool_sleeping() == 0
        assert k.pool_burst(-1) == 0
        assert wait_until(lambda: k.pool_sleeping() == asleep)
        with pytest.raises(ValueError):
            nn.Conv2d(3, 4, 3)(np.zeros((1, 2, 8, 8), np.float32))
        assert k.pool_burst(0) == 0
    finally:
        k.pool_burst(-k.pool_burst(0))
        k.set_pool_spin(20000)
        k.set_pool_burst_spin(1_000_000)
