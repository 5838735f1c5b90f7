"""Every bad input raises the promised exception, naming the argument (and the shapes), before
any kernel runs.

The table ``CASES`` holds one row per bad call: (function name, positional args, keyword args,
exception type, fragments).  Each fragment is a literal that must appear in the message (the
argument's name, and for shape errors the offending shape as Python prints it); they are turned
into one ``match=`` regex of ``re.escape``d look-aheads.  While a row runs, the compiled kernels
are replaced by a stub that fails the test if any kernel is even looked up, so every error is
raised by the validation, before the work starts.
"""
import re
import time
import tracemalloc

import numpy as np
import pytest

import fastconv
import fastconv.functional

F64, F32 = np.float64, np.float32


def _z(*shape, dtype=F64):
    return np.zeros(shape, dtype)


def _rx(*fragments):
    """A regex matching a message that contains every fragment literally, in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments)


class _NoKernels:
    """Stands in for fastconv._kernels: any use of a kernel fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"kernel {name!r} was reached before validation failed")


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(fastconv.functional, "_kernels", _NoKernels())


# --------------------------------------------------------------------------------------------
# the operands every row starts from (all legal; each row breaks one thing)
# --------------------------------------------------------------------------------------------

X = _z(2, 3, 5, 5)            # conv2d input
W = _z(4, 3, 3, 3)            # conv2d weight -> output (2, 4, 3, 3)
B = _z(4)
GO = _z(2, 4, 3, 3)

XT = _z(2, 4, 3, 3)           # conv_transpose2d input
WT = _z(4, 3, 2, 2)           # (in, out/groups, kH, kW) -> output (2, 3, 4, 4)
BT = _z(3)
GOT = _z(2, 3, 4, 4)

XP = _z(2, 3, 6, 6)           # pooling input; kernel 2 -> output (2, 3, 3, 3)
GOP = _z(2, 3, 3, 3)

XU = _z(2, 3, 2, 3)           # upsampling input; scale 2 -> (2, 3, 4, 6)
GOU = _z(2, 3, 4, 6)

LG = _z(3, 4)                 # logits
TG = np.array([0, 1, 3])      # labels
PR = np.full((3, 4), 0.25)    # probabilities
CW = np.ones(4)               # class weights

LONGDOUBLE = np.dtype(np.longdouble)

CASES = []


def case(fn, args, kwargs, exc, *fragments):
    label = f"{fn}-{len(CASES)}-{exc.__name__}-" + ",".join(fragments)
    CASES.append(pytest.param(fn, args, kwargs, exc, fragments, id=label))


# non-real / non-array operands, for any array argument ---------------------------------------

def bad_arrays(name):
    """(value, fragments) of operands that are not real arrays: all TypeError."""
    return [
        (None, (name,)),
        (np.zeros((2, 3, 5, 5), np.complex128), (name, "complex")),
        (np.zeros((2, 3, 5, 5), object), (name, "object")),
        (np.full((2, 3, 5, 5), "a"), (name,)),
        ("abc", (name,)),
    ]


# parameters shared by conv2d and conv2d_backward ---------------------------------------------

CONV_PARAMS = [
    # (kwargs, exception, fragments)
    (dict(stride=0), ValueError, ("stride",)),
    (dict(stride=-1), ValueError, ("stride",)),
    (dict(stride=(1, 0)), ValueError, ("stride",)),
    (dict(stride=(1, 1, 1)), ValueError, ("stride",)),
    (dict(stride=1.5), TypeError, ("stride",)),
    (dict(stride=2.0), TypeError, ("stride",)),
    (dict(stride="2"), TypeError, ("stride",)),
    (dict(stride=True), TypeError, ("stride",)),
    (dict(stride=None), TypeError, ("stride",)),
    (dict(stride=(1, 2.0)), TypeError, ("stride",)),
    (dict(stride=2**62), ValueError, ("stride",)),
    (dict(stride=np.array(1.0)), TypeError, ("stride",)),
    (dict(dilation=0), ValueError, ("dilation",)),
    (dict(dilation=-2), ValueError, ("dilation",)),
    (dict(dilation=(1, 0)), ValueError, ("dilation",)),
    (dict(dilation=1.5), TypeError, ("dilation",)),
    (dict(dilation=np.float64(2.0)), TypeError, ("dilation",)),
    (dict(dilation=2**40), ValueError, ("dilation",)),
    (dict(dilation=2**62), ValueError, ("dilation",)),
    (dict(dilation=(1, 2**62)), ValueError, ("dilation",)),
    (dict(padding=-1), ValueError, ("padding",)),
    (dict(padding=(0, -1)), ValueError, ("padding",)),
    (dict(padding=(1, 1, 1)), ValueError, ("padding",)),
    (dict(padding=1.5), TypeError, ("padding",)),
    (dict(padding=None), TypeError, ("padding",)),
    (dict(padding=True), TypeError, ("padding",)),
    (dict(padding="full"), ValueError, ("padding", "'full'")),
    (dict(padding="SAME"), ValueError, ("padding", "'SAME'")),
    (dict(padding="same", stride=2), ValueError, ("padding", "same", "stride")),
    (dict(padding="same", stride=(1, 2)), ValueError, ("padding", "same", "stride")),
    (dict(padding=2**40), ValueError, ("padding",)),
    (dict(padding=2**62), ValueError, ("padding",)),
    (dict(padding=-2**62), ValueError, ("padding",)),
    (dict(padding=(0, 2**70)), ValueError, ("padding",)),
    (dict(groups=0), ValueError, ("groups",)),
    (dict(groups=-1), ValueError, ("groups",)),
    (dict(groups=2), ValueError, ("groups",)),          # 3 channels, 4 filters
    (dict(groups=3), ValueError, ("groups", "(4, 3, 3, 3)")),  # weight needs 1 channel/group
    (dict(groups=None), TypeError, ("groups",)),
    (dict(groups=1.0), TypeError, ("groups",)),
    (dict(groups="1"), TypeError, ("groups",)),
    (dict(groups=True), TypeError, ("groups",)),
    (dict(groups=2**40), ValueError, ("groups",)),
]

