"""``out=`` of the forward functions: the result written into the caller's array, as NumPy's
ufuncs do.

Every forward case of ``test_hard_inputs.CASES`` (conv2d: groups, 'same', 1x1, depthwise, big
padding; conv_transpose2d; max pooling with and without indices; average pooling; upsampling;
cross-entropy with labels and probabilities, each reduction), in float32 and float64, on one
thread and on all threads:

- ``f(..., out=o)`` returns ``o`` itself, and ``o`` then holds bitwise what ``f(...)`` returns
  (which test_hard_inputs and test_properties check against the reference), whatever ``o`` held
  before (NaN, inf, random bits); the inputs are untouched;
- ``o`` overlapping an operand (same start, shifted into it, just before it, just after it)
  still gets that answer, and the operand's memory is unchanged wherever it is not ``o``;
- an empty batch works;
- and, with hypothesis drawing the convolution geometry, out anywhere relative to x.

The bad ``out`` arguments are rows of the table in test_validation.py, which also checks that
they are rejected before any kernel runs; here, that a rejected ``out`` is left as it was.  Last,
a loop of calls with ``out`` allocates no result arrays.
"""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv
import test_hard_inputs as hard      # its table of legal, awkward calls (tests/ is on sys.path)
import test_properties as props      # its hypothesis strategies for the convolution geometry

FORWARD = [name for name in hard.CASES if not name.split("-")[0].endswith("_backward")]
DTYPES = ["float64", "float32"]


@pytest.fixture(params=["1 thread", "all threads"])
def threads(request):
    """One thread, or every thread even for these small calls (the parallel paths)."""
    before = fastconv.get_num_threads()
    if request.param == "1 thread":
        fastconv.set_num_threads(1)
    else:
        request.getfixturevalue("tiny_grain")
    yield
    fastconv.set_num_threads(before)


def _fresh(v):
    v = hard._plain(v)
    return v.copy() if isinstance(v, np.ndarray) else v     # never touch the cached case


def _call(name, n, dtype):
    """(function, args, kwargs) of a forward case, with arrays of its own."""
    fn, args, kw = hard._case(name, n, np.dtype(dtype))
    return (getattr(fastconv, fn), [_fresh(a) for a in args],
            {k: _fresh(v) for k, v in kw.items()})


def _arrays(result):
    """The result as a tuple of arrays (a NumPy scalar of a reduction as a 0-d array)."""
    return tuple(np.asarray(r) for r in (result if isinstance(result, tuple) else (result,)))


def _junk(shape, dtype, fill, seed=0):
    """A new C-contiguous array full of ``fill``: 'nan', 'inf' or random 'bits'."""
    a = np.empty(shape, dtype)
    if fill == "bits":
        raw = a.reshape(-1).view(np.uint8)
        raw[...] = np.random.default_rng(seed).integers(0, 256, raw.size, dtype=np.uint8)
    elif a.dtype.kind == "f":
        a.fill(np.nan if fill == "nan" else np.inf)
    else:
        a.fill(-7 if fill == "nan" else 2**62)
    return a


def _pack(outs):
    return tuple(outs) if len(outs) > 1 else outs[0]


def _assert_is_out(result, outs):
    if len(outs) > 1:
        assert isinstance(result, tuple) and len(result) == len(outs)
        assert all(r is o for r, o in zip(result, outs)), "the result is not out"
    else:
        assert result is outs[0], "the result is not out"


def _assert_same_bits(outs, want):
    for o, w in zip(outs, want):
        assert o.dtype == w.dtype and o.shape == w.shape
        assert o.tobytes() == w.tobytes(), f"out holds {o!r}, expected {w!r}"


# --------------------------------------------------------------------------------------------
# out=: the same bits, out itself returned, whatever out held
# --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("fill", ["nan", "inf", "bits"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORWARD)
def test_out_gives_the_same_result(name, dtype, fill):
    fn, args, kw = _call(name, hard.N, dtype)
    want = _arrays(fn(*args, **kw))
    outs = [_junk(w.shape, w.dtype, fill, seed=k) for k, w in enumerate(want)]
    snap = hard.Snapshot(args + list(kw.values()))
    result = fn(*args, **kw, out=_pack(outs))
    snap.check()
    _assert_is_out(result, outs)
    _assert_same_bits(outs, want)
    # and again into the same arrays (a serving loop)
    _assert_is_out(fn(*args, **kw, out=_pack(outs)), outs)
    _assert_same_bits(outs, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORWARD)
def test_out_with_an_empty_batch(name, dtype):
    fn, args, kw = _call(name, 0, dtype)
    want = _arrays(fn(*args, **kw))
    outs = [_junk(w.shape, w.dtype, "bits", seed=k) for k, w in enumerate(want)]
    _assert_is_out(fn(*args, **kw, out=_pack(outs)), outs)
    _assert_same_bits(outs, want)       # 'mean' of nothing is NaN, 'sum' 0, the others empty


