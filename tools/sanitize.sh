#!/usr/bin/env bash
# Run a representative part of the test suite over a sanitizer-instrumented build of the kernels
# (issue #5).  Not called by CI: it takes several minutes.
#
#   bash tools/sanitize.sh                 # AddressSanitizer + UndefinedBehaviorSanitizer
#   bash tools/sanitize.sh valgrind        # valgrind memcheck over a smaller subset
#   bash tools/sanitize.sh asan tests/test_threads.py -k concurrent   # other tests / options
#
# The extension is built from a clean copy of the source tree (tracked and untracked, not
# ignored, files) into a virtual environment of its own under a temporary folder (Cython,
# numpy, scipy, ... from PyPI); /tmp/dev and the source tree are not touched.
#   asan:     -fsanitize=address,undefined -fno-omit-frame-pointer -g; python runs with
#             LD_PRELOAD=libasan, ASAN_OPTIONS=detect_leaks=0 (CPython's own allocations would
#             drown the report); huge allocations return NULL (MemoryError) instead of aborting.
#             ASan errors abort the process that hits them; test_fuzz.py runs its calls in a
#             child process and reports such an abort, with the sanitizer's report, as a
#             failure naming the call.  UBSan reports are collected from the log.
#   valgrind: the normal -O3 build plus -g, PYTHONMALLOC=malloc, memcheck with
#             --error-exitcode; only errors whose stack passes through _kernels count.
# Environment: PYTHON (default python3), SANITIZE_DEBUG=1 (also FASTCONV_DEBUG=1: Cython
# bounds checks on, -O0), SANITIZE_KEEP=1 (keep the work folder), SANITIZE_VENV=dir (reuse or
# create the venv there instead of a fresh one each run).
# Exit status: non-zero when a test fails or a sanitizer reported anything in the kernels.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
MODE="${1:-asan}"
[ $# -gt 0 ] && shift
case "$MODE" in asan|valgrind) ;; *) echo "usage: $0 [asan|valgrind] [pytest args...]" >&2; exit 2 ;; esac
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastconv-sanitize.XXXXXX")"
T0=$SECONDS
cleanup() {
    if [ "${SANITIZE_KEEP:-0}" = 1 ]; then echo "sanitize: work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
step() { printf '\n== sanitize %s [%ds]: %s\n' "$MODE" "$((SECONDS - T0))" "$*"; }
unset PYTHONPATH || true

step "clean copy of the source tree"
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) |
    tar -C "$ROOT" --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C "$WORK/src" -xf -

VENV="${SANITIZE_VENV:-$WORK/venv}"
step "virtual environment $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip
"$VPY" -m pip install -q --disable-pip-version-check "setuptools>=70.1" wheel "Cython>=3.0" \
    "numpy>=1.23" "scipy>=1.9" "threadpoolctl>=3.1" "tqdm>=4.60" "pytest>=7" "hypothesis>=6.80"

step "instrumented build"
# The sanitizer flags go into CC, not CFLAGS/LDFLAGS: setuptools links setup.py's OpenMP probe
# (an executable) with plain $CC, without LDFLAGS, so -fsanitize in CFLAGS alone fails the
# probe and silently gives a serial build.  With CC, the compile, the probe's link and the
# extension's link (LDSHARED is rebased on CC) all carry them.
CC_BASE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_config_var("CC") or "cc")')"
if [ "$MODE" = asan ]; then
    export CC="$CC_BASE -fsanitize=address,undefined -fno-omit-frame-pointer"
else
    export CC="$CC_BASE -fno-omit-frame-pointer"
fi
export CFLAGS="-g"
if [ "${SANITIZE_DEBUG:-0}" = 1 ]; then export FASTCONV_DEBUG=1; fi
echo "CC=$CC CFLAGS=$CFLAGS FASTCONV_DEBUG=${FASTCONV_DEBUG:-0}"
(cd "$WORK/src" && "$VPY" -m pip install -v --disable-pip-version-check --no-build-isolation \
    --no-deps --force-reinstall --no-cache-dir . > "$WORK/build.log" 2>&1) || {
    tail -n 40 "$WORK/build.log" >&2; echo "sanitize: build failed" >&2; exit 1; }
unset CC CFLAGS FASTCONV_DEBUG
if grep -q "no OpenMP support" "$WORK/build.log"; then
    echo "sanitize: the instrumented build has no OpenMP (see $WORK/build.log)" >&2; exit 1
fi
grep -E -m 3 "^ *(gcc|cc) .*_kernels" "$WORK/build.log" | cut -c1-300 || true
# (found without importing it: an ASan-linked extension may only load under LD_PRELOAD)
SO="$(ls "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"/fastconv/_kernels*.so)"
echo "extension: $SO"
if [ "$MODE" = asan ]; then
    ldd "$SO" > "$WORK/ldd.txt"
    grep -q libasan "$WORK/ldd.txt" || { echo "sanitize: $SO is not linked with ASan" >&2; exit 1; }