for kw, exc, frag in CONV_PARAMS:
    case("conv2d", (X, W), kw, exc, *frag)
    case("conv2d_backward", (GO, X, W), kw, exc, *frag)

# conv2d --------------------------------------------------------------------------------------

for fn, pre in (("conv2d", ()), ("conv2d_backward", (GO,))):
    # ranks and empty sizes
    case(fn, pre + (_z(3, 5, 5), W), {}, ValueError, "x", "(3, 5, 5)")
    case(fn, pre + (_z(1, 2, 3, 5, 5), W), {}, ValueError, "x", "(1, 2, 3, 5, 5)")
    case(fn, pre + (_z(2, 0, 5, 5), W), {}, ValueError, "x", "(2, 0, 5, 5)")
    case(fn, pre + (_z(2, 3, 0, 5), W), {}, ValueError, "x", "(2, 3, 0, 5)")
    case(fn, pre + (X, _z(4, 3, 3)), {}, ValueError, "weight", "(4, 3, 3)")
    case(fn, pre + (X, _z(4, 3, 0, 3)), {}, ValueError, "weight", "(4, 3, 0, 3)")
    case(fn, pre + (X, _z(0, 3, 3, 3)), {}, ValueError, "weight", "(0, 3, 3, 3)")
    # channel mismatch
    case(fn, pre + (X, _z(4, 2, 3, 3)), {}, ValueError, "weight", "(4, 2, 3, 3)", "(2, 3, 5, 5)")
    case(fn, pre + (_z(2, 4, 5, 5), W), {}, ValueError, "weight", "(4, 3, 3, 3)", "(2, 4, 5, 5)")
    case(fn, pre + (_z(2, 4, 5, 5), _z(3, 2, 3, 3)), dict(groups=2), ValueError, "groups",
         "(3, 2, 3, 3)")                              # 3 filters not divisible by 2 groups
    # output size below 1
    case(fn, pre + (_z(2, 3, 2, 5), W), {}, ValueError, "height")
    case(fn, pre + (_z(2, 3, 5, 2), W), {}, ValueError, "width")
    case(fn, pre + (X, W), dict(dilation=3), ValueError, "height")
    case(fn, pre + (X, W), dict(dilation=2**31 - 1), ValueError, "height")
    case(fn, pre + (X, _z(4, 3, 7, 1)), {}, ValueError, "height")
    # non-real dtypes and non-arrays
    for v, frag in bad_arrays("x"):
        case(fn, pre + (v, W), {}, TypeError, *frag)
    for v, frag in bad_arrays("weight"):
        case(fn, pre + (X, v), {}, TypeError, *frag)
    case(fn, pre + (X.astype(LONGDOUBLE), W.astype(LONGDOUBLE)), {}, TypeError, "x",
         str(LONGDOUBLE))
    # mixed float32 / float64
    case(fn, tuple(a.astype(F32) for a in pre) + (X.astype(F32), W), {}, TypeError, "weight",
         "float64", "float32")
    case(fn, pre + (X.astype(F32), W), {}, TypeError, "x", "float32", "float64")

case("conv2d", (X, W, _z(3)), {}, ValueError, "bias", "(3,)")
case("conv2d", (X, W, _z(4, 1)), {}, ValueError, "bias", "(4, 1)")
case("conv2d", (X, W, np.float64(0.0)), {}, ValueError, "bias", "()")
case("conv2d", (X, W, [0.0, 0.0]), {}, ValueError, "bias", "(2,)")
case("conv2d", (X, W, np.zeros(4, np.complex64)), {}, TypeError, "bias", "complex")
case("conv2d", (X, W, np.zeros(4, object)), {}, TypeError, "bias")
case("conv2d", (X.astype(F32), W.astype(F32), B), {}, TypeError, "bias", "float64")
case("conv2d", (X, W, B.astype(F32)), {}, TypeError, "bias", "float32")

GB = "conv2d_backward"
case(GB, (_z(2, 4, 2, 2), X, W), {}, ValueError, "grad_out", "(2, 4, 2, 2)", "(2, 4, 3, 3)")
case(GB, (_z(2, 5, 3, 3), X, W), {}, ValueError, "grad_out", "(2, 5, 3, 3)")
case(GB, (_z(1, 4, 3, 3), X, W), {}, ValueError, "grad_out", "(1, 4, 3, 3)")
case(GB, (_z(4, 3, 3), X, W), {}, ValueError, "grad_out", "(4, 3, 3)")
case(GB, (GO, X, W), dict(stride=2), ValueError, "grad_out", "(2, 4, 3, 3)", "(2, 4, 2, 2)")
for v, frag in bad_arrays("grad_out"):
    case(GB, (v, X, W), {}, TypeError, *frag)
