"""Legal but awkward inputs give the reference's answer, and inputs are never touched.

Every public function is run on a table of small cases (``CASES``) under a set of layouts
(``LAYOUTS``): non-contiguous views (every other element of a bigger array, a channel slice),
negative strides, Fortran order, read-only, zero-strided broadcasts, integer arrays and Python
lists; each in float64 and (where the layout keeps the dtype) float32.  Each call is compared
with ``reference.<same function>`` on the same values, and checked to leave its inputs bitwise
unchanged, to return new arrays (no memory shared with any input) of the right dtype.
Further tests cover an empty batch, NaN / +-inf, extreme logits, ties, ``output_mask``, numpy
scalars as parameters and huge legal pooling windows.
"""
import copy
import functools
import math
import time

import numpy as np
import pytest

import fastconv
import reference

SEED = 20240607
F64, F32 = np.dtype(np.float64), np.dtype(np.float32)


def _rng(salt=0):
    return np.random.default_rng(SEED + salt)


class A:
    """An array operand of a case, with its role: 'f' float data, 'w' positive float data
    (class weights), 'p' class probabilities, 'l' integer labels."""

    def __init__(self, value, role="f"):
        self.value, self.role = value, role


# --------------------------------------------------------------------------------------------
# cases: name -> builder(n) -> (function name, args, kwargs); A() marks the array operands
# --------------------------------------------------------------------------------------------

CASES = {}


def case(name):
    def deco(f):
        CASES[name] = f
        return f
    return deco


def _conv_case(name, xs, ws, bias, geo, salt):
    @case(f"conv2d-{name}")
    def fwd(n):
        r = _rng(salt)
        x, w = r.standard_normal((n,) + xs), r.standard_normal(ws)
        args = [A(x), A(w)] + ([A(r.standard_normal(ws[0]))] if bias else [])
        return "conv2d", args, dict(geo)

    @case(f"conv2d_backward-{name}")
    def bwd(n):
        r = _rng(salt)
        x, w = r.standard_normal((n,) + xs), r.standard_normal(ws)
        go = r.standard_normal(reference.conv2d(x, w, **geo).shape)
        return "conv2d_backward", [A(go), A(x), A(w)], dict(geo)


_conv_case("groups", (4, 6, 7), (6, 2, 3, 2), True,
           dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), 1)
_conv_case("same", (3, 5, 6), (4, 3, 3, 2), False, dict(padding="same", dilation=2), 2)
_conv_case("1x1", (3, 4, 5), (5, 3, 1, 1), True, {}, 3)
_conv_case("depthwise", (3, 5, 5), (6, 1, 3, 3), True,
           dict(stride=2, padding=1, groups=3), 4)
_conv_case("bigpad", (2, 2, 2), (3, 2, 2, 2), True, dict(padding=3, stride=(1, 2)), 5)


def _convT_case(name, xs, ws, bias, geo, salt):
    @case(f"conv_transpose2d-{name}")
    def fwd(n):
        r = _rng(salt)
        x, w = r.standard_normal((n,) + xs), r.standard_normal(ws)
        g = geo.get("groups", 1)
        args = [A(x), A(w)] + ([A(r.standard_normal(ws[1] * g))] if bias else [])
        return "conv_transpose2d", args, dict(geo)

    @case(f"conv_transpose2d_backward-{name}")
    def bwd(n):
        r = _rng(salt)
        x, w = r.standard_normal((n,) + xs), r.standard_normal(ws)
        go = r.standard_normal(reference.conv_transpose2d(x, w, **geo).shape)
        return "conv_transpose2d_backward", [A(go), A(x), A(w)], dict(geo)


_convT_case("groups", (4, 3, 4), (4, 3, 3, 2), True,
            dict(stride=2, padding=1, output_padding=1, groups=2, dilation=(1, 2)), 11)
_convT_case("gaps", (2, 3, 3), (2, 2, 2, 2), True, dict(stride=3), 12)
_convT_case("1x1", (3, 3, 4), (3, 2, 1, 1), True, {}, 13)
_convT_case("dilation-outpad", (2, 3, 3), (2, 3, 2, 3), False,
            dict(stride=1, dilation=3, output_padding=(2, 1), padding=(0, 1)), 14)


def _pool_case(kind, name, xs, params, salt):
    fwd_name, bwd_name = f"{kind}_pool2d", f"{kind}_pool2d_backward"

    @case(f"{fwd_name}-{name}")
    def fwd(n):
        x = _rng(salt).standard_normal((n,) + xs)
        return fwd_name, [A(x)], dict(params)

    @case(f"{bwd_name}-{name}")
    def bwd(n):
        r = _rng(salt)
        x = r.standard_normal((n,) + xs)
        p = {k: v for k, v in params.items() if k != "return_indices"}
        go = r.standard_normal(getattr(reference, fwd_name)(x, **p).shape)
        return bwd_name, [A(go), A(x)], p


