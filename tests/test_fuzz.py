"""Fuzzing the whole public API with arbitrary, mostly invalid, arguments.

Every function in ``fastconv.__all__`` (but the thread settings) and every ``fastconv.nn`` layer
(constructor, forward, backward) is called with hypothesis-generated arguments: random shapes
(including 0-size and huge dimensions, the huge ones through zero-strided ``np.broadcast_to``
views), every kind of dtype (float16/32/64, longdouble, ints, bool, complex, object, str, bytes,
datetime, void), odd layouts (Fortran, negative strides, strided, read-only, nested lists) and
random parameter values (negative, zero, huge such as 2**31 and 2**62, floats, NaN, None,
strings, numpy scalars, tuples and lists of the wrong length).  Most examples start from a
consistent call and then break one or more arguments, so that the kernels themselves are reached
often, with valid and with barely-invalid geometry.

The only acceptable outcomes are a normal return or a ``ValueError`` / ``TypeError`` (and
``MemoryError`` where the call involves a huge size).  A normal return must also leave the
input arrays unchanged and return new arrays (no memory shared with an input) of a floating
dtype (int64 for max-pool indices) whose gradient shapes match the inputs'.

Each call runs in a long-lived child process (this file run as a script), so that a segfault or
an abort is reported as a failure naming the call that killed the child, with the child's
stderr (faulthandler's traceback, a sanitizer's report) instead of killing pytest.  The child
limits its address space (FASTCONV_FUZZ_MEM_MB, default 3072 MiB over what it uses at start), so
that legal-but-huge calls end in MemoryError instead of swapping, and a call that takes longer
than FASTCONV_FUZZ_TIMEOUT seconds (default 120) fails as a hang.

Budget: ``settings.default.max_examples`` of the hypothesis profile (tests/conftest.py: 'ci' 40,
'soak' 5,000) times FUZZ_MULT per function; FASTCONV_FUZZ_STATS=path appends a count of the
outcomes per test to that file.
"""
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import warnings

import numpy as np

FUNCTIONS = [
    "conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward",
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "upsample_nearest2d", "upsample_nearest2d_backward",
    "cross_entropy", "cross_entropy_backward",
]
LAYERS = ["Conv2d", "ConvTranspose2d", "MaxPool2d", "AvgPool2d", "Upsample", "Linear", "ReLU",
          "Flatten", "Dropout", "CrossEntropyLoss"]

# ============================================================================================
# child side: build the arguments a recipe describes, make the call, report the outcome
# ============================================================================================
# A recipe is plain data (picklable, printable):
#   ("call", name, args, kwargs, threads, grain)       a function of fastconv
#   ("nn", layer, ctor_args, ctor_kwargs, inputs, grad, threads, grain)
# Argument nodes: int/float/str/bytes/complex/bool/None literals, and tagged tuples:
#   ("tuple", [nodes]) / ("list", [nodes]) / ("np", dtype, value) numpy scalar /
#   ("arr", kind, shape, dtype, extra) an array (kinds below) /
#   ("grad", fwd_name, fwd_args, fwd_kwargs, dtype, perturb, fallback_shape) an array shaped
#   like the output of the forward call (if that call succeeds), perturbed in one axis.

_SMALL = 1 << 16      # arrays with more elements than this are zero-strided broadcasts