case(GB, (GO.astype(F32), X, W), {}, TypeError, "grad_out", "float32")
case(GB, (GO, X, W), dict(output_mask=(True, True)), ValueError, "output_mask")
case(GB, (GO, X, W), dict(output_mask=None), TypeError, "output_mask")

# conv_transpose2d ----------------------------------------------------------------------------

CT_PARAMS = [
    (dict(stride=0), ValueError, ("stride",)),
    (dict(stride=(2, -1)), ValueError, ("stride",)),
    (dict(stride=1.5), TypeError, ("stride",)),
    (dict(stride="2"), TypeError, ("stride",)),
    (dict(stride=None), TypeError, ("stride",)),
    (dict(stride=2**62), ValueError, ("stride",)),
    (dict(dilation=0), ValueError, ("dilation",)),
    (dict(dilation=1.5), TypeError, ("dilation",)),
    (dict(dilation=2**40), ValueError, ("dilation",)),
    (dict(dilation=2**62), ValueError, ("dilation",)),
    (dict(padding=-1), ValueError, ("padding",)),
    (dict(padding=(0, -3)), ValueError, ("padding",)),
    (dict(padding="same"), ValueError, ("padding", "'same'")),
    (dict(padding="full"), ValueError, ("padding", "'full'")),
    (dict(padding=1.5), TypeError, ("padding",)),
    (dict(padding=2**40), ValueError, ("padding",)),
    (dict(padding=2**62), ValueError, ("padding",)),
    (dict(output_padding=1), ValueError, ("output_padding",)),           # stride 1, dilation 1
    (dict(output_padding=2, stride=2), ValueError, ("output_padding",)),
    (dict(output_padding=(0, 2), stride=(1, 2), dilation=(1, 2)), ValueError,
     ("output_padding",)),
    (dict(output_padding=(1, 0), stride=(1, 2)), ValueError, ("output_padding",)),
    (dict(output_padding=-1), ValueError, ("output_padding",)),
    (dict(output_padding=0.5), TypeError, ("output_padding",)),
    (dict(output_padding="1"), TypeError, ("output_padding",)),
    (dict(output_padding=2**62, stride=2), ValueError, ("output_padding",)),
    (dict(groups=0), ValueError, ("groups",)),
    (dict(groups=3), ValueError, ("groups",)),           # 4 input channels
    (dict(groups=None), TypeError, ("groups",)),
    (dict(groups=2.0), TypeError, ("groups",)),
    (dict(groups=False), TypeError, ("groups",)),
    (dict(padding=2), ValueError, ("height",)),           # (3-1) - 4 + 1 + 1 = 0
]

for kw, exc, frag in CT_PARAMS:
    case("conv_transpose2d", (XT, WT), kw, exc, *frag)
    case("conv_transpose2d_backward", (GOT, XT, WT), kw, exc, *frag)

for fn, pre in (("conv_transpose2d", ()), ("conv_transpose2d_backward", (GOT,))):
    case(fn, pre + (_z(4, 3, 3), WT), {}, ValueError, "x", "(4, 3, 3)")
    case(fn, pre + (_z(2, 0, 3, 3), WT), {}, ValueError, "x", "(2, 0, 3, 3)")
    case(fn, pre + (XT, _z(4, 3, 2)), {}, ValueError, "weight", "(4, 3, 2)")
    case(fn, pre + (XT, _z(4, 0, 2, 2)), {}, ValueError, "weight", "(4, 0, 2, 2)")
    case(fn, pre + (XT, _z(3, 3, 2, 2)), {}, ValueError, "weight", "(3, 3, 2, 2)",
         "(2, 4, 3, 3)")
    case(fn, pre + (_z(2, 5, 3, 3), WT), {}, ValueError, "weight", "(4, 3, 2, 2)",
         "(2, 5, 3, 3)")
    for v, frag in bad_arrays("x"):
        case(fn, pre + (v, WT), {}, TypeError, *frag)
    for v, frag in bad_arrays("weight"):
        case(fn, pre + (XT, v), {}, TypeError, *frag)
    case(fn, pre + (XT.astype(F32), WT), {}, TypeError, "x", "float32", "float64")
    case(fn, tuple(a.astype(F32) for a in pre) + (XT.astype(F32), WT), {}, TypeError,
         "weight", "float64")

CT = "conv_transpose2d"
case(CT, (XT, WT, _z(4)), {}, ValueError, "bias", "(4,)")   # bias is per output channel (3)
case(CT, (XT, WT, _z(3, 1)), {}, ValueError, "bias", "(3, 1)")
case(CT, (XT, WT, _z(3)), dict(groups=2), ValueError, "bias", "(3,)")  # 2 groups: 6 out
case(CT, (XT, WT, np.zeros(3, complex)), {}, TypeError, "bias", "complex")
case(CT, (XT.astype(F32), WT.astype(F32), BT), {}, TypeError, "bias", "float64")

CTB = "conv_transpose2d_backward"
case(CTB, (_z(2, 3, 3, 3), XT, WT), {}, ValueError, "grad_out", "(2, 3, 3, 3)", "(2, 3, 4, 4)")
case(CTB, (_z(2, 3, 4, 4), XT, WT), dict(stride=2), ValueError, "grad_out", "(2, 3, 4, 4)",
     "(2, 3, 6, 6)")
case(CTB, (_z(2, 4, 4, 4), XT, WT), {}, ValueError, "grad_out", "(2, 4, 4, 4)")
case(CTB, (_z(3, 4, 4), XT, WT), {}, ValueError, "grad_out", "(3, 4, 4)")
for v, frag in bad_arrays("grad_out"):
    case(CTB, (v, XT, WT), {}, TypeError, *frag)