_pool_case("max", "ceil-indices", (3, 7, 8),
           dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, return_indices=True), 21)
_pool_case("max", "dilated", (2, 7, 6),
           dict(kernel_size=(2, 3), stride=(1, 2), padding=1, dilation=(3, 1), ceil_mode=True,
                return_indices=True), 22)
_pool_case("max", "overlap", (2, 5, 5), dict(kernel_size=3, stride=1), 23)
_pool_case("max", "k1", (2, 3, 4), dict(kernel_size=1), 24)
_pool_case("avg", "ceil-nopad", (3, 7, 8),
           dict(kernel_size=(3, 2), stride=2, padding=1, ceil_mode=True,
                count_include_pad=False), 25)
_pool_case("avg", "ceil-pad", (2, 6, 7),
           dict(kernel_size=3, stride=(2, 3), padding=1, ceil_mode=True), 26)
_pool_case("avg", "divisor", (2, 4, 5), dict(kernel_size=2, stride=1, divisor_override=3), 27)


def _up_case(name, xs, scale, salt):
    @case(f"upsample_nearest2d-{name}")
    def fwd(n):
        return "upsample_nearest2d", [A(_rng(salt).standard_normal((n,) + xs))], \
            dict(scale_factor=scale)

    @case(f"upsample_nearest2d_backward-{name}")
    def bwd(n):
        sh, sw = scale if isinstance(scale, tuple) else (scale, scale)
        go = _rng(salt).standard_normal((n, xs[0], xs[1] * sh, xs[2] * sw))
        return "upsample_nearest2d_backward", [A(go)], dict(scale_factor=scale)


_up_case("2x3", (3, 3, 4), (2, 3), 31)
_up_case("1", (2, 3, 3), 1, 32)


def _labels(r, n, C, ignore_index=-100):
    t = r.integers(0, C, n)
    if n >= 2:
        t[1] = ignore_index
    return t


def _ce_case(name, C, probs, weight, params, salt):
    for fn in ("cross_entropy", "cross_entropy_backward"):
        def build(n, fn=fn):
            r = _rng(salt)
            logits = 3 * r.standard_normal((n, C))
            if probs:
                e = np.exp(r.standard_normal((n, C)))
                target = A(e / e.sum(1, keepdims=True), "p")
            else:
                target = A(_labels(r, n, C, params.get("ignore_index", -100)), "l")
            kw = dict(params)
            if weight:
                kw["weight"] = A(r.uniform(0.5, 2.0, C), "w")
            if fn.endswith("backward"):
                if kw.get("reduction") == "none":
                    kw["grad_output"] = A(r.standard_normal(n))
                elif kw.get("reduction") == "sum":
                    kw["grad_output"] = 0.5
            return fn, [A(logits), target], kw
        CASES[f"{fn}-{name}"] = build


_ce_case("labels-mean", 5, False, True, dict(label_smoothing=0.1), 41)
_ce_case("labels-sum", 5, False, False, dict(reduction="sum"), 42)
_ce_case("labels-none", 4, False, True, dict(reduction="none", label_smoothing=0.3), 43)
_ce_case("labels-ignore0", 3, False, False, dict(ignore_index=0, label_smoothing=0.2), 44)
_ce_case("one-class", 1, False, False, {}, 45)
_ce_case("probs-mean", 5, True, True, dict(label_smoothing=0.2), 46)
_ce_case("probs-none", 4, True, False, dict(reduction="none"), 47)
_ce_case("probs-sum", 4, True, True, dict(reduction="sum"), 48)

N = 3     # batch size of the layout tests


# --------------------------------------------------------------------------------------------
# layouts: A -> (operand as passed, buffer it lives in); 'value-changing' ones alter the data
# --------------------------------------------------------------------------------------------

def _fill(a):
    """What surrounds the data in a bigger buffer: poison that shows up if read."""
    return np.nan if a.dtype.kind == "f" else 10**6


def lay_contiguous(a):
    c = a.copy()
    return c, c


def lay_strided(a):
    big = np.full(tuple(2 * s + 1 for s in a.shape), _fill(a), a.dtype)
    view = big[tuple(slice(1, None, 2) for _ in a.shape)]
    view[...] = a
    return view, big


