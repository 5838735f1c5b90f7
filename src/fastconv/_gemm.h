/* fastconv's own GEMM for the convolutions: C (M x N) = A (M x K) @ B (K x N), row-major.
 *
 * Why not only BLAS: a convolution's GEMMs are skinny (M = output channels, 32..256; N = output
 * pixels of one image, 100..1000; K = taps) and OpenBLAS reaches 60-75 % of its square-matrix
 * rate on them, repacks the weights for every image and packs the im2col matrix a second time.
 * Here the weights (A) are packed once per call into panels of MR rows, B is read in place (the
 * im2col matrix or the image itself) and C is written in place with the bias folded into the
 * first K block: measured 1.2-1.5x OpenBLAS's sgemm on those shapes (benchmarks/README.md).
 *
 * Micro-kernels: an MR x NR block of C held in registers, one k at a time: NR/lanes vector loads
 * of B's row k, MR broadcasts of A's column k, MR * NR/lanes FMAs.
 *   AVX-512F: float MR 8 x NR 32, double 8 x 16 (16 accumulators of 32)
 *   AVX2+FMA: float MR 6 x NR 16, double 6 x 8  (12 accumulators of 16)
 * A last panel of at most NR/2 columns goes through a half-width kernel (NV = 1: on a 196-pixel
 * image the 4-column tail cost a whole 32-wide kernel, 1/7 of the work, before), and at the
 * AVX-512 level one of at most NR/4 columns through a quarter-width one (256-bit vectors).
 * Columns past N in the last panel are masked (B is never read, nor C written, beyond N); rows
 * past M come from zero rows of the packed A and are not stored.  K is split in blocks of
 * FC_GEMM_KC so that the NR-wide strip of B a micro-kernel streams stays in L1 across the
 * M / MR micro-kernels that reuse it: 128 rows (16 KiB of B, 4 KiB of an A panel) measured
 * 4-9 % faster than 256 (32 + 8 KiB, too close to a 48 KiB L1) on the strided, 1x1 and LeNet
 * convs (Xeon with AVX-512, 2026-12-02); 64, 96 and 160 were no better.
 *
 * Compiled with per-function target attributes (the extension itself targets the portable
 * baseline) and chosen at import from the CPU's feature bits; fc_gemm_level() == 0 (no AVX2,
 * another compiler or architecture) means the kernels call BLAS instead.  The sum over k runs
 * in order 0..K-1 for every element (one FMA per k), so results do not depend on the blocking.
 */
#ifndef FASTCONV_GEMM_H
#define FASTCONV_GEMM_H

#include <stddef.h>
#include <string.h>
#include "_simd.h"      /* fc_tr8x8_ps */

#define FC_GEMM_KC 128
#define FC_GEMM_KC_MAX 384          /* largest fc_gemm_kc (the strip buffer's rows) */
#define FC_GEMM_RELU 2  /* in fc_gemm_*'s acc: max(C, 0) at the end (nn.ReLU fused) */
#define FC_GEMM_PACKB 4 /* in fc_gemm_*'s acc: B is read from memory, not just written (see
                           fc_gemm_packb_min) */
#define FC_GEMM_BT 8    /* in fc_gemm_* / fc_gemma_*'s acc: B given transposed, element (k, n)
                           at B[n * ldb + k]; each K block's strip is transposed into the
                           strip buffer (no B-table drivers) */

static ptrdiff_t fc_gemm_kc = FC_GEMM_KC;  /* K block (_kernels.set_gemm_kc: tests, A/B) */
static int fc_gemm_ok = 0;      /* best level the CPU has: 0 none, 1 AVX2+FMA, 2 AVX-512F */
static int fc_gemm_on = 0;      /* level in use (fc_gemm_set lowers it for the tests) */
static int fc_gemm_split_on = 1; /* 0: M = 6 n + 2 without fc_ukrj_* (tests, A/B) */
static int fc_gemm_short_on = 1; /* 0: a last panel of <= FC_SHORT_ROWS(MR) rows by the
                                    full kernel */
static int fc_gemm_tail_on = 1; /* 0: a last panel of <= 4 float columns by the quarter kernel */
static int fc_im2col_pad_on = 1; /* 0: im2col always by the masked path (tests) */
/* B's rows at least this many bytes apart: the plain drivers copy each K block's NR-wide strip
   of B into a contiguous buffer before the micro-kernels that reuse it (0: never) */
static ptrdiff_t fc_gemm_packb_min = 2048;
/* C's rows of the next column panel prefetched (for writing) before each micro-kernel call
   when C is written, not read (first K block), and the K block has at least this many rows
   (0: never).  Once only from 64 rows (a 1x1's rows far apart: up to 1.8x on a Xeon); from
   any K (Zen 4, 2026-12-05, batch 64, against 64, 1 / 2 threads): LeNet's conv1 (25 taps,
   12.8 MB float64 output) 1.60x / 1.14x, float32 1.41x / 1.08x; 3 -> 32 3x3 1.20-1.28x /
   1.14x; 16 -> 32 1x1 float32 1.36x / 1.24x; 1 -> 16 3x3 float64 1.39x; batch 1 level */
static ptrdiff_t fc_gemm_cpf_kc = 1;
/* B read in place with rows at least this many bytes apart (0: never): the next column
   panel's strip of B prefetched, a row block's share of its rows before each micro-kernel call
   (rows far apart are separate streams, more than the hardware prefetcher follows).  Zen 4,
   2026-12-05, 1 / 2 threads: LeNet conv1's input gradient (B: grad_out's 32 planes of 784
   doubles) 1.21x / 1.07x; 64 -> 32 1x1 float64 1.11x / 1.14x; others level (+-2 %) */
static ptrdiff_t fc_gemm_bpf_min = 1024;
/* 1: also rows a multiple of 512 bytes apart (>= 512), which all fall in the same few L1 sets
   (as col_ld's rule for im2col matrices): a transposed convolution's input rows of 256
   floats, re-read from L2 by every micro-kernel, ran its GEMM at ~136 GFLOP/s */
static int fc_gemm_packb_sets = 1;

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FC_HAVE_GEMM 1
#include <immintrin.h>

/* One micro-kernel: C[0:MR, 0:NR] (+)= A_panel (kc x MR) @ B[0:kc, 0:NR] (row stride ldb).
 * init != NULL: C starts at init[r] (bias or zeros) instead of being loaded.  MASKED: only
 * the first n columns exist (n < NR).  mrows: rows of C that exist (<= MR). */
#define FC_UKR(NAME, T, VT, NV, LANES, MR, ...)                                                 \
    FC_UKRX(NAME, T, VT, NV, LANES, MR, MR, __VA_ARGS__)
/* MR rows of C from panels of PS >= MR rows of packed A (a short kernel: the first MR of them) */
#define FC_UKRX(NAME, T, VT, NV, LANES, MR, PS, TGT, SET1, LOADU, STOREU, FMA, MTYPE, MLOAD,     \
                MSTORE, RELU, INPLACE, TABLE)                                                   \
TGT static void NAME(ptrdiff_t kc, const T* restrict A, ptrdiff_t lda, const T* restrict B,    \
                     ptrdiff_t ldb, T* restrict C, ptrdiff_t ldc, const T* init, int mrows,     \
                     int masked, const MTYPE* mk, int relu, const ptrdiff_t* restrict bo) {     \
    /* TABLE 1: B's row k at B + bo[k] (rows of the im2col matrix that are shifts of one */     \
    /* another, made once: see fc_im2col_rows), else at B + k * ldb; TABLE 2: A's row r at */   \
    /* A + bo[r] (INPLACE), or packed rows at A + bo[r] + k * PS (rows of two panels) */        \
    const T* const B0 = B;                                                                      \
    VT c[MR][NV];                                                                               \
    /* A's element (r, k): A[r + k * MR] packed, else A[r * lda + k] (rows past mrows: the */   \
    /* last one again, computed and not stored) */                                              \
    ptrdiff_t ar[MR];                                                                           \
    _Pragma("GCC unroll 8")                                                                     \
    for (int r = 0; r < MR; r++)                                                                \
        ar[r] = TABLE == 2 ? bo[r < mrows ? r : mrows - 1]                                      \
                           : !INPLACE ? r : (r < mrows ? r : mrows - 1) * lda;                  \
    const ptrdiff_t as = INPLACE ? 1 : PS;                                                      \
    _Pragma("GCC unroll 8")                                                                     \
    for (int r = 0; r < MR; r++) {                                                              \
        _Pragma("GCC unroll 4")                                                                 \
        for (int v = 0; v < NV; v++) {                                                          \
            if (init != NULL)                                                                   \
                c[r][v] = SET1(init[r]);                                                        \
            else if (r >= mrows)                                                                \
                c[r][v] = SET1((T)0);                                                           \
            else if (masked)                                                                    \
                c[r][v] = MLOAD(C + r * ldc + v * LANES, mk[v]);                                \
            else                                                                                \
                c[r][v] = LOADU(C + r * ldc + v * LANES);                                       \
        }                                                                                       \
    }                                                                                           \
    if (masked) {                                                                               \
        for (ptrdiff_t k = 0; k < kc; k++) {                                                    \
            VT b[NV];                                                                           \
            const T* bk = TABLE == 1 ? B0 + bo[k] : B;                                               \
            _Pragma("GCC unroll 4")                                                             \
            for (int v = 0; v < NV; v++) b[v] = MLOAD(bk + v * LANES, mk[v]);                   \
            _Pragma("GCC unroll 8")                                                             \
            for (int r = 0; r < MR; r++) {                                                      \
                VT a = SET1(A[ar[r]]);                                                              \
                _Pragma("GCC unroll 4")                                                         \
                for (int v = 0; v < NV; v++) c[r][v] = FMA(a, b[v], c[r][v]);                   \
            }                                                                                   \
            A += as;                                                                            \
            B += ldb;                                                                           \
        }                                                                                       \
    } else {                                                                                    \
        for (ptrdiff_t k = 0; k < kc; k++) {                                                    \
            VT b[NV];                                                                           \
            const T* bk = TABLE == 1 ? B0 + bo[k] : B;                                               \
            _Pragma("GCC unroll 4")                                                             \
            for (int v = 0; v < NV; v++) b[v] = LOADU(bk + v * LANES);                          \
            _Pragma("GCC unroll 8")                                                             \
            for (int r = 0; r < MR; r++) {                                                      \
                VT a = SET1(A[ar[r]]);                                                              \
                _Pragma("GCC unroll 4")                                                         \
                for (int v = 0; v < NV; v++) c[r][v] = FMA(a, b[v], c[r][v]);                   \
            }                                                                                   \
            A += as;                                                                            \
            B += ldb;                                                                           \
        }                                                                                       \
    }                                                                                           \
    if (relu) {                        /* max(c, 0), NaN kept, -0 -> +0: nn.ReLU's numbers */ \
        _Pragma("GCC unroll 8")                                                                 \
        for (int r = 0; r < MR; r++) {                                                          \
            _Pragma("GCC unroll 4")                                                             \
            for (int v = 0; v < NV; v++) c[r][v] = RELU(c[r][v]);                               \
        }                                                                                       \
    }                                                                                           \
    _Pragma("GCC unroll 8")                                                                     \
    for (int r = 0; r < MR; r++) {                                                              \
        if (r < mrows) {                                                                        \
            _Pragma("GCC unroll 4")                                                             \
            for (int v = 0; v < NV; v++) {                                                      \
                if (masked)                                                                     \
                    MSTORE(C + r * ldc + v * LANES, mk[v], c[r][v]);                            \
                else                                                                            \
                    STOREU(C + r * ldc + v * LANES, c[r][v]);                                   \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}

/* max(c, 0) keeping NaN (c > 0 or unordered: _CMP_NLE_UQ) and turning -0 into +0 */
#define FC_RELU_PS512(c) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask((c), _mm512_setzero_ps(),     \
                                                                _CMP_NLE_UQ), (c))
#define FC_RELU_PD512(c) _mm512_maskz_mov_pd(_mm512_cmp_pd_mask((c), _mm512_setzero_pd(),     \
                                                                _CMP_NLE_UQ), (c))
#define FC_RELU_PS256(c) _mm256_and_ps((c), _mm256_cmp_ps((c), _mm256_setzero_ps(), _CMP_NLE_UQ))
#define FC_RELU_PD256(c) _mm256_and_pd((c), _mm256_cmp_pd((c), _mm256_setzero_pd(), _CMP_NLE_UQ))

/* ---- AVX-512F: masks are k-registers ---- */
#define FC_T512 __attribute__((target("avx512f")))
#define FC_MLOAD_PS512(p, m) _mm512_maskz_loadu_ps((m), (p))
#define FC_MSTORE_PS512(p, m, v) _mm512_mask_storeu_ps((p), (m), (v))
#define FC_MLOAD_PD512(p, m) _mm512_maskz_loadu_pd((m), (p))
#define FC_MSTORE_PD512(p, m, v) _mm512_mask_storeu_pd((p), (m), (v))
FC_UKR(fc_ukr_f_512, float, __m512, 2, 16, 8, FC_T512, _mm512_set1_ps, _mm512_loadu_ps,
       _mm512_storeu_ps, _mm512_fmadd_ps, __mmask16, FC_MLOAD_PS512, FC_MSTORE_PS512,
       FC_RELU_PS512, 0, 0)
/* short kernels: the first half of a panel's rows (a last panel of at most MR/2 rows: the
 * input gradient of LeNet's conv1, 25 taps, spent 7 of its 32 rows' work on padding) */
FC_UKRX(fc_ukrs_f_512, float, __m512, 2, 16, 4, 8, FC_T512, _mm512_set1_ps, _mm512_loadu_ps,
        _mm512_storeu_ps, _mm512_fmadd_ps, __mmask16, FC_MLOAD_PS512, FC_MSTORE_PS512,
        FC_RELU_PS512, 0, 0)
FC_UKRX(fc_ukrs_d_512, double, __m512d, 2, 8, 4, 8, FC_T512, _mm512_set1_pd, _mm512_loadu_pd,
        _mm512_storeu_pd, _mm512_fmadd_pd, __mmask8, FC_MLOAD_PD512, FC_MSTORE_PD512,
        FC_RELU_PD512, 0, 0)
FC_UKR(fc_ukra_f_512, float, __m512, 2, 16, 8, FC_T512, _mm512_set1_ps, _mm512_loadu_ps,
       _mm512_storeu_ps, _mm512_fmadd_ps, __mmask16, FC_MLOAD_PS512, FC_MSTORE_PS512,
       FC_RELU_PS512, 1, 0)
FC_UKR(fc_ukr_d_512, double, __m512d, 2, 8, 8, FC_T512, _mm512_set1_pd, _mm512_loadu_pd,
       _mm512_storeu_pd, _mm512_fmadd_pd, __mmask8, FC_MLOAD_PD512, FC_MSTORE_PD512,
       FC_RELU_PD512, 0, 0)
FC_UKR(fc_ukra_d_512, double, __m512d, 2, 8, 8, FC_T512, _mm512_set1_pd, _mm512_loadu_pd,
       _mm512_storeu_pd, _mm512_fmadd_pd, __mmask8, FC_MLOAD_PD512, FC_MSTORE_PD512,
       FC_RELU_PD512, 1, 0)
FC_UKR(fc_ukrh_f_512, float, __m512, 1, 16, 8, FC_T512, _mm512_set1_ps, _mm512_loadu_ps,
       _mm512_storeu_ps, _mm512_fmadd_ps, __mmask16, FC_MLOAD_PS512, FC_MSTORE_PS512,
       FC_RELU_PS512, 0, 0)
FC_UKR(fc_ukrah_f_512, float, __m512, 1, 16, 8, FC_T512, _mm512_set1_ps, _mm512_loadu_ps,
       _mm512_storeu_ps, _mm512_fmadd_ps, __mmask16, FC_MLOAD_PS512, FC_MSTORE_PS512,
       FC_RELU_PS512, 1, 0)
FC_UKR(fc_ukrh_d_512, double, __m512d, 1, 8, 8, FC_T512, _mm512_set1_pd, _mm512_loadu_pd,
       _mm512_storeu_pd, _mm512_fmadd_pd, __mmask8, FC_MLOAD_PD512, FC_MSTORE_PD512,
       FC_RELU_PD512, 0, 0)
FC_UKR(fc_ukrah_d_512, double, __m512d, 1, 8, 8, FC_T512, _mm512_set1_pd, _mm512_loadu_pd,
       _mm512_storeu_pd, _mm512_fmadd_pd, __mmask8, FC_MLOAD_PD512, FC_MSTORE_PD512,
       FC_RELU_PD512, 1, 0)

/* AVX-512 quarter-width kernels (256-bit vectors, AVX-512VL masks) for a last panel of at most
 * NR/4 columns: LeNet's 14x14 images leave 4 columns after six 32-wide panels, and the 16-wide
 * half kernel spent 7 % of conv2 on them. */
#define FC_T512VL __attribute__((target("avx512f,avx512vl,fma")))
#define FC_MLOAD_PS512Q(p, m) _mm256_maskz_loadu_ps((m), (p))
#define FC_MSTORE_PS512Q(p, m, v) _mm256_mask_storeu_ps((p), (m), (v))
#define FC_MLOAD_PD512Q(p, m) _mm256_maskz_loadu_pd((m), (p))
#define FC_MSTORE_PD512Q(p, m, v) _mm256_mask_storeu_pd((p), (m), (v))
FC_UKR(fc_ukrq_f_512, float, __m256, 1, 8, 8, FC_T512VL, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __mmask8, FC_MLOAD_PS512Q, FC_MSTORE_PS512Q,
       FC_RELU_PS256, 0, 0)
FC_UKR(fc_ukraq_f_512, float, __m256, 1, 8, 8, FC_T512VL, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __mmask8, FC_MLOAD_PS512Q, FC_MSTORE_PS512Q,
       FC_RELU_PS256, 1, 0)