def test_max_pool2d_out_tuple_may_hold_none():
    """As for a ufunc with two outputs, a None in out's tuple is allocated."""
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6))
    want_v, want_i = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True)
    v = np.empty_like(want_v)
    r = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True, out=(v, None))
    assert r[0] is v and r[1].dtype == np.int64
    _assert_same_bits([v, r[1]], [want_v, want_i])
    i = np.empty_like(want_i)
    r = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True, out=(None, i))
    assert r[1] is i
    _assert_same_bits([r[0], i], [want_v, want_i])


def test_cross_entropy_out_is_a_0d_array_for_reductions():
    logits, labels = np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([0, 0])
    for reduction in ("mean", "sum"):
        o = np.empty(())
        r = fastconv.cross_entropy(logits, labels, reduction=reduction, out=o)
        assert r is o and o.shape == ()
        assert o[()] == fastconv.cross_entropy(logits, labels, reduction=reduction)


# --------------------------------------------------------------------------------------------
# out overlapping an operand
# --------------------------------------------------------------------------------------------

def _operands(args, kw):
    """Where the array operands are: positional indices and keyword names."""
    return [i for i, a in enumerate(args) if isinstance(a, np.ndarray)] + \
        [k for k, v in kw.items() if isinstance(v, np.ndarray)]


OVERLAP_PARAMS = []
for _name in FORWARD:
    _fn, _args, _kw = _call(_name, hard.N, "float64")
    _n_out = len(_arrays(_fn(*_args, **_kw)))
    for _where in _operands(_args, _kw):
        for _k in range(_n_out):
            OVERLAP_PARAMS.append((_name, _where, _k))