def lay_slice(a):
    """A slice of the channel axis (axis 1; axis 0 of 1-D operands) of a bigger array."""
    ax = 1 if a.ndim >= 2 else 0
    shape = list(a.shape)
    shape[ax] += 3
    big = np.full(shape, _fill(a), a.dtype)
    idx = [slice(None)] * a.ndim
    idx[ax] = slice(2, 2 + a.shape[ax])
    view = big[tuple(idx)]
    view[...] = a
    return view, big


def lay_negative(a):
    rev = tuple(slice(None, None, -1) for _ in a.shape)
    big = a[rev].copy()
    return big[rev], big


def lay_fortran(a):
    f = np.asfortranarray(a.copy())
    return f, f


def lay_transposed(a):
    """Last two axes swapped in memory (a transpose view of a contiguous array)."""
    if a.ndim < 2:
        return lay_negative(a)
    t = np.ascontiguousarray(np.swapaxes(a, -1, -2))
    return np.swapaxes(t, -1, -2), t


def lay_readonly(a):
    c = a.copy()
    c.setflags(write=False)
    return c, c


def lay_broadcast(a):
    """Zero-strided along the batch axis: every image equals the first (value-changing)."""
    if a.ndim == 0 or a.shape[0] == 0:
        return lay_readonly(a)
    v = np.broadcast_to(a[:1], a.shape)
    return v, v


LAYOUTS = {
    "contiguous": lay_contiguous, "strided": lay_strided, "channel-slice": lay_slice,
    "negative": lay_negative, "fortran": lay_fortran, "transposed": lay_transposed,
    "readonly": lay_readonly, "broadcast": lay_broadcast,
    "int": None,     # small integers (value-changing); class probabilities stay float
    "list": None,    # nested Python lists
}
VALUE_CHANGING = {"broadcast", "int"}


def _cast(obj, dtype):
    if isinstance(obj, A) and obj.role in "fwp":
        return A(obj.value.astype(dtype), obj.role)
    return obj


def _int_values(obj):
    if isinstance(obj, A) and obj.role in "fw":
        v = np.rint(obj.value * 2)
        if obj.role == "w":
            v = np.maximum(v, 1)
        return A(v.astype(np.int64), obj.role)
    return obj


@functools.lru_cache(maxsize=None)
def _built(name, n):
    return CASES[name](n)


def _case(name, n, dtype):
    fn, args, kw = _built(name, n)
    return (fn, [_cast(a, dtype) for a in args], {k: _cast(v, dtype) for k, v in kw.items()})


def _plain(obj):
    return obj.value if isinstance(obj, A) else obj


def _ref(fn, args, kwargs):
    return getattr(reference, fn)(*[_plain(a) for a in args],
                                  **{k: _plain(v) for k, v in kwargs.items()})