case(CTB, (GOT.astype(F32), XT, WT), {}, TypeError, "grad_out", "float32")
case(CTB, (GOT, XT, WT), dict(output_mask=(True,)), ValueError, "output_mask")
case(CTB, (GOT, XT, WT), dict(output_mask=None), TypeError, "output_mask")

# pooling -------------------------------------------------------------------------------------

POOL_PARAMS = [
    # (kwargs beyond x, exception, fragments); kernel_size is given in kwargs
    (dict(kernel_size=0), ValueError, ("kernel_size",)),
    (dict(kernel_size=-1), ValueError, ("kernel_size",)),
    (dict(kernel_size=(2, 0)), ValueError, ("kernel_size",)),
    (dict(kernel_size=(2, 2, 2)), ValueError, ("kernel_size",)),
    (dict(kernel_size=()), ValueError, ("kernel_size",)),
    (dict(kernel_size=1.5), TypeError, ("kernel_size",)),
    (dict(kernel_size=2.0), TypeError, ("kernel_size",)),
    (dict(kernel_size="2"), TypeError, ("kernel_size",)),
    (dict(kernel_size=None), TypeError, ("kernel_size",)),
    (dict(kernel_size=True), TypeError, ("kernel_size",)),
    (dict(kernel_size=np.array(2.0)), TypeError, ("kernel_size",)),
    (dict(kernel_size=2**40), ValueError, ("kernel_size",)),
    (dict(kernel_size=2**62), ValueError, ("kernel_size",)),
    (dict(kernel_size=7), ValueError, ("height",)),                  # 6 x 6 input
    (dict(kernel_size=(2, 7)), ValueError, ("width",)),
    (dict(kernel_size=2, stride=0), ValueError, ("stride",)),
    (dict(kernel_size=2, stride=-2), ValueError, ("stride",)),
    (dict(kernel_size=2, stride=(2,)), ValueError, ("stride",)),
    (dict(kernel_size=2, stride=1.5), TypeError, ("stride",)),
    (dict(kernel_size=2, stride="1"), TypeError, ("stride",)),
    (dict(kernel_size=2, stride=2**62), ValueError, ("stride",)),
    (dict(kernel_size=2, padding=-1), ValueError, ("padding",)),
    (dict(kernel_size=2, padding=2), ValueError, ("padding", "half")),
    (dict(kernel_size=3, padding=2), ValueError, ("padding", "half")),
    (dict(kernel_size=(2, 4), padding=(1, 3)), ValueError, ("padding", "half")),
    (dict(kernel_size=(4, 2), padding=(3, 1)), ValueError, ("padding", "half")),
    (dict(kernel_size=2, padding=0.5), TypeError, ("padding",)),
    (dict(kernel_size=2, padding="same"), TypeError, ("padding",)),
    (dict(kernel_size=2, padding=2**40), ValueError, ("padding",)),
    (dict(kernel_size=2, padding=2**62), ValueError, ("padding",)),
    (dict(kernel_size=2, padding=2**31 - 1), ValueError, ("padding",)),
    (dict(kernel_size=2, ceil_mode="yes"), TypeError, ("ceil_mode",)),
    (dict(kernel_size=2, ceil_mode=None), TypeError, ("ceil_mode",)),
    (dict(kernel_size=2, ceil_mode=1), TypeError, ("ceil_mode",)),
]
MAX_ONLY = [
    (dict(kernel_size=2, dilation=0), ValueError, ("dilation",)),
    (dict(kernel_size=2, dilation=-1), ValueError, ("dilation",)),
    (dict(kernel_size=2, dilation=1.5), TypeError, ("dilation",)),
    (dict(kernel_size=2, dilation=None), TypeError, ("dilation",)),
    (dict(kernel_size=2, dilation=2**40), ValueError, ("dilation",)),
    (dict(kernel_size=2, dilation=2**62), ValueError, ("dilation",)),
    (dict(kernel_size=2, dilation=6), ValueError, ("height",)),
    (dict(kernel_size=2, dilation=2**31 - 1), ValueError, ("height",)),
]
AVG_ONLY = [
    (dict(kernel_size=2, divisor_override=0), ValueError, ("divisor_override",)),
    (dict(kernel_size=2, divisor_override=1.5), TypeError, ("divisor_override",)),
    (dict(kernel_size=2, divisor_override="2"), TypeError, ("divisor_override",)),
    (dict(kernel_size=2, divisor_override=True), TypeError, ("divisor_override",)),
    (dict(kernel_size=2, divisor_override=2**62), ValueError, ("divisor_override",)),
    (dict(kernel_size=2, count_include_pad="no"), TypeError, ("count_include_pad",)),
    (dict(kernel_size=2, count_include_pad=None), TypeError, ("count_include_pad",)),
]

