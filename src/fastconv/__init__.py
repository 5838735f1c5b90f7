"""fastconv: fast CNN kernels for NumPy.

Convolution, transposed convolution, max/average pooling, nearest upsampling and
cross-entropy, forward and backward, float32 and float64, NCHW, with PyTorch's semantics.
"""
import os as _os

# OpenMP threads that spin while waiting for work steal the cores of everything else (and of
# each other on a busy machine: a 2-thread training run measured 10x slower under load with
# spinning, no slower without it).  Sleep instead, unless the user chose otherwise; this must
# be set before the OpenMP runtime starts, that is before _kernels is imported.
#
# A thread that sleeps at once is slow to wake, though: with PASSIVE alone libgomp spins 0 times
# and every parallel region and barrier inside a call pays a futex wake-up (a batch-1 3x3
# convolution on 2 threads took 0.51 ms, slower than on one, 0.35 ms).  A short spin first
# (GOMP_SPINCOUNT=1000, some microseconds) hands work over within a call: 0.32 ms, and a
# 2-thread training step, idle or with the other core loaded, is as fast as with no spin
# (longer spins, 3000 and up, slowed it by 5-25 %: they hold the core NumPy's BLAS needs).
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "1000"
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._threading import get_num_threads, set_num_threads  # noqa: E402
from .functional import (  # noqa: E402
    avg_pool2d,
    avg_pool2d_backward,
    conv2d,
    conv2d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    cross_entropy,
    cross_entropy_backward,
    max_pool2d,
    max_pool2d_backward,
    upsample_nearest2d,
    upsample_nearest2d_backward,
)

__version__ = "0.1.0"


def show_config(file=None):
    """Print fastconv's build and runtime configuration.

    Version, whether the kernels were built with OpenMP, the thread count, the BLAS libraries
    loaded (the one scipy's ``cython_blas`` uses does the GEMMs) with their threading, and the
    CPU's model and SIMD features.

    Parameters
    ----------
    file : file-like, optional
        Where to print (standard output by default).

    Examples
    --------
    >>> import fastconv as fc
    >>> fc.show_config()  # doctest: +ELLIPSIS
    fastconv ...
    """
    import platform
    import sys

    from . import _kernels
    from ._threading import blas_info

    out = file or sys.stdout
    print(f"fastconv {__version__} (Python {platform.python_version()}, "
          f"{platform.machine()})", file=out)
    print(f"  OpenMP: {'on' if _kernels.openmp_enabled() else 'off (serial build)'}; "
          f"kernel threads: {get_num_threads()}", file=out)
    libs = blas_info()
    if not libs:
        print("  BLAS: unknown (threadpoolctl found none)", file=out)
    for lib in libs:
        print(f"  BLAS: {lib.get('internal_api')} {lib.get('version')} "
              f"({lib.get('threading_layer')} threads, {lib.get('num_threads')} threads, "
              f"{lib.get('architecture')}) {lib.get('filepath')}", file=out)
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in ("sse4_2", "avx", "avx2", "fma", "avx512f",
                                         "avx512bw", "avx512_vnni", "amx_tile", "neon", "asimd")
                             if x in have]
                    break
    except OSError:
        pass
    print(f"  CPU: {model}; SIMD: {' '.join(flags) or 'unknown'}", file=out)

__all__ = [
    "conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward",
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "upsample_nearest2d", "upsample_nearest2d_backward",
    "cross_entropy", "cross_entropy_backward",
    "set_num_threads", "get_num_threads", "show_config",
]