fi

# the tests run from a copy, outside the source tree, against the instrumented install
RUN="$WORK/run"
mkdir "$RUN"
cp -r "$ROOT/tests" "$RUN/tests"
find "$RUN/tests" -name __pycache__ -prune -exec rm -rf {} +
printf '[pytest]\naddopts = -ra --import-mode=importlib -p no:cacheprovider\nmarkers =\n    torch: PyTorch cross-checks\n    slow: long-running tests\n' > "$RUN/pytest.ini"
LOG="$WORK/pytest.log"
cd "$RUN"

if [ "$MODE" = asan ]; then
    if [ $# -eq 0 ]; then
        set -- tests/test_properties.py tests/test_hard_inputs.py tests/test_validation.py \
            tests/test_threads.py tests/test_concurrency.py tests/test_fuzz.py tests/test_nn.py
    fi
    step "pytest under ASan+UBSan: $*"
    LIBASAN="$(gcc -print-file-name=libasan.so)"
    LD_PRELOAD="$LIBASAN" ASAN_OPTIONS=detect_leaks=0 "$VPY" -c \
        'import fastconv._kernels as k; assert k.openmp_enabled(), "serial build"; print("ASan build loaded, OpenMP on")'
    set +e
    LD_PRELOAD="$LIBASAN" \
    ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:max_allocation_size_mb=4096:abort_on_error=1:print_summary=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0" \
    FASTCONV_FUZZ_TIMEOUT=600 \
        "$VPY" -m pytest -c "$RUN/pytest.ini" --rootdir "$RUN" -q -p no:faulthandler "$@" \
        2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    reports="$(grep -cE 'ERROR: AddressSanitizer|runtime error:' "$LOG" || true)"
    kernel_reports="$(grep -E -A30 'ERROR: AddressSanitizer|runtime error:' "$LOG" |
                      grep -cE '_kernels' || true)"
else
    if [ $# -eq 0 ]; then
        set -- tests/test_hard_inputs.py tests/test_threads.py tests/test_validation.py
    fi
    command -v valgrind >/dev/null || { echo "sanitize: valgrind is not installed" >&2; exit 1; }
    step "pytest under valgrind memcheck: $*"
    set +e
    PYTHONMALLOC=malloc HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" FASTCONV_FUZZ_TIMEOUT=1200 \
        valgrind --tool=memcheck --error-exitcode=99 --num-callers=30 --track-origins=no \
        --suppressions=/dev/null --log-file="$WORK/valgrind.%p.log" \
        "$VPY" -m pytest -c "$RUN/pytest.ini" --rootdir "$RUN" -q -p no:faulthandler "$@" \
        2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    cat "$WORK"/valgrind.*.log > "$WORK/valgrind.log"
    reports="$(grep -cE '^==[0-9]+== (Invalid|Conditional|Use of uninit|Syscall param|Mismatched)' \
               "$WORK/valgrind.log" || true)"
    # errors with _kernels in their stack (CPython, numpy and OpenBLAS have their own noise)
    kernel_reports="$(awk '/^==[0-9]+== (Invalid|Conditional|Use of uninit|Syscall param|Mismatched)/{e=1; k=0; next}
                           e && /_kernels/ {k=1}
                           e && /^==[0-9]+== $/ {if (k) n++; e=0}
                           END {print n+0}' "$WORK/valgrind.log")"
    cp "$WORK/valgrind.log" "$LOG.valgrind"
    if [ "$kernel_reports" -gt 0 ]; then
        grep -E -B2 -A30 '^==[0-9]+== (Invalid|Conditional|Use of uninit)' "$WORK/valgrind.log" |
            grep -B8 -A22 _kernels | head -n 200
    fi
    # memcheck's exit code counts every error in the process, CPython's and numpy's included
    if [ "$rc" = 99 ]; then rc=0; fi
fi
cd "$ROOT"

step "summary"
echo "sanitize: pytest exit status $rc; sanitizer reports: $reports (through _kernels: $kernel_reports)"
if [ "$MODE" = asan ] && [ "$reports" -gt 0 ]; then
    grep -E -A40 'ERROR: AddressSanitizer|runtime error:' "$LOG" | head -n 200
fi
if [ "${SANITIZE_KEEP:-0}" = 1 ]; then echo "sanitize: full log: $LOG"; fi
[ "$rc" = 0 ] && [ "$kernel_reports" = 0 ] && { [ "$MODE" = valgrind ] || [ "$reports" = 0 ]; } ||
    { echo "sanitize: FAILED" >&2; exit 1; }
echo "sanitize: clean"