for kind, extra in (("max", MAX_ONLY), ("avg", AVG_ONLY)):
    fwd, bwd = f"{kind}_pool2d", f"{kind}_pool2d_backward"
    for kw, exc, frag in POOL_PARAMS + extra:
        case(fwd, (XP,), kw, exc, *frag)
        case(bwd, (GOP, XP), kw, exc, *frag)
    for fn, pre in ((fwd, ()), (bwd, (GOP,))):
        case(fn, pre + (_z(3, 6, 6), 2), {}, ValueError, "x", "(3, 6, 6)")
        case(fn, pre + (_z(1, 2, 3, 6, 6), 2), {}, ValueError, "x", "(1, 2, 3, 6, 6)")
        case(fn, pre + (_z(2, 0, 6, 6), 2), {}, ValueError, "x", "(2, 0, 6, 6)")
        case(fn, pre + (_z(2, 3, 6, 0), 2), {}, ValueError, "x", "(2, 3, 6, 0)")
        for v, frag in bad_arrays("x"):
            case(fn, pre + (v, 2), {}, TypeError, *frag)
        case(fn, pre + (XP.astype(LONGDOUBLE), 2), {}, TypeError, "x", str(LONGDOUBLE))
    case(bwd, (_z(2, 3, 2, 2), XP, 2), {}, ValueError, "grad_out", "(2, 3, 2, 2)",
         "(2, 3, 3, 3)")
    case(bwd, (_z(2, 4, 3, 3), XP, 2), {}, ValueError, "grad_out", "(2, 4, 3, 3)")
    case(bwd, (_z(3, 3, 3), XP, 2), {}, ValueError, "grad_out", "(3, 3, 3)")
    case(bwd, (GOP, XP, 2), dict(stride=1), ValueError, "grad_out", "(2, 3, 3, 3)",
         "(2, 3, 5, 5)")
    case(bwd, (GOP, XP, 2), dict(ceil_mode=True, stride=4), ValueError, "grad_out",
         "(2, 3, 3, 3)", "(2, 3, 2, 2)")
    for v, frag in bad_arrays("grad_out"):
        case(bwd, (v, XP, 2), {}, TypeError, *frag)
    case(bwd, (GOP.astype(F32), XP, 2), {}, TypeError, "grad_out", "float32", "float64")
    case(bwd, (GOP, XP.astype(F32), 2), {}, TypeError, "x", "float32", "float64")

# upsampling ----------------------------------------------------------------------------------

