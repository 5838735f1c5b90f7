"""Build the fastconv Cython extension.

OpenMP is probed for and used when the compiler supports it; otherwise the extension is built
serial and a warning is printed.  Environment switches:

* ``FASTCONV_DEBUG=1``   turn Cython's boundscheck/wraparound/initializedcheck back on and
  compile with ``-O0 -g``, for debugging kernels.
* ``FASTCONV_NO_OPENMP=1``   build without OpenMP even when available.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("FASTCONV_DEBUG", "0") not in ("", "0")


def _openmp_flags(compiler):
    """Return (compile_args, link_args) for OpenMP, or None if the compiler cannot do it."""
    if os.environ.get("FASTCONV_NO_OPENMP", "0") not in ("", "0"):
        return None
    if sys.platform == "win32":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    code = textwrap.dedent(
        """
        #include <omp.h>
        int main(void) {
            int n = 0;
            #pragma omp parallel reduction(+:n)
            n += 1;
            return n > 0 ? 0 : 1;
        }
        """
    )
    for cflags, lflags in candidates:
        tmp = tempfile.mkdtemp()
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(code)
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
            compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=lflags)
            return cflags, lflags
        except Exception:  # noqa: BLE001 - any failure means "no OpenMP"
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return None


class BuildExt(build_ext):
    def build_extensions(self):
        flags = _openmp_flags(self.compiler)
        if flags is None:
            warnings.warn("fastconv: the C compiler has no OpenMP support; building the kernels "
                          "serial (set_num_threads will have no effect)")
            macros = [("FASTCONV_OPENMP", "0")]
        else:
            macros = [("FASTCONV_OPENMP", "1")]
        for ext in self.extensions:
            ext.define_macros = list(ext.define_macros or []) + macros
            if flags is not None:
                ext.extra_compile_args = list(ext.extra_compile_args or []) + flags[0]
                ext.extra_link_args = list(ext.extra_link_args or []) + flags[1]
        super().build_extensions()


def _extensions():
    from Cython.Build import cythonize

    if sys.platform == "win32":
        cargs = ["/O2"]
    elif DEBUG:
        cargs = ["-O0", "-g"]
    else:
        # -fno-trapping-math changes no result (we never enable FP traps); it lets gcc
        # if-convert the NaN-aware selects in the pooling and log-sum-exp loops, and so
        # vectorise them.  No -ffast-math, no -march=native: the wheel stays portable.
        cargs = ["-O3", "-fno-trapping-math"]
    ext = Extension(
        "fastconv._kernels",
        ["src/fastconv/_kernels.pyx"],
        depends=["src/fastconv/_simd.h", "src/fastconv/_gemm.h", "src/fastconv/_winograd.h",
                 "src/fastconv/_direct.h",
                 "src/fastconv/_pool.h"],
        extra_compile_args=cargs,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    directives = {
        "language_level": 3,
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": True,
        "nonecheck": False,
        "embedsignature": True,
    }
    # generated .c is only a build product: cythonize again whenever the debug switch flips
    return cythonize([ext], compiler_directives=directives, force=DEBUG,
                     annotate=os.environ.get("FASTCONV_ANNOTATE", "0") not in ("", "0"))


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
