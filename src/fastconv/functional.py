"""Public functional API of fastconv, with PyTorch's semantics (``torch.nn.functional``).

Every function validates its arguments and raises ``ValueError`` or ``TypeError`` naming the
argument and the shapes before anything is allocated or any kernel runs; then it makes its
inputs C-contiguous arrays of one floating dtype (float32 or float64), allocates the outputs and
calls a kernel from :mod:`fastconv._kernels`.  Inputs are never modified and outputs never alias
them.  Layout is NCHW; weights use PyTorch's layouts.

The forward functions also take a keyword-only ``out=`` array to write the result into, as
NumPy's ufuncs (see ``_out``): checked with the other arguments, returned itself, and right even
when it overlaps an input.
"""
import collections
import contextlib
import math
import operator
import threading

import numpy as np

from . import _kernels
from ._threading import blas_threads, get_num_threads

__all__ = [
    "conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward",
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "upsample_nearest2d", "upsample_nearest2d_backward",
    "cross_entropy", "cross_entropy_backward",
]

_INT_MAX = 2**31 - 1      # BLAS takes C ints; every size and parameter must fit one
_MAX_BYTES = 2**62        # a size beyond this is an overflow, not a memory shortage
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_F32, _F64 = _FLOATS


# --------------------------------------------------------------------------------------------
# argument normalisation
# --------------------------------------------------------------------------------------------

def _int(value, name, fn):
    if type(value) is int and -_INT_MAX <= value <= _INT_MAX:     # the common case, at once
        return value
    if isinstance(value, np.ndarray) and (value.ndim != 0 or value.dtype.kind not in "iu"):
        raise TypeError(f"{fn}: {name} must be an int, got an array of dtype {value.dtype} "
                        f"and shape {value.shape}")
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r} "
                        f"({type(value).__name__})")
    v = operator.index(value)
    if abs(v) > _INT_MAX:
        raise ValueError(f"{fn}: {name}={v} is out of range (|{name}| must be < 2**31)")
    return v


def _pair(value, name, fn, minimum):
    """An int or a pair of ints -> (int, int), each >= minimum."""
    if type(value) is int and minimum <= value <= _INT_MAX:      # the common case, at once
        return (value, value)
    if isinstance(value, (tuple, list)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        if len(value) != 2:
            raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}")
        out = (_int(value[0], name, fn), _int(value[1], name, fn))
    else:
        v = _int(value, name, fn)
        out = (v, v)
    if min(out) < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value!r}")
    return out


def _array(a, name, fn):
    if a is None:
        raise TypeError(f"{fn}: {name} must be an array, got None")
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{fn}: {name} must have a real numeric dtype, got dtype {arr.dtype}")
    return arr


def _float_dtype(fn, named):
    """The one floating dtype of the operands: float32/float64 kept, float16 -> float32,
    integers alone -> float64; float32 mixed with float64 is a TypeError."""
    if len(named) <= 3:       # the common case at once: all float32 or all float64
        dt = named[0][1].dtype
        if (dt == _F32 or dt == _F64) and all(a.dtype == dt for _, a in named):
            return dt
    floats = {}
    for name, arr in named:
        if arr.dtype.kind == "f":
            dt = np.dtype(np.float32) if arr.dtype.itemsize <= 4 else arr.dtype
            if dt not in _FLOATS:
                raise TypeError(f"{fn}: {name} has dtype {arr.dtype}; fastconv computes in "
                                "float32 or float64")
            floats[name] = dt
    kinds = set(floats.values())
    if len(kinds) > 1:
        desc = ", ".join(f"{n} is {d}" for n, d in floats.items())
        raise TypeError(f"{fn}: mixed float32/float64 operands ({desc}); cast them to one "
                        "dtype first")
    return kinds.pop() if kinds else np.dtype(np.float64)


def _c(arr, dtype):
    return np.ascontiguousarray(arr, dtype=dtype)


def _check_4d(arr, name, fn, what="(N, C, H, W)", allow_empty_batch=True):
    if arr.ndim != 4:
        raise ValueError(f"{fn}: {name} must be 4-D {what}, got shape {arr.shape}")
    if 0 in arr.shape[1:] or (not allow_empty_batch and arr.shape[0] == 0):
        raise ValueError(f"{fn}: {name} must have non-zero sizes except the batch, "
                         f"got shape {arr.shape}")


def _check_size(shape, itemsize, fn, what):
    n = math.prod(map(int, shape))
    if n * itemsize >= _MAX_BYTES:
        raise ValueError(f"{fn}: {what} of shape {tuple(shape)} overflows")


def _alloc(shape, dtype, fn, what, zero=False):
    dt = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
    _check_size(shape, dt.itemsize, fn, what)
    return (np.zeros if zero else np.empty)(shape, dt)


def _out(out, shape, dtype, fn, *inputs, name="out", what="output", zero=False):
    """The ``out=`` argument of a forward function -> (buf, done).

    ``buf`` is the array the kernel writes the result (of ``shape`` and ``dtype``) into, set up
    as ``_alloc(..., zero=zero)`` would (zero-filled when ``zero``): a new array when ``out`` is
    None, ``out`` itself, or a temporary when ``out`` may share memory with one of ``inputs``
    (None entries skipped), since the kernels read their inputs while they write.
    ``done(result)`` gives what the function returns: ``result`` when ``out`` is None, else
    ``out``, with ``result`` copied into it unless it already is ``out``.  Raises, naming
    ``name``: TypeError unless ``out`` is an ndarray of exactly ``dtype`` (no casting),
    ValueError unless it has exactly ``shape``, is C-contiguous and writeable.
    """
    if out is None:
        return _alloc(shape, dtype, fn, what, zero), lambda result: result
    shape, dtype = tuple(shape), np.dtype(dtype)
    if not isinstance(out, np.ndarray):
        t = type(out)
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray, got " + (
            t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"))
    if out.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {out.dtype} but the result has dtype {dtype}; "
                        f"{name} must have exactly the result's dtype (no casting)")
    if out.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {out.shape} but the result has shape {shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{fn}: {name} must be C-contiguous, got strides {out.strides} for "
                         f"shape {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only; it must be writeable")

    def done(result):
        if result is not out:
            np.copyto(out, result)
        return out

    if any(a is not None and np.may_share_memory(out, a) for a in inputs):
        return _alloc(shape, dtype, fn, what, zero), done
    if zero:
        out.fill(0)
    return out, done


def _out_size(fn, dim, size, k, s, pad_total, d):
    out = (size + pad_total - d * (k - 1) - 1) // s + 1
    if out < 1:
        raise ValueError(f"{fn}: the output {dim} would be {out} (input {dim} {size}, "
                         f"padding {pad_total} in all, dilated kernel {d * (k - 1) + 1}, "
                         f"stride {s}); it must be >= 1")
    return out


_GRAIN = 1 << 15   # below this many inner operations per thread, threads cost more than they save


