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

from . import _kernels

_num_threads = None
_OPENMP = _kernels.openmp_enabled()
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
    if _num_threads is None:
        _num_threads = _default_threads() if _OPENMP else 1
    return _num_threads if _OPENMP else 1


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
    """(get, set) ctypes functions of every pthreads OpenBLAS loaded in the process.

    threadpoolctl finds the libraries once; the functions are then called directly, because
    threadpoolctl's own setter costs tens of microseconds and lets only one Python thread
    control OpenBLAS.  OpenBLAS built on OpenMP and MKL already run single-threaded inside an
    OpenMP parallel region, so they are left alone.
    """
    global _controllers
    if _controllers is None:
        found = []
        try:
            from threadpoolctl import ThreadpoolController

            for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
                if getattr(lib, "threading_layer", "pthreads") == "openmp":
                    continue
                pre, suf = getattr(lib, "_symbol_prefix", ""), getattr(lib, "_symbol_suffix", "")
                get = getattr(lib.dynlib, f"{pre}openblas_get_num_threads{suf}", None)
                set_ = getattr(lib.dynlib, f"{pre}openblas_set_num_threads{suf}", None)
                if get is not None and set_ is not None:
                    found.append((get, set_))
        except Exception:  # noqa: BLE001 - no threadpoolctl or an unknown BLAS: leave BLAS alone
            found = []
        _controllers = found
    return _controllers


class blas_threads:
    """Context manager: every loaded (pthreads) OpenBLAS runs ``n`` threads inside the block."""

    __slots__ = ("n", "ctls")

    def __init__(self, n):
        self.n = n
        self.ctls = _blas_controllers()

    def __enter__(self):
        global _depth, _saved
        if self.ctls:
            with _lock:
                if _depth == 0:
                    _saved = [get() for get, _ in self.ctls]
                _depth += 1
                for get, set_ in self.ctls:
                    if get() != self.n:
                        set_(self.n)
        return self

    def __exit__(self, *exc):
        global _depth
        if self.ctls:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    for (get, set_), k in zip(self.ctls, _saved):
                        if get() != k:
                            set_(k)
        return False


def blas_info():
    """Loaded BLAS libraries as threadpoolctl reports them (list of dicts)."""
    try:
        from threadpoolctl import threadpool_info

        return [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    except Exception:  # noqa: BLE001
        return []
