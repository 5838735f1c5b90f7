# Compiler directives (boundscheck, wraparound, cdivision, ...) are set once in setup.py;
# FASTCONV_DEBUG=1 at build time turns the checks back on.
"""Private compute kernels of fastconv.

Every kernel trusts its caller (``fastconv.functional``): shapes are consistent, buffers are
C-contiguous, outputs (``*_out``) and scratch space are allocated by the caller, and no size is
zero.  The kernels hold no Python objects, release the GIL for their whole body and keep no
state between calls.

Layout is NCHW.  Convolutions use im2col + GEMM per (image, group) work item: OpenMP spreads the
work items over threads, each thread owns one row of ``scratch`` (one item's im2col matrix), and
weight/bias gradients are accumulated in per-thread partial buffers that the caller reduces.
BLAS calls are row-major wrappers over ``scipy.linalg.cython_blas`` (C^T = B^T A^T).
"""
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.string cimport memset, memcpy
from libc.math cimport exp, log, isnan, INFINITY
from scipy.linalg.cython_blas cimport sgemm, dgemm

cdef extern from *:
    """
    #if defined(FASTCONV_OPENMP) && FASTCONV_OPENMP && defined(_OPENMP)
    #include <omp.h>
    static int fc_max_threads(void) { return omp_get_max_threads(); }
    static int fc_have_openmp(void) { return 1; }
    #else
    static int fc_max_threads(void) { return 1; }
    static int fc_have_openmp(void) { return 0; }
    #endif
    """
    int fc_max_threads() nogil
    int fc_have_openmp() nogil


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(fc_have_openmp())


def omp_max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return fc_max_threads()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

cdef inline void gemm_rm(bint trans_a, bint trans_b, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                         floating alpha, const floating* A, Py_ssize_t lda,
                         const floating* B, Py_ssize_t ldb,
                         floating beta, floating* C, Py_ssize_t ldc) noexcept nogil:
    """Row-major C(M, N) = alpha * op(A)(M, K) @ op(B)(K, N) + beta * C.

    Column-major BLAS sees every row-major matrix transposed, so we ask it for
    C^T = op(B)^T @ op(A)^T.  All sizes fit in a C int (checked by the caller).
    """
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'T' if trans_a else b'N'
    cdef int m = <int>N, n = <int>M, k = <int>K
    cdef int ia = <int>ldb, ib = <int>lda, ic = <int>ldc
    if floating is float:
        sgemm(&ta, &tb, &m, &n, &k, &alpha, <float*>B, &ia, <float*>A, &ib, &beta, C, &ic)
    else:
        dgemm(&ta, &tb, &m, &n, &k, &alpha, <double*>B, &ia, <double*>A, &ib, &beta, C, &ic)