def _threads(n_items, work=None):
    """(OpenMP team size, BLAS threads) for a call with ``n_items`` parallel work items and
    about ``work`` inner operations in all: small calls run on one thread, since waking a team
    costs more than it saves (and far more on a loaded machine)."""
    nt = get_num_threads()
    if work is not None:
        nt = min(nt, max(1, int(work) // _GRAIN))
    team = max(1, min(nt, n_items))
    return team, (1 if team > 1 else nt)


def _team(n_items, work):
    return _threads(n_items, work)[0]


def _mask(output_mask, fn):
    if not isinstance(output_mask, (tuple, list)):
        raise TypeError(f"{fn}: output_mask must be a sequence of 3 bools "
                        f"(grad_x, grad_weight, grad_bias), got {output_mask!r}")
    if len(output_mask) != 3:
        raise ValueError(f"{fn}: output_mask must be a sequence of 3 bools "
                         f"(grad_x, grad_weight, grad_bias), got {output_mask!r}")
    for m in output_mask:
        if not isinstance(m, (bool, np.bool_, int, np.integer)):
            raise TypeError(f"{fn}: output_mask must hold bools, got {output_mask!r}")
    return tuple(bool(m) for m in output_mask)


# --------------------------------------------------------------------------------------------
# convolution
# --------------------------------------------------------------------------------------------

def _conv_padding(padding, k, s, d, fn):
    """-> (top, bottom, left, right) for int / pair / 'valid' / 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if s != (1, 1):
                raise ValueError(f"{fn}: padding='same' needs stride 1, got stride={s}")
            th, tw = d[0] * (k[0] - 1), d[1] * (k[1] - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(f"{fn}: padding must be an int, a pair, 'valid' or 'same', "
                         f"got {padding!r}")
    p = _pair(padding, "padding", fn, 0)
    return (p[0], p[0], p[1], p[1])


def _plain(v):
    """v when it is an int, a str or a tuple of two ints (exactly those types: a bool or a
    NumPy integer is not, so that it still meets its own check), else None."""
    t = type(v)
    if t is int or t is str or (t is tuple and len(v) == 2 and type(v[0]) is int
                                and type(v[1]) is int):
        return v
    return None


_SETUPS = {}          # (fn, shapes, arguments) -> geometry of calls that passed validation
_SETUPS_MAX = 512


def _conv_setup(fn, x, weight, stride, padding, dilation, groups, transposed=False,
                output_padding=0):
    """Validate a (transposed) convolution; return its normalised geometry (a dict the
    callers only read).  Geometries of valid calls with plain arguments are kept (the same
    layer called again is only looked up: the checks were ~10 us of a batch-1 call)."""
    key = None
    if (_plain(stride) is not None and _plain(padding) is not None
            and _plain(dilation) is not None and type(groups) is int
            and _plain(output_padding) is not None and type(transposed) is bool):
        key = (fn, x.shape, weight.shape, transposed, stride, padding, dilation, groups,
               output_padding)
        geo = _SETUPS.get(key)
        if geo is not None:
            return geo
    geo = _conv_setup_checked(fn, x, weight, stride, padding, dilation, groups, transposed,
                              output_padding)
    if key is not None:
        if len(_SETUPS) >= _SETUPS_MAX:
            _SETUPS.clear()
        _SETUPS[key] = geo
    return geo


def _conv_setup_checked(fn, x, weight, stride, padding, dilation, groups, transposed,
                        output_padding):
    _check_4d(x, "x", fn)
    wdesc = "(in_channels, out_channels/groups, kH, kW)" if transposed else \
        "(out_channels, in_channels/groups, kH, kW)"
    if weight.ndim != 4:
        raise ValueError(f"{fn}: weight must be 4-D {wdesc}, got shape {weight.shape}")
    if any(d == 0 for d in weight.shape):
        raise ValueError(f"{fn}: weight must have non-zero sizes, got shape {weight.shape}")
    s = _pair(stride, "stride", fn, 1)
    d = _pair(dilation, "dilation", fn, 1)
    g = _int(groups, "groups", fn)
    if g < 1:
        raise ValueError(f"{fn}: groups must be >= 1, got {g}")
    k = weight.shape[2:]
    C = x.shape[1]
    if transposed:
        if isinstance(padding, str):
            raise ValueError(f"{fn}: padding must be an int or a pair, got {padding!r}")
        p = _pair(padding, "padding", fn, 0)
        pad = (p[0], p[0], p[1], p[1])
        op = _pair(output_padding, "output_padding", fn, 0)
        for i in range(2):
            if op[i] >= s[i] and op[i] >= d[i]:
                raise ValueError(f"{fn}: output_padding must be smaller than stride or "
                                 f"dilation, got output_padding={op}, stride={s}, "
                                 f"dilation={d}")
        if weight.shape[0] != C:
            raise ValueError(f"{fn}: x has {C} channels but weight of shape {weight.shape} "
                             f"expects {weight.shape[0]} (x shape {x.shape})")
        if C % g:
            raise ValueError(f"{fn}: in_channels={C} is not divisible by groups={g}")
        L = weight.shape[1] * g
        size = []
        for i, dim in enumerate(("height", "width")):
            o = (x.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + op[i] + 1
            if o < 1:
                raise ValueError(f"{fn}: the output {dim} would be {o} (input shape {x.shape}, "
                                 f"weight shape {weight.shape}, stride={s}, padding={p}, "
                                 f"output_padding={op}, dilation={d}); it must be >= 1")
            size.append(o)
        OH, OW = size
    else:
        pad = _conv_padding(padding, k, s, d, fn)
        if C % g or weight.shape[1] * g != C:
            raise ValueError(f"{fn}: x has {C} channels but weight of shape {weight.shape} "
                             f"with groups={g} expects {weight.shape[1] * g} "
                             f"(x shape {x.shape})")
        L = weight.shape[0]
        if L % g:
            raise ValueError(f"{fn}: out_channels={L} (weight shape {weight.shape}) is not "
                             f"divisible by groups={g}")
        OH = _out_size(fn, "height", x.shape[2], k[0], s[0], pad[0] + pad[1], d[0])
        OW = _out_size(fn, "width", x.shape[3], k[1], s[1], pad[2] + pad[3], d[1])
    # every BLAS dimension must fit a C int
    cin = weight.shape[1] if transposed else C // g
    for v, what in ((cin * k[0] * k[1], "in_channels/groups * kH * kW"),
                    (OH * OW, "the output plane"), (x.shape[2] * x.shape[3], "the input plane"),
                    (L, "out_channels")):
        if v > _INT_MAX:
            raise ValueError(f"{fn}: {what} = {v} is too large (must be < 2**31)")
    for v, what in ((pad, "padding"), (d, "dilation"), (s, "stride")):
        if max(v) * max(k) > _INT_MAX or max(v) > _INT_MAX:
            raise ValueError(f"{fn}: {what}={v} is too large for kernel size {k}")
    return dict(s=s, d=d, g=g, pad=pad, k=k, L=L, OH=OH, OW=OW, H=x.shape[2], W=x.shape[3])


def _bias(bias, L, fn):
    if bias is None:
        return None
    b = _array(bias, "bias", fn)
    if b.shape != (L,):
        raise ValueError(f"{fn}: bias must have shape ({L},) (out_channels), got {b.shape}")
    return b


def _grad_out(grad_out, shape, fn):
    if grad_out.shape != tuple(shape):
        raise ValueError(f"{fn}: grad_out must have the output's shape {tuple(shape)}, "
                         f"got {grad_out.shape}")


_workspaces = threading.local()
_WORKSPACE_KEEP = 256 << 20   # bytes of im2col workspace kept alive per Python thread and dtype


def _thread_rows(team, cols, dtype):
    """A small (team, >= cols) scratch array, one row per OpenMP thread, each row padded to
    whole cache lines plus one: threads writing their own rows never share a line (false
    sharing made a 2-thread max-pool backward slower than 1 thread: 8.8 ms against 5.9)."""
    dt = np.dtype(dtype)
    per_line = max(1, 64 // dt.itemsize)
    return np.empty((team, -(-cols // per_line) * per_line + per_line), dt)


def _scratch(team, cols, dtype, fn, name="ws"):
    """A (team, cols) im2col workspace: one row per OpenMP thread.

    Kept alive between calls (one per Python thread and dtype, grown when a call needs more,
    up to _WORKSPACE_KEEP bytes), so that repeated calls do not pay page faults on a fresh
    multi-megabyte buffer every time.  The kernels never read it before writing it.
    """
    dt = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
    ws = _workspaces.__dict__
    view = ws.get((name, dt.char, team, cols))
    if view is not None:    # (made before: 0.3 us instead of 2 of a batch-1 layer's call)
        return view
    need = team * cols
    if not 0 <= need * dt.itemsize <= _WORKSPACE_KEEP:
        _check_size((team, cols), dt.itemsize, fn, "im2col workspace")
        return np.empty((team, cols), dt)
    key = name + "_" + dt.char
    buf = ws.get(key)
    if buf is None or buf.size < need:
        buf = np.empty(max(need, 1), dt)
        # the views of the old buffer go with it
        for k in [k for k in ws if type(k) is tuple and k[:2] == (name, dt.char)]:
            del ws[k]
        ws[key] = buf
    view = buf[:need].reshape(team, cols)
    if len(ws) < 256:
        ws[(name, dt.char, team, cols)] = view
    return view


def _wpack(M, K, groups, dtype, fn):
    """Workspace for the weights of ``groups`` (M, K) GEMMs packed for fastconv's own GEMM
    (_gemm.h); empty when the kernels use BLAS."""
    n = groups * _kernels.gemm_packed_size(M, K)
    return _scratch(1, n, dtype, fn, "wpack")[0] if n else _EMPTY[np.dtype(dtype).char]


_EMPTY = {"f": np.zeros(0, np.float32), "d": np.zeros(0, np.float64)}
# max_pool2d_forward's indices argument when none are asked for (never written)
_NO_INDICES = np.zeros((1, 1, 1, 1), np.int64)
_CTYPE = {"f": "float", "d": "double"}     # a fused kernel's specialisation by dtype.char
_NO_BLAS = contextlib.nullcontext()


def _is_depthwise(geo, weight):
    """One input channel per group and several groups: the direct kernel beats im2col+GEMM
    (a GEMM with one row per group is all overhead)."""
    return _DEPTHWISE and weight.shape[1] == 1 and geo["g"] > 1


_DEPTHWISE = True


def _sum_partials(part, shape, dtype):
    """Sum the per-thread partial rows of a weight or bias gradient into an array of shape."""
    out = np.empty(part.shape[1], dtype)
    _kernels.sum_rows(part, out)
    return out.reshape(shape)


def _wgrad_sum(part, shape, groups, K, transposed, dtype):
    """A weight gradient from its per-thread partial rows: each group's (R, K) block, or its
    (K, R) transpose as the own GEMM writes it (transposed), summed and transposed in one
    pass on the threads."""
    gw = np.empty(part.shape[1], dtype)
    if part.shape[0] > 1 or transposed:
        _kernels.wgrad_reduce(part, gw, groups, K, transposed, _team(part.shape[1] // 4096 + 1,
                                                                     part.size))
    else:
        gw[...] = part[0]
    return gw.reshape(shape)


def _dummy(dtype):
    return np.zeros((1, 1, 1, 1), dtype)


# Winograd F(2x2, 3x3) and F(2x2, 5x5) (_winograd.h) for 3x3 and 5x5 stride-1 undilated
# convolutions with at least _WINOGRAD_MIN_CHANNELS input and output channels per group (at
# most twice as many out as in; 5x5: one side at least twice that) and output planes at least
# _WINOGRAD_MIN_SIZE on a side; elsewhere im2col + GEMM (3x3) or the direct kernels (5x5) were
# faster (benchmarks/README.md).  The tests lower both to 1 to run every shape through it;
# _WINOGRAD5 = False leaves 5x5s to the other kernels (A/B runs).
_WINOGRAD_MIN_CHANNELS = 16
_WINOGRAD_MIN_SIZE = 8
_WINOGRAD5 = True


def _use_winograd(geo, weight, backward=False, n=2):
    """Winograd for conv2d (or, backward=True, for conv2d_backward's grad_x: the same
    kind of convolution of grad_out, channel roles swapped, onto the input plane); n: the
    batch.  F(2x2, 5x5) against the direct kernels (Zen 3, AVX2, 2026-12-05, single calls
    alternated, 1 / 2 threads, float32): LeNet's conv2 32 -> 64 on 14x14 batch 64 1.54x /
    1.52x, batch 8 1.36x / 1.29x; 64 -> 64 on 28x28 1.68-1.79x / 1.70-1.83x; 16 -> 32 on
    32x32 batch 8 1.22x / 1.25x; float64 batch 64 1.62x / 1.56x; but 16 -> 16 on 16x16 0.98x
    / 0.94x.  Its grad_x 1.35-1.80x at batch 8-64.  Batch 1 too since nn.Sequential's plans
    call it without Python (_kernels.WinoStep; 2026-12-05): LeNet's conv2 with its ReLU and
    pool 1.21x / 1.05-1.17x alone (without them 1.22x / 1.17x), the LeNet-style model at
    batch 1 in a rotation with PyTorch and ONNX Runtime 1.29x / 1.08x (through the Python
    path its conv2 had been level or slower there).  grad_x stays direct at batch 1 (its
    flipped kernel transformed anew every call: 0.93-1.01x)."""
    cin, cout = weight.shape[1], geo["L"] // geo["g"]
    oh, ow = geo["OH"], geo["OW"]
    if backward:
        cin, cout, oh, ow = cout, cin, geo["H"], geo["W"]
    k = geo["k"]
    if k == (5, 5):
        if not _WINOGRAD5 or (backward and n < 2) or \
                max(cin, cout) < 2 * _WINOGRAD_MIN_CHANNELS:
            return False
    elif k != (3, 3):
        return False
    return (geo["s"] == (1, 1) and geo["d"] == (1, 1)
            and min(cin, cout) >= _WINOGRAD_MIN_CHANNELS and cout <= 2 * cin
            and min(oh, ow) >= _WINOGRAD_MIN_SIZE)


# the direct convolution kernels (_direct.h): "auto" where _use_direct's rule says they win,
# "always" wherever they can run (tests), "never"
_DIRECT = "auto"


def _use_direct(geo, Cg, dt, pool, N):
    """Whether conv2d runs by the direct kernels: AVX-512 or AVX2, stride 1 or 2 along the
    width, a group's output channels in whole blocks of 2 vectors, and (auto) the
    convolutions whose im2col costs most next to their GEMM.  In-process A/B against
    im2col + GEMM (Xeon with AVX-512, 2026-12-03): float64 5x5 1.16-1.30x, 3x3 stride 2
    1.06-1.12x, 7x7 stride 2 from 3 channels 1.37x; float32 5x5 (batch 64) 1.03-1.26x, 7x7
    stride 2 from 3 channels 1.37x, 3x3 stride 2 from 32-64 channels 1.02-1.06x, but from
    128 channels 0.99-1.00x and batch 1 0.85-0.94x (bands of rows re-read the weights); taps
    summing fewer than 64 values (a 1->32 5x5: 0.6-0.76x) spend more on the tile's
    transposed store than they save, and tiles narrower than 10 pixels (output rows of 16:
    tiles of 8) hold too few sums (0.88-0.94x).  At AVX2 (tiles of 16 float / 8 double
    channels x at most 6 pixels; Zen 3, 2026-12-04, 1 / 2 threads): float32 5x5 (batch
    16-64) 1.12-1.26x / 1.06-1.11x, 7x7 stride-2 stems 1.26-1.35x / 1.30-1.32x, float64 5x5
    1.12-1.21x (batch 1 too), stems 1.18-1.37x; but 3x3 stride 2 0.94-1.08x in float32 and
    0.86-1.08x in float64, and a float32 5x5 at batch 1 0.98-0.99x: only the 5x5s and up.
    A max-pool fused after the convolution (nn.Sequential's Conv2d -> ReLU -> MaxPool2d) is
    fused into the direct kernels too, each band of rows pooled once computed (as in the own
    GEMM): the LeNet-style model's conv2 (32 -> 64 5x5 on 14x14, 2x2 pool), batch 64, 1.07x /
    1.08x the own GEMM's fused pooling at 1 / 2 threads, float64 1.14x, batch 8 1.03x (Zen
    3, 2026-12-04; a separate pool after the direct kernels had measured level with it).
    Batch 1 at AVX2, since conv2d_direct packs its weights by transposes and its taps'
    offsets in C (they had been a scalar strided loop and Python ints: 13 % and ~20 % of a
    batch-1 call) and runs from a plan (Zen 3, 2026-12-04, 1 / 2 threads, noisy at 2):
    LeNet's conv2 32 -> 64 5x5 on 14x14 1.09-1.11x / 0.98-1.18x (with the fused pool or
    not; float64 1.12-1.20x / 1.03-1.12x), 64->64 5x5 on 28x28 1.10-1.14x / 1.16-1.19x,
    16->32 5x5 on 32x32 1.17x / 1.18-1.25x; 3x3 stride 2 from 16-64 channels 1.02-1.25x /
    1.04-1.40x, but from 128 channels 0.99x / 1.18x and in float64 0.92x / 1.13x (at batch 8
    the float32 ones 1.03-1.10x / 0.98-1.06x: left on the GEMM).  At AVX-512 the batch-1
    rule is older than that fix: a fused pool only over a batch there (unmeasured since).
    At AVX2 with stride 2 along the width the taps now run in 8 KiB chunks of a block's
    weights (fc_direct_kc2_*: a 3x3 from 64 channels has 36 KiB, past Zen 3's L1), and every
    3x3 s2 goes direct: Zen 3, 2026-12-05, against im2col + GEMM, single calls alternated
    (each after a call of its own kind), 1 / 2 threads: float32 64->128 on 56x56 batch 8
    1.033x / 1.047x, batch 1 1.051x / 1.072x, 32->64 1.107x / 1.127x, 128->256 on 28x28
    1.071x / 1.068x; float64 64->128 1.119x / 1.168x, 128->256 1.016x / 1.039x (the same
    direct kernels in one pass over the taps: 0.976x / 0.986x on the first).  Batch 1 at
    AVX-512 float32, stride 1, 5x5 and up, measured again (Zen 4, 2026-12-05, single calls
    alternated, 1 / 2 threads): input gradients (the direct convolution of grad_out: the GEMM
    + col2im path runs one image on one thread) of 32->64 5x5 on 14x14 1.07x / 1.13x, on
    28x28 1.11x / 1.74x, 64->64 on 28x28 1.12x / 2.03x; forwards 8->32 5x5 1.01x / 1.05x,
    32->32 7x7 1.04x / 0.95x: direct too now."""
    if _DIRECT == "never" or not _kernels.direct_ok():
        return False
    (kH, kW), (sH, sW) = geo["k"], geo["s"]
    Lg, g = geo["L"] // geo["g"], geo["g"]
    if sW not in (1, 2) or Lg % _kernels.direct_block(dt.itemsize) or min(geo["pad"]) < 0:
        return False
    if _DIRECT == "always":
        return True
    ow, avx2, npx = geo["OW"], _kernels.gemm_level() == "avx2", _kernels.direct_np()
    narrow = 4 if avx2 else 10                      # the narrowest tile worth it
    if kH * kW < 9 or Cg * kH * kW < 64 or -(-ow // -(-ow // npx)) < narrow:
        return False
    work = N * geo["L"] * geo["OH"] * geo["OW"] * Cg * kH * kW
    batch = N * g >= 2 * _team(N * g, work)
    if pool is not None and not batch and not avx2:
        return False
    if sW == 2 and avx2:                # 3x3 s2, K chunked (_direct.h): see the docstring
        return True
    if dt.itemsize == 8:
        return kH * kW >= 25 or (sH * sW > 1 and not avx2)
    if sH * sW > 1 and avx2:            # (stride 2 down only) from 16-64 channels at batch 1
        return kH * kW >= 25 or (not batch and Cg <= 64)
    if sH * sW > 1 and Cg <= 16:        # a stem: 7x7 s2 from 3 channels 1.37x at batch 1-2
        return batch or kH * kW >= 25
    if sH * sW > 1:                     # 3x3 s2 64->128 1.04-1.06x, 128->256 0.99-1.00x
        return batch and Cg <= 64
    return kH * kW >= 25


# conv2d_backward's weight gradient of 3x3 and 5x5 stride-1 undilated convolutions by
# Winograd F(2x2, 3x3) and F(2x2, 5x5) (conv2d_winograd_wgrad) from _WINOGRAD_MIN_CHANNELS
# input and output channels per group (5x5: one side at least twice that, and batches of 2
# and more) and output planes of at least _WGRAD_WINO_MIN_SIZE on a side
_WGRAD_WINO = True
_WGRAD_WINO_MIN_SIZE = 4


def _use_winograd_wgrad(geo, weight, n=2):
    """Whether conv2d_backward's weight gradient (and then its bias gradient) on a batch of
    n runs by Winograd.  Against im2col + the own GEMM (Zen 3, AVX2, 2026-12-05, single calls
    alternated, 1 / 2 threads; the weight and bias gradients alone).  3x3, float32: 64 -> 64
    on 32x32 batch 32 1.89x / 1.92x, 128 -> 128 on 28x28 batch 8 2.04x / 1.86x, batch 1
    1.81x / 1.53-1.73x, 256 -> 256 on 14x14 2.03x / 1.81-2.11x, 512 -> 512 on 7x7 1.57x /
    1.72x (several images to a chunk: one a chunk ran 0.59x), 64 -> 64 on 4x4 1.48x /
    1.38x, 32 -> 32 on 16x16 batch 64 1.22x / 1.18x, 16 -> 16 1.07x; float64 1.9-2.1x /
    1.7-2.05x from 64 channels, 1.25-1.41x from 16; but 8 -> 8 0.87x and 3 -> 64 0.65x (the
    GEMMs' rows are the input channels).  5x5, float32: LeNet's conv2 32 -> 64 on 14x14
    batch 64 1.29x / 1.34x, 64 -> 64 on 28x28 batch 8 1.74x / 1.66x, 16 -> 32 on 32x32
    1.09-1.10x; float64 1.55-2.41x / 1.58-2.04x; but 16 -> 16 on 16x16 0.89x / 0.95x and
    batch 1 (32 -> 64 on 14x14) 0.94x / 1.04x.  Rounding, float32, N(0, 1) inputs, against
    float64 sums: 3x3 as im2col's (2.6e-6 / 3.5e-6 of the largest value for 64 -> 64 on
    32x32 batch 32); 5x5 with its sums over every tile in float32 10-15x im2col's (3.0e-5 /
    2.2e-6 for LeNet's conv2 at batch 64, at 1.36x / 1.37x), so float32 5x5 keeps its
    partial sums in double between chunks (each chunk's GEMMs summing at most ~128 tiles):
    6.2-6.6e-6 on LeNet's conv2 (about the forward's 7x), 9.3e-6 / 1.0e-6 for 16 -> 32 on
    16x16."""
    cin, cout = weight.shape[1], geo["L"] // geo["g"]
    if geo["k"] == (5, 5):
        if n < 2 or max(cin, cout) < 2 * _WINOGRAD_MIN_CHANNELS:
            return False
    elif geo["k"] != (3, 3):
        return False
    return (_WGRAD_WINO and geo["s"] == (1, 1) and geo["d"] == (1, 1)
            and not _is_depthwise(geo, weight) and min(geo["pad"]) >= 0
            and min(cin, cout) >= _WINOGRAD_MIN_CHANNELS
            and min(geo["OH"], geo["OW"]) >= _WGRAD_WINO_MIN_SIZE)


def _winograd_wgrad(grad_out, x, shape, geo, need_b, dt, fn):
    """(grad_weight, grad_bias or None) of conv2d_backward by conv2d_winograd_wgrad, or
    None when that result is not finite (an infinity or NaN in x or grad_out, or an
    overflow of the transforms' terms: the caller computes them the usual way)."""
    N, L, OH, OW = grad_out.shape
    g, Cg, r = geo["g"], shape[1], shape[2]
    team = _team(N * g * ((OH + 1) // 2) * ((OW + 1) // 2), N * L * OH * OW * Cg * r * r)
    scratch = _scratch(team, _kernels.wgrad_wino_cols(N, g, Cg, L // g, OH, OW, team,
                                                      dt.itemsize, r), dt, fn)
    gw = _alloc(shape, dt, fn, "grad_weight")
    gb = _alloc((L if need_b else 0,), dt, fn, "grad_bias")
    with blas_threads(1) if _kernels.gemm_level() == "blas" else _NO_BLAS:
        ok = _kernels.conv2d_winograd_wgrad(_c(grad_out, dt), _c(x, dt), gw, gb, scratch,
                                            geo["pad"][0], geo["pad"][2], g, team)
    return (gw, gb if need_b else None) if ok else None


def _xgrad_geometry(geo, Cg):
    """conv2d_backward's grad_x as a convolution (stride 1 only): of grad_out by the flipped,
    transposed kernel with the complementary paddings, onto the input plane; its geometry
    in _conv_setup's form, or None when a padding would be negative."""
    (kH, kW), (dH, dW), pad = geo["k"], geo["d"], geo["pad"]
    if geo["s"] != (1, 1):
        return None
    pad_t = ((kH - 1) * dH - pad[0], (kH - 1) * dH - pad[1],
             (kW - 1) * dW - pad[2], (kW - 1) * dW - pad[3])
    if min(pad_t) < 0:
        return None
    return dict(k=geo["k"], s=(1, 1), d=geo["d"], pad=pad_t, g=geo["g"],
                L=geo["g"] * Cg, OH=geo["H"], OW=geo["W"])


def _flipped(weight, g, dt):
    """The flipped, transposed kernel of grad_x's convolution: (g * Cg, Lg, kH, kW) with
    [g * Cg + c, l, i, j] = weight[g * Lg + l, c, kH - 1 - i, kW - 1 - j]."""
    L, Cg, kH, kW = weight.shape
    return np.ascontiguousarray(weight.reshape(g, L // g, Cg, kH, kW).transpose(0, 2, 1, 3, 4)
                                [..., ::-1, ::-1].reshape(g * Cg, L // g, kH, kW), dtype=dt)


def _direct_plan(geo, xc, wc, N, dt, has_bias, pool=None, keep=True):
    """The plan (see _ConvPlan) of a conv2d call by the direct kernels (see _use_direct):
    conv2d_direct's threads and scratch.  With pool, the kernels also max-pool each band of
    rows while it is in cache (windows that tile the output), which is kept only with keep."""
    (kH, kW), (sH, sW), (dH, dW), pad = geo["k"], geo["s"], geo["d"], geo["pad"]
    g, Cg, OH, OW, Lg = geo["g"], wc.shape[1], geo["OH"], geo["OW"], geo["L"] // geo["g"]
    team = _team(N * g * OH, N * geo["L"] * OH * OW * Cg * kH * kW)
    pkH = pool[0] if pool is not None else 0
    _, rows, Rb, Wp = _kernels.direct_geometry(N, g, Cg, xc.shape[2], xc.shape[3], kH, kW, sH,
                                               sW, pad[2], dH, dW, OH, OW, team, dt.itemsize,
                                               pkH, Lg)
    ncol = _kernels.direct_scratch(Cg, Rb, Wp, Lg, rows, OW, keep or pool is None,
                                   dt.itemsize)
    return _ConvPlan(dt, N, geo["L"], OH, OW, g, sH, sW, pad[0], pad[2], dH, dW, has_bias,
                     team, 0, pool, _kernels.gemm_level(), ncol,
                     _kernels.conv2d_direct[_CTYPE[dt.char]])


# Winograd's transformed (and packed) weights kept per Python thread for calls on at most
# this many images, where the transform is a large share of the call (a batch-1 64->64 3x3
# on 32x32: 11 % of it), from an array's second call on: the weight array's bytes are kept
# with them and compared (memcmp) on every call, so weights changed in place (an optimizer
# step) are transformed again.  An array found changed twice in a row (training) skips the
# cache for its next _WINO_SKIP calls (the compare and the copy cost a batch-1 training step
# 4-6 % without that; a 5x5 on one image runs the direct kernels meanwhile, _wino_changing:
# 64 calls rather than 16 took the LeNet-style model's batch-1 step from 0.984x to 0.994x
# the step without 5x5 Winograd).  At most _WINO_CACHE_BYTES per thread (weights, transform
# and packing), least recently used first out; _WINO_CACHE_MAX_N = 0 turns it off.
_WINO_CACHE_MAX_N = 4
_WINO_CACHE_BYTES = 32 << 20
_WINO_SKIP = 64
_wino_cache = threading.local()


def _wino_state():
    """This thread's cache: (entries by key, keys of arrays seen once), both oldest first."""
    st = _wino_cache.__dict__
    if "entries" not in st:
        st["entries"], st["seen"] = collections.OrderedDict(), collections.OrderedDict()
    return st["entries"], st["seen"]


def _wino_changing(weight, groups, dt):
    """Whether conv2d on one image should skip 5x5 Winograd this call: the transform cache
    found this weight array changed on each of its last calls (an optimizer step between
    them) and skips it for a while (_WINO_SKIP calls, counted down here too).  A batch-1 5x5
    that transforms its weights every call loses to the direct kernels (LeNet-style model's
    training step at batch 1 0.97-0.98x with Winograd every call; Zen 3, 2026-12-05), where
    with the transform kept it is 1.15-1.22x them."""
    if (_WINO_CACHE_MAX_N < 1 or type(weight) is not np.ndarray or weight.ndim != 4
            or weight.shape[2] != 5 or weight.dtype != dt or not weight.flags.c_contiguous):
        return False
    entries, _ = _wino_state()
    e = entries.get((_kernels.address(weight), weight.shape, dt.char, groups,
                     _kernels.transform_tag()))
    if e is None or e["skip"] <= 0:
        return False
    e["skip"] -= 1
    return True


def _wino_weights(wc, groups, dt, fn, cache):
    """(u, wpack, ready, entry) for the Winograd kernel: ready when u and wpack already hold
    the transform of wc's bytes; entry, when not ready, is the cache entry to complete once
    the kernel has filled them (None: not cached)."""
    Cg, Lg, a = wc.shape[1], wc.shape[0] // groups, (wc.shape[2] + 1) ** 2
    e = None
    if cache:
        entries, seen = _wino_state()
        key = (_kernels.address(wc), wc.shape, dt.char, groups, _kernels.transform_tag())
        e = entries.get(key)
        if e is not None:
            entries.move_to_end(key)
            if e["skip"] > 0:                       # changing every call: not cached now
                e["skip"] -= 1
                e = None
            elif e["ready"] and _kernels.same_data(e["w"], wc):
                e["changed"] = 0
                return e["u"], e["pack"], True, None
            elif e["ready"]:                        # changed in place since it was kept
                e["changed"] += 1
                if e["changed"] >= 2:
                    e["changed"], e["skip"], e["ready"] = 0, _WINO_SKIP, False
                    e = None
        elif key not in seen:
            # first sight of this array: noted only (an array made anew for every call, as
            # by w = w - lr * g, would otherwise cost a new entry per call)
            seen[key] = None
            if len(seen) > 64:
                seen.popitem(last=False)
        else:
            del seen[key]
            nu, npk = a * wc.shape[0] * Cg, a * groups * _kernels.gemm_packed_size(Lg, Cg)
            e = {"w": np.empty(wc.size, dt), "u": _alloc((nu,), dt, fn, "Winograd weights"),
                 "pack": _alloc((npk,), dt, fn, "Winograd weights") if npk else
                 _EMPTY[dt.char], "changed": 0, "skip": 0}
            e["bytes"] = e["w"].nbytes + e["u"].nbytes + e["pack"].nbytes
            if e["bytes"] > _WINO_CACHE_BYTES:
                return e["u"], e["pack"], False, None
            entries[key] = e
            total = sum(v["bytes"] for v in entries.values())
            while total > _WINO_CACHE_BYTES:
                total -= entries.popitem(last=False)[1]["bytes"]
    if e is None:
        return (_alloc((a * wc.shape[0] * Cg,), dt, fn, "Winograd weights"),
                _wpack(Lg, Cg, a * groups, dt, fn), False, None)
    e["ready"] = False
    return e["u"], e["pack"], False, e


def _winograd(xc, wc, bc, out, pad_top, pad_left, groups, team, dt, fn, cache=False,
              relu=False, pool=None, size=None):
    """out = the 3x3 or 5x5 stride-1 convolution of xc by wc (+ bc) with these top/left
    paddings (negative: cropping), by the Winograd kernel (BLAS held at one thread when it
    does the GEMMs, that is without the own GEMM).  cache: wc is the caller's own weight
    array, whose transform may be kept for the next call (see _WINO_CACHE_MAX_N).  5x5 only:
    relu, max(out, 0) fused into the output transform; pool, an array that also receives
    the 2x2 stride-2 max-pool of out, computed there (out None: not stored; size: (OH, OW))."""
    Cg, Lg, r = wc.shape[1], wc.shape[0] // groups, wc.shape[2]
    OH, OW = out.shape[2:] if out is not None else size
    scratch = _scratch(team, _wino_cols(r, Cg, Lg, OH, OW, dt, out is not None), dt, fn)
    u, wpack, ready, entry = _wino_weights(
        wc, groups, dt, fn, cache and 0 < xc.shape[0] <= _WINO_CACHE_MAX_N)
    with blas_threads(1) if not wpack.size else _NO_BLAS:
        _kernels.conv2d_winograd_forward(xc, wc, bc, out, u, wpack, scratch, pad_top, pad_left,
                                         groups, bc.shape[0] > 0, team, ready, relu, pool,
                                         OH, OW)
    if entry is not None:
        _wino_kept(entry, wc)


def _wino_cols(r, Cg, Lg, OH, OW, dt, keep):
    """A thread's scratch row for conv2d_winograd_forward (see there)."""
    tiles = ((OH + 1) // 2) * ((OW + 1) // 2)
    return max((r + 1) ** 2 * (_col_ld(tiles, dt) * (Cg + Lg) + 32),
               r * r * Cg * _col_ld(OH * OW, dt) + (0 if keep else Lg * OH * OW))


def _wino_kept(entry, wc):
    """The cache entry of _wino_weights now holds the transform of wc's bytes (the kernel
    made it): keep them with it."""
    np.copyto(entry["w"], wc.reshape(-1))
    entry["ready"] = True


def _col_ld(P, dtype):
    """Row stride of an im2col matrix with P columns: the kernels' col_ld (one cache line
    more when rows would be a multiple of 512 bytes apart)."""
    itemsize = dtype.itemsize if isinstance(dtype, np.dtype) else np.dtype(dtype).itemsize
    return P + 64 // itemsize if (P * itemsize) % 512 == 0 else P


def _is_direct(geo, x):
    """1x1, stride 1, unpadded, same plane in and out (no output_padding): no im2col needed;
    the kernels make the same decision."""
    return (geo["k"] == (1, 1) and geo["s"] == (1, 1) and geo["pad"] == (0, 0, 0, 0)
            and (geo["OH"], geo["OW"]) == x.shape[2:])


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, out=None):
    """2-D convolution (cross-correlation) of a batch of images, as ``torch.nn.functional.conv2d``.

    ``y[n, l, i, j] = bias[l] + sum_{c, a, b} weight[l, c, a, b] *
    x[n, g*C/groups + c, i*sH - pH + a*dH, j*sW - pW + b*dW]`` where ``g`` is the group of
    output channel ``l`` and ``x`` is zero outside the image.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
        Input batch, float32 or float64 (integers are converted to float64).
    weight : ndarray of shape (L, C / groups, kH, kW)
        Filters, PyTorch's layout.
    bias : ndarray of shape (L,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int), 'valid' or 'same'
        Zero padding on each side; ``'same'`` (stride 1 only) pads ``dilation * (k - 1)`` in
        all, the extra element at the bottom/right, as PyTorch.
    groups : int
        C and L must both be divisible by ``groups``.
    out : ndarray of shape (N, L, OH, OW), optional, keyword-only
        Array to write the result into, as NumPy's ufuncs: exactly the result's dtype and
        shape (no casting), C-contiguous and writeable, else TypeError/ValueError.  It may
        overlap the inputs (the result is then computed into a temporary and copied, so the
        answer is the same).  The function returns ``out`` itself.

    Returns
    -------
    y : ndarray of shape (N, L, OH, OW)
        ``OH = (H + 2 pH - dH (kH - 1) - 1) // sH + 1``, likewise OW; ``out`` when given.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> w = np.ones((1, 1, 2, 2), np.float32)
    >>> fc.conv2d(x, w, stride=2)
    array([[[[10., 18.],
             [42., 50.]]]], dtype=float32)
    >>> y = np.empty((1, 1, 2, 2), np.float32)      # e.g. allocated once, outside a loop
    >>> fc.conv2d(x, w, stride=2, out=y) is y
    True
    >>> y[0, 0]
    array([[10., 18.],
           [42., 50.]], dtype=float32)
    """
    return _conv2d(x, weight, bias, stride, padding, dilation, groups, out, False)


def _conv2d(x, weight, bias, stride, padding, dilation, groups, out, relu, pool=None,
            keep=True):
    """conv2d, followed by max(y, 0) when relu: fused into the own GEMM's micro-kernel (as
    the result is stored), the direct kernels' tiles and 5x5 Winograd's output transform, or
    after each image on the BLAS path, else (3x3 Winograd, depthwise) one in-place pass;
    nn.Sequential uses it for Conv2d -> ReLU.

    pool=(kH, kW): also a max-pool of the result with windows that tile it (stride = kernel,
    no padding, floor mode; nn.Sequential's Conv2d -> [ReLU ->] MaxPool2d): returns
    (y, pooled), y None unless keep.  The own GEMM and the direct kernels pool each block of
    the convolution while it is in cache, 5x5 Winograd each output tile (a 2x2 window) in
    its output transform (without keep, y is never stored); the other paths call
    max_pool2d."""
    fn = "conv2d"
    x, weight = _array(x, "x", fn), _array(weight, "weight", fn)
    key = _plan_key(x, weight, bias, stride, padding, dilation, groups, out, pool, keep)
    plan = _PLANS.get(key) if key is not None else None
    changing = False
    if plan is not None and plan.level == _kernels.gemm_level():
        if type(plan) is not _WinoPlan:
            return _conv2d_own(plan, x, weight, bias, relu, keep)
        changing = plan.N == 1 and _wino_changing(weight, plan.g, plan.dt)   # (5x5)
        if not changing:
            return _conv2d_wino(plan, x, weight, bias, relu, keep)
        plan = _PLANS.get(key + ("changing",))       # the call's other plan (see below)
        if plan is not None and plan.level == _kernels.gemm_level():
            return _conv2d_own(plan, x, weight, bias, relu, keep)
    geo = _conv_setup(fn, x, weight, stride, padding, dilation, groups)
    b = _bias(bias, geo["L"], fn)
    dt = _float_dtype(fn, [("x", x), ("weight", weight)] + ([("bias", b)] if b is not None
                                                           else []))
    N, L, OH, OW = x.shape[0], geo["L"], geo["OH"], geo["OW"]
    if pool is not None:        # (no out=: Sequential's use)
        pkH, pkW = pool
        if OH < pkH or OW < pkW:     # the max-pool's own error
            y = _conv2d(x, weight, bias, stride, padding, dilation, groups, out, relu)
            return y, max_pool2d(y, pool)
    done = None
    if pool is None or keep:
        out, done = _out(out, (N, L, OH, OW), dt, fn, x, weight, b)
    g = geo["g"]
    K = weight.shape[1] * weight.shape[2] * weight.shape[3]
    depthwise = _is_depthwise(geo, weight)
    wino = not depthwise and _use_winograd(geo, weight, n=N)
    if wino and N == 1 and not changing and plan is None:
        changing = _wino_changing(weight, g, dt)
    if changing:
        # batch 1 with weights that change every call (training): the direct kernels or the
        # GEMM this time, their plan kept beside the Winograd one (see _wino_changing)
        wino, key = False, None if key is None else key + ("changing",)
    direct = not (depthwise or wino) and _use_direct(geo, weight.shape[1], dt, pool, N)
    wpack = _EMPTY[dt.char] if depthwise or wino or direct else _wpack(L // g, K, g, dt, fn)
    # 5x5 Winograd pools 2x2 windows in its output transform (its output tiles are them)
    wino_pool = wino and pool == (2, 2) and weight.shape[2] == 5
    if pool is not None and not direct and not wino_pool and (depthwise or wino or
                                                              not wpack.size):
        y = _conv2d(x, weight, bias, stride, padding, dilation, groups, out, relu)
        return (y if keep else None), max_pool2d(y, pool)
    if pool is not None:
        pooled = _alloc((N, L, OH // pkH, OW // pkW), dt, fn, "pooled output")
        if N == 0:
            return (out if keep else None), pooled
    elif N == 0:
        return done(out)
    xc, wc = _c(x, dt), _c(weight, dt)
    bc = _c(b, dt) if b is not None else np.zeros(0, dt)
    (sH, sW), (dH, dW), pad = geo["s"], geo["d"], geo["pad"]
    if depthwise:
        _kernels.depthwise_forward(xc, wc, bc, out, sH, sW, pad[0], pad[2], dH, dW,
                                   b is not None, _team(N * L, N * L * OH * OW * K))
        return done(_relu_inplace(out) if relu else out)
    if direct:
        plan = _direct_plan(geo, xc, wc, N, dt, b is not None, pool, keep)
        _keep_plan(key, plan)
        return _conv2d_own(plan, xc, wc, bc, relu, keep, out, done,
                           pooled if pool is not None else None)
    team, nblas = _threads(N * g, N * L * OH * OW * K)
    if wino:
        # fewer images than threads: the kernel shares each image's work among them
        plan = _WinoPlan(dt, N, L, OH, OW, g, pad[0], pad[2], b is not None,
                         _team(16 * N * g, N * L * OH * OW * K), pool, _kernels.gemm_level())
        _keep_plan(key, plan)                   # (no key with out=)
        return _conv2d_wino(plan, xc, wc, bc, relu, keep, out, done,
                            pooled if pool is not None else None, weight)
    direct = _is_direct(geo, x)
    if wpack.size:
        # the own GEMM: im2col one block of columns at a time; threads share images by blocks
        itemsize = np.dtype(dt).itemsize
        team, nblas = _threads(N * g * -(-OH * OW // _kernels.gemm_nr(itemsize)),
                               N * L * OH * OW * K)
        pkH = pool[0] if pool is not None else 0
        ncol = _kernels.conv_block_scratch(K, OH * OW, L // g, N * g, team, dt.itemsize,
                                           pkH * OW, direct, keep)
        plan = _ConvPlan(dt, N, L, OH, OW, g, sH, sW, pad[0], pad[2], dH, dW, b is not None,
                         team, wpack.size, pool, _kernels.gemm_level(), ncol,
                         _kernels.conv2d_forward[_CTYPE[dt.char]])
        _keep_plan(key, plan)
        return _conv2d_own(plan, xc, wc, bc, relu, keep, out, done,
                           pooled if pool is not None else None)
    scratch = _scratch(team, 0 if direct else K * _col_ld(OH * OW, dt), dt, fn)
    with blas_threads(nblas):
        _kernels.conv2d_forward(xc, wc, bc, out, scratch, wpack, sH, sW, pad[0], pad[2],
                                dH, dW, g, b is not None, team, relu)
    return done(out)


# conv2d's calls by the own GEMM or the direct kernels: everything the checks and choices of
# a call decided, by its arguments' shapes, dtypes and plain values and the settings that
# steer the choices (_PLANS, keyed by _plan_key).  A call that finds its plan is only
# converted and allocated for: ~10 us less of a batch-1 layer's ~13 us of Python (LeNet-style
# model, 2026-12-04).  kern: the kernel specialised for dt, conv2d_forward (nwpack > 0 values
# of packed weights) or conv2d_direct (nwpack 0); ncol: a thread's scratch row.
_ConvPlan = collections.namedtuple("_ConvPlan", "dt N L OH OW g sH sW pT pL dH dW has_bias "
                                                "team nwpack pool level ncol kern")
_PLANS = {}


def _keep_plan(key, plan):
    if key is not None:
        if len(_PLANS) >= _SETUPS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan


def _plan_key(x, weight, bias, stride, padding, dilation, groups, out, pool, keep):
    """_PLANS' key of a conv2d call, or None for a call that is never planned (out=, a bias
    that is not an ndarray, arguments that are not plain ints / pairs).  It holds all that
    the checks look at, so only a valid call finds a plan; the GEMM level a plan was made at
    is compared once it is found (the kernels are not touched before the checks)."""
    if (out is not None or (bias is not None and type(bias) is not np.ndarray)
            or _plain(stride) is None or _plain(padding) is None or _plain(dilation) is None
            or type(groups) is not int or (pool is not None and type(pool) is not tuple)):
        return None
    return (x.shape, x.dtype.char, weight.shape, weight.dtype.char,
            None if bias is None else (bias.shape, bias.dtype.char), stride, padding,
            dilation, groups, pool, keep) + _knobs()


def _knobs():
    """The settings that steer the forward functions' choices of kernel, threads and path
    (plans made under other settings are not used)."""
    return (get_num_threads(), _GRAIN, _DIRECT, _DEPTHWISE, _WINOGRAD_MIN_CHANNELS,
            _WINOGRAD_MIN_SIZE, _WINOGRAD5, _LINEAR_OWN_ROWS)


def _conv2d_wino(plan, x, weight, bias, relu, keep, out=None, done=None, pooled=None,
                 own=None):
    """The Winograd kernel call of a plan (out, done, pooled: from the first call, which made
    them, and own: the caller's weight array; else allocated here).  5x5: the ReLU and the
    pool (2x2) in the output transform."""
    dt, N, L, OH, OW = plan.dt, plan.N, plan.L, plan.OH, plan.OW
    xc, wc = _c(x, dt), _c(weight, dt)
    bc = _c(bias, dt) if plan.has_bias else _EMPTY[dt.char]
    if out is None and (keep or plan.pool is None):
        out = np.empty((N, L, OH, OW), dt)
    if plan.pool is not None and pooled is None:
        pooled = np.empty((N, L, OH // 2, OW // 2), dt)
    fuse = relu and wc.shape[2] == 5
    _winograd(xc, wc, bc, out if keep or plan.pool is None else None, plan.pT, plan.pL,
              plan.g, plan.team, dt, "conv2d", cache=wc is (weight if own is None else own),
              relu=fuse, pool=pooled, size=(OH, OW))
    if plan.pool is not None:
        return (out if keep else None), pooled
    out = _relu_inplace(out) if relu and not fuse else out
    return done(out) if done is not None else out


# conv2d's calls by Winograd: as _ConvPlan (the kernel is always conv2d_winograd_forward)
_WinoPlan = collections.namedtuple("_WinoPlan", "dt N L OH OW g pT pL has_bias team pool "
                                                "level")


def _conv2d_own(plan, x, weight, bias, relu, keep, out=None, done=None, pooled=None):
    """The kernel call of a plan (out, done, pooled: from the first call, which made them;
    else allocated here)."""
    dt, N, L, OH, OW = plan.dt, plan.N, plan.L, plan.OH, plan.OW
    xc, wc = _c(x, dt), _c(weight, dt)
    bc = _c(bias, dt) if plan.has_bias else _EMPTY[dt.char]
    if keep and out is None:
        out, done = np.empty((N, L, OH, OW), dt), None
    pkH, pkW = plan.pool if plan.pool is not None else (0, 0)
    if plan.pool is not None and pooled is None:
        pooled = np.empty((N, L, OH // pkH, OW // pkW), dt)
    scratch = _scratch(plan.team, plan.ncol, dt, "conv2d")
    if plan.nwpack:
        args = (xc, wc, bc, out if keep else None, scratch,
                _scratch(1, plan.nwpack, dt, "conv2d", "wpack")[0])
    else:
        args = (xc, wc, bc, out if keep else None, scratch)
    args += (plan.sH, plan.sW, plan.pT, plan.pL, plan.dH, plan.dW, plan.g, plan.has_bias,
             plan.team, relu)
    if plan.pool is None:
        plan.kern(*args)
        return done(out) if done is not None else out
    plan.kern(*args, pooled, pkH, pkW, OH, OW)
    if not keep:
        return None, pooled
    return (done(out) if done is not None else out), pooled


def _blocks_team(n):
    """Threads for an elementwise kernel over n values in blocks of 16384 (relu_inplace,
    relu_backward, sub_scaled)."""
    return _team(-(-n // 16384), n)


def _relu_inplace(y):
    """y = max(y, 0) in place (as nn.ReLU: NaN stays, -0 becomes +0); returns y."""
    _kernels.relu_inplace(y.reshape(-1), _blocks_team(y.size))
    return y


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    output_mask=(True, True, True)):
    """Gradients of :func:`conv2d` with respect to x, weight and bias.

    Parameters
    ----------
    grad_out : ndarray of shape (N, L, OH, OW)
        Gradient of the loss with respect to the output of ``conv2d(x, weight, ...)``.
    x : ndarray of shape (N, C, H, W)
    weight : ndarray of shape (L, C / groups, kH, kW)
    stride, padding, dilation, groups
        As given to :func:`conv2d`.
    output_mask : (bool, bool, bool), keyword-only
        Which of (grad_x, grad_weight, grad_bias) to compute; the others are returned as None
        (as ``torch.ops.aten.convolution_backward``).

    Returns
    -------
    grad_x : ndarray of shape (N, C, H, W)
    grad_weight : ndarray of shape (L, C / groups, kH, kW)
    grad_bias : ndarray of shape (L,)

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.ones((2, 1, 3, 3)); w = np.ones((1, 1, 2, 2))
    >>> gx, gw, gb = fc.conv2d_backward(np.ones((2, 1, 2, 2)), x, w)
    >>> gx[0, 0]
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    >>> gw[0, 0], gb
    (array([[8., 8.],
           [8., 8.]]), array([8.]))
    """
    fn = "conv2d_backward"
    grad_out = _array(grad_out, "grad_out", fn)
    x, weight = _array(x, "x", fn), _array(weight, "weight", fn)
    geo = _conv_setup(fn, x, weight, stride, padding, dilation, groups)
    N, L, OH, OW = x.shape[0], geo["L"], geo["OH"], geo["OW"]
    _grad_out(grad_out, (N, L, OH, OW), fn)
    need_x, need_w, need_b = _mask(output_mask, fn)
    dt = _float_dtype(fn, [("grad_out", grad_out), ("x", x), ("weight", weight)])
    g = geo["g"]
    K = weight.shape[1] * weight.shape[2] * weight.shape[3]
    gx = _alloc(x.shape, dt, fn, "grad_x") if need_x else None
    if _is_depthwise(geo, weight):
        gw = np.zeros(weight.shape, dt) if need_w else None
        gb = np.zeros(L, dt) if need_b else None
        if N > 0 and (need_x or need_w or need_b):
            (sH, sW), (dH, dW), pad = geo["s"], geo["d"], geo["pad"]
            empty = np.zeros(0, dt)
            _kernels.depthwise_backward(_c(grad_out, dt), _c(x, dt), _c(weight, dt),
                                        gx if need_x else _dummy(dt),
                                        gw.reshape(-1) if need_w else empty,
                                        gb if need_b else empty,
                                        sH, sW, pad[0], pad[2], dH, dW, need_x, need_w, need_b,
                                        _team(g, N * L * OH * OW * K))
        return gx, gw, gb
    gw = gb = None
    if N > 0 and need_w and _use_winograd_wgrad(geo, weight, N):
        done = _winograd_wgrad(grad_out, x, weight.shape, geo, need_b, dt, fn)
        if done is not None:                    # (else not finite: the usual way)
            (gw, gb), need_w, need_b = done, False, False
            if not need_x:
                return gx, gw, gb
    team, nblas = _threads(N * g, N * L * OH * OW * K)
    # fewer (image, group) items than threads: the kernel may share the weight gradient
    # among wteam threads by blocks of input channels
    wteam = _team(N * weight.shape[1], N * L * OH * OW * K) if need_w and N * g < \
        get_num_threads() else 0
    rows = max(team, wteam)
    direct = _is_direct(geo, x)
    ncol = 0 if direct or not (need_w or need_x) else K * _col_ld(OH * OW, dt)
    if need_w:   # grad_out's block transposed, for the weight gradient by the own GEMM
        ncol += _kernels.wgrad_scratch(L // g, OH * OW, dt.itemsize)
    scratch = _scratch(rows, ncol, dt, fn)
    wpart = _alloc((rows, L * K if need_w else 0), dt, fn, "weight-gradient partials", zero=True)
    bpart = _alloc((rows, L if need_b else 0), dt, fn, "bias-gradient partials", zero=True)
    if N > 0 and need_x and _use_winograd(geo, weight, backward=True, n=N):
        # grad_x is the stride-1 convolution of grad_out by the flipped, transposed kernel
        # with the complementary padding: Winograd too
        pad, kk = geo["pad"], weight.shape[2] - 1
        _winograd(_c(grad_out, dt), _flipped(weight, g, dt), np.zeros(0, dt), gx, kk - pad[0],
                  kk - pad[2], g, _team(16 * N * g, N * L * OH * OW * K), dt, fn)
        need_x = False
    elif N > 0 and need_x:
        geo_x = _xgrad_geometry(geo, weight.shape[1])
        if geo_x is not None and _use_direct(geo_x, L // g, dt, None, N):
            # the same convolution by the direct kernels (a 64->32 5x5 on 14x14: 1.33x the
            # GEMM + col2im it replaces)
            gyc, wf = _c(grad_out, dt), _flipped(weight, g, dt)
            _conv2d_own(_direct_plan(geo_x, gyc, wf, N, dt, False), gyc, wf, None, False,
                        True, gx)
            need_x = False
    wtrans = False
    if N > 0 and (need_x or need_w or need_b):
        gyc, wc = _c(grad_out, dt), _c(weight, dt)
        xc = _c(x, dt) if need_w or not need_x else _dummy(dt)
        (sH, sW), (dH, dW), pad = geo["s"], geo["d"], geo["pad"]
        with blas_threads(nblas):
            wpack = _wpack(K, L // g, g, dt, fn) if need_x else _EMPTY[np.dtype(dt).char]
            wtrans = _kernels.conv2d_backward(gyc, xc, wc, np.zeros(0, dt),
                                     gx if need_x else _dummy(dt), wpart, bpart, scratch,
                                     wpack, sH, sW, pad[0], pad[2], dH, dW, g,
                                     need_x, need_w, need_b, False, team, wteam)
    if need_w:
        gw = _wgrad_sum(wpart, weight.shape, g, K, wtrans, dt)
    if need_b:
        gb = _sum_partials(bpart, (L,), dt)
    return gx, gw, gb


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, *, out=None):
    """2-D transposed convolution, as ``torch.nn.functional.conv_transpose2d``.

    The adjoint of :func:`conv2d` with the same stride, padding, dilation and groups: each
    input pixel scatters ``x[n, c, i, j] * weight[c, o, a, b]`` to output pixel
    ``(i*sH - pH + a*dH, j*sW - pW + b*dW)``.

    Parameters
    ----------
    x : ndarray of shape (N, C_in, H, W)
    weight : ndarray of shape (C_in, C_out / groups, kH, kW)
        PyTorch's layout for transposed convolutions.
    bias : ndarray of shape (C_out,), optional
    stride, padding, output_padding, dilation : int or (int, int)
        ``output_padding`` must be smaller than the stride or the dilation.
    groups : int
    out : ndarray of shape (N, C_out, OH, OW), optional, keyword-only
        Array to write the result into, as NumPy's ufuncs: exactly the result's dtype and
        shape (no casting), C-contiguous and writeable, else TypeError/ValueError.  It may
        overlap the inputs (the result is then computed into a temporary and copied, so the
        answer is the same).  The function returns ``out`` itself.

    Returns
    -------
    y : ndarray of shape (N, C_out, OH, OW)
        ``OH = (H - 1) sH - 2 pH + dH (kH - 1) + output_padding + 1``, likewise OW; ``out``
        when given.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.array([[[[1., 2.], [3., 4.]]]])
    >>> fc.conv_transpose2d(x, np.ones((1, 1, 2, 2)), stride=2)
    array([[[[1., 1., 2., 2.],
             [1., 1., 2., 2.],
             [3., 3., 4., 4.],
             [3., 3., 4., 4.]]]])
    """
    fn = "conv_transpose2d"
    x, weight = _array(x, "x", fn), _array(weight, "weight", fn)
    geo = _conv_setup(fn, x, weight, stride, padding, dilation, groups, True, output_padding)
    b = _bias(bias, geo["L"], fn)
    dt = _float_dtype(fn, [("x", x), ("weight", weight)] + ([("bias", b)] if b is not None
                                                           else []))
    N, L, OH, OW = x.shape[0], geo["L"], geo["OH"], geo["OW"]
    out, done = _out(out, (N, L, OH, OW), dt, fn, x, weight, b)
    if N == 0:
        return done(out)
    g = geo["g"]
    K = weight.shape[1] * weight.shape[2] * weight.shape[3]
    team, nblas = _threads(N * g, N * x.shape[1] * x.shape[2] * x.shape[3] * K)
    ncol = 0 if _is_direct(geo, x) else K * _col_ld(x.shape[2] * x.shape[3], dt)
    scratch = _scratch(team, ncol, dt, fn)
    xc, wc = _c(x, dt), _c(weight, dt)
    bc = _c(b, dt) if b is not None else np.zeros(0, dt)
    (sH, sW), (dH, dW), pad = geo["s"], geo["d"], geo["pad"]
    empty = np.zeros((team, 0), dt)
    with blas_threads(nblas):
        # y = col2im(weight^T @ x): the data gradient of conv2d(y) -> x
        _kernels.conv2d_backward(xc, _dummy(dt), wc, bc, out, empty, empty, scratch,
                                 _wpack(K, x.shape[1] // g, g, dt, fn),
                                 sH, sW, pad[0], pad[2], dH, dW, g,
                                 True, False, False, b is not None, team)
    return done(out)


def conv_transpose2d_backward(grad_out, x, weight, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1, *, output_mask=(True, True, True)):
    """Gradients of :func:`conv_transpose2d` with respect to x, weight and bias.

    Parameters
    ----------
    grad_out : ndarray of shape (N, C_out, OH, OW)
    x : ndarray of shape (N, C_in, H, W)
    weight : ndarray of shape (C_in, C_out / groups, kH, kW)
    stride, padding, output_padding, groups, dilation
        As given to :func:`conv_transpose2d`.
    output_mask : (bool, bool, bool), keyword-only
        Which of (grad_x, grad_weight, grad_bias) to compute; the others are None.

    Returns
    -------
    grad_x : ndarray of shape (N, C_in, H, W)
    grad_weight : ndarray of shape (C_in, C_out / groups, kH, kW)
    grad_bias : ndarray of shape (C_out,)

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.ones((1, 1, 2, 2)); w = np.ones((1, 1, 2, 2))
    >>> gx, gw, gb = fc.conv_transpose2d_backward(np.ones((1, 1, 4, 4)), x, w, stride=2)
    >>> gx[0, 0], gb
    (array([[4., 4.],
           [4., 4.]]), array([16.]))
    """
    fn = "conv_transpose2d_backward"
    grad_out = _array(grad_out, "grad_out", fn)
    x, weight = _array(x, "x", fn), _array(weight, "weight", fn)
    geo = _conv_setup(fn, x, weight, stride, padding, dilation, groups, True, output_padding)
    N, L, OH, OW = x.shape[0], geo["L"], geo["OH"], geo["OW"]
    _grad_out(grad_out, (N, L, OH, OW), fn)
    need_x, need_w, need_b = _mask(output_mask, fn)
    dt = _float_dtype(fn, [("grad_out", grad_out), ("x", x), ("weight", weight)])
    g = geo["g"]
    K = weight.shape[1] * weight.shape[2] * weight.shape[3]
    team, nblas = _threads(N * g, N * x.shape[1] * x.shape[2] * x.shape[3] * K)
    Cin = x.shape[1]
    gx = _alloc(x.shape, dt, fn, "grad_x") if need_x else None
    ncol = (0 if _is_direct(geo, x) or not (need_x or need_w)
            else K * _col_ld(x.shape[2] * x.shape[3], dt))
    if need_w:   # x's block transposed, for the weight gradient by the own GEMM
        ncol += _kernels.wgrad_scratch(Cin // g, x.shape[2] * x.shape[3], dt.itemsize)
    scratch = _scratch(team, ncol, dt, fn)
    wpart = _alloc((team, Cin * K if need_w else 0), dt, fn, "weight-gradient partials",
                   zero=True)
    gyc = _c(grad_out, dt) if N > 0 else None
    wtrans = False
    if N > 0 and (need_x or need_w):
        (sH, sW), (dH, dW), pad = geo["s"], geo["d"], geo["pad"]
        with blas_threads(nblas):
            wpack = (_wpack(Cin // g, K, g, dt, fn) if need_x
                     else _EMPTY[np.dtype(dt).char])
            wtrans = _kernels.conv_transpose2d_backward(gyc, _c(x, dt), _c(weight, dt),
                                               gx if need_x else _dummy(dt), wpart, scratch,
                                               wpack, sH, sW, pad[0], pad[2], dH, dW, g,
                                               need_x, need_w, team)
    gw = gb = None
    if need_w:
        gw = _wgrad_sum(wpart, weight.shape, g, K, wtrans, dt)
    if need_b:
        gb = np.zeros(L, dt)
        if N > 0:
            _kernels.channel_sum(gyc.reshape(N, L, OH * OW), gb,
                                 _team(L, N * L * OH * OW))
    return gx, gw, gb


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------

def _pool_setup(fn, x, kernel_size, stride, padding, dilation, ceil_mode):
    _check_4d(x, "x", fn)
    k = _pair(kernel_size, "kernel_size", fn, 1)
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        s = k
    else:
        s = _pair(stride, "stride", fn, 1)
    p = _pair(padding, "padding", fn, 0)
    d = _pair(dilation, "dilation", fn, 1)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(f"{fn}: ceil_mode must be a bool, got {ceil_mode!r}")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"{fn}: padding must be at most half of kernel_size, got "
                         f"padding={p}, kernel_size={k}")
    return k, s, p, d, (_pool_out(fn, x, 0, k, s, p, d, ceil_mode),
                        _pool_out(fn, x, 1, k, s, p, d, ceil_mode))


def _pool_out(fn, x, i, k, s, p, d, ceil_mode):
    """Output size along dimension i (0: height, 1: width) of a pooling (PyTorch's rule)."""
    size = x.shape[2 + i]
    if d[i] * (k[i] - 1) > _INT_MAX:
        raise ValueError(f"{fn}: dilation={d} is too large for kernel_size={k}")
    num = size + 2 * p[i] - d[i] * (k[i] - 1) - 1 + (s[i] - 1 if ceil_mode else 0)
    o = num // s[i] + 1
    if ceil_mode and (o - 1) * s[i] >= size + p[i]:
        o -= 1
    if o < 1:
        dim = ("height", "width")[i]
        raise ValueError(f"{fn}: the output {dim} would be {o} (input shape {x.shape}, "
                         f"kernel_size={k}, stride={s}, padding={p}, dilation={d}); "
                         "it must be >= 1")
    return o


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, *, out=None):
    """2-D max pooling, as ``torch.nn.functional.max_pool2d``.

    Padding counts as -inf; on ties the first maximum (row-major in the window) wins, and NaN
    propagates, as PyTorch's CPU kernel.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        At most half the kernel size.
    dilation : int or (int, int)
    ceil_mode : bool
        Use ceil instead of floor for the output size; a window that would start in the right
        padding is dropped.
    return_indices : bool
        Also return the flat index ``h * W + w`` of each maximum within its input plane.
    out : ndarray of shape (N, C, OH, OW), optional, keyword-only
        Array to write the result into, as NumPy's ufuncs: exactly the result's dtype and
        shape (no casting), C-contiguous and writeable, else TypeError/ValueError.  It may
        overlap the inputs (the result is then computed into a temporary and copied, so the
        answer is the same).  The function returns ``out`` itself.
        With ``return_indices``, ``out`` must be a tuple ``(values, indices)`` (values of
        the result's dtype, indices int64, both of shape (N, C, OH, OW), not sharing memory
        with each other); either may be None to have that one allocated, as for a ufunc with
        two outputs; the function then returns ``(values, indices)`` made of those arrays.

    Returns
    -------
    y : ndarray of shape (N, C, OH, OW)
        ``out`` (or ``out[0]``) when given.
    indices : ndarray of int64, shape (N, C, OH, OW)
        Only when ``return_indices``; ``out[1]`` when given.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.arange(16.).reshape(1, 1, 4, 4)
    >>> fc.max_pool2d(x, 2)
    array([[[[ 5.,  7.],
             [13., 15.]]]])
    >>> fc.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)[1]
    array([[[[ 5,  7],
             [13, 15]]]])
    >>> y, i = np.empty((1, 1, 2, 2)), np.empty((1, 1, 2, 2), np.int64)
    >>> r = fc.max_pool2d(x, 2, return_indices=True, out=(y, i))
    >>> r[0] is y and r[1] is i, i.ravel()
    (True, array([ 5,  7, 13, 15]))
    """
    fn = "max_pool2d"
    x = _array(x, "x", fn)
    k, s, p, d, (OH, OW) = _pool_setup(fn, x, kernel_size, stride, padding, dilation, ceil_mode)
    dt = _float_dtype(fn, [("x", x)])
    N, C = x.shape[:2]
    oi = None
    if return_indices and out is not None:
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"{fn}: with return_indices=True, out must be a tuple (values, "
                            f"indices) of two arrays, got {type(out).__name__}")
        out, oi = out
        if isinstance(out, np.ndarray) and isinstance(oi, np.ndarray) and \
                np.may_share_memory(out, oi):
            raise ValueError(f"{fn}: out[0] (values) and out[1] (indices) share memory")
    names = ("out[0]", "out[1]") if return_indices else ("out", "out")
    out, done = _out(out, (N, C, OH, OW), dt, fn, x, name=names[0])
    if return_indices:
        idx, done_idx = _out(oi, (N, C, OH, OW), np.int64, fn, x, name=names[1],
                             what="indices")
    else:       # (the kernel writes no index then: one shared placeholder, no allocation)
        idx = _NO_INDICES
    if N > 0:
        _kernels.max_pool2d_forward(_c(x, dt), out, idx, k[0], k[1], s[0], s[1], p[0], p[1],
                                    d[0], d[1], bool(return_indices),
                                    _team(N * C, out.size * k[0] * k[1]))
    return (done(out), done_idx(idx)) if return_indices else done(out)


def max_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False):
    """Gradient of :func:`max_pool2d` with respect to x.

    Each output gradient goes to its window's maximum (recomputed from ``x`` with the same
    tie rule); overlapping windows accumulate.

    Parameters
    ----------
    grad_out : ndarray of shape (N, C, OH, OW)
    x : ndarray of shape (N, C, H, W)
    kernel_size, stride, padding, dilation, ceil_mode
        As given to :func:`max_pool2d`.

    Returns
    -------
    grad_x : ndarray of shape (N, C, H, W)

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.array([[[[1., 3.], [2., 0.]]]])
    >>> fc.max_pool2d_backward(np.array([[[[5.]]]]), x, 2)
    array([[[[0., 5.],
             [0., 0.]]]])
    """
    fn = "max_pool2d_backward"
    grad_out, x = _array(grad_out, "grad_out", fn), _array(x, "x", fn)
    k, s, p, d, (OH, OW) = _pool_setup(fn, x, kernel_size, stride, padding, dilation, ceil_mode)
    N, C = x.shape[:2]
    _grad_out(grad_out, (N, C, OH, OW), fn)
    dt = _float_dtype(fn, [("grad_out", grad_out), ("x", x)])
    gx = _alloc(x.shape, dt, fn, "grad_x")
    if N > 0:
        team = _team(N * C, grad_out.size * k[0] * k[1])
        _kernels.max_pool2d_backward(_c(grad_out, dt), _c(x, dt), gx,
                                     _thread_rows(team, 2 * OW, dt),
                                     _thread_rows(team, OW, np.int64),
                                     k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1], team)
    return gx


def _avg_setup(fn, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
               divisor_override):
    k, s, p, _, out = _pool_setup(fn, x, kernel_size, stride, padding, 1, ceil_mode)
    if not isinstance(count_include_pad, (bool, np.bool_)):
        raise TypeError(f"{fn}: count_include_pad must be a bool, got {count_include_pad!r}")
    div = 0
    if divisor_override is not None:
        div = _int(divisor_override, "divisor_override", fn)
        if div == 0:
            raise ValueError(f"{fn}: divisor_override must not be zero")
    return k, s, p, out, div


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None, *, out=None):
    """2-D average pooling, as ``torch.nn.functional.avg_pool2d``.

    The divisor is ``divisor_override`` when given; else, with ``count_include_pad``, the
    window's size clipped to the padded input (so a ceil_mode window hanging past the padding
    counts only up to it), and without it the number of input pixels in the window.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Zero padding, at most half the kernel size.
    ceil_mode, count_include_pad : bool
    divisor_override : int, optional
        Non-zero.
    out : ndarray of shape (N, C, OH, OW), optional, keyword-only
        Array to write the result into, as NumPy's ufuncs: exactly the result's dtype and
        shape (no casting), C-contiguous and writeable, else TypeError/ValueError.  It may
        overlap the inputs (the result is then computed into a temporary and copied, so the
        answer is the same).  The function returns ``out`` itself.

    Returns
    -------
    y : ndarray of shape (N, C, OH, OW)
        ``out`` when given.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.arange(16.).reshape(1, 1, 4, 4)
    >>> fc.avg_pool2d(x, 2)
    array([[[[ 2.5,  4.5],
             [10.5, 12.5]]]])
    >>> fc.avg_pool2d(np.ones((1, 1, 2, 2)), 2, stride=1, padding=1)[0, 0]
    array([[0.25, 0.5 , 0.25],
           [0.5 , 1.  , 0.5 ],
           [0.25, 0.5 , 0.25]])
    """
    fn = "avg_pool2d"
    x = _array(x, "x", fn)
    k, s, p, (OH, OW), div = _avg_setup(fn, x, kernel_size, stride, padding, ceil_mode,
                                        count_include_pad, divisor_override)
    dt = _float_dtype(fn, [("x", x)])
    N, C = x.shape[:2]
    out, done = _out(out, (N, C, OH, OW), dt, fn, x)
    if N > 0:
        _kernels.avg_pool2d_forward(_c(x, dt), out, k[0], k[1], s[0], s[1], p[0], p[1],
                                    bool(count_include_pad), div,
                                    _team(N * C, out.size * k[0] * k[1]))
    return done(out)


def avg_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    """Gradient of :func:`avg_pool2d` with respect to x.

    Parameters
    ----------
    grad_out : ndarray of shape (N, C, OH, OW)
    x : ndarray of shape (N, C, H, W)
        Only its shape and dtype are used.
    kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        As given to :func:`avg_pool2d`.

    Returns
    -------
    grad_x : ndarray of shape (N, C, H, W)

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> fc.avg_pool2d_backward(np.array([[[[4.]]]]), np.zeros((1, 1, 2, 2)), 2)
    array([[[[1., 1.],
             [1., 1.]]]])
    """
    fn = "avg_pool2d_backward"
    grad_out, x = _array(grad_out, "grad_out", fn), _array(x, "x", fn)
    k, s, p, (OH, OW), div = _avg_setup(fn, x, kernel_size, stride, padding, ceil_mode,
                                        count_include_pad, divisor_override)
    N, C = x.shape[:2]
    _grad_out(grad_out, (N, C, OH, OW), fn)
    dt = _float_dtype(fn, [("grad_out", grad_out), ("x", x)])
    gx = _alloc(x.shape, dt, fn, "grad_x")
    if N > 0:
        team = _team(N * C, grad_out.size * k[0] * k[1])
        _kernels.avg_pool2d_backward(_c(grad_out, dt), gx, _thread_rows(team, OW, dt),
                                     k[0], k[1], s[0], s[1], p[0], p[1],
                                     bool(count_include_pad), div, team)
    return gx


# --------------------------------------------------------------------------------------------
# nearest upsampling
# --------------------------------------------------------------------------------------------

def _scale(scale_factor, fn):
    vals = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * 2
    if len(vals) != 2:
        raise ValueError(f"{fn}: scale_factor must be an int or a pair of ints, "
                         f"got {scale_factor!r}")
    out = []
    for v in vals:
        if isinstance(v, (float, np.floating)) and not isinstance(v, bool):
            if not np.isfinite(v) or v != int(v):
                raise ValueError(f"{fn}: scale_factor must be integral (nearest upsampling "
                                 f"repeats pixels), got {scale_factor!r}")
            v = int(v)
        out.append(_int(v, "scale_factor", fn))
    if min(out) < 1:
        raise ValueError(f"{fn}: scale_factor must be >= 1, got {scale_factor!r}")
    return tuple(out)


def upsample_nearest2d(x, scale_factor, *, out=None):
    """Nearest-neighbour upsampling by integer factors, as
    ``torch.nn.functional.interpolate(x, scale_factor=s, mode='nearest')``.

    Every input pixel becomes an ``sH x sW`` block of equal values.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    scale_factor : int or (int, int)
        Positive integers (an integral float such as 2.0 is accepted).
    out : ndarray of shape (N, C, H * sH, W * sW), optional, keyword-only
        Array to write the result into, as NumPy's ufuncs: exactly the result's dtype and
        shape (no casting), C-contiguous and writeable, else TypeError/ValueError.  It may
        overlap the inputs (the result is then computed into a temporary and copied, so the
        answer is the same).  The function returns ``out`` itself.

    Returns
    -------
    y : ndarray of shape (N, C, H * sH, W * sW)
        ``out`` when given.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> fc.upsample_nearest2d(np.array([[[[1., 2.]]]]), (2, 1))
    array([[[[1., 2.],
             [1., 2.]]]])
    """
    fn = "upsample_nearest2d"
    x = _array(x, "x", fn)
    _check_4d(x, "x", fn)
    sH, sW = _scale(scale_factor, fn)
    dt = _float_dtype(fn, [("x", x)])
    N, C, H, W = x.shape
    out, done = _out(out, (N, C, H * sH, W * sW), dt, fn, x)
    if N > 0:
        _kernels.upsample_nearest2d_forward(_c(x, dt), out, sH, sW, _team(N * C * H, out.size))
    return done(out)


def upsample_nearest2d_backward(grad_out, scale_factor):
    """Gradient of :func:`upsample_nearest2d`: each block of ``grad_out`` summed.

    Parameters
    ----------
    grad_out : ndarray of shape (N, C, H * sH, W * sW)
    scale_factor : int or (int, int)

    Returns
    -------
    grad_x : ndarray of shape (N, C, H, W)

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> fc.upsample_nearest2d_backward(np.ones((1, 1, 2, 4)), 2)
    array([[[[4., 4.]]]])
    """
    fn = "upsample_nearest2d_backward"
    grad_out = _array(grad_out, "grad_out", fn)
    _check_4d(grad_out, "grad_out", fn)
    sH, sW = _scale(scale_factor, fn)
    N, C, OH, OW = grad_out.shape
    if OH % sH or OW % sW:
        raise ValueError(f"{fn}: grad_out of shape {grad_out.shape} is not an upsampled shape "
                         f"for scale_factor={(sH, sW)} (height and width must be multiples)")
    dt = _float_dtype(fn, [("grad_out", grad_out)])
    gx = _alloc((N, C, OH // sH, OW // sW), dt, fn, "grad_x")
    if N > 0:
        _kernels.upsample_nearest2d_backward(_c(grad_out, dt), gx, sH, sW,
                                             _team(N * C * OH // sH, grad_out.size))
    return gx


# --------------------------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def _ce_setup(fn, logits, target, weight, reduction, label_smoothing, ignore_index):
    logits = _array(logits, "logits", fn)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"{fn}: logits must be 2-D (N, C) with C >= 1, got shape "
                         f"{logits.shape}")
    N, C = logits.shape
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, (bool, np.bool_)) or not isinstance(
            label_smoothing, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: label_smoothing must be a float, got {label_smoothing!r}")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, (bool, np.bool_)) or not hasattr(ignore_index, "__index__"):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    ignore_index = operator.index(ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"{fn}: ignore_index={ignore_index} does not fit in int64")
    target = _array(target, "target", fn)
    named = [("logits", logits)]
    if target.dtype.kind in "iu":
        if target.shape != (N,):
            raise ValueError(f"{fn}: integer target must be class labels of shape ({N},), "
                             f"got shape {target.shape} (logits shape {logits.shape})")
        bad = (target != ignore_index) & ((target < 0) | (target >= C))
        if bad.any():
            raise ValueError(f"{fn}: target labels must be in [0, {C}) or ignore_index="
                             f"{ignore_index}; got {target[bad][0]} (logits shape "
                             f"{logits.shape})")
        probs = False
    elif target.dtype.kind == "f":
        if target.shape != (N, C):
            raise ValueError(f"{fn}: floating target must be class probabilities of the "
                             f"logits' shape {logits.shape}, got shape {target.shape}")
        if ignore_index != -100:
            raise ValueError(f"{fn}: ignore_index={ignore_index} is not supported with "
                             "probability targets (as PyTorch)")
        named.append(("target", target))
        probs = True
    else:
        raise TypeError(f"{fn}: target must hold integer labels or float probabilities, got "
                        f"dtype {target.dtype}")
    w = None
    if weight is not None:
        w = _array(weight, "weight", fn)
        if w.shape != (C,):
            raise ValueError(f"{fn}: weight must have shape ({C},) (one per class), got "
                             f"{w.shape}")
        named.append(("weight", w))
    dt = _float_dtype(fn, named)
    lc = _c(logits, dt)
    tc = _c(target, dt) if probs else np.ascontiguousarray(target, dtype=np.int64)
    wc = _c(w, dt) if w is not None else np.ones(logits.shape[1], dt)
    return dt, lc, tc, wc, w is not None, probs, eps, ignore_index


def cross_entropy(logits, target, weight=None, reduction="mean", label_smoothing=0.0,
                  ignore_index=-100, *, out=None):
    """Categorical cross-entropy from logits, as ``torch.nn.functional.cross_entropy``.

    ``loss_n = -sum_j w_j t_nj log softmax(logits_n)_j`` with ``t`` the one-hot label (or the
    given probabilities), smoothed to ``t (1 - eps) + eps / C``.  Computed with log-sum-exp,
    so large logits do not overflow.

    Parameters
    ----------
    logits : ndarray of shape (N, C)
    target : ndarray of int of shape (N,), or of float of shape (N, C)
        Class labels in ``[0, C)`` (or ``ignore_index``), or class probabilities.
    weight : ndarray of shape (C,), optional
        Per-class weights.
    reduction : {'mean', 'sum', 'none'}
        'mean' divides by the summed weights of the (non-ignored) labels, or by N for
        probability targets, as PyTorch.
    label_smoothing : float in [0, 1]
    ignore_index : int
        Label whose samples contribute nothing (integer targets only).
    out : ndarray of shape () or (N,), optional, keyword-only
        Array to write the result into, as NumPy's ufuncs: exactly the result's dtype and
        shape (no casting), C-contiguous and writeable, else TypeError/ValueError.  It may
        overlap the inputs (the result is then computed into a temporary and copied, so the
        answer is the same).  The function returns ``out`` itself.
        Its shape is the result's: () (a 0-d array) for 'mean' and 'sum', (N,) for 'none'.
        (Temporary (N,) arrays remain: the per-sample losses for 'mean' and 'sum', and the
        label weights for integer targets.)

    Returns
    -------
    loss : scalar of the logits' dtype, or ndarray of shape (N,) for reduction='none'
        ``out`` when given (a 0-d array for 'mean' and 'sum').

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    >>> round(float(fc.cross_entropy(logits, np.array([0, 1]))), 6)
    0.126928
    >>> fc.cross_entropy(logits, np.array([0, 0]), reduction='none').round(6)
    array([0.126928, 2.126928])
    >>> total = np.empty(())
    >>> fc.cross_entropy(logits, np.array([0, 0]), reduction='sum', out=total) is total
    True
    >>> round(float(total), 6)
    2.253856
    """
    fn = "cross_entropy"
    dt, lc, tc, wc, has_w, probs, eps, ign = _ce_setup(fn, logits, target, weight, reduction,
                                                       label_smoothing, ignore_index)
    N = lc.shape[0]
    loss, done = _out(out, (N,) if reduction == "none" else (), dt, fn, lc, tc, wc, zero=True)
    if reduction != "none":
        loss = np.zeros(N, dt)
    denom = None
    if N > 0:
        if probs:
            _kernels.cross_entropy_probs(lc, tc, wc, eps, loss, _team(N, 8 * lc.size))
        else:
            denom = np.zeros(N, dt)
            _kernels.cross_entropy_labels(lc, tc, wc, eps, ign, loss, denom,
                                          _team(N, 8 * lc.size))
    if reduction == "none":
        return done(loss)
    total = loss.sum(dtype=np.float64)
    if reduction == "sum":
        return done(dt.type(total))
    count = float(N) if probs or N == 0 else denom.sum(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return done(dt.type(np.float64(total) / np.float64(count)))


def cross_entropy_backward(logits, target, weight=None, reduction="mean", label_smoothing=0.0,
                           ignore_index=-100, grad_output=None):
    """Gradient of :func:`cross_entropy` with respect to the logits.

    Parameters
    ----------
    logits, target, weight, reduction, label_smoothing, ignore_index
        As given to :func:`cross_entropy`.
    grad_output : float or ndarray of shape (N,), optional
        Gradient of the final objective with respect to the loss: a scalar for 'mean'/'sum'
        (default 1), an (N,) array for 'none' (default ones).

    Returns
    -------
    grad_logits : ndarray of shape (N, C)

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> fc.cross_entropy_backward(np.zeros((2, 2)), np.array([0, 1]))
    array([[-0.25,  0.25],
           [ 0.25, -0.25]])
    """
    fn = "cross_entropy_backward"
    dt, lc, tc, wc, has_w, probs, eps, ign = _ce_setup(fn, logits, target, weight, reduction,
                                                       label_smoothing, ignore_index)
    N = lc.shape[0]
    if reduction == "none":
        go = np.ones(N) if grad_output is None else _array(grad_output, "grad_output", fn)
        if go.shape != (N,):
            raise ValueError(f"{fn}: grad_output must have shape ({N},) for reduction='none', "
                             f"got {go.shape}")
        scale = np.ascontiguousarray(go, dtype=np.float64)
    else:
        go = 1.0 if grad_output is None else _array(grad_output, "grad_output", fn)
        if np.ndim(go) != 0:
            raise ValueError(f"{fn}: grad_output must be a scalar for reduction={reduction!r}, "
                             f"got shape {np.shape(go)}")
        s = float(go)
        if reduction == "mean":
            if probs:
                s /= max(N, 1)
            elif N > 0:
                with np.errstate(divide="ignore", invalid="ignore"):
                    ys = tc[tc != ign]
                    den = (wc[ys].astype(np.float64).sum() if has_w else float(ys.size))
                    s = np.float64(s) / np.float64(den)
        scale = np.full(N, s, dtype=np.float64)
    grad = np.empty((N, lc.shape[1]), dt)      # the kernels write every element
    if N > 0:
        if probs:
            _kernels.cross_entropy_probs_backward(lc, tc, wc, eps, scale, grad,
                                                  _team(N, 8 * lc.size))
        else:
            _kernels.cross_entropy_labels_backward(lc, tc, wc, eps, ign, scale, grad,
                                                   _team(N, 8 * lc.size))
    return grad


# --------------------------------------------------------------------------------------------
# fully connected (nn.Linear's arithmetic; nn.Linear validates)
# --------------------------------------------------------------------------------------------

def _linear_sizes(fn, *shape):
    for d in shape:
        if d > _INT_MAX:
            raise ValueError(f"{fn}: size {d} of shape {shape} does not fit BLAS (< 2**31)")


# nn.Linear's forward: below this many rows dot products of x's rows with the weight's rows
# (LIN_ROWS), from it on the own GEMM (LIN_GEMM).  3136 -> 128 (LeNet's fc1), float32, 1 / 2
# threads, us: 4 rows 44 / 20 vs GEMM 85 / 53 (OpenBLAS 163 / 20); 12 rows 101 / 46 vs 123 /
# 78; 16 rows 139 / 63 vs 126 / 84; float64 16 rows 308 vs 284 (Xeon, 2026-12-04)
_LINEAR_OWN_ROWS = 16


def _linear(x2, weight, bias, relu=False):
    """x2 (N, I) @ weight (O, I)^T (+ bias (O,)), all of one float dtype, by the kernels'
    blocks on fastconv's threads with BLAS held at one thread (numpy's matmul would leave
    OpenBLAS threads spinning, slowing the next multi-threaded kernel by up to 2x); then
    max(y, 0) when relu (nn.Sequential's Linear -> ReLU)."""
    N, I = x2.shape
    O = weight.shape[0]
    dt = weight.dtype
    _linear_sizes("linear", N, I, O)
    if I == 0:
        out = _alloc((N, O), dt, "linear", "output")
        out[...] = 0 if bias is None else bias
        return _relu_inplace(out) if relu and out.size else out
    _check_size((N, O), dt.itemsize, "linear", "output")
    # (no BLAS call where there is an own GEMM level: holding BLAS at one thread cost 3 us)
    with blas_threads(1) if _kernels.gemm_level() == "blas" else _NO_BLAS:
        return _linear_run(_c(x2, dt), _c(weight, dt), None if bias is None else _c(bias, dt),
                           *_linear_plan(N, I, O), relu)


def _linear_plan(N, I, O):
    """(team, path) of linear_forward for an (N, I) @ (I, O) product."""
    return (_team(N * O, N * I * O),
            _kernels.LIN_GEMM if N >= _LINEAR_OWN_ROWS else _kernels.LIN_ROWS)


def _linear_run(x2, weight, bias, team, path, relu):
    """linear_forward into a new (N, O) array: C-contiguous arguments of one dtype, checked."""
    out = np.empty((x2.shape[0], weight.shape[0]), weight.dtype)
    _kernels.linear_forward(x2, weight, _EMPTY[weight.dtype.char] if bias is None else bias,
                            out, bias is not None, team, path, relu)
    return out


def _linear_backward(g2, x2, weight, need_w, need_x):
    """(grad_x2 (N, I) or None, grad_weight (O, I) or None) of _linear for grad_out g2
    (N, O)."""
    N, I = x2.shape
    O = weight.shape[0]
    dt = weight.dtype
    _linear_sizes("linear_backward", N, I, O)
    gw = _alloc((O, I), dt, "linear_backward", "weight gradient") if need_w else None
    gx = _alloc((N, I), dt, "linear_backward", "input gradient") if need_x else None
    if need_w or need_x:
        dummy = np.zeros((1, 1), dt)
        # one row: grad_w an outer product, grad_x w^T g, as scaled rows (LIN_ROWS: LeNet's
        # fc1, float64, 1 thread, 699 -> 335 us; float32 281 -> 148); from 2 rows on, sums of
        # N scaled rows by SSE2 lost to the GEMM (4 rows: 1061 vs 614 us)
        rows = N == 1
        npk = 0 if rows else _kernels.gemm_packed_size(O, N) + _kernels.gemm_packed_size(N, O)
        packed = (_scratch(1, npk, dt, "linear_backward", "lpack")[0] if npk
                  else _EMPTY[dt.char])
        with _NO_BLAS if rows else blas_threads(1):
            _kernels.linear_backward(_c(g2, dt), _c(x2, dt), _c(weight, dt),
                                     gw if need_w else dummy, gx if need_x else dummy,
                                     packed, need_w, need_x, _team(I, N * I * O),
                                     _kernels.LIN_ROWS if rows else _kernels.LIN_GEMM)
    return gx, gw
