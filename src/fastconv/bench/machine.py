"""The machine: CPU and library versions, the BLAS roofline, and memory probes."""
import gc
import os
import platform
import subprocess
import sys
import time
import tracemalloc

import numpy as np

_VERSIONED = ("numpy", "scipy", "torch", "onnxruntime", "onnx", "threadpoolctl", "matplotlib",
              "fastconv")


# --------------------------------------------------------------------------------------------
# description
# --------------------------------------------------------------------------------------------

def _lscpu():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env=dict(os.environ, LC_ALL="C")).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _cpuinfo():
    """(model name, physical cores or None) from /proc/cpuinfo."""
    model, cores = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and model is None:
                    model = value
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and core is not None:
                    cores.add((phys, core))
                    phys = core = None
            if core is not None:
                cores.add((phys, core))
    except OSError:
        pass
    return model, (len(cores) or None)


def versions():
    """Versions of the libraries that matter (None where not installed).

    A module already imported reports its own ``__version__`` (an editable install's metadata
    can lag behind); otherwise the installed distribution's metadata is read, which imports
    nothing."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        mod = sys.modules.get(name)
        v = getattr(mod, "__version__", None) if mod is not None else None
        if v is None:
            try:
                v = metadata.version(name)
            except metadata.PackageNotFoundError:
                v = None
        out[name] = str(v) if v is not None else None
    return out


def _git_commit(path):
    try:
        r = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty", "--abbrev=12"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _blas_libraries():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "prefix", "version", "threading_layer", "architecture",
            "num_threads", "filepath")
    return [{k: lib.get(k) for k in keep if k in lib} for lib in threadpool_info()]


def describe():
    """Everything about the machine and software a result depends on (JSON-ready)."""
    import fastconv

    lscpu = _lscpu()
    model, physical = _cpuinfo()
    model = model or lscpu.get("Model name") or platform.processor() or platform.machine()
    if physical is None and lscpu.get("Core(s) per socket", "").isdigit() \
            and lscpu.get("Socket(s)", "").isdigit():
        physical = int(lscpu["Core(s) per socket"]) * int(lscpu["Socket(s)"])
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        from fastconv import _kernels
        openmp = bool(_kernels.openmp_enabled())
    except Exception:  # noqa: BLE001 - an older build without the probe
        openmp = None
    here = os.path.dirname(os.path.abspath(__file__))
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "physical_cores": physical,
        "usable_cpus": affinity,
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "cache": {k: lscpu[k] for k in ("L1d cache", "L2 cache", "L3 cache") if k in lscpu},
        "cpu_flags_simd": sorted(f for f in lscpu.get("Flags", "").split()
                                 if f.startswith(("avx", "fma", "sse4", "amx"))),
        "platform": platform.platform(),
        "versions": versions(),
        "fastconv_path": os.path.dirname(os.path.abspath(fastconv.__file__)),
        "fastconv_openmp": openmp,
        "git": _git_commit(here),
        "blas": _blas_libraries(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "openblas_thread_timeout_env": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
        "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE"),
        "fastconv_gemm": _gemm_level(),
        "loadavg_start": loadavg(),
    }


def _gemm_level():
    try:
        from fastconv import _kernels

        return _kernels.gemm_level()
    except Exception:  # noqa: BLE001 - an older build without the own GEMM
        return None


def compact(machine):
    """The part of :func:`describe` stored with every result."""
    return {"cpu_model": machine["cpu_model"], "cpu_count": machine["cpu_count"],
            "physical_cores": machine["physical_cores"], "versions": machine["versions"],
            "git": machine.get("git")}


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------------------------
# thread settings of every library at once
# --------------------------------------------------------------------------------------------

class Threads:
    """Context manager: fastconv, PyTorch (when imported) and every BLAS/OpenMP pool that
    threadpoolctl finds run ``n`` threads inside the block; everything is restored after."""

    def __init__(self, n, use_torch):
        self.n, self.use_torch = n, use_torch

    def __enter__(self):
        import fastconv

        self._fc = fastconv.get_num_threads()
        fastconv.set_num_threads(self.n)
        self._limits = None
        try:
            from threadpoolctl import threadpool_limits
            self._limits = threadpool_limits(limits=self.n)
        except ImportError:
            pass
        self._torch = None
        if self.use_torch:
            import torch
            self._torch = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import fastconv

        fastconv.set_num_threads(self._fc)
        if self._limits is not None:
            self._limits.restore_original_limits()
        if self._torch is not None:
            import torch
            torch.set_num_threads(self._torch)
        return False


# --------------------------------------------------------------------------------------------
# BLAS roofline
# --------------------------------------------------------------------------------------------

def roofline(threads, quick=False):
    """sgemm and dgemm GFLOP/s of scipy's BLAS (the one fastconv calls) at ``threads`` threads.

    Square products of 1024, 1536 and 2048 (512 when ``quick``), each the median of a few
    runs after one warm-up; the best size is the roofline."""
    from scipy.linalg import blas

    try:
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        limit = None
    sizes = (512,) if quick else (1024, 1536, 2048)
    reps = 2 if quick else 3
    out = {"threads": threads, "sizes": list(sizes)}
    try:
        rng = np.random.default_rng(0)
        for name, fn, dt in (("sgemm", blas.sgemm, np.float32), ("dgemm", blas.dgemm, np.float64)):
            per_size = {}
            for n in sizes:
                a = np.asfortranarray(rng.standard_normal((n, n)).astype(dt))
                b = np.asfortranarray(rng.standard_normal((n, n)).astype(dt))
                fn(1.0, a, b)                                   # warm-up
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn(1.0, a, b)
                    times.append(time.perf_counter() - t0)
                per_size[n] = 2.0 * n ** 3 / float(np.median(times)) / 1e9
            out[name] = {"gflops": max(per_size.values()),
                         "by_size": {str(k): round(v, 2) for k, v in per_size.items()}}
    finally:
        if limit is not None:
            limit.restore_original_limits()
    return out


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------

def _status_kib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


_libc = None


def _malloc_trim():
    """Hand the C heap's free pages back to the system (glibc), so that a call that reuses
    them faults them in again and shows in the resident set; a no-op elsewhere."""
    global _libc
    try:
        if _libc is None:
            import ctypes
            import ctypes.util

            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        _libc = False


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _nbytes(outputs):
    n = 0
    for o in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
        if hasattr(o, "element_size"):                      # a torch tensor
            n += o.numel() * o.element_size()
        elif hasattr(o, "nbytes"):
            n += int(o.nbytes)
    return n


def measure_memory(fn, traced):
    """Run ``fn()`` once; return its outputs and its memory use in bytes.

    - ``output_bytes``: the size of the returned arrays.
    - ``traced_peak``: peak of the Python-visible allocations made during the call (tracemalloc;
      NumPy reports its array buffers to it), outputs included; ``traced_retained``: what is
      still allocated after it (outputs, and caches such as a kept workspace);
      ``traced_workspace = traced_peak - output_bytes``.  Only when ``traced`` (fastconv and
      NumPy: PyTorch's and ONNX Runtime's allocators are invisible to tracemalloc).
    - ``rss_peak_delta``: growth of the process's peak resident set (VmHWM, reset first) over
      its resident set before the call, after ``malloc_trim(0)`` has returned the C heap's
      free pages.  A lower bound for allocators with their own pools (ONNX Runtime's arena,
      NumPy's small-block cache): memory they already hold is not counted again.  None where
      VmHWM cannot be reset.
    """
    gc.collect(1)          # the young generations: a full collection takes ~0.3 s with torch
    res = {}
    if _libc is not False:
        _malloc_trim()
    can_reset = _reset_peak_rss()
    rss0 = _status_kib("VmRSS")
    if traced:
        tracemalloc.start()
    try:
        out = fn()
        if traced:
            cur, peak = tracemalloc.get_traced_memory()
    finally:
        if traced:
            tracemalloc.stop()
    hwm = _status_kib("VmHWM")
    res["output_bytes"] = out_bytes = _nbytes(out)
    if traced:
        res["traced_peak"] = int(peak)
        res["traced_retained"] = int(cur)
        res["traced_workspace"] = max(0, int(peak) - out_bytes)
    res["rss_peak_delta"] = (max(0, hwm - rss0) * 1024
                             if can_reset and hwm is not None and rss0 is not None else None)
    return out, res
