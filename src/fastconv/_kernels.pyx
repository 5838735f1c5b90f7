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
Forward convolutions hand out work items dynamically (a thread descheduled on a busy machine
does not hold the others up); the gradient kernels keep a static split, so that the per-thread
partial sums, and so the results, are the same from run to run.  Other kernels give each
thread whole planes or rows (guided schedule): their results never depend on the split.
BLAS calls are row-major wrappers over ``scipy.linalg.cython_blas`` (C^T = B^T A^T).
"""
cimport cython
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.string cimport memcmp, memset, memcpy
from libc.stdlib cimport calloc, malloc, free
from libc.math cimport exp, log, isnan, INFINITY, NAN
from scipy.linalg.cython_blas cimport sgemm, dgemm
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE

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


cdef extern from "_simd.h":
    void fc_sub_scaled_f(float* d, const float* g, float s, Py_ssize_t n) nogil
    void fc_sub_scaled_d(double* d, const double* g, double s, Py_ssize_t n) nogil
    int fc_simd512_set(int on) nogil
    int fc_avx512_on
    # hand-vectorised rows of the log-sum-exp and softmax gradient: portable code plus an
    # AVX2+FMA version chosen at import (see the header)
    float fc_expf_nonpos(float x) nogil
    double fc_exp_nonpos(double x) nogil
    float fc_sumexp_f(const float* z, Py_ssize_t n, float m) nogil
    double fc_sumexp_d(const double* z, Py_ssize_t n, double m) nogil
    void fc_softmax_grad_f(const float* z, Py_ssize_t n, float m, float ls, float a, float b,
                           const float* w, float* g) nogil
    void fc_softmax_grad_d(const double* z, Py_ssize_t n, double m, double ls, double a,
                           double b, const double* w, double* g) nogil
    bint fc_max_f(const float* z, Py_ssize_t n, float* out) nogil
    bint fc_max_d(const double* z, Py_ssize_t n, double* out) nogil
    void fc_softmax_grad2_f(const float* z, Py_ssize_t n, float m, float a, float b,
                            const float* w, float* g) nogil
    void fc_softmax_grad2_d(const double* z, Py_ssize_t n, double m, double a, double b,
                            const double* w, double* g) nogil
    void fc_row3_f(float* o, const float* a, Py_ssize_t n, Py_ssize_t s, Py_ssize_t d,
                   float w0, float w1, float w2) nogil
    void fc_row3_d(double* o, const double* a, Py_ssize_t n, Py_ssize_t s, Py_ssize_t d,
                   double w0, double w1, double w2) nogil
    double fc_dot_f(const float* a, const float* b, Py_ssize_t n, Py_ssize_t s) nogil
    double fc_dot_d(const double* a, const double* b, Py_ssize_t n, Py_ssize_t s) nogil
    void fc_dw3_f(float* o, Py_ssize_t n, int R, const float* a0, const float* a1,
                  const float* a2, const float* w0, const float* w1, const float* w2) nogil
    void fc_dw3_d(double* o, Py_ssize_t n, int R, const double* a0, const double* a1,
                  const double* a2, const double* w0, const double* w1, const double* w2) nogil
    double fc_dot2d_f(const float* a, Py_ssize_t lda, const float* b, Py_ssize_t ldb,
                      Py_ssize_t rows, Py_ssize_t n) nogil
    double fc_dot2d_d(const double* a, Py_ssize_t lda, const double* b, Py_ssize_t ldb,
                      Py_ssize_t rows, Py_ssize_t n) nogil
    void fc_dw33_fwd_f(const float* P, Py_ssize_t PW, const float* w, float b, float* out,
                       Py_ssize_t OH, Py_ssize_t OW) nogil
    void fc_dw33_fwd_d(const double* P, Py_ssize_t PW, const double* w, double b, double* out,
                       Py_ssize_t OH, Py_ssize_t OW) nogil
    void fc_dw33_gw_f(const float* P, Py_ssize_t PW, const float* gy, Py_ssize_t OH,
                      Py_ssize_t OW, double* s) nogil
    void fc_dw33_gw_d(const double* P, Py_ssize_t PW, const double* gy, Py_ssize_t OH,
                      Py_ssize_t OW, double* s) nogil
    void fc_dwk_fwd_f(const float* P, Py_ssize_t rs, const Py_ssize_t* off, const float* w,
                      Py_ssize_t ntap, float b, float* out, Py_ssize_t OH, Py_ssize_t OW) nogil
    void fc_dwk_fwd_d(const double* P, Py_ssize_t rs, const Py_ssize_t* off, const double* w,
                      Py_ssize_t ntap, double b, double* out, Py_ssize_t OH, Py_ssize_t OW) nogil
    void fc_pad_row_f(const float* s, Py_ssize_t lo, Py_ssize_t n, Py_ssize_t m, float* d) nogil
    void fc_pad_row_d(const double* s, Py_ssize_t lo, Py_ssize_t n, Py_ssize_t m,
                      double* d) nogil
    void fc_spread2_f(const float* s, Py_ssize_t n, float* d) nogil
    void fc_spread2_d(const double* s, Py_ssize_t n, double* d) nogil
    void fc_deint_f(const float* s, Py_ssize_t n, float* e, float* o) nogil
    void fc_deint_d(const double* s, Py_ssize_t n, double* e, double* o) nogil
    void fc_dwk_gw_f(const float* P, Py_ssize_t rs, const Py_ssize_t* off, Py_ssize_t ntap,
                     const float* gy, Py_ssize_t OH, Py_ssize_t OW, double* s) nogil
    void fc_dwk_gw_d(const double* P, Py_ssize_t rs, const Py_ssize_t* off, Py_ssize_t ntap,
                     const double* gy, Py_ssize_t OH, Py_ssize_t OW, double* s) nogil
    enum: FC_DWK_SLACK
    int fc_maxpool22_bwd_f(const float* x0, const float* x1, const float* g, Py_ssize_t OW,
                           float* gx0, float* gx1) nogil
    int fc_maxpool22_bwd_d(const double* x0, const double* x1, const double* g,
                           Py_ssize_t OW, double* gx0, double* gx1) nogil
    void fc_maxpool33s2_bwd_f(const float* x0, const float* x1, const float* x2,
                              const float* g, Py_ssize_t lo, Py_ssize_t hi, float first,
                              float* sel, float* c2, float* gx0, float* gx1, float* gx2) nogil
    void fc_maxpool33s2_bwd_d(const double* x0, const double* x1, const double* x2,
                              const double* g, Py_ssize_t lo, Py_ssize_t hi, double first,
                              double* sel, double* c2, double* gx0, double* gx1,
                              double* gx2) nogil
    void fc_avgpool22_f(const float* x0, const float* x1, Py_ssize_t OW, float div,
                        float* o) nogil
    void fc_avgpool22_d(const double* x0, const double* x1, Py_ssize_t OW, double div,
                        double* o) nogil
    void fc_maxpool22_f(const float* x, Py_ssize_t OH, Py_ssize_t W, float* out) nogil
    void fc_maxpool22_d(const double* x, Py_ssize_t OH, Py_ssize_t W, double* out) nogil
    int FC_MP22_BUF
    enum: FC_POOL_LANE_VALS
    void fc_maxpool_lanes_f(const float* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                            Py_ssize_t OW, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH,
                            Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH,
                            Py_ssize_t dW, float* out) nogil
    void fc_maxpool_lanes_d(const double* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                            Py_ssize_t OW, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH,
                            Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH,
                            Py_ssize_t dW, double* out) nogil
    void fc_avgpool_lanes_f(const float* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                            Py_ssize_t OW, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH,
                            Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW, const float* dv,
                            const unsigned char* em, float* out) nogil
    void fc_avgpool_lanes_d(const double* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                            Py_ssize_t OW, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH,
                            Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW, const double* dv,
                            const unsigned char* em, double* out) nogil
    void fc_maxpool33s2_f(const float* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                          Py_ssize_t OW, int pH, int pW, float* out) nogil
    void fc_maxpool33s2_d(const double* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                          Py_ssize_t OW, int pH, int pW, double* out) nogil
    int FC_MP33_ROW
    int FC_MP33_BUF
    void fc_col2im_pair_f(float* d, const float* a, const float* b, Py_ssize_t n) nogil
    void fc_col2im_pair_d(double* d, const double* a, const double* b, Py_ssize_t n) nogil
    void fc_col2im_s1_f(float* d, Py_ssize_t ds, const float* s, Py_ssize_t OW,
                        Py_ssize_t rows, Py_ssize_t lo, Py_ssize_t hi) nogil
    void fc_ups2_row_f(const float* s, Py_ssize_t W, float* d0, float* d1) nogil
    void fc_ups2_row_d(const double* s, Py_ssize_t W, double* d0, double* d1) nogil
    void fc_col2im_s1_d(double* d, Py_ssize_t ds, const double* s, Py_ssize_t OW,
                        Py_ssize_t rows, Py_ssize_t lo, Py_ssize_t hi) nogil
    int fc_simd_init() nogil
    int fc_simd_set(int on) nogil
    int fc_simd_level() nogil


fc_simd_init()


cdef extern from "_gemm.h":
    # fastconv's own GEMM for the convolutions (AVX-512F or AVX2+FMA micro-kernels, weights
    # packed once per call, B read in place; see the header); level 0: BLAS instead
    int fc_gemm_init() nogil
    int fc_gemm_set(int level) nogil
    int fc_gemm_level() nogil
    int fc_gemm_mr() nogil
    enum: GEMM_RELU "FC_GEMM_RELU"
    enum: GEMM_PACKB "FC_GEMM_PACKB"
    enum: GEMM_BT "FC_GEMM_BT"
    int fc_im2col_pad_on
    Py_ssize_t fc_gemm_nr(int dbl) nogil
    Py_ssize_t fc_gemm_packed_size(Py_ssize_t M, Py_ssize_t K) nogil
    void fc_gemm_pack_f(const float* A, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t M,
                        Py_ssize_t K, float* Ap) nogil
    void fc_gemm_pack_d(const double* A, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t M,
                        Py_ssize_t K, double* Ap) nogil
    void fc_im2col_panel_f(const float* x, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                           Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                           Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                           Py_ssize_t OW, Py_ssize_t p0, Py_ssize_t n, float* col,
                           Py_ssize_t ld) nogil
    void fc_im2col_panel_d(const double* x, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                           Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                           Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                           Py_ssize_t OW, Py_ssize_t p0, Py_ssize_t n, double* col,
                           Py_ssize_t ld) nogil
    void fc_gemm_f(Py_ssize_t M, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t K, const float* Ap,
                   const float* B, Py_ssize_t ldb, float* C, Py_ssize_t ldc, const float* bias,
                   int acc) nogil
    void fc_gemm_d(Py_ssize_t M, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t K, const double* Ap,
                   const double* B, Py_ssize_t ldb, double* C, Py_ssize_t ldc,
                   const double* bias, int acc) nogil
    void fc_transpose_f(const float* src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t lds,
                        float* dst, Py_ssize_t ldd) nogil
    void fc_transpose_d(const double* src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t lds,
                        double* dst, Py_ssize_t ldd) nogil
    int fc_mp33_bwd_f(const float* x0, const float* x1, const float* x2, const float* g,
                      Py_ssize_t lo, Py_ssize_t hi, float first, float* gx0, float* gx1,
                      float* gx2) nogil
    int fc_mp33_bwd_d(const double* x0, const double* x1, const double* x2, const double* g,
                      Py_ssize_t lo, Py_ssize_t hi, double first, double* gx0, double* gx1,
                      double* gx2) nogil
    int fc_gemm_tail_on
    int fc_gemm_short_on
    int fc_gemm_split_on
    Py_ssize_t fc_gemm_packb_min
    Py_ssize_t fc_gemm_cpf_kc
    Py_ssize_t fc_gemm_bpf_min
    Py_ssize_t fc_gemm_kc
    int FC_GEMM_KC_MAX
    int fc_gemm_packb_sets
    int fc_im2col_rows_on
    int fc_im2col_rows_ok() nogil
    void fc_gemmc_f(Py_ssize_t M, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t K, const float* A,
                    const Py_ssize_t* ao, const float* B, Py_ssize_t ldb, float* C,
                    Py_ssize_t ldc, int acc) nogil
    void fc_gemmc_d(Py_ssize_t M, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t K, const double* A,
                    const Py_ssize_t* ao, const double* B, Py_ssize_t ldb, double* C,
                    Py_ssize_t ldc, int acc) nogil
    void fc_gemmb_f(Py_ssize_t M, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t K, const float* Ap,
                    const float* B, const Py_ssize_t* bo, float* C, Py_ssize_t ldc,
                    const float* bias, int acc) nogil
    void fc_gemmb_d(Py_ssize_t M, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t K,
                    const double* Ap, const double* B, const Py_ssize_t* bo, double* C,
                    Py_ssize_t ldc, const double* bias, int acc) nogil
    int fc_mp22_bwd_f(const float* x0, const float* x1, const float* g, Py_ssize_t OW,
                      float* gx0, float* gx1, Py_ssize_t avail_x, Py_ssize_t avail_g) nogil
    int fc_mp22_bwd_d(const double* x0, const double* x1, const double* g, Py_ssize_t OW,
                      double* gx0, double* gx1, Py_ssize_t avail_x, Py_ssize_t avail_g) nogil
    void fc_gemma_f(Py_ssize_t M, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t K, const float* A,
                    Py_ssize_t lda, const float* B, Py_ssize_t ldb, float* C, Py_ssize_t ldc,
                    int acc) nogil
    void fc_gemma_d(Py_ssize_t M, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t K, const double* A,
                    Py_ssize_t lda, const double* B, Py_ssize_t ldb, double* C, Py_ssize_t ldc,
                    int acc) nogil
    void fc_wdot_f(Py_ssize_t K, Py_ssize_t R, Py_ssize_t P, const float* A, Py_ssize_t lda,
                   const Py_ssize_t* bo, const float* B, Py_ssize_t ldb, float* gwt) nogil
    void fc_wdot_d(Py_ssize_t K, Py_ssize_t R, Py_ssize_t P, const double* A,
                   Py_ssize_t lda, const Py_ssize_t* bo, const double* B, Py_ssize_t ldb,
                   double* gwt) nogil
    void fc_rowdot1_f(Py_ssize_t K, const float* x, const float* w, Py_ssize_t ldw,
                      Py_ssize_t j0, Py_ssize_t j1, const float* b, float* y) nogil
    void fc_rowdot1_d(Py_ssize_t K, const double* x, const double* w, Py_ssize_t ldw,
                      Py_ssize_t j0, Py_ssize_t j1, const double* b, double* y) nogil
    void fc_rowdot_f(Py_ssize_t R, Py_ssize_t K, const float* x, Py_ssize_t ldx,
                     const float* w, Py_ssize_t ldw, Py_ssize_t j0, Py_ssize_t j1,
                     const float* b, float* y, Py_ssize_t ldy) nogil
    void fc_rowdot_d(Py_ssize_t R, Py_ssize_t K, const double* x, Py_ssize_t ldx,
                     const double* w, Py_ssize_t ldw, Py_ssize_t j0, Py_ssize_t j1,
                     const double* b, double* y, Py_ssize_t ldy) nogil


fc_gemm_init()

_GEMM_LEVELS = ("blas", "avx2", "avx512")


def gemm_level():
    """The convolutions' GEMM: 'avx512' or 'avx2' (fastconv's micro-kernels) or 'blas'."""
    return _GEMM_LEVELS[fc_gemm_level()]


def set_gemm(level):
    """Use fastconv's GEMM at this level ('avx512', 'avx2'; capped at what the CPU has) or
    BLAS ('blas'); returns the level now in use.  For tests and benchmarks: call it while no
    kernel is running."""
    fc_gemm_set(_GEMM_LEVELS.index(level))
    return gemm_level()


# columns of one im2col block of the forward convolution by the own GEMM; 0: automatic
cdef Py_ssize_t GEMM_BLOCK_COLS = 0


def set_im2col_padded(bint on):
    """Whether im2col may go through a zero-padded copy of the rows (stride 1 or 2 along the
    width, rows that fit; see _gemm.h) or always takes the masked path; returns the previous
    setting.  For tests and A/B timing, while no kernel runs."""
    global fc_im2col_pad_on
    old = fc_im2col_pad_on != 0
    fc_im2col_pad_on = 1 if on else 0
    return old


def set_im2col_rows(bint on):
    """Whether the forward convolution (stride 1 along the height, AVX-512 own GEMM) makes
    im2col rows once per (channel, column tap) and lets the GEMM read the row taps as shifts
    of them, or always the whole im2col matrix; returns the previous setting.  For tests and
    A/B timing, while no kernel runs."""
    global fc_im2col_rows_on
    old = fc_im2col_rows_on != 0
    fc_im2col_rows_on = 1 if on else 0
    return old


def set_gemm_short(bint on):
    """Whether the own GEMM computes a last panel of at most 4 rows (MR/2 of AVX-512's 8, 4
    of AVX2's 6; M = 25: the input gradient of a 5x5 one-channel convolution, M = 64 at AVX2)
    by a kernel of that many rows (the same numbers);
    returns the previous setting.  For tests and A/B timing, while no kernel runs."""
    global fc_gemm_short_on
    old = fc_gemm_short_on != 0
    fc_gemm_short_on = 1 if on else 0
    return old


def set_gemm_tail(bint on):
    """Whether the own GEMM's last panel of at most 4 float32 columns goes through the
    rows-in-lanes tail kernel (else the quarter-width one); returns the previous setting.
    For tests and A/B timing, while no kernel runs."""
    global fc_gemm_tail_on
    old = fc_gemm_tail_on != 0
    fc_gemm_tail_on = 1 if on else 0
    return old


cdef Py_ssize_t swap_threshold(Py_ssize_t* knob, Py_ssize_t value) noexcept:
    """*knob = max(value, 0) (0: never); returns the previous value (the GEMM's thresholds)."""
    cdef Py_ssize_t old = knob[0]
    knob[0] = value if value > 0 else 0
    return old


def set_gemm_packb(Py_ssize_t nbytes):
    """Row distance (bytes) of B from which the own GEMM copies each strip of B into a
    contiguous buffer before using it (0: never); returns the previous value.  For tests and
    A/B timing, while no kernel runs."""
    return swap_threshold(&fc_gemm_packb_min, nbytes)


def set_gemm_cpf(Py_ssize_t kc):
    """Fewest rows of a K block for which the own GEMM prefetches C's rows of the next column
    panel before writing them (0: never); returns the previous value.  For tests and A/B
    timing, while no kernel runs."""
    return swap_threshold(&fc_gemm_cpf_kc, kc)


def set_gemm_bpf(Py_ssize_t nbytes):
    """Row distance (bytes) of a B read in place from which the own GEMM prefetches the next
    column panel's strip of B (0: never); returns the previous value.  For tests and A/B
    timing, while no kernel runs."""
    return swap_threshold(&fc_gemm_bpf_min, nbytes)


def set_gemm_split(bint on):
    """Whether the own GEMM at AVX2 computes the last 8 rows of M = 6 n + 2 as two 4-row
    kernels (the second across two panels) instead of a 6-row and a 2-row one (the same
    numbers); returns the previous setting.  For tests and A/B timing, while no kernel runs."""
    global fc_gemm_split_on
    old = fc_gemm_split_on != 0
    fc_gemm_split_on = 1 if on else 0
    return old


def set_gemm_kc(Py_ssize_t kc):
    """Rows of the own GEMM's K blocks (1 .. FC_GEMM_KC_MAX); returns the previous value.
    For tests and A/B timing, while no kernel runs."""
    global fc_gemm_kc
    if not 1 <= kc <= FC_GEMM_KC_MAX:
        raise ValueError(f"kc must be in [1, {FC_GEMM_KC_MAX}], got {kc}")
    old = fc_gemm_kc
    fc_gemm_kc = kc
    return old


def set_gemm_packb_sets(bint on):
    """Whether the own GEMM also copies B's strips when B's rows are a multiple of 512 bytes
    apart (they then share a few L1 sets); returns the previous setting.  For tests and A/B
    timing, while no kernel runs."""
    global fc_gemm_packb_sets
    old = fc_gemm_packb_sets
    fc_gemm_packb_sets = on
    return bool(old)


def set_gemm_block(Py_ssize_t ncols):
    """Force the forward convolution's im2col blocks to about ncols columns (0: automatic);
    returns the previous value.  For tests and tuning, while no kernel runs."""
    global GEMM_BLOCK_COLS
    old = GEMM_BLOCK_COLS
    GEMM_BLOCK_COLS = ncols
    return old


# bytes of an im2col block above which the forward convolution splits an image's columns
DEF IM2COL_BLOCK_MAX = 786432


cdef inline Py_ssize_t block_len(Py_ssize_t n, Py_ssize_t parts, Py_ssize_t align) noexcept nogil:
    """Block length cutting n in about `parts` blocks: ceil(n / parts) rounded up to a
    multiple of align (at least 1; the last block shorter)."""
    cdef Py_ssize_t per = (n + parts - 1) // parts
    return max((per + align - 1) // align * align, 1)


cdef inline Py_ssize_t gemm_block_cols(Py_ssize_t P, Py_ssize_t K, Py_ssize_t items,
                                       Py_ssize_t threads, Py_ssize_t itemsize) noexcept nogil:
    """Columns per im2col block of the forward convolution by the own GEMM.  A whole image
    when there are at least as many (image, group) items as threads: measured fastest (blocks
    of 64-256 KiB were 5-25 % slower on one thread), unless its im2col matrix (K rows) would
    pass 768 KiB: it is then read from beyond L2 (a 2 MiB L2 also holds the packed weights
    and the output), and blocks of 256-416 columns were 1.07-1.08x faster on the strided
    64->128 3x3 (1.8 MiB a whole image).  With fewer items (batch 1), blocks of whole panels,
    about 4 per thread, so that the threads share the images."""
    cdef Py_ssize_t nr = fc_gemm_nr(itemsize == 8), nb, per
    if GEMM_BLOCK_COLS > 0:
        nb = (GEMM_BLOCK_COLS + nr - 1) // nr * nr
    elif items >= threads:
        if K * P * itemsize <= IM2COL_BLOCK_MAX:
            return P
        nb = IM2COL_BLOCK_MAX // (K * itemsize) // nr * nr
        nb = nb if nb > nr else nr
        # as many blocks as that needs, evened out
        per = (P + nb - 1) // nb
        nb = ((P + per - 1) // per + nr - 1) // nr * nr
    else:
        nb = block_len(P, (4 * threads + items - 1) // items, nr)
    return nb if nb < P else P


# conv2d_backward's weight gradient by the own GEMM with the im2col matrix read in place
cdef bint WGRAD_OWN = True


# conv2d_backward in blocks of output rows when the im2col matrix is big (block_rows)
cdef bint BACKWARD_BLOCKS = True


def set_backward_blocks(bint on):
    """Whether conv2d_backward may split a big im2col matrix into blocks of output rows;
    returns the previous setting.  For tests and A/B timing, while no kernel runs."""
    global BACKWARD_BLOCKS
    old = BACKWARD_BLOCKS
    BACKWARD_BLOCKS = on
    return old


cdef bint WGRAD_SPLIT = True


def set_wgrad_split(bint on):
    """Share a batch-1 weight gradient among the threads by blocks of input channels (True,
    the default) or leave it to one thread; returns the previous setting.  For tests and
    benchmarks."""
    global WGRAD_SPLIT
    old = WGRAD_SPLIT
    WGRAD_SPLIT = on
    return old


# the own GEMM's weight gradient reads grad_out as its B transposed (FC_GEMM_BT) instead of
# a transposed copy made first
cdef bint WGRAD_BT = True


cdef inline Py_ssize_t wgrad_min_k() noexcept nogil:
    """Fewest taps (im2col rows) for the weight gradient by the own GEMM: with fewer,
    transposing grad_out cost as much as the GEMM saved (LeNet's conv1, K = 25: 0.88x BLAS
    with a transposed copy; read as B transposed 1.08-1.28x BLAS; K = 9: 0.9x, K = 16:
    1.21x, 18: 1.02-1.14x)."""
    return 16 if WGRAD_BT else 64


def set_wgrad_bt(bint on):
    """Whether the weight gradient by the own GEMM reads grad_out as B transposed (True)
    or transposes it first; returns the previous setting.  For tests and A/B timing."""
    global WGRAD_BT
    old = WGRAD_BT
    WGRAD_BT = on
    return old


# fewer taps than this: the own weight gradient by dot products along the pixels (fc_wdot_*)
# instead of the GEMM (from 16 taps) or BLAS (below).  Weight gradient alone, batch 32-64,
# Xeon with AVX-512, 1 / 2 threads: LeNet's conv1 (25 taps) 1.18-1.27x, 9 taps 1.15-1.52x
# (BLAS), 18 taps 1.10-1.22x, 16 taps 1.02-1.06x; from 27 taps on the GEMM won (up to 1/0.74
# at 63 taps), as on a 64x64 image with 16 channels in float64 at 1 thread (0.89-0.99x)
cdef Py_ssize_t WGRAD_DOT_K = 26


cdef inline bint wgrad_own_ok(Py_ssize_t K) noexcept nogil:
    """Whether a weight gradient of K taps is computed by the own GEMM (else BLAS): by dot
    products below WGRAD_DOT_K taps, by the GEMM from wgrad_min_k() on."""
    return K < WGRAD_DOT_K or K >= wgrad_min_k()


def set_wgrad_dot(Py_ssize_t k):
    """Taps (im2col rows) below which the own GEMM's weight gradient is computed by dot
    products along the pixels (0: never); returns the previous setting.  For tests and A/B
    timing, while no kernel runs."""
    global WGRAD_DOT_K
    old = WGRAD_DOT_K
    WGRAD_DOT_K = k
    return old


def set_wgrad_own(bint on):
    """Whether conv2d_backward may compute the weight gradient by the own GEMM (else BLAS);
    returns the previous setting.  For tests and A/B timing, while no kernel runs."""
    global WGRAD_OWN
    old = WGRAD_OWN
    WGRAD_OWN = on
    return old


cdef inline Py_ssize_t wgrad_extra(Py_ssize_t Lg, Py_ssize_t P,
                                   Py_ssize_t itemsize) noexcept nogil:
    return 0 if WGRAD_BT or fc_gemm_level() == 0 else P * col_ld(Lg, itemsize)


def wgrad_scratch(Py_ssize_t Lg, Py_ssize_t P, Py_ssize_t itemsize):
    """Values a thread's conv2d_backward workspace needs past the im2col matrix for the
    weight gradient by the own GEMM (grad_out's (Lg, P) block transposed, when it is not
    read as B transposed: set_wgrad_bt(False)); 0 at level 'blas'."""
    return wgrad_extra(Lg, P, itemsize)


cdef inline void wgrad_own(const floating* col, Py_ssize_t lda, Py_ssize_t K,
                           const floating* b, Py_ssize_t R, Py_ssize_t P, Py_ssize_t lds,
                           floating* bt, Py_ssize_t ldt, floating* gwt,
                           const Py_ssize_t* bo) noexcept nogil:
    """A weight gradient by the own GEMM (level > 0 only): gwt (K, R) += col (K, P, rows lda
    apart, read in place; or row k at col + bo[k] when bo is not NULL: the shared im2col rows
    of wgrad_rows) @ b^T, b (R, P, rows lds apart) read as the GEMM's B transposed, or
    (set_wgrad_bt(False)) transposed into bt (P rows ldt >= R apart) first.  The BLAS form,
    gw (R, K) += b @ col^T, had OpenBLAS repack col for every image."""
    cdef const floating* B = b
    cdef Py_ssize_t ldb = lds
    cdef int acc = 1 | GEMM_BT
    if K < WGRAD_DOT_K:
        if floating is float:
            fc_wdot_f(K, R, P, col, lda, bo, b, lds, gwt)
        else:
            fc_wdot_d(K, R, P, col, lda, bo, b, lds, gwt)
        return
    if not WGRAD_BT:
        if floating is float:
            fc_transpose_f(b, R, P, lds, bt, ldt)
        else:
            fc_transpose_d(b, R, P, lds, bt, ldt)
        B, ldb, acc = bt, ldt, 1
    if floating is float:
        if bo != NULL:
            fc_gemmc_f(K, 0, R, P, col, bo, B, ldb, gwt, R, acc)
        else:
            fc_gemma_f(K, 0, R, P, col, lda, B, ldb, gwt, R, acc)
    elif bo != NULL:
        fc_gemmc_d(K, 0, R, P, col, bo, B, ldb, gwt, R, acc)
    else:
        fc_gemma_d(K, 0, R, P, col, lda, B, ldb, gwt, R, acc)


cdef Py_ssize_t* tap_rows(Py_ssize_t Cg, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t dH,
                         Py_ssize_t OW, Py_ssize_t lde) noexcept nogil:
    """Offsets of the im2col rows k = (c kH + kh) kW + kw in the shared rows of
    fc_im2col_rows (row (c, kw), lde values apart, shifted by kh dH OW columns); malloc'd
    (NULL when out of memory)."""
    cdef Py_ssize_t K = Cg * kH * kW, k = 0, c, kh, kw
    cdef Py_ssize_t* bo = <Py_ssize_t*> malloc(K * sizeof(Py_ssize_t))
    if bo != NULL:
        # (by loops: three integer divisions per row, 2400 for LeNet's conv2, took 8 us of
        # its 160 us batch-1 forward)
        for c in range(Cg):
            for kh in range(kH):
                for kw in range(kW):
                    bo[k] = (c * kW + kw) * lde + kh * dH * OW
                    k += 1
    return bo


cdef inline void wgrad_rows(const floating* x, Py_ssize_t Cg, Py_ssize_t H, Py_ssize_t W,
                            Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sW, Py_ssize_t pH,
                            Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t OH,
                            Py_ssize_t OW, const Py_ssize_t* bo, Py_ssize_t lde,
                            floating* col, const floating* b, Py_ssize_t R, floating* bt,
                            Py_ssize_t ldt, floating* gwt) noexcept nogil:
    """wgrad_own for stride 1 along the height with the im2col rows shared by the row taps
    (fc_im2col_rows_ok): the rows of row tap 0 for (kH - 1) dH more output rows into col,
    then gwt (K, R) += those rows through bo @ b^T."""
    cdef Py_ssize_t P = OH * OW, K = Cg * kH * kW
    im2col_panel(x, Cg, H, W, 1, kW, 1, sW, pH, pW, dH, dW, OW, 0, P + (kH - 1) * dH * OW,
                 col, lde)
    wgrad_own(col, 0, K, b, R, P, P, bt, ldt, gwt, bo)


cdef inline Py_ssize_t block_rows(Py_ssize_t K, Py_ssize_t OH, Py_ssize_t OW,
                                  Py_ssize_t itemsize) noexcept nogil:
    """Output rows per block of a backward pass's im2col matrix (K rows): all OH unless the
    whole matrix would pass IM2COL_BLOCK_MAX (it is then written and read beyond L2), else
    evened-out blocks of whole output rows under it (set_gemm_block: about that many columns,
    for the tests)."""
    cdef Py_ssize_t rb, nbk
    if GEMM_BLOCK_COLS > 0:
        rb = GEMM_BLOCK_COLS // OW
        return rb if rb > 1 else 1
    if K * OH * OW * itemsize <= IM2COL_BLOCK_MAX:
        return OH
    rb = IM2COL_BLOCK_MAX // (K * OW * itemsize)
    rb = rb if rb > 1 else 1
    nbk = (OH + rb - 1) // rb
    return (OH + nbk - 1) // nbk


cdef void backward_blocks(const floating* x, const floating* gy, const floating* A,
                          floating* gx, floating* gwt, floating* col, floating* bt,
                          Py_ssize_t Cg, Py_ssize_t H, Py_ssize_t W, Py_ssize_t Lg,
                          Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                          Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                          Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t rb, Py_ssize_t ldt,
                          bint need_w, bint need_x) noexcept nogil:
    """conv2d_backward's own-GEMM work for one (image, group) in blocks of rb output rows:
    gwt (K, Lg) += im2col(x)[:, block] @ gy[:, block]^T when need_w, and gx (initialised)
    += col2im(A @ gy[:, block]) when need_x (A: weight^T packed), each block's im2col matrix
    made in col (it stays in L2).  col2im of a block is the whole image's with the padding
    shifted by the block's first row."""
    cdef Py_ssize_t K = Cg * kH * kW, P = OH * OW, r0, nr, ldk = col_ld(rb * OW, sizeof(floating))
    r0 = 0
    while r0 < OH:
        nr = OH - r0 if OH - r0 < rb else rb
        if need_w:
            im2col_panel(x, Cg, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OW, r0 * OW, nr * OW,
                         col, ldk)
            wgrad_own(col, ldk, K, gy + r0 * OW, Lg, nr * OW, P, bt, ldt, gwt, NULL)
        if need_x:
            own_gemm(K, 0, nr * OW, Lg, A, gy + r0 * OW, P, col, ldk, NULL, GEMM_PACKB)
            col2im(col, Cg, H, W, kH, kW, sH, sW, pH - r0 * sH, pW, dH, dW, nr, OW, gx, ldk)
        r0 = r0 + nr


def gemm_nr(Py_ssize_t itemsize):
    """Columns per panel of the own GEMM for values of itemsize bytes (4: float32, 8:
    float64) at the current level (1 at level 'blas')."""
    return fc_gemm_nr(itemsize == 8)


def gemm_packed_size(Py_ssize_t M, Py_ssize_t K):
    """Values of an (M, K) matrix packed for the current GEMM level (0 at level 'blas')."""
    return fc_gemm_packed_size(M, K)


cdef inline void pack_a(const floating* A, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t M,
                        Py_ssize_t K, floating* Ap) noexcept nogil:
    if floating is float:
        fc_gemm_pack_f(A, rs, cs, M, K, Ap)
    else:
        fc_gemm_pack_d(A, rs, cs, M, K, Ap)


cdef inline void own_gemm(Py_ssize_t M, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t K,
                          const floating* Ap, const floating* B, Py_ssize_t ldb, floating* C,
                          Py_ssize_t ldc, const floating* bias, int acc) noexcept nogil:
    """C[:, n0:n1] = Ap @ B[:, n0:n1] (+ bias) (acc: C += Ap @ B), Ap packed by pack_a;
    acc | GEMM_RELU: then max(C, 0), as nn.ReLU, applied as C is stored."""
    if floating is float:
        fc_gemm_f(M, n0, n1, K, Ap, B, ldb, C, ldc, bias, acc)
    else:
        fc_gemm_d(M, n0, n1, K, Ap, B, ldb, C, ldc, bias, acc)


cdef inline void im2col_panel(const floating* x, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                              Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                              Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                              Py_ssize_t OW, Py_ssize_t p0, Py_ssize_t n, floating* col,
                              Py_ssize_t ld) noexcept nogil:
    """Columns [p0, p0 + n) of im2col(x) into col (rows ld >= n apart); level > 0 only."""
    if floating is float:
        fc_im2col_panel_f(x, C, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OW, p0, n, col, ld)
    else:
        fc_im2col_panel_d(x, C, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OW, p0, n, col, ld)


def simd_level():
    """'avx2' when the AVX2+FMA loops are in use, else 'baseline'."""
    return "avx2" if fc_simd_level() else "baseline"


def set_simd512(bint on):
    """Whether the loops that also have an AVX-512 build (float64 3x3 stride-2 max pooling)
    use it, where the CPU has it and AVX2 is on; returns the previous setting.  For tests and
    A/B timing, while no kernel runs."""
    old = fc_avx512_on != 0
    fc_simd512_set(1 if on else 0)
    return old


def set_simd(bint on):
    """Use the AVX2+FMA loops when the CPU has them (on=True) or the portable ones; returns
    the level now in use.  For tests and benchmarks: call it while no kernel is running."""
    fc_simd_set(on)
    return simd_level()


cdef inline floating exp_nonpos(floating x) noexcept nogil:
    if floating is float:
        return fc_expf_nonpos(x)
    else:
        return fc_exp_nonpos(x)


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


cdef inline void tap_at(const Py_ssize_t* tab, Py_ssize_t t, Py_ssize_t off, Py_ssize_t s,
                        Py_ssize_t size, Py_ssize_t n_out, Py_ssize_t* off_out, Py_ssize_t* lo,
                        Py_ssize_t* hi) noexcept nogil:
    """Column tap t's (offset, lo, hi): from the plane's tap table when it has one (tab not
    NULL), else computed (off is the tap's offset kw * dW - pW)."""
    if tab != NULL:
        off_out[0] = tab[3 * t]
        lo[0] = tab[3 * t + 1]
        hi[0] = tab[3 * t + 2]
    else:
        off_out[0] = off
        valid_range(off, s, size, n_out, lo, hi)


cdef inline Py_ssize_t col_ld(Py_ssize_t P, Py_ssize_t itemsize) noexcept nogil:
    """Row stride of an im2col matrix of P columns: P, or one cache line more when rows would
    be a multiple of 512 bytes apart (the GEMM's packing then reads rows that all fall in the
    same few L1 sets).  functional._col_ld is the same rule."""
    if (P * itemsize) % 512 == 0:
        return P + 64 // itemsize
    return P


cdef void im2col(const floating* x, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                 Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                 Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                 Py_ssize_t OH, Py_ssize_t OW, floating* col, Py_ssize_t ld) noexcept nogil:
    """col[(c, kh, kw), (oh, ow)] = x[c, oh*sH - pH + kh*dH, ow*sW - pW + kw*dW] (0 outside);
    rows of col are ld values apart (col_ld)."""
    cdef Py_ssize_t c, kh, kw, oh, ow, ih, off, lo, hi, P = ld
    cdef floating* dst
    cdef const floating* src
    if fc_gemm_level() > 0:
        im2col_panel(x, C, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OW, 0, OH * OW, col, ld)
        return
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
                 Py_ssize_t OH, Py_ssize_t OW, floating* x, Py_ssize_t ld) noexcept nogil:
    """Adjoint of im2col: x[c, ih, iw] += col[(c, kh, kw), (oh, ow)] (x must be initialised);
    rows of col are ld values apart."""
    cdef Py_ssize_t c, kh, kw, oh, ow, ih, off, lo, hi, P = ld, lo1, hi1, b, oh0, oh1
    cdef const floating* src
    cdef floating* dst
    for c in range(C):
        for kh in range(kH):
            kw = 0
            while kw < kW:
                off = kw * dW - pW
                valid_range(off, sW, W, OW, &lo, &hi)
                src = col + ((c * kH + kh) * kW + kw) * P
                if sW == 2 and dW == 1 and kw + 1 < kW:
                    # taps kw and kw + 1 fill the even and odd columns of one run: one
                    # interleaved vector pass (fc_col2im_pair) over their common range
                    # [lo, hi1) (tap kw + 1's range [lo1, hi1) starts and ends no later)
                    valid_range(off + 1, sW, W, OW, &lo1, &hi1)
                    b = hi1 if hi1 > lo else lo
                    for oh in range(OH):
                        ih = oh * sH - pH + kh * dH
                        if ih >= 0 and ih < H:
                            dst = x + (c * H + ih) * W + off
                            if floating is float:
                                fc_col2im_pair_f(dst + 2 * lo, src + lo, src + P + lo, b - lo)
                            else:
                                fc_col2im_pair_d(dst + 2 * lo, src + lo, src + P + lo, b - lo)
                            for ow in range(b, hi):
                                dst[ow * 2] += src[ow]
                            for ow in range(lo1, lo if lo < hi1 else hi1):
                                dst[ow * 2 + 1] += src[P + ow]
                        src += OW
                    kw += 2
                    continue
                if sW == 1:
                    # the rows oh whose ih = oh sH - pH + kh dH is in [0, H), in one call
                    oh0 = 0
                    while oh0 < OH and oh0 * sH - pH + kh * dH < 0:
                        oh0 += 1
                    oh1 = oh0
                    while oh1 < OH and oh1 * sH - pH + kh * dH < H:
                        oh1 += 1
                    if oh1 > oh0 and hi > lo:
                        dst = x + (c * H + oh0 * sH - pH + kh * dH) * W + off
                        if floating is float:
                            fc_col2im_s1_f(dst, sH * W, src + oh0 * OW, OW, oh1 - oh0, lo, hi)
                        else:
                            fc_col2im_s1_d(dst, sH * W, src + oh0 * OW, OW, oh1 - oh0, lo, hi)
                    kw += 1
                    continue
                for oh in range(OH):
                    ih = oh * sH - pH + kh * dH
                    if ih >= 0 and ih < H:
                        dst = x + (c * H + ih) * W + off
                        for ow in range(lo, hi):
                            dst[ow * sW] += src[ow]
                    src += OW
                kw += 1


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

cdef void conv_item(const floating* x, const floating* w, const floating* b, floating* out,
                    floating* col, Py_ssize_t Cg, Py_ssize_t H, Py_ssize_t W, Py_ssize_t Lg,
                    Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                    Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                    Py_ssize_t OH, Py_ssize_t OW, bint direct) noexcept nogil:
    """One (image, group) of the forward convolution by BLAS: out (Lg, OH*OW) = w (Lg, K) @
    im2col(x) (+ b), no im2col when direct (1x1, stride 1, unpadded)."""
    cdef Py_ssize_t K = Cg * kH * kW, P = OH * OW, ld = P
    cdef floating beta = 0
    cdef const floating* src = x
    if not direct:
        ld = col_ld(P, sizeof(floating))
        im2col(x, Cg, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW, col, ld)
        src = col
    if b != NULL:
        fill_channels(out, Lg, P, b)
        beta = 1
    gemm_rm(False, False, Lg, P, K, 1, w, K, src, ld, beta, out, P)


cdef extern from "_pool.h":
    # a caller-runs thread pool (see the header)
    ctypedef void (*fc_pool_fn)(void* ctx, Py_ssize_t i, int tid) noexcept nogil
    void fc_pool_run(int nthreads, fc_pool_fn fn, void* ctx, Py_ssize_t n) nogil
    void fc_pool_set_spin_ns(long ns) nogil
    void fc_pool_set_burst_ns(long ns) nogil
    int fc_pool_burst(int delta) nogil
    int fc_pool_sleeping() nogil
    int fc_pool_wake(int nthreads) nogil
    bint fc_once_begin(unsigned char* f) nogil
    void fc_once_set(unsigned char* f, bint yes) nogil
    bint fc_once_get(unsigned char* f) nogil


cdef check_pool_out(str fn, pool_out, bint keep, Py_ssize_t N, Py_ssize_t L, Py_ssize_t OH,
                    Py_ssize_t OW, Py_ssize_t pkH, Py_ssize_t pkW):
    """conv2d_forward's / conv2d_direct's fused max-pool arguments: pool_out (None or N x L
    x OH // pkH x OW // pkW, at least one window) and out None (not keep) only with it."""
    if pool_out is not None and (pkH < 1 or pkW < 1 or pool_out.shape[2] != OH // pkH
                                 or pool_out.shape[3] != OW // pkW or pool_out.shape[2] < 1
                                 or pool_out.shape[3] < 1 or pool_out.shape[1] != L
                                 or pool_out.shape[0] != N):
        raise ValueError(f"{fn}: pool_out does not match the pooled output")
    if not keep and pool_out is None:
        raise ValueError(f"{fn}: out may be None only with pool_out")


cdef struct ConvCall:
    # one forward convolution (conv_gemm_run, conv_direct_run): C-contiguous arrays and their
    # geometry, from the def kernels' memoryviews (conv_call_views) or from a ConvStep
    const void* x
    const void* w
    const void* b       # NULL: no bias
    void* out           # NULL: the output is not kept (pool only)
    void* scratch       # srows x ncol
    void* wpack         # nwpack values (conv_gemm_run; fewer than it needs: BLAS)
    void* pool          # NULL: no fused max-pool, else POH x POW windows of pkH x pkW
    Py_ssize_t N, C, H, W, L, Cg, kH, kW, OH, OW, POH, POW, pkH, pkW
    Py_ssize_t srows, ncol, nwpack, sH, sW, pH, pW, dH, dW, groups
    bint relu
    int num_threads


cdef int conv_call_views(ConvCall* a, const floating[:, :, :, ::1] x,
                         const floating[:, :, :, ::1] weight, const floating[::1] bias,
                         floating[:, :, :, ::1] out, floating[:, ::1] scratch, bint has_bias,
                         floating[:, :, :, ::1] pool_out, Py_ssize_t pkH, Py_ssize_t pkW,
                         Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t sH, Py_ssize_t sW,
                         Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                         Py_ssize_t groups, bint relu, int num_threads, str fn) except -1:
    """a from the def kernels' arguments (OH, OW: from out when kept; no packed weights)."""
    cdef bint keep = out is not None
    if keep:
        OH, OW = out.shape[2], out.shape[3]
        if out.shape[0] != x.shape[0] or out.shape[1] != weight.shape[0]:
            raise ValueError(f"{fn}: out does not match the output")
    check_pool_out(fn, pool_out, keep, x.shape[0], weight.shape[0], OH, OW, pkH, pkW)
    a.N, a.C, a.H, a.W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    a.L, a.Cg, a.kH, a.kW = weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3]
    a.OH, a.OW, a.pkH, a.pkW = OH, OW, pkH, pkW
    a.x, a.w = &x[0, 0, 0, 0], &weight[0, 0, 0, 0]
    a.b = &bias[0] if has_bias else NULL
    a.out = &out[0, 0, 0, 0] if keep else NULL
    a.scratch, a.srows, a.ncol = &scratch[0, 0], scratch.shape[0], scratch.shape[1]
    a.pool, a.POH, a.POW = NULL, 0, 0
    if pool_out is not None:
        a.pool, a.POH, a.POW = &pool_out[0, 0, 0, 0], pool_out.shape[2], pool_out.shape[3]
    a.wpack, a.nwpack = NULL, 0
    a.sH, a.sW, a.pH, a.pW, a.dH, a.dW, a.groups = sH, sW, pH, pW, dH, dW, groups
    a.relu, a.num_threads = relu, num_threads
    return 0


cdef struct ConvJob:
    # conv2d_forward by the own GEMM on the caller-runs pool: item = (image, group, block of
    # nb output columns), each in the scratch row of the thread that runs it.  With pooling
    # (pkH > 0: a max-pool whose windows tile the output, kernel == stride), blocks hold whole
    # bands of pkH output rows and each block is pooled while it is in cache; keep: the
    # convolution's output is also stored in out, else only in the thread's scratch (ncol
    # values of im2col, then Lg * nb of output)
    const void* x
    const void* A
    const void* b
    void* out
    void* col
    void* pool
    Py_ssize_t ncol, nblk, nb, C, Cg, H, W, L, Lg, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW
    Py_ssize_t groups, psz, pkH, pkW, POH, POW, cbuf, lde
    const Py_ssize_t* bo     # im2col rows shared by the row taps: B's row k at col + bo[k]
    bint has_bias, direct, relu, dbl, keep
    # channel blocks (mb > 0; fewer (image, group) items than threads): item = (image, group,
    # block of mb output channels) over all the image's columns (nb = P, nblk = 1); the first
    # item of each (group, block) packs those rows of the weights (w: unpacked) and the
    # others (other images) wait for it (packed: a flag per (group, block), fc_once_*); each
    # thread makes an image's im2col once into its scratch (have[tid]: the item ng whose
    # im2col is there, or -1)
    Py_ssize_t mb, nmb
    const void* w
    Py_ssize_t* have
    unsigned char* packed


cdef void conv_block_run(ConvJob* j, Py_ssize_t i, int tid, floating* tag) noexcept nogil:
    """Output columns [p0, p0 + nb) of item ng = n * groups + g of the forward convolution
    by the own GEMM: their im2col into the thread's scratch (K rows, col_ld(nb) apart), then
    the GEMM; then, with pooling, the block's bands of rows max-pooled."""
    cdef Py_ssize_t ng = i // j.nblk, p0 = (i % j.nblk) * j.nb, m0 = 0, mi = 0
    cdef Py_ssize_t K = j.Cg * j.kH * j.kW, P = j.OH * j.OW, Lg = j.Lg
    cdef Py_ssize_t w = P - p0 if P - p0 < j.nb else j.nb
    cdef Py_ssize_t ld = col_ld(j.nb, sizeof(floating))
    cdef floating* col = <floating*> j.col + tid * j.ncol
    cdef floating* A = <floating*> j.A
    cdef const floating* b = <const floating*> j.b
    cdef floating* out
    cdef Py_ssize_t ldc = P
    cdef int mode = GEMM_RELU if j.relu else 0    # the ReLU in the micro-kernel's last store
    cdef bint make_col = True
    if j.mb > 0:                # channels [m0, m0 + Lg) of item ng, all its columns
        ng, mi = i // j.nmb, i % j.nmb
        m0 = mi * j.mb
        Lg = min(j.mb, j.Lg - m0)
        make_col = j.have[tid] != ng
        j.have[tid] = ng
    cdef Py_ssize_t n = ng // j.groups, g = ng % j.groups
    cdef const floating* x = <const floating*> j.x + (n * j.C + g * j.Cg) * j.H * j.W
    A += g * j.psz + m0 * K     # (m0: a multiple of the panels' rows)
    if j.mb > 0:
        if fc_once_begin(&j.packed[g * j.nmb + mi]):
            pack_a(<const floating*> j.w + (g * j.Lg + m0) * K, K, 1, Lg, K, A)
            fc_once_set(&j.packed[g * j.nmb + mi], True)
        else:
            fc_once_get(&j.packed[g * j.nmb + mi])
    if j.has_bias:
        b += g * j.Lg + m0
    else:
        b = NULL
    if j.keep:
        out = <floating*> j.out + (n * j.L + g * j.Lg + m0) * P + p0
    else:   # the block's output planes, contiguous (pooled at once below)
        out, ldc = col + j.cbuf, w
    if j.direct:
        own_gemm(Lg, 0, w, K, A, x + p0, P, out, ldc, b, mode | GEMM_PACKB)
    elif j.bo != NULL:
        # the im2col rows of row tap 0 for the block's columns and (kH - 1) dH more output
        # rows; tap (kh, kw) of channel c is row (c, kw) shifted by kh dH OW columns
        if make_col:
            im2col_panel(x, j.Cg, j.H, j.W, 1, j.kW, 1, j.sW, j.pH, j.pW, j.dH, j.dW, j.OW,
                         p0, w + (j.kH - 1) * j.dH * j.OW, col, j.lde)
        if floating is float:
            fc_gemmb_f(Lg, 0, w, K, A, col, j.bo, out, ldc, b, mode)
        else:
            fc_gemmb_d(Lg, 0, w, K, A, col, j.bo, out, ldc, b, mode)
    else:
        if make_col:
            im2col_panel(x, j.Cg, j.H, j.W, j.kH, j.kW, j.sH, j.sW, j.pH, j.pW, j.dH, j.dW,
                         j.OW, p0, w, col, ld)
        own_gemm(Lg, 0, w, K, A, col, ld, out, ldc, b, mode)
    if j.pkH > 0:
        pool_band(out, ldc, Lg, p0 // j.OW, w // j.OW, j.OW,
                  <floating*> j.pool + (n * j.L + g * j.Lg + m0) * j.POH * j.POW,
                  j.POH, j.POW, j.pkH, j.pkW)


cdef void pool_band(const floating* y, Py_ssize_t ystride, Py_ssize_t planes, Py_ssize_t r0,
                    Py_ssize_t nrows, Py_ssize_t OW, floating* pout, Py_ssize_t POH,
                    Py_ssize_t POW, Py_ssize_t kH, Py_ssize_t kW) noexcept nogil:
    """Max-pool rows [r0, r0 + nrows) of `planes` planes (channel c's rows at y + c * ystride,
    OW wide; r0 a multiple of kH) with kH x kW windows at stride (kH, kW), no padding, into
    output rows [r0 / kH, ...) of the planes at pout (POH x POW each); rows past the last
    whole window are dropped (floor mode).  One call for all planes when they lie end to end
    and the band is every output row (stacked_rows)."""
    cdef Py_ssize_t pr0 = r0 // kH, pr1 = (r0 + nrows) // kH, c, rows
    if pr1 > POH:
        pr1 = POH
    if pr1 <= pr0:
        return
    rows = (pr1 - pr0) * kH
    if ystride == rows * OW and pr1 - pr0 == POH:
        max_pool_plane(y, planes * rows, OW, pout, NULL, planes * POH, POW, kH, kW, kH, kW,
                       0, 0, 1, 1, False)
        return
    for c in range(planes):
        max_pool_plane(y + c * ystride, rows, OW, pout + c * POH * POW + pr0 * POW, NULL,
                       pr1 - pr0, POW, kH, kW, kH, kW, 0, 0, 1, 1, False)


cdef void conv_block_item(void* ctx, Py_ssize_t i, int tid) noexcept nogil:
    cdef ConvJob* j = <ConvJob*> ctx
    if j.dbl:
        conv_block_run(j, i, tid, <double*> NULL)
    else:
        conv_block_run(j, i, tid, <float*> NULL)


cdef inline Py_ssize_t pool_block_cols(Py_ssize_t P, Py_ssize_t K, Py_ssize_t items,
                                       Py_ssize_t threads, Py_ssize_t itemsize,
                                       Py_ssize_t band) noexcept nogil:
    """gemm_block_cols rounded up to whole bands of `band` output values (a pooling's rows
    of windows; 0: no pooling)."""
    cdef Py_ssize_t nb = gemm_block_cols(P, K, items, threads, itemsize)
    if band > 0:
        nb = (nb + band - 1) // band * band
    return nb if nb < P else P


cdef inline Py_ssize_t conv_chan_block(Py_ssize_t K, Py_ssize_t P, Py_ssize_t Lg,
                                       Py_ssize_t items, Py_ssize_t threads,
                                       Py_ssize_t itemsize) noexcept nogil:
    """Output channels per work item of the forward convolution by the own GEMM when the
    threads share an image by blocks of channels (0: by blocks of columns).  With fewer
    (image, group) items than threads and an image whose im2col fits IM2COL_BLOCK_MAX, each
    thread makes the whole image's im2col once and multiplies it by its own rows of the
    weights, packed by itself: column blocks had one thread pack all the weights first
    (written on one core, read on the other) and made the im2col of every block with its
    halo of rows; LeNet's conv2 at batch 1 (32 -> 64 5x5 on 14x14) took as long on 2
    threads as on 1."""
    cdef Py_ssize_t mr = fc_gemm_mr(), mb
    if GEMM_BLOCK_COLS > 0 or not CONV_CHAN_BLOCKS or items >= threads or mr == 0 \
            or K * P * itemsize > IM2COL_BLOCK_MAX or Lg < 2 * mr:
        return 0
    # one block per thread (2 or 4 per thread: 130 / 134 against 124 us on LeNet's conv2)
    mb = block_len(Lg, (threads + items - 1) // items, mr)
    return mb if mb < Lg else 0


# conv2d_forward by channel blocks where conv_chan_block says (False: always by column blocks)
cdef bint CONV_CHAN_BLOCKS = True


def set_conv_chan_blocks(bint on):
    """conv2d_forward's channel blocks (fewer images than threads) on or off; returns the
    previous setting.  For tests and A/B runs, while no kernel runs."""
    global CONV_CHAN_BLOCKS
    old = CONV_CHAN_BLOCKS
    CONV_CHAN_BLOCKS = on
    return old


def conv_block_scratch(Py_ssize_t K, Py_ssize_t P, Py_ssize_t Lg, Py_ssize_t items,
                       Py_ssize_t threads, Py_ssize_t itemsize, Py_ssize_t band, bint direct,
                       bint keep):
    """Values of one thread's scratch row for the own GEMM's forward convolution: one im2col
    block (none when direct), then, pooling (band > 0) without keeping the output, the
    block's Lg output planes."""
    return block_scratch(K, P, Lg, items, threads, itemsize, band, direct, keep)


cdef inline Py_ssize_t block_scratch(Py_ssize_t K, Py_ssize_t P, Py_ssize_t Lg,
                                     Py_ssize_t items, Py_ssize_t threads, Py_ssize_t itemsize,
                                     Py_ssize_t band, bint direct, bint keep) noexcept nogil:
    cdef Py_ssize_t nb = (P if conv_chan_block(K, P, Lg, items, threads, itemsize) else
                          pool_block_cols(P, K, items, threads, itemsize, band))
    cdef Py_ssize_t n = 0 if direct else K * col_ld(nb, itemsize)
    if band > 0 and not keep:
        n += Lg * nb
    return n


def conv2d_forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] weight,
                   const floating[::1] bias, floating[:, :, :, ::1] out,
                   floating[:, ::1] scratch, floating[::1] wpack,
                   Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                   Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t groups,
                   bint has_bias, int num_threads, bint relu=False,
                   floating[:, :, :, ::1] pool_out=None, Py_ssize_t pkH=0, Py_ssize_t pkW=0,
                   Py_ssize_t OH=0, Py_ssize_t OW=0):
    """out = conv2d(x, weight) (+ bias), then max(out, 0) when relu (own GEMM: in the
    micro-kernel's last store; BLAS: each image's output while it is still in cache); pH/pW
    are the top/left paddings.

    scratch: (threads, Cg*kH*kW*OH*OW) for BLAS, (threads, conv_block_scratch(...)) for the
    own GEMM; unused (may have 0 columns) for 1x1 stride-1 unpadded without pooling.
    wpack: groups * gemm_packed_size(L/groups, K) values for the own GEMM's packed weights;
    smaller (e.g. empty): BLAS does the GEMMs.  The own GEMM's work items are blocks of
    output columns of an (image, group), so threads share images when there are few.

    pool_out (own GEMM only): also pool_out = max_pool2d(out, (pkH, pkW)) (stride = kernel, no
    padding, floor mode), each block of the convolution pooled while it is in cache; out may
    then be None (the convolution's output is not kept; OH, OW give its size).
    """
    cdef ConvCall a
    conv_call_views(&a, x, weight, bias, out, scratch, has_bias, pool_out, pkH, pkW, OH, OW,
                    sH, sW, pH, pW, dH, dW, groups, relu, num_threads, "conv2d_forward")
    a.wpack = &wpack[0] if wpack.shape[0] > 0 else NULL
    a.nwpack = wpack.shape[0]
    conv_gemm_run(&a, <floating*> NULL)


cdef int conv_gemm_run(ConvCall* a, floating* tag) except -1:
    """conv2d_forward's work on the arrays and geometry of a (see ConvCall)."""
    cdef Py_ssize_t N = a.N, C = a.C, H = a.H, W = a.W, L = a.L, Cg = a.Cg
    cdef Py_ssize_t kH = a.kH, kW = a.kW, OH = a.OH, OW = a.OW, groups = a.groups
    cdef Py_ssize_t sH = a.sH, sW = a.sW, pH = a.pH, pW = a.pW, dH = a.dH, dW = a.dW
    cdef Py_ssize_t pkH = a.pkH, pkW = a.pkW
    cdef int num_threads = a.num_threads
    cdef bint keep = a.out != NULL, has_bias = a.b != NULL, relu = a.relu
    cdef Py_ssize_t Lg = L // groups, K = Cg * kH * kW, P = OH * OW
    cdef Py_ssize_t ncol = a.ncol, ld = col_ld(P, sizeof(floating))
    cdef bint direct = (kH == 1 and kW == 1 and sH == 1 and sW == 1 and pH == 0 and pW == 0
                        and OH == H and OW == W)
    cdef bint pooled = a.pool != NULL
    cdef const floating* xp = <const floating*> a.x
    cdef const floating* wp = <const floating*> a.w
    cdef const floating* bp = <const floating*> a.b
    cdef floating* op = <floating*> a.out
    cdef floating* sp = <floating*> a.scratch
    cdef floating* col
    cdef floating* Ap = NULL
    cdef Py_ssize_t item, n, g, psz = fc_gemm_packed_size(Lg, K)
    cdef Py_ssize_t nb, nblk, band = pkH * OW if pooled else 0
    cdef Py_ssize_t* bo = NULL
    cdef ConvJob cj
    if a.srows < num_threads:
        raise ValueError("conv2d_forward: scratch needs one row per thread")
    cdef Py_ssize_t mb = 0
    if psz > 0 and a.nwpack >= groups * psz:
        Ap = <floating*> a.wpack
        mb = conv_chan_block(K, P, Lg, N * groups, num_threads, sizeof(floating))
        if mb == 0:         # (by channel blocks, each item packs its own rows)
            for g in range(groups):
                pack_a(wp + g * Lg * K, K, 1, Lg, K, Ap + g * psz)
    elif pooled:
        raise ValueError("conv2d_forward: pooling needs the own GEMM (wpack)")
    if Ap != NULL:
        # work items: (image, group, block of columns); each block's im2col is made into the
        # thread's buffer and multiplied at once.  Or (image, group, block of channels).
        nb = P if mb else pool_block_cols(P, K, N * groups, num_threads, sizeof(floating),
                                          band)
        nblk = (P + nb - 1) // nb
        if ncol < block_scratch(K, P, Lg, N * groups, num_threads, sizeof(floating), band,
                                direct, keep):
            raise ValueError("conv2d_forward: scratch is smaller than one im2col block")
        cj.x, cj.A, cj.b, cj.out, cj.col = xp, Ap, bp, op, sp
        cj.pool = a.pool
        cj.ncol, cj.nblk, cj.nb, cj.C, cj.Cg, cj.H, cj.W, cj.L, cj.Lg = ncol, nblk, nb, C, Cg, H, W, L, Lg
        cj.kH, cj.kW, cj.sH, cj.sW, cj.pH, cj.pW, cj.dH, cj.dW = kH, kW, sH, sW, pH, pW, dH, dW
        cj.OH, cj.OW, cj.groups, cj.psz = OH, OW, groups, psz
        cj.pkH, cj.pkW, cj.POH, cj.POW = 0, 0, 0, 0
        if pooled:
            cj.pkH, cj.pkW, cj.POH, cj.POW = pkH, pkW, a.POH, a.POW
        cj.cbuf = 0 if direct else K * col_ld(nb, sizeof(floating))
        cj.has_bias, cj.direct, cj.relu, cj.dbl = has_bias, direct, relu, floating is double
        cj.keep = keep
        cj.bo = NULL
        cj.lde = col_ld(nb + (kH - 1) * dH * OW, sizeof(floating))
        if (not direct and sH == 1 and kH > 1 and fc_im2col_rows_ok()
                and Cg * kW * cj.lde <= K * col_ld(nb, sizeof(floating))):
            bo = tap_rows(Cg, kH, kW, dH, OW, cj.lde)
            if bo == NULL:
                raise MemoryError("conv2d_forward: im2col row table")
            cj.bo = bo
        cj.mb, cj.nmb, cj.w, cj.have, cj.packed = mb, 1, wp, NULL, NULL
        if mb:
            cj.nmb = (Lg + mb - 1) // mb
            cj.have = <Py_ssize_t*> malloc(num_threads * sizeof(Py_ssize_t))
            cj.packed = <unsigned char*> calloc(groups * cj.nmb, 1)
            if cj.have == NULL or cj.packed == NULL:
                free(bo)
                free(cj.have)
                free(cj.packed)
                raise MemoryError("conv2d_forward: per-thread tables")
            for item in range(num_threads):
                cj.have[item] = -1
        with nogil:
            fc_pool_run(num_threads, conv_block_item, &cj, N * groups * nblk * cj.nmb)
        free(bo)
        free(cj.have)
        free(cj.packed)
        return 0
    if not direct and ncol < K * ld:
        raise ValueError("conv2d_forward: scratch is smaller than one im2col matrix")
    with nogil, parallel(num_threads=num_threads):
        col = sp + threadid() * ncol
        for item in prange(N * groups, schedule='dynamic', chunksize=1):
            n = item // groups
            g = item % groups
            conv_item(xp + (n * C + g * Cg) * H * W, wp + g * Lg * K,
                      bp + g * Lg if has_bias else NULL, op + (n * L + g * Lg) * P, col,
                      Cg, H, W, Lg, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW, direct)
            if relu:
                relu_rows(op + (n * L + g * Lg) * P, 1, 0, Lg * P)
    return 0


cdef extern from "_direct.h":
    bint fc_direct_ok() nogil
    int fc_direct_np() nogil
    Py_ssize_t fc_direct_block(Py_ssize_t itemsize) nogil
    void fc_direct_rows_f(Py_ssize_t K, Py_ssize_t Lg, const float* w, const float* xp,
                          Py_ssize_t sH, Py_ssize_t Wp, Py_ssize_t sW, Py_ssize_t nrows,
                          Py_ssize_t OW, int np, const Py_ssize_t* off, float* out,
                          Py_ssize_t plane, const float* bias, int relu, float* acc) nogil
    void fc_direct_rows_d(Py_ssize_t K, Py_ssize_t Lg, const double* w, const double* xp,
                          Py_ssize_t sH, Py_ssize_t Wp, Py_ssize_t sW, Py_ssize_t nrows,
                          Py_ssize_t OW, int np, const Py_ssize_t* off, double* out,
                          Py_ssize_t plane, const double* bias, int relu, double* acc) nogil
    Py_ssize_t fc_direct_acc(Py_ssize_t OW, Py_ssize_t ML, Py_ssize_t itemsize) nogil
    Py_ssize_t fc_direct_kc_bytes, fc_direct_kc_min, fc_direct_kc2_bytes, fc_direct_kc2_min


# bytes of one item's padded input rows above which the direct convolution splits an image
# into bands of output rows
DEF DIRECT_BAND_MAX = 393216


# conv2d_direct's blocks of channels per (image, group) with fewer of those than threads:
# about 2 per thread (-1), never (0), or this many
cdef Py_ssize_t DIRECT_CHAN_ITEMS = -1


def set_direct_chan_items(Py_ssize_t n):
    """conv2d_direct's channel blocks per (image, group) when there are fewer of those than
    threads: -1 about 2 per thread (the default), 0 none (bands of rows), n > 0 that many
    (at most the group's blocks); returns the previous setting.  For tests and A/B runs,
    while no kernel runs; the scratch of conv2d's plans follows it (functional._PLANS.clear()
    after a change)."""
    global DIRECT_CHAN_ITEMS
    old = DIRECT_CHAN_ITEMS
    DIRECT_CHAN_ITEMS = n
    return old


def direct_ok():
    """Whether conv2d_direct can run (the own GEMM's AVX-512 or AVX2 level is in use)."""
    return bool(fc_direct_ok())


def direct_np():
    """Widest tile of conv2d_direct in output pixels at the level in use (14 at AVX-512, 6 at
    AVX2)."""
    return fc_direct_np()


def direct_block(Py_ssize_t itemsize):
    """Output channels per block of conv2d_direct at the level in use (2 vectors: 32 float /
    16 double at AVX-512, 16 / 8 at AVX2); a group's output channels must be a multiple."""
    return fc_direct_block(itemsize)


def set_direct_kc(Py_ssize_t nbytes, Py_ssize_t min_bytes, bint stride2=False):
    """Set the direct kernels' K blocking: where a block's packed weights take at least
    min_bytes, chunks of taps of at most nbytes of them (<= 0: all taps in one pass; the
    numbers are the same either way); stride2: the setting for stride 2 along the width at
    AVX2 (its own); returns the previous (nbytes, min_bytes).  For tests and measurements."""
    global fc_direct_kc_bytes, fc_direct_kc_min, fc_direct_kc2_bytes, fc_direct_kc2_min
    if stride2:
        old = fc_direct_kc2_bytes, fc_direct_kc2_min
        fc_direct_kc2_bytes, fc_direct_kc2_min = nbytes, min_bytes
    else:
        old = fc_direct_kc_bytes, fc_direct_kc_min
        fc_direct_kc_bytes, fc_direct_kc_min = nbytes, min_bytes
    return old


def direct_scratch(Py_ssize_t Cg, Py_ssize_t Rb, Py_ssize_t Wp, Py_ssize_t Lg,
                   Py_ssize_t rows, Py_ssize_t OW, bint keep, Py_ssize_t itemsize):
    """Values of one thread's scratch row for conv2d_direct (from direct_geometry's rows, Rb,
    Wp): the band's padded input rows, its output when not kept (a fused max-pool's), and
    the sums of a group of rows (fc_direct_acc)."""
    return dir_scratch(Cg, Rb, Wp, Lg, rows, OW, keep, itemsize)


cdef inline Py_ssize_t dir_scratch(Py_ssize_t Cg, Py_ssize_t Rb, Py_ssize_t Wp, Py_ssize_t Lg,
                                   Py_ssize_t rows, Py_ssize_t OW, bint keep,
                                   Py_ssize_t itemsize) noexcept nogil:
    cdef Py_ssize_t ML = fc_direct_block(itemsize)
    return Cg * Rb * Wp + (0 if keep else Lg * rows * OW) + fc_direct_acc(OW, ML, itemsize)


def direct_geometry(Py_ssize_t N, Py_ssize_t groups, Py_ssize_t Cg, Py_ssize_t H,
                    Py_ssize_t W, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                    Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t OH,
                    Py_ssize_t OW, Py_ssize_t threads, Py_ssize_t itemsize,
                    Py_ssize_t pkH=0, Py_ssize_t Lg=0):
    """(np, rows, Rb, Wp) of conv2d_direct: pixels per tile (OW in tiles of at most 14 at
    AVX-512, 6 at AVX2, evened out), output rows per work item (a whole image, unless its
    padded rows pass 384 KiB or several threads have fewer (image, group) items than 4
    each but not fewer than 1 with Lg output channels per group in 2 blocks or more; with a
    fused max-pool of pkH rows, whole windows of rows), padded rows and their length; a
    thread's scratch row holds direct_scratch(...) values.
    (A 5x5 on one 32x32 image ran 1.5x slower in 4 bands than whole on one thread.)"""
    cdef Py_ssize_t g[5]
    dir_geometry(N, groups, Cg, H, W, kH, kW, sH, sW, pW, dH, dW, OH, OW, threads, itemsize,
                 pkH, Lg, g)
    return g[0], g[1], g[2], g[3]


cdef void dir_geometry(Py_ssize_t N, Py_ssize_t groups, Py_ssize_t Cg, Py_ssize_t H,
                       Py_ssize_t W, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                       Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t OH,
                       Py_ssize_t OW, Py_ssize_t threads, Py_ssize_t itemsize,
                       Py_ssize_t pkH, Py_ssize_t Lg, Py_ssize_t* geo) noexcept nogil:
    """direct_geometry's (np, rows, Rb, Wp) into geo[0:4], and into geo[4] the output
    channels of a work item (0: a group's Lg), blocks of them, about 2 per thread, over all
    the rows when there are fewer (image, group) items than threads (batch 1: bands of 2
    rows, 7 for LeNet's conv2 on 2 threads, had it at 1.31x the one-thread speed)."""
    cdef Py_ssize_t NPX = fc_direct_np()
    cdef Py_ssize_t ntl = (OW + NPX - 1) // NPX
    cdef Py_ssize_t np = (OW + ntl - 1) // ntl
    cdef Py_ssize_t Wp = (ntl * np - 1) * sW + (kW - 1) * dW + 1, rows = OH, Rb, parts
    cdef Py_ssize_t ML = fc_direct_block(itemsize), nb, blocks = Lg // ML
    geo[4] = 0
    if Wp < pW + W:
        Wp = pW + W
    Rb = (rows - 1) * sH + (kH - 1) * dH + 1
    if Cg * Rb * Wp * itemsize > DIRECT_BAND_MAX:
        rows = (DIRECT_BAND_MAX // (Cg * Wp * itemsize) - (kH - 1) * dH - 1) // sH + 1
        rows = max(rows, 1)
    if threads > 1 and N * groups < threads and blocks > 1 and DIRECT_CHAN_ITEMS != 0:
        nb = min(blocks, (2 * threads + N * groups - 1) // (N * groups)
                 if DIRECT_CHAN_ITEMS < 0 else DIRECT_CHAN_ITEMS)
        geo[4] = (blocks + nb - 1) // nb * ML
    elif threads > 1 and N * groups < 4 * threads:
        parts = (4 * threads + N * groups - 1) // (N * groups)
        rows = min(rows, max((OH + parts - 1) // parts, 1))
    rows = min(rows, OH)
    if pkH > 0 and rows < OH:
        rows = max(rows // pkH, 1) * pkH
    Rb = (rows - 1) * sH + (kH - 1) * dH + 1
    geo[0], geo[1], geo[2], geo[3] = np, rows, Rb, Wp


cdef struct DirJob:
    # conv2d_direct on the pool: item = (image, group, band of `rows` output rows); the band's
    # zero-padded input rows (Cg x Rb x Wp) are made in the thread's scratch row.  With a
    # fused max-pool (pkH > 0; windows that tile the output, kernel == stride, floor mode),
    # bands are whole rows of windows, each pooled into `pool` once computed: from out, or
    # (not keep) from the band's output in the scratch row after the padded rows
    const void* x
    const void* w
    const void* b
    void* out
    void* pool
    void* pad
    const Py_ssize_t* off
    Py_ssize_t ncol, C, H, W, L, Cg, Lg, K, groups, sH, sW, pH, pW, OH, OW, rows, nband, Rb, Wp
    Py_ssize_t pkH, pkW, POH, POW
    Py_ssize_t lb, nlb          # output channels per item (a multiple of the block), items
    Py_ssize_t* have            # [tid]: the (image, group, band) whose padded rows are there
                                # (-1: none yet in this call, the padding not zeroed either)
    int np
    bint has_bias, relu, dbl, keep


cdef void dir_job_run(DirJob* j, Py_ssize_t i, int tid, floating* tag) noexcept nogil:
    cdef Py_ssize_t l0 = (i % j.nlb) * j.lb
    cdef Py_ssize_t ln = min(j.lb, j.Lg - l0)
    i = i // j.nlb      # (image, group, band)
    cdef Py_ssize_t ng = i // j.nband, r0 = (i % j.nband) * j.rows
    cdef Py_ssize_t n = ng // j.groups, g = ng % j.groups, nr = min(j.rows, j.OH - r0)
    cdef Py_ssize_t c, rr, ih, Wp = j.Wp, W = j.W, pW = j.pW
    cdef floating* xp = <floating*> j.pad + tid * j.ncol
    cdef floating* row
    cdef const floating* x = <const floating*> j.x + (n * j.C + g * j.Cg) * j.H * W
    cdef const floating* b = <const floating*> j.b + g * j.Lg if j.has_bias else NULL
    # the scratch row (direct_scratch): padded rows, [the band's output,] the sums (acc)
    cdef floating* out = xp + j.Cg * j.Rb * Wp
    cdef floating* acc = out + (0 if j.keep else j.Lg * j.rows * j.OW)
    cdef Py_ssize_t plane = j.OH * j.OW
    if j.keep:
        out = <floating*> j.out + ((n * j.L + g * j.Lg) * j.OH + r0) * j.OW
    else:       # only pooled: the rows of whole windows, into the scratch row
        nr = min(nr, j.POH * j.pkH - r0)
        if nr <= 0:
            return
        plane = nr * j.OW
    if j.have[tid] < 0:
        # the padding columns are never written after this: only the rows' middles change
        memset(xp, 0, j.Cg * j.Rb * Wp * sizeof(floating))
    if j.have[tid] != i:        # (the thread's last item had another band)
        j.have[tid] = i
        for c in range(j.Cg):
            for rr in range(j.Rb):
                row = xp + (c * j.Rb + rr) * Wp + pW
                ih = r0 * j.sH - j.pH + rr
                if ih < 0 or ih >= j.H:
                    memset(row, 0, W * sizeof(floating))
                else:
                    memcpy(row, x + (c * j.H + ih) * W, W * sizeof(floating))
    # output channels [l0, l0 + ln) of the group
    if b != NULL:
        b += l0
    out += l0 * plane
    if floating is float:
        fc_direct_rows_f(j.K, ln, <const float*> j.w + (g * j.Lg + l0) * j.K, xp, j.sH, Wp,
                         j.sW, nr, j.OW, j.np, j.off, out, plane, b, j.relu, acc)
    else:
        fc_direct_rows_d(j.K, ln, <const double*> j.w + (g * j.Lg + l0) * j.K, xp, j.sH, Wp,
                         j.sW, nr, j.OW, j.np, j.off, out, plane, b, j.relu, acc)
    if j.pkH > 0:
        pool_band(out, plane, ln, r0, nr, j.OW,
                  <floating*> j.pool + (n * j.L + g * j.Lg + l0) * j.POH * j.POW,
                  j.POH, j.POW, j.pkH, j.pkW)


cdef void dir_item(void* ctx, Py_ssize_t i, int tid) noexcept nogil:
    cdef DirJob* j = <DirJob*> ctx
    if j.dbl:
        dir_job_run(j, i, tid, <double*> NULL)
    else:
        dir_job_run(j, i, tid, <float*> NULL)


def conv2d_direct(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] weight,
                  const floating[::1] bias, floating[:, :, :, ::1] out,
                  floating[:, ::1] scratch, Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH,
                  Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t groups,
                  bint has_bias, int num_threads, bint relu=False,
                  floating[:, :, :, ::1] pool_out=None, Py_ssize_t pkH=0, Py_ssize_t pkW=0,
                  Py_ssize_t OH=0, Py_ssize_t OW=0):
    """conv2d_forward by the direct kernels (_direct.h; direct_ok() only): sW 1 or 2, the
    output channels of a group a multiple of direct_block(itemsize), paddings >= 0; the
    output's size gives the bottom and right padding (taps past the input read zeros).
    scratch: (threads, n) with n >= direct_scratch(...) of direct_geometry's values (which
    are recomputed here).

    pool_out: also pool_out = max_pool2d(out, (pkH, pkW)) (stride = kernel, no padding, floor
    mode), each band of rows pooled while it is in cache; out may then be None (the
    convolution's output is not kept; OH, OW give its size), as in conv2d_forward."""
    cdef ConvCall a
    conv_call_views(&a, x, weight, bias, out, scratch, has_bias, pool_out, pkH, pkW, OH, OW,
                    sH, sW, pH, pW, dH, dW, groups, relu, num_threads, "conv2d_direct")
    conv_direct_run(&a, <floating*> NULL)


cdef int conv_direct_run(ConvCall* a, floating* tag) except -1:
    """conv2d_direct's work on the arrays and geometry of a (see ConvCall)."""
    cdef Py_ssize_t N = a.N, C = a.C, H = a.H, W = a.W, L = a.L, Cg = a.Cg
    cdef Py_ssize_t kH = a.kH, kW = a.kW, OH = a.OH, OW = a.OW, groups = a.groups
    cdef Py_ssize_t sH = a.sH, sW = a.sW, pH = a.pH, pW = a.pW, dH = a.dH, dW = a.dW
    cdef Py_ssize_t pkH = a.pkH, pkW = a.pkW
    cdef int num_threads = a.num_threads
    cdef bint keep = a.out != NULL, pooled = a.pool != NULL, has_bias = a.b != NULL
    cdef bint relu = a.relu
    cdef const floating* wp = <const floating*> a.w
    cdef Py_ssize_t Lg = L // groups, K = Cg * kH * kW, ML = fc_direct_block(sizeof(floating))
    cdef Py_ssize_t l, c, kh, kw
    cdef DirJob j
    cdef floating* wd
    cdef Py_ssize_t* off
    if not fc_direct_ok():
        raise ValueError("conv2d_direct: needs the AVX-512 or AVX2 level of the own GEMM")
    if (sW != 1 and sW != 2) or Lg % ML or L % groups or C != Cg * groups or \
            sH < 1 or dH < 1 or \
            dW < 1 or pH < 0 or pW < 0 or OH < 0 or OW < 0:
        raise ValueError("conv2d_direct: unsupported geometry")
    # (typed: the offsets' loop below ran on Python ints, ~20 % of a batch-1 call)
    cdef Py_ssize_t geo[5]
    dir_geometry(N, groups, Cg, H, W, kH, kW, sH, sW, pW, dH, dW, OH, OW, num_threads,
                 sizeof(floating), pkH if pooled else 0, Lg, geo)
    cdef Py_ssize_t rows = geo[1], Rb = geo[2], Wp = geo[3]
    cdef int np_ = <int> geo[0]
    if a.srows < num_threads or \
            a.ncol < dir_scratch(Cg, Rb, Wp, Lg, rows, OW, keep, sizeof(floating)):
        raise ValueError("conv2d_direct: scratch is smaller than one band of padded rows")
    if N == 0 or L == 0 or OH == 0 or OW == 0:
        return 0
    wd = <floating*> malloc(L * K * sizeof(floating))
    off = <Py_ssize_t*> malloc(K * sizeof(Py_ssize_t))
    if wd == NULL or off == NULL:
        free(wd)
        free(off)
        raise MemoryError("conv2d_direct: packed weights")
    # weights of each group in blocks of ML output channels: wd[g][l // ML][k][l % ML], each
    # block a transpose of its ML x K rows (a scalar loop of strided stores had been 13 % of a
    # batch-1 call, 32 -> 64 5x5 on 14x14, Zen 3)
    for l in range(0, L, ML):
        if floating is float:
            fc_transpose_f(<const float*> wp + l * K, ML, K, K, <float*> wd + l * K, ML)
        else:
            fc_transpose_d(<const double*> wp + l * K, ML, K, K, <double*> wd + l * K, ML)
    for c in range(Cg):
        for kh in range(kH):
            for kw in range(kW):
                off[(c * kH + kh) * kW + kw] = (c * Rb + kh * dH) * Wp + kw * dW
    j.x, j.w, j.pad, j.off = a.x, wd, a.scratch, off
    j.out = a.out
    j.pool = a.pool
    j.pkH, j.pkW, j.POH, j.POW, j.keep = 0, 0, 0, 0, keep
    if pooled:
        j.pkH, j.pkW, j.POH, j.POW = pkH, pkW, a.POH, a.POW
    j.b = a.b
    j.ncol, j.C, j.H, j.W, j.L, j.Cg, j.Lg, j.K = a.ncol, C, H, W, L, Cg, Lg, K
    j.groups, j.sH, j.sW, j.pH, j.pW, j.OH, j.OW = groups, sH, sW, pH, pW, OH, OW
    j.rows, j.nband, j.Rb, j.Wp, j.np = rows, (OH + rows - 1) // rows, Rb, Wp, np_
    j.has_bias, j.relu, j.dbl = has_bias, relu, floating is double
    j.lb = geo[4] if geo[4] > 0 else Lg
    j.nlb = (Lg + j.lb - 1) // j.lb
    j.have = <Py_ssize_t*> malloc(max(num_threads, 1) * sizeof(Py_ssize_t))
    if j.have == NULL:
        free(wd)
        free(off)
        raise MemoryError("conv2d_direct: thread flags")
    for c in range(max(num_threads, 1)):
        j.have[c] = -1
    with nogil:
        fc_pool_run(num_threads, dir_item, &j, N * groups * j.nband * j.nlb)
    free(wd)
    free(off)
    free(j.have)
    return 0


cdef extern from "_winograd.h":
    void fc_wino_weights_f(const float* w, Py_ssize_t L, Py_ssize_t C, Py_ssize_t l0,
                           Py_ssize_t l1, float* U) nogil
    void fc_wino_weights_d(const double* w, Py_ssize_t L, Py_ssize_t C, Py_ssize_t l0,
                           Py_ssize_t l1, double* U) nogil
    bint fc_wino_finite_f(const float* x, Py_ssize_t n) nogil
    bint fc_wino_finite_d(const double* x, Py_ssize_t n) nogil
    void fc_wino_input_f(const float* x, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                         Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t TW, Py_ssize_t t0,
                         Py_ssize_t nt, Py_ssize_t ld, float* V, Py_ssize_t vs) nogil
    void fc_wino_input_d(const double* x, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                         Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t TW, Py_ssize_t t0,
                         Py_ssize_t nt, Py_ssize_t ld, double* V, Py_ssize_t vs) nogil
    void fc_wino_output_f(const float* M, Py_ssize_t L, Py_ssize_t TW, Py_ssize_t t0,
                          Py_ssize_t nt, Py_ssize_t ld, Py_ssize_t OH, Py_ssize_t OW,
                          const float* b, float* out, Py_ssize_t ms) nogil
    void fc_wino_output_d(const double* M, Py_ssize_t L, Py_ssize_t TW, Py_ssize_t t0,
                          Py_ssize_t nt, Py_ssize_t ld, Py_ssize_t OH, Py_ssize_t OW,
                          const double* b, double* out, Py_ssize_t ms) nogil
    # the weight gradient of F(2x2, 3x3): grad_out's transform and the last step
    void fc_wino_gout_f(const float* gy, Py_ssize_t L, Py_ssize_t OH, Py_ssize_t OW,
                        Py_ssize_t TW, Py_ssize_t t0, Py_ssize_t nt, Py_ssize_t ld, float* Z,
                        Py_ssize_t zs) nogil
    void fc_wino_gout_d(const double* gy, Py_ssize_t L, Py_ssize_t OH, Py_ssize_t OW,
                        Py_ssize_t TW, Py_ssize_t t0, Py_ssize_t nt, Py_ssize_t ld, double* Z,
                        Py_ssize_t zs) nogil
    void fc_wino_wgrad_f(const float* D, Py_ssize_t P, Py_ssize_t PS, Py_ssize_t C,
                         Py_ssize_t L, Py_ssize_t c, float* gw) nogil
    void fc_wino_wgrad_d(const double* D, Py_ssize_t P, Py_ssize_t PS, Py_ssize_t C,
                         Py_ssize_t L, Py_ssize_t c, double* gw) nogil
    void fc_wino5_gout_f(const float* gy, Py_ssize_t L, Py_ssize_t OH, Py_ssize_t OW,
                         Py_ssize_t TW, Py_ssize_t t0, Py_ssize_t nt, Py_ssize_t ld, float* Z,
                         Py_ssize_t zs) nogil
    void fc_wino5_gout_d(const double* gy, Py_ssize_t L, Py_ssize_t OH, Py_ssize_t OW,
                         Py_ssize_t TW, Py_ssize_t t0, Py_ssize_t nt, Py_ssize_t ld,
                         double* Z, Py_ssize_t zs) nogil
    void fc_wino5_wgrad_df(const double* D, Py_ssize_t P, Py_ssize_t PS, Py_ssize_t C,
                           Py_ssize_t L, Py_ssize_t c, float* gw) nogil
    void fc_wino5_wgrad_d(const double* D, Py_ssize_t P, Py_ssize_t PS, Py_ssize_t C,
                          Py_ssize_t L, Py_ssize_t c, double* gw) nogil
    # F(2x2, 5x5): the same arguments, 36 planes (and the output's fused ReLU and 2x2 max-pool)
    void fc_wino5_weights_f(const float* w, Py_ssize_t L, Py_ssize_t C, Py_ssize_t l0,
                            Py_ssize_t l1, float* U) nogil
    void fc_wino5_weights_d(const double* w, Py_ssize_t L, Py_ssize_t C, Py_ssize_t l0,
                            Py_ssize_t l1, double* U) nogil
    void fc_wino5_input_f(const float* x, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                          Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t TW, Py_ssize_t t0,
                          Py_ssize_t nt, Py_ssize_t ld, float* V, Py_ssize_t vs) nogil
    void fc_wino5_input_d(const double* x, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                          Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t TW, Py_ssize_t t0,
                          Py_ssize_t nt, Py_ssize_t ld, double* V, Py_ssize_t vs) nogil
    void fc_wino5_output_f(const float* M, Py_ssize_t L, Py_ssize_t TW, Py_ssize_t t0,
                           Py_ssize_t nt, Py_ssize_t ld, Py_ssize_t OH, Py_ssize_t OW,
                           const float* b, float* out, Py_ssize_t ms, int relu, float* pool,
                           Py_ssize_t POH, Py_ssize_t POW) nogil
    void fc_wino5_output_d(const double* M, Py_ssize_t L, Py_ssize_t TW, Py_ssize_t t0,
                           Py_ssize_t nt, Py_ssize_t ld, Py_ssize_t OH, Py_ssize_t OW,
                           const double* b, double* out, Py_ssize_t ms, int relu, double* pool,
                           Py_ssize_t POH, Py_ssize_t POW) nogil


cdef enum:
    WINO_PAD = 16    # values between the transformed planes, keeping them off 4 KiB strides


cdef inline Py_ssize_t wino_planes(Py_ssize_t r) noexcept nogil:
    """Transformed planes of Winograd F(2x2, r x r): (r + 1)^2, 16 for 3x3 and 36 for 5x5."""
    return (r + 1) * (r + 1)


cdef Py_ssize_t wino_chunk = 0       # tiles per chunk; 0: chosen by wino_chunk_tiles


def set_wino_chunk(Py_ssize_t tiles):
    """Tiles per Winograd chunk (0: the default rule of wino_chunk_tiles); returns the previous
    value.  For tests and benchmarks."""
    global wino_chunk
    old = wino_chunk
    wino_chunk = max(tiles, 0)
    return old


cdef inline Py_ssize_t wino_chunk_tiles(Py_ssize_t NT, Py_ssize_t items, int threads,
                                        Py_ssize_t nr) noexcept nogil:
    """Tiles per chunk for `items` (image, group) pairs of NT tiles each: whole images when
    there are at least two per thread (a chunk re-reads all 16 transformed weight matrices:
    a 128-channel float64 conv ran 0.95x in 64-tile chunks).  Fewer items (batch 1): about
    4 chunks per thread, each of whole GEMM column panels (nr tiles; 56-tile chunks, a panel
    and 3/4 each, made a 128-channel conv 0.88x), so that a worker that wakes late still
    finds work (the caller takes chunks too) and each chunk's transformed input and products
    stay in one core's cache (1.05x on 1 thread); but at least 2 panels, as every chunk
    reads all the transformed weights again (LeNet's conv2 at batch 1, 49 tiles, in chunks
    of 32 and 17 instead of 16, 16, 16 and 1: 1.11x on 2 threads, 1.03x on 1; wino_setup
    also joins a last chunk of under half a panel to the one before it).  Unless 2-panel
    chunks leave a thread without one: then one panel at least (the same conv on AVX-512,
    nr = 32: one chunk of 49 tiles, 2 threads no faster than 1; chunks of 32 and 17 1.5x)."""
    cdef Py_ssize_t per
    if wino_chunk > 0:
        return wino_chunk
    if items >= 2 * threads:
        return max(NT, 1)
    per = max(block_len(NT, (4 * threads + items - 1) // items, nr), 2 * nr)
    if items * ((NT + per - 1) // per) < threads:
        per = max(block_len(NT, (threads + items - 1) // items, nr), nr)
    return per


cdef void wino_tiles(const floating* x, const floating* U, const floating* Up,
                     const floating* b, floating* out, floating* work,
                     Py_ssize_t Cg, Py_ssize_t H, Py_ssize_t W, Py_ssize_t Lg,
                     Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t OH, Py_ssize_t OW,
                     Py_ssize_t t0, Py_ssize_t nt, Py_ssize_t r, bint relu, floating* pool,
                     Py_ssize_t POH, Py_ssize_t POW) noexcept nogil:
    """Tiles [t0, t0 + nt) of one (image, group) by Winograd F(2x2, r x r), r = 3 or 5 (see
    _winograd.h): their input transform, the (r + 1)^2 GEMMs and the output transform, in
    work; 5x5 only: relu, max(out, 0) as it is stored; pool (not NULL), the 2x2 stride-2
    max-pool of out into its POH x POW planes; out NULL: not stored."""
    cdef Py_ssize_t TW = (OW + 1) // 2, xi, planes = wino_planes(r)
    cdef Py_ssize_t ld = col_ld(nt, sizeof(floating))
    cdef Py_ssize_t vs = Cg * ld + WINO_PAD, ms = Lg * ld + WINO_PAD
    cdef floating* V = work
    cdef floating* M = work + planes * vs
    if nt <= 0:
        return
    if floating is float:
        if r == 5:
            fc_wino5_input_f(x, Cg, H, W, pH, pW, TW, t0, nt, ld, V, vs)
        else:
            fc_wino_input_f(x, Cg, H, W, pH, pW, TW, t0, nt, ld, V, vs)
    else:
        if r == 5:
            fc_wino5_input_d(x, Cg, H, W, pH, pW, TW, t0, nt, ld, V, vs)
        else:
            fc_wino_input_d(x, Cg, H, W, pH, pW, TW, t0, nt, ld, V, vs)
    for xi in range(planes):
        wino_gemm(U, Up, xi, V + xi * vs, M + xi * ms, Lg, Cg, nt, ld)
    if floating is float:
        if r == 5:
            fc_wino5_output_f(M, Lg, TW, t0, nt, ld, OH, OW, b, out, ms, relu, pool, POH, POW)
        else:
            fc_wino_output_f(M, Lg, TW, t0, nt, ld, OH, OW, b, out, ms)
    else:
        if r == 5:
            fc_wino5_output_d(M, Lg, TW, t0, nt, ld, OH, OW, b, out, ms, relu, pool, POH, POW)
        else:
            fc_wino_output_d(M, Lg, TW, t0, nt, ld, OH, OW, b, out, ms)


cdef void wino_gemm(const floating* U, const floating* Up, Py_ssize_t xi, const floating* V,
                    floating* M, Py_ssize_t Lg, Py_ssize_t Cg, Py_ssize_t NT,
                    Py_ssize_t ld) noexcept nogil:
    """M = U[xi] (Lg, Cg) @ V (Cg, NT), rows of V and M ld apart: by the own GEMM from the
    packed Up when not NULL."""
    if Up != NULL:
        own_gemm(Lg, 0, NT, Cg, Up + xi * fc_gemm_packed_size(Lg, Cg), V, ld, M, ld, NULL,
                 False)
    else:
        gemm_rm(False, False, Lg, NT, Cg, 1, U + xi * Lg * Cg, Cg, V, ld, 0, M, ld)


def set_pool_spin(long ns):
    """How long (ns) an idle worker of the caller-runs pool spins before it sleeps (default
    20000).  For benchmarks."""
    fc_pool_set_spin_ns(ns)


def set_pool_burst_spin(long ns):
    """How long (ns) an idle worker spins inside a burst of calls (pool_burst) before it
    sleeps (default 1000000).  For benchmarks and tests."""
    fc_pool_set_burst_ns(ns)


def pool_burst(int delta):
    """+1: a burst of kernel calls begins (the pool's idle workers keep spinning between its
    calls, up to set_pool_burst_spin), -1: it ends (they sleep after the usual spin); 0:
    nothing.  Returns the number of bursts now open (0 in builds without the pool)."""
    return fc_pool_burst(delta)


def pool_wake(int num_threads):
    """Wake the pool's sleeping workers (a burst's first call: they are awake by its first
    kernel); True when it did."""
    return fc_pool_wake(num_threads) != 0


def pool_sleeping():
    """The pool's workers asleep now (tests)."""
    return fc_pool_sleeping()


cdef struct WinoJob:
    # conv2d_winograd_forward on the pool (_pool.h) in two jobs.  Phase 0: the weights'
    # transform and packing in blocks of wb output channels (groups * nwb items).  Phase 1:
    # every (image, group) in chunks of tiles (wino_tiles; N * groups * nch items), each in
    # the scratch row of the thread that runs it, so that a chunk's transformed input and
    # GEMM results stay in one core's cache.  The first chunk of an (image, group) to run
    # checks it for infinities and NaN (fin, fc_once_*: the others wait for the answer);
    # if it has some, that chunk convolves it whole by im2col + GEMM and the others skip.
    const void* x
    const void* w
    void* U
    void* Up
    const void* b
    void* out
    void* work
    unsigned char* fin
    Py_ssize_t ncol, C, H, W, L, Cg, Lg, groups, pH, pW, OH, OW, NT, per, nch, psz, wb, nwb
    Py_ssize_t r        # the kernel's size: 3 or 5
    bint relu           # (5x5) max(out, 0) in the output transform
    void* pool          # (5x5) NULL, or the 2x2 max-pool's output, N x L x POH x POW
    Py_ssize_t POH, POW
    bint keep           # out is stored (else only pool)
    int phase
    bint dbl


cdef void wino_job_run(WinoJob* j, Py_ssize_t i, int tid, floating* tag) noexcept nogil:
    cdef floating* U = <floating*> j.U
    cdef floating* Up = <floating*> j.Up
    cdef const floating* x = <const floating*> j.x
    cdef const floating* w = <const floating*> j.w
    cdef const floating* b = <const floating*> j.b
    cdef Py_ssize_t l0, l1, xi, t0, g, n, k, item, Lg = j.Lg, Cg = j.Cg, HW = j.H * j.W
    cdef Py_ssize_t r = j.r, planes = wino_planes(j.r)
    if j.phase == 0:
        g = i // j.nwb
        l0 = (i % j.nwb) * j.wb
        l1 = min(l0 + j.wb, Lg)
        U = U + g * planes * Lg * Cg
        w = w + g * Lg * Cg * r * r
        if floating is float:
            if r == 5:
                fc_wino5_weights_f(w, Lg, Cg, l0, l1, U)
            else:
                fc_wino_weights_f(w, Lg, Cg, l0, l1, U)
        else:
            if r == 5:
                fc_wino5_weights_d(w, Lg, Cg, l0, l1, U)
            else:
                fc_wino_weights_d(w, Lg, Cg, l0, l1, U)
        if Up != NULL:
            for xi in range(planes):
                pack_a(U + xi * Lg * Cg + l0 * Cg, Cg, 1, l1 - l0, Cg,
                       Up + (g * planes + xi) * j.psz + l0 * Cg)
        return
    item = i // j.nch
    k = i % j.nch
    n = item // j.groups
    g = item % j.groups
    x = x + (n * j.C + g * Cg) * HW
    b = b + g * Lg if b != NULL else NULL
    cdef floating* out = NULL           # (not kept: only the pool is stored)
    cdef floating* work = <floating*> j.work + tid * j.ncol
    cdef floating* pool = NULL
    cdef bint ok
    if j.keep:
        out = <floating*> j.out + (n * j.L + g * Lg) * j.OH * j.OW
    if j.pool != NULL:
        pool = <floating*> j.pool + (n * j.L + g * Lg) * j.POH * j.POW
    if fc_once_begin(j.fin + item):
        if floating is float:
            ok = fc_wino_finite_f(x, Cg * HW)
        else:
            ok = fc_wino_finite_d(x, Cg * HW)
        fc_once_set(j.fin + item, ok)
        if not ok:
            if not j.keep:      # the image's output in the scratch after conv_item's im2col
                out = work + r * r * Cg * col_ld(j.OH * j.OW, sizeof(floating))
            conv_item(x, w + g * Lg * Cg * r * r, b, out, work, Cg, j.H, j.W, Lg, r, r, 1, 1,
                      j.pH, j.pW, 1, 1, j.OH, j.OW, False)
            if j.relu:
                relu_rows(out, 1, 0, Lg * j.OH * j.OW)
            if pool != NULL:
                pool_band(out, j.OH * j.OW, Lg, 0, j.OH, j.OW, pool, j.POH, j.POW, 2, 2)
            return
    elif not fc_once_get(j.fin + item):
        return
    t0 = k * j.per
    wino_tiles(x, U + g * planes * Lg * Cg, Up + g * planes * j.psz if Up != NULL else NULL,
               b, out, work, Cg, j.H, j.W, Lg, j.pH, j.pW, j.OH, j.OW, t0,
               j.per if k < j.nch - 1 else j.NT - t0, r, j.relu, pool, j.POH, j.POW)


cdef void wino_job_item(void* ctx, Py_ssize_t i, int tid) noexcept nogil:
    cdef WinoJob* j = <WinoJob*> ctx
    if j.dbl:
        wino_job_run(j, i, tid, <double*> NULL)
    else:
        wino_job_run(j, i, tid, <float*> NULL)


def transform_tag():
    """An int naming the code that makes Winograd's transformed, packed weights (the GEMM
    level, whose packing they follow, and the SIMD levels of the transform): functional's
    cache of them keys on it, so tests and benchmarks that switch levels never reuse them."""
    return (fc_gemm_level() * 2 + fc_simd_level()) * 2 + (fc_avx512_on != 0)


def address(a):
    """The address of a C-contiguous array's data (arr.ctypes.data without its 1.6 us)."""
    return <size_t> cbuf(a, False)


def same_data(a, b):
    """Whether the C-contiguous arrays a and b hold the same bytes, whatever their shapes and
    dtypes (memcmp: -0 and NaN payloads count as they are)."""
    cdef Py_buffer va, vb
    cdef int r = 1
    PyObject_GetBuffer(a, &va, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(b, &vb, PyBUF_SIMPLE)
    except BaseException:
        PyBuffer_Release(&va)
        raise
    if va.len == vb.len:
        with nogil:
            r = memcmp(va.buf, vb.buf, va.len) if va.len else 0
    PyBuffer_Release(&va)
    PyBuffer_Release(&vb)
    return r == 0


cdef void wino_setup(WinoJob* j, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                     Py_ssize_t L, Py_ssize_t Cg, Py_ssize_t r, Py_ssize_t groups,
                     Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t OH, Py_ssize_t OW,
                     int num_threads, bint dbl, bint packed, bint relu, bint keep,
                     bint pool) noexcept nogil:
    """The sizes of a WinoJob (conv2d_winograd_forward's, WinoStep's); the pointers (pool
    too, when pool) are the caller's to set."""
    j.C, j.H, j.W, j.L, j.Cg, j.Lg, j.groups = C, H, W, L, Cg, L // groups, groups
    j.pH, j.pW, j.OH, j.OW, j.r = pH, pW, OH, OW, r
    j.NT = ((OH + 1) // 2) * ((OW + 1) // 2)
    j.per = wino_chunk_tiles(j.NT, N * groups, num_threads, fc_gemm_nr(dbl))
    j.nch = (j.NT + j.per - 1) // j.per
    if j.nch > 1 and j.NT - (j.nch - 1) * j.per < fc_gemm_nr(dbl) // 2:
        j.nch -= 1          # a last chunk of under half a panel joins the one before it
    j.psz = fc_gemm_packed_size(j.Lg, Cg)
    j.relu, j.keep, j.dbl = relu, keep, dbl
    j.pool, j.POH, j.POW = NULL, (OH // 2 if pool else 0), (OW // 2 if pool else 0)
    j.wb = fc_gemm_mr() if packed else 8
    j.nwb = (j.Lg + j.wb - 1) // j.wb
    j.fin = NULL


cdef int wino_execute(WinoJob* j, Py_ssize_t N, int num_threads, bint ready) noexcept nogil:
    """Run a set-up WinoJob on N images: the weights' transform (unless ready), then the
    tiles; -1 when the finiteness flags cannot be allocated (nothing run)."""
    cdef unsigned char* fin = <unsigned char*> calloc(max(N * j.groups, 1), 1)
    if fin == NULL:
        return -1
    j.fin = fin
    j.phase = 0
    if not ready:
        fc_pool_run(num_threads, wino_job_item, j, j.groups * j.nwb)
    j.phase = 1
    fc_pool_run(num_threads, wino_job_item, j, N * j.groups * j.nch)
    j.fin = NULL
    free(fin)
    return 0


def conv2d_winograd_forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] weight,
                            const floating[::1] bias, floating[:, :, :, ::1] out,
                            floating[::1] u_scratch, floating[::1] upack,
                            floating[:, ::1] scratch,
                            Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t groups, bint has_bias,
                            int num_threads, bint ready=False, bint relu=False,
                            floating[:, :, :, ::1] pool_out=None, Py_ssize_t OH=0,
                            Py_ssize_t OW=0):
    """conv2d_forward for 3x3 or 5x5 kernels (r x r), stride 1, dilation 1, by Winograd
    F(2x2, r x r): a = (r + 1)^2 transformed planes (16 or 36).

    ready: u_scratch and upack already hold this weight's transform (functional's cache of
    them for small batches): the first job, which makes them, is skipped.  relu (5x5 only):
    out = max(out, 0) (NaN kept, -0 -> +0) in the output transform.  pool_out (5x5 only):
    also the 2x2 stride-2 max-pool of out (floor mode, NaN kept), each output tile being one
    window; out may then be None (not stored; OH, OW give its size) and the scratch needs
    Lg * OH * OW more values a thread (an image with an inf or NaN is convolved there).

    u_scratch: a * L * Cg (the transformed weights); upack: a * groups *
    gemm_packed_size(L/groups, Cg) for them packed for the own GEMM, smaller (empty): BLAS
    does the a GEMMs; scratch: (threads, n) with, T = ceil(OH/2) * ceil(OW/2) tiles at their
    col_ld, n >= max(a * (T * (Cg + Lg) + 32), r * r * Cg * col_ld(OH * OW)).

    Runs on the caller-runs pool (see WinoJob), not in OpenMP regions: a batch-1 call is
    short enough (0.4 ms) that waiting for a sleeping OpenMP worker at the region's barriers
    made it slower on 2 threads than on 1."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t L = weight.shape[0], Cg = weight.shape[1]
    cdef bint keep = out is not None
    if keep:
        OH, OW = out.shape[2], out.shape[3]
    check_pool_out("conv2d_winograd_forward", pool_out, keep, N, L, OH, OW, 2, 2)
    cdef Py_ssize_t P = OH * OW
    cdef Py_ssize_t Lg = L // groups, NT = ((OH + 1) // 2) * ((OW + 1) // 2)
    cdef Py_ssize_t ncol = scratch.shape[1]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &weight[0, 0, 0, 0]
    cdef const floating* bp = &bias[0] if has_bias else NULL
    cdef floating* up = &u_scratch[0]
    cdef floating* op = &out[0, 0, 0, 0] if keep else NULL
    cdef floating* sp = &scratch[0, 0]
    cdef floating* Up = NULL
    cdef Py_ssize_t psz = fc_gemm_packed_size(Lg, Cg), r = weight.shape[2]
    cdef Py_ssize_t planes = wino_planes(r)
    if (r != 3 and r != 5) or weight.shape[3] != r or u_scratch.shape[0] < planes * L * Cg:
        raise ValueError("conv2d_winograd_forward: 3x3 or 5x5 kernels and (r + 1)^2 L Cg "
                         "weight scratch")
    if ncol < planes * (col_ld(NT, sizeof(floating)) * (Cg + Lg) + 2 * WINO_PAD) or \
            ncol < r * r * Cg * col_ld(P, sizeof(floating)) + (0 if keep else Lg * P) or \
            scratch.shape[0] < num_threads:
        raise ValueError("conv2d_winograd_forward: scratch too small")
    if pool_out is not None and r != 5:
        raise ValueError("conv2d_winograd_forward: pool_out only with 5x5 kernels")
    if psz > 0 and upack.shape[0] >= planes * groups * psz:
        Up = &upack[0]
    if relu and r != 5:
        raise ValueError("conv2d_winograd_forward: relu only with 5x5 kernels")
    cdef WinoJob j
    wino_setup(&j, N, C, H, W, L, Cg, r, groups, pH, pW, OH, OW, num_threads,
               floating is double, Up != NULL, relu, keep, pool_out is not None)
    j.x, j.w, j.U, j.Up, j.b, j.out, j.work, j.ncol = xp, wp, up, Up, bp, op, sp, ncol
    if pool_out is not None:
        j.pool = &pool_out[0, 0, 0, 0]
    cdef int rc
    with nogil:
        rc = wino_execute(&j, N, num_threads, ready)
    if rc < 0:
        raise MemoryError("conv2d_winograd_forward: finiteness flags")


cdef Py_ssize_t wgrad_wino_chunk = 0      # tiles per chunk; 0: chosen by wgrad_wino_split


def set_wgrad_wino_chunk(Py_ssize_t tiles):
    """Tiles per chunk of conv2d_winograd_wgrad (0: the default rule); returns the previous
    value.  For tests and benchmarks, while no kernel runs."""
    global wgrad_wino_chunk
    old = wgrad_wino_chunk
    wgrad_wino_chunk = max(tiles, 0)
    return old


cdef Py_ssize_t WGRAD_WINO_K = 128      # fewest tiles a chunk's GEMMs sum where images allow


cdef inline Py_ssize_t wgrad_wino_split(Py_ssize_t N, Py_ssize_t NT, Py_ssize_t groups,
                                        int threads, Py_ssize_t nr,
                                        Py_ssize_t* nb) noexcept nogil:
    """Tiles per chunk of conv2d_winograd_wgrad (returned) and images per chunk (nb): a
    chunk's tiles are its GEMMs' K, after which each adds its (Cg, Lg) product into the
    lane's partial sums, and its transformed input and grad_out take (r + 1)^2 (Cg + Lg)
    values a tile.  Images of up to WGRAD_WINO_K / 2 tiles: several to a chunk, up to
    WGRAD_WINO_K tiles or a lane's share of the batch (a 512-channel 7x7, 16 tiles an image,
    ran 0.59x im2col + GEMM one image a chunk: the partial sums read and written every 16
    tiles).  Larger ones: whole images when there are at least two (image, group) items per
    thread, else about 4 chunks per thread of whole GEMM panels (nr tiles); either way
    chunks of at most about WGRAD_WINO_K tiles, evened out, so that a chunk's transforms
    stay under one image's im2col matrix (a 128-channel 28x28 image's whole 196 tiles took
    4.5 MB a thread against im2col's 3.6; chunks of 128 tiles ran 0.98-1.0x whole images)."""
    cdef Py_ssize_t per
    nb[0] = 1
    if wgrad_wino_chunk > 0:
        return min(wgrad_wino_chunk, max(NT, 1))
    if 2 * NT <= WGRAD_WINO_K and N > 1:
        nb[0] = max(min(WGRAD_WINO_K // NT, (N + threads - 1) // threads), 1)
        return max(NT, 1)
    if N * groups >= 2 * threads:
        per = max(NT, 1)
    else:
        per = max(block_len(NT, (4 * threads + N * groups - 1) // (N * groups), nr), nr)
    if per > WGRAD_WINO_K:
        per = block_len(NT, (NT + WGRAD_WINO_K - 1) // WGRAD_WINO_K, nr)
    return per


def set_wgrad_wino_k(Py_ssize_t k):
    """Most tiles of a chunk of conv2d_winograd_wgrad that joins several small images (see
    wgrad_wino_split); returns the previous value.  For tests and benchmarks."""
    global WGRAD_WINO_K
    old = WGRAD_WINO_K
    WGRAD_WINO_K = max(k, 1)
    return old


def wgrad_wino_cols(Py_ssize_t N, Py_ssize_t groups, Py_ssize_t Cg, Py_ssize_t Lg,
                    Py_ssize_t OH, Py_ssize_t OW, int num_threads, Py_ssize_t itemsize,
                    Py_ssize_t r=3):
    """Values of a thread's scratch row for conv2d_winograd_wgrad (an r x r kernel, 3 or 5):
    a chunk's transformed input and grad_out, then the lane's partial sums ((r + 1)^2
    groups Cg Lg, and groups Lg for the bias gradient); float32 5x5 (wgrad_wide): the
    partial sums in double, and a chunk's (r + 1)^2 Cg Lg products before they join them."""
    cdef Py_ssize_t a = wino_planes(r)
    cdef bint wide = wgrad_wide(itemsize, r)
    cdef Py_ssize_t NT = ((OH + 1) // 2) * ((OW + 1) // 2), nb
    cdef Py_ssize_t per = wgrad_wino_split(N, NT, groups, num_threads,
                                           fc_gemm_nr(itemsize == 8), &nb)
    # >= any chunk's col_ld (and FC_W5B more for the 5x5's spill: see wgrad_chunk)
    cdef Py_ssize_t ld = nb * min(per, NT) + 64 // itemsize + (8 if r == 5 else 0)
    cdef Py_ssize_t n = a * ((Cg + Lg) * ld + 2 * WINO_PAD) + a * groups * Cg * Lg + groups * Lg
    if wide:
        n += a * Cg * Lg + a * groups * Cg * Lg + 2     # (+ 2: the doubles' alignment)
    return n + n % 2


cdef inline bint wgrad_wide(Py_ssize_t itemsize, Py_ssize_t r) noexcept nogil:
    """Whether conv2d_winograd_wgrad keeps its partial sums in double: float32 5x5, whose
    float32 sums over every tile had 10-15x im2col's rounding (3e-5 of the largest value on
    LeNet's conv2 at batch 64; each chunk's GEMMs summing at most ~128 tiles in float32,
    then added to double sums: about 3x im2col's, in a NumPy model of it)."""
    return itemsize == 4 and r == 5


cdef struct WgradJob:
    # conv2d_winograd_wgrad on the pool in three jobs.  Phase 0: each of the `parts` scratch
    # rows' partial sums zeroed.  Phase 1: `parts` lanes, lane p running its share of the
    # chunks (every (image, group) in chunks of tiles, or blocks of nb images (nch = 1) for
    # each group) in order in scratch row p: a chunk's input and grad_out transforms, then
    # its a = (r + 1)^2 GEMMs added into the row's partial sums.  The rows follow the lanes,
    # not the threads that run them, so the sums' order, and the result, do not depend on
    # which thread ran what (the pool's caller takes whatever items its workers have not
    # started).  Phase 2: each (group, input channel)'s sums over the rows, transformed into
    # the weight gradient.
    const void* x
    const void* gy
    void* gw
    void* work
    # scratch rows of ncol values: V and Z at 0, (wide) a chunk's products at tof, the lane's
    # partial sums at dof (wide: doubles) and its bias sums at bof
    Py_ssize_t ncol, dof, tof, bof, N, C, H, W, L, Cg, Lg, groups, pH, pW, OH, OW, NT, per
    Py_ssize_t nch, nb
    bint wide
    Py_ssize_t r, a      # the kernel's size (3 or 5) and its planes, (r + 1)^2
    int parts, phase
    bint dbl, bias


cdef void wgrad_job_run(WgradJob* j, Py_ssize_t i, int tid, floating* tag) noexcept nogil:
    cdef Py_ssize_t Cg = j.Cg, Lg = j.Lg, CL = j.Cg * j.Lg, g
    cdef floating* row
    cdef floating* gw
    if j.phase == 0:
        row = <floating*> j.work + i * j.ncol
        memset(row + j.dof, 0, (j.ncol - j.dof) * sizeof(floating))
        return
    if j.phase == 2:
        g = i // Cg
        row = <floating*> j.work + j.dof + g * j.a * CL
        gw = <floating*> j.gw + g * Lg * Cg * j.r * j.r
        if floating is float:
            if j.wide:
                fc_wino5_wgrad_df(<double*> (<float*> j.work + j.dof) + g * j.a * CL, j.parts,
                                  j.ncol // 2, Cg, Lg, i % Cg, gw)
            else:
                fc_wino_wgrad_f(row, j.parts, j.ncol, Cg, Lg, i % Cg, gw)
        else:
            if j.r == 5:
                fc_wino5_wgrad_d(row, j.parts, j.ncol, Cg, Lg, i % Cg, gw)
            else:
                fc_wino_wgrad_d(row, j.parts, j.ncol, Cg, Lg, i % Cg, gw)
        return
    cdef Py_ssize_t it, total = (j.N + j.nb - 1) // j.nb * j.groups * j.nch
    for it in range(i * total // j.parts, (i + 1) * total // j.parts):
        wgrad_chunk(j, it, i, tag)


cdef void wgrad_chunk(WgradJob* j, Py_ssize_t i, Py_ssize_t lane,
                      floating* tag) noexcept nogil:
    """Chunk i of conv2d_winograd_wgrad in scratch row `lane` (see WgradJob)."""
    cdef Py_ssize_t Cg = j.Cg, Lg = j.Lg, CL = j.Cg * j.Lg, TW = (j.OW + 1) // 2, HW = j.H * j.W
    cdef Py_ssize_t OHW = j.OH * j.OW, item, k, n, n0, n1, g, t0, nt, ld, vs, zs, xi
    cdef floating* row
    cdef floating* V
    cdef floating* Z
    cdef floating* D
    cdef const floating* x
    cdef const floating* gy
    item = i // j.nch
    k = i % j.nch
    n0 = (item // j.groups) * j.nb
    n1 = min(n0 + j.nb, j.N)
    g = item % j.groups
    t0 = k * j.per
    nt = j.per if k < j.nch - 1 else j.NT - t0      # tiles of each image
    # (5x5: the input transform may store up to FC_W5B - 1 values past an image's last tile,
    # which the next image's tiles overwrite, or past the last one: room left for those)
    ld = col_ld((n1 - n0) * nt + (8 if j.r == 5 else 0), sizeof(floating))
    vs, zs = Cg * ld + WINO_PAD, Lg * ld + WINO_PAD
    row = <floating*> j.work + lane * j.ncol
    V, Z, D = row, row + j.a * vs, row + j.dof + g * j.a * CL
    cdef floating* gb = row + j.bof + g * Lg if j.bias else NULL
    cdef double* D2 = <double*> (row + j.dof) + g * j.a * CL
    cdef int acc = 1
    if j.wide:              # this chunk's products alone, then added to the double sums
        D, acc = row + j.tof, 0
    for n in range(n0, n1):      # each image's tiles nt columns after the one before
        x = <const floating*> j.x + (n * j.C + g * Cg) * HW
        gy = <const floating*> j.gy + (n * j.L + g * Lg) * OHW
        if floating is float:
            if j.r == 5:
                fc_wino5_input_f(x, Cg, j.H, j.W, j.pH, j.pW, TW, t0, nt, ld,
                                 V + (n - n0) * nt, vs)
                fc_wino5_gout_f(gy, Lg, j.OH, j.OW, TW, t0, nt, ld, Z + (n - n0) * nt, zs)
            else:
                fc_wino_input_f(x, Cg, j.H, j.W, j.pH, j.pW, TW, t0, nt, ld,
                                V + (n - n0) * nt, vs)
                fc_wino_gout_f(gy, Lg, j.OH, j.OW, TW, t0, nt, ld, Z + (n - n0) * nt, zs)
        else:
            if j.r == 5:
                fc_wino5_input_d(x, Cg, j.H, j.W, j.pH, j.pW, TW, t0, nt, ld,
                                 V + (n - n0) * nt, vs)
                fc_wino5_gout_d(gy, Lg, j.OH, j.OW, TW, t0, nt, ld, Z + (n - n0) * nt, zs)
            else:
                fc_wino_input_d(x, Cg, j.H, j.W, j.pH, j.pW, TW, t0, nt, ld,
                                V + (n - n0) * nt, vs)
                fc_wino_gout_d(gy, Lg, j.OH, j.OW, TW, t0, nt, ld, Z + (n - n0) * nt, zs)
    nt = (n1 - n0) * nt
    cdef Py_ssize_t sums = 7 if j.r == 5 else 5     # the plane of each tile's output sum
    if gb != NULL:
        for xi in range(Lg):
            gb[xi] += <floating> row_sum_double(Z + sums * zs + xi * ld, nt)
    for xi in range(j.a):
        # D[xi] (Cg, Lg) += V[xi] (Cg, nt) @ Z[xi]^T, Z[xi] (Lg, nt) read as B transposed
        if fc_gemm_level() > 0:
            if floating is float:
                fc_gemma_f(Cg, 0, Lg, nt, V + xi * vs, ld, Z + xi * zs, ld, D + xi * CL, Lg,
                           acc | GEMM_BT)
            else:
                fc_gemma_d(Cg, 0, Lg, nt, V + xi * vs, ld, Z + xi * zs, ld, D + xi * CL, Lg,
                           acc | GEMM_BT)
        else:
            gemm_rm(False, True, Cg, Lg, nt, 1, V + xi * vs, ld, Z + xi * zs, ld, acc,
                    D + xi * CL, Lg)
    if j.wide:              # (wide: D was =, not +=)
        for xi in range(j.a * CL):
            D2[xi] += D[xi]


cdef void wgrad_job_item(void* ctx, Py_ssize_t i, int tid) noexcept nogil:
    cdef WgradJob* j = <WgradJob*> ctx
    if j.dbl:
        wgrad_job_run(j, i, tid, <double*> NULL)
    else:
        wgrad_job_run(j, i, tid, <float*> NULL)


def conv2d_winograd_wgrad(const floating[:, :, :, ::1] grad_out,
                          const floating[:, :, :, ::1] x, floating[:, :, :, ::1] gw_out,
                          floating[::1] gb_out, floating[:, ::1] scratch, Py_ssize_t pH,
                          Py_ssize_t pW, Py_ssize_t groups, int num_threads):
    """The weight gradient (and, when gb_out is not empty, the bias gradient) of a 3x3 or
    5x5 (r x r, gw_out's) stride-1 undilated conv2d by Winograd F(2x2, r x r) (see
    _winograd.h), x (N, C, H, W) and grad_out (N, L, OH, OW) with top and left paddings pH,
    pW (negative: cropping); gw_out (L, C / groups, r, r), gb_out (L,) written.  Returns
    False, gw_out and gb_out then holding no answer, when the result has an infinity or NaN:
    an infinity or NaN in x or grad_out reaches some of it (one in a transformed tile makes
    its whole row of products non-finite, inf * 0 included, and every plane reaches some
    taps), as does an overflow of the transforms' larger terms; the caller then computes
    both the usual way (Winograd would mix them into NaN where direct sums give +-inf, and
    into every tap).  Checking the result (Lg Cg r^2 values) instead of both inputs saved
    the inputs' extra pass (5 % of a 64-channel 32x32 batch's weight gradient).

    scratch: (threads, n) with n >= wgrad_wino_cols(...) for the same sizes and threads.
    Runs on the caller-runs pool, like conv2d_winograd_forward."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t L = grad_out.shape[1], OH = grad_out.shape[2], OW = grad_out.shape[3]
    if groups < 1 or C % groups or L % groups or grad_out.shape[0] != N or \
            gw_out.shape[0] != L or gw_out.shape[1] * groups != C or \
            gw_out.shape[2] not in (3, 5) or gw_out.shape[3] != gw_out.shape[2] or \
            (gb_out.shape[0] != 0 and gb_out.shape[0] != L):
        raise ValueError("conv2d_winograd_wgrad: shapes")
    cdef Py_ssize_t Cg = C // groups, Lg = L // groups, r = gw_out.shape[2]
    if num_threads < 1 or scratch.shape[0] < num_threads or scratch.shape[1] < \
            wgrad_wino_cols(N, groups, Cg, Lg, OH, OW, num_threads, sizeof(floating), r):
        raise ValueError("conv2d_winograd_wgrad: scratch too small")
    if N == 0:
        gw_out[...] = 0
        if gb_out.shape[0]:
            gb_out[...] = 0
        return True
    cdef WgradJob j
    j.x, j.gy, j.gw, j.work = &x[0, 0, 0, 0], &grad_out[0, 0, 0, 0], &gw_out[0, 0, 0, 0], \
        &scratch[0, 0]
    j.C, j.H, j.W, j.L, j.Cg, j.Lg, j.groups = C, H, W, L, Cg, Lg, groups
    j.pH, j.pW, j.OH, j.OW = pH, pW, OH, OW
    j.NT = ((OH + 1) // 2) * ((OW + 1) // 2)
    j.per = wgrad_wino_split(N, j.NT, groups, num_threads, fc_gemm_nr(floating is double),
                             &j.nb)
    j.nch = (j.NT + j.per - 1) // j.per
    j.N = N
    j.ncol = scratch.shape[1]
    j.r, j.a, j.wide = r, wino_planes(r), wgrad_wide(sizeof(floating), r)
    j.bof = j.ncol - groups * Lg
    j.dof = j.bof - j.a * groups * Cg * Lg * (2 if j.wide else 1)
    j.dof -= j.dof % 2
    j.tof = j.dof - j.a * Cg * Lg
    j.parts, j.dbl, j.bias = num_threads, floating is double, gb_out.shape[0] > 0
    cdef Py_ssize_t i, p
    cdef bint ok
    cdef floating s
    with nogil:
        j.phase = 0
        fc_pool_run(num_threads, wgrad_job_item, &j, num_threads)
        j.phase = 1
        fc_pool_run(num_threads, wgrad_job_item, &j, num_threads)
        j.phase = 2
        fc_pool_run(num_threads, wgrad_job_item, &j, groups * Cg)
        if floating is float:
            ok = fc_wino_finite_f(<float*> j.gw, L * Cg * r * r)
        else:
            ok = fc_wino_finite_d(<double*> j.gw, L * Cg * r * r)
        if ok and j.bias:
            for i in range(L):
                s = 0
                for p in range(num_threads):
                    s = s + scratch[p, j.bof + i]
                gb_out[i] = s
            if floating is float:
                ok = fc_wino_finite_f(&gb_out[0], L)
            else:
                ok = fc_wino_finite_d(&gb_out[0], L)
    return ok


cdef inline double row_sum_double(const floating* a, Py_ssize_t n) noexcept nogil:
    """a[0] + ... + a[n-1] in double, four interleaved partial sums (one serial chain of
    double adds was 2.4 % of a transposed convolution's forward+backward, its bias gradient)."""
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 = s0 + a[i]
        s1 = s1 + a[i + 1]
        s2 = s2 + a[i + 2]
        s3 = s3 + a[i + 3]
        i = i + 4
    while i < n:
        s0 = s0 + a[i]
        i = i + 1
    return (s0 + s1) + (s2 + s3)


cdef inline floating row_sum(const floating* a, Py_ssize_t n) noexcept nogil:
    """a[0] + ... + a[n-1] in four interleaved partial sums (one serial chain of adds was 3 %
    of a LeNet training step: 4 cycles of latency per value)."""
    cdef floating s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 = s0 + a[i]
        s1 = s1 + a[i + 1]
        s2 = s2 + a[i + 2]
        s3 = s3 + a[i + 3]
        i = i + 4
    while i < n:
        s0 = s0 + a[i]
        i = i + 1
    return (s0 + s1) + (s2 + s3)


cdef struct WgJob:
    # conv2d_backward's weight (and bias) gradient when the (image, group) items are fewer
    # than the threads, on the caller-runs pool.  Phase 0: grad_out transposed into T, in
    # column blocks of pc output positions (items * npc items), then the bias sums (items
    # more).  Phase 1: (item, block of cb input channels): that block's rows of the im2col
    # matrix, made in the thread's scratch row, times T: rows of grad_w^T, which no other
    # item touches.  Image n's sums go to partial row n (not the running thread's: with
    # dynamic scheduling two images' sums then met in one row in either order, and the
    # results changed from run to run in the last bits); there are more rows than images.
    const void* x
    const void* gy
    void* T
    void* gw
    void* gb
    void* col
    Py_ssize_t C, H, W, L, Cg, Lg, groups, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW
    Py_ssize_t P, ld, ldt, items, pc, npc, cb, ncb, ncol, nw, nb
    bint need_b
    int phase
    bint dbl


cdef void wg_run(WgJob* j, Py_ssize_t i, int tid, floating* tag) noexcept nogil:
    cdef Py_ssize_t item, n, g, p0, p1, c0, c1, l, k0, P = j.P, Lg = j.Lg, K = j.Cg * j.kH * j.kW
    cdef const floating* gy
    cdef floating* T = <floating*> j.T
    cdef floating* col
    if j.phase == 0:
        if i < j.items * j.npc:
            item = i // j.npc
            p0 = (i % j.npc) * j.pc
            p1 = min(p0 + j.pc, P)
            n = item // j.groups
            g = item % j.groups
            gy = <const floating*> j.gy + (n * j.L + g * Lg) * P
            if floating is float:
                fc_transpose_f(gy + p0, Lg, p1 - p0, P, T + (item * P + p0) * j.ldt, j.ldt)
            else:
                fc_transpose_d(gy + p0, Lg, p1 - p0, P, T + (item * P + p0) * j.ldt, j.ldt)
        else:
            item = i - j.items * j.npc
            n = item // j.groups
            g = item % j.groups
            gy = <const floating*> j.gy + (n * j.L + g * Lg) * P
            for l in range(Lg):
                (<floating*> j.gb)[n * j.nb + g * Lg + l] += row_sum(gy + l * P, P)
        return
    item = i // j.ncb
    c0 = (i % j.ncb) * j.cb
    c1 = min(c0 + j.cb, j.Cg)
    n = item // j.groups
    g = item % j.groups
    col = <floating*> j.col + tid * j.ncol
    k0 = c0 * j.kH * j.kW
    im2col(<const floating*> j.x + (n * j.C + g * j.Cg + c0) * j.H * j.W, c1 - c0, j.H, j.W,
           j.kH, j.kW, j.sH, j.sW, j.pH, j.pW, j.dH, j.dW, j.OH, j.OW, col, j.ld)
    # grad_w[g]^T rows k0.. (K, Lg) += col ((c1 - c0) kH kW, P) @ T[item] (P, Lg), or with
    # grad_out[n, g] (Lg, P) read as that B transposed (T NULL: no phase-0 transposes)
    cdef const floating* B = <const floating*> j.gy + (n * j.L + g * Lg) * P
    cdef Py_ssize_t ldb = P
    cdef int acc = 1 | GEMM_BT
    cdef floating* gw = <floating*> j.gw + n * j.nw + g * Lg * K + k0 * Lg
    if K < WGRAD_DOT_K:         # (as wgrad_own: few taps by dot products)
        if floating is float:
            fc_wdot_f((c1 - c0) * j.kH * j.kW, Lg, P, col, j.ld, NULL, B, P, gw)
        else:
            fc_wdot_d((c1 - c0) * j.kH * j.kW, Lg, P, col, j.ld, NULL, B, P, gw)
        return
    if T != NULL:
        B, ldb, acc = T + item * P * j.ldt, j.ldt, 1
    if floating is float:
        fc_gemma_f((c1 - c0) * j.kH * j.kW, 0, Lg, P, col, j.ld, B, ldb, gw, Lg, acc)
    else:
        fc_gemma_d((c1 - c0) * j.kH * j.kW, 0, Lg, P, col, j.ld, B, ldb, gw, Lg, acc)


cdef void wg_item(void* ctx, Py_ssize_t i, int tid) noexcept nogil:
    cdef WgJob* j = <WgJob*> ctx
    if j.dbl:
        wg_run(j, i, tid, <double*> NULL)
    else:
        wg_run(j, i, tid, <float*> NULL)


def conv2d_backward(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
                    const floating[:, :, :, ::1] weight, const floating[::1] init,
                    floating[:, :, :, ::1] grad_x_out,
                    floating[:, ::1] grad_w_part, floating[:, ::1] grad_b_part,
                    floating[:, ::1] scratch, floating[::1] wpack,
                    Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                    Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t groups,
                    bint need_x, bint need_w, bint need_b, bint has_init, int num_threads,
                    int wthreads=0):
    """Gradients of y = conv2d(x, weight): any of grad_x, grad_weight, grad_bias.

    The geometry comes from ``grad_out`` (N, L, OH, OW) and from ``grad_x_out`` when need_x,
    else from ``x`` (both are (N, C, H, W)); ``x`` is only read when need_w, ``grad_x_out``
    only written when need_x, so an unneeded one may be a dummy (1, 1, 1, 1) array.  ``grad_x_out`` is fully
    written when need_x: channel c starts at ``init[c]`` when has_init (else 0) and receives
    col2im(weight^T @ grad_out); this is exactly the forward pass of a transposed convolution.
    grad_w_part (threads, L*K) and grad_b_part (threads, L) must be zeroed: thread t adds its
    share to row t, and the caller sums the rows.  wthreads > N * groups: the weight and bias
    gradients by that many threads in blocks of input channels (WgJob; the own GEMM's
    weight gradient only), the workspaces then need max(num_threads, wthreads) rows.  Returns True when those rows hold each
    group's grad_w transposed, (K, L/groups) (the own GEMM's layout), False for (L/groups, K).  wpack: groups * gemm_packed_size(K, L/groups)
    values, for weight^T packed for the own GEMM of grad_x; smaller (empty): BLAS.
    """
    cdef Py_ssize_t N = grad_out.shape[0], L = grad_out.shape[1]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3]
    # the conv input's geometry: from grad_x_out when it is computed, else from x
    cdef Py_ssize_t C = grad_x_out.shape[1] if need_x else x.shape[1]
    cdef Py_ssize_t H = grad_x_out.shape[2] if need_x else x.shape[2]
    cdef Py_ssize_t W = grad_x_out.shape[3] if need_x else x.shape[3]
    cdef Py_ssize_t Cg = weight.shape[1], kH = weight.shape[2], kW = weight.shape[3]
    cdef Py_ssize_t Lg = L // groups, K = Cg * kH * kW, P = OH * OW
    cdef Py_ssize_t ld = col_ld(P, sizeof(floating))
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
    cdef Py_ssize_t item, n, g, l, tid, psz = fc_gemm_packed_size(K, Lg)
    cdef floating* Ap = NULL
    # the weight gradient by the own GEMM: grad_w[g]^T (K, Lg) += col (K, P) @ grad_out^T
    # (P, Lg), the im2col matrix (or x) read in place, grad_out's block read as B transposed
    # (or, set_wgrad_bt(False), transposed after the im2col matrix first)
    cdef Py_ssize_t ldt = col_ld(Lg, sizeof(floating)), cend = 0 if direct else K * ld
    cdef bint wown = (need_w and WGRAD_OWN and fc_gemm_level() > 0 and wgrad_own_ok(K)
                      and ncol >= cend + wgrad_extra(Lg, P, sizeof(floating)))
    # a big im2col matrix in blocks of output rows, where every part runs the own GEMM
    cdef Py_ssize_t rb = block_rows(K, OH, OW, sizeof(floating))
    cdef bint bw = False, bx = False
    if has_init:
        ip = &init[0]
    if need_x and psz > 0 and wpack.shape[0] >= groups * psz:
        Ap = &wpack[0]
        for g in range(groups):
            # weight[g]^T: element (k, l) at weight[g, l, k]
            pack_a(wp + g * Lg * K, 1, K, K, Lg, Ap + g * psz)
    if (need_w or need_x) and not direct and ncol < K * ld:
        raise ValueError("conv2d_backward: scratch is smaller than one im2col matrix")
    cdef int rows = max(num_threads, wthreads)
    if scratch.shape[0] < rows or (need_w and (grad_w_part.shape[0] < rows or nw < L * K)) \
            or (need_b and (grad_b_part.shape[0] < rows or nb < L)):
        raise ValueError("conv2d_backward: workspaces need one row per thread")
    cdef WgJob wj
    cdef floating* T
    if wown and not direct and N * groups < wthreads and WGRAD_SPLIT:
        # fewer (image, group) items than threads (batch 1): the weight gradient in blocks of
        # input channels on the pool (the item loop below would leave the other threads idle)
        T = NULL
        if not WGRAD_BT and K >= WGRAD_DOT_K:
            T = <floating*> malloc(N * groups * P * ldt * sizeof(floating))
            if T == NULL:
                raise MemoryError("conv2d_backward: transposed grad_out")
        wj.x = xp
        wj.gy = gyp
        wj.T = T
        wj.gw = gwp
        wj.gb = gbp
        wj.col = sp
        wj.C, wj.H, wj.W, wj.L, wj.Cg, wj.Lg, wj.groups = C, H, W, L, Cg, Lg, groups
        wj.kH, wj.kW, wj.sH, wj.sW, wj.pH, wj.pW, wj.dH, wj.dW = kH, kW, sH, sW, pH, pW, dH, dW
        wj.OH, wj.OW, wj.P, wj.ld, wj.ldt = OH, OW, P, ld, ldt
        wj.items = N * groups
        wj.npc = max(1, min(4 * wthreads // wj.items, P // 256))
        wj.pc = (P + wj.npc - 1) // wj.npc
        wj.npc = (P + wj.pc - 1) // wj.pc if T != NULL else 0
        wj.cb = max(1, Cg * wj.items // (4 * wthreads))
        wj.cb = min(wj.cb, max(1, IM2COL_BLOCK_MAX // (kH * kW * ld * sizeof(floating))))
        wj.ncb = (Cg + wj.cb - 1) // wj.cb
        wj.ncol, wj.nw, wj.nb = ncol, nw, nb
        wj.dbl = floating is double
        with nogil:
            wj.phase = 0      # (no items without T and bias)
            fc_pool_run(wthreads, wg_item, &wj, wj.items * (wj.npc + (1 if need_b else 0)))
            wj.phase = 1
            fc_pool_run(wthreads, wg_item, &wj, wj.items * wj.ncb)
        free(T)
        need_w = False
        need_b = False
    # which parts run in blocks (each part's numbers do not depend on the other's presence)
    bw = rb < OH and not direct and BACKWARD_BLOCKS and need_w and wown
    bx = rb < OH and not direct and BACKWARD_BLOCKS and need_x and Ap != NULL
    # the weight gradient from im2col rows shared by the row taps (see conv2d_forward)
    cdef Py_ssize_t lde = col_ld(P + (kH - 1) * dH * OW, sizeof(floating))
    cdef Py_ssize_t* bo = NULL
    if (need_w and wown and not bw and not direct and sH == 1 and kH > 1
            and fc_im2col_rows_ok() and Cg * kW * lde <= cend):
        bo = tap_rows(Cg, kH, kW, dH, OW, lde)
        if bo == NULL:
            raise MemoryError("conv2d_backward: im2col row table")
    with nogil, parallel(num_threads=num_threads):
        tid = threadid()
        col = sp + tid * ncol
        gw = gwp + tid * nw
        gb = gbp + tid * nb
        for item in prange(N * groups, schedule='static'):
            n = item // groups
            g = item % groups
            gyg = gyp + (n * L + g * Lg) * P
            if bw or bx:
                gxg = gxp + (n * C + g * Cg) * H * W
                if bx:
                    fill_channels(gxg, Cg, H * W, (ip + g * Cg) if has_init else NULL)
                backward_blocks(xp + (n * C + g * Cg) * H * W, gyg, Ap + g * psz, gxg,
                                gw + g * Lg * K, col, col + cend, Cg, H, W, Lg, kH, kW, sH, sW,
                                pH, pW, dH, dW, OH, OW, rb, ldt, bw, bx)
            if need_w and not bw and bo != NULL:
                wgrad_rows(xp + (n * C + g * Cg) * H * W, Cg, H, W, kH, kW, sW, pH, pW, dH,
                           dW, OH, OW, bo, lde, col, gyg, Lg, col + cend, ldt,
                           gw + g * Lg * K)
            elif need_w and not bw:
                src = xp + (n * C + g * Cg) * H * W
                if not direct:
                    im2col(src, Cg, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW, col, ld)
                    src = col
                if wown:
                    # grad_w[g]^T (K, Lg) += col (K, P) @ grad_out[n, g]^T (P, Lg)
                    wgrad_own(src, P if direct else ld, K, gyg, Lg, P, P, col + cend, ldt,
                              gw + g * Lg * K, NULL)
                else:
                    # grad_w[g] (Lg, K) += grad_out[n, g] (Lg, P) @ col^T (P, K)
                    gemm_rm(False, True, Lg, K, P, 1, gyg, P, src, P if direct else ld, 1,
                            gw + g * Lg * K, K)
            if need_b:
                for l in range(Lg):
                    gb[g * Lg + l] += row_sum(gyg + l * P, P)
            if need_x and not bx:
                gxg = gxp + (n * C + g * Cg) * H * W
                if Ap != NULL:
                    # the same products by the own GEMM, the init values as its bias
                    if direct:
                        own_gemm(K, 0, P, Lg, Ap + g * psz, gyg, P, gxg, P,
                                 (ip + g * Cg) if has_init else NULL, GEMM_PACKB)
                    else:
                        own_gemm(K, 0, P, Lg, Ap + g * psz, gyg, P, col, ld, NULL, GEMM_PACKB)
                        fill_channels(gxg, Cg, H * W, (ip + g * Cg) if has_init else NULL)
                        col2im(col, Cg, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW, gxg,
                               ld)
                elif direct:
                    # grad_x[n, g] (Cg, HW) = w[g]^T (Cg, Lg) @ grad_out[n, g] (Lg, HW)
                    if has_init:
                        fill_channels(gxg, Cg, P, ip + g * Cg)
                    gemm_rm(True, False, K, P, Lg, 1, wp + g * Lg * K, K, gyg, P,
                            1 if has_init else 0, gxg, P)
                else:
                    gemm_rm(True, False, K, P, Lg, 1, wp + g * Lg * K, K, gyg, P, 0, col, ld)
                    fill_channels(gxg, Cg, H * W, (ip + g * Cg) if has_init else NULL)
                    col2im(col, Cg, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW, gxg, ld)
    free(bo)
    return wown


def conv_transpose2d_backward(const floating[:, :, :, ::1] grad_out,
                              const floating[:, :, :, ::1] x,
                              const floating[:, :, :, ::1] weight,
                              floating[:, :, :, ::1] grad_x_out,
                              floating[:, ::1] grad_w_part,
                              floating[:, ::1] scratch, floating[::1] wpack,
                              Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                              Py_ssize_t dH, Py_ssize_t dW, Py_ssize_t groups,
                              bint need_x, bint need_w, int num_threads):
    """Gradients of y = conv_transpose2d(x, weight) with one im2col of grad_out per item.

    A transposed convolution is the data-gradient of a convolution whose input is y and whose
    output is x, so with cols = im2col(grad_out):
    grad_x[n, g] = weight[g] (Cin_g, K) @ cols, grad_w[g] += x[n, g] (Cin_g, HW) @ cols^T.
    weight is (Cin, Cout_g, kH, kW); grad_w_part (threads, Cin*K) zeroed.  wpack: groups *
    gemm_packed_size(Cin/groups, K) values for weight packed for the own GEMM of grad_x;
    smaller (empty): BLAS.  Returns True when grad_w_part's rows hold each group's grad_w
    transposed, (K, Cin/groups) (the own GEMM's layout; scratch rows have wgrad_scratch
    more values), False for (Cin/groups, K).
    """
    cdef Py_ssize_t N = x.shape[0], Cin = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t Cout = grad_out.shape[1], OH = grad_out.shape[2], OW = grad_out.shape[3]
    cdef Py_ssize_t Cog = weight.shape[1], kH = weight.shape[2], kW = weight.shape[3]
    cdef Py_ssize_t Cig = Cin // groups, K = Cog * kH * kW, P = H * W
    cdef Py_ssize_t ld = col_ld(P, sizeof(floating))
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
    cdef Py_ssize_t item, n, g, psz = fc_gemm_packed_size(Cig, K)
    cdef floating* Ap = NULL
    # the weight gradient by the own GEMM as in conv2d_backward (x's block transposed)
    cdef Py_ssize_t ldt = col_ld(Cig, sizeof(floating)), cend = 0 if direct else K * ld
    cdef bint wown = (need_w and WGRAD_OWN and fc_gemm_level() > 0 and wgrad_own_ok(K)
                      and ncol >= cend + wgrad_extra(Cig, P, sizeof(floating)))
    if not direct and ncol < K * ld:
        raise ValueError("conv_transpose2d_backward: scratch is smaller than one im2col matrix")
    if need_x and psz > 0 and wpack.shape[0] >= groups * psz:
        Ap = &wpack[0]
        for g in range(groups):
            pack_a(wp + g * Cig * K, K, 1, Cig, K, Ap + g * psz)
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
                im2col(src, Cog, OH, OW, kH, kW, sH, sW, pH, pW, dH, dW, H, W, col, ld)
                src = col
            if need_x and Ap != NULL:
                own_gemm(Cig, 0, P, K, Ap + g * psz, src, P if direct else ld,
                         gxp + (n * Cin + g * Cig) * P, P, NULL, GEMM_PACKB if direct else 0)
            elif need_x:
                gemm_rm(False, False, Cig, P, K, 1, wp + g * Cig * K, K, src,
                        P if direct else ld, 0, gxp + (n * Cin + g * Cig) * P, P)
            if need_w and wown:
                # grad_w[g]^T (K, Cig) += cols (K, P) @ x[n, g]^T (P, Cig)
                wgrad_own(src, P if direct else ld, K, xp + (n * Cin + g * Cig) * P, Cig, P,
                          P, col + cend, ldt, gw + g * Cig * K, NULL)
            elif need_w:
                gemm_rm(False, True, Cig, K, P, 1, xp + (n * Cin + g * Cig) * P, P, src,
                        P if direct else ld, 1, gw + g * Cig * K, K)
    return wown


# Every prange body below only computes pointers and calls a per-plane cdef function: the
# locals of that function are private to the thread.  (A variable that a prange body assigns
# only through a pointer, such as valid_range(..., &lo, &hi), would be shared between threads.)

cdef inline void row3(floating* o, const floating* a, Py_ssize_t n, Py_ssize_t s, Py_ssize_t d,
                      const floating* w, bint reverse) noexcept nogil:
    """o[i] += w0 a[s i] + w1 a[s i + d] + w2 a[s i + 2d] (in that order; see _simd.h)."""
    if floating is float:
        fc_row3_f(o, a, n, s, d, w[0], w[1], w[2])
    else:
        fc_row3_d(o, a, n, s, d, w[0], w[1], w[2])


cdef inline double dot_strided(const floating* a, const floating* b, Py_ssize_t n,
                               Py_ssize_t s) noexcept nogil:
    if floating is float:
        return fc_dot_f(a, b, n, s)
    else:
        return fc_dot_d(a, b, n, s)


cdef Py_ssize_t depthwise_taps(Py_ssize_t kW, Py_ssize_t dW, Py_ssize_t pW, Py_ssize_t sW,
                               Py_ssize_t W, Py_ssize_t OW, Py_ssize_t* tab,
                               Py_ssize_t* clo, Py_ssize_t* chi) noexcept nogil:
    """The column taps' table (tap_table, all kW taps) and, for 3-tap kernels whose taps all
    reach the image, the output range [clo, chi) where every tap is in the image (there the
    row helpers do all three taps in one pass).  Returns the number of taps in tab, 0 when
    the table does not fit (the caller computes ranges itself)."""
    cdef Py_ssize_t t
    clo[0] = 0
    chi[0] = 0
    if kW > MAX_TAPS or not tap_table(0, kW, dW, pW, sW, W, OW, tab):
        return 0
    if kW == 3:
        clo[0] = tab[1]
        chi[0] = tab[2]
        for t in range(1, 3):
            if tab[3 * t + 1] > clo[0]:
                clo[0] = tab[3 * t + 1]
            if tab[3 * t + 2] < chi[0]:
                chi[0] = tab[3 * t + 2]
        if chi[0] < clo[0]:
            chi[0] = clo[0]
    return kW


cdef inline floating dw3_edge(floating acc, Py_ssize_t ow, Py_ssize_t W, int nr,
                             const floating** rows, const floating** wr,
                             const Py_ssize_t* tab) noexcept nogil:
    cdef int r
    cdef Py_ssize_t kw, iw
    for r in range(nr):
        for kw in range(3):
            iw = ow + tab[3 * kw]
            if 0 <= iw < W:
                acc = acc + wr[r][kw] * rows[r][iw]
    return acc


cdef void depthwise_row33(const floating* x, Py_ssize_t H, Py_ssize_t W, const floating* w,
                          Py_ssize_t kH, floating* orow, Py_ssize_t OW, Py_ssize_t oh,
                          Py_ssize_t sH,
                          Py_ssize_t pH, Py_ssize_t dH, const Py_ssize_t* tab,
                          Py_ssize_t clo, Py_ssize_t chi) noexcept nogil:
    """One output row of a stride-1 depthwise kernel at most 3 high and exactly 3 wide: the
    columns where some tap is in the padding tap by tap, the rest in one pass over all the
    window's rows (fc_dw3): the same additions in the same order as tap by tap."""
    cdef const floating* rows[3]
    cdef const floating* wr[3]
    cdef Py_ssize_t kh, ih, off, ow
    cdef int nr = 0
    for kh in range(kH):
        ih = oh * sH - pH + kh * dH
        if 0 <= ih < H:
            rows[nr] = x + ih * W
            wr[nr] = w + kh * 3
            nr += 1
    if nr == 0:
        return
    # the few columns with a tap in the padding: scalar, in (row, tap) order
    for ow in range(clo):
        orow[ow] = dw3_edge(orow[ow], ow, W, nr, rows, wr, tab)
    for ow in range(chi, OW):
        orow[ow] = dw3_edge(orow[ow], ow, W, nr, rows, wr, tab)
    for kh in range(nr, 3):
        rows[kh] = rows[0]
        wr[kh] = wr[0]
    off = clo + tab[0]
    if floating is float:
        fc_dw3_f(orow + clo, chi - clo, nr, rows[0] + off, rows[1] + off, rows[2] + off,
                 wr[0], wr[1], wr[2])
    else:
        fc_dw3_d(orow + clo, chi - clo, nr, rows[0] + off, rows[1] + off, rows[2] + off,
                 wr[0], wr[1], wr[2])


cdef enum:
    DW_PAD_BUF = 8192    # values of a zero-padded plane depthwise_plane_padded takes


cdef inline bint pad_fits(Py_ssize_t H, Py_ssize_t W, Py_ssize_t pH,
                          Py_ssize_t pW) noexcept nogil:
    return pH >= 0 and pW >= 0 and (H + 2 * pH) * (W + 2 * pW) <= DW_PAD_BUF


cdef bint depthwise_plane_padded(const floating* x, Py_ssize_t H, Py_ssize_t W,
                                 const floating* w, floating b, floating* out, Py_ssize_t OH,
                                 Py_ssize_t OW, Py_ssize_t pH, Py_ssize_t pW) noexcept nogil:
    """A 3x3 stride-1 depthwise plane through a zero-padded copy (fc_dw33_fwd: two output
    rows a pass, no edge columns; on 32-wide planes the scalar edges and per-row set-up had
    been 40 % of the time).  The padding's taps add w * 0, which changes nothing but the
    sign of a zero sum, unless w is not finite: False then (nothing written), and the
    caller skips the padding tap by tap, as the definition does."""
    cdef floating pad[DW_PAD_BUF + FC_DWK_SLACK]
    cdef Py_ssize_t i
    for i in range(9):
        if not (w[i] - w[i] == 0):
            return False
    dwk_pad(x, H, W, pH, pW, H + 2 * pH, W + 2 * pW, 1, pad)
    if floating is float:
        fc_dw33_fwd_f(pad, W + 2 * pW, w, b, out, OH, OW)
    else:
        fc_dw33_fwd_d(pad, W + 2 * pW, w, b, out, OH, OW)
    return True


cdef bint depthwise_gw_padded(const floating* gy, const floating* x, Py_ssize_t H,
                              Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t pH,
                              Py_ssize_t pW, floating* gw, floating* gb) noexcept nogil:
    """A 3x3 stride-1 plane's weight (and, gb not NULL, bias) gradient in one pass over a
    zero-padded copy of x (fc_dw33_gw).  A non-finite gy times the padding's zeros would
    give NaN where the definition has no term: when a sum is not finite, nothing is added
    and False is returned (the caller then goes tap by tap over the valid blocks)."""
    cdef floating pad[DW_PAD_BUF + FC_DWK_SLACK]
    cdef double s[10]
    cdef Py_ssize_t k
    dwk_pad(x, H, W, pH, pW, H + 2 * pH, W + 2 * pW, 1, pad)
    if floating is float:
        fc_dw33_gw_f(pad, W + 2 * pW, gy, OH, OW, s)
    else:
        fc_dw33_gw_d(pad, W + 2 * pW, gy, OH, OW, s)
    for k in range(10):
        if not (s[k] - s[k] == 0):
            return False
    for k in range(9):
        gw[k] += <floating>s[k]
    if gb != NULL:
        gb[0] += <floating>s[9]
    return True


cdef bint dwk_layout(Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t OH, Py_ssize_t OW,
                     Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t dH, Py_ssize_t dW,
                     Py_ssize_t* PR, Py_ssize_t* PW, Py_ssize_t* off) noexcept nogil:
    """The padded copy fc_dwk_* read (see _simd.h): PR rows of PW values (stride 1), or its
    even and its odd columns as two planes of PR x PW (stride 2), and each tap's offset;
    False when it does not fit DW_PAD_BUF (or more than MAX_TAPS taps)."""
    cdef Py_ssize_t kh, kw, c, PWF
    if kH * kW > MAX_TAPS or (sW != 1 and sW != 2):
        return False
    PR[0] = (OH - 1) * sH + (kH - 1) * dH + 1
    PWF = (OW - 1) * sW + (kW - 1) * dW + 1
    PW[0] = PWF if sW == 1 else (PWF + 1) // 2
    if PR[0] > DW_PAD_BUF or PW[0] > DW_PAD_BUF or sW * PR[0] * PW[0] > DW_PAD_BUF:
        return False
    for kh in range(kH):
        for kw in range(kW):
            c = kw * dW
            if sW == 1:
                off[kh * kW + kw] = kh * dH * PW[0] + c
            else:
                off[kh * kW + kw] = (c % 2) * PR[0] * PW[0] + kh * dH * PW[0] + c // 2
    return True


cdef void dwk_pad(const floating* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t pH,
                  Py_ssize_t pW, Py_ssize_t PR, Py_ssize_t PW, Py_ssize_t sW,
                  floating* P) noexcept nogil:
    """P (dwk_layout's) from the plane x: padded value (r, c) = x[r - pH][c - pW] in the
    plane, else 0; the slack after it zeroed."""
    cdef Py_ssize_t r, ih, lo, hi
    cdef floating* row
    cdef floating* odd
    cdef const floating* xr
    for r in range(PR):
        ih = r - pH
        row = P + r * PW
        if ih < 0 or ih >= H:
            pad_row(<const floating*> NULL, 0, 0, PW, row)
            if sW == 2:
                pad_row(<const floating*> NULL, 0, 0, PW, row + PR * PW)
            continue
        xr = x + ih * W
        if sW == 1:
            lo = min(pW, PW)
            hi = max(min(PW, pW + W), lo)
            pad_row(xr + lo - pW, lo, hi - lo, PW, row)
        else:
            odd = row + PR * PW
            # columns j in [lo, hi) have both 2j - pW and 2j - pW + 1 in the row: one
            # vectorised split; the edges with checks
            lo = min((pW + 1) // 2, PW)
            hi = max(min((W + pW) // 2, PW), lo)
            split_edge(xr, W, pW, 0, lo, row, odd)
            if hi > lo:
                if floating is float:
                    fc_deint_f(xr + 2 * lo - pW, hi - lo, row + lo, odd + lo)
                else:
                    fc_deint_d(xr + 2 * lo - pW, hi - lo, row + lo, odd + lo)
            split_edge(xr, W, pW, hi, PW, row, odd)
    pad_row(<const floating*> NULL, 0, 0, FC_DWK_SLACK, P + sW * PR * PW)


cdef inline void split_edge(const floating* xr, Py_ssize_t W, Py_ssize_t pW, Py_ssize_t j0,
                            Py_ssize_t j1, floating* even, floating* odd) noexcept nogil:
    """even[j], odd[j] = padded columns 2j and 2j + 1 of the row xr (pW zeros on the left,
    zeros past W) for j in [j0, j1): dwk_pad's stride-2 edges, with bounds checks."""
    cdef Py_ssize_t j, c
    for j in range(j0, j1):
        c = 2 * j - pW
        even[j] = xr[c] if 0 <= c < W else 0
        odd[j] = xr[c + 1] if 0 <= c + 1 < W else 0


cdef inline void pad_row(const floating* s, Py_ssize_t lo, Py_ssize_t n, Py_ssize_t m,
                         floating* d) noexcept nogil:
    """d[:lo] = 0, d[lo:lo + n] = s[:n], d[lo + n:m] = 0 (fc_pad_row: no libc calls)."""
    if floating is float:
        fc_pad_row_f(s, lo, n, m, d)
    else:
        fc_pad_row_d(s, lo, n, m, d)


cdef bint depthwise_plane_dwk(const floating* x, Py_ssize_t H, Py_ssize_t W,
                              const floating* w, Py_ssize_t kH, Py_ssize_t kW, floating b,
                              floating* out, Py_ssize_t OH, Py_ssize_t OW,
                              Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                              Py_ssize_t dH, Py_ssize_t dW) noexcept nogil:
    """A depthwise plane of any kernel at stride 1 or 2 along the width through dwk_layout's
    padded copy (fc_dwk_fwd: every tap a run of consecutive values, no edge cases).  False
    (nothing written) when the copy does not fit or a weight is not finite (the padding's
    zeros would give NaN where the definition has no term): the caller goes tap by tap."""
    cdef floating pad[DW_PAD_BUF + FC_DWK_SLACK]
    cdef Py_ssize_t off[MAX_TAPS]
    cdef Py_ssize_t PR, PW, t
    if pH < 0 or pW < 0 or OH <= 0 or OW <= 0:
        return False
    for t in range(kH * kW):
        if not (w[t] - w[t] == 0):
            return False
    if not dwk_layout(kH, kW, OH, OW, sH, sW, dH, dW, &PR, &PW, off):
        return False
    dwk_pad(x, H, W, pH, pW, PR, PW, sW, pad)
    if floating is float:
        fc_dwk_fwd_f(pad, sH * PW, off, w, kH * kW, b, out, OH, OW)
    else:
        fc_dwk_fwd_d(pad, sH * PW, off, w, kH * kW, b, out, OH, OW)
    return True


cdef bint depthwise_gw_dwk(const floating* gy, const floating* x, Py_ssize_t H, Py_ssize_t W,
                           Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t OH, Py_ssize_t OW,
                           Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                           Py_ssize_t dH, Py_ssize_t dW, floating* gw) noexcept nogil:
    """A plane's weight gradient, any kernel at stride 1 or 2 along the width, over
    dwk_layout's padded copy of x (fc_dwk_gw: up to 8 taps a pass over gy).  False (nothing
    added) when the copy does not fit or a sum is not finite (a non-finite gy times the
    padding's zeros: the caller goes tap by tap over the valid blocks)."""
    cdef floating pad[DW_PAD_BUF + FC_DWK_SLACK]
    cdef Py_ssize_t off[MAX_TAPS]
    cdef double s[MAX_TAPS]
    cdef Py_ssize_t PR, PW, t
    if pH < 0 or pW < 0 or OH <= 0 or OW <= 0:
        return False
    if not dwk_layout(kH, kW, OH, OW, sH, sW, dH, dW, &PR, &PW, off):
        return False
    dwk_pad(x, H, W, pH, pW, PR, PW, sW, pad)
    if floating is float:
        fc_dwk_gw_f(pad, sH * PW, off, kH * kW, gy, OH, OW, s)
    else:
        fc_dwk_gw_d(pad, sH * PW, off, kH * kW, gy, OH, OW, s)
    for t in range(kH * kW):
        if not (s[t] - s[t] == 0):
            return False
    for t in range(kH * kW):
        gw[t] += <floating>s[t]
    return True


cdef bint depthwise_gx_stuffed(const floating* gy, Py_ssize_t OH, Py_ssize_t OW,
                               const floating* w, Py_ssize_t kH, Py_ssize_t kW, floating* gx,
                               Py_ssize_t H, Py_ssize_t W, Py_ssize_t sH, Py_ssize_t sW,
                               Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH,
                               Py_ssize_t dW) noexcept nogil:
    """gx = a plane's input gradient at a small stride: gy spread out by the stride with zeros
    between (and the stride-1 input gradient's padding, k - 1 - p), then the stride-1
    forward pass of the flipped kernel over it (fc_dwk_fwd, whole rows of gx stored as
    vectors; at stride 2, 3/4 of its products are by those zeros, and still faster than
    storing the phases' values one by one).  False (nothing written) when the copy does not
    fit, a padding exceeds the dilated kernel or a weight is not finite."""
    cdef floating pad[DW_PAD_BUF + FC_DWK_SLACK]
    cdef floating wflip[MAX_TAPS]
    cdef Py_ssize_t off[MAX_TAPS]
    cdef Py_ssize_t top = (kH - 1) * dH - pH, left = (kW - 1) * dW - pW
    cdef Py_ssize_t PR = H + (kH - 1) * dH, PW = W + (kW - 1) * dW
    cdef Py_ssize_t kh, kw, oh, ow, r, c
    cdef floating* row
    if (kH * kW > MAX_TAPS or top < 0 or left < 0 or PR * PW > DW_PAD_BUF or H <= 0
            or W <= 0):
        return False
    for kh in range(kH * kW):
        if not (w[kh] - w[kh] == 0):
            return False
    for kh in range(kH):
        for kw in range(kW):
            wflip[kh * kW + kw] = w[(kH - 1 - kh) * kW + (kW - 1 - kw)]
            off[kh * kW + kw] = kh * dH * PW + kw * dW
    memset(pad, 0, (PR * PW + FC_DWK_SLACK) * sizeof(floating))
    for oh in range(OH):
        r = top + oh * sH
        if r >= PR:
            break
        row = pad + r * PW + left
        if sW == 2:     # (the zero after the last value may land on the next row's first
            # column, the padding or a row written later, or in the slack)
            c = min(OW, (PW - 1 - left) // 2 + 1) if PW > left else 0
            if floating is float:
                fc_spread2_f(gy + oh * OW, c, row)
            else:
                fc_spread2_d(gy + oh * OW, c, row)
            continue
        for ow in range(OW):
            c = left + ow * sW
            if c >= PW:
                break
            row[ow * sW] = gy[oh * OW + ow]
    if floating is float:
        fc_dwk_fwd_f(pad, PW, off, wflip, kH * kW, 0, gx, H, W)
    else:
        fc_dwk_fwd_d(pad, PW, off, wflip, kH * kW, 0, gx, H, W)
    return True


cdef bint depthwise_gx_phases(const floating* gy, Py_ssize_t OH, Py_ssize_t OW,
                              const floating* w, Py_ssize_t kH, Py_ssize_t kW, floating* gx,
                              Py_ssize_t H, Py_ssize_t W, Py_ssize_t sH, Py_ssize_t sW,
                              Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH,
                              Py_ssize_t dW, bint add) noexcept nogil:
    """gx += (add) or = a plane's input gradient at any stride, by phases: the input rows r = ih + pH
    with r % sH == a (and columns c % sW == b) only get the taps with kh dH % sH == a (kw dW %
    sW == b), from gy[r // sH - u][c // sW - v], u = kh dH // sH (v alike); so each phase is a
    stride-1 pass of fc_dwk_fwd over gy zero-padded by the largest u / v (any tap offsets),
    its values then stored (added) to their strided places in gx: every value of gx is in
    one phase's range, so without add all of gx is written.  (Tap by tap, the strided stores of
    every tap had been 2/3 of a 3x3 stride-2 backward.)  False (nothing added) when the
    copies do not fit or a weight is not finite (times the padding's zeros: NaN)."""
    cdef floating pad[DW_PAD_BUF + FC_DWK_SLACK]
    cdef floating tmp[DW_PAD_BUF + FC_DWK_SLACK]
    cdef floating loc[DW_PAD_BUF]
    cdef floating wsub[MAX_TAPS]
    cdef Py_ssize_t off[MAX_TAPS]
    cdef Py_ssize_t U = (kH - 1) * dH // sH, V = (kW - 1) * dW // sW
    cdef Py_ssize_t R1 = (H - 1 + pH) // sH + 1, C1 = (W - 1 + pW) // sW + 1
    cdef Py_ssize_t PR = R1 + U, PW = C1 + V
    cdef Py_ssize_t a, bb, kh, kw, nt, R0, C0, nR, nC, r, c, ih, iw
    cdef floating* g
    cdef floating* dst = gx
    if kH * kW > MAX_TAPS or OH <= 0 or OW <= 0 or pH < 0 or pW < 0 or PR * PW > DW_PAD_BUF:
        return False
    if not add and H * W <= DW_PAD_BUF:
        # the strided stores into a plane in L1, then one copy (into gx, 8 MB of a 3x3
        # stride-2 batch: the scattered stores' misses had been half of its time)
        dst = loc
    for a in range(kH * kW):
        if not (w[a] - w[a] == 0):
            return False
    # gyp[i][j] = gy[i - U][j - V] (zero outside)
    dwk_pad(gy, OH, OW, U, V, PR, PW, 1, pad)
    for a in range(sH):
        for bb in range(sW):
            nt = 0
            for kh in range(kH):
                if (kh * dH) % sH != a:
                    continue
                for kw in range(kW):
                    if (kw * dW) % sW != bb:
                        continue
                    off[nt] = (U - (kh * dH) // sH) * PW + V - (kw * dW) // sW
                    wsub[nt] = w[kh * kW + kw]
                    nt += 1
            # the phase's rows r = a + sH R with 0 <= r - pH < H: R in [R0, R1a)
            R0 = (pH - a + sH - 1) // sH if pH > a else 0
            C0 = (pW - bb + sW - 1) // sW if pW > bb else 0
            nR = (H - 1 + pH - a) // sH + 1 - R0 if H - 1 + pH >= a else 0
            nC = (W - 1 + pW - bb) // sW + 1 - C0 if W - 1 + pW >= bb else 0
            if nR <= 0 or nC <= 0:
                continue
            if nt == 0:                 # (no tap reaches these: 0)
                if not add:
                    for r in range(nR):
                        g = dst + (a + sH * (R0 + r) - pH) * W + bb + sW * C0 - pW
                        for c in range(nC):
                            g[sW * c] = 0
                continue
            if floating is float:
                fc_dwk_fwd_f(pad + R0 * PW + C0, PW, off, wsub, nt, 0, tmp, nR, nC)
            else:
                fc_dwk_fwd_d(pad + R0 * PW + C0, PW, off, wsub, nt, 0, tmp, nR, nC)
            for r in range(nR):
                ih = a + sH * (R0 + r) - pH
                g = dst + ih * W + bb + sW * C0 - pW
                if add:
                    for c in range(nC):
                        g[sW * c] += tmp[r * nC + c]
                else:
                    for c in range(nC):
                        g[sW * c] = tmp[r * nC + c]
    if dst != gx:
        memcpy(gx, dst, H * W * sizeof(floating))
    return True


cdef void depthwise_plane(const floating* x, Py_ssize_t H, Py_ssize_t W,
                          const floating* w, Py_ssize_t kH, Py_ssize_t kW, floating b,
                          floating* out, Py_ssize_t OH, Py_ssize_t OW,
                          Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                          Py_ssize_t dH, Py_ssize_t dW) noexcept nogil:
    """out = b + sum over taps of w[kh, kw] * (shifted input rows): vectorised row axpys;
    3-wide kernels do their three taps in one pass over the columns where all are in the
    image (same additions in the same order, so the same rounding)."""
    cdef Py_ssize_t oh, ow, kh, kw, ih, off, lo, hi, clo, chi, ntab
    cdef Py_ssize_t tab[3 * MAX_TAPS]
    cdef const floating* xrow
    cdef floating* orow
    cdef floating wv
    # (pH, pW < 0: the input gradient's forward pass of a padding > 2 (k - 1 - p); the
    # padded copy would start before its buffer)
    if (kH == 3 and kW == 3 and sH == 1 and sW == 1 and dH == 1 and dW == 1
            and pad_fits(H, W, pH, pW) and OW == W + 2 * pW - 2
            and OH == H + 2 * pH - 2 and OW > 0 and OH > 0
            and depthwise_plane_padded(x, H, W, w, b, out, OH, OW, pH, pW)):
        return
    if depthwise_plane_dwk(x, H, W, w, kH, kW, b, out, OH, OW, sH, sW, pH, pW, dH, dW):
        return
    ntab = depthwise_taps(kW, dW, pW, sW, W, OW, tab, &clo, &chi)
    for ow in range(OH * OW):
        out[ow] = b
    for oh in range(OH):
        orow = out + oh * OW
        if chi > clo and kH <= 3 and sW == 1 and dW == 1:
            depthwise_row33(x, H, W, w, kH, orow, OW, oh, sH, pH, dH, tab, clo, chi)
            continue
        for kh in range(kH):
            ih = oh * sH - pH + kh * dH
            if ih < 0 or ih >= H:
                continue
            xrow = x + ih * W
            for kw in range(kW):
                tap_at(tab if ntab else NULL, kw, kw * dW - pW, sW, W, OW, &off, &lo, &hi)
                wv = w[kh * kW + kw]
                if chi > clo:           # 3 taps: here only the columns outside [clo, chi)
                    for ow in range(lo, min(hi, clo)):
                        orow[ow] = orow[ow] + wv * xrow[ow * sW + off]
                    for ow in range(max(lo, chi), hi):
                        orow[ow] = orow[ow] + wv * xrow[ow * sW + off]
                elif sW == 1:
                    for ow in range(lo, hi):
                        orow[ow] = orow[ow] + wv * xrow[ow + off]
                else:
                    for ow in range(lo, hi):
                        orow[ow] = orow[ow] + wv * xrow[ow * sW + off]
            if chi > clo:
                row3(orow + clo, xrow + clo * sW + tab[0], chi - clo, sW, dW, w + kh * kW,
                     False)


cdef enum:
    MAX_FLIP = 64    # kernels up to this many taps take depthwise's stride-1 backward path


cdef void depthwise_plane_backward(const floating* gy, const floating* x, const floating* w,
                                   floating* gx, floating* gw, floating* gb,
                                   Py_ssize_t H, Py_ssize_t W, Py_ssize_t kH, Py_ssize_t kW,
                                   Py_ssize_t OH, Py_ssize_t OW,
                                   Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                                   Py_ssize_t dH, Py_ssize_t dW,
                                   bint need_x, bint need_w, bint need_b,
                                   bint sole) noexcept nogil:
    """Adds one (image, output channel) plane's share to gx (its input plane), gw (its
    kH*kW taps) and gb (one value).  Stride-1 3-wide kernels add their three taps to gx in
    one pass where all are in the image (same order of additions as tap by tap)."""
    cdef Py_ssize_t oh, ow, kh, kw, ih, off, lo, hi, clo, chi, ntab, jlo = 0, jhi = 0, j
    cdef Py_ssize_t tab[3 * MAX_TAPS]
    cdef const floating* gyrow
    cdef const floating* xrow
    cdef floating* gxrow
    cdef floating wv
    cdef bint fused = False
    cdef floating wflip[MAX_FLIP]
    cdef Py_ssize_t r0, r1
    cdef double acc
    if (need_w and kH == 3 and kW == 3 and sH == 1 and sW == 1 and dH == 1 and dW == 1
            and OH == H + 2 * pH - 2 and OW == W + 2 * pW - 2 and OH > 0 and OW > 0
            and pad_fits(H, W, pH, pW)
            and depthwise_gw_padded(gy, x, H, W, OH, OW, pH, pW, gw,
                                    gb if need_b else NULL)):
        need_w = False
        need_b = False
    if need_w and depthwise_gw_dwk(gy, x, H, W, kH, kW, OH, OW, sH, sW, pH, pW, dH, dW, gw):
        need_w = False
    if need_b:
        gb[0] += <floating>row_dot(gy, NULL, OH * OW)
    if not (need_w or need_x):
        return
    if sH == 1 and sW == 1 and kH * kW <= MAX_FLIP:
        # stride 1: gw tap by tap as one dot over the plane's valid block, and (when this
        # plane is gx's only contribution) gx as the forward depthwise pass over gy with
        # the flipped kernel and the complementary padding
        ntab = depthwise_taps(kW, dW, pW, sW, W, OW, tab, &clo, &chi)
        if need_w and ntab:
            for kh in range(kH):
                r0 = max(0, pH - kh * dH)
                r1 = min(OH, H + pH - kh * dH)
                if r1 <= r0:
                    continue
                for kw in range(kW):
                    off = tab[3 * kw]
                    lo = tab[3 * kw + 1]
                    hi = tab[3 * kw + 2]
                    if hi <= lo:
                        continue
                    if floating is float:
                        acc = fc_dot2d_f(gy + r0 * OW + lo, OW,
                                         x + (r0 - pH + kh * dH) * W + lo + off, W, r1 - r0,
                                         hi - lo)
                    else:
                        acc = fc_dot2d_d(gy + r0 * OW + lo, OW,
                                         x + (r0 - pH + kh * dH) * W + lo + off, W, r1 - r0,
                                         hi - lo)
                    gw[kh * kW + kw] += <floating>acc
            need_w = False
        if need_x and sole:
            for kh in range(kH):
                for kw in range(kW):
                    wflip[kh * kW + kw] = w[(kH - 1 - kh) * kW + (kW - 1 - kw)]
            depthwise_plane(gy, OH, OW, wflip, kH, kW, 0, gx, H, W, 1, 1,
                            (kH - 1) * dH - pH, (kW - 1) * dW - pW, dH, dW)
            need_x = False
        if not (need_w or need_x):
            return
    if (need_x and sole and sH <= 2 and sW <= 2
            and depthwise_gx_stuffed(gy, OH, OW, w, kH, kW, gx, H, W, sH, sW, pH, pW, dH, dW)):
        need_x = False
        if not need_w:
            return
    if need_x and depthwise_gx_phases(gy, OH, OW, w, kH, kW, gx, H, W, sH, sW, pH, pW, dH, dW,
                                      not sole):
        need_x = False
        if not need_w:
            return
    if need_x and sole:                 # (not zeroed by the caller: see depthwise_backward)
        memset(gx, 0, H * W * sizeof(floating))
    ntab = depthwise_taps(kW, dW, pW, sW, W, OW, tab, &clo, &chi)
    if need_x and sW == 1 and ntab == 3:
        # gx[j] += w_k gy[j - off_k] for all k when j - off_k is in [lo_k, hi_k) for all k
        jlo = tab[1] + tab[0]
        jhi = tab[2] + tab[0]
        for kw in range(1, 3):
            jlo = max(jlo, tab[3 * kw + 1] + tab[3 * kw])
            jhi = min(jhi, tab[3 * kw + 2] + tab[3 * kw])
        fused = jhi > jlo
    for oh in range(OH):
        gyrow = gy + oh * OW
        for kh in range(kH):
            ih = oh * sH - pH + kh * dH
            if ih < 0 or ih >= H:
                continue
            xrow = x + ih * W
            gxrow = gx + ih * W
            for kw in range(kW):
                tap_at(tab if ntab else NULL, kw, kw * dW - pW, sW, W, OW, &off, &lo, &hi)
                if need_w and hi > lo:
                    gw[kh * kW + kw] += <floating>dot_strided(gyrow + lo, xrow + lo * sW + off,
                                                              hi - lo, sW)
                if need_x:
                    wv = w[kh * kW + kw]
                    if fused:           # only the columns outside [jlo, jhi) here
                        for j in range(lo + off, min(hi + off, jlo)):
                            gxrow[j] = gxrow[j] + wv * gyrow[j - off]
                        for j in range(max(lo + off, jhi), hi + off):
                            gxrow[j] = gxrow[j] + wv * gyrow[j - off]
                    elif sW == 1:
                        for ow in range(lo, hi):
                            gxrow[ow + off] = gxrow[ow + off] + wv * gyrow[ow]
                    else:
                        for ow in range(lo, hi):
                            gxrow[ow * sW + off] += wv * gyrow[ow]
            if fused:
                # a[i] = gy[jlo + i - off_0]; tap k reads a[i - k dW]
                row3(gxrow + jlo, gyrow + jlo - tab[0], jhi - jlo, 1, -dW, w + kh * kW, False)


def depthwise_forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] weight,
                      const floating[::1] bias, floating[:, :, :, ::1] out,
                      Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                      Py_ssize_t dH, Py_ssize_t dW, bint has_bias, int num_threads):
    """Direct convolution for one input channel per group (depthwise, channel multiplier
    M = L / C): output channel l reads input channel l // M.  No im2col, no GEMM."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t L = weight.shape[0], kH = weight.shape[2], kW = weight.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3], M = L // C
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &weight[0, 0, 0, 0]
    cdef const floating* bp = &bias[0] if has_bias else NULL
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t plane
    with nogil:
        for plane in prange(N * L, schedule='guided', num_threads=num_threads):
            depthwise_plane(xp + ((plane // L) * C + (plane % L) // M) * H * W, H, W,
                            wp + (plane % L) * kH * kW, kH, kW,
                            bp[plane % L] if has_bias else 0,
                            op + plane * OH * OW, OH, OW, sH, sW, pH, pW, dH, dW)


def depthwise_backward(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
                       const floating[:, :, :, ::1] weight, floating[:, :, :, ::1] grad_x_out,
                       floating[::1] grad_w_out, floating[::1] grad_b_out,
                       Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                       Py_ssize_t dH, Py_ssize_t dW, bint need_x, bint need_w, bint need_b,
                       int num_threads):
    """Gradients of :func:`depthwise_forward`, parallel over input channels.

    A thread owns input channel c and its M output channels for the whole batch, so grad_x,
    grad_weight (L*kH*kW, zeroed) and grad_bias (L, zeroed) need no partial sums.  The
    geometry comes from x (always a real array here).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t L = weight.shape[0], kH = weight.shape[2], kW = weight.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3], M = L // C
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &weight[0, 0, 0, 0]
    cdef const floating* gyp = &grad_out[0, 0, 0, 0]
    cdef floating* gxp = &grad_x_out[0, 0, 0, 0]
    cdef floating* gwp = &grad_w_out[0] if need_w else NULL
    cdef floating* gbp = &grad_b_out[0] if need_b else NULL
    cdef Py_ssize_t c, n, m
    # one output channel per input channel: depthwise_plane_backward writes the plane's
    # whole input gradient (a forward pass, phases, or zeroes it before going tap by tap)
    cdef bint overwrite = M == 1
    with nogil:
        for c in prange(C, schedule='guided', num_threads=num_threads):
            for n in range(N):
                if need_x and not overwrite:
                    memset(gxp + (n * C + c) * H * W, 0, H * W * sizeof(floating))
                for m in range(M):
                    depthwise_plane_backward(
                        gyp + (n * L + c * M + m) * OH * OW, xp + (n * C + c) * H * W,
                        wp + (c * M + m) * kH * kW, gxp + (n * C + c) * H * W,
                        gwp + (c * M + m) * kH * kW if need_w else NULL,
                        gbp + c * M + m if need_b else NULL,
                        H, W, kH, kW, OH, OW, sH, sW, pH, pW, dH, dW, need_x, need_w, need_b,
                        M == 1)


# --------------------------------------------------------------------------------------------
# fully connected layers: BLAS one thread per block, the blocks on the caller-runs pool
# --------------------------------------------------------------------------------------------
# numpy's matmul runs OpenBLAS's own threads, which then spin for about 2**28 cycles (0.1 s)
# waiting for more work: every 2-thread kernel that followed ran at 1-thread speed (a LeNet
# forward at 2 threads: 13.9 ms, against 7.8 ms with OPENBLAS_THREAD_TIMEOUT=4).  These give
# nn.Linear its threads without waking any BLAS thread.

cdef struct LinJob:
    const void* x
    const void* w
    const void* b
    const void* g
    void* y
    void* gw
    void* gx
    const void* Aw           # grad_out^T packed for the own GEMM (NULL: BLAS)
    const void* Ax           # grad_out packed for the own GEMM (NULL: BLAS)
    Py_ssize_t rows, nin, nout, rblk, cblk, ncb, ngw
    int mode                  # 0: forward (row x column blocks of y); 1: backward
    int path                  # forward by: LIN_BLAS, LIN_GEMM (the own GEMM), LIN_ROWS
    bint dbl


cdef void lin_run(LinJob* j, Py_ssize_t i, floating* tag) noexcept nogil:
    cdef const floating* x = <const floating*> j.x
    cdef const floating* w = <const floating*> j.w
    cdef const floating* b = <const floating*> j.b
    cdef const floating* g = <const floating*> j.g
    cdef floating* y = <floating*> j.y
    cdef Py_ssize_t r0, r1, c0, c1, r, c, N = j.rows, I = j.nin, O = j.nout
    if j.mode == 0:
        # y[r0:r1, c0:c1] = x[r0:r1] @ w[c0:c1]^T + b[c0:c1]
        r0 = (i // j.ncb) * j.rblk
        r1 = min(r0 + j.rblk, N)
        c0 = (i % j.ncb) * j.cblk
        c1 = min(c0 + j.cblk, O)
        if j.path == LIN_ROWS and N == 1:
            # one row (batch 1): its own kernel, all of K at once
            if floating is float:
                fc_rowdot1_f(I, x, w, I, c0, c1, b, y)
            else:
                fc_rowdot1_d(I, x, w, I, c0, c1, b, y)
            return
        if j.path == LIN_ROWS:
            # dot products of x's rows with w's rows, both read in place, bias added
            if floating is float:
                fc_rowdot_f(r1 - r0, I, x + r0 * I, I, w, I, c0, c1, b, y + r0 * O, O)
            else:
                fc_rowdot_d(r1 - r0, I, x + r0 * I, I, w, I, c0, c1, b, y + r0 * O, O)
            return
        if j.path == LIN_GEMM:
            # the own GEMM with x's rows read in place as A and w as B transposed (each K
            # block's strip transposed as it is used)
            if floating is float:
                fc_gemma_f(r1 - r0, c0, c1, I, x + r0 * I, I, w, I, y + r0 * O, O, GEMM_BT)
            else:
                fc_gemma_d(r1 - r0, c0, c1, I, x + r0 * I, I, w, I, y + r0 * O, O, GEMM_BT)
        else:
            gemm_rm(False, True, r1 - r0, c1 - c0, I, 1, x + r0 * I, I, w + c0 * I, I, 0,
                    y + r0 * O + c0, O)
        if b != NULL:
            for r in range(r0, r1):
                for c in range(c0, c1):
                    y[r * O + c] = y[r * O + c] + b[c]
    elif j.path == LIN_ROWS:
        lin_rows_backward(j, i, g, x, w)
    elif i < j.ngw:
        # grad_w[:, c0:c1] = g^T @ x[:, c0:c1]
        c0 = i * j.cblk
        c1 = min(c0 + j.cblk, I)
        if j.Aw != NULL:
            own_gemm(O, c0, c1, N, <const floating*> j.Aw, x, I, <floating*> j.gw, I, NULL,
                     GEMM_PACKB)
        else:
            gemm_rm(True, False, O, c1 - c0, N, 1, g, O, x + c0, I, 0,
                    <floating*> j.gw + c0, I)
    else:
        # grad_x[:, c0:c1] = g @ w[:, c0:c1]
        c0 = (i - j.ngw) * j.cblk
        c1 = min(c0 + j.cblk, I)
        if j.Ax != NULL:
            own_gemm(N, c0, c1, O, <const floating*> j.Ax, w, I, <floating*> j.gx, I, NULL,
                     GEMM_PACKB)
        else:
            gemm_rm(False, False, N, c1 - c0, O, 1, g, O, w + c0, I, 0,
                    <floating*> j.gx + c0, I)


cdef void lin_rows_backward(LinJob* j, Py_ssize_t i, const floating* g, const floating* x,
                            const floating* w) noexcept nogil:
    """linear_backward's item i for a few rows (LIN_ROWS): grad_w[:, c0:c1] (i < ngw) as
    scaled rows of x, g[n, o] x[n] summed over n, or grad_x[:, c0:c1] as scaled rows of w,
    g[n, o] w[o] summed over o in order, in sub-blocks of 256 columns so that the N rows
    being summed stay in L1 while w streams past once.  (The GEMM's panels of 1 row were
    mostly padding: LeNet's fc1 backward at batch 1, float64, 570 us.)"""
    cdef Py_ssize_t N = j.rows, I = j.nin, O = j.nout, c0, c1, s0, s1, n, o, c
    cdef floating a
    cdef floating* row
    cdef const floating* src
    if i < j.ngw:
        c0 = i * j.cblk
        c1 = min(c0 + j.cblk, I)
        for o in range(O):
            row = <floating*> j.gw + o * I
            a = g[o]
            for c in range(c0, c1):
                row[c] = a * x[c]
            for n in range(1, N):
                a = g[n * O + o]
                src = x + n * I
                for c in range(c0, c1):
                    row[c] = row[c] + a * src[c]
        return
    c0 = (i - j.ngw) * j.cblk
    c1 = min(c0 + j.cblk, I)
    for s0 in range(c0, c1, 256):
        s1 = min(s0 + 256, c1)
        for n in range(N):
            row = <floating*> j.gx + n * I
            a = g[n * O]
            for c in range(s0, s1):
                row[c] = a * w[c]
        for o in range(1, O):
            src = w + o * I
            for n in range(N):
                row = <floating*> j.gx + n * I
                a = g[n * O + o]
                for c in range(s0, s1):
                    row[c] = row[c] + a * src[c]


cdef void lin_item(void* ctx, Py_ssize_t i, int tid) noexcept nogil:
    cdef LinJob* j = <LinJob*> ctx
    if j.dbl:
        lin_run(j, i, <double*> NULL)
    else:
        lin_run(j, i, <float*> NULL)


cpdef enum:         # linear_forward's paths (also module attributes for the Python side)
    LIN_BLAS = 0
    LIN_GEMM = 1
    LIN_ROWS = 2


def linear_forward(const floating[:, ::1] x, const floating[:, ::1] weight,
                   const floating[::1] bias, floating[:, ::1] out, bint has_bias,
                   int num_threads, int path, bint relu=False):
    """out (N, O) = x (N, I) @ weight (O, I)^T (+ bias), then max(out, 0) when relu (as
    relu_inplace): about two blocks per thread, of rows
    when they outnumber the output columns, else of output columns (the fewer re-reads; 4
    row blocks of a 64 x 3136 @ 3136 x 128 product were 0.72x OpenBLAS's own 2 threads).
    path: LIN_GEMM, the own GEMM (x read in place, weight as B transposed); LIN_ROWS, dot
    products of x's rows with weight's rows, for a few rows (fc_rowdot_*); both only where
    there is an own GEMM level, else (and LIN_BLAS) BLAS.  The caller holds BLAS at one
    thread and checks that every size fits a C int."""
    cdef Py_ssize_t N = x.shape[0], I = x.shape[1], O = weight.shape[0]
    if weight.shape[1] != I or out.shape[0] != N or out.shape[1] != O or \
            (has_bias and bias.shape[0] != O):
        raise ValueError("linear_forward: shapes do not match")
    if N == 0 or O == 0:
        return
    linear_run(&x[0, 0], &weight[0, 0], &bias[0] if has_bias else NULL, &out[0, 0], N, I, O,
               num_threads, path, relu)


cdef void linear_run(const floating* x, const floating* w, const floating* b, floating* y,
                     Py_ssize_t N, Py_ssize_t I, Py_ssize_t O, int num_threads, int path,
                     bint relu) noexcept:
    """linear_forward's work (N, O > 0; b NULL: no bias); releases the GIL."""
    cdef LinJob j
    cdef Py_ssize_t nrb
    j.x = x
    j.w = w
    j.b = b
    j.y = y
    j.rows = N
    j.nin = I
    j.nout = O
    j.mode = 0
    j.path = path if path in (LIN_GEMM, LIN_ROWS) and I > 0 and fc_gemm_level() > 0 \
        else LIN_BLAS
    j.dbl = floating is double
    if num_threads <= 1:
        j.rblk, j.cblk = N, O
    elif N > O:             # row blocks: each reads all of weight (O x I), once per block
        j.rblk, j.cblk = block_len(N, 2 * num_threads, 8), O
    else:                   # column blocks (whole GEMM panels): each reads all of x (N x I)
        j.rblk = N
        j.cblk = block_len(O, 2 * num_threads,
                           fc_gemm_nr(floating is double) if j.path == LIN_GEMM else
                           4 if j.path == LIN_ROWS else 16)
    j.ncb = (O + j.cblk - 1) // j.cblk
    nrb = (N + j.rblk - 1) // j.rblk
    with nogil:
        fc_pool_run(num_threads, lin_item, &j, nrb * j.ncb)
        if relu:
            relu_rows(y, 1, 0, N * O)


def linear_backward(const floating[:, ::1] grad_out, const floating[:, ::1] x,
                    const floating[:, ::1] weight, floating[:, ::1] grad_w,
                    floating[:, ::1] grad_x, floating[::1] packed, bint need_w, bint need_x,
                    int num_threads, int path=LIN_GEMM):
    """grad_w (O, I) = grad_out (N, O)^T @ x (N, I) and grad_x (N, I) = grad_out @ weight
    (O, I), each wanted one in blocks of columns (about 4 per thread, whole GEMM panels).
    packed: gemm_packed_size(O, N) + gemm_packed_size(N, O) values, for grad_out^T and
    grad_out packed for the own GEMM (x and weight are read in place); smaller: BLAS (scipy's
    OpenBLAS 0.3.30 ran these small-K products 0.86x numpy's 0.3.31).  path LIN_ROWS (a few
    rows): sums of scaled rows instead (lin_rows_backward; packed unused).  The caller holds
    BLAS at one thread and checks that every size fits a C int."""
    cdef LinJob j
    cdef Py_ssize_t N = x.shape[0], I = x.shape[1], O = weight.shape[0], nblk
    cdef Py_ssize_t pw = fc_gemm_packed_size(O, N), px = fc_gemm_packed_size(N, O)
    if grad_out.shape[0] != N or grad_out.shape[1] != O or weight.shape[1] != I or \
            (need_w and (grad_w.shape[0] != O or grad_w.shape[1] != I)) or \
            (need_x and (grad_x.shape[0] != N or grad_x.shape[1] != I)):
        raise ValueError("linear_backward: shapes do not match")
    if I == 0 or not (need_w or need_x):
        return
    if N == 0 or O == 0:            # empty sums
        if need_w:
            grad_w[:, :] = 0
        if need_x:
            grad_x[:, :] = 0
        return
    j.x = &x[0, 0]
    j.w = &weight[0, 0]
    j.g = &grad_out[0, 0]
    j.gw = &grad_w[0, 0] if need_w else NULL
    j.gx = &grad_x[0, 0] if need_x else NULL
    j.rows = N
    j.nin = I
    j.nout = O
    j.mode = 1
    j.dbl = floating is double
    j.Aw = NULL
    j.Ax = NULL
    j.path = LIN_ROWS if path == LIN_ROWS else LIN_GEMM
    if j.path == LIN_GEMM and pw > 0 and px > 0 and packed.shape[0] >= pw + px:
        with nogil:
            if need_w:
                pack_a(&grad_out[0, 0], 1, O, O, N, &packed[0])
                j.Aw = &packed[0]
            if need_x:
                pack_a(&grad_out[0, 0], O, 1, N, O, &packed[pw])
                j.Ax = &packed[pw]
    j.cblk = I if num_threads <= 1 else block_len(I, 4 * num_threads,
                                                  max(fc_gemm_nr(floating is double), 16))
    nblk = (I + j.cblk - 1) // j.cblk
    j.ngw = nblk if need_w else 0
    with nogil:
        if need_x:
            fc_pool_run(num_threads, lin_item, &j, j.ngw + nblk)
        else:
            fc_pool_run(num_threads, lin_item, &j, j.ngw)


def relu_backward(const floating[::1] y, const floating[::1] g, floating[::1] out,
                  int num_threads):
    """out = g where y > 0 (or y is NaN), else 0: torch's threshold_backward, one pass and
    no temporaries (a vectorised select)."""
    cdef Py_ssize_t n = y.shape[0], blk = 16384, nblk = (n + blk - 1) // blk, b
    cdef const floating* yp = &y[0]
    cdef const floating* gp = &g[0]
    cdef floating* op = &out[0]
    with nogil:
        for b in prange(nblk, schedule='static', num_threads=num_threads):
            relu_backward_block(yp + b * blk, gp + b * blk, op + b * blk, min(blk, n - b * blk))


cdef void relu_backward_block(const floating* y, const floating* g, floating* out,
                              Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating yv, gv, z = 0
    for i in range(n):
        yv = y[i]
        gv = g[i]
        out[i] = z if yv <= 0 else gv


cdef void relu_rows(floating* y, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t n) noexcept nogil:
    """y[r * ld + j] = max(y, 0) for r < rows, j < n, as nn.ReLU (np.maximum(y, 0)): NaN stays
    NaN, -0 becomes +0."""
    cdef Py_ssize_t r
    for r in range(rows):
        relu_copy(y + r * ld, y + r * ld, n)


cdef void relu_copy(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    """y[i] = max(x[i], 0) (NaN stays NaN, -0 becomes +0); y is x (in place) or apart from
    it."""
    cdef Py_ssize_t i
    cdef floating v, z = 0
    for i in range(n):
        v = x[i]
        y[i] = v if ((v > z) | (v != v)) else z


cdef void relu_blocks(const floating* x, floating* y, Py_ssize_t n,
                      int num_threads) noexcept nogil:
    """relu_copy over n values in blocks of 16384 over the threads (one call when that is one
    block or one thread)."""
    cdef Py_ssize_t blk = 16384, nblk = (n + blk - 1) // blk, b
    if nblk <= 1 or num_threads <= 1:
        relu_copy(x, y, n)
        return
    for b in prange(nblk, schedule='static', num_threads=num_threads):
        relu_copy(x + b * blk, y + b * blk, min(blk, n - b * blk))


def relu_forward(const floating[::1] x, floating[::1] out, int num_threads):
    """out = max(x, 0) (relu_blocks; out must not overlap x): nn.ReLU's forward in one pass
    (np.maximum(x, 0) took 13 us on 25088 float32 values, this 2-3 us)."""
    if out.shape[0] != x.shape[0]:
        raise ValueError("relu_forward: out must have x's size")
    if x.shape[0] > 0:
        with nogil:
            relu_blocks(&x[0], &out[0], x.shape[0], num_threads)


def relu_inplace(floating[::1] y, int num_threads):
    """y = max(y, 0) in place (relu_blocks)."""
    if y.shape[0] > 0:
        with nogil:
            relu_blocks(&y[0], &y[0], y.shape[0], num_threads)


def sub_scaled(floating[::1] d, const floating[::1] g, double a, int num_threads):
    """d -= g * a in place, g * a rounded to d's dtype first (numpy's multiply into a
    temporary, then subtract, without the temporary: the optimizers' update), in blocks of
    16384 values over the threads.  d and g must not overlap."""
    cdef Py_ssize_t n = d.shape[0], blk = 16384, nblk = (n + blk - 1) // blk, b, e
    cdef floating s = <floating> a
    cdef floating* dp = &d[0] if n else NULL
    cdef const floating* gp = &g[0] if n else NULL
    if g.shape[0] != n:
        raise ValueError("sub_scaled: d and g differ in size")
    with nogil:
        for b in prange(nblk, schedule='static', num_threads=num_threads):
            e = min(n, (b + 1) * blk)
            if floating is float:
                fc_sub_scaled_f(dp + b * blk, gp + b * blk, s, e - b * blk)
            else:
                fc_sub_scaled_d(dp + b * blk, gp + b * blk, s, e - b * blk)


def sum_rows(const floating[:, ::1] part, floating[::1] out):
    """out[j] = sum_t part[t, j] (reduces per-thread partial sums)."""
    cdef Py_ssize_t T = part.shape[0], M = part.shape[1], t, j
    with nogil:
        for j in range(M):
            out[j] = part[0, j]
        for t in range(1, T):
            for j in range(M):
                out[j] += part[t, j]


cdef struct RedJob:
    # wgrad_reduce's blocks: out = the sum of the partial rows, each group's (K, R) block
    # transposed to (R, K) when trans, in tiles of RED_KB x RED_RB
    const void* part
    void* out
    Py_ssize_t rows, ldp, M, K, R, nkb, nrb
    bint trans, dbl


cdef enum:
    RED_KB = 32
    RED_RB = 128
    RED_FLAT = 4096


cdef void red_run(RedJob* j, Py_ssize_t i, floating* tmp) noexcept nogil:
    cdef const floating* p = <const floating*> j.part
    cdef floating* o = <floating*> j.out
    cdef Py_ssize_t t, k, r, q, q0, q1, g, k0, kn, r0, rn, K = j.K, R = j.R, ldp = j.ldp
    if not j.trans:
        q0 = i * RED_FLAT
        q1 = min(q0 + RED_FLAT, j.M)
        for q in range(q0, q1):
            o[q] = p[q]
        for t in range(1, j.rows):
            for q in range(q0, q1):
                o[q] += p[t * ldp + q]
        return
    # group g's tile of rows [k0, k0 + kn) and columns [r0, r0 + rn) of its (K, R) block:
    # the partial rows summed in order (as sum_rows) into tmp, then transposed into out
    g = i // (j.nkb * j.nrb)
    k0 = (i // j.nrb) % j.nkb * RED_KB
    r0 = i % j.nrb * RED_RB
    kn = min(RED_KB, K - k0)
    rn = min(RED_RB, R - r0)
    p = p + g * K * R + k0 * R + r0
    for k in range(kn):
        for r in range(rn):
            tmp[k * rn + r] = p[k * R + r]
    for t in range(1, j.rows):
        for k in range(kn):
            for r in range(rn):
                tmp[k * rn + r] += p[t * ldp + k * R + r]
    if floating is float:
        fc_transpose_f(tmp, kn, rn, rn, o + g * K * R + r0 * K + k0, K)
    else:
        fc_transpose_d(tmp, kn, rn, rn, o + g * K * R + r0 * K + k0, K)


cdef void red_item(void* ctx, Py_ssize_t i, int tid) noexcept nogil:
    cdef RedJob* j = <RedJob*> ctx
    cdef double dt[RED_KB * RED_RB]
    cdef float ft[RED_KB * RED_RB]
    if j.dbl:
        red_run(j, i, dt)
    else:
        red_run(j, i, ft)


def wgrad_reduce(const floating[:, ::1] part, floating[::1] out, Py_ssize_t groups,
                 Py_ssize_t K, bint trans, int num_threads):
    """out = part.sum(axis=0) (the rows added in order, as sum_rows), each group's (K, R)
    block transposed to (R, K) when trans (the own GEMM's weight gradient layout), in blocks
    on the pool."""
    cdef RedJob j
    cdef Py_ssize_t M = out.shape[0], n
    if part.shape[0] < 1 or part.shape[1] < M or groups < 1 or K < 1 or M % (groups * K):
        raise ValueError("wgrad_reduce: shapes do not match")
    if M == 0:
        return
    j.part = &part[0, 0]
    j.out = &out[0]
    j.rows = part.shape[0]
    j.ldp = part.shape[1]
    j.M = M
    j.K = K
    j.R = M // (groups * K)
    j.trans = trans
    j.dbl = floating is double
    j.nkb = (K + RED_KB - 1) // RED_KB
    j.nrb = (j.R + RED_RB - 1) // RED_RB
    n = groups * j.nkb * j.nrb if trans else (M + RED_FLAT - 1) // RED_FLAT
    with nogil:
        fc_pool_run(num_threads, red_item, &j, n)


def channel_sum(const floating[:, :, ::1] x, floating[::1] out, int num_threads):
    """out[c] = sum over n and the plane of x (N, C, HW): a bias gradient."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2], c, n
    cdef double acc
    if N == 0 or C == 0 or P == 0:
        out[:] = 0
        return
    with nogil:
        for c in prange(C, schedule='guided', num_threads=num_threads):
            acc = 0
            for n in range(N):
                acc = acc + row_sum_double(&x[n, c, 0], P)
            out[c] = <floating>acc


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------

cdef inline Py_ssize_t first_tap(Py_ssize_t start, Py_ssize_t d) noexcept nogil:
    """The first of start, start + d, start + 2d, ... that is >= 0."""
    if start < 0:
        return start + ceil_div_pos(-start, d) * d
    return start


cdef inline void tap_range(Py_ssize_t k, Py_ssize_t d, Py_ssize_t p, Py_ssize_t s,
                           Py_ssize_t size, Py_ssize_t n_out, Py_ssize_t* k0,
                           Py_ssize_t* k1) noexcept nogil:
    """Taps [k0, k1) of a kernel that touch the image for at least one output position:
    0 <= o*s + kk*d - p < size for some o < n_out.  Keeps huge legal kernels (kernel 2**31 with
    padding 2**30) from looping over taps that only ever see padding."""
    cdef Py_ssize_t lo = p - (n_out - 1) * s, hi = p + size - 1
    cdef Py_ssize_t a = 0, b
    if lo > 0:
        a = ceil_div_pos(lo, d)
    b = hi // d + 1 if hi >= 0 else 0
    if b > k:
        b = k
    if a > b:
        a = b
    k0[0] = a
    k1[0] = b


cdef enum:
    MAX_TAPS = 64    # column taps whose valid output ranges a pooling plane precomputes


cdef bint tap_table(Py_ssize_t kw0, Py_ssize_t kw1, Py_ssize_t dW, Py_ssize_t pW,
                    Py_ssize_t sW, Py_ssize_t W, Py_ssize_t OW, Py_ssize_t* tab) noexcept nogil:
    """(off, lo, hi) of column taps kw0 <= kw < kw1 into tab (3 entries each): the same for
    every row of a plane, so the divisions in valid_range run once per plane, not once per
    tap and row.  False (tab untouched) when there are more than MAX_TAPS taps."""
    cdef Py_ssize_t kw, off
    if kw1 - kw0 > MAX_TAPS:
        return False
    for kw in range(kw0, kw1):
        off = kw * dW - pW
        tab[3 * (kw - kw0)] = off
        valid_range(off, sW, W, OW, &tab[3 * (kw - kw0) + 1], &tab[3 * (kw - kw0) + 2])
    return True


cdef enum:
    ROW_BUF = 1024   # widest input row the separable pooling paths handle (else: tap by tap)


cdef inline void split_even_odd(const floating* v, Py_ssize_t W, floating* ev) noexcept nogil:
    """ev[:ceil(W/2)] = v[0::2], ev[ceil(W/2):W] = v[1::2]: a stride-2 tap then reads one half
    contiguously (split_at)."""
    cdef Py_ssize_t i, nod = W // 2, nev = (W + 1) // 2
    for i in range(nod):
        ev[i] = v[2 * i]
        ev[nev + i] = v[2 * i + 1]
    if nev > nod:
        ev[nod] = v[W - 1]


cdef inline floating* split_at(floating* ev, Py_ssize_t W, Py_ssize_t off) noexcept nogil:
    """Where a split row (split_even_odd) holds v[2 * ow + off] at index ow."""
    if off & 1:
        return ev + (W + 1) // 2 + (off - 1) // 2
    return ev + off // 2


cdef void combine_taps(const floating* v, Py_ssize_t W, Py_ssize_t sW, const Py_ssize_t* tab,
                       Py_ssize_t ntab, floating* orow, bint is_max,
                       floating* ev) noexcept nogil:
    """orow[ow] (op)= v[ow * sW + off] for each tap (off, lo, hi) of tab, op = NaN-aware max
    (PyTorch's ``val > m or isnan(val)``) or +.  For sW == 2 the row is split into its even
    and odd elements first (into ev, W entries), so that every tap reads contiguously."""
    cdef Py_ssize_t t, ow, off, lo, hi
    cdef const floating* src
    cdef floating a, m
    if sW == 2:
        split_even_odd(v, W, ev)
    for t in range(ntab):
        off = tab[3 * t]
        lo = tab[3 * t + 1]
        hi = tab[3 * t + 2]
        if sW == 1 or sW == 2:
            src = v + off if sW == 1 else split_at(ev, W, off)
            if is_max:
                for ow in range(lo, hi):
                    a = src[ow]
                    m = orow[ow]
                    orow[ow] = a if ((a > m) | (a != a)) else m
            else:
                for ow in range(lo, hi):
                    orow[ow] = orow[ow] + src[ow]
        else:
            if is_max:
                for ow in range(lo, hi):
                    a = v[ow * sW + off]
                    m = orow[ow]
                    orow[ow] = a if ((a > m) | (a != a)) else m
            else:
                for ow in range(lo, hi):
                    orow[ow] = orow[ow] + v[ow * sW + off]


cdef bint fold_rows(const floating* x, Py_ssize_t W, Py_ssize_t h0, Py_ssize_t hend,
                    Py_ssize_t dH, floating* vm, bint is_max) noexcept nogil:
    """vm[w] = NaN-aware max (or sum) of x[ih, w] over rows ih = h0, h0 + dH, ... < hend;
    False when there are no such rows."""
    cdef Py_ssize_t ih, w
    cdef const floating* r
    cdef floating a, m
    if h0 >= hend:
        return False
    memcpy(vm, x + h0 * W, W * sizeof(floating))
    ih = h0 + dH
    while ih < hend:
        r = x + ih * W
        if is_max:
            for w in range(W):
                a = r[w]
                m = vm[w]
                vm[w] = a if ((a > m) | (a != a)) else m
        else:
            for w in range(W):
                vm[w] = vm[w] + r[w]
        ih = ih + dH
    return True


cdef void max_pool_argmax(const floating* x, Py_ssize_t W, Py_ssize_t h0, Py_ssize_t hend,
                          Py_ssize_t dH, Py_ssize_t ws, Py_ssize_t wend, Py_ssize_t dW,
                          floating* m_io, long long* idx, bint mark_empty) noexcept nogil:
    """The index PyTorch's scan rule picks for a window whose maximum is *m_io: the first
    position (row-major) equal to it, or the last NaN when it is NaN; *m_io becomes that
    element (so that even the sign of a zero maximum is PyTorch's)."""
    cdef Py_ssize_t ih, iw, w0 = first_tap(ws, dW), best = -1
    cdef floating m = m_io[0], v
    if h0 >= hend or w0 >= wend:
        idx[0] = -1 if mark_empty else h0 * W + w0
        return
    ih = h0
    while ih < hend:
        iw = w0
        while iw < wend:
            v = x[ih * W + iw]
            if m != m:
                if v != v:
                    best = ih * W + iw
            elif v == m:
                idx[0] = ih * W + iw
                m_io[0] = v
                return
            iw = iw + dW
        ih = ih + dH
    idx[0] = best if best >= 0 else h0 * W + w0
    if best >= 0:
        m_io[0] = x[best]


cdef enum:
    MAX_WIN = 256    # window taps (rows x column taps) max_pool_row_win handles


cdef Py_ssize_t max_pool_row_win(const floating* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t oh,
                                 floating* vals, floating* win, Py_ssize_t OW, Py_ssize_t kH,
                                 Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t dH,
                                 const Py_ssize_t* tab, Py_ssize_t ntab,
                                 Py_ssize_t* tapoff) noexcept nogil:
    """Each window's maximum into vals and the ordinal of the tap PyTorch's scan picks (the
    first, row-major, equal to the maximum) into win, -1 when none (a window in the padding,
    or a NaN maximum: the caller rescans those).  The taps are visited in reverse order,
    keeping the last match: selects on floats the compiler vectorises, unlike the scan's
    running (value, int64 index) pair.  Tap ordinal k sits at
    x[first_row * W + ow * sW + tapoff[k]]; returns first_row, or -1 when the window has more
    than MAX_WIN taps (tapoff untouched: the caller falls back)."""
    cdef Py_ssize_t hs = oh * sH - pH, h0, hend, nr, r, t, off, lo, hi, ow
    cdef const floating* xrow
    cdef const floating* src
    cdef floating ev[ROW_BUF]
    cdef floating v, tn
    h0 = first_tap(hs, dH)
    hend = hs + (kH - 1) * dH + 1
    if hend > H:
        hend = H
    nr = (hend - h0 + dH - 1) // dH if hend > h0 else 0
    if nr * ntab > MAX_WIN:
        return -1
    max_pool_row_fast(x, H, W, oh, vals, OW, kH, sH, sW, pH, dH, tab, ntab)
    for ow in range(OW):
        win[ow] = -1
    r = nr - 1
    while r >= 0:
        xrow = x + (h0 + r * dH) * W
        if sW == 2 and W <= ROW_BUF:        # split even/odd once: the taps read contiguously
            split_even_odd(xrow, W, &ev[0])
        t = ntab - 1
        while t >= 0:
            off = tab[3 * t]
            lo = tab[3 * t + 1]
            hi = tab[3 * t + 2]
            tn = <floating>(r * ntab + t)
            tapoff[r * ntab + t] = r * dH * W + off
            if sW == 2 and W <= ROW_BUF:
                src = split_at(&ev[0], W, off)
                for ow in range(lo, hi):
                    v = src[ow]
                    win[ow] = tn if v == vals[ow] else win[ow]
            elif sW == 2:
                for ow in range(lo, hi):
                    v = xrow[2 * ow + off]
                    win[ow] = tn if v == vals[ow] else win[ow]
            elif sW == 1:
                for ow in range(lo, hi):
                    v = xrow[ow + off]
                    win[ow] = tn if v == vals[ow] else win[ow]
            else:
                for ow in range(lo, hi):
                    v = xrow[ow * sW + off]
                    win[ow] = tn if v == vals[ow] else win[ow]
            t = t - 1
        r = r - 1
    return h0 if h0 < H else 0


cdef bint max_pool_row_indexed(const floating* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t oh,
                               floating* vals, long long* irow, floating* win,
                               Py_ssize_t OW, Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH,
                               Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH,
                               Py_ssize_t dW, const Py_ssize_t* tab, Py_ssize_t ntab,
                               bint mark_empty) noexcept nogil:
    """max_pool_row with the argmax (same values and indices) through max_pool_row_win;
    False when the window is too large for it (nothing written)."""
    cdef Py_ssize_t tapoff[MAX_WIN]
    cdef Py_ssize_t ow, h0, hs, hend, ws, wend, k
    cdef long long j
    h0 = max_pool_row_win(x, H, W, oh, vals, win, OW, kH, sH, sW, pH, dH, tab, ntab, tapoff)
    if h0 < 0:
        return False
    for ow in range(OW):
        k = <Py_ssize_t>win[ow]
        if k >= 0:
            j = h0 * W + ow * sW + tapoff[k]
            irow[ow] = j
            vals[ow] = x[j]                 # PyTorch's element: even a zero's sign matches
        else:                               # NaN maximum, or a window in the padding
            hs = oh * sH - pH
            hend = hs + (kH - 1) * dH + 1
            if hend > H:
                hend = H
            ws = ow * sW - pW
            wend = ws + (kW - 1) * dW + 1
            if wend > W:
                wend = W
            max_pool_argmax(x, W, first_tap(hs, dH), hend, dH, ws, wend, dW, &vals[ow],
                            &irow[ow], mark_empty)
    return True


cdef void max_pool_row_fast(const floating* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t oh,
                            floating* orow, Py_ssize_t OW, Py_ssize_t kH, Py_ssize_t sH,
                            Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t dH, const Py_ssize_t* tab,
                            Py_ssize_t ntab) noexcept nogil:
    """The values of max_pool_row (no argmax), for rows of at most ROW_BUF values with a tap
    table: the window's rows are folded first (contiguous loads), then the taps combined.
    Max is exact, so only the sign of a zero maximum can differ from the tap-by-tap scan."""
    cdef floating vm[ROW_BUF]
    cdef floating ev[ROW_BUF]
    cdef Py_ssize_t hs = oh * sH - pH, h0, hend, ow
    h0 = first_tap(hs, dH)
    hend = hs + (kH - 1) * dH + 1
    if hend > H:
        hend = H
    for ow in range(OW):
        orow[ow] = -INFINITY
    if fold_rows(x, W, h0, hend, dH, vm, True):
        combine_taps(vm, W, sW, tab, ntab, orow, True, ev)


cdef void max_pool_row(const floating* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t oh,
                       floating* orow, long long* irow, Py_ssize_t OW,
                       Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                       Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                       bint track, bint mark_empty, const Py_ssize_t* tab) noexcept nogil:
    """One output row of max pooling, PyTorch's CPU rule: each window scanned row-major,
    taking ``val > max or isnan(val)`` (first maximum wins; NaN propagates).

    The scan runs tap by tap over the whole row, so the inner loop over ``ow`` is a
    compare-and-select the compiler vectorises.  With ``track`` the argmax goes to ``irow``,
    starting, as PyTorch, at the window's first in-image position; with ``mark_empty`` a window
    wholly in the padding gets -1 instead (it has no input to send a gradient to).  ``tab``:
    the plane's tap table (tap_table), or NULL to compute the taps' ranges here.
    """
    cdef Py_ssize_t hs = oh * sH - pH, h0, hend, ih, kw, off, lo, hi, ow, ws, w0, wend, base
    cdef Py_ssize_t kw0, kw1
    cdef const floating* xrow
    cdef floating v, m
    cdef bint take, row_empty
    h0 = first_tap(hs, dH)
    hend = hs + (kH - 1) * dH + 1
    if hend > H:
        hend = H
    row_empty = h0 >= hend
    for ow in range(OW):
        orow[ow] = -INFINITY
    if track:
        for ow in range(OW):
            ws = ow * sW - pW
            w0 = first_tap(ws, dW)
            wend = ws + (kW - 1) * dW + 1
            if wend > W:
                wend = W
            if mark_empty and (row_empty or w0 >= wend):
                irow[ow] = -1
            else:
                irow[ow] = h0 * W + w0
    if row_empty:
        return
    tap_range(kW, dW, pW, sW, W, OW, &kw0, &kw1)
    ih = h0
    while ih < hend:
        xrow = x + ih * W
        for kw in range(kw0, kw1):
            tap_at(tab, kw - kw0, kw * dW - pW, sW, W, OW, &off, &lo, &hi)
            if track:
                base = ih * W + off
                for ow in range(lo, hi):
                    v = xrow[ow * sW + off]
                    m = orow[ow]
                    take = (v > m) | (v != v)
                    orow[ow] = v if take else m
                    irow[ow] = (base + ow * sW) if take else irow[ow]
            elif sW == 1:
                for ow in range(lo, hi):
                    v = xrow[ow + off]
                    m = orow[ow]
                    orow[ow] = v if ((v > m) | (v != v)) else m
            else:
                for ow in range(lo, hi):
                    v = xrow[ow * sW + off]
                    m = orow[ow]
                    orow[ow] = v if ((v > m) | (v != v)) else m
        ih = ih + dH


cdef inline bint in_lanes(Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                          Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                          Py_ssize_t pH, Py_ssize_t pW) noexcept nogil:
    """Whether a pooling's planes go 16 at a time into vector lanes (fc_maxpool_lanes,
    fc_avgpool_lanes): small planes whose rows are shorter than a vector, except 2x2 stride-2
    windows on even widths, whose per-plane kernels run flat over the rows (stacked_rows).
    Intel Xeon (EMR), max, against the per-plane paths: 7x7 2x2 4.3x, 5x5 3x3 s2 10x, 14x14
    3x3 s2 2.8x, 12x12 3x3 s1 1.4x faster; 16x16 3x3 s2 0.64x, hence rows of 16 and up stay
    per plane; global average pooling of 7x7 planes was 0.5x ONNX Runtime."""
    if W >= 16 or H * W > FC_POOL_LANE_VALS or OH * OW > FC_POOL_LANE_VALS:
        return False
    return not (kH == 2 and kW == 2 and sH == 2 and sW == 2 and pH == 0 and pW == 0
                and W == 2 * OW)


cdef inline bint stacked_rows(Py_ssize_t planes, Py_ssize_t H, Py_ssize_t OH, Py_ssize_t kH,
                              Py_ssize_t sH, Py_ssize_t pH, Py_ssize_t dH) noexcept nogil:
    """Whether a pooling's planes can be processed as one plane of planes * H rows: windows
    that tile the rows exactly (kernel == stride, no padding or dilation, H = kH * OH), so
    that no window meets a row of another plane and every output row is alike.  Small
    planes (14x14, 7x7) then cost one call per block instead of one per plane: the per-plane
    set-up and the short rows' scalar tails were most of a 14x14 2x2 pool (0.64x ONNX
    Runtime's time on an Intel Xeon)."""
    return planes > 1 and kH == sH and pH == 0 and dH == 1 and H == kH * OH


cdef void max_pool_plane(const floating* x, Py_ssize_t H, Py_ssize_t W, floating* out,
                         long long* ind, Py_ssize_t OH, Py_ssize_t OW,
                         Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                         Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                         bint track) noexcept nogil:
    cdef Py_ssize_t oh, kw0, kw1
    cdef Py_ssize_t tab[3 * MAX_TAPS]
    cdef floating winbuf[ROW_BUF]
    cdef floating* win = winbuf if OW <= ROW_BUF else NULL
    if (not track and kH == 2 and kW == 2 and sH == 2 and sW == 2 and pH == 0 and pW == 0
            and dH == 1 and dW == 1 and W == 2 * OW and 2 * OH <= H and W <= FC_MP22_BUF):
        if floating is float:
            fc_maxpool22_f(x, OH, W, out)
        else:
            fc_maxpool22_d(x, OH, W, out)
        return
    if (not track and kH == 3 and kW == 3 and sH == 2 and sW == 2 and pH <= 1 and pW <= 1
            and dH == 1 and dW == 1 and OW + 2 <= FC_MP33_ROW and W // 2 + 2 <= FC_MP33_ROW
            and 3 * OW <= FC_MP33_BUF):
        if floating is float:
            fc_maxpool33s2_f(x, H, W, OH, OW, <int>pH, <int>pW, out)
        else:
            fc_maxpool33s2_d(x, H, W, OH, OW, <int>pH, <int>pW, out)
        return
    tap_range(kW, dW, pW, sW, W, OW, &kw0, &kw1)
    cdef bint have = tap_table(kw0, kw1, dW, pW, sW, W, OW, tab)
    for oh in range(OH):
        if have and W <= ROW_BUF and not track:
            max_pool_row_fast(x, H, W, oh, out + oh * OW, OW, kH, sH, sW, pH, dH, tab,
                              kw1 - kw0)
        elif have and W <= ROW_BUF and win != NULL and max_pool_row_indexed(
                x, H, W, oh, out + oh * OW, ind + oh * OW, win, OW, kH, kW, sH, sW, pH, pW,
                dH, dW, tab, kw1 - kw0, False):
            pass
        else:
            max_pool_row(x, H, W, oh, out + oh * OW, ind + oh * OW if track else NULL, OW,
                         kH, kW, sH, sW, pH, pW, dH, dW, track, False, tab if have else NULL)


cdef void max_pool_plane_backward_tiled(const floating* gy, const floating* x, floating* gx,
                                        Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                                        Py_ssize_t OW, Py_ssize_t kH, Py_ssize_t kW,
                                        const Py_ssize_t* tab, floating* vals,
                                        floating* win) noexcept nogil:
    """max_pool_plane_backward for windows that tile the plane (kernel == stride, no padding,
    no dilation): every input element lies in at most one window, so gx is written once,
    row by row, as gy where the element is its window's argmax and 0 elsewhere; no zeroing
    pass, no scatter."""
    cdef Py_ssize_t tapoff[MAX_WIN]
    cdef Py_ssize_t oh, ow, r, kw, hs, wend
    cdef floating* gxrow
    cdef const floating* g
    cdef floating tn, tn1, gv, wv, z = 0
    cdef long long j
    cdef int nan_row
    for oh in range(OH):
        g = gy + oh * OW
        if kH == 2 and kW == 2:     # the common case in one pass (redone below on NaN)
            if floating is float:
                nan_row = fc_mp22_bwd_f(x + 2 * oh * W, x + (2 * oh + 1) * W, g, OW,
                                        gx + 2 * oh * W, gx + (2 * oh + 1) * W,
                                        (H - 2 * oh - 1) * W, (OH - oh) * OW)
                if nan_row < 0:
                    nan_row = fc_maxpool22_bwd_f(x + 2 * oh * W, x + (2 * oh + 1) * W, g, OW,
                                                 gx + 2 * oh * W, gx + (2 * oh + 1) * W)
            else:
                nan_row = fc_mp22_bwd_d(x + 2 * oh * W, x + (2 * oh + 1) * W, g, OW,
                                        gx + 2 * oh * W, gx + (2 * oh + 1) * W,
                                        (H - 2 * oh - 1) * W, (OH - oh) * OW)
                if nan_row < 0:
                    nan_row = fc_maxpool22_bwd_d(x + 2 * oh * W, x + (2 * oh + 1) * W, g, OW,
                                                 gx + 2 * oh * W, gx + (2 * oh + 1) * W)
            if not nan_row:
                if 2 * OW < W:
                    gx[2 * oh * W + W - 1] = 0
                    gx[(2 * oh + 1) * W + W - 1] = 0
                continue
        max_pool_row_win(x, H, W, oh, vals, win, OW, kH, kH, kW, 0, 1, tab, kW, tapoff)
        for r in range(kH):
            gxrow = gx + (oh * kH + r) * W
            if kW == 2:
                tn = <floating>(r * 2)
                tn1 = tn + 1
                for ow in range(OW):       # loads first: selects, not branches
                    gv = g[ow]
                    wv = win[ow]
                    gxrow[2 * ow] = gv if wv == tn else z
                    gxrow[2 * ow + 1] = gv if wv == tn1 else z
            else:
                for kw in range(kW):
                    tn = <floating>(r * kW + kw)
                    for ow in range(OW):
                        gv = g[ow]
                        wv = win[ow]
                        gxrow[ow * kW + kw] = gv if wv == tn else z
            for ow in range(OW * kW, W):          # columns no window covers
                gxrow[ow] = 0
        for ow in range(OW):                      # NaN maxima: the last NaN takes it
            if win[ow] < 0 and vals[ow] != vals[ow]:
                hs = oh * kH
                wend = min(ow * kW + kW, W)
                max_pool_argmax(x, W, hs, min(hs + kH, H), 1, ow * kW, wend, 1, &vals[ow], &j,
                                True)
                if j >= 0:
                    gx[j] += g[ow]
    if OH * kH < H:                               # rows no window covers
        memset(gx + OH * kH * W, 0, (H - OH * kH) * W * sizeof(floating))


cdef inline long long window_argmax(const floating* x, Py_ssize_t W, Py_ssize_t h0,
                                    Py_ssize_t hend, Py_ssize_t w0,
                                    Py_ssize_t wend) noexcept nogil:
    """PyTorch's scan over the in-image part [h0, hend) x [w0, wend) of a window (dilation
    1): the first maximum, or the last NaN; the first element when nothing beats -inf; -1
    when the part is empty."""
    cdef Py_ssize_t ih, iw
    cdef long long j = h0 * W + w0
    cdef floating m = -INFINITY, v
    if h0 >= hend or w0 >= wend:
        return -1
    for ih in range(h0, hend):
        for iw in range(w0, wend):
            v = x[ih * W + iw]
            if v > m or v != v:
                m = v
                j = ih * W + iw
    return j


cdef void max_pool_plane_backward_33s2(const floating* gy, const floating* x, floating* gx,
                                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                                       Py_ssize_t OW, Py_ssize_t pH,
                                       Py_ssize_t pW) noexcept nogil:
    """max_pool_plane_backward for 3x3 windows, stride 2, dilation 1, W <= ROW_BUF (the
    stem pooling of ResNets): per output row, the windows wholly inside the columns go
    through fc_maxpool33s2_bwd (argmax and accumulation in vectorised passes, a row in the
    padding read as -inf and written to a dummy row), the edge windows through the scalar
    scan."""
    cdef floating sel[ROW_BUF + 2]
    cdef floating c2[ROW_BUF + 2]
    cdef floating neg[ROW_BUF]
    cdef floating dummy[3 * ROW_BUF]
    cdef const floating* xr[3]
    cdef floating* gr[3]
    cdef Py_ssize_t oh, ow, r, r0, rfirst, lo, hi, ws, zrow, rend
    cdef long long j
    for ow in range(W):
        neg[ow] = -INFINITY
    lo = pW                                   # first window with 2 ow - pW >= 0 (pW <= 1)
    hi = (W - 3 + pW) // 2 + 1 if W - 3 + pW >= 0 else 0
    if hi > OW:
        hi = OW
    if hi < lo:
        hi = lo
    zrow = 0                                  # rows [0, zrow) of gx are zeroed
    for oh in range(OH):
        r0 = 2 * oh - pH
        rend = min(r0 + 3, H)
        if zrow < rend:                       # zero the rows the window row touches first
            memset(gx + zrow * W, 0, (rend - zrow) * W * sizeof(floating))
            zrow = rend
        rfirst = -1
        for r in range(3):
            if 0 <= r0 + r < H:
                xr[r] = x + (r0 + r) * W - pW
                gr[r] = gx + (r0 + r) * W - pW
                if rfirst < 0:
                    rfirst = r
            else:
                xr[r] = neg - pW
                gr[r] = dummy + r * ROW_BUF - pW
        if rfirst < 0:                        # a window wholly in the padding: no gradient
            continue
        if hi > lo:
            if floating is float:
                if not fc_mp33_bwd_f(xr[0], xr[1], xr[2], gy + oh * OW, lo, hi,
                                     <float>(3 * rfirst), gr[0], gr[1], gr[2]):
                    fc_maxpool33s2_bwd_f(xr[0], xr[1], xr[2], gy + oh * OW, lo, hi,
                                         <float>(3 * rfirst), sel, c2, gr[0], gr[1], gr[2])
            else:
                if not fc_mp33_bwd_d(xr[0], xr[1], xr[2], gy + oh * OW, lo, hi,
                                     <double>(3 * rfirst), gr[0], gr[1], gr[2]):
                    fc_maxpool33s2_bwd_d(xr[0], xr[1], xr[2], gy + oh * OW, lo, hi,
                                         <double>(3 * rfirst), sel, c2, gr[0], gr[1], gr[2])
        ow = 0
        while ow < OW:                # the edge windows: [0, lo) and [hi, OW)
            if ow == lo and hi > lo:
                ow = hi
                continue
            ws = 2 * ow - pW
            j = window_argmax(x, W, r0 + rfirst, min(r0 + 3, H), max(ws, 0), min(ws + 3, W))
            if j >= 0:
                gx[j] += gy[oh * OW + ow]
            ow = ow + 1
    if zrow < H:
        memset(gx + zrow * W, 0, (H - zrow) * W * sizeof(floating))


cdef void max_pool_plane_backward(const floating* gy, const floating* x, floating* gx,
                                  Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                                  Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                                  Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                                  floating* vals, long long* idx) noexcept nogil:
    """gx (the whole plane) = grad_out scattered to each window's argmax."""
    cdef Py_ssize_t oh, ow, kw0, kw1
    cdef long long j
    cdef Py_ssize_t tab[3 * MAX_TAPS]
    tap_range(kW, dW, pW, sW, W, OW, &kw0, &kw1)
    cdef bint have = tap_table(kw0, kw1, dW, pW, sW, W, OW, tab)
    if (have and kH == sH and kW == sW and pH == 0 and pW == 0 and dH == 1 and dW == 1
            and OH * kH <= H and OW * kW <= W          # (ceil_mode can make windows overhang)
            and W <= ROW_BUF and kH * kW <= MAX_WIN and kw1 - kw0 == kW):
        max_pool_plane_backward_tiled(gy, x, gx, H, W, OH, OW, kH, kW, tab, vals, vals + OW)
        return
    if (kH == 3 and kW == 3 and sH == 2 and sW == 2 and dH == 1 and dW == 1 and pW <= 1
            and W <= ROW_BUF):
        max_pool_plane_backward_33s2(gy, x, gx, H, W, OH, OW, pH, pW)
        return
    memset(gx, 0, H * W * sizeof(floating))
    for oh in range(OH):
        if not (have and W <= ROW_BUF and max_pool_row_indexed(
                x, H, W, oh, vals, idx, vals + OW, OW, kH, kW, sH, sW, pH, pW, dH, dW, tab,
                kw1 - kw0, True)):
            max_pool_row(x, H, W, oh, vals, idx, OW, kH, kW, sH, sW, pH, pW, dH, dW, True,
                         True, tab if have else NULL)
        for ow in range(OW):
            j = idx[ow]
            if j >= 0:
                gx[j] += gy[oh * OW + ow]


def max_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                       long long[:, :, :, ::1] indices_out,
                       Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                       Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                       bint with_indices, int num_threads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3], plane
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef long long* ip = &indices_out[0, 0, 0, 0]
    cdef Py_ssize_t nblk, blk, p0, p1
    cdef bint lanes = not with_indices and in_lanes(H, W, OH, OW, kH, kW, sH, sW, pH, pW)
    if not with_indices and not lanes and stacked_rows(N * C, H, OH, kH, sH, pH, dH):
        # the planes as one tall plane, cut into a few blocks of whole planes
        nblk = min(N * C, 4 * num_threads)
        with nogil:
            for blk in prange(nblk, schedule='static', num_threads=num_threads):
                p0 = blk * (N * C) // nblk
                p1 = (blk + 1) * (N * C) // nblk
                max_pool_plane(xp + p0 * H * W, (p1 - p0) * H, W, op + p0 * OH * OW, NULL,
                               (p1 - p0) * OH, OW, kH, kW, sH, sW, pH, pW, dH, dW, False)
        return
    cdef Py_ssize_t ngrp = 0
    if lanes:
        ngrp = (N * C) // 16
        with nogil:
            for blk in prange(ngrp, schedule='static', num_threads=num_threads):
                if floating is float:
                    fc_maxpool_lanes_f(xp + blk * 16 * H * W, H, W, OH, OW, kH, kW, sH, sW,
                                       pH, pW, dH, dW, op + blk * 16 * OH * OW)
                else:
                    fc_maxpool_lanes_d(xp + blk * 16 * H * W, H, W, OH, OW, kH, kW, sH, sW,
                                       pH, pW, dH, dW, op + blk * 16 * OH * OW)
    with nogil:
        for plane in prange(ngrp * 16, N * C, schedule='guided', num_threads=num_threads):
            max_pool_plane(xp + plane * H * W, H, W, op + plane * OH * OW,
                           ip + plane * OH * OW if with_indices else NULL, OH, OW,
                           kH, kW, sH, sW, pH, pW, dH, dW, with_indices)


def max_pool2d_backward(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
                        floating[:, :, :, ::1] grad_x_out, floating[:, ::1] vals_scratch,
                        long long[:, ::1] idx_scratch,
                        Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                        Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t dH, Py_ssize_t dW,
                        int num_threads):
    """grad_x (fully written); per-thread scratch rows: vals (threads, 2 OW), idx (threads,
    OW)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3], plane
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* gyp = &grad_out[0, 0, 0, 0]
    cdef floating* gxp = &grad_x_out[0, 0, 0, 0]
    cdef floating* vp = &vals_scratch[0, 0]
    cdef long long* jp = &idx_scratch[0, 0]
    cdef floating* vals
    cdef long long* idx
    if vals_scratch.shape[0] < num_threads or idx_scratch.shape[0] < num_threads or \
            vals_scratch.shape[1] < 2 * OW or idx_scratch.shape[1] < OW:
        raise ValueError("max_pool2d_backward: scratch needs (threads, 2 OW) and (threads, OW)")
    with nogil, parallel(num_threads=num_threads):
        vals = vp + threadid() * vals_scratch.shape[1]
        idx = jp + threadid() * idx_scratch.shape[1]
        for plane in prange(N * C, schedule='guided'):
            max_pool_plane_backward(gyp + plane * OH * OW, xp + plane * H * W,
                                    gxp + plane * H * W, H, W, OH, OW,
                                    kH, kW, sH, sW, pH, pW, dH, dW, vals, idx)


cdef inline double avg_divisor(Py_ssize_t hs, Py_ssize_t he, Py_ssize_t hs_c, Py_ssize_t he_c,
                                 Py_ssize_t ow, Py_ssize_t kW, Py_ssize_t sW, Py_ssize_t pW,
                                 Py_ssize_t W, bint count_include_pad,
                                 Py_ssize_t divisor_override, bint* empty) noexcept nogil:
    """PyTorch's average-pool divisor for window (row range [hs, he) before clipping to the
    image, [hs_c, he_c) after; column window of output column ow)."""
    cdef Py_ssize_t ws = ow * sW - pW, we = ws + kW, ws_c, we_c
    if we > W + pW:
        we = W + pW
    ws_c = ws if ws > 0 else 0
    we_c = we if we < W else W
    empty[0] = he_c <= hs_c or we_c <= ws_c
    if divisor_override != 0:
        return <double>divisor_override
    if count_include_pad:
        return <double>((he - hs) * (we - ws))
    return <double>((he_c - hs_c) * (we_c - ws_c))


cdef void avg_divisor_row(Py_ssize_t hs, Py_ssize_t he, Py_ssize_t hs_c, Py_ssize_t he_c,
                          Py_ssize_t OW, Py_ssize_t kW, Py_ssize_t sW, Py_ssize_t pW,
                          Py_ssize_t W, bint count_include_pad, Py_ssize_t divisor_override,
                          floating* dv, floating* em, Py_ssize_t* key) noexcept nogil:
    """avg_divisor for every column of an output row (OW <= ROW_BUF): dv[ow] the divisor,
    em[ow] 1 where the window is empty (its output is 0), else 0, so that the per-output
    division is a vector loop.  It depends on the row only through (he - hs, he_c - hs_c),
    kept in key: nothing is recomputed while those stay the same (key[0] = -1 at first)."""
    cdef Py_ssize_t ow
    cdef bint empty
    if key[0] == he - hs and key[1] == he_c - hs_c:
        return
    key[0] = he - hs
    key[1] = he_c - hs_c
    for ow in range(OW):
        dv[ow] = <floating>avg_divisor(hs, he, hs_c, he_c, ow, kW, sW, pW, W,
                                       count_include_pad, divisor_override, &empty)
        em[ow] = 1 if empty else 0


cdef void avg_pool_plane(const floating* x, Py_ssize_t H, Py_ssize_t W, floating* out,
                         Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kH, Py_ssize_t kW,
                         Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                         bint count_include_pad, Py_ssize_t divisor_override) noexcept nogil:
    """Window sums, then one division per output.  Rows of at most ROW_BUF values: the
    window's rows summed first (contiguous), then its taps (fold_rows, combine_taps); wider
    rows: tap by tap over whole rows.  Both loops vectorise."""
    cdef Py_ssize_t oh, ow, ih, kw, off, lo, hi, hs, he, hs_c, he_c, kw0, kw1
    cdef floating* orow
    cdef const floating* xrow
    cdef floating div
    cdef bint empty
    cdef Py_ssize_t tab[3 * MAX_TAPS]
    cdef floating vm[ROW_BUF]
    cdef floating ev[ROW_BUF]
    cdef floating dv[ROW_BUF]
    cdef floating em[ROW_BUF]
    cdef floating v
    cdef Py_ssize_t key[2]
    key[0] = -1
    tap_range(kW, 1, pW, sW, W, OW, &kw0, &kw1)
    cdef bint have = tap_table(kw0, kw1, 1, pW, sW, W, OW, tab)
    cdef bint fast = have and W <= ROW_BUF
    if (kH == 2 and kW == 2 and sH == 2 and sW == 2 and pH == 0 and pW == 0
            and 2 * OH <= H and 2 * OW <= W):      # every window whole (no ceil overhang)
        div = <floating>(divisor_override if divisor_override else 4)
        for oh in range(OH):
            if floating is float:
                fc_avgpool22_f(x + 2 * oh * W, x + (2 * oh + 1) * W, OW, div, out + oh * OW)
            else:
                fc_avgpool22_d(x + 2 * oh * W, x + (2 * oh + 1) * W, OW, div, out + oh * OW)
        return
    for oh in range(OH):
        orow = out + oh * OW
        hs = oh * sH - pH
        he = hs + kH
        if he > H + pH:
            he = H + pH
        hs_c = hs if hs > 0 else 0
        he_c = he if he < H else H
        for ow in range(OW):
            orow[ow] = 0
        if fast:
            if fold_rows(x, W, hs_c, he_c, 1, vm, False):
                combine_taps(vm, W, sW, tab, kw1 - kw0, orow, False, ev)
        else:
            for ih in range(hs_c, he_c):
                xrow = x + ih * W
                for kw in range(kw0, kw1):
                    tap_at(tab if have else NULL, kw - kw0, kw - pW, sW, W, OW, &off, &lo, &hi)
                    if sW == 1:
                        for ow in range(lo, hi):
                            orow[ow] = orow[ow] + xrow[ow + off]
                    else:
                        for ow in range(lo, hi):
                            orow[ow] = orow[ow] + xrow[ow * sW + off]
        if OW <= ROW_BUF:
            avg_divisor_row(hs, he, hs_c, he_c, OW, kW, sW, pW, W, count_include_pad,
                            divisor_override, dv, em, key)
            for ow in range(OW):
                v = orow[ow]
                orow[ow] = 0 if em[ow] != 0 else v / dv[ow]
            continue
        for ow in range(OW):
            div = <floating>avg_divisor(hs, he, hs_c, he_c, ow, kW, sW, pW, W,
                                        count_include_pad, divisor_override, &empty)
            orow[ow] = 0 if empty else orow[ow] / div


cdef void spread_taps(const floating* g, Py_ssize_t W, Py_ssize_t sW, const Py_ssize_t* tab,
                      Py_ssize_t ntab, floating* h, floating* ev) noexcept nogil:
    """The adjoint of combine_taps' sum: h[ow * sW + off] += g[ow] over the taps of tab, h
    (W values) zeroed first.  For sW == 2 the sums go to the even and odd halves in ev
    (contiguous), interleaved into h at the end."""
    cdef Py_ssize_t t, ow, off, lo, hi, i, nod = W // 2, nev = (W + 1) // 2
    cdef floating* dst
    if sW == 2:
        memset(ev, 0, W * sizeof(floating))
    else:
        memset(h, 0, W * sizeof(floating))
    for t in range(ntab):
        off = tab[3 * t]
        lo = tab[3 * t + 1]
        hi = tab[3 * t + 2]
        if sW == 2 or sW == 1:
            dst = h + off if sW == 1 else split_at(ev, W, off)
            for ow in range(lo, hi):
                dst[ow] = dst[ow] + g[ow]
        else:
            for ow in range(lo, hi):
                h[ow * sW + off] = h[ow * sW + off] + g[ow]
    if sW == 2:
        for i in range(nod):
            h[2 * i] = ev[i]
            h[2 * i + 1] = ev[nev + i]
        if nev > nod:
            h[W - 1] = ev[nod]


cdef void avg_pool_plane_backward(const floating* gy, floating* gx, Py_ssize_t H, Py_ssize_t W,
                                  Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kH, Py_ssize_t kW,
                                  Py_ssize_t sH, Py_ssize_t sW, Py_ssize_t pH, Py_ssize_t pW,
                                  bint count_include_pad, Py_ssize_t divisor_override,
                                  floating* g) noexcept nogil:
    cdef Py_ssize_t oh, ow, ih, kw, off, lo, hi, hs, he, hs_c, he_c, kw0, kw1
    cdef floating* gxrow
    cdef floating div
    cdef bint empty
    cdef Py_ssize_t tab[3 * MAX_TAPS]
    cdef Py_ssize_t w
    cdef floating h[ROW_BUF]
    cdef floating ev[ROW_BUF]
    cdef floating dv[ROW_BUF]
    cdef floating em[ROW_BUF]
    cdef floating v
    cdef Py_ssize_t key[2]
    key[0] = -1
    # windows that tile the plane (kernel == stride, no padding, none overhanging)
    cdef bint tiled = (kH == sH and kW == sW and pH == 0 and pW == 0 and OH * kH <= H
                       and OW * kW <= W)
    if tiled:
        if OH * kH < H:
            memset(gx + OH * kH * W, 0, (H - OH * kH) * W * sizeof(floating))
    else:
        memset(gx, 0, H * W * sizeof(floating))
    tap_range(kW, 1, pW, sW, W, OW, &kw0, &kw1)
    cdef bint have = tap_table(kw0, kw1, 1, pW, sW, W, OW, tab)
    cdef bint fast = have and W <= ROW_BUF
    for oh in range(OH):
        hs = oh * sH - pH
        he = hs + kH
        if he > H + pH:
            he = H + pH
        hs_c = hs if hs > 0 else 0
        he_c = he if he < H else H
        if OW <= ROW_BUF:
            avg_divisor_row(hs, he, hs_c, he_c, OW, kW, sW, pW, W, count_include_pad,
                            divisor_override, dv, em, key)
            for ow in range(OW):
                v = gy[oh * OW + ow]
                g[ow] = 0 if em[ow] != 0 else v / dv[ow]
        else:
            for ow in range(OW):
                div = <floating>avg_divisor(hs, he, hs_c, he_c, ow, kW, sW, pW, W,
                                            count_include_pad, divisor_override, &empty)
                g[ow] = 0 if empty else gy[oh * OW + ow] / div
        if tiled:       # each input element in exactly one window: write, don't accumulate
            for ih in range(oh * kH, oh * kH + kH):
                gxrow = gx + ih * W
                if kW == 2:
                    for ow in range(OW):
                        gxrow[2 * ow] = g[ow]
                        gxrow[2 * ow + 1] = g[ow]
                else:
                    for ow in range(OW):
                        for kw in range(kW):
                            gxrow[ow * kW + kw] = g[ow]
                for w in range(OW * kW, W):
                    gxrow[w] = 0
            continue
        if fast:        # one row's spread of g (adjoint of the forward's taps), added per row
            if hs_c < he_c:
                spread_taps(g, W, sW, tab, kw1 - kw0, h, ev)
                for ih in range(hs_c, he_c):
                    gxrow = gx + ih * W
                    for w in range(W):
                        gxrow[w] = gxrow[w] + h[w]
            continue
        for ih in range(hs_c, he_c):
            gxrow = gx + ih * W
            for kw in range(kw0, kw1):
                tap_at(tab if have else NULL, kw - kw0, kw - pW, sW, W, OW, &off, &lo, &hi)
                if sW == 1:
                    for ow in range(lo, hi):
                        gxrow[ow + off] = gxrow[ow + off] + g[ow]
                else:
                    for ow in range(lo, hi):
                        gxrow[ow * sW + off] += g[ow]


def avg_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                       Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                       Py_ssize_t pH, Py_ssize_t pW, bint count_include_pad,
                       Py_ssize_t divisor_override, int num_threads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3], plane
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t nblk, blk, p0, p1
    cdef bint lanes = in_lanes(H, W, OH, OW, kH, kW, sH, sW, pH, pW)
    if not lanes and stacked_rows(N * C, H, OH, kH, sH, pH, 1):
        nblk = min(N * C, 4 * num_threads)         # as max_pool2d_forward
        with nogil:
            for blk in prange(nblk, schedule='static', num_threads=num_threads):
                p0 = blk * (N * C) // nblk
                p1 = (blk + 1) * (N * C) // nblk
                avg_pool_plane(xp + p0 * H * W, (p1 - p0) * H, W, op + p0 * OH * OW,
                               (p1 - p0) * OH, OW, kH, kW, sH, sW, pH, pW, count_include_pad,
                               divisor_override)
        return
    cdef Py_ssize_t ngrp = 0, oh, ow, hs, he
    cdef floating dv[FC_POOL_LANE_VALS]
    cdef unsigned char em[FC_POOL_LANE_VALS]
    cdef bint empty
    if lanes:
        # small planes 16 at a time in vector lanes, as max_pool2d_forward; the divisors
        # once per call
        for oh in range(OH):
            hs = oh * sH - pH
            he = min(hs + kH, H + pH)
            for ow in range(OW):
                dv[oh * OW + ow] = <floating>avg_divisor(
                    hs, he, max(hs, 0), min(he, H), ow, kW, sW, pW, W, count_include_pad,
                    divisor_override, &empty)
                em[oh * OW + ow] = empty
        ngrp = (N * C) // 16
        with nogil:
            for blk in prange(ngrp, schedule='static', num_threads=num_threads):
                if floating is float:
                    fc_avgpool_lanes_f(xp + blk * 16 * H * W, H, W, OH, OW, kH, kW, sH, sW,
                                       pH, pW, dv, em, op + blk * 16 * OH * OW)
                else:
                    fc_avgpool_lanes_d(xp + blk * 16 * H * W, H, W, OH, OW, kH, kW, sH, sW,
                                       pH, pW, dv, em, op + blk * 16 * OH * OW)
    with nogil:
        for plane in prange(ngrp * 16, N * C, schedule='guided', num_threads=num_threads):
            avg_pool_plane(xp + plane * H * W, H, W, op + plane * OH * OW, OH, OW, kH, kW,
                           sH, sW, pH, pW, count_include_pad, divisor_override)


def avg_pool2d_backward(const floating[:, :, :, ::1] grad_out, floating[:, :, :, ::1] grad_x_out,
                        floating[:, ::1] scratch,
                        Py_ssize_t kH, Py_ssize_t kW, Py_ssize_t sH, Py_ssize_t sW,
                        Py_ssize_t pH, Py_ssize_t pW, bint count_include_pad,
                        Py_ssize_t divisor_override, int num_threads):
    """grad_x (fully written); scratch is (threads, OW)."""
    cdef Py_ssize_t N = grad_x_out.shape[0], C = grad_x_out.shape[1]
    cdef Py_ssize_t H = grad_x_out.shape[2], W = grad_x_out.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3], plane
    cdef const floating* gyp = &grad_out[0, 0, 0, 0]
    cdef floating* gxp = &grad_x_out[0, 0, 0, 0]
    cdef floating* sp = &scratch[0, 0]
    cdef floating* g
    if scratch.shape[0] < num_threads or scratch.shape[1] < OW:
        raise ValueError("avg_pool2d_backward: scratch needs (threads, OW)")
    with nogil, parallel(num_threads=num_threads):
        g = sp + threadid() * scratch.shape[1]
        for plane in prange(N * C, schedule='guided'):
            avg_pool_plane_backward(gyp + plane * OH * OW, gxp + plane * H * W, H, W, OH, OW,
                                    kH, kW, sH, sW, pH, pW, count_include_pad,
                                    divisor_override, g)


# --------------------------------------------------------------------------------------------
# nearest upsampling
# --------------------------------------------------------------------------------------------

cdef void upsample_row(const floating* src, Py_ssize_t W, Py_ssize_t sH, Py_ssize_t sW,
                       floating* dst) noexcept nogil:
    """One input row -> sH identical output rows of W * sW values (x2 and x1 vectorise)."""
    cdef Py_ssize_t iw, j, r, r0 = 1, OW = W * sW
    cdef floating v
    if sW == 2:                        # x2: the first two output rows in one pass (_simd.h)
        r0 = 2 if sH >= 2 else 1
        if floating is float:
            fc_ups2_row_f(src, W, dst, dst + OW if sH >= 2 else NULL)
        else:
            fc_ups2_row_d(src, W, dst, dst + OW if sH >= 2 else NULL)
    elif sW == 1:
        memcpy(dst, src, W * sizeof(floating))
    else:
        for iw in range(W):
            v = src[iw]
            for j in range(sW):
                dst[iw * sW + j] = v
    for r in range(r0, sH):
        memcpy(dst + r * OW, dst, OW * sizeof(floating))


cdef void upsample_row_backward(const floating* src, Py_ssize_t W, Py_ssize_t sH,
                                Py_ssize_t sW, floating* dst) noexcept nogil:
    """dst[iw] = sum of the sH x sW output values copied from input value iw (row by row,
    so that each pass streams a contiguous output row; x2 vectorises)."""
    cdef Py_ssize_t iw, j, r, OW = W * sW
    cdef const floating* s
    cdef floating acc
    for r in range(sH):
        s = src + r * OW
        if sW == 1:
            if r == 0:
                memcpy(dst, s, W * sizeof(floating))
            else:
                for iw in range(W):
                    dst[iw] = dst[iw] + s[iw]
        elif sW == 2:
            if r == 0:
                for iw in range(W):
                    dst[iw] = s[2 * iw] + s[2 * iw + 1]
            else:
                for iw in range(W):
                    dst[iw] = dst[iw] + (s[2 * iw] + s[2 * iw + 1])
        else:
            for iw in range(W):
                acc = s[iw * sW]
                for j in range(1, sW):
                    acc = acc + s[iw * sW + j]
                dst[iw] = acc if r == 0 else dst[iw] + acc


def upsample_nearest2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                               Py_ssize_t sH, Py_ssize_t sW, int num_threads):
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* op = &out[0, 0, 0, 0]
    cdef Py_ssize_t row
    with nogil:
        for row in prange(N * C * H, schedule='guided', num_threads=num_threads):
            upsample_row(xp + row * W, W, sH, sW, op + row * sH * W * sW)


def upsample_nearest2d_backward(const floating[:, :, :, ::1] grad_out,
                                floating[:, :, :, ::1] grad_x_out,
                                Py_ssize_t sH, Py_ssize_t sW, int num_threads):
    cdef Py_ssize_t N = grad_x_out.shape[0], C = grad_x_out.shape[1]
    cdef Py_ssize_t H = grad_x_out.shape[2], W = grad_x_out.shape[3]
    cdef const floating* gyp = &grad_out[0, 0, 0, 0]
    cdef floating* gxp = &grad_x_out[0, 0, 0, 0]
    cdef Py_ssize_t row
    with nogil:
        for row in prange(N * C * H, schedule='guided', num_threads=num_threads):
            upsample_row_backward(gyp + row * sH * W * sW, W, sH, sW, gxp + row * W)


# --------------------------------------------------------------------------------------------
# cross-entropy from logits
# --------------------------------------------------------------------------------------------

cdef enum:
    LANES = 8        # independent partial sums: lets the compiler vectorise the reductions


cdef inline double row_max(const floating* z, Py_ssize_t C) noexcept nogil:
    """max(z), NaN if any element is NaN."""
    cdef floating part[LANES]
    cdef floating v, m
    cdef Py_ssize_t c, j, C8 = C - C % LANES
    if floating is float:
        if fc_max_f(z, C, &m):
            return m
    else:
        if fc_max_d(z, C, &m):
            return m
    for j in range(LANES):
        part[j] = -INFINITY
    c = 0
    while c < C8:
        for j in range(LANES):
            v = z[c + j]
            part[j] = v if ((v > part[j]) | (v != v)) else part[j]
        c = c + LANES
    m = -INFINITY
    for j in range(LANES):
        v = part[j]
        if v > m or v != v:
            m = v
        if m != m:
            return m
    for c in range(C8, C):
        v = z[c]
        if v > m or v != v:
            m = v
        if m != m:
            return m
    return m


cdef inline void row_logsumexp(const floating* z, Py_ssize_t C, floating* m_out,
                               floating* log_sum_out) noexcept nogil:
    """log(sum(exp(z))) = m + log_sum with m = max(z): kept apart so that callers form
    (z - m) - log_sum, accurate even for huge logits.  NaN/inf propagate as in PyTorch."""
    cdef floating m = <floating>row_max(z, C)
    m_out[0] = m
    log_sum_out[0] = 0
    if m == INFINITY:        # as PyTorch: z - max is NaN at the +inf logit, so the row is NaN
        log_sum_out[0] = <floating>NAN
        return
    if m != m or m == -INFINITY:
        return
    if floating is float:
        log_sum_out[0] = <floating>log(fc_sumexp_f(z, C, m))
    else:
        log_sum_out[0] = log(fc_sumexp_d(z, C, m))


cdef inline double row_dot(const floating* a, const floating* b, Py_ssize_t C) noexcept nogil:
    """sum(a * b), or sum(a) when b is NULL; LANES partial sums (vectorisable)."""
    cdef floating part[LANES]
    cdef Py_ssize_t c, j, C8 = C - C % LANES
    cdef double total = 0
    for j in range(LANES):
        part[j] = 0
    c = 0
    if b == NULL:
        while c < C8:
            for j in range(LANES):
                part[j] = part[j] + a[c + j]
            c = c + LANES
    else:
        while c < C8:
            for j in range(LANES):
                part[j] = part[j] + a[c + j] * b[c + j]
            c = c + LANES
    for j in range(LANES):
        total += part[j]
    for c in range(C8, C):
        total += a[c] if b == NULL else a[c] * b[c]
    return total


cdef void ce_label_row(const floating* z, long long y, const floating* w, Py_ssize_t C,
                       double wsum, double smoothing, floating* loss, floating* denom) noexcept nogil:
    cdef floating m, ls
    cdef double wy = w[y], nll, smooth = 0
    row_logsumexp(z, C, &m, &ls)
    nll = -wy * ((z[y] - m) - ls)
    if smoothing != 0:       # -sum_c w_c ((z_c - m) - ls)
        smooth = -(row_dot(z, w, C) - (<double>m + ls) * wsum)
    loss[0] = <floating>((1 - smoothing) * nll + smoothing / C * smooth)
    denom[0] = <floating>wy


cdef void ce_label_row_backward(const floating* z, long long y, const floating* w,
                                Py_ssize_t C, double wsum, double smoothing, double scale,
                                floating* g) noexcept nogil:
    cdef floating m, ls
    cdef floating a = <floating>(scale * ((1 - smoothing) * w[y] + smoothing / C * wsum))
    cdef floating b = <floating>(scale * smoothing / C)
    # g = scale * ((1-eps) w_y (p - onehot) + eps/C (p sum(w) - w)), p = exp((z - m) - ls)
    m = <floating>row_max(z, C)
    if m == m and m != INFINITY and m != -INFINITY:     # one exp per element
        if floating is float:
            fc_softmax_grad2_f(z, C, m, a, b, w, g)
        else:
            fc_softmax_grad2_d(z, C, m, a, b, w, g)
    else:                                                 # NaN/inf propagate as in PyTorch
        row_logsumexp(z, C, &m, &ls)
        if floating is float:
            fc_softmax_grad_f(z, C, m, ls, a, b, w, g)
        else:
            fc_softmax_grad_d(z, C, m, ls, a, b, w, g)
    g[y] = <floating>(g[y] - scale * (1 - smoothing) * w[y])


cdef struct CeJob:
    # the cross-entropy rows (labels or probabilities, forward or backward) in blocks of rb
    # rows, on the caller-runs pool (_pool.h) at more than one thread.
    # A worker that wakes late (55-75 us on the VMs measured, against a ~0.3 ms call) takes
    # fewer blocks instead of holding up an OpenMP team's end.
    const void* z
    const long long* t          # labels, or NULL with probabilities tp
    const void* tp
    const void* w
    void* loss
    void* denom
    const double* scale
    void* g
    double wsum, smoothing
    long long ign
    Py_ssize_t N, C, rb
    bint bwd, dbl


cdef bint CE_POOL = True


def set_ce_pool(bint on):
    """Whether the cross-entropy rows run on the caller-runs pool (else an OpenMP loop);
    returns the previous setting.  The same numbers either way.  For A/B timing."""
    global CE_POOL
    old = CE_POOL
    CE_POOL = on
    return old


cdef inline void ce_run(CeJob* j, Py_ssize_t i, floating* tag) noexcept nogil:
    cdef Py_ssize_t n, n0 = i * j.rb, n1 = min((i + 1) * j.rb, j.N), C = j.C
    cdef const floating* zp = <const floating*> j.z
    cdef const floating* wp = <const floating*> j.w
    cdef floating* lp = <floating*> j.loss
    cdef floating* dp = <floating*> j.denom
    cdef floating* gp = <floating*> j.g
    cdef const floating* tp = <const floating*> j.tp
    for n in range(n0, n1):
        if tp != NULL:
            if j.bwd:
                ce_prob_row_backward(zp + n * C, tp + n * C, wp, C, j.smoothing, j.scale[n],
                                     gp + n * C)
            else:
                lp[n] = ce_prob_row(zp + n * C, tp + n * C, wp, C, j.smoothing)
        elif j.bwd:
            if j.t[n] == j.ign:
                memset(gp + n * C, 0, C * sizeof(floating))
            else:
                ce_label_row_backward(zp + n * C, j.t[n], wp, C, j.wsum, j.smoothing,
                                      j.scale[n], gp + n * C)
        elif j.t[n] == j.ign:
            lp[n] = 0
            dp[n] = 0
        else:
            ce_label_row(zp + n * C, j.t[n], wp, C, j.wsum, j.smoothing, lp + n, dp + n)


cdef void ce_item(void* ctx, Py_ssize_t i, int tid) noexcept nogil:
    cdef CeJob* j = <CeJob*> ctx
    if j.dbl:
        ce_run(j, i, <double*> NULL)
    else:
        ce_run(j, i, <float*> NULL)


cdef void ce_rows(CeJob* j, const void* z, const long long* t, const void* tp, const void* w,
                  double wsum, double smoothing, long long ign, Py_ssize_t N, Py_ssize_t C,
                  int num_threads) noexcept nogil:
    """Every row, in blocks of about 64 KiB of logits (at least 8 per thread): on the
    caller-runs pool when CE_POOL is on, else an OpenMP loop over the same blocks."""
    cdef Py_ssize_t i, nb
    j.z, j.t, j.tp, j.w, j.wsum, j.smoothing, j.ign = z, t, tp, w, wsum, smoothing, ign
    j.N, j.C = N, C
    j.rb = max(1, min(65536 // max(1, C * (8 if j.dbl else 4)), N // (8 * num_threads)))
    nb = (N + j.rb - 1) // j.rb
    if CE_POOL and num_threads > 1:
        fc_pool_run(num_threads, ce_item, j, nb)
        return
    for i in prange(nb, schedule='guided', num_threads=num_threads):
        ce_item(j, i, 0)


def cross_entropy_labels(const floating[:, ::1] logits, const long long[::1] target,
                         const floating[::1] weight, double smoothing,
                         long long ignore_index, floating[::1] loss_out,
                         floating[::1] denom_out, int num_threads):
    """Per-sample loss and mean-denominator (weight of the label, 0 when ignored).

    ``weight`` always has C entries (ones when the user gave none)."""
    cdef CeJob j
    j.loss, j.denom, j.bwd, j.dbl = &loss_out[0], &denom_out[0], False, floating is double
    with nogil:
        ce_rows(&j, &logits[0, 0], &target[0], NULL, &weight[0],
                row_dot(&weight[0], NULL, logits.shape[1]), smoothing, ignore_index,
                logits.shape[0], logits.shape[1], num_threads)


def cross_entropy_labels_backward(const floating[:, ::1] logits, const long long[::1] target,
                                  const floating[::1] weight, double smoothing,
                                  long long ignore_index, const double[::1] scale,
                                  floating[:, ::1] grad_out, int num_threads):
    """grad[n, c] = scale[n] * ((1-eps) w_y (p_c - [c=y]) + eps/C (p_c sum(w) - w_c))."""
    cdef CeJob j
    j.g, j.scale, j.bwd, j.dbl = &grad_out[0, 0], &scale[0], True, floating is double
    with nogil:
        ce_rows(&j, &logits[0, 0], &target[0], NULL, &weight[0],
                row_dot(&weight[0], NULL, logits.shape[1]), smoothing, ignore_index,
                logits.shape[0], logits.shape[1], num_threads)


cdef floating ce_prob_row(const floating* z, const floating* t, const floating* w,
                          Py_ssize_t C, double smoothing) noexcept nogil:
    """-sum_c w_c t'_c log p_c, t' = t (1 - eps) + eps / C, log p = (z - m) - ls."""
    cdef floating m, ls
    cdef floating keep = <floating>(1 - smoothing), add = <floating>(smoothing / C)
    cdef floating part[LANES]
    cdef Py_ssize_t c, j, C8 = C - C % LANES
    cdef double total = 0
    row_logsumexp(z, C, &m, &ls)
    for j in range(LANES):
        part[j] = 0
    c = 0
    while c < C8:
        for j in range(LANES):
            part[j] = part[j] + w[c + j] * (t[c + j] * keep + add) * ((z[c + j] - m) - ls)
        c = c + LANES
    for j in range(LANES):
        total += part[j]
    for c in range(C8, C):
        total += w[c] * (t[c] * keep + add) * ((z[c] - m) - ls)
    return <floating>(-total)


cdef void ce_prob_row_backward(const floating* z, const floating* t, const floating* w,
                               Py_ssize_t C, double smoothing, double scale,
                               floating* g) noexcept nogil:
    """g = scale * (p_c * sum_k w_k t'_k - w_c t'_c)."""
    cdef floating m, ls
    cdef floating keep = <floating>(1 - smoothing), add = <floating>(smoothing / C)
    cdef floating tw = <floating>((1 - smoothing) * row_dot(w, t, C)
                                  + smoothing / C * row_dot(w, NULL, C))
    cdef floating sc = <floating>scale
    cdef Py_ssize_t c
    row_logsumexp(z, C, &m, &ls)
    for c in range(C):
        g[c] = sc * (exp_nonpos((z[c] - m) - ls) * tw - w[c] * (t[c] * keep + add))


def cross_entropy_probs(const floating[:, ::1] logits, const floating[:, ::1] target,
                        const floating[::1] weight, double smoothing,
                        floating[::1] loss_out, int num_threads):
    """loss[n] = -sum_c w_c t'_c log p_c, with t' = t (1 - eps) + eps / C."""
    cdef CeJob j
    j.loss, j.bwd, j.dbl = &loss_out[0], False, floating is double
    with nogil:
        ce_rows(&j, &logits[0, 0], NULL, &target[0, 0], &weight[0], 0, smoothing, 0,
                logits.shape[0], logits.shape[1], num_threads)


def cross_entropy_probs_backward(const floating[:, ::1] logits, const floating[:, ::1] target,
                                 const floating[::1] weight, double smoothing,
                                 const double[::1] scale, floating[:, ::1] grad_out,
                                 int num_threads):
    cdef CeJob j
    j.g, j.scale, j.bwd, j.dbl = &grad_out[0, 0], &scale[0], True, floating is double
    with nogil:
        ce_rows(&j, &logits[0, 0], NULL, &target[0, 0], &weight[0], 0, smoothing, 0,
                logits.shape[0], logits.shape[1], num_threads)


# --------------------------------------------------------------------------------------------
# planned steps of nn.Sequential under no_grad(): the layer's kernel called on the arrays'
# pointers (no memoryviews, no Python between the checks and the kernel)
# --------------------------------------------------------------------------------------------
# A batch-1 LeNet-style forward spent ~20 us of ~310 in its steps' Python (argument checks,
# conversions, 5-7 memoryviews a kernel call at ~0.25 us each), ONNX Runtime ~10 us in all.

cdef void* cbuf(object a, bint writable) except? NULL:
    """The data of a C-contiguous buffer (numpy raises ValueError for any other, BufferError
    for a read-only one with writable).  The caller holds a reference to a while the pointer is in use."""
    cdef Py_buffer v
    PyObject_GetBuffer(a, &v, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
    cdef void* p = v.buf
    PyBuffer_Release(&v)
    return p


@cython.auto_pickle(False)
cdef class _Step:
    # layer: the nn layer (its weight / bias Parameters are read at every call); slow: the
    # step the usual way, for any call these checks do not take; fresh: the output is a new
    # array (Sequential's ReLU step may then work in place)
    cdef object layer, slow, empty, ndarray, dtype, xshape, wshape, bshape, yshape
    cdef bint dbl
    cdef public bint fresh

    cdef object params(self, object z, void** xp, void** wp, void** bp):
        """The layer's (weight, bias) arrays (bias None: none), with the pointers of z and of
        them, when they are ndarrays of the plan's shapes and dtype, C-contiguous; else None.
        The caller holds the tuple while the kernel uses the pointers: the Python calls
        between (allocations, workspaces) may let another thread replace the layer's arrays,
        which must outlive that use."""
        cdef object dt = self.dtype
        cdef object w = self.layer.weight.data
        cdef object b = self.layer.bias.data if self.bshape is not None else None
        if (type(z) is not self.ndarray or type(w) is not self.ndarray
                or not (z.dtype is dt or z.dtype == dt) or not (w.dtype is dt or w.dtype == dt)
                or z.shape != self.xshape or w.shape != self.wshape):
            return None
        if b is not None and (type(b) is not self.ndarray or b.shape != self.bshape
                              or not (b.dtype is dt or b.dtype == dt)):
            return None
        try:
            xp[0] = cbuf(z, False)
            wp[0] = cbuf(w, False)
            bp[0] = cbuf(b, False) if b is not None else NULL
        except (BufferError, ValueError):   # (numpy: ValueError "ndarray is not
            return None                     # C-contiguous"; the usual way copies)
        return (w, b)


@cython.auto_pickle(False)
cdef class ConvStep(_Step):
    """Conv2d [-> ReLU] [-> MaxPool2d] of a plan (nn._conv_step), by conv_gemm_run or
    conv_direct_run as the conv2d plan (functional._ConvPlan) chose: its geometry, thread
    count, scratch size and packed-weight size."""
    cdef ConvCall a
    cdef object scratch
    cdef readonly bint direct       # conv_direct_run (else conv_gemm_run)

    def __init__(self, layer, slow, plan, xshape, wshape, bshape, bint relu, scratch, empty,
                 ndarray):
        cdef ConvCall* a = &self.a
        self.layer, self.slow, self.scratch, self.empty, self.ndarray = (layer, slow, scratch,
                                                                        empty, ndarray)
        self.dtype, self.dbl, self.direct = plan.dt, plan.dt.char == "d", plan.nwpack == 0
        self.xshape, self.wshape, self.bshape = xshape, wshape, bshape
        a.N, a.C, a.H, a.W = xshape
        a.L, a.Cg, a.kH, a.kW = wshape
        a.OH, a.OW, a.groups = plan.OH, plan.OW, plan.g
        a.sH, a.sW, a.pH, a.pW, a.dH, a.dW = (plan.sH, plan.sW, plan.pT, plan.pL, plan.dH,
                                              plan.dW)
        a.relu, a.num_threads = relu, plan.team
        a.srows, a.ncol, a.nwpack = plan.team, plan.ncol, plan.nwpack
        a.pkH = a.pkW = a.POH = a.POW = 0
        if plan.pool is not None:
            a.pkH, a.pkW = plan.pool
            a.POH, a.POW = a.OH // a.pkH, a.OW // a.pkW
            self.yshape = (a.N, a.L, a.POH, a.POW)
        else:
            self.yshape = (a.N, a.L, a.OH, a.OW)
        self.fresh = True

    def __call__(self, z):
        cdef ConvCall a = self.a          # (a copy: calls from other threads have theirs)
        cdef void* xp = NULL
        cdef void* wp = NULL
        cdef void* bp = NULL
        held = self.params(z, &xp, &wp, &bp)     # (kept until the kernel is done)
        if held is None:
            return self.slow(z)
        y = self.empty(self.yshape, self.dtype)
        sc = self.scratch(a.srows, a.ncol, self.dtype, "conv2d")
        a.x, a.w, a.b, a.scratch = xp, wp, bp, cbuf(sc, True)
        if a.pkH:
            a.pool, a.out = cbuf(y, True), NULL
        else:
            a.pool, a.out = NULL, cbuf(y, True)
        if self.direct:
            if self.dbl:
                conv_direct_run(&a, <double*> NULL)
            else:
                conv_direct_run(&a, <float*> NULL)
        else:
            pk = self.scratch(1, a.nwpack, self.dtype, "conv2d", "wpack")
            a.wpack = cbuf(pk, True)
            if self.dbl:
                conv_gemm_run(&a, <double*> NULL)
            else:
                conv_gemm_run(&a, <float*> NULL)
        return y


@cython.auto_pickle(False)
cdef class WinoStep(_Step):
    """Conv2d [-> ReLU] [-> MaxPool2d(2)] by Winograd F(2x2, r x r) (nn._conv_step, where
    conv2d takes it): conv2d_winograd_forward's job on the arrays' pointers, the same
    threads and numbers, without its Python.  weights(w): functional's (u, pack, ready,
    entry) for w (its cache of transformed weights); finish(entry, w): keeps a transform
    made by this call.  5x5: the ReLU and the pool in the output transform; 3x3: the ReLU
    in one pass after (relu_blocks on relu_team threads), no pool."""
    cdef WinoJob j
    cdef object scratch, weights, finish
    cdef Py_ssize_t N, ncol
    cdef int team, relu_team
    cdef bint relu_after

    def __init__(self, layer, slow, dtype, xshape, wshape, bshape, Py_ssize_t groups,
                 Py_ssize_t pH, Py_ssize_t pW, Py_ssize_t OH, Py_ssize_t OW, bint relu,
                 bint pool, int team, int relu_team, Py_ssize_t ncol, scratch, weights,
                 finish, empty, ndarray):
        cdef Py_ssize_t N, C, H, W, L, Cg, r
        self.layer, self.slow, self.scratch, self.empty, self.ndarray = (layer, slow, scratch,
                                                                        empty, ndarray)
        self.weights, self.finish = weights, finish
        self.dtype, self.dbl = dtype, dtype.char == "d"
        self.xshape, self.wshape, self.bshape = xshape, wshape, bshape
        N, C, H, W = xshape
        L, Cg, r = wshape[0], wshape[1], wshape[2]
        if (r != 3 and r != 5) or wshape[3] != r or (pool and r != 5) or groups < 1 \
                or L % groups or C != Cg * groups or OH < 1 or OW < 1:
            raise ValueError("WinoStep: 3x3 or 5x5 kernels, a pool only with 5x5")
        self.N, self.ncol, self.team, self.relu_team = N, ncol, team, relu_team
        self.relu_after = relu and r == 3
        wino_setup(&self.j, N, C, H, W, L, Cg, r, groups, pH, pW, OH, OW, team, self.dbl,
                   True, relu and r == 5, not pool, pool)
        self.j.ncol = ncol
        self.yshape = (N, L, OH // 2, OW // 2) if pool else (N, L, OH, OW)
        self.fresh = True

    def __call__(self, z):
        cdef WinoJob j = self.j           # (a copy: calls from other threads have theirs)
        cdef void* xp = NULL
        cdef void* wp = NULL
        cdef void* bp = NULL
        cdef void* yp
        cdef int rc
        cdef bint ready
        cdef Py_ssize_t n
        held = self.params(z, &xp, &wp, &bp)     # (kept until the kernel is done)
        if held is None:
            return self.slow(z)
        w = held[0]
        u, pk, ready, entry = self.weights(w)
        y = self.empty(self.yshape, self.dtype)
        sc = self.scratch(self.team, self.ncol, self.dtype, "conv2d")
        yp = cbuf(y, True)
        j.x, j.w, j.b, j.work = xp, wp, bp, cbuf(sc, True)
        j.U, j.Up = cbuf(u, True), cbuf(pk, True)
        if j.keep:
            j.out, j.pool = yp, NULL
        else:
            j.out, j.pool = NULL, yp
        n = y.size
        with nogil:
            rc = wino_execute(&j, self.N, self.team, ready)
            if rc == 0 and self.relu_after and n:
                if self.dbl:
                    relu_blocks(<double*> yp, <double*> yp, n, self.relu_team)
                else:
                    relu_blocks(<float*> yp, <float*> yp, n, self.relu_team)
        if rc < 0:
            raise MemoryError("WinoStep: finiteness flags")
        if entry is not None:
            self.finish(entry, w)
        return y


@cython.auto_pickle(False)
cdef class LinearStep(_Step):
    """Linear [-> ReLU] of a plan (nn._linear_step): linear_run on (N, I) rows of z."""
    cdef Py_ssize_t nrows, nin, nout
    cdef int team, path
    cdef bint relu

    def __init__(self, layer, slow, dtype, xshape, wshape, bshape, yshape, bint relu,
                 int team, int path, empty, ndarray):
        self.layer, self.slow, self.empty, self.ndarray = layer, slow, empty, ndarray
        self.dtype, self.dbl = dtype, dtype.char == "d"
        self.xshape, self.wshape, self.bshape, self.yshape = xshape, wshape, bshape, yshape
        self.nout, self.nin = wshape
        self.nrows = 1
        for n in xshape[:-1]:
            self.nrows *= n
        self.relu, self.team, self.path = relu, team, path
        self.fresh = True

    def __call__(self, z):
        cdef void* xp = NULL
        cdef void* wp = NULL
        cdef void* bp = NULL
        held = self.params(z, &xp, &wp, &bp)     # (kept until the kernel is done)
        if held is None:
            return self.slow(z)
        y = self.empty(self.yshape, self.dtype)
        if self.nrows == 0 or self.nout == 0:
            return y
        if self.dbl:
            linear_run(<const double*> xp, <const double*> wp, <const double*> bp,
                       <double*> cbuf(y, True), self.nrows, self.nin, self.nout, self.team, self.path,
                       self.relu)
        else:
            linear_run(<const float*> xp, <const float*> wp, <const float*> bp,
                       <float*> cbuf(y, True), self.nrows, self.nin, self.nout, self.team, self.path,
                       self.relu)
        return y