@pytest.mark.parametrize("placement", ["same start", "inside", "just before", "just after"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, where, k", OVERLAP_PARAMS,
                         ids=[f"{n}-{w}-out{k}" for n, w, k in OVERLAP_PARAMS])
def test_out_overlapping_an_operand(name, where, k, dtype, placement):
    """out[k] (out itself when there is one result) and the operand ``where`` are views of
    one buffer: the answer is still the one computed from the operand's values before the call,
    and nothing but out[k] changes (the operand does where out[k] covers it: the caller's
    choice, as with ``np.add(a, 1, out=a)``)."""
    fn, args, kw = _call(name, hard.N, dtype)
    op = args[where] if isinstance(where, int) else kw[where]
    want = _arrays(fn(*args, **kw))
    outs = [_junk(w.shape, w.dtype, "bits", seed=j) for j, w in enumerate(want)]
    o_nbytes, a_nbytes = want[k].nbytes, op.nbytes
    a_at, o_at = {"same start": (0, 0),
                  "inside": (0, a_nbytes // 2),
                  "just before": (o_nbytes // 2, 0),
                  "just after": (0, a_nbytes)}[placement]
    o_at -= o_at % 8                                     # keep both views aligned
    a_at -= a_at % 8
    buf = _junk(max(a_at + a_nbytes, o_at + o_nbytes) + 8, np.uint8, "bits", seed=9)
    a = buf[a_at:a_at + a_nbytes].view(op.dtype).reshape(op.shape)
    a[...] = op
    if isinstance(where, int):
        args[where] = a
    else:
        kw[where] = a
    outs[k] = buf[o_at:o_at + o_nbytes].view(want[k].dtype).reshape(want[k].shape)
    before = buf.copy()
    result = fn(*args, **kw, out=_pack(outs))
    _assert_is_out(result, outs)
    _assert_same_bits(outs, want)
    keep = np.ones(buf.size, bool)
    keep[o_at:o_at + o_nbytes] = False
    assert np.array_equal(buf[keep], before[keep]), "memory outside out was written"


@pytest.mark.usefixtures("tiny_grain")
@given(kind_case=st.booleans().flatmap(lambda t: st.tuples(st.just(t), props.conv_case(t))),
       data=st.data())
def test_conv_out_at_any_offset_from_x(kind_case, data):
    """Hypothesis draws the geometry (test_properties.conv_case) and where out starts relative
    to x in one buffer (before, inside or after it, overlapping or not): always the result
    without out, and nothing outside out written."""
    transposed, c = kind_case
    C, L = c["g"] * c["cin_g"], c["g"] * c["cout_g"]
    x = props.rand(data, (c["n"], C) + c["size"], c["dtype"])
    if transposed:
        fn = fastconv.conv_transpose2d
        w = props.rand(data, (C, c["cout_g"]) + c["k"], c["dtype"])
        kw = dict(stride=props.as_arg(c["s"]), padding=c["padding"], groups=c["g"],
                  output_padding=props.as_arg(c["op"]), dilation=props.as_arg(c["d"]))
    else:
        fn = fastconv.conv2d
        w = props.rand(data, (L, c["cin_g"]) + c["k"], c["dtype"])
        kw = dict(stride=props.as_arg(c["s"]), padding=c["padding"],
                  dilation=props.as_arg(c["d"]), groups=c["g"])
    b = props.rand(data, (w.shape[1] * c["g"] if transposed else L,), c["dtype"]) \
        if c["bias"] else None
    want = fn(x, w, b, **kw)
    shift = data.draw(st.integers(-want.size, x.size), label="out start - x start (elements)")
    x_at, o_at = max(0, -shift), max(0, shift)
    buf = np.full(max(x_at + x.size, o_at + want.size) + 1, np.nan, x.dtype)
    xv = buf[x_at:x_at + x.size].reshape(x.shape)
    xv[...] = x
    out = buf[o_at:o_at + want.size].reshape(want.shape)
    before = buf.copy()
    assert fn(xv, w, b, **kw, out=out) is out
    assert out.tobytes() == want.tobytes()
    keep = np.ones(buf.size, bool)
    keep[o_at:o_at + want.size] = False
    assert np.array_equal(buf[keep], before[keep], equal_nan=True)


SAME_SHAPE = {
    # forward calls whose result has the input's shape, so out can be x itself
    "conv2d 3x3 padding 1": (fastconv.conv2d, lambda r, dt: dict(
        weight=r.standard_normal((6, 6, 3, 3)).astype(dt),
        bias=r.standard_normal(6).astype(dt), padding=1)),
    "conv2d 'same' groups": (fastconv.conv2d, lambda r, dt: dict(
        weight=r.standard_normal((6, 3, 3, 2)).astype(dt), padding="same", groups=2)),
    "conv2d 1x1 (no im2col)": (fastconv.conv2d, lambda r, dt: dict(
        weight=r.standard_normal((6, 6, 1, 1)).astype(dt))),
    "conv2d depthwise": (fastconv.conv2d, lambda r, dt: dict(
        weight=r.standard_normal((6, 1, 3, 3)).astype(dt), padding=1, groups=6)),
    "conv_transpose2d 3x3 padding 1": (fastconv.conv_transpose2d, lambda r, dt: dict(
        weight=r.standard_normal((6, 6, 3, 3)).astype(dt),
        bias=r.standard_normal(6).astype(dt), padding=1)),
    "conv_transpose2d 1x1": (fastconv.conv_transpose2d, lambda r, dt: dict(
        weight=r.standard_normal((6, 3, 1, 1)).astype(dt), groups=2)),
    "max_pool2d 3x3 stride 1": (fastconv.max_pool2d, lambda r, dt: dict(
        kernel_size=3, stride=1, padding=1)),
    "avg_pool2d 3x3 stride 1": (fastconv.avg_pool2d, lambda r, dt: dict(
        kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    "upsample_nearest2d x1": (fastconv.upsample_nearest2d, lambda r, dt: dict(
        scale_factor=1)),
}


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SAME_SHAPE))
def test_out_is_x_itself(case, dtype):
    fn, make = SAME_SHAPE[case]
    r = np.random.default_rng(3)
    x = r.standard_normal((3, 6, 7, 5)).astype(dtype)
    kw = make(r, dtype)
    want = fn(x, **kw)
    assert want.shape == x.shape
    params = [v.copy() for v in kw.values() if isinstance(v, np.ndarray)]
    assert fn(x, **kw, out=x) is x
    assert x.tobytes() == want.tobytes()
    for p, v in zip(params, [v for v in kw.values() if isinstance(v, np.ndarray)]):
        assert p.tobytes() == v.tobytes(), "a weight or bias was modified"


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_values_into_x_and_indices_into_its_memory(dtype):
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 6)).astype(dtype)
    want_v, want_i = fastconv.max_pool2d(x, 3, 1, 1, return_indices=True)
    v, i = fastconv.max_pool2d(x, 3, 1, 1, return_indices=True, out=(x, np.empty_like(want_i)))
    assert v is x
    _assert_same_bits([v, i], [want_v, want_i])
    # indices written over x's own bytes (float64: the same itemsize as int64)
    if dtype == "float64":
        x = np.random.default_rng(4).standard_normal((2, 3, 6, 6))
        xi = x.view(np.int64)
        v, i = fastconv.max_pool2d(x, 3, 1, 1, return_indices=True, out=(None, xi))
        assert i is xi
        _assert_same_bits([v, i], [want_v, want_i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_out_over_its_operands(dtype):
    r = np.random.default_rng(5)
    logits = r.standard_normal((5, 5)).astype(dtype)          # N == C: a row is an (N,) out
    labels = np.array([0, 3, 1, 4, 3])
    w = r.uniform(0.5, 2, 5).astype(dtype)
    probs = r.dirichlet(np.ones(5), 5).astype(dtype)
    for target in (labels, probs):
        want = fastconv.cross_entropy(logits, target, weight=w, reduction="none")
        overs = ["logits row", "weight"] + (["target row"] if target is probs else [])
        for over in overs:
            lg, t, ww = logits.copy(), target.copy(), w.copy()
            o = {"logits row": lg[2], "weight": ww, "target row": t[2]}[over]
            assert fastconv.cross_entropy(lg, t, weight=ww, reduction="none", out=o) is o
            assert o.tobytes() == want.tobytes(), over
        want = np.asarray(fastconv.cross_entropy(logits, target, weight=w))
        lg = logits.copy()
        o = lg[1, 2, ...]                                      # a 0-d view into the logits
        assert fastconv.cross_entropy(lg, target, weight=w, out=o) is o
        assert o.tobytes() == want.tobytes()


# --------------------------------------------------------------------------------------------
# a rejected out is left as it was
# --------------------------------------------------------------------------------------------

def test_rejected_out_is_untouched():
    x, w = np.ones((2, 3, 5, 5)), np.ones((4, 3, 3, 3))
    for bad in (np.full((2, 4, 3, 3), 7.0, order="F"),           # not C-contiguous
                np.full((2, 4, 3, 3), 7.0, np.float32),           # wrong dtype
                np.full((2, 4, 3, 4), 7.0)):                      # wrong shape
        before = bad.copy()
        with pytest.raises((TypeError, ValueError), match="out"):
            fastconv.conv2d(x, w, out=bad)
        assert np.array_equal(bad, before)
    good = np.full((2, 4, 3, 3), 7.0)
    with pytest.raises(ValueError, match="stride"):                # another argument is bad
        fastconv.conv2d(x, w, stride=0, out=good)
    assert (good == 7.0).all()
    with pytest.raises(ValueError, match="share memory"):
        v = np.full((2, 3, 2, 2), 7.0)
        fastconv.max_pool2d(x[:, :3], 2, return_indices=True, out=(v, v.view(np.int64)))
    assert (v == 7.0).all()


# --------------------------------------------------------------------------------------------
# a serving loop with out allocates no result arrays
# --------------------------------------------------------------------------------------------

_R = np.random.default_rng(6)
LOOP_CALLS = {   # each result is 0.5 to 1 MiB
    "conv2d": (fastconv.conv2d, (_R.standard_normal((8, 16, 32, 32)).astype(np.float32),
                                 _R.standard_normal((32, 16, 3, 3)).astype(np.float32),
                                 _R.standard_normal(32).astype(np.float32)),
               dict(padding=1)),
    "conv2d-depthwise": (fastconv.conv2d, (_R.standard_normal((8, 32, 32, 32)),
                                           _R.standard_normal((32, 1, 3, 3))),
                         dict(padding=1, groups=32)),
    "conv_transpose2d": (fastconv.conv_transpose2d,
                         (_R.standard_normal((8, 16, 16, 16)).astype(np.float32),
                          _R.standard_normal((16, 16, 4, 4)).astype(np.float32)),
                         dict(stride=2, padding=1)),
    "max_pool2d": (fastconv.max_pool2d, (_R.standard_normal((8, 16, 64, 64)), 2), {}),
    "avg_pool2d": (fastconv.avg_pool2d, (_R.standard_normal((8, 16, 64, 64)), 2), {}),
    "upsample_nearest2d": (fastconv.upsample_nearest2d,
                           (_R.standard_normal((8, 16, 16, 16)), 2), {}),
    # probabilities: integer labels need an (N,) temporary of label weights, even for 'none'
    "cross_entropy": (fastconv.cross_entropy,
                      (_R.standard_normal((65536, 10)), _R.dirichlet(np.ones(10), 65536)),
                      dict(reduction="none")),
}


def _peak(f, repeat=3):
    tracemalloc.start()
    try:
        for _ in range(repeat):
            f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", list(LOOP_CALLS))
def test_a_loop_with_out_allocates_no_result(name):
    fn, args, kw = LOOP_CALLS[name]
    out = np.empty_like(fn(*args, **kw))        # also warms the cached im2col workspaces
    assert out.nbytes >= 2**19
    assert fn(*args, **kw, out=out) is out
    without = _peak(lambda: fn(*args, **kw))
    with_out = _peak(lambda: fn(*args, **kw, out=out))
    assert without >= out.nbytes               # tracemalloc does see NumPy's allocations
    assert with_out < out.nbytes // 16, f"{name}: {with_out} bytes allocated with out"