cdef inline Py_ssize_t ceil_div_pos(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # ceil(a / b) for b > 0 and any a >= 0
    return (a + b - 1) // b


cdef inline void valid_range(Py_ssize_t off, Py_ssize_t s, Py_ssize_t size, Py_ssize_t n_out,
                             Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    """Range [lo, hi) of output positions o with 0 <= o*s + off < size."""
    cdef Py_ssize_t a = 0, b = 0
    if off < 0:
        a = ceil_div_pos(-off, s)
    if size - off > 0:
        b = ceil_div_pos(size - off, s)
    if a > n_out:
        a = n_out
    if b > n_out:
        b = n_out
    if b < a:
        b = a
    lo[0] = a
    hi[0] = b


cdef void im2col(const floating* x, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                 Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                 Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                 Py_ssize_t OH, Py_ssize_t OW, floating* col) noexcept nogil:
    """col[(c, kh, kw), (oh, ow)] = x[c, oh*sH - pH + kh*dH, ow*sW - pW + kw*dW] (0 outside)."""
    cdef Py_ssize_t c, kh, kw, oh, ow, ih, off, lo, hi, P = OH * OW
    cdef floating* dst
    cdef const floating* src
    for c in range(C):
        for kh in range(kH):
            for kw in range(kW):
                off = kw * dW - pW
                valid_range(off, sW, W, OW, &lo, &hi)
                dst = col + ((c * kH + kh) * kW + kw) * P
                for oh in range(OH):
                    ih = oh * sH - pH + kh * dH
                    if ih < 0 or ih >= H:
                        memset(dst, 0, OW * sizeof(floating))
                    else:
                        src = x + (c * H + ih) * W
                        for ow in range(lo):
                            dst[ow] = 0
                        if sW == 1:
                            if hi > lo:
                                memcpy(dst + lo, src + lo + off, (hi - lo) * sizeof(floating))
                        else:
                            for ow in range(lo, hi):
                                dst[ow] = src[ow * sW + off]
                        for ow in range(hi, OW):
                            dst[ow] = 0
                    dst += OW


cdef void col2im(const floating* col, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                 Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                 Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                 Py_ssize_t OH, Py_ssize_t OW, floating* x) noexcept nogil:
    """Adjoint of im2col: x[c, ih, iw] += col[(c, kh, kw), (oh, ow)] (x must be initialised)."""
    cdef Py_ssize_t c, kh, kw, oh, ow, ih, off, lo, hi, P = OH * OW
    cdef const floating* src
    cdef floating* dst
    for c in range(C):
        for kh in range(kH):
            for kw in range(kW):
                off = kw * dW - pW
                valid_range(off, sW, W, OW, &lo, &hi)
                src = col + ((c * kH + kh) * kW + kw) * P
                for oh in range(OH):
                    ih = oh * sH - pH + kh * dH
                    if ih >= 0 and ih < H:
                        dst = x + (c * H + ih) * W + off
                        if sW == 1:
                            for ow in range(lo, hi):
                                dst[ow] += src[ow]
                        else:
                            for ow in range(lo, hi):
                                dst[ow * sW] += src[ow]
                    src += OW


cdef inline void fill_channels(floating* dst, Py_ssize_t n_ch, Py_ssize_t plane,
                               const floating* values) noexcept nogil:
    """dst[c, :] = values[c] for c < n_ch, or 0 when values is NULL."""
    cdef Py_ssize_t c, i
    cdef floating v
    for c in range(n_ch):
        if values == NULL:
            memset(dst + c * plane, 0, plane * sizeof(floating))
        else:
            v = values[c]
            for i in range(plane):
                dst[c * plane + i] = v


# --------------------------------------------------------------------------------------------
# convolution
# --------------------------------------------------------------------------------------------

def conv2d_forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] weight,
                   const floating[::1] bias, floating[:, :, :, ::1] out,
                   floating[:, ::1] scratch,
                   Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                   Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t groups,
                   bint has_bias, int num_threads):
    """out = conv2d(x, weight) (+ bias); pH/pW are the top/left paddings.

    scratch: (threads, Cg*kH*kW*OH*OW), unused (may have 0 columns) for 1x1 stride-1 unpadded.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t L = weight.shape[0], Cg = weight.shape[1]
    cdef Py_ssize_t kH = weight.shape[2], kW = weight.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t Lg = L // groups, K = Cg * kH * kW, P = OH * OW
    cdef Py_ssize_t ncol = scratch.shape[1]
    cdef bint direct = (kH == 1 and kW == 1 and sH == 1 and sW == 1 and pH == 0 and pW == 0
                        and OH == H and OW == W)
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &weight[0, 0, 0, 0]
    cdef const floating* bp = NULL
    cdef floating* op = &out[0, 0, 0, 0]
    cdef floating* sp = &scratch[0, 0]
    cdef floating* col
    cdef const floating* src
    cdef floating beta
    cdef Py_ssize_t item, n, g
    if has_bias:
        bp = &bias[0]
    if not direct and ncol < K * P:
        raise ValueError("conv2d_forward: scratch is smaller than one im2col matrix")
    if scratch.shape[0] < num_threads:
        raise ValueError("conv2d_forward: scratch needs one row per thread")
    with nogil, parallel(num_threads=num_threads):
        col = sp + threadid() * ncol
        for item in prange(N * groups, schedule='static'):
            n = item // groups
            g = item % groups
            src = xp + (n * C + g * Cg) * H * W
            if not direct:
                im2col(src, Cg, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW, col)
                src = col
            beta = 0
            if has_bias:
                fill_channels(op + (n * L + g * Lg) * P, Lg, P, bp + g * Lg)
                beta = 1
            gemm_rm(False, False, Lg, P, K, 1, wp + g * Lg * K, K, src, P,
                    beta, op + (n * L + g * Lg) * P, P)


def conv2d_backward(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
                    const floating[:, :, :, ::1] weight, const floating[::1] init,
                    floating[:, :, :, ::1] grad_x_out,
                    floating[:, ::1] grad_w_part, floating[:, ::1] grad_b_part,
                    floating[:, ::1] scratch,
                    Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                    Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t groups,
                    bint need_x, bint need_w, bint need_b, bint has_init, int num_threads):
    """Gradients of y = conv2d(x, weight): any of grad_x, grad_weight, grad_bias.

    The geometry comes from ``grad_out`` (N, L, OH, OW) and from ``grad_x_out`` when need_x,
    else from ``x`` (both are (N, C, H, W)); ``x`` is only read when need_w, ``grad_x_out``
    only written when need_x, so an unneeded one may be a dummy (1, 1, 1, 1) array.  ``grad_x_out`` is fully
    written when need_x: channel c starts at ``init[c]`` when has_init (else 0) and receives
    col2im(weight^T @ grad_out); this is exactly the forward pass of a transposed convolution.
    grad_w_part (threads, L*K) and grad_b_part (threads, L) must be zeroed: thread t adds its
    share to row t, and the caller sums the rows.
    """
    cdef Py_ssize_t N = grad_out.shape[0], L = grad_out.shape[1]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3]
    # the conv input's geometry: from grad_x_out when it is computed, else from x
    cdef Py_ssize_t C = grad_x_out.shape[1] if need_x else x.shape[1]
    cdef Py_ssize_t H = grad_x_out.shape[2] if need_x else x.shape[2]
    cdef Py_ssize_t W = grad_x_out.shape[3] if need_x else x.shape[3]
    cdef Py_ssize_t Cg = weight.shape[1], kH = weight.shape[2], kW = weight.shape[3]
    cdef Py_ssize_t Lg = L // groups, K = Cg * kH * kW, P = OH * OW
    cdef Py_ssize_t ncol = scratch.shape[1], nw = grad_w_part.shape[1], nb = grad_b_part.shape[1]
    cdef bint direct = (kH == 1 and kW == 1 and sH == 1 and sW == 1 and pH == 0 and pW == 0
                        and OH == H and OW == W)
    cdef const floating* gyp = &grad_out[0, 0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &weight[0, 0, 0, 0]
    cdef const floating* ip = NULL
    cdef floating* gxp = &grad_x_out[0, 0, 0, 0]
    cdef floating* gwp = &grad_w_part[0, 0]
    cdef floating* gbp = &grad_b_part[0, 0]
    cdef floating* sp = &scratch[0, 0]
    cdef floating* col
    cdef floating* gw
    cdef floating* gb
    cdef floating* gxg
    cdef const floating* gyg
    cdef const floating* src
    cdef floating acc
    cdef Py_ssize_t item, n, g, l, i, tid
    if has_init:
        ip = &init[0]
    if (need_w or need_x) and not direct and ncol < K * P:
        raise ValueError("conv2d_backward: scratch is smaller than one im2col matrix")
    if scratch.shape[0] < num_threads or (need_w and (grad_w_part.shape[0] < num_threads or nw < L * K)) \
            or (need_b and (grad_b_part.shape[0] < num_threads or nb < L)):
        raise ValueError("conv2d_backward: workspaces need one row per thread")
    with nogil, parallel(num_threads=num_threads):
        tid = threadid()
        col = sp + tid * ncol
        gw = gwp + tid * nw
        gb = gbp + tid * nb
        for item in prange(N * groups, schedule='static'):
            n = item // groups
            g = item % groups
            gyg = gyp + (n * L + g * Lg) * P
            if need_w:
                src = xp + (n * C + g * Cg) * H * W
                if not direct:
                    im2col(src, Cg, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW, col)
                    src = col
                # grad_w[g] (Lg, K) += grad_out[n, g] (Lg, P) @ col^T (P, K)
                gemm_rm(False, True, Lg, K, P, 1, gyg, P, src, P, 1, gw + g * Lg * K, K)
            if need_b:
                for l in range(Lg):
                    acc = 0
                    for i in range(P):
                        acc = acc + gyg[l * P + i]
                    gb[g * Lg + l] += acc
            if need_x:
                gxg = gxp + (n * C + g * Cg) * H * W
                if direct:
                    # grad_x[n, g] (Cg, HW) = w[g]^T (Cg, Lg) @ grad_out[n, g] (Lg, HW)
                    if has_init:
                        fill_channels(gxg, Cg, P, ip + g * Cg)
                    gemm_rm(True, False, K, P, Lg, 1, wp + g * Lg * K, K, gyg, P,
                            1 if has_init else 0, gxg, P)
                else:
                    gemm_rm(True, False, K, P, Lg, 1, wp + g * Lg * K, K, gyg, P, 0, col, P)
                    fill_channels(gxg, Cg, H * W, (ip + g * Cg) if has_init else NULL)
                    col2im(col, Cg, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW, gxg)


def conv_transpose2d_backward(const floating[:, :, :, ::1] grad_out,
                              const floating[:, :, :, ::1] x,
                              const floating[:, :, :, ::1] weight,
                              floating[:, :, :, ::1] grad_x_out,
                              floating[:, ::1] grad_w_part,
                              floating[:, ::1] scratch,
                              Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                              Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t groups,
                              bint need_x, bint need_w, int num_threads):
    """Gradients of y = conv_transpose2d(x, weight) with one im2col of grad_out per item.

    A transposed convolution is the data-gradient of a convolution whose input is y and whose
    output is x, so with cols = im2col(grad_out):
    grad_x[n, g] = weight[g] (Cin_g, K) @ cols, grad_w[g] += x[n, g] (Cin_g, HW) @ cols^T.
    weight is (Cin, Cout_g, kH, kW); grad_w_part (threads, Cin*K) zeroed.
    """
    cdef Py_ssize_t N = x.shape[0], Cin = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t Cout = grad_out.shape[1], OH = grad_out.shape[2], OW = grad_out.shape[3]
    cdef Py_ssize_t Cog = weight.shape[1], kH = weight.shape[2], kW = weight.shape[3]
    cdef Py_ssize_t Cig = Cin // groups, K = Cog * kH * kW, P = H * W
    cdef Py_ssize_t ncol = scratch.shape[1], nw = grad_w_part.shape[1]
    cdef bint direct = (kH == 1 and kW == 1 and sH == 1 and sW == 1 and pH == 0 and pW == 0
                        and OH == H and OW == W)
    cdef const floating* gyp = &grad_out[0, 0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &weight[0, 0, 0, 0]
    cdef floating* gxp = &grad_x_out[0, 0, 0, 0]
    cdef floating* gwp = &grad_w_part[0, 0]
    cdef floating* sp = &scratch[0, 0]
    cdef floating* col
    cdef floating* gw
    cdef const floating* src
    cdef Py_ssize_t item, n, g
    if not direct and ncol < K * P:
        raise ValueError("conv_transpose2d_backward: scratch is smaller than one im2col matrix")
    if scratch.shape[0] < num_threads or (need_w and (grad_w_part.shape[0] < num_threads or nw < Cin * K)):
        raise ValueError("conv_transpose2d_backward: workspaces need one row per thread")
    with nogil, parallel(num_threads=num_threads):
        col = sp + threadid() * ncol
        gw = gwp + threadid() * nw
        for item in prange(N * groups, schedule='static'):
            n = item // groups
            g = item % groups
            src = gyp + (n * Cout + g * Cog) * OH * OW
            if not direct:
                im2col(src, Cog, OH, OW, kH, kW, sH, sW, pH, pW, dH, dW, H, W, col)
                src = col
            if need_x:
                gemm_rm(False, False, Cig, P, K, 1, wp + g * Cig * K, K, src, P,
                        0, gxp + (n * Cin + g * Cig) * P, P)
            if need_w:
                gemm_rm(False, True, Cig, K, P, 1, xp + (n * Cin + g * Cig) * P, P, src, P,
                        1, gw + g * Cig * K, K)


def sum_rows(const floating[:, ::1] part, floating[::1] out):
    """out[j] = sum_t part[t, j] (reduces per-thread partial sums)."""
    cdef Py_ssize_t T = part.shape[0], M = part.shape[1], t, j
    with nogil:
        for j in range(M):
            out[j] = part[0, j]
        for t in range(1, T):
            for j in range(M):
                out[j] += part[t, j]


def channel_sum(const floating[:, :, ::1] x, floating[::1] out, int num_threads):
    """out[c] = sum over n and the plane of x (N, C, HW): a bias gradient."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2], c, n, i
    cdef double acc
    with nogil:
        for c in prange(C, schedule='static', num_threads=num_threads):
            acc = 0
            for n in range(N):
                for i in range(P):
                    acc = acc + x[n, c, i]
            out[c] = <floating>acc


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------