@functools.lru_cache(maxsize=None)
def _ref_cached(name, n, dtype):
    fn, args, kw = _case(name, n, np.dtype(dtype))
    return _ref(fn, args, kw)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _tol(ref, dtype):
    ref = np.asarray(ref, np.float64)
    finite = np.abs(ref[np.isfinite(ref)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    return (1e-10, 1e-10 * scale) if dtype == F64 else (1e-4, 1e-4 * scale)


def assert_matches(out, ref, dtype, fn=""):
    out, ref = _as_tuple(out), _as_tuple(ref)
    assert len(out) == len(ref), fn
    for i, (o, r) in enumerate(zip(out, ref)):
        o_arr = np.asarray(o)
        if np.asarray(r).dtype.kind in "iu":          # max-pool indices
            assert o_arr.dtype == np.int64, (fn, i, o_arr.dtype)
            np.testing.assert_array_equal(o_arr, r, err_msg=f"{fn} output {i}")
            continue
        assert o_arr.dtype == dtype, f"{fn} output {i}: dtype {o_arr.dtype}, expected {dtype}"
        assert o_arr.shape == np.shape(r), f"{fn} output {i}: shape {o_arr.shape} vs " \
                                           f"{np.shape(r)}"
        rtol, atol = _tol(r, dtype)
        np.testing.assert_allclose(o_arr.astype(np.float64), np.asarray(r, np.float64),
                                   rtol=rtol, atol=atol, equal_nan=True,
                                   err_msg=f"{fn} output {i}")


class Snapshot:
    """Bitwise copies of every operand (and of the buffers views live in)."""

    def __init__(self, operands):
        self.items = []
        for op in operands:
            if isinstance(op, np.ndarray):
                self.items.append((op, op.copy(), op.tobytes(), op.flags.writeable))
            elif isinstance(op, list):
                self.items.append((op, copy.deepcopy(op), None, None))

    def check(self):
        for obj, saved, raw, writeable in self.items:
            if isinstance(obj, np.ndarray):
                assert np.array_equal(obj, saved, equal_nan=True), "an input was modified"
                assert obj.tobytes() == raw, "an input was modified (bitwise)"
                assert obj.flags.writeable == writeable
            else:
                assert obj == saved, "a list input was modified"

    def arrays(self):
        return [obj for obj, *_ in self.items if isinstance(obj, np.ndarray)]


def run_checked(fn, args, kwargs, buffers=()):
    """Call fastconv.<fn>; check inputs are untouched and outputs are fresh arrays."""
    operands = list(args) + list(kwargs.values())
    snap = Snapshot(operands + list(buffers))
    out = getattr(fastconv, fn)(*args, **kwargs)
    snap.check()
    for o in _as_tuple(out):
        if isinstance(o, np.ndarray):
            assert o.flags.writeable and o.flags.c_contiguous
            for a in snap.arrays():
                assert not np.shares_memory(o, a), f"{fn}: an output shares memory with an input"
    return out


def _apply_layout(layout, obj, buffers):
    if not isinstance(obj, A):
        return obj
    if layout == "list":
        return obj.value.tolist()
    if layout == "int":
        return _int_values(obj).value
    view, buf = LAYOUTS[layout](obj.value)
    buffers.append(buf)
    return view


ALL_LAYOUT_PARAMS = [(name, layout, dt) for name in CASES for layout in LAYOUTS
                     for dt in ("float64", "float32")
                     if not (dt == "float32" and layout in ("int", "list"))]


@pytest.fixture
def one_thread():
    """Run single-threaded (the layouts are handled before any kernel; the contiguous runs
    and the other tests keep the default thread count, so the parallel paths are covered)."""
    before = fastconv.get_num_threads()
    fastconv.set_num_threads(1)
    yield
    fastconv.set_num_threads(before)


@pytest.mark.parametrize("name, layout, dtype", ALL_LAYOUT_PARAMS,
                         ids=[f"{a}-{b}-{c}" for a, b, c in ALL_LAYOUT_PARAMS])
def test_layouts_match_reference(name, layout, dtype, request):
    if layout != "contiguous":
        request.getfixturevalue("one_thread")
    dtype = np.dtype(dtype)
    fn, args, kw = _case(name, N, dtype)
    buffers = []
    targs = [_apply_layout(layout, a, buffers) for a in args]
    tkw = {k: _apply_layout(layout, v, buffers) for k, v in kw.items()}
    out = run_checked(fn, targs, tkw, buffers)
    if layout in VALUE_CHANGING:
        ref = _ref(fn, [np.array(a) if isinstance(a, np.ndarray) else a for a in targs],
                   {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in tkw.items()})
    else:
        ref = _ref_cached(name, N, dtype.str)
    expected = F64 if layout in ("int", "list") else dtype
    assert_matches(out, ref, expected, fn)


def test_every_public_function_is_in_the_table():
    public = set(fastconv.__all__) - {"set_num_threads", "get_num_threads", "show_config"}
    assert {name.split("-")[0] for name in CASES} == public


# --------------------------------------------------------------------------------------------
# integer operands mixed with float32 ones compute in float32
# --------------------------------------------------------------------------------------------

def test_int_with_float32_operands_gives_float32():
    r = _rng(99)
    x = r.integers(-3, 4, (2, 3, 5, 5))
    w = r.standard_normal((4, 3, 3, 3)).astype(F32)
    out = run_checked("conv2d", [x, w], {})
    assert_matches(out, reference.conv2d(x, w), F32)
    gx, gw, gb = run_checked("conv2d_backward", [np.ones((2, 4, 3, 3), F32), x, w], {})
    assert gx.dtype == gw.dtype == gb.dtype == F32
    logits = r.integers(-3, 4, (4, 5))
    probs = np.full((4, 5), 0.2, F32)
    assert np.asarray(run_checked("cross_entropy", [logits, probs], {})).dtype == F32
    assert run_checked("cross_entropy_backward", [logits, probs], {}).dtype == F32
    labels = np.array([0, 1, 2, 3])
    out = run_checked("cross_entropy", [logits, labels], dict(weight=np.ones(5, F32)))
    assert np.asarray(out).dtype == F32


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.uint32,
                                   np.int64, np.uint64, "list"])
def test_label_dtypes(dtype):
    r = _rng(98)
    logits = r.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 2, 3])
    t = labels.tolist() if dtype == "list" else labels.astype(dtype)
    for fn in ("cross_entropy", "cross_entropy_backward"):
        for red in ("mean", "none"):
            out = run_checked(fn, [logits, t], dict(reduction=red, label_smoothing=0.1))
            assert_matches(out, getattr(reference, fn)(logits, labels, reduction=red,
                                                       label_smoothing=0.1), F64, fn)