FC_UKR(fc_ukrq_d_512, double, __m256d, 1, 4, 8, FC_T512VL, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __mmask8, FC_MLOAD_PD512Q, FC_MSTORE_PD512Q,
       FC_RELU_PD256, 0, 0)
FC_UKR(fc_ukraq_d_512, double, __m256d, 1, 4, 8, FC_T512VL, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __mmask8, FC_MLOAD_PD512Q, FC_MSTORE_PD512Q,
       FC_RELU_PD256, 1, 0)

/* the same kernels reading B's rows through a table of offsets (AVX-512, A packed) */
FC_UKR(fc_ukrb_f_512, float, __m512, 2, 16, 8, FC_T512, _mm512_set1_ps, _mm512_loadu_ps,
       _mm512_storeu_ps, _mm512_fmadd_ps, __mmask16, FC_MLOAD_PS512, FC_MSTORE_PS512,
       FC_RELU_PS512, 0, 1)
FC_UKR(fc_ukrbh_f_512, float, __m512, 1, 16, 8, FC_T512, _mm512_set1_ps, _mm512_loadu_ps,
       _mm512_storeu_ps, _mm512_fmadd_ps, __mmask16, FC_MLOAD_PS512, FC_MSTORE_PS512,
       FC_RELU_PS512, 0, 1)
FC_UKR(fc_ukrbq_f_512, float, __m256, 1, 8, 8, FC_T512VL, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __mmask8, FC_MLOAD_PS512Q, FC_MSTORE_PS512Q,
       FC_RELU_PS256, 0, 1)
FC_UKR(fc_ukrb_d_512, double, __m512d, 2, 8, 8, FC_T512, _mm512_set1_pd, _mm512_loadu_pd,
       _mm512_storeu_pd, _mm512_fmadd_pd, __mmask8, FC_MLOAD_PD512, FC_MSTORE_PD512,
       FC_RELU_PD512, 0, 1)
FC_UKR(fc_ukrbh_d_512, double, __m512d, 1, 8, 8, FC_T512, _mm512_set1_pd, _mm512_loadu_pd,
       _mm512_storeu_pd, _mm512_fmadd_pd, __mmask8, FC_MLOAD_PD512, FC_MSTORE_PD512,
       FC_RELU_PD512, 0, 1)
FC_UKR(fc_ukrbq_d_512, double, __m256d, 1, 4, 8, FC_T512VL, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __mmask8, FC_MLOAD_PD512Q, FC_MSTORE_PD512Q,
       FC_RELU_PD256, 0, 1)

/* and with A read in place through a table of row offsets (the weight gradient's shared
 * im2col rows) */
FC_UKR(fc_ukrc_f_512, float, __m512, 2, 16, 8, FC_T512, _mm512_set1_ps, _mm512_loadu_ps,
       _mm512_storeu_ps, _mm512_fmadd_ps, __mmask16, FC_MLOAD_PS512, FC_MSTORE_PS512,
       FC_RELU_PS512, 1, 2)
FC_UKR(fc_ukrch_f_512, float, __m512, 1, 16, 8, FC_T512, _mm512_set1_ps, _mm512_loadu_ps,
       _mm512_storeu_ps, _mm512_fmadd_ps, __mmask16, FC_MLOAD_PS512, FC_MSTORE_PS512,
       FC_RELU_PS512, 1, 2)
FC_UKR(fc_ukrcq_f_512, float, __m256, 1, 8, 8, FC_T512VL, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __mmask8, FC_MLOAD_PS512Q, FC_MSTORE_PS512Q,
       FC_RELU_PS256, 1, 2)
FC_UKR(fc_ukrc_d_512, double, __m512d, 2, 8, 8, FC_T512, _mm512_set1_pd, _mm512_loadu_pd,
       _mm512_storeu_pd, _mm512_fmadd_pd, __mmask8, FC_MLOAD_PD512, FC_MSTORE_PD512,
       FC_RELU_PD512, 1, 2)
FC_UKR(fc_ukrch_d_512, double, __m512d, 1, 8, 8, FC_T512, _mm512_set1_pd, _mm512_loadu_pd,
       _mm512_storeu_pd, _mm512_fmadd_pd, __mmask8, FC_MLOAD_PD512, FC_MSTORE_PD512,
       FC_RELU_PD512, 1, 2)
FC_UKR(fc_ukrcq_d_512, double, __m256d, 1, 4, 8, FC_T512VL, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __mmask8, FC_MLOAD_PD512Q, FC_MSTORE_PD512Q,
       FC_RELU_PD256, 1, 2)

/* The last panel of C when it has at most 4 columns (a 14x14 image: 196 = 6 x 32 + 4), 32 rows
 * (4 panels of packed A) at a time over all of K: rows in the vector lanes, one accumulator per
 * (16 rows, column), 8 for 32 rows, enough to hide the FMA latency.  The quarter-width kernel
 * spent 8 FMAs per k on 8 rows x 4 useful columns (5.5 % of LeNet's conv2 for 2 % of its
 * columns); this one 8 per k for 32 rows.  Each element still gets its FMAs in order k = 0 ..
 * K-1 from the same start (bias, 0 or C), so the numbers are those of the panel kernels. */
/* two 8-float halves in one vector (AVX-512F: insertf32x8 is AVX-512DQ) */
#define FC_JOIN8(lo, hi) _mm512_castpd_ps(_mm512_insertf64x4(                                  \
    _mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1))
FC_T512 static void fc_ukrt_f_512(ptrdiff_t K, const float* A, ptrdiff_t ps, const float* B,
                                  ptrdiff_t ldb, float* C, ptrdiff_t ldc, const float* bias,
                                  int acc, int n, int rows, const ptrdiff_t* bo) {
    int npan = (rows + 7) / 8;                   /* panels of 8 rows: 1 .. 4 */
    __m512 c[2][4];
    float tmp[32];
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++) c[h][j] = _mm512_setzero_ps();
    if (acc & 1) {
        for (int j = 0; j < n; j++) {
            for (int r = 0; r < 32; r++) tmp[r] = r < rows ? C[r * ldc + j] : 0.0f;
            c[0][j] = _mm512_loadu_ps(tmp);
            c[1][j] = _mm512_loadu_ps(tmp + 16);
        }
    } else if (bias != NULL) {
        for (int r = 0; r < 32; r++) tmp[r] = r < rows ? bias[r] : 0.0f;
        for (int j = 0; j < 4; j++) {
            c[0][j] = _mm512_loadu_ps(tmp);
            c[1][j] = _mm512_loadu_ps(tmp + 16);
        }
    }
    /* columns past n read column n - 1 again (computed, not stored) */
    const float* b0 = B;
    const float* b1 = B + (n > 1 ? 1 : 0);
    const float* b2 = B + (n > 2 ? 2 : n - 1);
    const float* b3 = B + (n > 3 ? 3 : n - 1);
    /* panels past the last: the last again (computed, not stored) */
    const float* a0 = A;
    const float* a1 = A + (npan > 1 ? 1 : 0) * ps;
    const float* a2 = A + (npan > 2 ? 2 : npan - 1) * ps;
    const float* a3 = A + (npan > 3 ? 3 : npan - 1) * ps;
    if (npan > 2) {
        for (ptrdiff_t k = 0; k < K; k++) {
            __m512 v0 = FC_JOIN8(_mm256_loadu_ps(a0 + 8 * k), _mm256_loadu_ps(a1 + 8 * k));
            __m512 v1 = FC_JOIN8(_mm256_loadu_ps(a2 + 8 * k), _mm256_loadu_ps(a3 + 8 * k));
            ptrdiff_t o = bo != NULL ? bo[k] : k * ldb;
            __m512 w0 = _mm512_set1_ps(b0[o]), w1 = _mm512_set1_ps(b1[o]);
            __m512 w2 = _mm512_set1_ps(b2[o]), w3 = _mm512_set1_ps(b3[o]);
            c[0][0] = _mm512_fmadd_ps(v0, w0, c[0][0]);
            c[1][0] = _mm512_fmadd_ps(v1, w0, c[1][0]);
            c[0][1] = _mm512_fmadd_ps(v0, w1, c[0][1]);
            c[1][1] = _mm512_fmadd_ps(v1, w1, c[1][1]);
            c[0][2] = _mm512_fmadd_ps(v0, w2, c[0][2]);
            c[1][2] = _mm512_fmadd_ps(v1, w2, c[1][2]);
            c[0][3] = _mm512_fmadd_ps(v0, w3, c[0][3]);
            c[1][3] = _mm512_fmadd_ps(v1, w3, c[1][3]);
        }
    } else {
        for (ptrdiff_t k = 0; k < K; k++) {
            __m512 v0 = FC_JOIN8(_mm256_loadu_ps(a0 + 8 * k), _mm256_loadu_ps(a1 + 8 * k));
            ptrdiff_t o = bo != NULL ? bo[k] : k * ldb;
            c[0][0] = _mm512_fmadd_ps(v0, _mm512_set1_ps(b0[o]), c[0][0]);
            c[0][1] = _mm512_fmadd_ps(v0, _mm512_set1_ps(b1[o]), c[0][1]);
            c[0][2] = _mm512_fmadd_ps(v0, _mm512_set1_ps(b2[o]), c[0][2]);
            c[0][3] = _mm512_fmadd_ps(v0, _mm512_set1_ps(b3[o]), c[0][3]);
        }
    }
    for (int j = 0; j < n; j++) {
        for (int h = 0; h < 2; h++) {
            __m512 v = c[h][j];
            if (acc & FC_GEMM_RELU) v = FC_RELU_PS512(v);
            _mm512_storeu_ps(tmp + 16 * h, v);
        }
        for (int r = 0; r < rows; r++) C[r * ldc + j] = tmp[r];
    }
}
/* (placeholders for the drivers without a tail kernel: never called) */
static void fc_no_tail_f(ptrdiff_t K, const float* A, ptrdiff_t ps, const float* B,
                         ptrdiff_t ldb, float* C, ptrdiff_t ldc, const float* bias, int acc,
                         int n, int rows, const ptrdiff_t* bo) {
    (void)K; (void)A; (void)ps; (void)B; (void)ldb; (void)C; (void)ldc; (void)bias;
    (void)acc; (void)n; (void)rows; (void)bo;
}
static void fc_no_tail_d(ptrdiff_t K, const double* A, ptrdiff_t ps, const double* B,
                         ptrdiff_t ldb, double* C, ptrdiff_t ldc, const double* bias, int acc,
                         int n, int rows, const ptrdiff_t* bo) {
    (void)K; (void)A; (void)ps; (void)B; (void)ldb; (void)C; (void)ldc; (void)bias;
    (void)acc; (void)n; (void)rows; (void)bo;
}

/* ---- AVX2+FMA: masks are integer vectors ---- */
#define FC_T256 __attribute__((target("avx2,fma")))
/* unroll the next loop whole (gcc; others decide themselves) */
#if defined(__GNUC__) && !defined(__clang__)
#define FC_UNROLL _Pragma("GCC unroll 9")
#else
#define FC_UNROLL
#endif
#define FC_MLOAD_PS256(p, m) _mm256_maskload_ps((p), (m))
#define FC_MSTORE_PS256(p, m, v) _mm256_maskstore_ps((p), (m), (v))
#define FC_MLOAD_PD256(p, m) _mm256_maskload_pd((p), (m))
#define FC_MSTORE_PD256(p, m, v) _mm256_maskstore_pd((p), (m), (v))
FC_UKR(fc_ukr_f_256, float, __m256, 2, 8, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
       FC_RELU_PS256, 0, 0)
FC_UKRX(fc_ukrs_f_256, float, __m256, 2, 8, 4, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
        _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
        FC_RELU_PS256, 0, 0)
FC_UKRX(fc_ukrs_d_256, double, __m256d, 2, 4, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
        _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
        FC_RELU_PD256, 0, 0)
/* the short kernels with their rows in two panels (A's row r at A + bo[r]): the last 8 rows
 * of M = 6 n + 2 as two 4-row calls (8 accumulators each: 4 cycles a k-step), not a 6-row
 * one and a 2-row one that costs a 4-row one's k-step (10 cycles for 8 rows) */
FC_UKRX(fc_ukrj_f_256, float, __m256, 2, 8, 4, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
        _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
        FC_RELU_PS256, 0, 2)
FC_UKRX(fc_ukrj_d_256, double, __m256d, 2, 4, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
        _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
        FC_RELU_PD256, 0, 2)
FC_UKR(fc_ukra_f_256, float, __m256, 2, 8, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
       FC_RELU_PS256, 1, 0)
FC_UKR(fc_ukr_d_256, double, __m256d, 2, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
       FC_RELU_PD256, 0, 0)
FC_UKR(fc_ukra_d_256, double, __m256d, 2, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
       FC_RELU_PD256, 1, 0)
FC_UKR(fc_ukrh_f_256, float, __m256, 1, 8, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
       FC_RELU_PS256, 0, 0)
FC_UKR(fc_ukrah_f_256, float, __m256, 1, 8, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
       FC_RELU_PS256, 1, 0)
FC_UKR(fc_ukrh_d_256, double, __m256d, 1, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
       FC_RELU_PD256, 0, 0)
FC_UKR(fc_ukrah_d_256, double, __m256d, 1, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
       FC_RELU_PD256, 1, 0)

/* the AVX2 kernels reading B's rows (TABLE 1) or A's rows (TABLE 2) through offsets */
FC_UKR(fc_ukrb_f_256, float, __m256, 2, 8, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
       FC_RELU_PS256, 0, 1)
FC_UKR(fc_ukrbh_f_256, float, __m256, 1, 8, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
       FC_RELU_PS256, 0, 1)
FC_UKR(fc_ukrb_d_256, double, __m256d, 2, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
       FC_RELU_PD256, 0, 1)
FC_UKR(fc_ukrbh_d_256, double, __m256d, 1, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
       FC_RELU_PD256, 0, 1)
FC_UKRX(fc_ukrbs_f_256, float, __m256, 2, 8, 4, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
        _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
        FC_RELU_PS256, 0, 1)
FC_UKRX(fc_ukrbs_d_256, double, __m256d, 2, 4, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
        _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
        FC_RELU_PD256, 0, 1)
FC_UKR(fc_ukrc_f_256, float, __m256, 2, 8, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
       FC_RELU_PS256, 1, 2)
FC_UKR(fc_ukrch_f_256, float, __m256, 1, 8, 6, FC_T256, _mm256_set1_ps, _mm256_loadu_ps,
       _mm256_storeu_ps, _mm256_fmadd_ps, __m256i, FC_MLOAD_PS256, FC_MSTORE_PS256,
       FC_RELU_PS256, 1, 2)
FC_UKR(fc_ukrc_d_256, double, __m256d, 2, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
       FC_RELU_PD256, 1, 2)
FC_UKR(fc_ukrch_d_256, double, __m256d, 1, 4, 6, FC_T256, _mm256_set1_pd, _mm256_loadu_pd,
       _mm256_storeu_pd, _mm256_fmadd_pd, __m256i, FC_MLOAD_PD256, FC_MSTORE_PD256,
       FC_RELU_PD256, 1, 2)

/* masks for the first n (0 <= n < NV * lanes) columns of a panel */
static void fc_mask512_16(ptrdiff_t n, __mmask16 mk[2]) {
    for (int v = 0; v < 2; v++) {
        ptrdiff_t m = n - 16 * v;
        mk[v] = m >= 16 ? (__mmask16)0xffff : m <= 0 ? (__mmask16)0 : (__mmask16)((1u << m) - 1);
    }
}
static void fc_mask512_8(ptrdiff_t n, __mmask8 mk[2]) {
    for (int v = 0; v < 2; v++) {
        ptrdiff_t m = n - 8 * v;
        mk[v] = m >= 8 ? (__mmask8)0xff : m <= 0 ? (__mmask8)0 : (__mmask8)((1u << m) - 1);
    }
}
FC_T256 static void fc_mask256_32(ptrdiff_t n, __m256i mk[2]) {   /* 8 int32 lanes */
    for (int v = 0; v < 2; v++) {
        __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        mk[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - 8 * v)), idx);
    }
}
FC_T256 static void fc_mask256_64(ptrdiff_t n, __m256i mk[2]) {   /* 4 int64 lanes */
    for (int v = 0; v < 2; v++) {
        __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
        mk[v] = _mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)(n - 4 * v)), idx);
    }
}

FC_T256 static void fc_transpose_f_256(const float* src, ptrdiff_t rows, ptrdiff_t cols,
                                       ptrdiff_t lds, float* dst, ptrdiff_t ldd);
FC_T256 static void fc_transpose_d_256(const double* src, ptrdiff_t rows, ptrdiff_t cols,
                                       ptrdiff_t lds, double* dst, ptrdiff_t ldd);
#define fc_transpose_float_256 fc_transpose_f_256    /* by the drivers' type names */
#define fc_transpose_double_256 fc_transpose_d_256
#define fc_ukrj_float_256 fc_ukrj_f_256
#define fc_ukrj_double_256 fc_ukrj_d_256

/* Rows [0, kc) of a strip of B (w <= nr columns from b, rows ldb apart) into dst (rows nr
 * apart); next, when not NULL, is the next strip: its rows are prefetched meanwhile. */
#define FC_PACK_STRIP(T)                                                                        \
static inline void fc_pack_strip_##T(const T* b, ptrdiff_t ldb, ptrdiff_t kc, ptrdiff_t w,     \
                                     ptrdiff_t nr, T* restrict dst, const T* next) {            \
    for (ptrdiff_t k = 0; k < kc; k++) {                                                        \
        if (next != NULL) {                                                                     \
            __builtin_prefetch(next + k * ldb, 0, 3);                                           \
            __builtin_prefetch(next + k * ldb + nr - 1, 0, 3);                                  \
        }                                                                                       \
        if (w == nr)                                                                            \
            memcpy(dst + k * nr, b + k * ldb, sizeof(T) * (size_t)nr);                          \
        else                                                                                    \
            memcpy(dst + k * nr, b + k * ldb, sizeof(T) * (size_t)w);                           \
    }                                                                                           \
}
FC_PACK_STRIP(float)
FC_PACK_STRIP(double)