cdef inline Py_ssize_t max_window(const floating* xp, Py_ssize_t H, Py_ssize_t W,
                                  Py_ssize_t hs, Py_ssize_t ws, Py_ssize_t kH, Py_ssize_t kW,
                                  Py_ssize_t dH, Py_ssize_t dW, floating* maxval,
                                  bint* empty) noexcept nogil:
    """PyTorch's CPU rule: scan row-major, take val > max or NaN.

    A window wholly in the padding (possible with dilation) gives -inf and, as PyTorch, the
    index of its first in-padding position clipped forward; ``empty`` flags it.
    """
    cdef Py_ssize_t he = hs + (kH - 1) * dH + 1, we = ws + (kW - 1) * dW + 1
    cdef Py_ssize_t ih, iw, idx
    cdef floating val, m = -INFINITY
    if he > H:
        he = H
    if we > W:
        we = W
    if hs < 0:
        hs = hs + ceil_div_pos(-hs, dH) * dH     # first tap inside the image
    if ws < 0:
        ws = ws + ceil_div_pos(-ws, dW) * dW
    idx = hs * W + ws
    empty[0] = hs >= he or ws >= we
    ih = hs
    while ih < he:
        iw = ws
        while iw < we:
            val = xp[ih * W + iw]
            if val > m or isnan(val):
                m = val
                idx = ih * W + iw
            iw = iw + dW
        ih = ih + dH
    maxval[0] = m
    return idx