# --------------------------------------------------------------------------------------------
# empty batch
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_empty_batch(name, dtype):
    dtype = np.dtype(dtype)
    fn, args, kw = _case(name, 0, dtype)
    out = run_checked(fn, [_plain(a) for a in args], {k: _plain(v) for k, v in kw.items()})
    ref = _ref(fn, args, kw)
    outs, refs = _as_tuple(out), _as_tuple(ref)
    for o, r in zip(outs, refs):
        assert np.shape(o) == np.shape(r), (fn, np.shape(o), np.shape(r))
    if fn in ("conv2d_backward", "conv_transpose2d_backward"):
        gx, gw, gb = out
        w = _plain(args[2])
        assert gx.shape == _plain(args[1]).shape and gx.dtype == dtype
        assert gw.shape == w.shape and gw.dtype == dtype and not gw.any()
        L = w.shape[0] if fn == "conv2d_backward" else w.shape[1] * kw.get("groups", 1)
        assert gb.shape == (L,) and gb.dtype == dtype and not gb.any()
    elif fn == "cross_entropy":
        red = kw.get("reduction", "mean")
        o = np.asarray(out)
        assert o.dtype == dtype
        if red == "mean":
            assert o.shape == () and np.isnan(o)
        elif red == "sum":
            assert o.shape == () and o == 0
        else:
            assert o.shape == (0,)
    assert_matches(out, ref, dtype, fn)


# --------------------------------------------------------------------------------------------
# NaN and +-inf
# --------------------------------------------------------------------------------------------

def _poison(a, rng, frac=0.15):
    """Copy of a with NaN, +inf and -inf at random places."""
    a = a.copy()
    flat = a.reshape(-1)
    k = max(3, int(frac * flat.size))
    pos = rng.choice(flat.size, k, replace=False)
    flat[pos] = rng.choice([np.nan, np.inf, -np.inf], k)
    return a


# where non-finite values may go so that every product with them is also in the reference
# (a zero from padding times inf is NaN in an im2col kernel but skipped by the reference)
NONFINITE_OPERAND = {
    "conv2d": 0, "conv2d_backward": 1, "conv_transpose2d": 0, "conv_transpose2d_backward": 0,
    "max_pool2d": 0, "max_pool2d_backward": 1, "avg_pool2d": 0, "avg_pool2d_backward": 0,
    "upsample_nearest2d": 0, "upsample_nearest2d_backward": 0,
}
NONFINITE_CASES = [name for name in CASES if name.split("-")[0] in NONFINITE_OPERAND]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # reference
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NONFINITE_CASES)
def test_nonfinite_values_match_reference(name, dtype, request):
    if dtype == "float32":
        request.getfixturevalue("one_thread")
    dtype = np.dtype(dtype)
    fn, args, kw = _case(name, N, dtype)
    i = NONFINITE_OPERAND[fn]
    args = list(args)
    args[i] = A(_poison(args[i].value, _rng(7)), "f")
    out = run_checked(fn, [_plain(a) for a in args], {k: _plain(v) for k, v in kw.items()})
    assert_matches(out, _ref(fn, args, kw), dtype, fn)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_max_pool_nan_inf_and_ties(dtype):
    r = _rng(5)
    x = r.integers(0, 3, (2, 3, 7, 8)).astype(dtype)      # many ties
    x[0, 0] = -np.inf                                       # a plane of -inf
    x[0, 1, 2:5, 2:5] = np.nan                              # NaN blocks: the last NaN wins
    x[0, 1, 0, 0] = np.inf
    x[1, 2, ::3, ::2] = np.nan
    x[1, 0, 1::2] = -np.inf
    for params in (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                   dict(kernel_size=(2, 3), stride=1, dilation=(2, 1)),
                   dict(kernel_size=2)):
        out = run_checked("max_pool2d", [x], dict(params, return_indices=True))
        ref = reference.max_pool2d(x, **params, return_indices=True)
        assert_matches(out, ref, np.dtype(dtype), "max_pool2d")
        go = r.standard_normal(ref[0].shape).astype(dtype)
        out = run_checked("max_pool2d_backward", [go, x], params)
        assert_matches(out, reference.max_pool2d_backward(go, x, **params), np.dtype(dtype),
                       "max_pool2d_backward")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("fn", ["cross_entropy", "cross_entropy_backward"])