/* The tail kernel at AVX2: a panel of 6 rows in the lanes of one vector (lanes 6-7 hold the
 * next column's rows: computed, never stored), 3 panels (18 rows) x 4 columns = 12
 * accumulators a call: 3 loads, 4 broadcasts and 12 FMAs a k for 72 values (the half-width
 * kernel: 6 FMAs for 24 values of a 4-column tail, latency-bound; a 1x1 256 -> 256 on 14x14
 * images spent 5.8 % of its samples there for 2 % of the columns).  The last k's loads are
 * masked (the packed A ends there).  Numbers as fc_ukrt_f_512's: those of the panel kernels. */
FC_T256 static void fc_ukrt_f_256(ptrdiff_t K, const float* A, ptrdiff_t ps, const float* B,
                                  ptrdiff_t ldb, float* C, ptrdiff_t ldc, const float* bias,
                                  int acc, int n, int rows, const ptrdiff_t* bo) {
    int npan = (rows + 5) / 6;                   /* panels of 6 rows: 1 .. 3 */
    __m256 c[3][4];
    float tmp[8];
    for (int h = 0; h < 3; h++)
        for (int j = 0; j < 4; j++) c[h][j] = _mm256_setzero_ps();
    if (acc & 1) {
        for (int h = 0; h < npan; h++)
            for (int j = 0; j < n; j++) {
                for (int r = 0; r < 8; r++)
                    tmp[r] = r < 6 && 6 * h + r < rows ? C[(6 * h + r) * ldc + j] : 0.0f;
                c[h][j] = _mm256_loadu_ps(tmp);
            }
    } else if (bias != NULL) {
        for (int h = 0; h < npan; h++) {
            for (int r = 0; r < 8; r++)
                tmp[r] = r < 6 && 6 * h + r < rows ? bias[6 * h + r] : 0.0f;
            for (int j = 0; j < 4; j++) c[h][j] = _mm256_loadu_ps(tmp);
        }
    }
    /* columns past n read column n - 1 again, panels past the last the last (not stored) */
    const float* b0 = B;
    const float* b1 = B + (n > 1 ? 1 : 0);
    const float* b2 = B + (n > 2 ? 2 : n - 1);
    const float* b3 = B + (n > 3 ? 3 : n - 1);
    const float* a0 = A;
    const float* a1 = A + (npan > 1 ? 1 : 0) * ps;
    const float* a2 = A + (npan > 2 ? 2 : npan - 1) * ps;
    /* 12 accumulators, 3 vectors of A and 1 broadcast: the 16 registers (the 4 columns'
       broadcasts at once spilled the accumulators to the stack: 2x slower) */
#define FC_UKRT_STEP(V0, V1, V2)                                                                \
    {                                                                                           \
        __m256 v0 = (V0), v1 = (V1), v2 = (V2), w;                                              \
        ptrdiff_t o = bo != NULL ? bo[k] : k * ldb;                                             \
        w = _mm256_set1_ps(b0[o]);                                                              \
        c[0][0] = _mm256_fmadd_ps(v0, w, c[0][0]);                                              \
        c[1][0] = _mm256_fmadd_ps(v1, w, c[1][0]);                                              \
        c[2][0] = _mm256_fmadd_ps(v2, w, c[2][0]);                                              \
        w = _mm256_set1_ps(b1[o]);                                                              \
        c[0][1] = _mm256_fmadd_ps(v0, w, c[0][1]);                                              \
        c[1][1] = _mm256_fmadd_ps(v1, w, c[1][1]);                                              \
        c[2][1] = _mm256_fmadd_ps(v2, w, c[2][1]);                                              \
        w = _mm256_set1_ps(b2[o]);                                                              \
        c[0][2] = _mm256_fmadd_ps(v0, w, c[0][2]);                                              \
        c[1][2] = _mm256_fmadd_ps(v1, w, c[1][2]);                                              \
        c[2][2] = _mm256_fmadd_ps(v2, w, c[2][2]);                                              \
        w = _mm256_set1_ps(b3[o]);                                                              \
        c[0][3] = _mm256_fmadd_ps(v0, w, c[0][3]);                                              \
        c[1][3] = _mm256_fmadd_ps(v1, w, c[1][3]);                                              \
        c[2][3] = _mm256_fmadd_ps(v2, w, c[2][3]);                                              \
    }
    /* one column (a 14x14 image's 5x5 Winograd: 49 = 3 x 16 + 1 tiles): its 3 FMAs a k
       only, on the same accumulators in the same order (the 12 of the step did 4x the work) */
#define FC_UKRT_STEP1(V0, V1, V2)                                                               \
    {                                                                                           \
        ptrdiff_t o = bo != NULL ? bo[k] : k * ldb;                                             \
        __m256 w = _mm256_set1_ps(b0[o]);                                                       \
        c[0][0] = _mm256_fmadd_ps((V0), w, c[0][0]);                                            \
        c[1][0] = _mm256_fmadd_ps((V1), w, c[1][0]);                                            \
        c[2][0] = _mm256_fmadd_ps((V2), w, c[2][0]);                                            \
    }
    ptrdiff_t k = 0;
    const __m256i six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    /* every k but the last by full loads, the last by masked ones (its rows end the panels) */
#define FC_UKRT_RUN(STEP)                                                                       \
    for (; k + 1 < K; k++)                                                                      \
        STEP(_mm256_loadu_ps(a0 + 6 * k), _mm256_loadu_ps(a1 + 6 * k),                          \
             _mm256_loadu_ps(a2 + 6 * k))                                                       \
    if (k < K)                                                                                  \
        STEP(_mm256_maskload_ps(a0 + 6 * k, six), _mm256_maskload_ps(a1 + 6 * k, six),          \
             _mm256_maskload_ps(a2 + 6 * k, six))
    if (n == 1) {
        FC_UKRT_RUN(FC_UKRT_STEP1)
    } else {
        FC_UKRT_RUN(FC_UKRT_STEP)
    }
#undef FC_UKRT_RUN
#undef FC_UKRT_STEP
#undef FC_UKRT_STEP1
    for (int h = 0; h < npan; h++)
        for (int j = 0; j < n; j++) {
            __m256 v = c[h][j];
            if (acc & FC_GEMM_RELU) v = FC_RELU_PS256(v);
            _mm256_storeu_ps(tmp, v);
            for (int r = 0; r < 6 && 6 * h + r < rows; r++) C[(6 * h + r) * ldc + j] = tmp[r];
        }
}
/* rows of C a tail kernel call covers: 4 panels at AVX-512, 3 at AVX2 */
#define FC_TAIL_ROWS(MR) ((MR) == 6 ? 3 * (MR) : 4 * (MR))

/* Rows of the short kernels: MR/2 at AVX-512 (8: 4 rows, 8 accumulators of 2 vectors), 4 of
 * AVX2's 6 (8 accumulators, as many as 2 FMA ports of latency 4 keep busy: as fast a k-step
 * as 3 rows, so a last panel of 4 rows, M = 64 = 10 x 6 + 4, costs 4 cycles a k, not 6) */
#define FC_SHORT_ROWS(MR) ((MR) == 6 ? 4 : (MR) / 2)

/* The driver: columns [n0, n1) of C (n0 a multiple of NR, so that threads can split C by
 * panels), all M rows. */
#define FC_GEMM_DRIVER(NAME, T, UKR, UKRH, UKRQ, UKRS, MR, NR, MTYPE, MKMASK, QMTYPE, QMASK,  \
                       HASQ, INPLACE, TAIL, TAILN, TABLE)                                       \
static void NAME(ptrdiff_t M, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t K, const T* Ap,            \
                 ptrdiff_t lda, const T* B, ptrdiff_t ldb, T* C, ptrdiff_t ldc, const T* bias,  \
                 int acc, const ptrdiff_t* bo) {                                                \
    /* TABLE: B's row k at B + bo[k] (ldb unused) */                                            \
    T init[MR], zinit[MR];                                                                      \
    for (int r = 0; r < MR; r++) zinit[r] = (T)0;                                               \
    const int relu = acc & FC_GEMM_RELU;    /* max(C, 0) as the last K block is stored */      \
    MTYPE mk[2];                                                                                \
    QMTYPE qmk[2];                                                                              \
    MKMASK(0, mk);                                                                              \
    QMASK(0, qmk);                                                                              \
    /* B's strip copied (rows far apart, as a big image's in a 1x1 convolution: every row */   \
    /* its own page, and more pages than the L1 TLB holds in a K block) */                     \
    T bpk[FC_GEMM_KC_MAX * NR] __attribute__((aligned(64)));                                   \
    const ptrdiff_t ldbb = ldb * (ptrdiff_t)sizeof(T);                                          \
    const int packb = TABLE == 0 && !INPLACE && (acc & FC_GEMM_PACKB) && M > 4 * MR &&            \
                      fc_gemm_packb_min > 0 && (ldbb >= fc_gemm_packb_min ||                    \
                      (fc_gemm_packb_sets && ldbb >= 512 && ldbb % 512 == 0));                  \
    /* M = 6 n + 2 (AVX2, A packed, B by rows): the last 8 rows as two 4-row calls */        \
    /* (fc_ukrj_*), the second with rows 4-5 of one panel and 0-1 of the next: jrows */        \
    const int split = MR == 6 && TABLE == 0 && !INPLACE && M % MR == 2 && M > MR &&            \
                      fc_gemm_short_on && fc_gemm_split_on;                                     \
    const ptrdiff_t jrows[4] = {0, 1, MR * K - 4, MR * K - 3};                                  \
    /* B transposed (FC_GEMM_BT): every strip transposed into bpk, whatever the sizes */       \
    const int bt = TABLE != 1 && (acc & FC_GEMM_BT);                                            \
    if (TAILN > 0 && fc_gemm_tail_on && !bt && n1 > n0) {  /* a last panel of <= TAILN cols */ \
        ptrdiff_t jt = n0 + (n1 - n0 - 1) / NR * NR;                                            \
        if (n1 - jt <= TAILN) {                                                                 \
            for (ptrdiff_t ir = 0; ir < M; ir += FC_TAIL_ROWS(MR))                              \
                TAIL(K, Ap + ir * K, MR * K, B + jt, ldb, C + ir * ldc + jt, ldc,               \
                     bias != NULL ? bias + ir : NULL, acc, (int)(n1 - jt),                      \
                     (int)(M - ir < FC_TAIL_ROWS(MR) ? M - ir : FC_TAIL_ROWS(MR)),              \
                     TABLE == 1 ? bo : NULL);                                                   \
            n1 = jt;                                                                            \
        }                                                                                       \
    }                                                                                           \
    const ptrdiff_t KC = fc_gemm_kc;                                                            \
    for (ptrdiff_t pc = 0; pc < K; pc += KC) {                                                  \
        ptrdiff_t kc = K - pc < KC ? K - pc : KC;                                               \
        int first = (pc == 0 && !(acc & 1)), last_relu = relu && pc + kc >= K;                  \
        /* (fewer rows: as many pages as the L1 TLB holds, and the copy did not pay) */        \
        const int pack = bt || (packb && kc >= 64);                                             \
        for (ptrdiff_t jr = n0; jr < n1; jr += NR) {                                            \
            int masked = n1 - jr < NR;                                                          \
            int half = n1 - jr <= NR / 2;        /* a tail of half a panel or less */           \
            if (masked) MKMASK(n1 - jr, mk);                                                    \
            if (half) masked = n1 - jr < NR / 2;                                                \
            int quarter = HASQ && n1 - jr <= NR / 4;     /* a quarter panel or less */          \
            if (quarter) {                                                                      \
                masked = n1 - jr < NR / 4;                                                      \
                QMASK(n1 - jr, qmk);                                                            \
            }                                                                                   \
            /* C's rows in the next panel, a row block's share before each call, when C is */  \
            /* written, not read (first K block) and a call is long enough to hide it */       \
            /* (fc_gemm_cpf_kc): output rows missed on every store */                           \
            const char* Cn = first && fc_gemm_cpf_kc > 0 && kc >= fc_gemm_cpf_kc &&             \
                             jr + NR < n1 ? (const char*)(C + jr + NR) : NULL;                  \
            const char* bn = TABLE == 0 && !bt && !pack && fc_gemm_bpf_min > 0 &&              \
                             ldbb >= fc_gemm_bpf_min && jr + NR < n1                           \
                             ? (const char*)(B + pc * ldb + jr + NR) : NULL;                    \
            for (ptrdiff_t ir = 0; ir < M; ir += MR) {                                          \
                int mr = M - ir < MR ? (int)(M - ir) : MR;                                      \
                if (Cn != NULL) {                                                               \
                    for (int r = 0; r < mr; r++) {                                              \
                        const char* q = Cn + (ir + r) * ldc * (ptrdiff_t)sizeof(T);             \
                        __builtin_prefetch(q, 1, 3);          /* NR values: 2 or 3 lines */     \
                        __builtin_prefetch(q + 64, 1, 3);                                       \
                        __builtin_prefetch(q + NR * sizeof(T) - 1, 1, 3);                       \
                    }                                                                           \
                }                                                                               \
                /* a whole panel starts from the bias (or zeros) in place: a copy per tile */ \
                /* was a fifth of the work beside a 25-tap K (LeNet's conv1) */                \
                const T* ini = NULL;                                                            \
                if (first && mr == MR)                                                          \
                    ini = bias != NULL ? bias + ir : zinit;                                     \
                else if (first) {                                                               \
                    for (int r = 0; r < MR; r++)                                                \
                        init[r] = (bias != NULL && r < mr) ? bias[ir + r] : (T)0;               \
                    ini = init;                                                                 \
                }                                                                               \
                const T* a = TABLE == 2 ? Ap + pc : INPLACE ? Ap + ir * lda + pc                \
                                                            : Ap + ir * K + pc * MR;            \
                const T* bp = TABLE == 1 ? B + jr : bt ? B + jr * ldb + pc                      \
                                                         : B + pc * ldb + jr;                   \
                ptrdiff_t bld = ldb;                                                            \
                if (pack) {                                                                     \
                    if (ir == 0 && bt)                                                          \
                        fc_transpose_##T##_256(bp, n1 - jr < NR ? n1 - jr : NR, kc, ldb, bpk,   \
                                               NR);                                             \
                    else if (ir == 0)                                                           \
                        fc_pack_strip_##T(bp, ldb, kc, n1 - jr < NR ? n1 - jr : NR, NR, bpk,    \
                                          jr + 2 * NR <= n1 ? bp + NR : NULL);                  \
                    bp = bpk;                                                                   \
                    bld = NR;                                                                   \
                }                                                                               \
                if (bn != NULL) {           /* this row block's share of the next strip */   \
                    ptrdiff_t k0 = kc * ir / M, k1 = kc * (ir + mr) / M;                        \
                    for (ptrdiff_t k = k0; k < k1; k++) {                                       \
                        const char* q = bn + k * ldbb;                                          \
                        __builtin_prefetch(q, 0, 3);                                            \
                        __builtin_prefetch(q + 64, 0, 3);                                       \
                        __builtin_prefetch(q + NR * sizeof(T) - 1, 0, 3);                       \
                    }                                                                           \
                }                                                                               \
                const ptrdiff_t* bop = TABLE == 1 ? bo + pc : TABLE == 2 ? bo + ir : NULL;      \
                if (split && ir == M - MR - 2 && !half && !quarter) {                           \
                    const T* ini4 = ini == NULL ? NULL : bias != NULL ? bias + ir + 4 : zinit;  \
                    UKRS(kc, a, lda, bp, bld, C + ir * ldc + jr, ldc, ini, 4, masked, mk,       \
                         last_relu, NULL);                                                      \
                    fc_ukrj_##T##_256(kc, a + 4, lda, bp, bld, C + (ir + 4) * ldc + jr, ldc,    \
                                      ini4, 4, masked, (const __m256i*)(const void*)mk,         \
                                      last_relu, jrows);    /* (AVX2 drivers only: MR 6) */    \
                    break;                                  /* (the last panel's rows too) */  \
                }                                                                               \
                if (quarter)                                                                    \
                    UKRQ(kc, a, lda, bp, bld, C + ir * ldc + jr, ldc,                           \
                         ini, mr, masked, qmk, last_relu, bop);                 \
                else if (UKRS != UKR && !half && mr <= FC_SHORT_ROWS(MR) && fc_gemm_short_on) \
                    UKRS(kc, a, lda, bp, bld, C + ir * ldc + jr, ldc,                           \
                         ini, mr, masked, mk, last_relu, bop);                  \
                else                                                                            \
                    (half ? UKRH : UKR)(kc, a, lda, bp, bld, C + ir * ldc + jr,                 \
                                        ldc, ini, mr, masked, mk, last_relu,    \
                                        bop);                                                   \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}

FC_GEMM_DRIVER(fc_gemm_f_512, float, fc_ukr_f_512, fc_ukrh_f_512, fc_ukrq_f_512, fc_ukrs_f_512, 8,
               32, __mmask16, fc_mask512_16, __mmask8, fc_mask512_8, 1, 0, fc_ukrt_f_512, 4, 0)
FC_GEMM_DRIVER(fc_gemmb_f_512, float, fc_ukrb_f_512, fc_ukrbh_f_512, fc_ukrbq_f_512, fc_ukrb_f_512,
               8, 32, __mmask16, fc_mask512_16, __mmask8, fc_mask512_8, 1, 0, fc_ukrt_f_512, 4,
               1)
FC_GEMM_DRIVER(fc_gemmb_d_512, double, fc_ukrb_d_512, fc_ukrbh_d_512, fc_ukrbq_d_512,
               fc_ukrb_d_512, 8, 16, __mmask8, fc_mask512_8, __mmask8, fc_mask512_8, 1, 0,
               fc_no_tail_d, 0, 1)