def max_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                       long long[:, :, :, ::1] indices_out,
                       Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                       Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                       bint with_indices, int num_threads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef long long* ip = &indices_out[0, 0, 0, 0]
    cdef const floating* xpl
    cdef floating m
    cdef bint empty
    cdef Py_ssize_t plane, oh, ow, idx, o
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            xpl = xp + plane * H * W
            for oh in range(OH):
                for ow in range(OW):
                    idx = max_window(xpl, H, W, oh * sH - pH, ow * sW - pW, kH, kW, dH, dW,
                                     &m, &empty)
                    o = plane * OH * OW + oh * OW + ow
                    op[o] = m
                    if with_indices:
                        ip[o] = idx


def max_pool2d_backward(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
                        floating[:, :, :, ::1] grad_x_out,
                        Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                        Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                        int num_threads):
    """grad_x (fully written) = scatter of grad_out to each window's argmax."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* gyp = &grad_out[0, 0, 0, 0]
    cdef floating* gxp = &grad_x_out[0, 0, 0, 0]
    cdef floating m
    cdef bint empty
    cdef Py_ssize_t plane, oh, ow, idx
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            memset(gxp + plane * H * W, 0, H * W * sizeof(floating))
            for oh in range(OH):
                for ow in range(OW):
                    idx = max_window(xp + plane * H * W, H, W, oh * sH - pH, ow * sW - pW,
                                     kH, kW, dH, dW, &m, &empty)
                    if not empty:
                        gxp[plane * H * W + idx] += gyp[(plane * OH + oh) * OW + ow]


cdef inline void avg_window(Py_ssize_t hs, Py_ssize_t ws, Py_ssize_t kH, Py_ssize_t kW,
                            Py_ssize_t H, Py_ssize_t W, Py_ssize_t pH, Py_ssize_t pW,
                            bint count_include_pad, Py_ssize_t divisor_override,
                            Py_ssize_t* bounds, double* divisor) noexcept nogil:
    """PyTorch's average-pool window: clamped bounds and the divisor."""
    cdef Py_ssize_t he = hs + kH, we = ws + kW, pool_size
    if he > H + pH:
        he = H + pH
    if we > W + pW:
        we = W + pW
    pool_size = (he - hs) * (we - ws)
    if hs < 0:
        hs = 0
    if ws < 0:
        ws = 0
    if he > H:
        he = H
    if we > W:
        we = W
    bounds[0] = hs
    bounds[1] = he
    bounds[2] = ws
    bounds[3] = we
    if divisor_override != 0:
        divisor[0] = <double>divisor_override
    elif count_include_pad:
        divisor[0] = <double>pool_size
    else:
        divisor[0] = <double>((he - hs) * (we - ws))


