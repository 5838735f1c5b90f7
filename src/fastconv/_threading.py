"""Thread settings of the kernels, and keeping BLAS out of the way of OpenMP.

The kernels run OpenMP teams of ``get_num_threads()`` threads.  Inside such a team every thread
calls BLAS on its own small GEMM, so BLAS itself must run single-threaded there, or the two thread
pools multiply (threads x BLAS threads on 2 cores).  When a call has only one work item (batch 1,
one group) the team has one thread and BLAS gets the threads instead.

`blas_threads(n)` sets the thread count of every BLAS library loaded in the process (scipy's
OpenBLAS is the one our kernels call) for the duration of a kernel call and restores it after.
Nested and concurrent calls are counted under a lock: the first one in saves the user's setting,
the last one out restores it.
"""
import os
import threading
from contextlib import contextmanager

from . import _kernels

_num_threads = None
_lock = threading.Lock()
_depth = 0
_saved = None
_controllers = None


def _default_threads():
    if "OMP_NUM_THREADS" in os.environ or not _kernels.openmp_enabled():
        return max(1, _kernels.omp_max_threads())
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def get_num_threads():
    """Number of threads the kernels use.

    Returns
    -------
    int
        The value given to :func:`set_num_threads`, or by default the number of cores
        (``OMP_NUM_THREADS`` when set).  Always 1 when fastconv was built without OpenMP.

    Examples
    --------
    >>> import fastconv as fc
    >>> fc.get_num_threads() >= 1
    True
    """
    global _num_threads
    if not _kernels.openmp_enabled():
        return 1
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n):
    """Set the number of threads the kernels use.

    Parameters
    ----------
    n : int
        A positive thread count.

    Examples
    --------
    >>> import fastconv as fc
    >>> old = fc.get_num_threads()
    >>> fc.set_num_threads(1)
    >>> fc.get_num_threads()
    1
    >>> fc.set_num_threads(old)
    """
    global _num_threads
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _num_threads = n


def _blas_controllers():
    global _controllers
    if _controllers is None:
        try:
            from threadpoolctl import ThreadpoolController

            _controllers = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # noqa: BLE001 - no threadpoolctl or an unknown BLAS: leave BLAS alone
            _controllers = []
    return _controllers


@contextmanager
def blas_threads(n):
    """Run the body with every loaded BLAS set to ``n`` threads."""
    global _depth, _saved
    ctls = _blas_controllers()
    if not ctls:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = [c.num_threads for c in ctls]
        _depth += 1
        for c in ctls:
            if c.num_threads != n:
                c.set_num_threads(n)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for c, k in zip(ctls, _saved):
                    c.set_num_threads(k)
