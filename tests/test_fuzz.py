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
dtype (int64 for max-pool indices) whose gradient shapes match the inputs'.  Forward calls now
and then get an ``out=``: shaped like the result, or made wrong (dtype, shape, layout,
read-only, a list, a NumPy scalar, a lone array for max-pool's two results) or junk; a normal
return must then be ``out`` itself, holding bitwise what the same call without ``out`` returns.

Each call runs in a long-lived child process (this file run as a script), so that a segfault or
an abort is reported as a failure naming the call that killed the child, with the child's
stderr (faulthandler's traceback, a sanitizer's report) instead of killing pytest.  The child
limits its address space (FASTCONV_FUZZ_MEM_MB, default 3072 MiB over what it uses at start), so
that legal-but-huge calls end in MemoryError instead of swapping, and a call that takes longer
than FASTCONV_FUZZ_TIMEOUT seconds (default 120) fails as a hang.

Budget: ``settings.default.max_examples`` of the hypothesis profile (tests/conftest.py: 'ci' 40,
'soak' 5,000) times FASTCONV_FUZZ_MULT (default 2) examples per function, 4 times that for the
layers.  FASTCONV_FUZZ_STATS=path appends a count of the outcomes of each test to that file;
FASTCONV_FUZZ_COLLECT=path writes every failure there and goes on (for long soak runs), e.g.

    HYPOTHESIS_PROFILE=soak FASTCONV_FUZZ_MULT=1 FASTCONV_FUZZ_COLLECT=fuzz.txt python -m pytest tests/test_fuzz.py
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
#   like the output of the forward call (if that call succeeds), perturbed in one axis /
#   ("out", fwd_name, fwd_args, fwd_kwargs, how) an out= for that forward call (_make_out).

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
        pool = [1, 2.5, -3, None, "a", 1j, (1,)] if special else [1, 2.5, -3, 0.25]
        out = np.empty(shape, dtype=object)
        for i in np.ndindex(*shape):
            out[i] = pool[rng.integers(0, len(pool))]
        return out
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


class _HarnessError(Exception):
    """A bug in this file's recipes, not in fastconv."""


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
        fargs = [_build(a, []) for a in fargs]
        fkwargs = {k: _build(v, []) for k, v in fkwargs.items()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = getattr(fastconv, fwd)(*fargs, **fkwargs)
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
    if tag == "out":
        return _make_out(*node[1:])
    raise _HarnessError(f"unknown recipe node {node!r}")


def _make_out(fwd, fargs, fkwargs, how):
    """An out= for fwd(*fargs, **fkwargs): NaN-filled (-3 for indices) arrays shaped like its
    result (if that call succeeds), left right ('exact') or made wrong as ``how`` says."""
    import fastconv
    fargs = [_build(a, []) for a in fargs]
    fkwargs = {k: _build(v, []) for k, v in fkwargs.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = getattr(fastconv, fwd)(*fargs, **fkwargs)
    except (ValueError, TypeError, MemoryError):
        result = np.zeros((2, 3))           # the call is invalid anyway
    except BaseException as e:  # noqa: BLE001 - fastconv itself failed: report it
        raise _ForwardFailed(e) from e
    outs = []
    for r in result if isinstance(result, tuple) else (result,):
        r = np.asarray(r)
        dt, shape = r.dtype, r.shape
        if how == "dtype":
            dt = np.dtype(np.float32 if dt == np.float64 else np.float64)
        elif how == "shape":
            shape = shape[:-1] + (shape[-1] + 1,) if shape else (1,)
        a = np.empty(shape[:-1] + (2 * shape[-1],) if how == "strided" and shape else shape, dt)
        a.fill(np.nan if dt.kind == "f" else -3)
        if how == "strided" and shape:
            a = a[..., ::2]
        elif how == "fortran":
            a = np.asfortranarray(a)
        elif how == "ro":
            a.setflags(write=False)
        elif how == "list":
            a = a.tolist()
        elif how == "scalar":
            a = a.reshape(-1)[0] if a.size else dt.type(0)
        outs.append(a)
    if how == "half" and len(outs) == 2:
        return (outs[0], None)
    return tuple(outs) if len(outs) > 1 and how != "first" else outs[0]


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


def _check_out(name, args, kwargs, result):
    """A call given out=: the result is out itself (a None in out's tuple allocated), holding
    bitwise what the same call without out returns."""
    import fastconv
    out = kwargs["out"]
    outs = out if isinstance(out, tuple) else (out,)
    got = result if isinstance(result, tuple) else (result,)
    if len(got) != len(outs) or any(o is not None and g is not o for g, o in zip(got, outs)):
        return "the result is not out"
    plain = getattr(fastconv, name)(*args, **{k: v for k, v in kwargs.items() if k != "out"})
    for g, p in zip(got, plain if isinstance(plain, tuple) else (plain,)):
        g, p = np.asarray(g), np.asarray(p)
        if g.dtype != p.dtype or g.shape != p.shape or g.tobytes() != p.tobytes():
            return "out holds something else than the result of the call without out"
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
            # out= is no input: it may be written, and the result is it
            kwargs = {k: _build(v, inputs if k != "out" else []) for k, v in kwargs.items()}
            stage = "the call"
            result = getattr(fastconv, name)(*args, **kwargs)
            bad = _check_return(name, result, inputs) or _grad_shapes(name, args, kwargs, result)
            if not bad and kwargs.get("out") is not None:
                stage = "the call without out (after the call with out succeeded)"
                bad = _check_out(name, args, kwargs, result)
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
        for a, before in inputs:
            if isinstance(a, np.ndarray) and a.dtype.kind != "O" and \
                    a.tobytes() != before.tobytes():
                return ("invariant", "an input array was modified")
        return ("ok", type(gx).__name__)
    except _HarnessError as e:
        return ("harness", str(e))
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
# examples per function: FUZZ_MULT x the profile's max_examples (x4 for the layers' test)
FUZZ_MULT = float(os.environ.get("FASTCONV_FUZZ_MULT", "2"))


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
    if tag == "out":
        _, fwd, fargs, fkwargs, how = node
        parts = [_show(a) for a in fargs] + [f"{k}={_show(v)}" for k, v in fkwargs.items()]
        return f"<out for {fwd}({', '.join(parts)}), {how}>"
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


def _failure(test, recipe, out):
    """The failure message for an outcome, or None when the outcome is acceptable."""
    what = _show_recipe(recipe)
    if out[0] == "raised":
        _, etype, msg, stage, acceptable = out
        if etype.endswith("MemoryError") and not _has_huge(recipe):
            return f"MemoryError in {stage} with no huge size:\n{what}\n{msg}"
        if not acceptable:
            return (f"{etype} in {stage} (only ValueError/TypeError allowed):\n{what}\n"
                    f"{etype}: {msg}")
        return None
    if out[0] in ("ok", "unbuildable"):      # unbuildable: numpy refused the test's own array
        return None
    if out[0] == "invariant":
        return f"bad return value ({out[1]}):\n{what}"
    if out[0] == "harness":
        return f"the test's recipe is broken ({out[1]}):\n{what}"
    if out[0] == "crashed":
        return (f"the worker process died ({out[1]}) on:\n{what}\n"
                f"--- its stderr (tail) ---\n{out[2]}")
    if out[0] == "hang":
        return f"no result after {out[1]} s on:\n{what}\n--- worker stderr (tail) ---\n{out[2]}"
    return f"unknown outcome {out!r}"


def _check(test, recipe):
    out = _worker.run(recipe)
    key = out[1].rsplit(".", 1)[-1] if out[0] == "raised" else out[0]
    _stats[test][key] += 1
    msg = _failure(test, recipe, out)
    if msg is None:
        return
    collect = os.environ.get("FASTCONV_FUZZ_COLLECT")
    if collect:     # soak runs: note every failure and go on (one line of context each)
        with open(collect, "a") as f:
            f.write(f"### {test}: {out[0]} {key} {out[3] if out[0] == 'raised' else ''}\n"
                    f"{msg}\n\n")
        return
    raise AssertionError(msg)


# ---- strategies --------------------------------------------------------------------------
# Every call strategy first draws how hostile the example is: 0 = a consistent, legal call
# (legal geometry, float or integer operands, odd layouts, now and then a huge legal value),
# 1 = a few arguments broken, 2 = most arguments broken.  Odd dtypes, shapes and values come
# from the broken arguments.

HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 10**30,
        46341, 65536, 10**6, -2**31, -2**63, -2**64]
HUGE_DIMS = [2**16, 10**6, 46341, 2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]
FLOAT_DTYPES = ["float32", "float64"]
LEGAL_DTYPES = ["float16", "int8", "int32", "int64", "uint8", "bool"]
ODD_DTYPES = ["longdouble", "uint64", "complex64", "complex128", "object", "<U3", "S2",
              "m8[s]", "M8[D]", "V8"]
HOSTILITY = st.sampled_from([0, 0, 0, 0, 1, 1, 1, 2])
JUNK_ODDS = {0: 0, 1: 5, 2: 2}     # one argument in ODDS is junk (0: never)


def _weighted(*pairs):
    """one_of with integer weights: _weighted((3, a), (1, b)).  (Repeating a strategy inside
    one_of does not weight it: hypothesis collapses the duplicates; sampled_from does.)"""
    pairs = [(w, s) for w, s in pairs if w > 0]
    if len(pairs) == 1:
        return pairs[0][1]
    index = [i for i, (w, _) in enumerate(pairs) for _ in range(w)]
    strategies = [s for _, s in pairs]
    return st.sampled_from(index).flatmap(lambda i: strategies[i])


def dtypes(h):
    return _weighted((12, st.sampled_from(FLOAT_DTYPES)), (2, st.sampled_from(LEGAL_DTYPES)),
                     (h * 2, st.sampled_from(ODD_DTYPES)))


small_int = st.integers(-3, 8)
huge_int = st.sampled_from(HUGE)
np_scalar = st.builds(lambda t, v: ("np", t, v),
                      st.sampled_from(["int8", "int64", "uint8", "float32", "float64", "bool"]),
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
    return tuple(draw(_weighted((10, st.integers(0, 6)), (1, st.sampled_from(HUGE_DIMS))))
                 for _ in range(n))


@st.composite
def arrays(draw, shape=None, dtype=None, h=2):
    """An array node: of `shape` and `dtype` (random ones if None), in a random layout, now and
    then a broadcast or an empty array."""
    if shape is None:
        shape = draw(shapes())
    if dtype is None:
        dtype = draw(dtypes(2))
    kind = draw(_weighted((12, st.just("rand")), (1, st.just("bcast")), (h, st.just("empty"))))
    extra = {"seed": draw(st.integers(0, 3))}
    if kind == "rand":
        extra["layout"] = draw(_weighted((5, st.just("c")), (1, st.sampled_from(
            ["f", "neg", "slice", "ro", "list"]))))
        extra["special"] = draw(_weighted((6, st.just(False)), (1, st.just(True))))
    elif kind == "bcast":
        extra["fill"] = draw(st.sampled_from([0.5, -1.0, 0.0, float("nan"), 3]))
    if kind == "empty" and _sizeof(shape) > _SMALL:
        kind = "bcast"
    return ("arr", kind, tuple(shape), dtype, tuple(sorted(extra.items())))


junk = st.one_of(junk_scalar, _seq(junk_scalar), arrays())


def mj(h, s):
    """`s`, or (one time in JUNK_ODDS[h]) anything at all."""
    odds = JUNK_ODDS[h]
    return s if not odds else _weighted((odds - 1, s), (1, junk))


@st.composite
def operand(draw, h, shape, dtype):
    """The array an argument wants, usually; when hostile, one of another shape or dtype, or
    junk."""
    odds = JUNK_ODDS[h]
    if odds and draw(st.integers(0, odds - 1)) == 0:
        what = draw(st.sampled_from(["shape", "dtype", "both", "junk", "bcast"]))
        if what == "junk":
            return draw(junk)
        if what in ("shape", "both"):
            shape = draw(shapes())
        if what in ("dtype", "both"):
            dtype = draw(dtypes(2))
        if what == "bcast":      # the right rank, one huge dimension: a zero-strided view
            shape = list(shape)
            if shape:
                shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from(HUGE_DIMS))
            return ("arr", "bcast", tuple(shape), dtype, (("fill", 0.5),))
    return draw(arrays(shape, dtype, h))


def _form(draw, a, b):
    """(a, b) in one of the forms the API takes: an int (when a == b), tuple, list, numpy."""
    forms = ["tuple", "list", "np1d"] + (["int", "int", "int", "npint"] if a == b else [])
    f = draw(st.sampled_from(forms))
    if f == "int":
        return a
    if f == "npint":
        return ("np", "int64", a) if abs(a) < 2**63 else a
    if f == "np1d":
        return ("arr", "labels", (2,), "int64", (("hi", max(a, b) + 1), ("lo", min(a, b)),
                                                  ("seed", 0))) if a == b else ("tuple", [a, b])
    return (f, [a, b])


@st.composite
def geo_pair(draw, lo, hi, h):
    """Two per-axis values in [lo, hi] (now and then a huge one) -> (node, (a, b))."""
    v = _weighted((30, st.integers(lo, hi)), (1 + 2 * h, huge_int))
    a = draw(v)
    b = a if draw(st.booleans()) else draw(v)
    return _form(draw, a, b), (a, b)


def _fit(need, spare):
    """An input size that gives at least one output: >= need, capped."""
    return max(1, min(need, 40)) + spare


perturbs = _weighted((6, st.none()), (1, st.tuples(st.integers(0, 3),
                                                   st.sampled_from([-1, 1, 2]))))
run_modes = st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([None, None, 1]))


OUT_WRONGS = ["dtype", "shape", "fortran", "strided", "ro", "list", "scalar", "first", "half"]


@st.composite
def with_out(draw, h, fwd, args, kwargs):
    """kwargs, one time in three with an out= for fwd(*args, **kwargs): mostly the right one,
    else a wrong one (OUT_WRONGS, see _make_out) or junk."""
    if draw(st.integers(0, 2)):
        return kwargs
    how = draw(_weighted((3, st.just("exact")), (1 + h, st.sampled_from(OUT_WRONGS))))
    node = ("out", fwd, list(args), dict(kwargs), how)
    return dict(kwargs, out=draw(mj(h, st.just(node))))


def grad_node(h, fwd, fargs, fkwargs, dtype, fallback):
    return st.builds(lambda d, p: ("grad", fwd, fargs, fkwargs, d, p, fallback),
                     _weighted((8, st.just(dtype)), (h, dtypes(2))),
                     perturbs if h else st.none())


@st.composite
def pass_kwargs(draw, positional, kwargs):
    """Pass a random prefix of the optional arguments positionally, leave some out;
    -> (args, kwargs, {name: value of every optional argument passed})."""
    args, kw = list(positional), {}
    names = list(kwargs)
    k = draw(st.integers(0, len(names))) if draw(st.integers(0, 3)) == 0 else 0
    for name in names[:k]:
        args.append(kwargs[name])
    for name in names[k:]:
        if draw(st.integers(0, 5)) > 0:
            kw[name] = kwargs[name]
    passed = {name: kwargs[name] for name in names[:k]}
    passed.update(kw)
    return args, kw, passed


@st.composite
def conv_call(draw, transposed, backward):
    h = draw(HOSTILITY)
    g = draw(st.integers(1, 3))
    cg, lg = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.sampled_from([0, 1, 1, 2, 3]))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s_node, s = draw(geo_pair(1, 3, h))
    d_node, d = draw(geo_pair(1, 3, h))
    p_node, p = draw(geo_pair(0, 3, h))
    size = []
    for i in range(2):
        if transposed:
            extra = 2 * p[i] - d[i] * (k[i] - 1)
            need = 1 + max(0, -(-extra // s[i])) if s[i] < 2**20 else 1
        else:
            need = d[i] * (k[i] - 1) + 1 - 2 * p[i]
        size.append(_fit(need, draw(st.integers(0, 5))))
    dt = draw(dtypes(h))
    if transposed:
        xshape, wshape = (n, g * cg) + tuple(size), (g * cg, lg) + k
        op_node, _ = draw(geo_pair(0, max(0, min(max(s), max(d), 3) - 1), h))
    else:
        xshape, wshape = (n, g * cg) + tuple(size), (g * lg, cg) + k
        if draw(st.integers(0, 5)) == 0:
            p_node = draw(st.sampled_from(["same", "valid"]))
    x = draw(operand(h, xshape, dt))
    wt = draw(operand(h, wshape, dt if draw(st.integers(0, 7)) else draw(dtypes(h))))
    geo = {"stride": draw(mj(h, st.just(s_node))), "padding": draw(mj(h, st.just(p_node)))}
    groups = draw(mj(h, _weighted((6, st.just(g)), (h, st.integers(-1, 4)),
                                  (h, st.just(("np", "int64", g))))))
    if transposed:
        geo["output_padding"] = draw(mj(h, st.just(op_node)))
        geo["groups"] = groups
        geo["dilation"] = draw(mj(h, st.just(d_node)))
    else:
        geo["dilation"] = draw(mj(h, st.just(d_node)))
        geo["groups"] = groups
    fwd = "conv_transpose2d" if transposed else "conv2d"
    if backward:
        args, kwargs, passed = draw(pass_kwargs([None, x, wt], geo))
        args[0] = draw(_weighted((12, grad_node(h, fwd, [x, wt], passed, dt, xshape)),
                                 (h, junk)))
        if draw(st.integers(0, 2)) == 0:
            kwargs["output_mask"] = draw(mj(h, st.builds(
                lambda a, b, c: ("tuple", [a, b, c]), st.booleans(), st.booleans(),
                st.booleans())))
        return ("call", fwd + "_backward", args, kwargs) + draw(run_modes)
    L = wshape[1] * g if transposed else wshape[0]
    bias = draw(_weighted((3, st.none()), (3, operand(h, (L,), dt))))
    args, kwargs, _ = draw(pass_kwargs([x, wt], dict({"bias": bias}, **geo)))
    kwargs = draw(with_out(h, fwd, args, kwargs))
    return ("call", fwd, args, kwargs) + draw(run_modes)


@st.composite
def pool_call(draw, op, backward):
    h = draw(HOSTILITY)
    n, c = draw(st.sampled_from([0, 1, 2, 3])), draw(st.integers(1, 3))
    k_node, k = draw(geo_pair(1, 4, h))
    s_node, s = draw(geo_pair(1, 3, h))
    if draw(st.integers(0, 3)) == 0:
        s_node, s = None, k
    p_node, p = draw(geo_pair(0, max(0, min(k) // 2), h))
    d_node, d = draw(geo_pair(1, 3, h)) if op == "max_pool2d" else (1, (1, 1))
    size = tuple(_fit(d[i] * (k[i] - 1) + 1 - 2 * p[i], draw(st.integers(0, 5)))
                 for i in range(2))
    dt = draw(dtypes(h))
    xshape = (n, c) + size
    x = draw(operand(h, xshape, dt))
    kw = {"kernel_size": draw(mj(h, st.just(k_node))), "stride": draw(mj(h, st.just(s_node))),
          "padding": draw(mj(h, st.just(p_node)))}
    if op == "max_pool2d":
        kw["dilation"] = draw(mj(h, st.just(d_node)))
        kw["ceil_mode"] = draw(mj(h, st.booleans()))
        if not backward:
            kw["return_indices"] = draw(mj(h, st.booleans()))
    else:
        kw["ceil_mode"] = draw(mj(h, st.booleans()))
        kw["count_include_pad"] = draw(mj(h, st.booleans()))
        kw["divisor_override"] = draw(mj(h, _weighted((4, st.none()), (1, st.integers(-3, 5)),
                                                      (h, huge_int))))
    if backward:
        ks = kw.pop("kernel_size")
        args, kwargs, passed = draw(pass_kwargs([None, x, ks], kw))
        args[0] = draw(_weighted((12, grad_node(h, op, [x, ks], passed, dt, xshape)),
                                 (h, junk)))
        return ("call", op + "_backward", args, kwargs) + draw(run_modes)
    ks = kw.pop("kernel_size")
    args, kwargs, _ = draw(pass_kwargs([x, ks], kw))
    kwargs = draw(with_out(h, op, args, kwargs))
    return ("call", op, args, kwargs) + draw(run_modes)


def scales(h):
    return mj(h, _weighted((8, geo_pair(1, 3, h).map(lambda t: t[0])),
                           (1, st.sampled_from([2.0, 1.0, 2.5, 0.5, 0.0, ("tuple", [2.0, 3])]))))


@st.composite
def upsample_call(draw, backward):
    h = draw(HOSTILITY)
    n, c = draw(st.sampled_from([0, 1, 2])), draw(st.integers(1, 3))
    hh, ww = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    dt = draw(dtypes(h))
    x = draw(operand(h, (n, c, hh, ww), dt))
    s = draw(scales(h))
    if backward:
        gy = draw(_weighted((12, grad_node(h, "upsample_nearest2d", [x], {"scale_factor": s},
                                           dt, (n, c, hh, ww))), (h, junk)))
        return ("call", "upsample_nearest2d_backward", [gy, s], {}) + draw(run_modes)
    kwargs = draw(with_out(h, "upsample_nearest2d", [x, s], {}))
    return ("call", "upsample_nearest2d", [x, s], kwargs) + draw(run_modes)


@st.composite
def ce_args(draw, h):
    n, c = draw(st.sampled_from([0, 1, 2, 3, 5, 8])), draw(st.integers(1, 5))
    dt = draw(dtypes(h))
    logits = draw(operand(h, (n, c), dt))
    ign = draw(mj(h, _weighted((4, st.just(-100)), (2, st.integers(-2, 6)), (h, huge_int))))
    lo = draw(_weighted((6, st.just(0)), (h, st.just(-2))))
    hi = c + draw(_weighted((6, st.just(0)), (h, st.just(1))))
    labels = ("arr", "labels", (n,), draw(st.sampled_from(["int64", "int64", "int32", "uint8"])),
              (("hi", hi), ("lo", lo), ("seed", draw(st.integers(0, 3)))))
    probs = ("arr", "probs", (n, c), dt if draw(st.integers(0, 5)) else draw(dtypes(h)),
             (("seed", 1),))
    target = draw(_weighted((4, st.just(labels)), (2, st.just(probs)),
                            (h, operand(h, (n,), dt))))
    kw = {"weight": draw(_weighted((3, st.none()), (2, operand(h, (c,), dt)))),
          "reduction": draw(mj(h, st.sampled_from(["mean", "sum", "none"]))),
          "label_smoothing": draw(mj(h, st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, 0])))}
    if draw(st.integers(0, 2)) == 0:
        kw["ignore_index"] = ign
    return n, dt, logits, target, kw


@st.composite
def ce_call(draw, backward):
    h = draw(HOSTILITY)
    n, dt, logits, target, kw = draw(ce_args(h))
    if backward:
        red = kw.get("reduction", "mean")
        right = operand(h, (n,), "float64") if red == "none" else \
            st.sampled_from([None, 2.0, -1, 0.5, ("np", "float32", 2)])
        kw["grad_output"] = draw(_weighted((2, st.none()), (4, right), (h, junk)))
    args, kwargs, _ = draw(pass_kwargs([logits, target], kw))
    if not backward:
        kwargs = draw(with_out(h, "cross_entropy", args, kwargs))
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


@st.composite
def nn_call(draw):
    h = draw(HOSTILITY)
    layer = draw(st.sampled_from(LAYERS))
    dt = draw(st.sampled_from(FLOAT_DTYPES))
    xdt = dt if draw(st.integers(0, 5)) else draw(dtypes(h))
    grad = (draw(_weighted((8, st.just(dt)), (h, dtypes(2)))), draw(perturbs) if h else None)
    n = draw(st.sampled_from([0, 1, 2, 3]))
    rng = mj(h, _weighted((2, st.none()), (2, st.integers(0, 3))))
    ldt = mj(h, st.sampled_from(["float32", "float64", ("np", "float32", 0)]))
    if layer in ("Conv2d", "ConvTranspose2d"):
        g = draw(st.integers(1, 3))
        cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
        k_node, k = draw(geo_pair(1, 3, h))
        s_node, s = draw(geo_pair(1, 3, h))
        d_node, d = draw(geo_pair(1, 2, h))
        p_node, p = draw(geo_pair(0, 2, h))
        kw = {"stride": draw(mj(h, st.just(s_node))), "padding": draw(mj(h, st.just(p_node))),
              "dilation": draw(mj(h, st.just(d_node))), "groups": draw(mj(h, st.just(g))),
              "bias": draw(mj(h, st.booleans())), "dtype": draw(ldt) if h else dt,
              "rng": draw(rng)}
        if layer == "ConvTranspose2d":
            kw["output_padding"] = draw(mj(h, geo_pair(0, max(0, min(max(s), max(d), 2) - 1),
                                                       h).map(lambda t: t[0])))
            size = [1 + draw(st.integers(0, 5)) + (2 * p[i] > d[i] * (k[i] - 1)) * 3
                    for i in range(2)]
        else:
            if draw(st.integers(0, 5)) == 0:
                kw["padding"] = draw(st.sampled_from(["same", "valid"]))
            size = [_fit(d[i] * (k[i] - 1) + 1 - 2 * p[i], draw(st.integers(0, 5)))
                    for i in range(2)]
        cargs = [draw(mj(h, st.just(cin))), draw(mj(h, st.just(cout))),
                 draw(mj(h, st.just(k_node)))]
        ckw = {key: v for key, v in kw.items() if draw(st.integers(0, 4)) > 0}
        xs = [draw(operand(h, (n, cin) + tuple(size), xdt))]
    elif layer in ("MaxPool2d", "AvgPool2d"):
        k_node, k = draw(geo_pair(1, 3, h))
        p_node, p = draw(geo_pair(0, max(0, min(k) // 2), h))
        ckw = {"stride": draw(mj(h, _weighted((1, st.none()),
                                              (2, geo_pair(1, 3, h).map(lambda t: t[0]))))),
               "padding": draw(mj(h, st.just(p_node))),
               "ceil_mode": draw(mj(h, st.booleans()))}
        d = (1, 1)
        if layer == "MaxPool2d":
            d_node, d = draw(geo_pair(1, 2, h))
            ckw["dilation"] = draw(mj(h, st.just(d_node)))
        else:
            ckw["count_include_pad"] = draw(mj(h, st.booleans()))
            ckw["divisor_override"] = draw(mj(h, _weighted((3, st.none()),
                                                           (1, st.integers(1, 5)))))
        cargs = [draw(mj(h, st.just(k_node)))]
        size = tuple(_fit(d[i] * (k[i] - 1) + 1 - 2 * p[i], draw(st.integers(0, 4)))
                     for i in range(2))
        xs = [draw(operand(h, (n, 2) + size, xdt))]
    elif layer == "Upsample":
        cargs = [draw(scales(h))]
        ckw = {"mode": draw(mj(h, st.just("nearest")))} if draw(st.booleans()) else {}
        xs = [draw(operand(h, (n, 2, 3, 4), xdt))]
    elif layer == "Linear":
        fin, fout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        cargs = [draw(mj(h, st.just(fin))), draw(mj(h, st.just(fout)))]
        ckw = {"bias": draw(mj(h, st.booleans())), "rng": draw(rng),
               "dtype": draw(ldt) if h else dt}
        lead = draw(st.sampled_from([(n,), (n, 2), ()]))
        xs = [draw(operand(h, lead + (fin,), xdt))]
    elif layer == "ReLU":
        cargs, ckw = [], {}
        xs = [draw(operand(h, draw(shapes()) if h else (n, 3, 2, 2), xdt))]
    elif layer == "Flatten":
        cargs = []
        ckw = {"start_dim": draw(mj(h, st.integers(-4, 3))),
               "end_dim": draw(mj(h, st.integers(-4, 3)))}
        xs = [draw(operand(h, draw(shapes()) if h else (n, 3, 2, 2), xdt))]
    elif layer == "Dropout":
        cargs = [draw(mj(h, st.sampled_from([0.0, 0.5, 1.0, 0.25])))]
        ckw = {"rng": draw(rng)}
        xs = [draw(operand(h, draw(shapes()) if h else (n, 3, 2, 2), xdt))]
    else:   # CrossEntropyLoss
        n, cdt, logits, target, kw = draw(ce_args(h))
        cargs, ckw = [], kw
        xs = [logits, target]
        red = kw.get("reduction", "mean")
        right = operand(h, (n,), "float64") if red == "none" else \
            st.sampled_from([None, 2.0, -1])
        grad = draw(_weighted((2, st.none()), (4, right), (h, junk)))
    return ("nn", layer, cargs, ckw, xs, grad) + draw(run_modes)


def _budget(mult=FUZZ_MULT):
    return settings(max_examples=max(1, int(settings.default.max_examples * mult)),
                    deadline=None,
                    suppress_health_check=list(HealthCheck))


# ---- tests -------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _worker_lifetime():
    yield
    _worker.stop()


NOT_FUZZED = {"set_num_threads", "get_num_threads", "show_config"}   # no kernel behind them
NOT_LAYERS = {"Parameter", "Module", "Sequential", "manual_seed",
              "no_grad", "is_grad_enabled"}          # a mode, not a layer


def test_every_public_function_and_layer_is_fuzzed():
    import fastconv
    import fastconv.nn

    assert set(fastconv.__all__) - NOT_FUZZED == set(FUNCTIONS)
    assert set(fastconv.nn.__all__) - NOT_LAYERS == set(LAYERS)


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
        assert out[0] == "crashed", out
        # (under AddressSanitizer the child reports the signal itself and exits with 1)
        assert "SIGSEGV" in out[1] or "asan" in os.environ.get("LD_PRELOAD", ""), out
    finally:
        w.stop()