def avg_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                       Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                       Py_ssize_t pH, Py_ssize_t pW, bint count_include_pad,
                       Py_ssize_t divisor_override, int num_threads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef const floating* xpl
    cdef Py_ssize_t plane, oh, ow, ih, iw
    cdef Py_ssize_t b[4]
    cdef double div
    cdef floating acc
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            xpl = xp + plane * H * W
            for oh in range(OH):
                for ow in range(OW):
                    avg_window(oh * sH - pH, ow * sW - pW, kH, kW, H, W, pH, pW,
                               count_include_pad, divisor_override, b, &div)
                    acc = 0
                    if b[0] < b[1] and b[2] < b[3]:
                        for ih in range(b[0], b[1]):
                            for iw in range(b[2], b[3]):
                                acc = acc + xpl[ih * W + iw]
                        acc = <floating>(acc / div)
                    op[(plane * OH + oh) * OW + ow] = acc


def avg_pool2d_backward(const floating[:, :, :, ::1] grad_out, floating[:, :, :, ::1] grad_x_out,
                        Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                        Py_ssize_t pH, Py_ssize_t pW, bint count_include_pad,
                        Py_ssize_t divisor_override, int num_threads):
    cdef Py_ssize_t N = grad_x_out.shape[0], C = grad_x_out.shape[1]
    cdef Py_ssize_t H = grad_x_out.shape[2], W = grad_x_out.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3]
    cdef const floating* gyp = &grad_out[0, 0, 0, 0]
    cdef floating* gxp = &grad_x_out[0, 0, 0, 0]
    cdef floating* gxl
    cdef Py_ssize_t plane, oh, ow, ih, iw
    cdef Py_ssize_t b[4]
    cdef double div
    cdef floating g
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            gxl = gxp + plane * H * W
            memset(gxl, 0, H * W * sizeof(floating))
            for oh in range(OH):
                for ow in range(OW):
                    avg_window(oh * sH - pH, ow * sW - pW, kH, kW, H, W, pH, pW,
                               count_include_pad, divisor_override, b, &div)
                    g = <floating>(gyp[(plane * OH + oh) * OW + ow] / div)
                    for ih in range(b[0], b[1]):
                        for iw in range(b[2], b[3]):
                            gxl[ih * W + iw] += g


