"""Naive float64 reference implementation: the test oracle for fastconv.

Every function here is written directly from the mathematical definition of
the corresponding ``torch.nn.functional`` operation (NCHW layout, exactly
PyTorch's semantics), using one explicit Python ``for`` loop per index of the
formula.  NumPy is used only to store and allocate arrays, never to compute.
It is slow on purpose: it should be obviously right.

Each backward is written from its own formula (scatter/gather loops, or for
the losses the hand-derived analytic gradient); no function reuses another to
compute a gradient, so an error in one cannot hide an error in another.

All inputs are converted to float64; outputs are float64 arrays (int64 for
max-pool indices) or a Python float for scalar losses.
"""

import math

import numpy as np

__all__ = [
    "conv2d", "conv2d_backward",
    "conv_transpose2d", "conv_transpose2d_backward",
    "max_pool2d", "max_pool2d_backward",
    "avg_pool2d", "avg_pool2d_backward",
    "upsample_nearest2d", "upsample_nearest2d_backward",
    "cross_entropy", "cross_entropy_backward",
    "linear", "linear_backward",
]


# ---------------------------------------------------------------- helpers

def _pair(v):
    """int -> (v, v); a pair -> tuple of two ints."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError("expected an int or a pair, got %r" % (v,))
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _conv_padding(padding, kernel, dilation, stride):
    """Normalise conv2d padding to (top, bottom, left, right).

    Accepts an int, an (h, w) pair, a 4-tuple (top, bottom, left, right),
    'valid', or 'same' (stride 1 only; PyTorch puts total//2 on the
    top/left and the rest on the bottom/right, total = d*(k-1)).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if _pair(stride) != (1, 1):
                raise ValueError("padding='same' requires stride 1")
            kh, kw = kernel
            dh, dw = _pair(dilation)
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        raise ValueError("unknown padding string %r" % (padding,))
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        return tuple(int(p) for p in padding)
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