FC_GEMM_DRIVER(fc_gemmc_f_512, float, fc_ukrc_f_512, fc_ukrch_f_512, fc_ukrcq_f_512, fc_ukrc_f_512,
               8, 32, __mmask16, fc_mask512_16, __mmask8, fc_mask512_8, 1, 1, fc_no_tail_f, 0, 2)
FC_GEMM_DRIVER(fc_gemmc_d_512, double, fc_ukrc_d_512, fc_ukrch_d_512, fc_ukrcq_d_512,
               fc_ukrc_d_512, 8, 16, __mmask8, fc_mask512_8, __mmask8, fc_mask512_8, 1, 1,
               fc_no_tail_d, 0, 2)
FC_GEMM_DRIVER(fc_gemm_d_512, double, fc_ukr_d_512, fc_ukrh_d_512, fc_ukrq_d_512, fc_ukrs_d_512, 8,
               16, __mmask8, fc_mask512_8, __mmask8, fc_mask512_8, 1, 0, fc_no_tail_d, 0, 0)
FC_GEMM_DRIVER(fc_gemm_f_256, float, fc_ukr_f_256, fc_ukrh_f_256, fc_ukrh_f_256, fc_ukrs_f_256, 6,
               16, __m256i, fc_mask256_32, __m256i, fc_mask256_32, 0, 0, fc_ukrt_f_256, 4, 0)
FC_GEMM_DRIVER(fc_gemm_d_256, double, fc_ukr_d_256, fc_ukrh_d_256, fc_ukrh_d_256, fc_ukrs_d_256, 6,
               8, __m256i, fc_mask256_64, __m256i, fc_mask256_64, 0, 0, fc_no_tail_d, 0, 0)
/* the same with A read in place (rows lda apart): the weight gradient's im2col matrix */
FC_GEMM_DRIVER(fc_gemmb_f_256, float, fc_ukrb_f_256, fc_ukrbh_f_256, fc_ukrbh_f_256, fc_ukrbs_f_256,
               6, 16, __m256i, fc_mask256_32, __m256i, fc_mask256_32, 0, 0, fc_ukrt_f_256, 4, 1)
FC_GEMM_DRIVER(fc_gemmb_d_256, double, fc_ukrb_d_256, fc_ukrbh_d_256, fc_ukrbh_d_256,
               fc_ukrbs_d_256, 6, 8, __m256i, fc_mask256_64, __m256i, fc_mask256_64, 0, 0,
               fc_no_tail_d, 0, 1)
FC_GEMM_DRIVER(fc_gemmc_f_256, float, fc_ukrc_f_256, fc_ukrch_f_256, fc_ukrch_f_256, fc_ukrc_f_256,
               6, 16, __m256i, fc_mask256_32, __m256i, fc_mask256_32, 0, 1, fc_no_tail_f, 0, 2)
FC_GEMM_DRIVER(fc_gemmc_d_256, double, fc_ukrc_d_256, fc_ukrch_d_256, fc_ukrch_d_256,
               fc_ukrc_d_256, 6, 8, __m256i, fc_mask256_64, __m256i, fc_mask256_64, 0, 1,
               fc_no_tail_d, 0, 2)
FC_GEMM_DRIVER(fc_gemma_f_512, float, fc_ukra_f_512, fc_ukrah_f_512, fc_ukraq_f_512, fc_ukra_f_512,
               8, 32, __mmask16, fc_mask512_16, __mmask8, fc_mask512_8, 1, 1, fc_no_tail_f, 0, 0)
FC_GEMM_DRIVER(fc_gemma_d_512, double, fc_ukra_d_512, fc_ukrah_d_512, fc_ukraq_d_512,
               fc_ukra_d_512, 8, 16, __mmask8, fc_mask512_8, __mmask8, fc_mask512_8, 1, 1,
               fc_no_tail_d, 0, 0)
FC_GEMM_DRIVER(fc_gemma_f_256, float, fc_ukra_f_256, fc_ukrah_f_256, fc_ukrah_f_256, fc_ukra_f_256,
               6, 16, __m256i, fc_mask256_32, __m256i, fc_mask256_32, 0, 1, fc_no_tail_f, 0, 0)
FC_GEMM_DRIVER(fc_gemma_d_256, double, fc_ukra_d_256, fc_ukrah_d_256, fc_ukrah_d_256,
               fc_ukra_d_256, 6, 8, __m256i, fc_mask256_64, __m256i, fc_mask256_64, 0, 1,
               fc_no_tail_d, 0, 0)

/* The weight gradient of a convolution with few taps as dot products along the pixels:
 * gwt (K x R, row-major) += A (K x P) @ B^T, A's row k at A + bo[k] (bo != NULL: the shared
 * im2col rows of fc_im2col_rows) or A + k * lda, B (R x P) rows ldb apart.  Each KB x RB block
 * of gwt is held in registers as vectors of partial sums over the pixels, KB + RB vector
 * loads per KB * RB FMAs, summed across lanes at the end.  The GEMM form (fc_gemmc_*: A's rows
 * times B transposed strip by strip) transposed all of B for K rows of use, in MR-row panels:
 * LeNet's conv1 (K = 25 taps, 32 channels, 28x28) spent 20 % of its weight gradient in the
 * transposes and 22 % on the 7 rows that pad 25 to 32.  Rows past K or R: the last again,
 * computed and not stored.  The pixels go in chunks of about FC_WDOT_CHUNK bytes per row (a
 * block's rows then stay in L1 across the blocks that reuse them): on that conv1 in float64
 * the kernel ran at 0.90x the GEMM in one chunk, 1.10x / 1.16x / 1.22x in chunks of 2 / 3 /
 * 4 KiB.  Each element's sum: LANES partial sums over the pixels, then across the lanes, per
 * chunk: unlike the GEMM's sums (one FMA per pixel in order), they depend on how the caller
 * splits the pixels (a big image's blocks of output rows, set_gemm_block) in the last bits
 * (float32: 2e-7 relative, against the GEMM's 2-5e-6 from the exact sums), as the sums of
 * per-thread partial rows depend on the thread count. */
#ifndef FC_WDOT_CHUNK
#define FC_WDOT_CHUNK 4096
#endif
#define FC_WDOT(NAME, T, VT, LANES, KB, RB, TGT, LOADU, MTYPE, MKTAIL, MLOAD, FMA, ZERO, HSUM) \
TGT static void NAME(ptrdiff_t K, ptrdiff_t R, ptrdiff_t P, const T* A, ptrdiff_t lda,         \
                     const ptrdiff_t* bo, const T* B, ptrdiff_t ldb, T* gwt) {                  \
    if (P <= 0)                                                                                 \
        return;                                                                                 \
    const ptrdiff_t Pv = P - P % LANES;                                                         \
    const MTYPE mt = MKTAIL(P - Pv);                                                            \
    ptrdiff_t nch = (P * (ptrdiff_t)sizeof(T) + FC_WDOT_CHUNK - 1) / FC_WDOT_CHUNK;            \
    ptrdiff_t pcs = ((P + nch - 1) / nch + LANES - 1) / LANES * LANES;                          \
    for (ptrdiff_t q0 = 0; q0 < P; q0 += pcs) {                                                 \
        const ptrdiff_t q1 = q0 + pcs < Pv ? q0 + pcs : Pv;                                     \
        const int tail = q0 + pcs >= P && Pv < P;                                               \
        for (ptrdiff_t r0 = 0; r0 < R; r0 += RB) {                                              \
            const T* br[RB];                                                                    \
            _Pragma("GCC unroll 8")                                                             \
            for (int j = 0; j < RB; j++) br[j] = B + (r0 + j < R ? r0 + j : R - 1) * ldb;      \
            for (ptrdiff_t k0 = 0; k0 < K; k0 += KB) {                                          \
                const T* ar[KB];                                                                \
                _Pragma("GCC unroll 8")                                                         \
                for (int i = 0; i < KB; i++) {                                                  \
                    ptrdiff_t k = k0 + i < K ? k0 + i : K - 1;                                  \
                    ar[i] = bo != NULL ? A + bo[k] : A + k * lda;                               \
                }                                                                               \
                VT c[KB][RB];                                                                   \
                _Pragma("GCC unroll 8")                                                         \
                for (int i = 0; i < KB; i++) {                                                  \
                    _Pragma("GCC unroll 8")                                                     \
                    for (int j = 0; j < RB; j++) c[i][j] = ZERO();                              \
                }                                                                               \
                for (ptrdiff_t p = q0; p < q1; p += LANES) {                                    \
                    VT a[KB];                                                                   \
                    _Pragma("GCC unroll 8")                                                     \
                    for (int i = 0; i < KB; i++) a[i] = LOADU(ar[i] + p);                       \
                    _Pragma("GCC unroll 8")                                                     \
                    for (int j = 0; j < RB; j++) {                                              \
                        VT b = LOADU(br[j] + p);                                                \
                        _Pragma("GCC unroll 8")                                                 \
                        for (int i = 0; i < KB; i++) c[i][j] = FMA(a[i], b, c[i][j]);           \
                    }                                                                           \
                }                                                                               \
                if (tail) {                                                                     \
                    VT a[KB];                                                                   \
                    _Pragma("GCC unroll 8")                                                     \
                    for (int i = 0; i < KB; i++) a[i] = MLOAD(ar[i] + Pv, mt);                  \
                    _Pragma("GCC unroll 8")                                                     \
                    for (int j = 0; j < RB; j++) {                                              \
                        VT b = MLOAD(br[j] + Pv, mt);                                           \
                        _Pragma("GCC unroll 8")                                                 \
                        for (int i = 0; i < KB; i++) c[i][j] = FMA(a[i], b, c[i][j]);           \
                    }                                                                           \
                }                                                                               \
                _Pragma("GCC unroll 8")                                                         \
                for (int i = 0; i < KB; i++) {                                                  \
                    _Pragma("GCC unroll 8")                                                     \
                    for (int j = 0; j < RB; j++)                                                \
                        if (k0 + i < K && r0 + j < R)                                           \
                            gwt[(k0 + i) * R + r0 + j] += HSUM(c[i][j]);                        \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}
#define FC_MK512_16(n) ((__mmask16)((1u << (n)) - 1))
#define FC_MK512_8(n) ((__mmask8)((1u << (n)) - 1))
FC_T512 static inline float fc_hsum_ps512(__m512 v) { return _mm512_reduce_add_ps(v); }
FC_T512 static inline double fc_hsum_pd512(__m512d v) { return _mm512_reduce_add_pd(v); }
FC_T256 static inline __m256i fc_mk256_32(ptrdiff_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FC_T256 static inline __m256i fc_mk256_64(ptrdiff_t n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)n), _mm256_setr_epi64x(0, 1, 2, 3));
}
FC_T256 static inline float fc_hsum_ps256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
FC_T256 static inline double fc_hsum_pd256(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
FC_WDOT(fc_wdot_f_512, float, __m512, 16, 5, 4, FC_T512, _mm512_loadu_ps, __mmask16,
        FC_MK512_16, FC_MLOAD_PS512, _mm512_fmadd_ps, _mm512_setzero_ps, fc_hsum_ps512)
FC_WDOT(fc_wdot_d_512, double, __m512d, 8, 5, 4, FC_T512, _mm512_loadu_pd, __mmask8,
        FC_MK512_8, FC_MLOAD_PD512, _mm512_fmadd_pd, _mm512_setzero_pd, fc_hsum_pd512)
FC_WDOT(fc_wdot4_f_512, float, __m512, 16, 4, 4, FC_T512, _mm512_loadu_ps, __mmask16,
        FC_MK512_16, FC_MLOAD_PS512, _mm512_fmadd_ps, _mm512_setzero_ps, fc_hsum_ps512)
FC_WDOT(fc_wdot4_d_512, double, __m512d, 8, 4, 4, FC_T512, _mm512_loadu_pd, __mmask8,
        FC_MK512_8, FC_MLOAD_PD512, _mm512_fmadd_pd, _mm512_setzero_pd, fc_hsum_pd512)
FC_WDOT(fc_wdot_f_256, float, __m256, 8, 3, 3, FC_T256, _mm256_loadu_ps, __m256i,
        fc_mk256_32, FC_MLOAD_PS256, _mm256_fmadd_ps, _mm256_setzero_ps, fc_hsum_ps256)
FC_WDOT(fc_wdot_d_256, double, __m256d, 4, 3, 3, FC_T256, _mm256_loadu_pd, __m256i,
        fc_mk256_64, FC_MLOAD_PD256, _mm256_fmadd_pd, _mm256_setzero_pd, fc_hsum_pd256)

/* Columns [p0, p0 + n) of im2col (n <= ld): col[(c, kh, kw), j] =
 * x[c, oh*sH - pH + kh*dH, ow*sW - pW + kw*dW] for the output pixel p0 + j = oh*OW + ow, and 0
 * outside the image; rows ld apart.  The forward convolution makes one block of columns at a
 * time into a buffer that stays in L2 and multiplies it at once; the backward pass makes all
 * columns.  Stride-1 columns are copied by masked vector loads (lanes outside the image read
 * nothing and give 0), stride-2 ones by two such loads and a permute of their even lanes
 * (EVEN); other strides element by element.  Whole vectors are stored where they
 * stay inside the row's ld values (later segments overwrite the excess), masked ones at the
 * row's end. */
#define FC_IM2COL_COLS(NAME, T, VT, LANES, TGT, MTYPE, MK, MLOADZ, MSTORE, STOREU, ZERO, EVEN)   \
TGT static void NAME(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W, ptrdiff_t kH,          \
                     ptrdiff_t kW, ptrdiff_t sH, ptrdiff_t sW, ptrdiff_t pH, ptrdiff_t pW,      \
                     ptrdiff_t dH, ptrdiff_t dW, ptrdiff_t OW, ptrdiff_t p0, ptrdiff_t n,       \
                     T* col, ptrdiff_t ld) {                                                    \
    ptrdiff_t oh0 = p0 / OW, ow00 = p0 % OW;                                                    \
    for (ptrdiff_t kw = 0; kw < kW; kw++) {                                                     \
        ptrdiff_t off = kw * dW - pW, lo, hi;                                                   \
        /* output columns ow with 0 <= ow*sW + off < W: [lo, hi) */                             \
        if (sW == 1) {                                                                          \
            lo = off < 0 ? -off : 0;                                                            \
            hi = W - off;                                                                       \
        } else {                                                                                \
            lo = off < 0 ? (-off + sW - 1) / sW : 0;                                            \
            hi = W - off > 0 ? (W - off + sW - 1) / sW : 0;                                     \
        }                                                                                       \
        hi = hi < OW ? hi : OW;                                                                 \
        hi = hi < lo ? lo : hi;                                                                 \
        for (ptrdiff_t c = 0; c < C; c++)                                                       \
            for (ptrdiff_t kh = 0; kh < kH; kh++) {                                             \
                T* dst = col + ((c * kH + kh) * kW + kw) * ld;                                  \
                ptrdiff_t j = 0, oh = oh0, ow0 = ow00;                                          \
                while (j < n) {                                                                 \
                    ptrdiff_t seg = OW - ow0 < n - j ? OW - ow0 : n - j;                        \
                    ptrdiff_t ih = oh * sH - pH + kh * dH;                                      \
                    const T* src = x + (c * H + ih) * W;                                        \
                    if (ih < 0 || ih >= H || hi == lo) {                                        \
                        for (ptrdiff_t q = 0; q < seg; q += LANES) {                            \
                            if (j + q + LANES <= ld)                                            \
                                STOREU(dst + j + q, ZERO);                                      \
                            else                                                                \
                                MSTORE(dst + j + q, MK(0, seg - q), ZERO);                      \
                        }                                                                       \
                    } else if (sW == 1) {                                                       \
                        for (ptrdiff_t q = 0; q < seg; q += LANES) {                            \
                            ptrdiff_t a = ow0 + q;                                              \
                            ptrdiff_t b = hi - a < seg - q ? hi - a : seg - q;                  \
                            VT v = MLOADZ(src + (a + off), MK(lo - a, b));                      \
                            if (j + q + LANES <= ld)                                            \
                                STOREU(dst + j + q, v);                                         \
                            else                                                                \
                                MSTORE(dst + j + q, MK(0, seg - q), v);                         \
                        }                                                                       \
                    } else if (sW == 2) {                                                       \
                        for (ptrdiff_t q = 0; q < seg; q += LANES) {                            \
                            ptrdiff_t a = ow0 + q;                                              \
                            ptrdiff_t b = hi - a < seg - q ? hi - a : seg - q;                  \
                            ptrdiff_t e0 = 2 * (lo - a), e1 = 2 * b - 1;                        \
                            const T* s2 = src + (2 * a + off);                                  \
                            VT v = EVEN(MLOADZ(s2, MK(e0, e1)),                                 \
                                        MLOADZ(s2 + LANES, MK(e0 - LANES, e1 - LANES)));        \
                            if (j + q + LANES <= ld)                                            \
                                STOREU(dst + j + q, v);                                         \
                            else                                                                \
                                MSTORE(dst + j + q, MK(0, seg - q), v);                         \
                        }                                                                       \
                    } else {                                                                    \
                        for (ptrdiff_t q = 0; q < seg; q++) {                                   \
                            ptrdiff_t ow = ow0 + q;                                             \
                            dst[j + q] = (ow >= lo && ow < hi) ? src[ow * sW + off] : (T)0;     \
                        }                                                                       \
                    }                                                                           \
                    j += seg;                                                                   \
                    oh++;                                                                       \
                    ow0 = 0;                                                                    \
                }                                                                               \
            }                                                                                   \
    }                                                                                           \
}

/* A vector of im2col values from the padded rows: LANES consecutive columns for stride 1, the
 * even lanes of 2 * LANES for stride 2 (sW is the caller's) */
#define FC_PAD_LOAD(SRC, LANES, LOADU, EVEN)                                                    \
    (sW == 1 ? LOADU(SRC) : EVEN(LOADU(SRC), LOADU((SRC) + LANES)))
/* seg values from src (in the padded rows) to dst + j: whole vectors where they stay within
 * the row's ld values (the excess is overwritten by the next segment or unused), else masked */
#define FC_PAD_SEGMENT(SRC, SEG, VT, LANES, LOADU, EVEN, STOREU, MSTORE, MK)                    \
    for (ptrdiff_t q = 0; q < (SEG); q += LANES) {                                              \
        VT v = FC_PAD_LOAD((SRC) + q * sW, LANES, LOADU, EVEN);                                 \
        if (j + q + LANES <= ld)                                                                \
            STOREU(dst + j + q, v);                                                             \
        else                                                                                    \
            MSTORE(dst + j + q, MK(0, (SEG) - q), v);                                           \
    }
#define FC_PAD_VALS 4096
/* (FC_NO_LIBCALLS, in _simd.h: gcc turns the short copy loops below into memcpy calls, a
   libc call per 14-value row) */
/* The same columns for stride 1 or 2 along the width, through a zero-padded copy of the input
 * rows the columns need, one channel at a time (FC_PAD_VALS values, stays in L1): every segment
 * is then one unmasked load (two and an even-lane permute for stride 2) and one store, with no
 * bounds arithmetic.  Segments are short on small images (a 14-wide output row: one vector), and
 * there the masked path's per-segment set-up was most of im2col (LeNet's conv2: 26 % of the
 * convolution).  Returns 0 (nothing written) when the rows do not fit. */
#define FC_IM2COL_PADDED(NAME, T, VT, LANES, TGT, MTYPE, MK, MLOADZ, MSTORE, STOREU, LOADU, EVEN) \
TGT FC_NO_LIBCALLS static int NAME(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,          \
                    ptrdiff_t kH, ptrdiff_t kW, ptrdiff_t sH, ptrdiff_t sW, ptrdiff_t pH,       \
                    ptrdiff_t pW, ptrdiff_t dH, ptrdiff_t dW, ptrdiff_t OW, ptrdiff_t p0,       \
                    ptrdiff_t n, T* col, ptrdiff_t ld) {                                        \
    T buf[FC_PAD_VALS];                                                                         \
    ptrdiff_t oh0 = p0 / OW, ow00 = p0 % OW, oh1 = (p0 + n - 1) / OW;                           \
    ptrdiff_t R = (oh1 - oh0) * sH + (kH - 1) * dH + 1, ih0 = oh0 * sH - pH;                    \
    ptrdiff_t Wp = (OW - 1) * sW + (kW - 1) * dW + 1;   /* the widest tap: the right padding */ \
    Wp = Wp > W + pW ? Wp : W + pW;                     /* may be larger than the left one  */ \
    if (!fc_im2col_pad_on || (sW != 1 && sW != 2) || n <= 0 || R * Wp + 2 * LANES > FC_PAD_VALS) \
        return 0;                                                                               \
    ptrdiff_t rs = sH * Wp, nv = (OW + LANES - 1) / LANES;  /* vectors in a whole row */      \
    /* padding columns and rows outside the image stay zero for every channel: zeroed once */ \
    memset(buf, 0, sizeof(T) * (size_t)(R * Wp + 2 * LANES));                                 \
    ptrdiff_t r0 = ih0 < 0 ? -ih0 : 0, r1 = H - ih0 < R ? H - ih0 : R;  /* rows in the image */ \
    for (ptrdiff_t c = 0; c < C; c++) {                                                         \
        for (ptrdiff_t r = r0; r < r1; r++) {                                                   \
            T* b = buf + r * Wp + pW;                                                           \
            const T* xr = x + (c * H + ih0 + r) * W;                                            \
            ptrdiff_t w = 0;                                                                    \
            for (; w + LANES <= W; w += LANES)                                                  \
                STOREU(b + w, LOADU(xr + w));                                                   \
            if (w < W)                                                                          \
                MSTORE(b + w, MK(0, W - w), MLOADZ(xr + w, MK(0, W - w)));                      \
        }                                                                                       \
        for (ptrdiff_t kh = 0; kh < kH; kh++)                                                   \
            for (ptrdiff_t kw = 0; kw < kW; kw++) {                                             \
                T* dst = col + ((c * kH + kh) * kW + kw) * ld;                                  \
                const T* src = buf + kh * dH * Wp + kw * dW;        /* row oh0, column 0 */     \
                ptrdiff_t j = 0;                                                                \
                if (ow00 > 0) {                                     /* a partial first row */   \
                    ptrdiff_t seg = OW - ow00 < n ? OW - ow00 : n;                              \
                    FC_PAD_SEGMENT(src + ow00 * sW, seg, VT, LANES, LOADU, EVEN, STOREU,      \
                                   MSTORE, MK);                                                 \
                    j = seg;                                                                    \
                    src += rs;                                                                  \
                }                                                                               \
                for (; j + OW <= n && j + nv * LANES <= ld; j += OW, src += rs)   /* whole */   \
                    for (ptrdiff_t q = 0; q < nv * LANES; q += LANES)         /* rows */        \
                        STOREU(dst + j + q, FC_PAD_LOAD(src + q * sW, LANES, LOADU, EVEN));   \
                for (; j < n; src += rs) {                          /* the rest, with masks */  \
                    ptrdiff_t seg = OW < n - j ? OW : n - j;                                    \
                    FC_PAD_SEGMENT(src, seg, VT, LANES, LOADU, EVEN, STOREU, MSTORE, MK);   \
                    j += seg;                                                                   \
                }                                                                               \
            }                                                                                   \
    }                                                                                           \
    return 1;                                                                                   \
}

/* masks of lanes [a, b) (clipped to the vector) */
static inline __mmask16 fc_lanes16(ptrdiff_t a, ptrdiff_t b) {
    a = a < 0 ? 0 : a;
    b = b > 16 ? 16 : b;
    return b <= a ? (__mmask16)0 : (__mmask16)(((1u << (b - a)) - 1) << a);
}
static inline __mmask8 fc_lanes8(ptrdiff_t a, ptrdiff_t b) {
    a = a < 0 ? 0 : a;
    b = b > 8 ? 8 : b;
    return b <= a ? (__mmask8)0 : (__mmask8)(((1u << (b - a)) - 1) << a);
}
FC_T256 static inline __m256i fc_lanes_i32(ptrdiff_t a, ptrdiff_t b) {
    a = a < 0 ? 0 : a > 8 ? 8 : a;
    b = b < 0 ? 0 : b > 8 ? 8 : b;
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)a), idx),
                               _mm256_cmpgt_epi32(_mm256_set1_epi32((int)b), idx));
}
FC_T256 static inline __m256i fc_lanes_i64(ptrdiff_t a, ptrdiff_t b) {
    a = a < 0 ? 0 : a > 4 ? 4 : a;
    b = b < 0 ? 0 : b > 4 ? 4 : b;
    __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_andnot_si256(_mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)a), idx),
                               _mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)b), idx));
}
/* the even lanes of the pair (v0, v1), in order: elements 0, 2, 4, ... of v0 then of v1 */
#define FC_EVEN_PS512(v0, v1) _mm512_permutex2var_ps((v0), _mm512_setr_epi32(                 \
    0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), (v1))