SCALES = [
    (0, ValueError), (-1, ValueError), ((2, 0), ValueError), ((0, 2), ValueError),
    (1.5, ValueError), ((2, 1.5), ValueError), (0.5, ValueError), (0.0, ValueError),
    (-2.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ((2, 2, 2), ValueError), ((2,), ValueError), (2**40, ValueError), (2**62, ValueError),
    ("2", TypeError), (None, TypeError), (True, TypeError), ((2, "2"), TypeError),
    ((2, None), TypeError), (1 + 1j, TypeError),
]
for sf, exc in SCALES:
    case("upsample_nearest2d", (XU, sf), {}, exc, "scale_factor")
    case("upsample_nearest2d_backward", (GOU, sf), {}, exc, "scale_factor")

for fn, a in (("upsample_nearest2d", "x"), ("upsample_nearest2d_backward", "grad_out")):
    case(fn, (_z(3, 2, 3), 2), {}, ValueError, a, "(3, 2, 3)")
    case(fn, (_z(1, 2, 3, 4, 6), 2), {}, ValueError, a, "(1, 2, 3, 4, 6)")
    case(fn, (_z(2, 3, 0, 6), 2), {}, ValueError, a, "(2, 3, 0, 6)")
    for v, frag in bad_arrays(a):
        case(fn, (v, 2), {}, TypeError, *frag)
    case(fn, ((XU if a == "x" else GOU).astype(LONGDOUBLE), 2), {}, TypeError, a,
         str(LONGDOUBLE))

UB = "upsample_nearest2d_backward"
case(UB, (_z(2, 3, 5, 6), 2), {}, ValueError, "grad_out", "(2, 3, 5, 6)")
case(UB, (_z(2, 3, 4, 6), (2, 4)), {}, ValueError, "grad_out", "(2, 3, 4, 6)")
case(UB, (_z(2, 3, 4, 6), 8), {}, ValueError, "grad_out", "(2, 3, 4, 6)")

# cross-entropy -------------------------------------------------------------------------------

for fn in ("cross_entropy", "cross_entropy_backward"):
    case(fn, (_z(12), TG), {}, ValueError, "logits", "(12,)")
    case(fn, (_z(3, 4, 1), TG), {}, ValueError, "logits", "(3, 4, 1)")
    case(fn, (_z(3, 0), TG), {}, ValueError, "logits", "(3, 0)")
    case(fn, (np.float64(1.0), TG), {}, ValueError, "logits", "()")
    for v, frag in bad_arrays("logits"):
        case(fn, (v, TG), {}, TypeError, *frag)
    # labels
    case(fn, (LG, np.array([0, 1, 4])), {}, ValueError, "target", "4")
    case(fn, (LG, np.array([0, -1, 2])), {}, ValueError, "target", "-1")
    case(fn, (LG, np.array([0, 1, 2**40])), {}, ValueError, "target", str(2**40))
    case(fn, (LG, np.array([0, 1, 9], np.uint8)), {}, ValueError, "target", "9")
    case(fn, (LG, np.array([0, -100, 2])), dict(ignore_index=-1), ValueError, "target",
         "-100")
    case(fn, (LG, np.array([[0], [1], [2]])), {}, ValueError, "target", "(3, 1)")
    case(fn, (LG, np.array([0, 1])), {}, ValueError, "target", "(2,)")
    case(fn, (LG, np.array(1)), {}, ValueError, "target", "()")
    case(fn, (LG, np.array([0.0, 1.0, 3.0])), {}, ValueError, "target", "(3,)")
    case(fn, (LG, [0.0, 1.0, 3.0]), {}, ValueError, "target", "(3,)")
    case(fn, (LG, np.full((3, 5), 0.2)), {}, ValueError, "target", "(3, 5)")
    case(fn, (LG, np.full((4, 4), 0.25)), {}, ValueError, "target", "(4, 4)")
    case(fn, (LG, np.full((3, 4, 1), 0.25)), {}, ValueError, "target", "(3, 4, 1)")
    for v, frag in bad_arrays("target"):
        case(fn, (LG, v), {}, TypeError, *frag)
    case(fn, (LG, np.array([True, False, True])), {}, TypeError, "target", "bool")
    # reduction / label_smoothing / ignore_index
    for r in ("avg", "MEAN", "", "elementwise_mean"):
        case(fn, (LG, TG), dict(reduction=r), ValueError, "reduction", repr(r))
    for eps in (-0.1, 1.5, -1e-12, 1.0000001, float("nan"), float("inf"), -2):
        case(fn, (LG, TG), dict(label_smoothing=eps), ValueError, "label_smoothing")
        case(fn, (LG, PR), dict(label_smoothing=eps), ValueError, "label_smoothing")
    for eps in ("0.1", None, True, [0.1], 0.1j):
        case(fn, (LG, TG), dict(label_smoothing=eps), TypeError, "label_smoothing")
    for ii in (1.5, None, "x", True):
        case(fn, (LG, TG), dict(ignore_index=ii), TypeError, "ignore_index")
    # class weights
    case(fn, (LG, TG), dict(weight=_z(3)), ValueError, "weight", "(3,)")
    case(fn, (LG, TG), dict(weight=_z(1, 4)), ValueError, "weight", "(1, 4)")
    case(fn, (LG, TG), dict(weight=np.float64(1.0)), ValueError, "weight", "()")
    case(fn, (LG, PR), dict(weight=_z(5)), ValueError, "weight", "(5,)")
    case(fn, (LG, TG), dict(weight=np.ones(4, complex)), TypeError, "weight", "complex")
    case(fn, (LG, TG), dict(weight=np.ones(4, object)), TypeError, "weight")
    # mixed precision
    case(fn, (LG.astype(F32), PR), {}, TypeError, "target", "float64")
    case(fn, (LG, PR.astype(F32)), {}, TypeError, "target", "float32")
    case(fn, (LG.astype(F32), TG), dict(weight=CW), TypeError, "weight", "float64")
    case(fn, (LG, TG), dict(weight=CW.astype(F32)), TypeError, "weight", "float32")
    case(fn, (LG.astype(F32), PR.astype(F32)), dict(weight=CW), TypeError, "weight",
         "float64")
    case(fn, (LG.astype(LONGDOUBLE), TG), {}, TypeError, "logits", str(LONGDOUBLE))
    case(fn, (LG, np.zeros((3, 4), int)), {}, ValueError, "target", "(3, 4)")
    case(fn, (LG, TG), dict(ignore_index=2**63), ValueError, "ignore_index")

CEB = "cross_entropy_backward"
case(CEB, (LG, TG), dict(reduction="none", grad_output=np.ones(2)), ValueError,
     "grad_output", "(2,)")
case(CEB, (LG, TG), dict(reduction="none", grad_output=np.ones((3, 1))), ValueError,
     "grad_output", "(3, 1)")
case(CEB, (LG, TG), dict(reduction="none", grad_output=1.0), ValueError, "grad_output", "()")
case(CEB, (LG, TG), dict(reduction="mean", grad_output=np.ones(3)), ValueError,
     "grad_output", "(3,)")
case(CEB, (LG, TG), dict(reduction="sum", grad_output=np.ones((1, 1))), ValueError,
     "grad_output", "(1, 1)")
case(CEB, (LG, TG), dict(grad_output=1j), TypeError, "grad_output", "complex")
case(CEB, (LG, TG), dict(grad_output="1"), TypeError, "grad_output")
case(CEB, (LG, TG), dict(reduction="none", grad_output=np.ones(3, complex)), TypeError,
     "grad_output", "complex")

# out= of the forward functions ---------------------------------------------------------------

OUT_CALLS = [   # (function, args, kwargs, shape of the float64 result)
    ("conv2d", (X, W, B), {}, (2, 4, 3, 3)),
    ("conv_transpose2d", (XT, WT, BT), {}, (2, 3, 4, 4)),
    ("max_pool2d", (XP, 2), {}, (2, 3, 3, 3)),
    ("avg_pool2d", (XP, 2), {}, (2, 3, 3, 3)),
    ("upsample_nearest2d", (XU, 2), {}, (2, 3, 4, 6)),
    ("cross_entropy", (LG, TG), dict(reduction="none"), (3,)),
    ("cross_entropy", (LG, PR), dict(reduction="none"), (3,)),
]


def _readonly(a):
    a.setflags(write=False)
    return a


for fn, args, kw, shape in OUT_CALLS:
    wide = shape[:-1] + (shape[-1] + 1,)
    for bad, exc, frag in [
        (_z(*shape).tolist(), TypeError, ("out", "numpy.ndarray", "list")),
        (np.float64(0.0), TypeError, ("out", "numpy.ndarray", "float64")),
        ((_z(*shape),), TypeError, ("out", "tuple")),
        ("out", TypeError, ("out", "str")),
        (_z(*shape, dtype=F32), TypeError, ("out", "float32", "float64")),
        (_z(*shape, dtype=np.int64), TypeError, ("out", "int64", "float64")),
        (_z(*shape, dtype=LONGDOUBLE), TypeError, ("out", str(LONGDOUBLE), "float64")),
        (_z(*shape, dtype=">f8"), TypeError, ("out", ">f8", "float64")),
        (_z(*wide), ValueError, ("out", str(wide), str(shape))),
        (_z(*shape[::-1]) if len(shape) > 1 else _z(1, *shape), ValueError,
         ("out", str(shape[::-1] if len(shape) > 1 else (1,) + shape), str(shape))),
        (_z(), ValueError, ("out", "()", str(shape))),
        (_z(*shape[:-1], 2 * shape[-1])[..., ::2], ValueError, ("out", "C-contiguous")),
        (_readonly(_z(*shape)), ValueError, ("out", "read-only")),
    ] + ([(_z(*wide)[..., 1:], ValueError, ("out", "C-contiguous"))] if len(shape) > 1 else []):
        case(fn, args, dict(kw, out=bad), exc, *frag)
    f32 = tuple(a.astype(F32) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
                for a in args)
    case(fn, f32, dict(kw, out=_z(*shape)), TypeError, "out", "float64", "float32")

for fn in ("conv2d", "conv_transpose2d"):
    case(fn, (X, W, B) if fn == "conv2d" else (XT, WT, BT), dict(out=np.asfortranarray(
        _z(2, 4, 3, 3) if fn == "conv2d" else _z(2, 3, 4, 4))), ValueError, "out",
        "C-contiguous")

CE = "cross_entropy"
for red in ("mean", "sum"):             # a reduction's result is 0-d: out must be a 0-d array
    case(CE, (LG, TG), dict(reduction=red, out=_z(1)), ValueError, "out", "(1,)", "()")
    case(CE, (LG, TG), dict(reduction=red, out=_z(3)), ValueError, "out", "(3,)", "()")
    case(CE, (LG, TG), dict(reduction=red, out=_z(1, 1)), ValueError, "out", "(1, 1)", "()")
    case(CE, (LG, TG), dict(reduction=red, out=np.float64(0.0)), TypeError, "out",
         "numpy.ndarray")
    case(CE, (LG, TG), dict(reduction=red, out=0.0), TypeError, "out", "float")
    case(CE, (LG, TG), dict(reduction=red, out=_z(dtype=F32)), TypeError, "out", "float32")
    case(CE, (LG, TG), dict(reduction=red, out=_readonly(_z())), ValueError, "out",
         "read-only")
case(CE, (LG, TG), dict(reduction="none", out=_z()), ValueError, "out", "()", "(3,)")
case(CE, (_z(0, 4), np.zeros(0, int)), dict(reduction="none", out=_z(1)), ValueError, "out",
     "(1,)", "(0,)")

MP = "max_pool2d"     # return_indices=True: out is a tuple (values, indices)
_V, _I = _z(2, 3, 3, 3), _z(2, 3, 3, 3, dtype=np.int64)
for bad, exc, frag in [
    (_V, TypeError, ("out", "tuple", "return_indices")),
    ([_V, _I], TypeError, ("out", "tuple", "list")),
    ((_V,), TypeError, ("out", "tuple")),
    ((_V, _I, _I), TypeError, ("out", "tuple")),
    ((_V, _V.copy()), TypeError, ("out[1]", "float64", "int64")),
    ((_I.copy(), _I), TypeError, ("out[0]", "int64", "float64")),
    ((_V, _I.astype(np.int32)), TypeError, ("out[1]", "int32", "int64")),
    ((_V, _z(2, 3, 3, 2, dtype=np.int64)), ValueError, ("out[1]", "(2, 3, 3, 2)",
                                                       "(2, 3, 3, 3)")),
    ((_z(2, 3, 2, 3), _I), ValueError, ("out[0]", "(2, 3, 2, 3)", "(2, 3, 3, 3)")),
    ((_V, np.asfortranarray(_I)), ValueError, ("out[1]", "C-contiguous")),
    ((_readonly(_z(2, 3, 3, 3)), _I), ValueError, ("out[0]", "read-only")),
    ((_V, _V.view(np.int64)), ValueError, ("out[0]", "out[1]", "share memory")),
    ((_V.tolist(), _I), TypeError, ("out[0]", "list")),
]:
    case(MP, (XP, 2), dict(return_indices=True, out=bad), exc, *frag)
case(MP, (XP, 2), dict(out=(_V, _I)), TypeError, "out", "tuple")   # no indices: one array

# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("fn, args, kwargs, exc, fragments", CASES)
def test_bad_input_raises(fn, args, kwargs, exc, fragments):
    with pytest.raises(exc, match=_rx(*fragments)) as info:
        getattr(fastconv, fn)(*args, **kwargs)
    # the message says which function complained
    assert fn in str(info.value)


def test_table_covers_every_public_function():
    covered = {p.values[0] for p in CASES}
    public = set(fastconv.__all__) - {"set_num_threads", "get_num_threads", "show_config"}
    assert covered == public


def test_legal_rows_of_the_table_are_legal():
    """The starting operands themselves are accepted (so each row breaks exactly one thing)."""
    fastconv.conv2d(X, W, B)
    fastconv.conv2d_backward(GO, X, W)
    fastconv.conv_transpose2d(XT, WT, BT)
    fastconv.conv_transpose2d_backward(GOT, XT, WT)
    fastconv.conv_transpose2d(XT, WT, _z(6), groups=2)    # weight (4, 3) with 2 groups: 6 out
    fastconv.conv_transpose2d(XT, WT, output_padding=1, stride=1, dilation=2)
    for kind in ("max", "avg"):
        getattr(fastconv, f"{kind}_pool2d")(XP, 2)
        getattr(fastconv, f"{kind}_pool2d_backward")(GOP, XP, 2)
    fastconv.upsample_nearest2d(XU, 2)
    fastconv.upsample_nearest2d_backward(GOU, 2)
    fastconv.upsample_nearest2d(XU, 2.0)
    for t in (TG, PR):
        fastconv.cross_entropy(LG, t, weight=CW)
        fastconv.cross_entropy_backward(LG, t, weight=CW)
    fastconv.cross_entropy(LG, np.array([0, -100, 2]))
    fastconv.cross_entropy(LG, np.array([0, -1, 2]), ignore_index=-1)
    for fn, args, kw, shape in OUT_CALLS:
        out = _z(*shape)
        assert getattr(fastconv, fn)(*args, **kw, out=out) is out
    for red in ("mean", "sum"):
        fastconv.cross_entropy(LG, TG, reduction=red, out=_z())
    fastconv.max_pool2d(XP, 2, return_indices=True, out=(_V.copy(), _I.copy()))


@pytest.mark.parametrize("n, exc", [
    (0, ValueError), (-1, ValueError), (-2**70, ValueError),
    (1.5, TypeError), (2.0, TypeError), ("2", TypeError), (None, TypeError), (True, TypeError),
])
def test_set_num_threads_rejects(n, exc):
    before = fastconv.get_num_threads()
    with pytest.raises(exc, match=_rx("set_num_threads")):
        fastconv.set_num_threads(n)
    assert fastconv.get_num_threads() == before


# overflowing outputs: a ValueError at once, nothing allocated ------------------------------

def _huge(shape):
    """A zero-strided (free) array of the given shape."""
    return np.broadcast_to(np.zeros((1,) * len(shape)), shape)


OVERFLOWS = [
    ("conv2d", (X, W), dict(padding=2**31 - 1)),
    ("conv2d", (X, W), dict(padding=(2**31 - 1, 0))),
    ("conv2d", (X, W), dict(padding=(0, 2**30))),
    ("conv2d_backward", (GO, X, W), dict(padding=2**31 - 1)),
    ("conv2d", (_huge((2**40, 1, 1, 1)), _huge((2**23, 1, 1, 1))), {}),
    ("conv2d", (_huge((2**31, 1, 1, 1)), _huge((2**31 - 1, 1, 1, 1))), {}),
    ("conv_transpose2d", (_z(1, 1, 2, 2), _z(1, 1, 1, 1)), dict(stride=2**30)),
    ("conv_transpose2d", (_z(1, 1, 2, 2), _z(1, 1, 1, 1)), dict(stride=(2**31 - 1, 1))),
    ("conv_transpose2d", (_z(1, 1, 2, 2), _z(1, 1, 3, 3)), dict(dilation=2**31 - 1)),
    ("conv_transpose2d", (_huge((2**40, 1, 1, 1)), _huge((1, 2**23, 1, 1))), {}),
    ("conv_transpose2d_backward", (_z(1, 1, 3, 3), _z(1, 1, 2, 2), _z(1, 1, 2, 2)),
     dict(stride=2**30)),
    ("upsample_nearest2d", (_z(1, 1, 2, 2), 2**30), {}),
    ("upsample_nearest2d", (_z(1, 1, 2, 2), 2**31 - 1), {}),
    ("upsample_nearest2d", (_z(4, 1, 2, 2), (2**30, 2**29)), {}),
    ("upsample_nearest2d", (_huge((2**28, 2**28, 1, 1)), (2, 4)), {}),
]


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("fn, args, kwargs", OVERFLOWS,
                         ids=[f"{o[0]}-{i}" for i, o in enumerate(OVERFLOWS)])
def test_overflowing_output_is_a_value_error_without_allocating(fn, args, kwargs):
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match="(?i)overflow|too large|must be"):
            getattr(fastconv, fn)(*args, **kwargs)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 64 * 2**20, f"{fn} allocated {peak} bytes before failing"


def test_kept_geometries_do_not_skip_checks():
    """conv_setup keeps the geometry of valid calls with plain int/str/pair arguments: the
    same call again gives the same result, while a call that differs only by a bool or a
    NumPy integer (equal and hashing alike) or by a list still goes through its checks;
    the store stays bounded."""
    F = fastconv.functional
    x = np.ones((1, 2, 5, 5), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    a = fastconv.conv2d(x, w, stride=1, padding=1)
    np.testing.assert_array_equal(fastconv.conv2d(x, w, stride=1, padding=1), a)
    assert any(k[0] == "conv2d" and k[1] == x.shape for k in F._SETUPS)
    with pytest.raises(TypeError, match="stride"):
        fastconv.conv2d(x, w, stride=True, padding=1)
    with pytest.raises(TypeError, match="groups"):
        fastconv.conv2d(x, w, stride=1, padding=1, groups=True)
    np.testing.assert_array_equal(fastconv.conv2d(x, w, stride=np.int64(1), padding=[1, 1]), a)
    for i in range(F._SETUPS_MAX + 5):
        F._conv_setup("conv2d", x, w, 1, i, 1, 1)
    assert len(F._SETUPS) <= F._SETUPS_MAX