def _sizeof(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _fill(dt, shape, rng, special):
    dt = np.dtype(dt)
    if dt.kind == "f" or dt.kind == "c":
        a = rng.standard_normal(shape)
        if dt.kind == "c":
            a = a + 1j * rng.standard_normal(shape)
        if special and a.size:
            flat = a.reshape(-1)
            picks = rng.integers(0, flat.size, max(1, flat.size // 4))
            flat[picks] = rng.choice([np.nan, np.inf, -np.inf, 1e300, -1e300, 0.0], picks.size)
        with np.errstate(over="ignore", invalid="ignore"):
            return a.astype(dt)
    if dt.kind in "iu":
        return rng.integers(-5, 12, shape).astype(dt)
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    if dt.kind == "O":
        pool = np.array([1, 2.5, -3, None, "a", 1j, (1,)], dtype=object) if special else \
            np.array([1, 2.5, -3, 0.25], dtype=object)
        return pool[rng.integers(0, pool.size, shape)]
    if dt.kind in "US":
        return np.full(shape, "ab" if dt.kind == "U" else b"ab", dtype=dt)
    return np.zeros(shape, dt)          # datetime, timedelta, void


def _make_array(kind, shape, dt, extra, inputs):
    rng = np.random.default_rng(extra.get("seed", 0))
    if kind == "bcast":
        val = np.zeros((), dt) if np.dtype(dt).kind in "OUSVmM" else \
            np.asarray(extra.get("fill", 0.5)).astype(dt)
        return np.broadcast_to(val, shape)
    if kind == "empty":
        return np.empty(shape, dt)
    if kind == "labels":
        a = rng.integers(extra["lo"], extra["hi"], shape).astype(dt)
    elif kind == "probs":
        a = rng.dirichlet(np.ones(shape[-1]), shape[:-1]).astype(dt) if len(shape) >= 1 and \
            shape[-1] > 0 else np.zeros(shape, dt)
    else:
        layout = extra.get("layout", "c")
        big = tuple(shape[:-1]) + (2 * shape[-1],) if layout == "slice" and shape else shape
        a = _fill(dt, big, rng, extra.get("special", False))
        if layout == "slice" and shape:
            a = a[..., ::2]
        elif layout == "neg" and a.ndim:
            a = a[..., ::-1]
        elif layout == "f":
            a = np.asfortranarray(a)
        elif layout == "ro":
            a.setflags(write=False)
        elif layout == "list":
            return a.tolist()
    inputs.append((a, a.copy()))
    return a


class _ForwardFailed(Exception):
    """fastconv raised an unexpected exception while a grad_out was being sized."""


def _build(node, inputs):
    if not isinstance(node, tuple):
        return node
    tag = node[0]
    if tag == "tuple":
        return tuple(_build(x, inputs) for x in node[1])
    if tag == "list":
        return [_build(x, inputs) for x in node[1]]
    if tag == "np":
        return np.dtype(node[1]).type(node[2])
    if tag == "arr":
        _, kind, shape, dt, extra = node
        if kind not in ("bcast", "empty") and _sizeof(shape) > _SMALL:
            kind = "bcast"
        return _make_array(kind, tuple(shape), dt, dict(extra), inputs)
    if tag == "grad":
        _, fwd, fargs, fkwargs, dt, perturb, fallback = node
        import fastconv
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = getattr(fastconv, fwd)(*[_build(a, []) for a in fargs],
                                             **{k: _build(v, []) for k, v in fkwargs.items()})
            shape = list(np.shape(out[0] if isinstance(out, tuple) else out))
        except (ValueError, TypeError, MemoryError):
            shape = list(fallback)
        except BaseException as e:  # noqa: BLE001 - fastconv itself failed: report it
            raise _ForwardFailed(e) from e
        if perturb is not None and shape:
            ax, delta = perturb
            ax %= len(shape)
            shape[ax] = max(0, shape[ax] + delta)
        return _build(("arr", "rand", tuple(shape), dt, (("seed", 7),)), inputs)
    raise AssertionError(f"unknown recipe node {node!r}")


def _arrays_in(value):
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays_in(v)]
    return []


def _check_return(name, result, inputs):
    """Invariants of a normal return of the functional API; returns an error string or None."""
    outs = _arrays_in(result)
    if name == "cross_entropy" and isinstance(result, np.generic):
        outs = [np.asarray(result)]
    for k, o in enumerate(outs):
        ok = (np.dtype(np.int64),) if name == "max_pool2d" and k == 1 else \
            (np.dtype(np.float32), np.dtype(np.float64))
        if o.dtype not in ok:
            return f"output {k} has dtype {o.dtype}"
        for a, _ in inputs:
            if isinstance(a, np.ndarray) and np.may_share_memory(o, a) and \
                    np.shares_memory(o, a, max_work=10**6):
                return f"output {k} shares memory with an input"
    for a, before in inputs:
        if isinstance(a, np.ndarray) and a.dtype.kind != "O" and a.tobytes() != before.tobytes():
            return "an input array was modified"
    return None


def _grad_shapes(name, args, kwargs, result):
    """Backward functions return gradients shaped like the forward's inputs."""
    if not name.endswith("_backward") or name.startswith("upsample"):
        return None
    if name.startswith("cross_entropy"):
        want = [np.shape(args[0] if args else kwargs.get("logits"))]
        got = [np.shape(result)]
    elif name.startswith("conv"):
        x = args[1] if len(args) > 1 else kwargs.get("x")
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        want = [np.shape(x), np.shape(w)]
        got = [np.shape(r) for r in result[:2] if r is not None]
        want = [s for s, r in zip(want, result[:2]) if r is not None]
    else:
        x = args[1] if len(args) > 1 else kwargs.get("x")
        want, got = [np.shape(x)], [np.shape(result)]
    if want != got:
        return f"gradient shapes {got} differ from the inputs' {want}"
    return None


def _execute(recipe):
    import fastconv
    import fastconv.functional
    import fastconv.nn

    kind = recipe[0]
    threads, grain = recipe[-2], recipe[-1]
    fastconv.set_num_threads(threads)
    fastconv.functional._GRAIN = grain
    inputs = []
    stage = "building the arguments"
    try:
        if kind == "call":
            _, name, args, kwargs = recipe[:4]
            args = [_build(a, inputs) for a in args]
            kwargs = {k: _build(v, inputs) for k, v in kwargs.items()}
            stage = "the call"
            result = getattr(fastconv, name)(*args, **kwargs)
            bad = _check_return(name, result, inputs) or _grad_shapes(name, args, kwargs, result)
            if bad:
                return ("invariant", bad)
            return ("ok", type(result).__name__)
        _, layer, cargs, ckwargs, xs, grad = recipe[:6]
        cls = getattr(fastconv.nn, layer)
        cargs = [_build(a, inputs) for a in cargs]
        ckwargs = {k: _build(v, inputs) for k, v in ckwargs.items()}
        stage = "the constructor"
        mod = cls(*cargs, **ckwargs)
        stage = "building the inputs"
        xs = [_build(a, inputs) for a in xs]
        stage = "forward"
        y = mod(*xs)
        stage = "building grad_out"
        if layer == "CrossEntropyLoss":
            g = _build(grad, inputs)
        else:
            shape, dt = list(np.shape(y)), grad[0]
            if grad[1] is not None and shape:
                shape[grad[1][0] % len(shape)] = max(0, shape[grad[1][0] % len(shape)]
                                                    + grad[1][1])
            g = _build(("arr", "rand", tuple(shape), dt, (("seed", 3),)), inputs)
        stage = "backward"
        gx = mod.backward(g)
        if layer not in ("CrossEntropyLoss",) and grad[1] is None and \
                np.shape(gx) != np.shape(xs[0]):
            return ("invariant", f"backward returned shape {np.shape(gx)} for an input of "
                                 f"shape {np.shape(xs[0])}")
        for p in getattr(mod, "parameters", lambda: [])():
            if p.grad is not None and p.grad.shape != p.data.shape:
                return ("invariant", f"parameter grad shape {p.grad.shape} != {p.data.shape}")
        return ("ok", type(gx).__name__)
    except _ForwardFailed as w:
        e = w.args[0]
        return ("raised", _name(e), str(e)[:500], "the forward call that sizes grad_out",
                _acceptable(e))
    except BaseException as e:  # noqa: BLE001 - every exception is an outcome
        if stage.startswith("building"):
            return ("unbuildable", f"{_name(e)}: {str(e)[:200]}")
        return ("raised", _name(e), str(e)[:500], stage, _acceptable(e))


def _name(e):
    return type(e).__module__ + "." + type(e).__qualname__


def _acceptable(e):
    return isinstance(e, (ValueError, TypeError, MemoryError))


def _limit_memory():
    mb = int(os.environ.get("FASTCONV_FUZZ_MEM_MB", "3072"))
    if mb <= 0 or "asan" in os.environ.get("LD_PRELOAD", ""):
        return                  # sanitizers reserve terabytes of address space
    import resource
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    limit = vm + (mb << 20)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main():
    """Serve recipes: 8-byte length + pickle in on stdin, the same out on the original
    stdout (fd 1 is pointed at stderr, so that stray prints cannot corrupt the protocol)."""
    import faulthandler

    faulthandler.enable()
    warnings.simplefilter("ignore")
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    import fastconv
    import fastconv.functional

    # start every thread pool (OpenMP teams, OpenBLAS buffers) before the memory limit
    rng = np.random.default_rng(0)
    for nt in (1, 2, 3):
        fastconv.set_num_threads(nt)
        for dt in (np.float32, np.float64):
            x = rng.standard_normal((4, 4, 12, 12)).astype(dt)
            w = rng.standard_normal((4, 2, 3, 3)).astype(dt)
            for grain in (1, fastconv.functional._GRAIN):
                fastconv.functional._GRAIN = grain
                fastconv.conv2d_backward(fastconv.conv2d(x, w, groups=2), x, w, groups=2)
                fastconv.conv2d_backward(fastconv.conv2d(x[:1], w[:, :], groups=2), x[:1], w,
                                         groups=2)
    default_grain = fastconv.functional._GRAIN
    _limit_memory()
    while True:
        head = proto_in.read(8)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        buf = b""
        while len(buf) < n:
            chunk = proto_in.read(n - len(buf))
            if not chunk:
                return
            buf += chunk
        recipe = pickle.loads(buf)
        if recipe[-1] is None:
            recipe = recipe[:-1] + (default_grain,)
        out = pickle.dumps(_execute(recipe))
        proto_out.write(struct.pack("<Q", len(out)) + out)


if __name__ == "__main__":
    _worker_main()
    raise SystemExit(0)


# ============================================================================================
# parent side: the worker process, the recipe strategies and the tests
# ============================================================================================
import atexit  # noqa: E402
import collections  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TIMEOUT = float(os.environ.get("FASTCONV_FUZZ_TIMEOUT", "120"))
FUZZ_MULT = 3      # examples per function: FUZZ_MULT x the profile's max_examples


class Worker:
    """The child process that runs the calls; restarted after it dies or hangs."""

    def __init__(self):
        self.proc = None
        self.err = None

    def start(self):
        self.err = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env, cwd=tempfile.gettempdir())

    def stop(self):
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def stderr_tail(self, n=6000):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-n:]

    def _read(self, n, deadline):
        fd, buf = self.proc.stdout.fileno(), b""
        while len(buf) < n:
            left = deadline - _now()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def run(self, recipe):
        """-> outcome tuple, or ('crashed', how, stderr) / ('hang', seconds, stderr)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        data = pickle.dumps(recipe)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
            deadline = _now() + TIMEOUT
            (n,) = struct.unpack("<Q", self._read(8, deadline))
            return pickle.loads(self._read(n, deadline))
        except TimeoutError:
            self.proc.kill()
            self.proc.wait()
            tail = self.stderr_tail()
            self.proc = None
            return ("hang", TIMEOUT, tail)
        except (EOFError, BrokenPipeError, OSError):
            rc = self.proc.wait()
            how = f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            tail = self.stderr_tail()
            self.proc = None
            return ("crashed", how, tail)


def _now():
    import time
    return time.monotonic()


_worker = Worker()
atexit.register(_worker.stop)
_stats = collections.defaultdict(collections.Counter)


@atexit.register
def _write_stats():
    path = os.environ.get("FASTCONV_FUZZ_STATS")
    if path and _stats:
        with open(path, "a") as f:
            for test, counts in sorted(_stats.items()):
                f.write(f"{test}: {sum(counts.values())} calls: "
                        + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + "\n")


# ---- rendering a recipe as Python, for failure messages ----------------------------------

def _show(node):
    if not isinstance(node, tuple):
        return repr(node)
    tag = node[0]
    if tag == "tuple":
        items = [_show(x) for x in node[1]]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if tag == "list":
        return "[" + ", ".join(_show(x) for x in node[1]) + "]"
    if tag == "np":
        return f"np.{np.dtype(node[1]).type.__name__}({node[2]!r})"
    if tag == "arr":
        _, kind, shape, dt, extra = node
        ex = dict(extra)
        if kind == "bcast" or (kind not in ("empty",) and _sizeof(shape) > _SMALL):
            return f"np.broadcast_to(np.asarray({ex.get('fill', 0.5)!r}).astype({dt!r}), " \
                   f"{tuple(shape)})"
        if kind == "empty":
            return f"np.empty({tuple(shape)}, {dt!r})"
        desc = f"{kind} {dt!r} array of shape {tuple(shape)}"
        if ex.get("layout", "c") != "c":
            desc += f", layout {ex['layout']}"
        if ex.get("special"):
            desc += ", with NaN/inf"
        if kind == "labels":
            desc += f", values in [{ex['lo']}, {ex['hi']})"
        return f"<{desc}>"
    if tag == "grad":
        _, fwd, fargs, fkwargs, dt, perturb, fallback = node
        call = f"{fwd}({', '.join([_show(a) for a in fargs] + [f'{k}={_show(v)}' for k, v in fkwargs.items()])})"
        return f"<{dt!r} array shaped like {call}" + \
            (f", axis {perturb[0]} changed by {perturb[1]}" if perturb else "") + ">"
    return repr(node)


def _show_recipe(r):
    if r[0] == "call":
        _, name, args, kwargs, threads, grain = r
        parts = [_show(a) for a in args] + [f"{k}={_show(v)}" for k, v in kwargs.items()]
        return f"fastconv.{name}({', '.join(parts)})   [threads={threads}, _GRAIN={grain}]"
    _, layer, cargs, ckwargs, xs, grad, threads, grain = r
    parts = [_show(a) for a in cargs] + [f"{k}={_show(v)}" for k, v in ckwargs.items()]
    return (f"m = fastconv.nn.{layer}({', '.join(parts)}); "
            f"y = m({', '.join(_show(x) for x in xs)}); m.backward({_show(grad) if layer == 'CrossEntropyLoss' else grad})"
            f"   [threads={threads}, _GRAIN={grain}]")


def _has_huge(node):
    if isinstance(node, bool):
        return False
    if isinstance(node, int):
        return abs(node) >= 10**4
    if isinstance(node, float):
        return math.isfinite(node) and abs(node) >= 10**4
    if isinstance(node, (tuple, list, dict)):
        items = node.values() if isinstance(node, dict) else node
        return any(_has_huge(x) for x in items)
    return False


def _check(test, recipe):
    out = _worker.run(recipe)
    what = _show_recipe(recipe)
    if out[0] == "raised":
        _stats[test][out[1].rsplit(".", 1)[-1]] += 1
        _, etype, msg, stage, acceptable = out
        if etype.endswith("MemoryError") and not _has_huge(recipe):
            raise AssertionError(f"MemoryError in {stage} with no huge size:\n{what}\n{msg}")
        if not acceptable:
            raise AssertionError(f"{etype} in {stage} (only ValueError/TypeError allowed):\n"
                                 f"{what}\n{etype}: {msg}")
        return
    _stats[test][out[0]] += 1
    if out[0] in ("ok", "unbuildable"):      # unbuildable: numpy refused the test's array
        return
    if out[0] == "invariant":
        raise AssertionError(f"bad return value ({out[1]}):\n{what}")
    if out[0] == "crashed":
        raise AssertionError(f"the worker process died ({out[1]}) on:\n{what}\n"
                             f"--- its stderr (tail) ---\n{out[2]}")
    if out[0] == "hang":
        raise AssertionError(f"no result after {out[1]} s on:\n{what}\n"
                             f"--- worker stderr (tail) ---\n{out[2]}")
    raise AssertionError(f"unknown outcome {out!r}")


# ---- strategies --------------------------------------------------------------------------

HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 10**30,
        46341, 65536, 10**6, -2**31, -2**63, -2**64]
HUGE_DIMS = [2**16, 10**6, 46341, 2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]
FLOAT_DTYPES = ["float32", "float64"]
ODD_DTYPES = ["float16", "longdouble", "int8", "int32", "int64", "uint8", "uint64", "bool",
              "complex64", "complex128", "object", "<U3", "S2", "m8[s]", "M8[D]", "V8"]


def _weighted(*pairs):
    """one_of with integer weights: _weighted((3, a), (1, b)).  (Repeating a strategy inside
    one_of does not weight it: hypothesis collapses the duplicates; sampled_from does.)"""
    index = [i for i, (w, _) in enumerate(pairs) for _ in range(w)]
    strategies = [s for _, s in pairs]
    return st.sampled_from(index).flatmap(lambda i: strategies[i])


dtypes = _weighted((8, st.sampled_from(FLOAT_DTYPES)), (1, st.sampled_from(ODD_DTYPES)))
small_int = st.integers(-3, 8)
huge_int = st.sampled_from(HUGE)
np_scalar = st.builds(lambda t, v: ("np", t, v), st.sampled_from(["int8", "int64", "uint8",
                                                                   "float32", "float64",
                                                                   "bool"]),
                      st.integers(0, 4))
junk_scalar = st.one_of(
    small_int, huge_int,
    st.sampled_from([0.0, 1.0, 2.0, 1.5, -1.0, float("nan"), float("inf"), -float("inf"),
                     1e300]),
    st.sampled_from([None, True, False, "same", "valid", "mean", "sum", "none", "", "2", b"x",
                     1j, "nearest"]),
    np_scalar,
)


def _seq(items):
    return st.builds(lambda tag, xs: (tag, xs), st.sampled_from(["tuple", "list"]),
                     st.lists(items, max_size=4))


@st.composite
def shapes(draw, ndim=None):
    n = draw(st.sampled_from([0, 1, 2, 3, 4, 4, 4, 4, 5])) if ndim is None else ndim
    dims = []
    for _ in range(n):
        dims.append(draw(_weighted((12, st.integers(0, 6)), (1, st.sampled_from(HUGE_DIMS)))))
    return tuple(dims)


@st.composite
def arrays(draw, shape=None, dtype=None):
    """An array node: usually of `shape` and `dtype`, sometimes of a random shape/dtype or in
    an odd layout, or a broadcast/empty array."""
    if shape is None or draw(st.integers(0, 9)) == 0:
        shape = draw(shapes())
    if dtype is None or draw(st.integers(0, 11)) == 0:
        dtype = draw(dtypes)
    kind = draw(_weighted((10, st.just("rand")), (1, st.just("bcast")), (1, st.just("empty"))))
    extra = {"seed": draw(st.integers(0, 3))}
    if kind == "rand":
        extra["layout"] = draw(_weighted((6, st.just("c")), (1, st.sampled_from(
            ["f", "neg", "slice", "ro", "list"]))))
        extra["special"] = draw(_weighted((7, st.just(False)), (1, st.just(True))))
    elif kind == "bcast":
        extra["fill"] = draw(st.sampled_from([0.5, -1.0, 0.0, float("nan"), 3]))
    if kind == "empty" and _sizeof(shape) > _SMALL:
        kind = "bcast"
    return ("arr", kind, tuple(shape), dtype, tuple(sorted(extra.items())))


junk = st.one_of(junk_scalar, _seq(junk_scalar), arrays())


def maybe_junk(s, odds=8):
    """Usually `s`, one time in `odds` anything at all."""
    return _weighted((odds - 1, s), (1, junk))


def pair(lo, hi):
    """An int or a pair of ints in [lo, hi], in the forms the API accepts, now and then huge."""
    v = _weighted((10, st.integers(lo, hi)), (1, huge_int))
    return _weighted((4, v), (2, st.builds(lambda a, b: ("tuple", [a, b]), v, v)),
                     (1, st.builds(lambda a, b: ("list", [a, b]), v, v)),
                     (1, st.builds(lambda a: ("np", "int64", a), st.integers(lo, hi))))


def operand(shape, dtype, odds=8):
    """The array an argument wants, usually; sometimes a different array or junk."""
    return _weighted((odds - 1, arrays(shape, dtype)), (1, junk))


@st.composite
def pass_kwargs(draw, positional, kwargs):
    """Pass a random prefix of the optional arguments positionally, drop some keywords."""
    args, kw = list(positional), {}
    names = list(kwargs)
    k = draw(st.integers(0, len(names))) if draw(st.integers(0, 3)) == 0 else 0
    for name in names[:k]:
        args.append(kwargs[name])
    for name in names[k:]:
        if draw(st.integers(0, 5)) > 0:
            kw[name] = kwargs[name]
    return args, kw


perturbs = _weighted((6, st.none()), (1, st.tuples(st.integers(0, 3), st.sampled_from(
    [-1, 1, 2]))))
run_modes = st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([None, None, 1]))


def grad_node(fwd, fargs, fkwargs, dtype, fallback):
    return st.builds(lambda d, p: ("grad", fwd, fargs, fkwargs, d, p, fallback),
                     _weighted((6, st.just(dtype)), (1, dtypes)), perturbs)


@st.composite
def conv_call(draw, transposed, backward):
    g = draw(st.integers(1, 3))
    cg, lg = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.sampled_from([0, 1, 1, 2, 3]))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dt = draw(dtypes)
    if transposed:
        xshape, wshape = (n, g * cg, h, w), (g * cg, lg, kh, kw)
    else:
        xshape, wshape = (n, g * cg, h, w), (g * lg, cg, kh, kw)
    x = draw(operand(xshape, dt))
    wt = draw(operand(wshape, dt))
    pad = pair(0, 3) if transposed else _weighted((5, pair(0, 3)),
                                                  (1, st.sampled_from(["same", "valid"])))
    geo = {"stride": draw(maybe_junk(pair(1, 3))), "padding": draw(maybe_junk(pad))}
    if transposed:
        geo["output_padding"] = draw(maybe_junk(pair(0, 2)))
        geo["groups"] = draw(maybe_junk(_weighted((4, st.just(g)), (1, st.integers(-1, 4)))))
        geo["dilation"] = draw(maybe_junk(pair(1, 3)))
    else:
        geo["dilation"] = draw(maybe_junk(pair(1, 3)))
        geo["groups"] = draw(maybe_junk(_weighted((4, st.just(g)), (1, st.integers(-1, 4)))))
    fwd = "conv_transpose2d" if transposed else "conv2d"
    if backward:
        gy = draw(_weighted((7, grad_node(fwd, [x, wt], geo, dt, xshape)), (1, junk)))
        kw = dict(geo)
        if draw(st.integers(0, 3)) == 0:
            kw["output_mask"] = draw(maybe_junk(st.builds(
                lambda a, b, c: ("tuple", [a, b, c]), st.booleans(), st.booleans(),
                st.booleans()), odds=4))
        args, kwargs = draw(pass_kwargs([gy, x, wt], {k: v for k, v in kw.items()
                                                      if k != "output_mask"}))
        if "output_mask" in kw:
            kwargs["output_mask"] = kw["output_mask"]
        return ("call", fwd + "_backward", args, kwargs) + draw(run_modes)
    L = wshape[1] * g if transposed else wshape[0]
    bias = draw(_weighted((3, st.none()), (3, operand((L,), dt))))
    args, kwargs = draw(pass_kwargs([x, wt], dict({"bias": bias}, **geo)))
    return ("call", fwd, args, kwargs) + draw(run_modes)


@st.composite
def pool_call(draw, op, backward):
    n, c = draw(st.sampled_from([0, 1, 2, 3])), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dt = draw(dtypes)
    xshape = (n, c, h, w)
    x = draw(operand(xshape, dt))
    kw = {"kernel_size": draw(maybe_junk(pair(1, 4))),
          "stride": draw(maybe_junk(_weighted((1, st.none()), (3, pair(1, 3))))),
          "padding": draw(maybe_junk(pair(0, 2)))}
    if op == "max_pool2d":
        kw["dilation"] = draw(maybe_junk(pair(1, 3)))
        kw["ceil_mode"] = draw(maybe_junk(st.booleans()))
        if not backward:
            kw["return_indices"] = draw(maybe_junk(st.booleans()))
    else:
        kw["ceil_mode"] = draw(maybe_junk(st.booleans()))
        kw["count_include_pad"] = draw(maybe_junk(st.booleans()))
        kw["divisor_override"] = draw(maybe_junk(_weighted((3, st.none()),
                                                           (1, st.integers(-3, 5)))))
    if backward:
        fkw = {k: v for k, v in kw.items() if k != "return_indices"}
        gy = draw(_weighted((7, grad_node(op, [x], fkw, dt, xshape)), (1, junk)))
        ks = kw.pop("kernel_size")
        args, kwargs = draw(pass_kwargs([gy, x, ks], kw))
        return ("call", op + "_backward", args, kwargs) + draw(run_modes)
    ks = kw.pop("kernel_size")
    args, kwargs = draw(pass_kwargs([x, ks], kw))
    return ("call", op, args, kwargs) + draw(run_modes)


scales = maybe_junk(_weighted((6, pair(1, 3)), (1, st.sampled_from([2.0, 2.5, 0.5, 0.0]))))


@st.composite
def upsample_call(draw, backward):
    n, c = draw(st.sampled_from([0, 1, 2])), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    dt = draw(dtypes)
    x = draw(operand((n, c, h, w), dt))
    s = draw(scales)
    if backward:
        gy = draw(_weighted((7, grad_node("upsample_nearest2d", [x], {"scale_factor": s}, dt,
                                          (n, c, h, w))), (1, junk)))
        return ("call", "upsample_nearest2d_backward", [gy, s], {}) + draw(run_modes)
    return ("call", "upsample_nearest2d", [x, s], {}) + draw(run_modes)


@st.composite
def ce_args(draw):
    n, c = draw(st.sampled_from([0, 1, 2, 3, 5])), draw(st.integers(1, 5))
    dt = draw(dtypes)
    logits = draw(operand((n, c), dt))
    ign = draw(maybe_junk(_weighted((4, st.just(-100)), (2, st.integers(-2, 6)),
                                    (1, huge_int))))
    lab_lo = draw(st.sampled_from([0, 0, 0, -2]))
    lab_hi = c + draw(st.sampled_from([0, 0, 0, 1]))
    labels = ("arr", "labels", (n,), draw(st.sampled_from(["int64", "int64", "int32", "uint8"])),
              (("hi", lab_hi), ("lo", lab_lo), ("seed", draw(st.integers(0, 3)))))
    probs = ("arr", "probs", (n, c), dt, (("seed", 1),))
    target = draw(_weighted((4, st.just(labels)), (2, st.just(probs)), (1, operand((n,), dt))))
    kw = {"weight": draw(_weighted((3, st.none()), (2, operand((c,), dt)))),
          "reduction": draw(maybe_junk(st.sampled_from(["mean", "sum", "none"]))),
          "label_smoothing": draw(maybe_junk(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, 0])))}
    if draw(st.integers(0, 2)) == 0:
        kw["ignore_index"] = ign
    return n, dt, logits, target, kw


@st.composite
def ce_call(draw, backward):
    n, dt, logits, target, kw = draw(ce_args())
    if backward:
        kw["grad_output"] = draw(_weighted((2, st.none()), (1, operand((n,), "float64")),
                                           (1, st.sampled_from([2.0, -1, 0.5])),
                                           (1, operand((), dt)), (1, junk)))
    args, kwargs = draw(pass_kwargs([logits, target], kw))
    return ("call", "cross_entropy_backward" if backward else "cross_entropy", args,
            kwargs) + draw(run_modes)


CALLS = {
    "conv2d": conv_call(False, False),
    "conv2d_backward": conv_call(False, True),
    "conv_transpose2d": conv_call(True, False),
    "conv_transpose2d_backward": conv_call(True, True),
    "max_pool2d": pool_call("max_pool2d", False),
    "max_pool2d_backward": pool_call("max_pool2d", True),
    "avg_pool2d": pool_call("avg_pool2d", False),
    "avg_pool2d_backward": pool_call("avg_pool2d", True),
    "upsample_nearest2d": upsample_call(False),
    "upsample_nearest2d_backward": upsample_call(True),
    "cross_entropy": ce_call(False),
    "cross_entropy_backward": ce_call(True),
}

layer_dtypes = maybe_junk(st.sampled_from(["float32", "float64", ("np", "float32", 0)]))
rngs = maybe_junk(_weighted((2, st.none()), (2, st.integers(0, 3))))


@st.composite
def nn_call(draw):
    layer = draw(st.sampled_from(LAYERS))
    dt = draw(st.sampled_from(FLOAT_DTYPES))
    grad = (draw(_weighted((6, st.just(dt)), (1, dtypes))), draw(perturbs))
    n = draw(st.sampled_from([0, 1, 2, 3]))
    if layer in ("Conv2d", "ConvTranspose2d"):
        g = draw(maybe_junk(st.integers(1, 3)))
        gi = g if isinstance(g, int) and 1 <= g <= 3 else 1
        cin = gi * draw(st.integers(1, 3))
        cout = gi * draw(st.integers(1, 3))
        kw = {"stride": draw(maybe_junk(pair(1, 3))),
              "padding": draw(maybe_junk(pair(0, 2) if layer == "ConvTranspose2d" else
                                         _weighted((4, pair(0, 2)), (1, st.sampled_from(
                                             ["same", "valid"]))))),
              "dilation": draw(maybe_junk(pair(1, 2))), "groups": g,
              "bias": draw(maybe_junk(st.booleans())), "dtype": dt,
              "rng": draw(rngs)}
        if layer == "ConvTranspose2d":
            kw["output_padding"] = draw(maybe_junk(pair(0, 1)))
        if draw(st.integers(0, 7)) == 0:
            kw["dtype"] = draw(layer_dtypes)
        cargs = [draw(maybe_junk(st.just(cin), 12)), draw(maybe_junk(st.just(cout), 12)),
                 draw(maybe_junk(pair(1, 3), 12))]
        ckw = {k: v for k, v in kw.items() if draw(st.integers(0, 4)) > 0}
        xs = [draw(operand((n, cin, draw(st.integers(1, 8)), draw(st.integers(1, 8))), dt))]
    elif layer in ("MaxPool2d", "AvgPool2d"):
        cargs = [draw(maybe_junk(pair(1, 3)))]
        ckw = {"stride": draw(maybe_junk(_weighted((1, st.none()), (2, pair(1, 3))))),
               "padding": draw(maybe_junk(pair(0, 1))),
               "ceil_mode": draw(maybe_junk(st.booleans()))}
        if layer == "MaxPool2d":
            ckw["dilation"] = draw(maybe_junk(pair(1, 2)))
        else:
            ckw["count_include_pad"] = draw(maybe_junk(st.booleans()))
            ckw["divisor_override"] = draw(maybe_junk(st.none()))
        xs = [draw(operand((n, 2, draw(st.integers(1, 8)), draw(st.integers(1, 8))), dt))]
    elif layer == "Upsample":
        cargs = [draw(scales)]
        ckw = {"mode": draw(maybe_junk(st.just("nearest")))} if draw(st.booleans()) else {}
        xs = [draw(operand((n, 2, 3, 4), dt))]
    elif layer == "Linear":
        fin, fout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        cargs = [draw(maybe_junk(st.just(fin), 12)), draw(maybe_junk(st.just(fout), 12))]
        ckw = {"bias": draw(maybe_junk(st.booleans())), "rng": draw(rngs)}
        if draw(st.integers(0, 5)) == 0:
            ckw["dtype"] = draw(layer_dtypes)
        else:
            ckw["dtype"] = dt
        lead = draw(st.sampled_from([(n,), (n, 2), ()]))
        xs = [draw(operand(lead + (fin,), dt))]
    elif layer == "ReLU":
        cargs, ckw = [], {}
        xs = [draw(operand(draw(shapes()), dt))]
    elif layer == "Flatten":
        cargs = []
        ckw = {"start_dim": draw(maybe_junk(st.integers(-4, 4))),
               "end_dim": draw(maybe_junk(st.integers(-4, 4)))}
        xs = [draw(operand(draw(shapes()), dt))]
    elif layer == "Dropout":
        cargs = [draw(maybe_junk(st.sampled_from([0.0, 0.5, 1.0, 0.25])))]
        ckw = {"rng": draw(rngs)}
        xs = [draw(operand(draw(shapes()), dt))]
    else:   # CrossEntropyLoss
        n, cdt, logits, target, kw = draw(ce_args())
        cargs, ckw = [], kw
        xs = [logits, target]
        grad = draw(_weighted((2, st.none()), (1, operand((n,), "float64")),
                              (1, st.sampled_from([2.0, -1])), (1, junk)))
    return ("nn", layer, cargs, ckw, xs, grad) + draw(run_modes)


def _budget(mult=FUZZ_MULT):
    return settings(max_examples=max(1, settings.default.max_examples * mult), deadline=None,
                    suppress_health_check=list(HealthCheck))


# ---- tests -------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _worker_lifetime():
    yield
    _worker.stop()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_fuzz_function(name):
    @_budget()
    @given(recipe=CALLS[name])
    def run(recipe):
        _check(name, recipe)

    run()


@_budget(FUZZ_MULT * 4)
@given(recipe=nn_call())
def test_fuzz_nn_layers(recipe):
    _check("nn", recipe)


def test_worker_reports_a_crash():
    """The harness itself: a call that kills the worker is a failure naming the call."""
    w = Worker()
    try:
        w.start()
        out = w.run(("call", "conv2d", [("arr", "rand", (1, 1, 2, 2), "float64",
                                         (("seed", 0),))], {}, 1, None))
        assert out[0] == "raised" and out[-1] is True   # missing weight -> TypeError
        w.proc.send_signal(signal.SIGSEGV)      # as if the next call had crashed it
        out = w.run(("call", "conv2d", [], {}, 1, None))
        assert out[0] == "crashed" and "SIGSEGV" in out[1], out
    finally:
        w.stop()