# --------------------------------------------------------------------------------------------
# nearest upsampling
# --------------------------------------------------------------------------------------------

def upsample_nearest2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                               Py_ssize_t sH, Py_ssize_t sW, int num_threads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OW = W * sW
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef const floating* src
    cdef floating* dst
    cdef floating v
    cdef Py_ssize_t row, iw, j, r
    with nogil:
        # one input row -> sH identical output rows
        for row in prange(N * C * H, schedule='static', num_threads=num_threads):
            src = xp + row * W
            dst = op + row * sH * OW
            if sW == 1:
                memcpy(dst, src, W * sizeof(floating))
            else:
                for iw in range(W):
                    v = src[iw]
                    for j in range(sW):
                        dst[iw * sW + j] = v
            for r in range(1, sH):
                memcpy(dst + r * OW, dst, OW * sizeof(floating))


def upsample_nearest2d_backward(const floating[:, :, :, ::1] grad_out,
                                floating[:, :, :, ::1] grad_x_out,
                                Py_ssize_t sH, Py_ssize_t sW, int num_threads):
    cdef Py_ssize_t N = grad_x_out.shape[0], C = grad_x_out.shape[1]
    cdef Py_ssize_t H = grad_x_out.shape[2], W = grad_x_out.shape[3], OW = W * sW
    cdef const floating* gyp = &grad_out[0, 0, 0, 0]
    cdef floating* gxp = &grad_x_out[0, 0, 0, 0]
    cdef const floating* src
    cdef floating* dst
    cdef floating acc
    cdef Py_ssize_t row, iw, j, r
    with nogil:
        for row in prange(N * C * H, schedule='static', num_threads=num_threads):
            src = gyp + row * sH * OW
            dst = gxp + row * W
            for iw in range(W):
                acc = 0
                for r in range(sH):
                    for j in range(sW):
                        acc = acc + src[r * OW + iw * sW + j]
                dst[iw] = acc


# --------------------------------------------------------------------------------------------
# cross-entropy from logits
# --------------------------------------------------------------------------------------------

cdef inline double row_logsumexp(const floating* z, Py_ssize_t C) noexcept nogil:
    cdef double m = -INFINITY, s = 0
    cdef Py_ssize_t c
    for c in range(C):
        if z[c] > m or isnan(z[c]):
            m = z[c]
    if isnan(m) or m == INFINITY or m == -INFINITY:
        return m
    for c in range(C):
        s += exp(z[c] - m)
    return m + log(s)