#define FC_EVEN_PD512(v0, v1) _mm512_permutex2var_pd((v0), _mm512_setr_epi64(                 \
    0, 2, 4, 6, 8, 10, 12, 14), (v1))
#define FC_EVEN_PS256(v0, v1) _mm256_castpd_ps(_mm256_permute4x64_pd(                         \
    _mm256_castps_pd(_mm256_shuffle_ps((v0), (v1), 0x88)), 0xD8))
#define FC_EVEN_PD256(v0, v1) _mm256_permute4x64_pd(_mm256_unpacklo_pd((v0), (v1)), 0xD8)
FC_IM2COL_COLS(fc_im2colp_f_512, float, __m512, 16, FC_T512, __mmask16, fc_lanes16,
                FC_MLOAD_PS512, FC_MSTORE_PS512, _mm512_storeu_ps, _mm512_setzero_ps(),
                FC_EVEN_PS512)
FC_IM2COL_COLS(fc_im2colp_d_512, double, __m512d, 8, FC_T512, __mmask8, fc_lanes8,
                FC_MLOAD_PD512, FC_MSTORE_PD512, _mm512_storeu_pd, _mm512_setzero_pd(),
                FC_EVEN_PD512)
FC_IM2COL_COLS(fc_im2colp_f_256, float, __m256, 8, FC_T256, __m256i, fc_lanes_i32,
                FC_MLOAD_PS256, FC_MSTORE_PS256, _mm256_storeu_ps, _mm256_setzero_ps(),
                FC_EVEN_PS256)
FC_IM2COL_COLS(fc_im2colp_d_256, double, __m256d, 4, FC_T256, __m256i, fc_lanes_i64,
                FC_MLOAD_PD256, FC_MSTORE_PD256, _mm256_storeu_pd, _mm256_setzero_pd(),
                FC_EVEN_PD256)
FC_IM2COL_PADDED(fc_im2colp_f_512_pad, float, __m512, 16, FC_T512, __mmask16, fc_lanes16,
                 FC_MLOAD_PS512, FC_MSTORE_PS512, _mm512_storeu_ps, _mm512_loadu_ps,
                 FC_EVEN_PS512)
FC_IM2COL_PADDED(fc_im2colp_d_512_pad, double, __m512d, 8, FC_T512, __mmask8, fc_lanes8,
                 FC_MLOAD_PD512, FC_MSTORE_PD512, _mm512_storeu_pd, _mm512_loadu_pd,
                 FC_EVEN_PD512)
FC_IM2COL_PADDED(fc_im2colp_f_256_pad, float, __m256, 8, FC_T256, __m256i, fc_lanes_i32,
                 FC_MLOAD_PS256, FC_MSTORE_PS256, _mm256_storeu_ps, _mm256_loadu_ps,
                 FC_EVEN_PS256)
FC_IM2COL_PADDED(fc_im2colp_d_256_pad, double, __m256d, 4, FC_T256, __m256i, fc_lanes_i64,
                 FC_MLOAD_PD256, FC_MSTORE_PD256, _mm256_storeu_pd, _mm256_loadu_pd,
                 FC_EVEN_PD256)

static int fc_gemm_init(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        fc_gemm_ok = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        fc_gemm_ok = 1;
    fc_gemm_on = fc_gemm_ok;
    return fc_gemm_on;
}
#else
static int fc_gemm_init(void) { return 0; }
#endif

/* Level in use: 0 (BLAS), 1 (AVX2+FMA), 2 (AVX-512F); fc_gemm_set(level) caps it at what the
 * CPU has and returns the level now in use (for tests and benchmarks, while no kernel runs). */
static int fc_gemm_set(int level) {
    fc_gemm_on = level < fc_gemm_ok ? (level < 0 ? 0 : level) : fc_gemm_ok;
    return fc_gemm_on;
}
static int fc_gemm_level(void) { return fc_gemm_on; }

/* Columns of im2col (FC_IM2COL_COLS) at the current level (> 0). */
#define FC_IM2COLP_DISPATCH(NAME, T, F512, F256)                                                \
static void NAME(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W, ptrdiff_t kH, ptrdiff_t kW, \
                 ptrdiff_t sH, ptrdiff_t sW, ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t dH,          \
                 ptrdiff_t dW, ptrdiff_t OW, ptrdiff_t p0, ptrdiff_t n, T* col, ptrdiff_t ld) { \
    FC_IM2COLP_CALL(F512, F256)                                                                 \
}
#ifdef FC_HAVE_GEMM
#define FC_IM2COLP_CALL(F512, F256)                                                             \
    if (fc_gemm_on == 2) {                                                                      \
        if (!F512##_pad(x, C, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OW, p0, n, col, ld))        \
            F512(x, C, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OW, p0, n, col, ld);               \
    } else if (fc_gemm_on == 1) {                                                               \
        if (!F256##_pad(x, C, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OW, p0, n, col, ld))        \
            F256(x, C, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OW, p0, n, col, ld);               \
    }
#else
#define FC_IM2COLP_CALL(F512, F256)
#endif
FC_IM2COLP_DISPATCH(fc_im2col_panel_f, float, fc_im2colp_f_512, fc_im2colp_f_256)
FC_IM2COLP_DISPATCH(fc_im2col_panel_d, double, fc_im2colp_d_512, fc_im2colp_d_256)

/* Rows per panel of packed A at the current level (0: no own GEMM) */
static int fc_gemm_mr(void) { return fc_gemm_on == 2 ? 8 : fc_gemm_on == 1 ? 6 : 0; }
/* Columns per panel of C: threads split C's columns at multiples of this */
static ptrdiff_t fc_gemm_nr(int dbl) {
    return fc_gemm_on == 2 ? (dbl ? 16 : 32) : fc_gemm_on == 1 ? (dbl ? 8 : 16) : 1;
}
/* Values in A packed for the current level */
static ptrdiff_t fc_gemm_packed_size(ptrdiff_t M, ptrdiff_t K) {
    int mr = fc_gemm_mr();
    return mr ? (M + mr - 1) / mr * mr * K : 0;
}

/* Pack A (M x K; element (i, k) at A[i * rs + k * cs]: rs = lda, cs = 1 for A, rs = 1,
 * cs = lda for a transposed one) into panels of MR rows: Ap[p][k][r] = A[p*MR + r, k], zero
 * past M. */
#define FC_PACK_A(NAME, T, TRANSPOSE)                                                           \
static void NAME(const T* A, ptrdiff_t rs, ptrdiff_t cs, ptrdiff_t M, ptrdiff_t K, T* Ap) {    \
    int mr = fc_gemm_mr();                                                                      \
    for (ptrdiff_t i = 0; i < M; i += mr) {                                                     \
        T* dst = Ap + i * K;                                                                    \
        int rows = M - i < mr ? (int)(M - i) : mr;                                              \
        if (rows < mr)                                                                          \
            memset(dst, 0, sizeof(T) * (size_t)mr * (size_t)K);                                \
        if (cs == 1 && rows == mr) {   /* a whole panel from contiguous rows: a transpose */    \
            TRANSPOSE(A + i * rs, mr, K, rs, dst, mr);                                          \
        } else if (cs == 1) {       /* rows of A contiguous: read them one by one */            \
            for (int r = 0; r < rows; r++) {                                                    \
                const T* a = A + (i + r) * rs;                                                  \
                for (ptrdiff_t k = 0; k < K; k++)                                               \
                    dst[k * mr + r] = a[k];                                                     \
            }                                                                                   \
        } else {                    /* columns of A contiguous (rs == 1) or neither */          \
            for (ptrdiff_t k = 0; k < K; k++) {                                                 \
                const T* a = A + i * rs + k * cs;                                               \
                for (int r = 0; r < rows; r++)                                                  \
                    dst[k * mr + r] = a[r * rs];                                                \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}


/* C[:, n0:n1] = Ap @ B[:, n0:n1] + bias (acc = 0; bias NULL: no bias) or C += Ap @ B (acc = 1);
 * acc | FC_GEMM_RELU: then C = max(C, 0) (NaN kept, -0 -> +0), applied as C is stored.
 * Only callable when fc_gemm_level() > 0, with Ap packed at that level. */
static void fc_gemm_f(ptrdiff_t M, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t K, const float* Ap,
                      const float* B, ptrdiff_t ldb, float* C, ptrdiff_t ldc, const float* bias,
                      int acc) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2)
        fc_gemm_f_512(M, n0, n1, K, Ap, 0, B, ldb, C, ldc, bias, acc, NULL);
    else if (fc_gemm_on == 1)
        fc_gemm_f_256(M, n0, n1, K, Ap, 0, B, ldb, C, ldc, bias, acc, NULL);
#endif
}
static void fc_gemm_d(ptrdiff_t M, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t K, const double* Ap,
                      const double* B, ptrdiff_t ldb, double* C, ptrdiff_t ldc,
                      const double* bias, int acc) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2)
        fc_gemm_d_512(M, n0, n1, K, Ap, 0, B, ldb, C, ldc, bias, acc, NULL);
    else if (fc_gemm_on == 1)
        fc_gemm_d_256(M, n0, n1, K, Ap, 0, B, ldb, C, ldc, bias, acc, NULL);
#endif
}

/* gwt (K x R) += A (K x P) @ B^T by dot products (FC_WDOT); only when fc_gemm_level() > 0 */
static void fc_wdot_f(ptrdiff_t K, ptrdiff_t R, ptrdiff_t P, const float* A, ptrdiff_t lda,
                      const ptrdiff_t* bo, const float* B, ptrdiff_t ldb, float* gwt) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2 && (K + 4) / 5 * 5 > (K + 3) / 4 * 4)    /* fewer padding rows */
        fc_wdot4_f_512(K, R, P, A, lda, bo, B, ldb, gwt);
    else if (fc_gemm_on == 2)
        fc_wdot_f_512(K, R, P, A, lda, bo, B, ldb, gwt);
    else if (fc_gemm_on == 1)
        fc_wdot_f_256(K, R, P, A, lda, bo, B, ldb, gwt);
#endif
}
static void fc_wdot_d(ptrdiff_t K, ptrdiff_t R, ptrdiff_t P, const double* A, ptrdiff_t lda,
                      const ptrdiff_t* bo, const double* B, ptrdiff_t ldb, double* gwt) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2 && (K + 4) / 5 * 5 > (K + 3) / 4 * 4)    /* fewer padding rows */
        fc_wdot4_d_512(K, R, P, A, lda, bo, B, ldb, gwt);
    else if (fc_gemm_on == 2)
        fc_wdot_d_512(K, R, P, A, lda, bo, B, ldb, gwt);
    else if (fc_gemm_on == 1)
        fc_wdot_d_256(K, R, P, A, lda, bo, B, ldb, gwt);
#endif
}

/* dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols: grad_out's block transposed
 * for the weight gradient's GEMM, by 8x8 (float) or 4x4 (double) register transposes (a
 * scalar loop, one store every ldd values, took 2/3 of LeNet conv1's weight gradient). */
#ifdef FC_HAVE_GEMM
/* o[j * 6 + r] = s[r * lds + j] for r < 6, j < 8, and 2 more values past o + 48 (the caller's
 * next store overwrites them): an AVX2 weight panel of 6 rows, as fc_tr8x8_ps with 2 zero rows,
 * the stores in increasing order */
FC_T256 static inline void fc_tr6x8_ps(const float* s, ptrdiff_t lds, float* o) {
    const __m256 z = _mm256_setzero_ps();
    fc_tr8x8_regs(_mm256_loadu_ps(s), _mm256_loadu_ps(s + lds), _mm256_loadu_ps(s + 2 * lds),
                  _mm256_loadu_ps(s + 3 * lds), _mm256_loadu_ps(s + 4 * lds),
                  _mm256_loadu_ps(s + 5 * lds), z, z, o, 6);
}
FC_T256 static void fc_transpose_f_256(const float* src, ptrdiff_t rows, ptrdiff_t cols,
                                       ptrdiff_t lds, float* dst, ptrdiff_t ldd) {
    ptrdiff_t i = 0, j;
    if (rows == 6 && ldd == 6) {    /* an AVX2 panel of A (was all scalar: 13 % of a batch-1 */
        /* 5x5 32->64 on 14x14 packing its 64 x 800 weights, Zen 3); j + 8 < cols: the */
        /* block's 2 extra values land in column j + 8, written after */
        for (j = 0; j + 8 < cols; j += 8)
            fc_tr6x8_ps(src + j, lds, dst + j * 6);
        for (; j < cols; j++)
            for (int r = 0; r < 6; r++) dst[j * 6 + r] = src[r * lds + j];
        return;
    }
    for (; i + 8 <= rows; i += 8) {
        const float* s = src + i * lds;
        for (j = 0; j + 8 <= cols; j += 8)
            fc_tr8x8_ps(s + j, lds, dst + j * ldd + i, ldd);
        for (; j < cols; j++)
            for (int r = 0; r < 8; r++) dst[j * ldd + i + r] = s[r * lds + j];
    }
    for (; i < rows; i++)
        for (j = 0; j < cols; j++) dst[j * ldd + i] = src[i * lds + j];
}
FC_T256 static void fc_transpose_d_256(const double* src, ptrdiff_t rows, ptrdiff_t cols,
                                       ptrdiff_t lds, double* dst, ptrdiff_t ldd) {
    ptrdiff_t i = 0, j;
    for (; i + 4 <= rows; i += 4) {
        const double* s = src + i * lds;
        for (j = 0; j + 4 <= cols; j += 4) {
            __m256d r0 = _mm256_loadu_pd(s + j), r1 = _mm256_loadu_pd(s + lds + j);
            __m256d r2 = _mm256_loadu_pd(s + 2 * lds + j), r3 = _mm256_loadu_pd(s + 3 * lds + j);
            __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
            __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
            double* o = dst + j * ldd + i;
            _mm256_storeu_pd(o, _mm256_permute2f128_pd(t0, t2, 0x20));
            _mm256_storeu_pd(o + ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
            _mm256_storeu_pd(o + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
            _mm256_storeu_pd(o + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
        }
        for (; j < cols; j++)
            for (int r = 0; r < 4; r++) dst[j * ldd + i + r] = s[r * lds + j];
    }
    for (; i < rows; i++)
        for (j = 0; j < cols; j++) dst[j * ldd + i] = src[i * lds + j];
}
#endif
static void fc_transpose_f(const float* src, ptrdiff_t rows, ptrdiff_t cols, ptrdiff_t lds,
                           float* dst, ptrdiff_t ldd) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on > 0) {
        fc_transpose_f_256(src, rows, cols, lds, dst, ldd);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < rows; i++)
        for (ptrdiff_t j = 0; j < cols; j++) dst[j * ldd + i] = src[i * lds + j];
}
static void fc_transpose_d(const double* src, ptrdiff_t rows, ptrdiff_t cols, ptrdiff_t lds,
                           double* dst, ptrdiff_t ldd) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on > 0) {
        fc_transpose_d_256(src, rows, cols, lds, dst, ldd);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < rows; i++)
        for (ptrdiff_t j = 0; j < cols; j++) dst[j * ldd + i] = src[i * lds + j];
}

/* (the packing's whole panels are transposes: 8 float rows by 8x8 register transposes; a
 * scalar loop, one store every MR values, was 8 % of a batch-1 Winograd convolution) */
FC_PACK_A(fc_gemm_pack_f, float, fc_transpose_f)
FC_PACK_A(fc_gemm_pack_d, double, fc_transpose_d)

/* Max-pool backward for 3x3 windows, stride 2, one output row (as fc_maxpool33s2_bwd in
 * _simd.h, same argmax rule and the same order of additions, so the same numbers): windows
 * i in [lo, hi) whose columns 2i .. 2i+2 of x0, x1, x2 lie in the rows; gx_r[2i + k] +=
 * g[i] where window i's argmax is tap 3r + k.  AVX-512, LANES windows at a time in one pass:
 * taps k = 0 and 1 are the even and odd lanes of x_r[2i ..), k = 2 the even lanes from
 * 2i + 2; the argmax scan on mask registers; then per row the even columns get tap 0 of
 * window i plus tap 2 of window i - 1 (a one-lane shift), the odd ones tap 1, interleaved
 * and added to gx_r in two vectors.  (gcc's vectorisation of the portable loops, with
 * blendv selects and three separate accumulation passes, took ~13 cycles a window.) */
#define FC_MP33_512(NAME, T, VT, L, MT, MK, LOADU, MLOADZ, STOREU, MSTORE, SET1, PERM, IT,    \
                    SETIDX, EVEN, ODD, ILO, IHI, CMP, MMOV, MZMOV, ADD, SHIFT1)              \
FC_T512 static void NAME(const T* x0, const T* x1, const T* x2, const T* g, ptrdiff_t lo,     \
                         ptrdiff_t hi, T first, T* gx0, T* gx1, T* gx2) {                     \
    const T* xs[3] = {x0, x1, x2};                                                            \
    T* gs[3] = {gx0, gx1, gx2};                                                               \
    const IT ie = SETIDX EVEN, io = SETIDX ODD, il = SETIDX ILO, ih = SETIDX IHI;             \
    VT prev[3] = {SET1((T)0), SET1((T)0), SET1((T)0)};                                        \
    T carry[3] = {0, 0, 0};                                                                   \
    for (ptrdiff_t i = lo; i < hi; i += L) {                                                  \
        ptrdiff_t n = hi - i < L ? hi - i : L;                                                \
        int full = i + L < hi;     /* else masked: read nothing past window hi - 1's taps */   \
        MT ma1 = MK(0, 2 * n + 1), ma2 = MK(0, 2 * n + 1 - L);                                \
        MT mb1 = MK(0, 2 * n - 1), mb2 = MK(0, 2 * n - 1 - L);                                \
        VT m = SET1((T)-INFINITY), s = SET1(first), gv = MLOADZ(MK(0, n), g + i);            \
        VT v[9];                                                                              \
        for (int r = 0; r < 3; r++) {                                                         \
            const T* a = xs[r] + 2 * i;                                                       \
            VT a1 = full ? LOADU(a) : MLOADZ(ma1, a);                                             \
            VT a2 = full ? LOADU(a + L) : MLOADZ(ma2, a + L);                                     \
            VT b1 = full ? LOADU(a + 2) : MLOADZ(mb1, a + 2);                                     \
            VT b2 = full ? LOADU(a + 2 + L) : MLOADZ(mb2, a + 2 + L);                             \
            v[3 * r] = PERM(a1, ie, a2);                                                      \
            v[3 * r + 1] = PERM(a1, io, a2);                                                  \
            v[3 * r + 2] = PERM(b1, ie, b2);                                                  \
        }                                                                                     \
        for (int t = 0; t < 9; t++) {                                                         \
            MT k = CMP(v[t], m, _CMP_GT_OQ) | CMP(v[t], v[t], _CMP_UNORD_Q);                  \
            m = MMOV(m, k, v[t]);                                                             \
            s = MMOV(s, k, SET1((T)t));                                                       \
        }                                                                                     \
        for (int r = 0; r < 3; r++) {                                                         \
            VT c0 = MZMOV(CMP(s, SET1((T)(3 * r)), _CMP_EQ_OQ), gv);                          \
            VT c1 = MZMOV(CMP(s, SET1((T)(3 * r + 1)), _CMP_EQ_OQ), gv);                      \
            VT c2 = MZMOV(CMP(s, SET1((T)(3 * r + 2)), _CMP_EQ_OQ), gv);                      \
            VT e = ADD(c0, SHIFT1(c2, prev[r]));    /* tap 2 of window i - 1 in lane i */     \
            prev[r] = c2;                                                                     \
            T* o = gs[r] + 2 * i;                                                             \
            VT lo2 = PERM(e, il, c1), hi2 = PERM(e, ih, c1);                                  \
            if (full) {                                                                       \
                STOREU(o, ADD(LOADU(o), lo2));                                                \
                STOREU(o + L, ADD(LOADU(o + L), hi2));                                        \
            } else {                                                                          \
                MT w1 = MK(0, 2 * n), w2 = MK(0, 2 * n - L);                                  \
                MSTORE(o, w1, ADD(MLOADZ(w1, o), lo2));                                       \
                MSTORE(o + L, w2, ADD(MLOADZ(w2, o + L), hi2));                               \
                T tmp[L];                                                                     \
                STOREU(tmp, c2);                                                              \
                carry[r] = tmp[n - 1];                                                        \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    if (hi > lo)                                                                              \
        for (int r = 0; r < 3; r++) gs[r][2 * hi] += carry[r];                                \
}
#define FC_MZLOAD_PS(m, p) _mm512_maskz_loadu_ps((m), (p))
#define FC_MZLOAD_PD(m, p) _mm512_maskz_loadu_pd((m), (p))
#define FC_MP33_CMP_PS(a, b, p) _mm512_cmp_ps_mask((a), (b), (p))
#define FC_MP33_CMP_PD(a, b, p) _mm512_cmp_pd_mask((a), (b), (p))
#define FC_MP33_SHIFT_PS(cur, prev) _mm512_castsi512_ps(_mm512_alignr_epi32(                   \
    _mm512_castps_si512(cur), _mm512_castps_si512(prev), 15))
#define FC_MP33_SHIFT_PD(cur, prev) _mm512_castsi512_pd(_mm512_alignr_epi64(                   \
    _mm512_castpd_si512(cur), _mm512_castpd_si512(prev), 7))
#ifdef FC_HAVE_GEMM
FC_MP33_512(fc_mp33_bwd_f_512, float, __m512, 16, __mmask16, fc_lanes16, _mm512_loadu_ps,
            FC_MZLOAD_PS, _mm512_storeu_ps, _mm512_mask_storeu_ps, _mm512_set1_ps,
            _mm512_permutex2var_ps, __m512i, _mm512_setr_epi32,
            (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
            (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
            (0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
            (8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31),
            FC_MP33_CMP_PS, _mm512_mask_mov_ps, _mm512_maskz_mov_ps, _mm512_add_ps,
            FC_MP33_SHIFT_PS)
FC_MP33_512(fc_mp33_bwd_d_512, double, __m512d, 8, __mmask8, fc_lanes8, _mm512_loadu_pd,
            FC_MZLOAD_PD, _mm512_storeu_pd, _mm512_mask_storeu_pd, _mm512_set1_pd,
            _mm512_permutex2var_pd, __m512i, _mm512_setr_epi64,
            (0, 2, 4, 6, 8, 10, 12, 14), (1, 3, 5, 7, 9, 11, 13, 15),
            (0, 8, 1, 9, 2, 10, 3, 11), (4, 12, 5, 13, 6, 14, 7, 15),
            FC_MP33_CMP_PD, _mm512_mask_mov_pd, _mm512_maskz_mov_pd, _mm512_add_pd,
            FC_MP33_SHIFT_PD)
#endif
/* The same kernel at the AVX2 level (LANES 8 float / 4 double windows a pass): the even and
 * odd lanes by in-lane shuffles and a 64-bit cross-lane permute (the third tap as the odd
 * lanes of the columns one on, so that a pass reads nothing past its last window), the argmax
 * as three independent steps (the maximum by a tree of max, the first tap equal to it, the
 * last NaN: a 9-step compare-and-blend scan was a 36-cycle dependency chain a pass), the
 * one-lane shift by a 128-bit permute and a byte align, the interleave by unpacks.  A row's
 * last windows, fewer than LANES, are the last LANES windows again with the columns already
 * done added as + 0; only a row of fewer windows than that goes through copies into stack
 * buffers, its sums added back column by column (maskload / maskstore are slow on AMD).
 * The backward of a 3x3 s2 p1 pool of 16 x 64 x 56 x 56 (Zen 3, one thread, the caller
 * zeroing gx row by row ahead of the windows): float32 6.2 ms with the scan and a copied
 * last pass, 3.3 ms now; float64 8.0 -> 5.0 ms (the portable rows: 9.1-12.1 ms float32). */
#define FC_MP33_256(NAME, T, VT, L, LOADU, STOREU, SET1, EVEN, ODD, SHIFT1, ILO, IHI, CMP,   \
                    BLENDV, AND, MAX, ADD)                                                       \
FC_T256 static void NAME(const T* x0, const T* x1, const T* x2, const T* g, ptrdiff_t lo,      \
                         ptrdiff_t hi, T first, T* gx0, T* gx1, T* gx2) {                      \
    const T* xs[3] = {x0, x1, x2};                                                             \
    T* gs[3] = {gx0, gx1, gx2};                                                                \
    VT prev[3] = {SET1((T)0), SET1((T)0), SET1((T)0)};                                         \
    T xb[3][2 * L + 2], gb[L], ob[2 * L], cb[L], col[2 * L];                                   \
    for (int t = 0; t < 2 * L; t++) col[t] = (T)t;                                             \
    for (ptrdiff_t i = lo; i < hi; i += L) {                                                   \
        ptrdiff_t n = hi - i < L ? hi - i : L, back = 0;                                       \
        int full = n == L;         /* else from copies: read nothing past window hi - 1's */   \
        if (!full && hi - lo >= L) {                                                           \
            /* the last L windows again, the first L - n of them (done) stored as + 0 */       \
            back = L - n;                                                                      \
            i = hi - L;                                                                        \
            n = L;                                                                             \
            full = 1;                                                                          \
        }                                                                                      \
        const T* gp = g + i;                                                                   \
        if (!full) {                                                                           \
            for (int t = 0; t < L; t++) gb[t] = t < n ? g[i + t] : (T)0;                       \
            for (int r = 0; r < 3; r++)                                                        \
                for (int t = 0; t < 2 * L + 2; t++)                                            \
                    xb[r][t] = t <= 2 * n ? xs[r][2 * i + t] : (T)0;                           \
            gp = gb;                                                                           \
        }                                                                                      \
        VT gv = LOADU(gp);                                                                     \
        VT v[9];                                                                               \
        FC_UNROLL for (int r = 0; r < 3; r++) {   /* columns 2i .. 2i + 2L: the third tap from odd    */ \
            const T* a = full ? xs[r] + 2 * i : xb[r];  /* lanes one on, nothing past 2i+2L */ \
            VT a1 = LOADU(a), a2 = LOADU(a + L), b1 = LOADU(a + 1), b2 = LOADU(a + 1 + L);     \
            v[3 * r] = EVEN(a1, a2);                                                           \
            v[3 * r + 1] = ODD(a1, a2);                                                        \
            v[3 * r + 2] = ODD(b1, b2);                                                        \
        }                                                                                      \
        /* the scan's choice (the first maximum, the last NaN, tap first when all are -inf)  \
           by independent steps: the maximum by a tree, the first tap equal to it, the last  \
           NaN, each blend chain one cycle a tap */                                          \
        VT m = MAX(MAX(MAX(v[0], v[1]), MAX(v[2], v[3])),                                     \
                   MAX(MAX(v[4], v[5]), MAX(v[6], v[7])));                                    \
        m = MAX(m, v[8]);          /* (NaN lanes: any value, overruled below) */             \
        VT s = SET1((T)8), sn = SET1((T)-1);                                                   \
        FC_UNROLL for (int t = 7; t >= 0; t--)                                                 \
            s = BLENDV(s, SET1((T)t), CMP(v[t], m, _CMP_EQ_OQ));                               \
        s = BLENDV(s, SET1(first), CMP(m, SET1((T)-INFINITY), _CMP_EQ_OQ));                    \
        FC_UNROLL for (int t = 0; t < 9; t++)                                                  \
            sn = BLENDV(sn, SET1((T)t), CMP(v[t], v[t], _CMP_UNORD_Q));                        \
        s = BLENDV(s, sn, CMP(sn, SET1((T)0), _CMP_GE_OQ));                                    \
        VT keep_lo = CMP(LOADU(col), SET1((T)(2 * back)), _CMP_GE_OQ);                         \
        VT keep_hi = CMP(LOADU(col + L), SET1((T)(2 * back)), _CMP_GE_OQ);                     \
        FC_UNROLL for (int r = 0; r < 3; r++) {                                                \
            VT c0 = AND(CMP(s, SET1((T)(3 * r)), _CMP_EQ_OQ), gv);                             \
            VT c1 = AND(CMP(s, SET1((T)(3 * r + 1)), _CMP_EQ_OQ), gv);                         \
            VT c2 = AND(CMP(s, SET1((T)(3 * r + 2)), _CMP_EQ_OQ), gv);                         \
            VT e = ADD(c0, SHIFT1(c2, prev[r]));    /* tap 2 of window i - 1 in lane i */      \
            prev[r] = c2;                                                                      \
            T* o = gs[r] + 2 * i;                                                              \
            VT lo2 = ILO(e, c1), hi2 = IHI(e, c1);                                             \
            if (full) {                                                                        \
                if (back) {         /* (gx is never -0, so + 0 changes nothing) */             \
                    lo2 = AND(lo2, keep_lo);                                                   \
                    hi2 = AND(hi2, keep_hi);                                                   \
                }                                                                              \
                STOREU(o, ADD(LOADU(o), lo2));                                                 \
                STOREU(o + L, ADD(LOADU(o + L), hi2));                                         \
                if (i + L == hi) {  /* then tap 2 of the last window */                        \
                    STOREU(cb, c2);                                                            \
                    o[2 * L] += cb[L - 1];                                                     \
                }                                                                              \
            } else {                /* 2n columns, then tap 2 of the last window */            \
                STOREU(ob, lo2);                                                               \
                STOREU(ob + L, hi2);                                                           \
                STOREU(cb, c2);                                                                \
                for (ptrdiff_t t = 0; t < 2 * n; t++) o[t] += ob[t];                           \
                o[2 * n] += cb[n - 1];                                                         \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}
#ifdef FC_HAVE_GEMM
/* the odd lanes, as FC_EVEN_PS256 / PD256 (above) the even ones */
#define FC_ODD_PS256(a, b) _mm256_castpd_ps(_mm256_permute4x64_pd(                             \
    _mm256_castps_pd(_mm256_shuffle_ps((a), (b), 0xDD)), 0xD8))
#define FC_ODD_PD256(a, b) _mm256_permute4x64_pd(_mm256_unpackhi_pd((a), (b)), 0xD8)
/* [prev_last cur_0 .. cur_{L-2}] */
#define FC_SHIFT1_PS256(cur, prev) _mm256_castsi256_ps(_mm256_alignr_epi8(                     \
    _mm256_castps_si256(cur),                                                                  \
    _mm256_castps_si256(_mm256_permute2f128_ps((prev), (cur), 0x21)), 12))
#define FC_SHIFT1_PD256(cur, prev) _mm256_castsi256_pd(_mm256_alignr_epi8(                     \
    _mm256_castpd_si256(cur),                                                                  \
    _mm256_castpd_si256(_mm256_permute2f128_pd((prev), (cur), 0x21)), 8))