def _pool_out_size(size, k, s, p, d, ceil_mode):
    """PyTorch's pooling_output_shape."""
    num = size + 2 * p - d * (k - 1) - 1
    if ceil_mode:
        out = -((-num) // s) + 1  # ceil division
        if (out - 1) * s >= size + p:
            out -= 1
    else:
        out = num // s + 1
    return out


def _div(a, b):
    """IEEE division (0/0 -> nan, x/0 -> +-inf) on Python floats."""
    if b != 0:
        return a / b
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


# ---------------------------------------------------------------- conv2d

def _conv_geometry(H, W, kH, kW, stride, padding, dilation):
    """(stride pair, dilation pair, (top, bottom, left, right) padding, Ho, Wo) of conv2d."""
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    pt, pb, pl, pr = _conv_padding(padding, (kH, kW), dilation, stride)
    Ho = (H + pt + pb - dh * (kH - 1) - 1) // sh + 1
    Wo = (W + pl + pr - dw * (kW - 1) - 1) // sw + 1
    return (sh, sw), (dh, dw), (pt, pb, pl, pr), Ho, Wo


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """out[n,l,oh,ow] = b[l] + sum_{c,i,j} x[n, g*Cg+c, oh*sh-pt+i*dh, ow*sw-pl+j*dw] * w[l,c,i,j]."""
    x, w = _f64(x), _f64(weight)
    N, C, H, W = x.shape
    L, Cg, kH, kW = w.shape
    (sh, sw), (dh, dw), (pt, pb, pl, pr), Ho, Wo = _conv_geometry(
        H, W, kH, kW, stride, padding, dilation)
    Lg = L // groups
    out = np.zeros((N, L, Ho, Wo), dtype=np.float64)
    for n in range(N):
        for l in range(L):
            g = l // Lg
            for oh in range(Ho):
                for ow in range(Wo):
                    acc = 0.0 if bias is None else float(bias[l])
                    for c in range(Cg):
                        for i in range(kH):
                            ih = oh * sh - pt + i * dh
                            if ih < 0 or ih >= H:
                                continue
                            for j in range(kW):
                                iw = ow * sw - pl + j * dw
                                if iw < 0 or iw >= W:
                                    continue
                                acc += x[n, g * Cg + c, ih, iw] * w[l, c, i, j]
                    out[n, l, oh, ow] = acc
    return out


def conv2d_taps(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d's formula for shapes too large for the loops above: x zero-padded, then for each
    tap (i, j) one float64 product of the strided slice x_pad[n, g*Cg + c, oh*sh + i*dh,
    ow*sw + j*dw] with w[l, c, i, j], summed over the taps.  (tests/test_gemm.py checks it
    against conv2d on small shapes.)"""
    x, w = _f64(x), _f64(weight)
    N, C, H, W = x.shape
    L, Cg, kH, kW = w.shape
    (sh, sw), (dh, dw), (pt, pb, pl, pr), Ho, Wo = _conv_geometry(
        H, W, kH, kW, stride, padding, dilation)
    xp = np.zeros((N, C, H + pt + pb, W + pl + pr))
    xp[:, :, pt:pt + H, pl:pl + W] = x
    Lg = L // groups
    out = np.zeros((N, L, Ho, Wo))
    for g in range(groups):
        xg, wg = xp[:, g * Cg:(g + 1) * Cg], w[g * Lg:(g + 1) * Lg]
        for i in range(kH):
            for j in range(kW):
                patch = xg[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh,
                           j * dw:j * dw + sw * (Wo - 1) + 1:sw]
                out[:, g * Lg:(g + 1) * Lg] += np.einsum("nchw,lc->nlhw", patch, wg[:, :, i, j])
    if bias is not None:
        out += _f64(bias)[None, :, None, None]
    return out


def conv2d_weight_grad_taps(grad_out, x, weight_shape, stride=1, padding=0, dilation=1,
                            groups=1):
    """conv2d's weight gradient for shapes too large for the loops below:
    grad_w[l, c, i, j] = sum over n, oh, ow of grad_out[n, l, oh, ow] *
    x_pad[n, g*Cg + c, oh*sh + i*dh, ow*sw + j*dw], one float64 einsum per tap (i, j).
    (tests/test_gemm.py checks it against conv2d_backward on small shapes.)"""
    go, x = _f64(grad_out), _f64(x)
    N, C, H, W = x.shape
    L, Cg, kH, kW = weight_shape
    (sh, sw), (dh, dw), (pt, pb, pl, pr), Ho, Wo = _conv_geometry(
        H, W, kH, kW, stride, padding, dilation)
    xp = np.zeros((N, C, H + pt + pb, W + pl + pr))
    xp[:, :, pt:pt + H, pl:pl + W] = x
    Lg = L // groups
    gw = np.zeros((L, Cg, kH, kW))
    for g in range(groups):
        xg, gog = xp[:, g * Cg:(g + 1) * Cg], go[:, g * Lg:(g + 1) * Lg]
        for i in range(kH):
            for j in range(kW):
                patch = xg[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh,
                           j * dw:j * dw + sw * (Wo - 1) + 1:sw]
                gw[g * Lg:(g + 1) * Lg, :, i, j] = np.einsum("nlhw,nchw->lc", gog, patch)
    return gw


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1):
    """Returns (grad_x, grad_weight, grad_bias) of conv2d."""
    go, x, w = _f64(grad_out), _f64(x), _f64(weight)
    N, C, H, W = x.shape
    L, Cg, kH, kW = w.shape
    _, _, Ho, Wo = go.shape
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    pt, pb, pl, pr = _conv_padding(padding, (kH, kW), dilation, stride)
    Lg = L // groups

    # grad_x: scatter each output gradient back onto the inputs it read.
    grad_x = np.zeros_like(x)
    for n in range(N):
        for l in range(L):
            g = l // Lg
            for oh in range(Ho):
                for ow in range(Wo):
                    for c in range(Cg):
                        for i in range(kH):
                            for j in range(kW):
                                ih = oh * sh - pt + i * dh
                                iw = ow * sw - pl + j * dw
                                if 0 <= ih < H and 0 <= iw < W:
                                    grad_x[n, g * Cg + c, ih, iw] += go[n, l, oh, ow] * w[l, c, i, j]

    # grad_w[l,c,i,j] = sum_{n,oh,ow} go[n,l,oh,ow] * x[n, g*Cg+c, ih, iw]
    grad_w = np.zeros_like(w)
    for l in range(L):
        g = l // Lg
        for c in range(Cg):
            for i in range(kH):
                for j in range(kW):
                    acc = 0.0
                    for n in range(N):
                        for oh in range(Ho):
                            for ow in range(Wo):
                                ih = oh * sh - pt + i * dh
                                iw = ow * sw - pl + j * dw
                                if 0 <= ih < H and 0 <= iw < W:
                                    acc += go[n, l, oh, ow] * x[n, g * Cg + c, ih, iw]
                    grad_w[l, c, i, j] = acc

    # grad_b[l] = sum_{n,oh,ow} go[n,l,oh,ow]
    grad_b = np.zeros(L, dtype=np.float64)
    for l in range(L):
        acc = 0.0
        for n in range(N):
            for oh in range(Ho):
                for ow in range(Wo):
                    acc += go[n, l, oh, ow]
        grad_b[l] = acc
    return grad_x, grad_w, grad_b


# ---------------------------------------------------------------- conv_transpose2d

def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0,
                     groups=1, dilation=1):
    """out[n, g*Cog+co, ih*s-p+i*d, iw*s-p+j*d] += x[n,ci,ih,iw] * w[ci,co,i,j]."""
    x, w = _f64(x), _f64(weight)
    N, Cin, H, W = x.shape
    _, Cog, kH, kW = w.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    oph, opw = _pair(output_padding)
    dh, dw = _pair(dilation)
    Ho = (H - 1) * sh - 2 * ph + dh * (kH - 1) + oph + 1
    Wo = (W - 1) * sw - 2 * pw + dw * (kW - 1) + opw + 1
    Cig = Cin // groups
    Cout = Cog * groups
    out = np.zeros((N, Cout, Ho, Wo), dtype=np.float64)
    for n in range(N):
        for ci in range(Cin):
            g = ci // Cig
            for ih in range(H):
                for iw in range(W):
                    for co in range(Cog):
                        for i in range(kH):
                            for j in range(kW):
                                oh = ih * sh - ph + i * dh
                                ow = iw * sw - pw + j * dw
                                if 0 <= oh < Ho and 0 <= ow < Wo:
                                    out[n, g * Cog + co, oh, ow] += x[n, ci, ih, iw] * w[ci, co, i, j]
    if bias is not None:
        for n in range(N):
            for oc in range(Cout):
                for oh in range(Ho):
                    for ow in range(Wo):
                        out[n, oc, oh, ow] += float(bias[oc])
    return out


def conv_transpose2d_backward(grad_out, x, weight, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1):
    """Returns (grad_x, grad_weight, grad_bias) of conv_transpose2d."""
    go, x, w = _f64(grad_out), _f64(x), _f64(weight)
    N, Cin, H, W = x.shape
    _, Cog, kH, kW = w.shape
    _, Cout, Ho, Wo = go.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    Cig = Cin // groups

    # grad_x[n,ci,ih,iw] = sum_{co,i,j} go[n, g*Cog+co, oh, ow] * w[ci,co,i,j]  (gather)
    grad_x = np.zeros_like(x)
    for n in range(N):
        for ci in range(Cin):
            g = ci // Cig
            for ih in range(H):
                for iw in range(W):
                    acc = 0.0
                    for co in range(Cog):
                        for i in range(kH):
                            for j in range(kW):
                                oh = ih * sh - ph + i * dh
                                ow = iw * sw - pw + j * dw
                                if 0 <= oh < Ho and 0 <= ow < Wo:
                                    acc += go[n, g * Cog + co, oh, ow] * w[ci, co, i, j]
                    grad_x[n, ci, ih, iw] = acc

    # grad_w[ci,co,i,j] = sum_{n,ih,iw} x[n,ci,ih,iw] * go[n, g*Cog+co, oh, ow]
    grad_w = np.zeros_like(w)
    for ci in range(Cin):
        g = ci // Cig
        for co in range(Cog):
            for i in range(kH):
                for j in range(kW):
                    acc = 0.0
                    for n in range(N):
                        for ih in range(H):
                            for iw in range(W):
                                oh = ih * sh - ph + i * dh
                                ow = iw * sw - pw + j * dw
                                if 0 <= oh < Ho and 0 <= ow < Wo:
                                    acc += x[n, ci, ih, iw] * go[n, g * Cog + co, oh, ow]
                    grad_w[ci, co, i, j] = acc

    # grad_b[oc] = sum_{n,oh,ow} go[n,oc,oh,ow]
    grad_b = np.zeros(Cout, dtype=np.float64)
    for oc in range(Cout):
        acc = 0.0
        for n in range(N):
            for oh in range(Ho):
                for ow in range(Wo):
                    acc += go[n, oc, oh, ow]
        grad_b[oc] = acc
    return grad_x, grad_w, grad_b


# ---------------------------------------------------------------- max_pool2d

def _max_pool_argmax(plane, oh, ow, H, W, k, s, p, d):
    """PyTorch CPU rule: row-major scan, update on `val > maxval or isnan(val)`,
    starting from maxval=-inf and maxindex = first in-bounds position."""
    (kH, kW), (sh, sw), (ph, pw), (dh, dw) = k, s, p, d
    ih0, iw0 = oh * sh - ph, ow * sw - pw
    ih1 = min(ih0 + (kH - 1) * dh + 1, H)
    iw1 = min(iw0 + (kW - 1) * dw + 1, W)
    while ih0 < 0:
        ih0 += dh
    while iw0 < 0:
        iw0 += dw
    maxval, maxindex = -math.inf, ih0 * W + iw0
    found = False
    for ih in range(ih0, ih1, dh):
        for iw in range(iw0, iw1, dw):
            found = True
            val = float(plane[ih, iw])
            if val > maxval or math.isnan(val):
                maxval, maxindex = val, ih * W + iw
    # a window wholly in the padding (dilation makes it possible) is the constant -inf:
    # PyTorch still reports the index computed above; it has no input to send a gradient to
    return maxval, maxindex, found


def _max_pool_params(kernel_size, stride, padding, dilation):
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    return k, s, _pair(padding), _pair(dilation)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max pooling with -inf padding; indices are flat h*W+w per input plane (int64)."""
    x = _f64(x)
    N, C, H, W = x.shape
    k, s, p, d = _max_pool_params(kernel_size, stride, padding, dilation)
    Ho = _pool_out_size(H, k[0], s[0], p[0], d[0], ceil_mode)
    Wo = _pool_out_size(W, k[1], s[1], p[1], d[1], ceil_mode)
    out = np.zeros((N, C, Ho, Wo), dtype=np.float64)
    idx = np.zeros((N, C, Ho, Wo), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for oh in range(Ho):
                for ow in range(Wo):
                    val, index, _ = _max_pool_argmax(x[n, c], oh, ow, H, W, k, s, p, d)
                    out[n, c, oh, ow] = val
                    idx[n, c, oh, ow] = index
    return (out, idx) if return_indices else out


def max_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False):
    """grad_x[argmax of each window] += grad_out (accumulated over overlapping windows)."""
    go, x = _f64(grad_out), _f64(x)
    N, C, H, W = x.shape
    _, _, Ho, Wo = go.shape
    k, s, p, d = _max_pool_params(kernel_size, stride, padding, dilation)
    grad_x = np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for oh in range(Ho):
                for ow in range(Wo):
                    _, index, found = _max_pool_argmax(x[n, c], oh, ow, H, W, k, s, p, d)
                    if found:
                        grad_x[n, c, index // W, index % W] += go[n, c, oh, ow]
    return grad_x


# ---------------------------------------------------------------- avg_pool2d

def _avg_window(oh, ow, H, W, k, s, p, count_include_pad, divisor_override):
    """PyTorch's window and divisor: (hstart, hend, wstart, wend, divisor)."""
    (kH, kW), (sh, sw), (ph, pw) = k, s, p
    hstart, wstart = oh * sh - ph, ow * sw - pw
    hend, wend = min(hstart + kH, H + ph), min(wstart + kW, W + pw)
    pool_size = (hend - hstart) * (wend - wstart)  # before clamping
    hstart, wstart = max(hstart, 0), max(wstart, 0)
    hend, wend = min(hend, H), min(wend, W)
    if divisor_override is not None:
        divisor = divisor_override
    elif count_include_pad:
        divisor = pool_size
    else:
        divisor = (hend - hstart) * (wend - wstart)
    return hstart, hend, wstart, wend, divisor


def _avg_params(kernel_size, stride, padding):
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    return k, s, _pair(padding)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """Average pooling with PyTorch's divisor rule."""
    x = _f64(x)
    N, C, H, W = x.shape
    k, s, p = _avg_params(kernel_size, stride, padding)
    Ho = _pool_out_size(H, k[0], s[0], p[0], 1, ceil_mode)
    Wo = _pool_out_size(W, k[1], s[1], p[1], 1, ceil_mode)
    out = np.zeros((N, C, Ho, Wo), dtype=np.float64)
    for n in range(N):
        for c in range(C):
            for oh in range(Ho):
                for ow in range(Wo):
                    h0, h1, w0, w1, div = _avg_window(oh, ow, H, W, k, s, p,
                                                      count_include_pad, divisor_override)
                    if h0 >= h1 or w0 >= w1:
                        out[n, c, oh, ow] = 0.0
                        continue
                    acc = 0.0
                    for ih in range(h0, h1):
                        for iw in range(w0, w1):
                            acc += x[n, c, ih, iw]
                    out[n, c, oh, ow] = acc / div
    return out


def avg_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    """grad_x[ih,iw] += grad_out[oh,ow] / divisor for every (ih,iw) in window (oh,ow)."""
    go, x = _f64(grad_out), _f64(x)
    N, C, H, W = x.shape
    _, _, Ho, Wo = go.shape
    k, s, p = _avg_params(kernel_size, stride, padding)
    grad_x = np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for oh in range(Ho):
                for ow in range(Wo):
                    h0, h1, w0, w1, div = _avg_window(oh, ow, H, W, k, s, p,
                                                      count_include_pad, divisor_override)
                    for ih in range(h0, h1):
                        for iw in range(w0, w1):
                            grad_x[n, c, ih, iw] += go[n, c, oh, ow] / div
    return grad_x


# ---------------------------------------------------------------- upsample_nearest2d

def upsample_nearest2d(x, scale_factor):
    """out[n,c,h,w] = x[n,c,h//sh,w//sw]; out size (H*sh, W*sw)."""
    x = _f64(x)
    N, C, H, W = x.shape
    sh, sw = _pair(scale_factor)
    out = np.zeros((N, C, H * sh, W * sw), dtype=np.float64)
    for n in range(N):
        for c in range(C):
            for h in range(H * sh):
                for w in range(W * sw):
                    out[n, c, h, w] = x[n, c, h // sh, w // sw]
    return out


def upsample_nearest2d_backward(grad_out, scale_factor):
    """grad_x[n,c,h//sh,w//sw] += grad_out[n,c,h,w]."""
    go = _f64(grad_out)
    N, C, Ho, Wo = go.shape
    sh, sw = _pair(scale_factor)
    grad_x = np.zeros((N, C, Ho // sh, Wo // sw), dtype=np.float64)
    for n in range(N):
        for c in range(C):
            for h in range((Ho // sh) * sh):
                for w in range((Wo // sw) * sw):
                    grad_x[n, c, h // sh, w // sw] += go[n, c, h, w]
    return grad_x


# ---------------------------------------------------------------- cross_entropy

def _log_softmax_row(z):
    """logp[c] = z[c] - (m + log sum_k exp(z[k] - m)), m = max_k z[k]."""
    m = -math.inf
    for c in range(len(z)):
        m = max(m, float(z[c]))
    s = 0.0
    for c in range(len(z)):
        s += math.exp(float(z[c]) - m)
    lse = m + math.log(s)
    return [float(z[c]) - lse for c in range(len(z))]


def _ce_setup(logits, target, weight):
    z = _f64(logits)
    N, C = z.shape
    w = [1.0] * C if weight is None else [float(v) for v in _f64(weight)]
    prob = np.ndim(target) == 2
    t = _f64(target) if prob else np.asarray(target).astype(np.int64)
    return z, N, C, w, prob, t


def cross_entropy(logits, target, weight=None, reduction="mean", label_smoothing=0.0,
                  ignore_index=-100):
    """F.cross_entropy for logits (N, C) and int targets (N,) or probabilities (N, C)."""
    z, N, C, w, prob, t = _ce_setup(logits, target, weight)
    eps = float(label_smoothing)
    losses = np.zeros(N, dtype=np.float64)
    if prob:
        for n in range(N):
            logp = _log_softmax_row(z[n])
            acc = 0.0
            for c in range(C):
                tc = float(t[n, c]) * (1.0 - eps) + eps / C
                acc -= w[c] * tc * logp[c]
            losses[n] = acc
        if reduction == "none":
            return losses
        total = 0.0
        for n in range(N):
            total += losses[n]
        return total if reduction == "sum" else _div(total, N)

    nll_sum, smooth_sum, wsum = 0.0, 0.0, 0.0
    for n in range(N):
        y = int(t[n])
        if y == ignore_index:
            continue
        logp = _log_softmax_row(z[n])
        nll = -w[y] * logp[y]
        smooth = 0.0
        for c in range(C):
            smooth -= w[c] * logp[c]
        # as PyTorch, the smoothing term is only formed when eps > 0 (else a -inf logit in
        # another class, a zero probability, would make 0 * inf = NaN)
        losses[n] = (1.0 - eps) * nll + ((eps / C) * smooth if eps else 0.0)
        nll_sum += nll
        smooth_sum += smooth if eps else 0.0
        wsum += w[y]  # == count of non-ignored samples when weight is None
    if reduction == "none":
        return losses
    if reduction == "sum":
        return (1.0 - eps) * nll_sum + (eps / C) * smooth_sum
    # mean: both parts are normalised by sum of w[y_n] (the sample count without weights)
    return (1.0 - eps) * _div(nll_sum, wsum) + (eps / C) * _div(smooth_sum, wsum)


def cross_entropy_backward(logits, target, weight=None, reduction="mean", label_smoothing=0.0,
                           ignore_index=-100, grad_output=None):
    """Analytic d(loss)/d(logits), shape (N, C).

    With p = softmax(z[n]):
      int targets:  (1-eps)*w[y]*(p_c - [c==y]) + (eps/C)*(p_c*sum_k w_k - w_c)
      prob targets: p_c * sum_k w_k*t_k - w_c*t_c,   t = target*(1-eps) + eps/C
    times grad_output[n] ('none') or grad_output / normaliser ('mean') or
    grad_output ('sum'); ignored samples get 0.
    """
    z, N, C, w, prob, t = _ce_setup(logits, target, weight)
    eps = float(label_smoothing)
    if reduction == "none":
        g = [1.0] * N if grad_output is None else [float(v) for v in _f64(grad_output)]
    else:
        g0 = 1.0 if grad_output is None else float(grad_output)
        g = [g0] * N
    wsum_all = 0.0
    for c in range(C):
        wsum_all += w[c]

    # normaliser for 'mean'
    denom = 1.0
    if reduction == "mean":
        if prob:
            denom = float(N)
        else:
            denom = 0.0
            for n in range(N):
                if int(t[n]) != ignore_index:
                    denom += w[int(t[n])]

    grad = np.zeros((N, C), dtype=np.float64)
    for n in range(N):
        if not prob and int(t[n]) == ignore_index:
            continue
        logp = _log_softmax_row(z[n])
        p = [math.exp(v) for v in logp]
        scale = _div(g[n], denom) if reduction == "mean" else g[n]
        if prob:
            wt = [w[c] * (float(t[n, c]) * (1.0 - eps) + eps / C) for c in range(C)]
            wt_sum = 0.0
            for c in range(C):
                wt_sum += wt[c]
            for c in range(C):
                grad[n, c] = scale * (p[c] * wt_sum - wt[c])
        else:
            y = int(t[n])
            for c in range(C):
                d_nll = w[y] * (p[c] - (1.0 if c == y else 0.0))
                d_smooth = p[c] * wsum_all - w[c]
                grad[n, c] = scale * ((1.0 - eps) * d_nll + (eps / C) * d_smooth)
    return grad


# ---------------------------------------------------------------- fully connected

def linear(x, weight, bias=None):
    """y[n, o] = sum_i x[n, i] weight[o, i] + bias[o] (x of shape (N, I))."""
    x, weight = _f64(x), _f64(weight)
    N, I = x.shape
    O = weight.shape[0]
    y = np.zeros((N, O))
    for n in range(N):
        for o in range(O):
            acc = 0.0 if bias is None else float(bias[o])
            for i in range(I):
                acc += x[n, i] * weight[o, i]
            y[n, o] = acc
    return y


def linear_backward(grad_out, x, weight):
    """(grad_x, grad_weight, grad_bias): grad_x[n, i] = sum_o g[n, o] weight[o, i],
    grad_weight[o, i] = sum_n g[n, o] x[n, i], grad_bias[o] = sum_n g[n, o]."""
    g, x, weight = _f64(grad_out), _f64(x), _f64(weight)
    N, I = x.shape
    O = weight.shape[0]
    gx, gw, gb = np.zeros((N, I)), np.zeros((O, I)), np.zeros(O)
    for n in range(N):
        for o in range(O):
            gb[o] += g[n, o]
            for i in range(I):
                gx[n, i] += g[n, o] * weight[o, i]
                gw[o, i] += g[n, o] * x[n, i]
    return gx, gw, gb