def cross_entropy_labels(const floating[:, ::1] logits, const long long[::1] target,
                         const floating[::1] weight, bint has_weight, double smoothing,
                         long long ignore_index, floating[::1] loss_out,
                         floating[::1] denom_out, int num_threads):
    """Per-sample loss and mean-denominator (weight of the label, 0 when ignored)."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], n, c
    cdef const floating* z
    cdef double lse, wy, nll, smooth, wc
    cdef long long y
    with nogil:
        for n in prange(N, schedule='static', num_threads=num_threads):
            y = target[n]
            if y == ignore_index:
                loss_out[n] = 0
                denom_out[n] = 0
                continue
            z = &logits[n, 0]
            lse = row_logsumexp(z, C)
            wy = weight[y] if has_weight else 1.0
            nll = -wy * (z[y] - lse)
            smooth = 0
            if smoothing != 0:
                for c in range(C):
                    wc = weight[c] if has_weight else 1.0
                    smooth = smooth - wc * (z[c] - lse)
            loss_out[n] = <floating>((1 - smoothing) * nll + smoothing / C * smooth)
            denom_out[n] = <floating>wy


def cross_entropy_labels_backward(const floating[:, ::1] logits, const long long[::1] target,
                                  const floating[::1] weight, bint has_weight, double smoothing,
                                  long long ignore_index, const double[::1] scale,
                                  floating[:, ::1] grad_out, int num_threads):
    """grad[n, c] = scale[n] * ((1-eps) w_y (p_c - [c=y]) + eps/C (p_c sum(w) - w_c))."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], n, c
    cdef const floating* z
    cdef floating* g
    cdef double lse, wy, wsum, p, wc, s
    cdef long long y
    wsum = C
    if has_weight:
        wsum = 0
        for c in range(C):
            wsum += weight[c]
    with nogil:
        for n in prange(N, schedule='static', num_threads=num_threads):
            y = target[n]
            g = &grad_out[n, 0]
            if y == ignore_index:
                memset(g, 0, C * sizeof(floating))
                continue
            z = &logits[n, 0]
            s = scale[n]
            lse = row_logsumexp(z, C)
            wy = weight[y] if has_weight else 1.0
            for c in range(C):
                p = exp(z[c] - lse)
                wc = weight[c] if has_weight else 1.0
                g[c] = <floating>(s * ((1 - smoothing) * wy * p + smoothing / C * (p * wsum - wc)))
            g[y] = <floating>(g[y] - s * (1 - smoothing) * wy)


def cross_entropy_probs(const floating[:, ::1] logits, const floating[:, ::1] target,
                        const floating[::1] weight, bint has_weight, double smoothing,
                        floating[::1] loss_out, int num_threads):
    """loss[n] = -sum_c w_c t'_c log p_c, with t' = t (1 - eps) + eps / C."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], n, c
    cdef double lse, acc, t, wc
    with nogil:
        for n in prange(N, schedule='static', num_threads=num_threads):
            lse = row_logsumexp(&logits[n, 0], C)
            acc = 0
            for c in range(C):
                t = target[n, c] * (1 - smoothing) + smoothing / C
                wc = weight[c] if has_weight else 1.0
                acc = acc - wc * t * (logits[n, c] - lse)
            loss_out[n] = <floating>acc


def cross_entropy_probs_backward(const floating[:, ::1] logits, const floating[:, ::1] target,
                                 const floating[::1] weight, bint has_weight, double smoothing,
                                 const double[::1] scale, floating[:, ::1] grad_out,
                                 int num_threads):
    """grad[n, c] = scale[n] * (p_c * sum_k w_k t'_k - w_c t'_c)."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], n, c
    cdef double lse, tw, t, wc
    with nogil:
        for n in prange(N, schedule='static', num_threads=num_threads):
            lse = row_logsumexp(&logits[n, 0], C)
            tw = 0
            for c in range(C):
                t = target[n, c] * (1 - smoothing) + smoothing / C
                tw = tw + (weight[c] if has_weight else 1.0) * t
            for c in range(C):
                t = target[n, c] * (1 - smoothing) + smoothing / C
                wc = weight[c] if has_weight else 1.0
                grad_out[n, c] = <floating>(scale[n] * (exp(logits[n, c] - lse) * tw - wc * t))