/* [e_0 c_0 e_1 c_1 ...]: the first and the second half of the interleave */
#define FC_ILO_PS256(e, c) _mm256_permute2f128_ps(_mm256_unpacklo_ps((e), (c)),               \
                                                  _mm256_unpackhi_ps((e), (c)), 0x20)
#define FC_IHI_PS256(e, c) _mm256_permute2f128_ps(_mm256_unpacklo_ps((e), (c)),               \
                                                  _mm256_unpackhi_ps((e), (c)), 0x31)
#define FC_ILO_PD256(e, c) _mm256_permute2f128_pd(_mm256_unpacklo_pd((e), (c)),               \
                                                  _mm256_unpackhi_pd((e), (c)), 0x20)
#define FC_IHI_PD256(e, c) _mm256_permute2f128_pd(_mm256_unpacklo_pd((e), (c)),               \
                                                  _mm256_unpackhi_pd((e), (c)), 0x31)
FC_MP33_256(fc_mp33_bwd_f_256, float, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps,
            _mm256_set1_ps, FC_EVEN_PS256,
            FC_ODD_PS256, FC_SHIFT1_PS256, FC_ILO_PS256, FC_IHI_PS256, _mm256_cmp_ps,
            _mm256_blendv_ps, _mm256_and_ps, _mm256_max_ps, _mm256_add_ps)
FC_MP33_256(fc_mp33_bwd_d_256, double, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd,
            _mm256_set1_pd, FC_EVEN_PD256,
            FC_ODD_PD256, FC_SHIFT1_PD256, FC_ILO_PD256, FC_IHI_PD256, _mm256_cmp_pd,
            _mm256_blendv_pd, _mm256_and_pd, _mm256_max_pd, _mm256_add_pd)
#endif
/* 1: done by the AVX-512 kernel (GEMM level 2) or the AVX2 one (level 1); 0: the caller runs the portable rows */
static int fc_mp33_bwd_f(const float* x0, const float* x1, const float* x2, const float* g,
                         ptrdiff_t lo, ptrdiff_t hi, float first, float* gx0, float* gx1,
                         float* gx2) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2) {
        fc_mp33_bwd_f_512(x0, x1, x2, g, lo, hi, first, gx0, gx1, gx2);
        return 1;
    }
    if (fc_gemm_on == 1) {
        fc_mp33_bwd_f_256(x0, x1, x2, g, lo, hi, first, gx0, gx1, gx2);
        return 1;
    }
#endif
    return 0;
}
static int fc_mp33_bwd_d(const double* x0, const double* x1, const double* x2,
                         const double* g, ptrdiff_t lo, ptrdiff_t hi, double first,
                         double* gx0, double* gx1, double* gx2) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2) {
        fc_mp33_bwd_d_512(x0, x1, x2, g, lo, hi, first, gx0, gx1, gx2);
        return 1;
    }
    if (fc_gemm_on == 1) {
        fc_mp33_bwd_d_256(x0, x1, x2, g, lo, hi, first, gx0, gx1, gx2);
        return 1;
    }
#endif
    return 0;
}

/* Max-pool backward for 2x2 windows, stride 2, one output row (as fc_maxpool22_bwd in _simd.h:
 * the same argmax rule, so the same numbers): gx0/gx1[2i], [2i + 1] = g[i] at window i's
 * argmax among x0[2i], x0[2i + 1], x1[2i], x1[2i + 1] (first maximum wins), 0 elsewhere;
 * returns nonzero when a window holds a NaN (the caller redoes the row).  AVX-512, LANES
 * windows at a time: the taps are the even and odd lanes of two vectors per row, the argmax
 * is kept in mask registers, and the results are interleaved back into two vectors per row;
 * the last windows with masks.  (The AVX2 loop ran its tail scalar: on 14x14 planes, 7
 * windows a row, the whole row.) */
#define FC_MP22_512(NAME, T, VT, L, MT, MK, LOADU, MLOADZ, STOREU, MSTORE, PERM, IT, SETIDX,  \
                    EVEN, ODD, ILO, IHI, CMP, MMOV, MZMOV, ADD)                                \
FC_T512 static int NAME(const T* x0, const T* x1, const T* g, ptrdiff_t OW, T* gx0, T* gx1) {   \
    const IT ie = SETIDX EVEN, io = SETIDX ODD, il = SETIDX ILO, ih = SETIDX IHI;               \
    MT nan = 0;                                                                                 \
    for (ptrdiff_t i = 0; i < OW; i += L) {                                                     \
        ptrdiff_t n = OW - i < L ? OW - i : L;                                                  \
        MT m1 = MK(0, 2 * n), m2 = MK(0, 2 * n - L), mg = MK(0, n);                             \
        int full = n == L;                                                                      \
        const T* p0 = x0 + 2 * i;                                                               \
        const T* p1 = x1 + 2 * i;                                                               \
        VT u0 = full ? LOADU(p0) : MLOADZ(m1, p0), u1 = full ? LOADU(p0 + L) : MLOADZ(m2, p0 + L); \
        VT w0 = full ? LOADU(p1) : MLOADZ(m1, p1), w1 = full ? LOADU(p1 + L) : MLOADZ(m2, p1 + L); \
        VT a = PERM(u0, ie, u1), b = PERM(u0, io, u1), c = PERM(w0, ie, w1), d = PERM(w0, io, w1); \
        VT gv = full ? LOADU(g + i) : MLOADZ(mg, g + i);                                        \
        MT kb = CMP(b, a, _CMP_GT_OQ);                                                          \
        VT m = MMOV(a, kb, b);                                                                  \
        MT kc = CMP(c, m, _CMP_GT_OQ);                                                          \
        m = MMOV(m, kc, c);                                                                     \
        MT kd = CMP(d, m, _CMP_GT_OQ);                                                          \
        MT wc = kc & ~kd, wb = kb & ~kc & ~kd, wa = ~(kb | kc | kd);                            \
        VT s = ADD(ADD(a, b), ADD(c, d));                                                       \
        nan |= CMP(s, s, _CMP_UNORD_Q);                                                         \
        VT ga = MZMOV(wa, gv), gb = MZMOV(wb, gv), gc = MZMOV(wc, gv), gd = MZMOV(kd, gv);     \
        VT r0 = PERM(ga, il, gb), r1 = PERM(ga, ih, gb);                                        \
        VT q0 = PERM(gc, il, gd), q1 = PERM(gc, ih, gd);                                        \
        if (full) {                                                                             \
            STOREU(gx0 + 2 * i, r0);                                                            \
            STOREU(gx0 + 2 * i + L, r1);                                                        \
            STOREU(gx1 + 2 * i, q0);                                                            \
            STOREU(gx1 + 2 * i + L, q1);                                                        \
        } else {                                                                                \
            MSTORE(gx0 + 2 * i, m1, r0);                                                        \
            MSTORE(gx0 + 2 * i + L, m2, r1);                                                    \
            MSTORE(gx1 + 2 * i, m1, q0);                                                        \
            MSTORE(gx1 + 2 * i + L, m2, q1);                                                    \
        }                                                                                       \
    }                                                                                           \
    return nan != 0;                                                                            \
}
#ifdef FC_HAVE_GEMM
FC_MP22_512(fc_mp22_bwd_f_512, float, __m512, 16, __mmask16, fc_lanes16, _mm512_loadu_ps,
            FC_MZLOAD_PS, _mm512_storeu_ps, _mm512_mask_storeu_ps, _mm512_permutex2var_ps,
            __m512i, _mm512_setr_epi32,
            (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
            (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
            (0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
            (8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31),
            FC_MP33_CMP_PS, _mm512_mask_mov_ps, _mm512_maskz_mov_ps, _mm512_add_ps)
FC_MP22_512(fc_mp22_bwd_d_512, double, __m512d, 8, __mmask8, fc_lanes8, _mm512_loadu_pd,
            FC_MZLOAD_PD, _mm512_storeu_pd, _mm512_mask_storeu_pd, _mm512_permutex2var_pd,
            __m512i, _mm512_setr_epi64,
            (0, 2, 4, 6, 8, 10, 12, 14), (1, 3, 5, 7, 9, 11, 13, 15),
            (0, 8, 1, 9, 2, 10, 3, 11), (4, 12, 5, 13, 6, 14, 7, 15),
            FC_MP33_CMP_PD, _mm512_mask_mov_pd, _mm512_maskz_mov_pd, _mm512_add_pd)
#endif
/* The same at the AVX2 level, LANES (8 float / 4 double) windows a pass: the taps as the even
 * and odd lanes of two vectors per row (in-lane shuffles and a 64-bit permute), the argmax on
 * compare masks, the winners' gradients by and / andnot, interleaved back by unpacks.  A row's
 * last windows, fewer than LANES, are the last LANES windows again (every gx value is stored,
 * not added, so rewriting them changes nothing); a row of fewer windows than that goes through
 * stack copies.  gcc's vectorisation of the portable loop ran its tail scalar, and 14x14 and
 * 28x28 planes (7 and 14 windows a row) are mostly tail: 64x64x14x14 float32 took 1.6 ms
 * against 0.13 ms for the forward (Zen 3). */
#define FC_MP22_256(NAME, T, VT, L, LOADU, STOREU, SET0, SET1, EVEN, ODD, ILO, IHI, CMP,      \
                    BLENDV, AND, ANDNOT, OR, ADD, MOVEMASK)                                           \
FC_T256 FC_NO_LIBCALLS static int NAME(const T* x0, const T* x1, const T* g, ptrdiff_t OW,   \
                                       T* gx0, T* gx1, ptrdiff_t avail_x, ptrdiff_t avail_g) {  \
    VT nan = SET0;                                                                              \
    T xb0[2 * L], xb1[2 * L], gb[L], ob0[2 * L], ob1[2 * L];                                    \
    /* fewer windows than LANES: whole vectors anyway where the plane goes on far enough (the */ \
    /* values read past the row are ignored, those written past it rewritten later), else    */ \
    /* through copies */                                                                        \
    int copy = OW < L && (avail_x < 2 * L || avail_g < L);                                      \
    int part = OW < L;              /* lanes past OW hold no window: not in the NaN flag */     \
    if (copy) {                                                                                 \
        for (int t = 0; t < 2 * L; t++) {                                                       \
            xb0[t] = t < 2 * OW ? x0[t] : (T)0;                                                 \
            xb1[t] = t < 2 * OW ? x1[t] : (T)0;                                                 \
        }                                                                                       \
        for (int t = 0; t < L; t++) gb[t] = t < OW ? g[t] : (T)0;                               \
    }                                                                                           \
    for (ptrdiff_t i = 0; i < OW; i += L) {                                                     \
        if (i + L > OW && !part)                                                                \
            i = OW - L;                       /* the last LANES windows again */                \
        const T* p0 = copy ? xb0 : x0 + 2 * i;                                                  \
        const T* p1 = copy ? xb1 : x1 + 2 * i;                                                  \
        VT u0 = LOADU(p0), u1 = LOADU(p0 + L), w0 = LOADU(p1), w1 = LOADU(p1 + L);              \
        VT a = EVEN(u0, u1), b = ODD(u0, u1), c = EVEN(w0, w1), d = ODD(w0, w1);                \
        VT gv = LOADU(copy ? gb : g + i);                                                       \
        VT kb = CMP(b, a, _CMP_GT_OQ);                                                          \
        VT m = BLENDV(a, b, kb);                                                                \
        VT kc = CMP(c, m, _CMP_GT_OQ);                                                          \
        m = BLENDV(m, c, kc);                                                                   \
        VT kd = CMP(d, m, _CMP_GT_OQ);                                                          \
        VT s = ADD(ADD(a, b), ADD(c, d));                                                       \
        VT un = CMP(s, s, _CMP_UNORD_Q);                                                        \
        if (part) {                                                                             \
            T lane[L];                                                                          \
            for (int t = 0; t < L; t++) lane[t] = (T)t;                                         \
            un = AND(un, CMP(LOADU(lane), SET1((T)OW), _CMP_LT_OQ));                            \
        }                                                                                       \
        nan = OR(nan, un);                                                                      \
        VT ga = ANDNOT(OR(OR(kb, kc), kd), gv), gb_ = AND(ANDNOT(OR(kc, kd), kb), gv);          \
        VT gc = AND(ANDNOT(kd, kc), gv), gd = AND(kd, gv);                                      \
        VT r0 = ILO(ga, gb_), r1 = IHI(ga, gb_), q0 = ILO(gc, gd), q1 = IHI(gc, gd);            \
        T* o0 = copy ? ob0 : gx0 + 2 * i;                                                       \
        T* o1 = copy ? ob1 : gx1 + 2 * i;                                                       \
        STOREU(o0, r0);                                                                         \
        STOREU(o0 + L, r1);                                                                     \
        STOREU(o1, q0);                                                                         \
        STOREU(o1 + L, q1);                                                                     \
    }                                                                                           \
    if (copy)                                                                                   \
        for (ptrdiff_t t = 0; t < 2 * OW; t++) {                                                \
            gx0[t] = ob0[t];                                                                    \
            gx1[t] = ob1[t];                                                                    \
        }                                                                                       \
    return MOVEMASK(nan) != 0;                                                                  \
}
#ifdef FC_HAVE_GEMM
FC_MP22_256(fc_mp22_bwd_f_256, float, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps,
            _mm256_setzero_ps(), _mm256_set1_ps, FC_EVEN_PS256, FC_ODD_PS256, FC_ILO_PS256, FC_IHI_PS256,
            _mm256_cmp_ps, _mm256_blendv_ps, _mm256_and_ps, _mm256_andnot_ps, _mm256_or_ps,
            _mm256_add_ps, _mm256_movemask_ps)
FC_MP22_256(fc_mp22_bwd_d_256, double, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd,
            _mm256_setzero_pd(), _mm256_set1_pd, FC_EVEN_PD256, FC_ODD_PD256, FC_ILO_PD256, FC_IHI_PD256,
            _mm256_cmp_pd, _mm256_blendv_pd, _mm256_and_pd, _mm256_andnot_pd, _mm256_or_pd,
            _mm256_add_pd, _mm256_movemask_pd)
#endif
/* the NaN flag when done by the AVX-512 kernel (GEMM level 2, the AVX-512 loops on, rows of
 * at most one vector of windows); -1: the caller runs the portable/AVX2 one.  A/B of builds
 * (Intel Xeon model 207, 1 / 2 threads): 64x64x14x14 float32 2.6x / 2.5x, float64 1.35x /
 * 1.23x, 64x32x28x28 float32 1.8x / 1.7x; rows of more windows were 0.8-0.98x the AVX2 loop,
 * which then has whole vectors.  avail_x: values of the plane from x1 (and gx1) on, avail_g
 * from g on: how far a row of few windows may be read and written past its end. */
static int fc_mp22_bwd_f(const float* x0, const float* x1, const float* g, ptrdiff_t OW,
                         float* gx0, float* gx1, ptrdiff_t avail_x, ptrdiff_t avail_g) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2 && fc_avx512_on && OW <= 16)
        return fc_mp22_bwd_f_512(x0, x1, g, OW, gx0, gx1);
    if (fc_gemm_on >= 1)
        return fc_mp22_bwd_f_256(x0, x1, g, OW, gx0, gx1, avail_x, avail_g);
#endif
    return -1;
}
static int fc_mp22_bwd_d(const double* x0, const double* x1, const double* g, ptrdiff_t OW,
                         double* gx0, double* gx1, ptrdiff_t avail_x, ptrdiff_t avail_g) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2 && fc_avx512_on && OW <= 8)
        return fc_mp22_bwd_d_512(x0, x1, g, OW, gx0, gx1);
    if (fc_gemm_on >= 1)
        return fc_mp22_bwd_d_256(x0, x1, g, OW, gx0, gx1, avail_x, avail_g);
