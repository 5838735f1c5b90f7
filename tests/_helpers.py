"""Helpers shared by the test modules (tests/ is on sys.path, see conftest.py)."""
import contextlib
import threading

import numpy as np

import fastconv as fc


@contextlib.contextmanager
def num_threads(n):
    """fastconv on n threads for the block (hypothesis draws n per example)."""
    before = fc.get_num_threads()
    fc.set_num_threads(n)
    try:
        yield
    finally:
        fc.set_num_threads(before)


def close(actual, expected, dtype, atol32=1e-5):
    """actual (of dtype) matches the float64 reference: rtol 1e-10 / 1e-4 (float64 / float32),
    atol scaled by the reference's magnitude."""
    expected = np.asarray(expected, np.float64)
    assert actual.dtype == dtype and actual.shape == expected.shape
    scale = 1.0 + np.abs(expected).max() if expected.size else 1.0
    if dtype == np.float64:
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-11 * scale)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol32 * scale)


def run_threads(calls, rounds):
    """Run calls[i] in thread i, all threads released together each round; return
    results[i][round]."""
    barrier = threading.Barrier(len(calls))
    results = [[] for _ in calls]
    errors = []

    def work(i):
        try:
            for _ in range(rounds):
                barrier.wait(timeout=120)
                results[i].append(calls[i]())
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((i, e))
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        i, e = errors[0]
        raise AssertionError(f"thread {i} raised {e!r}") from e
    return results