@pytest.mark.parametrize("target", ["labels", "probs"])
def test_cross_entropy_nan_logits(fn, target, dtype):
    r = _rng(6)
    logits = r.standard_normal((4, 5)).astype(dtype)
    logits[1, 2] = np.nan
    t = np.array([0, 3, 2, 4]) if target == "labels" else np.full((4, 5), 0.2, dtype)
    for red in ("mean", "sum", "none"):
        out = run_checked(fn, [logits, t], dict(reduction=red))
        assert_matches(out, getattr(reference, fn)(logits, t, reduction=red), np.dtype(dtype),
                       fn)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_cross_entropy_extreme_logits(dtype, smoothing):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4],
                       [-1e4, 0.0, 1e4]], dtype)
    w = np.array([1.0, 2.0, 0.5], dtype)
    for t in (np.array([0, 1, 1, 0]), np.array([[1, 0, 0], [0, 1, 0], [.5, .5, 0], [0, .2, .8]],
                                                dtype)):
        for red in ("mean", "sum", "none"):
            kw = dict(weight=w, reduction=red, label_smoothing=smoothing)
            loss = run_checked("cross_entropy", [logits, t], kw)
            grad = run_checked("cross_entropy_backward", [logits, t], kw)
            assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
            assert_matches(loss, reference.cross_entropy(logits, t, **kw), np.dtype(dtype))
            assert_matches(grad, reference.cross_entropy_backward(logits, t, **kw),
                           np.dtype(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_minus_inf_logit_in_other_class(dtype, red, weighted):
    """A -inf logit in a non-target class is a zero probability: the loss and its gradient
    are finite (label_smoothing=0), and equal those with that class left out."""
    logits = np.array([[2.0, -np.inf, 0.5, -1.0], [-np.inf, 1.0, -np.inf, 3.0],
                       [0.0, 0.0, -np.inf, 0.0]], dtype)
    labels = np.array([0, 3, 1])
    w = np.array([1.0, 2.0, 0.5, 1.5], dtype) if weighted else None
    kw = dict(weight=w, reduction=red)
    loss = np.asarray(run_checked("cross_entropy", [logits, labels], kw))
    grad = run_checked("cross_entropy_backward", [logits, labels], kw)
    assert np.all(np.isfinite(loss)), loss
    assert np.all(np.isfinite(grad)), grad
    # per-row expected values without the -inf classes
    exp_loss, exp_grad = [], np.zeros((3, 4))
    for n in range(3):
        keep = np.isfinite(logits[n])
        sub = logits[n, keep].astype(np.float64)
        y = int(np.flatnonzero(keep).tolist().index(labels[n]))
        lse = sub.max() + math.log(np.exp(sub - sub.max()).sum())
        wy = 1.0 if w is None else float(w[labels[n]])
        exp_loss.append(wy * (lse - sub[y]))
        p = np.exp(sub - lse)
        g = wy * p
        g[y] -= wy
        exp_grad[n, keep] = g
    wsum = 3.0 if w is None else float(sum(w[labels]))
    if red == "none":
        ref_loss, ref_grad = np.array(exp_loss), exp_grad
    elif red == "sum":
        ref_loss, ref_grad = sum(exp_loss), exp_grad
    else:
        ref_loss, ref_grad = sum(exp_loss) / wsum, exp_grad / wsum
    assert_matches(loss, ref_loss, np.dtype(dtype))
    assert_matches(grad, ref_grad, np.dtype(dtype))
    assert np.all(grad[~np.isfinite(logits)] == 0)


@pytest.mark.parametrize("fn", ["cross_entropy", "cross_entropy_backward"])
def test_cross_entropy_all_labels_ignored(fn):
    logits = _rng(8).standard_normal((3, 4))
    labels = np.array([-100, -100, -100])
    for red in ("mean", "sum", "none"):
        out = run_checked(fn, [logits, labels], dict(reduction=red))
        ref = getattr(reference, fn)(logits, labels, reduction=red)
        assert_matches(out, ref, F64, fn)
    if fn == "cross_entropy":
        assert np.isnan(fastconv.cross_entropy(logits, labels))
    else:
        assert not fastconv.cross_entropy_backward(logits, labels).any()


# --------------------------------------------------------------------------------------------
# output_mask
# --------------------------------------------------------------------------------------------

MASKS = [(a, b, c) for a in (False, True) for b in (False, True) for c in (False, True)]


@pytest.mark.parametrize("n", [N, 1, 0])
@pytest.mark.parametrize("mask", MASKS, ids=["".join("xwb"[i] if m else "-"
                                                     for i, m in enumerate(mk))
                                             for mk in MASKS])
@pytest.mark.parametrize("name", ["conv2d_backward-groups", "conv2d_backward-1x1",
                                  "conv_transpose2d_backward-groups",
                                  "conv_transpose2d_backward-1x1"])
def test_output_mask(name, mask, n, request):
    if n != N:
        request.getfixturevalue("one_thread")
    fn, args, kw = _case(name, n, F64)
    args = [_plain(a) for a in args]
    full = getattr(fastconv, fn)(*args, **kw)
    out = run_checked(fn, args, dict(kw, output_mask=mask))
    assert isinstance(out, tuple) and len(out) == 3
    for need, got, want in zip(mask, out, full):
        if need:
            assert got is not None and got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        else:
            assert got is None
    ref = _ref(fn, args, kw)
    for need, got, want in zip(mask, out, ref):
        if need:
            assert_matches(got, want, F64, fn)


# --------------------------------------------------------------------------------------------
# numpy scalars and arrays as parameters; huge but legal pooling windows
# --------------------------------------------------------------------------------------------

def test_numpy_integers_as_parameters():
    r = _rng(9)
    x, w = r.standard_normal((2, 4, 6, 7)), r.standard_normal((6, 2, 3, 2))
    got = run_checked("conv2d", [x, w], dict(stride=(np.int64(2), 1), padding=np.int32(1),
                                             dilation=np.array([1, 2]), groups=np.uint8(2)))
    assert_matches(got, reference.conv2d(x, w, stride=(2, 1), padding=1, dilation=(1, 2),
                                         groups=2), F64)
    got = run_checked("max_pool2d", [x], dict(kernel_size=np.int16(3), stride=[2, np.int64(1)],
                                              padding=np.uint32(1), ceil_mode=np.bool_(True)))
    assert_matches(got, reference.max_pool2d(x, 3, stride=(2, 1), padding=1, ceil_mode=True),
                   F64)
    got = run_checked("avg_pool2d", [x], dict(kernel_size=(2, 3), divisor_override=np.int8(5),
                                              count_include_pad=np.bool_(False)))
    assert_matches(got, reference.avg_pool2d(x, (2, 3), divisor_override=5), F64)
    got = run_checked("upsample_nearest2d", [x], dict(scale_factor=(2.0, np.int64(3))))
    assert_matches(got, reference.upsample_nearest2d(x, (2, 3)), F64)
    logits, t = r.standard_normal((4, 3)), np.array([0, 2, 1, 0])
    got = run_checked("cross_entropy", [logits, t], dict(label_smoothing=np.float32(0.25),
                                                         ignore_index=np.int64(2)))
    assert_matches(got, reference.cross_entropy(logits, t, label_smoothing=0.25,
                                                ignore_index=2), F64)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_huge_legal_avg_pooling_window(dtype):
    """kernel 2**31 - 1 with padding 2**30 - 1 covers the whole image: one output pixel."""
    x = _rng(10).standard_normal((2, 3, 4, 5)).astype(dtype)
    K, P = 2**31 - 1, 2**30 - 1
    for cip in (True, False):
        kw = dict(kernel_size=K, padding=P, count_include_pad=cip)
        assert_matches(run_checked("avg_pool2d", [x], kw), reference.avg_pool2d(x, **kw),
                       np.dtype(dtype))
        go = np.ones((2, 3, 1, 1), dtype)
        assert_matches(run_checked("avg_pool2d_backward", [go, x], kw),
                       reference.avg_pool2d_backward(go, x, **kw), np.dtype(dtype))


def test_huge_legal_max_pooling_window():
    """The same window for max pooling gives the global maximum and its index, and takes no
    longer than a small window: the first in-image row/column of a window is found by
    arithmetic, not by stepping through 2**30 padding positions."""
    x = _rng(11).standard_normal((1, 1, 4, 5))
    K, P = 2**31 - 1, 2**30 - 1
    t0 = time.perf_counter()
    y, idx = run_checked("max_pool2d", [x], dict(kernel_size=K, padding=P,
                                                 return_indices=True))
    g = run_checked("max_pool2d_backward", [np.ones((1, 1, 1, 1)), x],
                    dict(kernel_size=K, padding=P))
    elapsed = time.perf_counter() - t0
    assert y.shape == idx.shape == (1, 1, 1, 1) and y.dtype == F64 and idx.dtype == np.int64
    assert y[0, 0, 0, 0] == x.max() and idx[0, 0, 0, 0] == x.argmax()
    expected = np.zeros_like(x)
    expected.reshape(-1)[x.argmax()] = 1
    np.testing.assert_array_equal(g, expected)
    assert elapsed < 0.25, f"two 1-pixel max-pool calls took {elapsed:.2f} s"


_GUARD_SCRIPT = r'''
import ctypes, mmap, sys
import numpy as np
import fastconv as fc
from fastconv import _kernels

libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []


def at_end(a):
    """A copy of a whose last byte is the last before a page that cannot be read."""
    ps = mmap.PAGESIZE
    pages = (a.nbytes + ps - 1) // ps + 1
    m = mmap.mmap(-1, pages * ps)
    buf = (ctypes.c_char * (pages * ps)).from_buffer(m)
    assert libc.mprotect(ctypes.addressof(buf) + (pages - 1) * ps, ps, 0) == 0
    out = np.frombuffer(m, a.dtype, a.size, (pages - 1) * ps - a.nbytes).reshape(a.shape)
    out[...] = a
    keep.append((m, buf))
    return out


rng = np.random.default_rng(0)
calls = 0
for level in [lv for lv in ("avx512", "avx2", "blas") if _kernels.set_gemm(lv) == lv]:
    for threads in (1, 2):
        fc.set_num_threads(threads)
        for dt in (np.float32, np.float64):
            for n, c, h, w in [(1, 1, 2, 2), (1, 1, 4, 2), (2, 3, 4, 6), (1, 2, 7, 5),
                               (1, 1, 6, 14), (2, 1, 9, 9), (1, 3, 14, 14), (1, 1, 1, 17),
                               (1, 2, 16, 16), (1, 1, 3, 31)]:
                x0 = rng.uniform(-1, 1, (n, c, h, w)).astype(dt)
                x = at_end(x0)
                runs = [
                    lambda a, g: fc.max_pool2d(a, 2) if h > 1 and w > 1 else None,
                    lambda a, g: fc.max_pool2d(a, 3, 2, 1) if h > 1 and w > 1 else None,
                    lambda a, g: fc.max_pool2d(a, 2, ceil_mode=True),
                    lambda a, g: fc.avg_pool2d(a, 2) if h > 1 and w > 1 else None,
                    lambda a, g: fc.avg_pool2d(a, 3, 2, 1),
                    lambda a, g: fc.upsample_nearest2d(a, 2),
                    lambda a, g: fc.conv2d(a, g[0], g[1], padding=1),
                    lambda a, g: fc.conv2d(a, g[2]),
                    lambda a, g: fc.conv2d_backward(at_end(fc.conv2d(a, g[0], padding=1)), a,
                                                    g[0], padding=1),
                    lambda a, g: fc.conv_transpose2d(a, g[3], stride=2),
                ]
                wts = (rng.uniform(-1, 1, (4, c, 3, 3)).astype(dt),
                       rng.uniform(-1, 1, 4).astype(dt), rng.uniform(-1, 1, (5, c, 1, 1)).astype(dt),
                       rng.uniform(-1, 1, (c, 3, 4, 4)).astype(dt))
                for run in runs:
                    want, got = run(x0, wts), run(x, wts)
                    if want is None:
                        continue
                    for p, q in zip(want if isinstance(want, tuple) else (want,),
                                    got if isinstance(got, tuple) else (got,)):
                        np.testing.assert_array_equal(p, q)
                    calls += 1
                for k, s, p in ((2, 2, 0), (3, 2, 1)):
                    if h > 1 and w > 1:
                        y = fc.max_pool2d(x0, k, s, p)
                        g = at_end(rng.uniform(-1, 1, y.shape).astype(dt))
                        np.testing.assert_array_equal(
                            fc.max_pool2d_backward(g, x, k, s, p),
                            fc.max_pool2d_backward(np.array(g), x0, k, s, p))
                        np.testing.assert_array_equal(
                            fc.avg_pool2d_backward(g, x, k, s, p),
                            fc.avg_pool2d_backward(np.array(g), x0, k, s, p))
                g = at_end(rng.uniform(-1, 1, (n, c, 2 * h, 2 * w)).astype(dt))
                np.testing.assert_array_equal(fc.upsample_nearest2d_backward(g, 2),
                                              fc.upsample_nearest2d_backward(np.array(g), 2))
                z = at_end(rng.uniform(-3, 3, (n * h, w)).astype(dt))
                t = rng.integers(0, w, n * h)
                np.testing.assert_array_equal(fc.cross_entropy_backward(z, t),
                                              fc.cross_entropy_backward(np.array(z), t))
                keep.clear()
print("ok", calls)
'''


def test_kernels_read_nothing_past_their_inputs(tmp_path):
    """Inputs whose last byte is followed by a page that cannot be read (mprotect, in a
    subprocess, where a read past an input's end kills the process): pooling, upsampling,
    convolutions and cross-entropy, forward and backward, at every GEMM level, 1 and 2
    threads, narrow planes (a 2x2 max-pool of 2-wide rows read 14 values past the end) give
    what the same inputs give in ordinary arrays."""
    import subprocess
    import sys
    if sys.platform != "linux":
        pytest.skip("mprotect guard pages: Linux only")
    script = tmp_path / "guard.py"
    script.write_text(_GUARD_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stdout, r.stderr[-3000:])