#endif
    return -1;
}

/* fc_gemm_* with B's row k at B + bo[k]: the forward convolution's im2col rows made once per
 * (channel, column tap) and shared by the kH row taps as shifts of kh * dH * OW columns (stride
 * 1 along the height), kH times fewer im2col values to write (fc_im2col_rows_ok: the own
 * GEMM's AVX-512 and AVX2 levels). */
static int fc_im2col_rows_on = 1;     /* 0: always the whole im2col matrix (tests, A/B) */
static int fc_im2col_rows_ok(void) {
#ifdef FC_HAVE_GEMM
    return fc_gemm_on >= 1 && fc_im2col_rows_on;
#else
    return 0;
#endif
}
/* fc_gemmb_*: C (+)= Ap @ B with B's row k at B + bo[k] (Ap packed; fc_im2col_rows_ok).
 * fc_gemmc_*: C (+)= A @ B with A's row r at A + ao[r] (read in place; fc_im2col_rows_ok). */
#ifdef FC_HAVE_GEMM
#define FC_AT_LEVEL(F, ...)                                                                     \
    do {                                                                                        \
        if (fc_gemm_on == 2) F##_512(__VA_ARGS__);                                              \
        else if (fc_gemm_on == 1) F##_256(__VA_ARGS__);                                         \
    } while (0)
/* the same for the one-row variants (F##_512_1, F##_256_1) */
#define FC_AT_LEVEL1(F, ...)                                                                    \
    do {                                                                                        \
        if (fc_gemm_on == 2) F##_512_1(__VA_ARGS__);                                            \
        else if (fc_gemm_on == 1) F##_256_1(__VA_ARGS__);                                       \
    } while (0)
#else
#define FC_AT_LEVEL(F, ...) do { } while (0)
#define FC_AT_LEVEL1(F, ...) do { } while (0)
#endif
#define FC_GEMM_TABLES(S, T)                                                                    \
static void fc_gemmb_##S(ptrdiff_t M, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t K, const T* Ap,    \
                         const T* B, const ptrdiff_t* bo, T* C, ptrdiff_t ldc, const T* bias,  \
                         int acc) {                                                             \
    FC_AT_LEVEL(fc_gemmb_##S, M, n0, n1, K, Ap, 0, B, 0, C, ldc, bias, acc, bo);               \
}                                                                                               \
static void fc_gemmc_##S(ptrdiff_t M, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t K, const T* A,     \
                         const ptrdiff_t* ao, const T* B, ptrdiff_t ldb, T* C, ptrdiff_t ldc,  \
                         int acc) {                                                             \
    FC_AT_LEVEL(fc_gemmc_##S, M, n0, n1, K, A, 0, B, ldb, C, ldc, NULL, acc, ao);               \
}
FC_GEMM_TABLES(f, float)
FC_GEMM_TABLES(d, double)

/* C[:, n0:n1] (+)= A @ B[:, n0:n1] as fc_gemm_*, with A (M x K) read in place, rows lda
 * apart (no packing: the weight gradient's im2col matrix, whose packing was a quarter of
 * OpenBLAS's time on LeNet's conv2).  Only callable when fc_gemm_level() > 0. */
static void fc_gemma_f(ptrdiff_t M, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t K, const float* A,
                       ptrdiff_t lda, const float* B, ptrdiff_t ldb, float* C, ptrdiff_t ldc,
                       int acc) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2)
        fc_gemma_f_512(M, n0, n1, K, A, lda, B, ldb, C, ldc, NULL, acc, NULL);
    else if (fc_gemm_on == 1)
        fc_gemma_f_256(M, n0, n1, K, A, lda, B, ldb, C, ldc, NULL, acc, NULL);
#endif
}
static void fc_gemma_d(ptrdiff_t M, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t K, const double* A,
                       ptrdiff_t lda, const double* B, ptrdiff_t ldb, double* C, ptrdiff_t ldc,
                       int acc) {
#ifdef FC_HAVE_GEMM
    if (fc_gemm_on == 2)
        fc_gemma_d_512(M, n0, n1, K, A, lda, B, ldb, C, ldc, NULL, acc, NULL);
    else if (fc_gemm_on == 1)
        fc_gemma_d_256(M, n0, n1, K, A, lda, B, ldb, C, ldc, NULL, acc, NULL);
#endif
}

/* Products with few rows: y[r, j] = sum_k x[r * ldx + k] w[j * ldw + k] (+ b[j]) for r < R,
 * j0 <= j < j1, both x and w read in place (nn.Linear's forward on 1-15 rows, w (out, in) as
 * PyTorch stores it).  The GEMM would transpose all of w into strips for a handful of rows, and
 * OpenBLAS's sgemm ran 4 or 8 rows x 3136 @ 3136 x 128 at ~7 GFLOP/s (229 / 279 us, 1 thread,
 * Xeon 2026-12-04).  Blocks of NB rows of x by 4 rows of w, one vector accumulator each (fixed
 * lanes: the sum over k in LANES partial sums, then reduced), a masked last vector; NB up to 6
 * at AVX-512 (24 accumulators, 4 + 1 more of 32 registers), 2 at AVX2 (8 + 4 + 1 of 16). */
#ifdef FC_HAVE_GEMM
#define FC_ROWDOT(NAME, T, VT, LANES, NBMAX, TGT, SETZ, LOADU, MTYPE, MK, MLOADZ, FMA, RED, \
                  PIN)                                                                          \
TGT static inline __attribute__((always_inline)) void NAME##_blk(                              \
        const int NB, const int JB, ptrdiff_t K, const T* restrict x, ptrdiff_t ldx,            \
        const T* restrict w, ptrdiff_t ldw, const T* restrict b, T* restrict y,                 \
        ptrdiff_t ldy, int add) {                                                               \
    VT c[NBMAX][4];                                                                             \
    _Pragma("GCC unroll 8")                                                                     \
    for (int r = 0; r < NB; r++) {                                                              \
        _Pragma("GCC unroll 4")                                                                 \
        for (int i = 0; i < JB; i++) c[r][i] = SETZ();                                          \
    }                                                                                           \
    ptrdiff_t k = 0;                                                                            \
    for (; k + LANES <= K; k += LANES) {                                                        \
        VT wv[4];                                                                               \
        _Pragma("GCC unroll 4")                                                                 \
        for (int i = 0; i < JB; i++) {                                                          \
            wv[i] = LOADU(w + i * ldw + k);                                                     \
            /* in a register: else gcc folds the load into every FMA that uses it, */           \
            /* NB x JB loads per step instead of NB + JB (load-port bound: 45 us for 2 rows */  \
            /* of 3136 x 128, 38 us for 4) */                                                   \
            __asm__("" : "+" PIN(wv[i]));                                                       \
        }                                                                                       \
        _Pragma("GCC unroll 8")                                                                 \
        for (int r = 0; r < NB; r++) {                                                          \
            VT xv = LOADU(x + r * ldx + k);                                                     \
            _Pragma("GCC unroll 4")                                                             \
            for (int i = 0; i < JB; i++) c[r][i] = FMA(xv, wv[i], c[r][i]);                     \
        }                                                                                       \
    }                                                                                           \
    if (k < K) {                                                                                \
        const MTYPE m = MK(0, K - k);                                                           \
        VT wv[4];                                                                               \
        _Pragma("GCC unroll 4")                                                                 \
        for (int i = 0; i < JB; i++) wv[i] = MLOADZ(w + i * ldw + k, m);                        \
        _Pragma("GCC unroll 8")                                                                 \
        for (int r = 0; r < NB; r++) {                                                          \
            VT xv = MLOADZ(x + r * ldx + k, m);                                                 \
            _Pragma("GCC unroll 4")                                                             \
            for (int i = 0; i < JB; i++) c[r][i] = FMA(xv, wv[i], c[r][i]);                     \
        }                                                                                       \
    }                                                                                           \
    _Pragma("GCC unroll 8")                                                                     \
    for (int r = 0; r < NB; r++) {                                                              \
        _Pragma("GCC unroll 4")                                                                 \
        for (int i = 0; i < JB; i++) {                                                          \
            T v = RED(c[r][i]);                                                                 \
            y[r * ldy + i] = add ? y[r * ldy + i] + v : b != NULL ? v + b[i] : v;               \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
/* NAME##_blk for nb (<= NBMAX) rows of x, the row count a constant in each case */         \
TGT static inline __attribute__((always_inline)) void NAME##_nb(                               \
        int nb, const int JB, ptrdiff_t K, const T* x, ptrdiff_t ldx, const T* w,               \
        ptrdiff_t ldw, const T* b, T* y, ptrdiff_t ldy, int add) {                              \
    switch (nb) {                                                                               \
    case 1: NAME##_blk(1, JB, K, x, ldx, w, ldw, b, y, ldy, add); break;                        \
    case 2: NAME##_blk(NBMAX < 2 ? NBMAX : 2, JB, K, x, ldx, w, ldw, b, y, ldy, add); break;    \
    case 3: NAME##_blk(NBMAX < 3 ? NBMAX : 3, JB, K, x, ldx, w, ldw, b, y, ldy, add); break;    \
    case 4: NAME##_blk(NBMAX < 4 ? NBMAX : 4, JB, K, x, ldx, w, ldw, b, y, ldy, add); break;    \
    case 5: NAME##_blk(NBMAX < 5 ? NBMAX : 5, JB, K, x, ldx, w, ldw, b, y, ldy, add); break;    \
    default: NAME##_blk(NBMAX, JB, K, x, ldx, w, ldw, b, y, ldy, add);                          \
    }                                                                                           \
}                                                                                               \
/* One row of x (nn.Linear at batch 1): JB rows of w over all of K (x stays in L1 and w */     \
/* streams row by row), two accumulators per row of w, so 8 FMA chains for 4 rows: NAME (K */   \
/* blocks, one accumulator per row) read LeNet's 3136 x 128 fc1 in 28.6 us, this in 23.5 */     \
/* (Zen 3, weights in L3) */                                                                    \
TGT static inline __attribute__((always_inline)) void NAME##_row1(                             \
        const int JB, ptrdiff_t K, const T* restrict x, const T* restrict w, ptrdiff_t ldw,     \
        const T* restrict b, T* restrict y) {                                                   \
    VT c[4], d[4];                                                                              \
    _Pragma("GCC unroll 4")                                                                     \
    for (int i = 0; i < JB; i++) c[i] = d[i] = SETZ();                                          \
    ptrdiff_t k = 0;                                                                            \
    for (; k + 2 * LANES <= K; k += 2 * LANES) {                                                \
        VT x0 = LOADU(x + k), x1 = LOADU(x + k + LANES);                                        \
        _Pragma("GCC unroll 4")                                                                 \
        for (int i = 0; i < JB; i++) {                                                          \
            c[i] = FMA(x0, LOADU(w + i * ldw + k), c[i]);                                       \
            d[i] = FMA(x1, LOADU(w + i * ldw + k + LANES), d[i]);                               \
        }                                                                                       \
    }                                                                                           \
    if (k + LANES <= K) {                                                                       \
        VT x0 = LOADU(x + k);                                                                   \
        _Pragma("GCC unroll 4")                                                                 \
        for (int i = 0; i < JB; i++) c[i] = FMA(x0, LOADU(w + i * ldw + k), c[i]);              \
        k += LANES;                                                                             \
    }                                                                                           \
    if (k < K) {                                                                                \
        const MTYPE m = MK(0, K - k);                                                           \
        VT x0 = MLOADZ(x + k, m);                                                               \
        _Pragma("GCC unroll 4")                                                                 \
        for (int i = 0; i < JB; i++) d[i] = FMA(x0, MLOADZ(w + i * ldw + k, m), d[i]);          \
    }                                                                                           \
    _Pragma("GCC unroll 4")                                                                     \
    for (int i = 0; i < JB; i++) {                                                              \
        T v = RED(c[i]) + RED(d[i]);                                                            \
        y[i] = b != NULL ? v + b[i] : v;                                                        \
    }                                                                                           \
}                                                                                               \
/* y[j] = x . w[j] (+ b[j]) for j0 <= j < j1, x one row (the sums in another order than */     \
/* NAME's, which keeps that of a larger product in its blocks of one row) */                    \
TGT static void NAME##_1(ptrdiff_t K, const T* x, const T* w, ptrdiff_t ldw, ptrdiff_t j0,     \
                         ptrdiff_t j1, const T* b, T* y) {                                      \
    ptrdiff_t j = j0;                                                                           \
    for (; j + 4 <= j1; j += 4)                                                                 \
        NAME##_row1(4, K, x, w + j * ldw, ldw, b != NULL ? b + j : NULL, y + j);                \
    for (; j < j1; j++)                                                                         \
        NAME##_row1(1, K, x, w + j * ldw, ldw, b != NULL ? b + j : NULL, y + j);                \
}                                                                                               \
TGT static void NAME(ptrdiff_t R, ptrdiff_t K, const T* x, ptrdiff_t ldx, const T* w,          \
                     ptrdiff_t ldw, ptrdiff_t j0, ptrdiff_t j1, const T* b, T* y,               \
                     ptrdiff_t ldy) {                                                           \
    /* K in blocks of KCR values, so that NB rows of x stay in L1 while every row of w */      \
    /* streams past them (whole rows of 3136 floats: 4 rows of x, 50 KiB, were re-read from */  \
    /* L2 for each block of w's rows), and more than NBMAX rows of x re-read w's block */       \
    /* (O x KCR values) from L2, not all of w from L3 */                                        \
    const ptrdiff_t KCR = 4096 / (ptrdiff_t)sizeof(T);                                          \
    for (ptrdiff_t k0 = 0; k0 < K; k0 += KCR) {                                                 \
        const ptrdiff_t kc = K - k0 < KCR ? K - k0 : KCR;                                       \
        for (ptrdiff_t r0 = 0; r0 < R; r0 += NBMAX) {                                           \
            const int nb = R - r0 < NBMAX ? (int)(R - r0) : NBMAX;                              \
            const T* xr = x + r0 * ldx + k0;                                                    \
            T* yr = y + r0 * ldy;                                                               \
            ptrdiff_t j = j0;                                                                   \
            for (; j + 4 <= j1; j += 4)                                                         \
                NAME##_nb(nb, 4, kc, xr, ldx, w + j * ldw + k0, ldw, b != NULL ? b + j : NULL,  \
                          yr + j, ldy, k0 > 0);                                                 \
            for (; j < j1; j++)                                                                 \
                NAME##_nb(nb, 1, kc, xr, ldx, w + j * ldw + k0, ldw, b != NULL ? b + j : NULL,  \
                          yr + j, ldy, k0 > 0);                                                 \
        }                                                                                       \
    }                                                                                           \
}
FC_T512 static inline float fc_red_ps512(__m512 v) { return _mm512_reduce_add_ps(v); }
FC_T512 static inline double fc_red_pd512(__m512d v) { return _mm512_reduce_add_pd(v); }
FC_T256 static inline float fc_red_ps256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
FC_T256 static inline double fc_red_pd256(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
#define FC_MLOADZ_PS512(p, m) _mm512_maskz_loadu_ps((m), (p))
#define FC_MLOADZ_PD512(p, m) _mm512_maskz_loadu_pd((m), (p))
FC_ROWDOT(fc_rowdot_f_512, float, __m512, 16, 6, FC_T512, _mm512_setzero_ps, _mm512_loadu_ps,
          __mmask16, fc_lanes16, FC_MLOADZ_PS512, _mm512_fmadd_ps, fc_red_ps512, "v")
FC_ROWDOT(fc_rowdot_d_512, double, __m512d, 8, 6, FC_T512, _mm512_setzero_pd, _mm512_loadu_pd,
          __mmask8, fc_lanes8, FC_MLOADZ_PD512, _mm512_fmadd_pd, fc_red_pd512, "v")
FC_ROWDOT(fc_rowdot_f_256, float, __m256, 8, 2, FC_T256, _mm256_setzero_ps, _mm256_loadu_ps,
          __m256i, fc_lanes_i32, FC_MLOAD_PS256, _mm256_fmadd_ps, fc_red_ps256, "x")
FC_ROWDOT(fc_rowdot_d_256, double, __m256d, 4, 2, FC_T256, _mm256_setzero_pd, _mm256_loadu_pd,
          __m256i, fc_lanes_i64, FC_MLOAD_PD256, _mm256_fmadd_pd, fc_red_pd256, "x")
#endif
/* Only callable when fc_gemm_level() > 0. */
#define FC_ROWDOT1_PICK(S, T)                                                                   \
static void fc_rowdot1_##S(ptrdiff_t K, const T* x, const T* w, ptrdiff_t ldw, ptrdiff_t j0,    \
                           ptrdiff_t j1, const T* b, T* y) {                                    \
    FC_AT_LEVEL1(fc_rowdot_##S, K, x, w, ldw, j0, j1, b, y);                                    \
}
FC_ROWDOT1_PICK(f, float)
FC_ROWDOT1_PICK(d, double)
static void fc_rowdot_f(ptrdiff_t R, ptrdiff_t K, const float* x, ptrdiff_t ldx, const float* w,
                        ptrdiff_t ldw, ptrdiff_t j0, ptrdiff_t j1, const float* b, float* y,
                        ptrdiff_t ldy) {
    FC_AT_LEVEL(fc_rowdot_f, R, K, x, ldx, w, ldw, j0, j1, b, y, ldy);
}
static void fc_rowdot_d(ptrdiff_t R, ptrdiff_t K, const double* x, ptrdiff_t ldx,
                        const double* w, ptrdiff_t ldw, ptrdiff_t j0, ptrdiff_t j1,
                        const double* b, double* y, ptrdiff_t ldy) {
    FC_AT_LEVEL(fc_rowdot_d, R, K, x, ldx, w, ldw, j0, j1, b, y, ldy);
}

#endif
