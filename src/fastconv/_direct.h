/* fastconv: direct convolution (no im2col) at the AVX-512 and AVX2 levels, for the forward
 * convolutions whose im2col costs most next to the GEMM: kernels 3x3 to 7x7 with stride 2,
 * 5x5 and up (at AVX2 only 5x5 and up: functional._use_direct).
 *
 * A tile is 2 vectors of output channels (32 float / 16 double; AVX2: 16 / 8) x NP output
 * pixels of one output row, summed over all of K = C x kH x kW in registers (2 NP
 * accumulators, NP <= 14; AVX2: NP <= 6, the 16 registers' limit):
 * for each k = (c, kh, kw), two vector loads of the packed weights w[k][0:2 LANES] and NP
 * broadcasts of the input values the NP pixels see through that tap, x_pad[c][r + kh dH]
 * [(ow0 + i) sW + kw dW], each multiplied into both vectors.  The input is read through a
 * zero-padded copy of the rows the tile needs (the caller's), so that no tap needs a bounds
 * check, and the rows of tap k start at an offset from a table (off[k]).  The im2col matrix
 * (K values for every output pixel, 9-49x the input) is never written: perf on a 64->32 5x5
 * convolution of 14x14 images had im2col at 15 % and the own GEMM at 70 % of the time.
 *
 * The sum over k runs in order 0..K-1 with one FMA per k for every output value, as in the
 * own GEMM (whose K blocks only split that order).
 *
 * The sums start at the bias, as in the own GEMM (whose first K block starts there), and the
 * ReLU is the micro-kernels' (NaN kept, -0 -> +0), so the two give the same numbers.  The
 * tile is stored to a small buffer, pixel-major, and written out transposed (channel rows;
 * 8x8 register transposes for float32).
 */
#ifndef FASTCONV_DIRECT_H
#define FASTCONV_DIRECT_H

#include <stddef.h>
#include <string.h>
#include "_gemm.h"      /* FC_HAVE_GEMM, FC_T512, fc_gemm_on */

#define FC_DIRECT_NP 14          /* widest tile in pixels (AVX-512) */
#define FC_DIRECT_NP256 6        /* (AVX2) */

#ifdef FC_HAVE_GEMM

#define FC_DTILE(NAME, T, VT, LANES, NP, SW, SET1, LOADU, FMA, STORE, RELU, TGT)                \
TGT static void NAME(ptrdiff_t K, const T* restrict w, const T* restrict x,                 \
                         const ptrdiff_t* restrict off, const T* init, ptrdiff_t istep,         \
                         int relu, T* buf) {                                                    \
    /* the sums start at init: the bias (istep 0: the own GEMM's first K block does the */    \
    /* same), or the sums of the taps before these (istep 2 LANES: buf itself), or 0 */        \
    VT c0[NP], c1[NP];                                                                          \
    _Pragma("GCC unroll 14")                                                                    \
    for (int i = 0; i < NP; i++) {                                                              \
        c0[i] = init != NULL ? LOADU(init + i * istep) : SET1((T)0);                            \
        c1[i] = init != NULL ? LOADU(init + i * istep + LANES) : SET1((T)0);                    \
    }                                                                                           \
    for (ptrdiff_t k = 0; k < K; k++) {                                                         \
        const T* p = x + off[k];                                                                \
        VT a0 = LOADU(w + k * 2 * LANES), a1 = LOADU(w + k * 2 * LANES + LANES);               \
        _Pragma("GCC unroll 14")                                                                \
        for (int i = 0; i < NP; i++) {                                                          \
            VT b = SET1(p[i * SW]);                                                             \
            c0[i] = FMA(a0, b, c0[i]);                                                          \
            c1[i] = FMA(a1, b, c1[i]);                                                          \
        }                                                                                       \
    }                                                                                           \
    _Pragma("GCC unroll 14")                                                                    \
    for (int i = 0; i < NP; i++) {                                                              \
        STORE(buf + i * 2 * LANES, relu ? RELU(c0[i]) : c0[i]);                                 \
        STORE(buf + i * 2 * LANES + LANES, relu ? RELU(c1[i]) : c1[i]);                         \
    }                                                                                           \
}

#define FC_DTILE_F(NP, SW) FC_DTILE(fc_dtile_f_##NP##_##SW, float, __m512, 16, NP, SW,          \
                                    _mm512_set1_ps, _mm512_loadu_ps, _mm512_fmadd_ps,          \
                                    _mm512_storeu_ps, FC_RELU_PS512, FC_T512)
#define FC_DTILE_D(NP, SW) FC_DTILE(fc_dtile_d_##NP##_##SW, double, __m512d, 8, NP, SW,         \
                                    _mm512_set1_pd, _mm512_loadu_pd, _mm512_fmadd_pd,          \
                                    _mm512_storeu_pd, FC_RELU_PD512, FC_T512)
#define FC_DTILES(NP) FC_DTILE_F(NP, 1) FC_DTILE_F(NP, 2) FC_DTILE_D(NP, 1) FC_DTILE_D(NP, 2)
FC_DTILES(1) FC_DTILES(2) FC_DTILES(3) FC_DTILES(4) FC_DTILES(5) FC_DTILES(6) FC_DTILES(7)
FC_DTILES(8) FC_DTILES(9) FC_DTILES(10) FC_DTILES(11) FC_DTILES(12) FC_DTILES(13)
FC_DTILES(14)

/* AVX2: tiles of 2 vectors (16 float / 8 double channels) x at most FC_DIRECT_NP256 pixels
 * (2 NP accumulators, 2 weight vectors and a broadcast in 16 registers) */
#define FC_DTILE_F256(NP, SW) FC_DTILE(fc_dtile_f256_##NP##_##SW, float, __m256, 8, NP, SW,     \
                                       _mm256_set1_ps, _mm256_loadu_ps, _mm256_fmadd_ps,       \
                                       _mm256_storeu_ps, FC_RELU_PS256, FC_T256)
#define FC_DTILE_D256(NP, SW) FC_DTILE(fc_dtile_d256_##NP##_##SW, double, __m256d, 4, NP, SW,   \
                                       _mm256_set1_pd, _mm256_loadu_pd, _mm256_fmadd_pd,       \
                                       _mm256_storeu_pd, FC_RELU_PD256, FC_T256)
#define FC_DTILES256(NP) FC_DTILE_F256(NP, 1) FC_DTILE_F256(NP, 2) FC_DTILE_D256(NP, 1)         \
                         FC_DTILE_D256(NP, 2)
FC_DTILES256(1) FC_DTILES256(2) FC_DTILES256(3) FC_DTILES256(4) FC_DTILES256(5)
FC_DTILES256(6)

typedef void (*fc_dtile_f_fn)(ptrdiff_t, const float*, const float*, const ptrdiff_t*,
                              const float*, ptrdiff_t, int, float*);
typedef void (*fc_dtile_d_fn)(ptrdiff_t, const double*, const double*, const ptrdiff_t*,
                              const double*, ptrdiff_t, int, double*);
/* [np][sW - 1]: the tile of np pixels for that stride (row 0 unused) */
#define FC_DT_ROW(P, NP) {P##NP##_1, P##NP##_2}
#define FC_DT_TABLE(P)                                                                          \
    {{NULL, NULL}, FC_DT_ROW(P, 1), FC_DT_ROW(P, 2), FC_DT_ROW(P, 3), FC_DT_ROW(P, 4),          \
     FC_DT_ROW(P, 5), FC_DT_ROW(P, 6), FC_DT_ROW(P, 7), FC_DT_ROW(P, 8), FC_DT_ROW(P, 9),       \
     FC_DT_ROW(P, 10), FC_DT_ROW(P, 11), FC_DT_ROW(P, 12), FC_DT_ROW(P, 13), FC_DT_ROW(P, 14)}
static const fc_dtile_f_fn fc_dtile_f[FC_DIRECT_NP + 1][2] = FC_DT_TABLE(fc_dtile_f_);
static const fc_dtile_d_fn fc_dtile_d[FC_DIRECT_NP + 1][2] = FC_DT_TABLE(fc_dtile_d_);
#define FC_DT_TABLE256(P)                                                                       \
    {{NULL, NULL}, FC_DT_ROW(P, 1), FC_DT_ROW(P, 2), FC_DT_ROW(P, 3), FC_DT_ROW(P, 4),          \
     FC_DT_ROW(P, 5), FC_DT_ROW(P, 6)}
static const fc_dtile_f_fn fc_dtile_f256[FC_DIRECT_NP256 + 1][2] = FC_DT_TABLE256(fc_dtile_f256_);
static const fc_dtile_d_fn fc_dtile_d256[FC_DIRECT_NP256 + 1][2] = FC_DT_TABLE256(fc_dtile_d256_);

/* Whether the direct kernels can run now (the AVX-512 or AVX2 level of the own GEMM is in
 * use); the widest tile in pixels and the output channels per block at that level. */
static int fc_direct_ok(void) { return fc_gemm_on >= 1; }
static int fc_direct_np(void) { return fc_gemm_on == 2 ? FC_DIRECT_NP : FC_DIRECT_NP256; }
static ptrdiff_t fc_direct_block(ptrdiff_t itemsize) {
    return (fc_gemm_on == 2 ? 128 : 64) / itemsize;
}

/* K blocking: where a block's packed weights (K x 2 LANES) pass fc_direct_kc_min bytes, the
 * taps in chunks of at most fc_direct_kc_bytes of them, each chunk run over a group of
 * output rows whose sums (pixel-major, the caller's acc) take at most FC_DIRECT_ACC bytes,
 * so that the chunk's weights stay in L1 while every tile of the group uses them (else each
 * tile streams all the block's weights from L2).  The sums go to acc and back between
 * chunks unrounded, in the order of the taps: the same numbers as one pass.  Float32, AVX2,
 * Zen 3 (2026-12-04), 16 KiB chunks: 128 -> 128 5x5 on 28x28 (200 KiB of a block's weights)
 * 1.10x / 1.10x at 1 / 2 threads; 64 -> 64 (100 KiB) 0.95-1.02x, 32 -> 64 (50 KiB) 0.98x:
 * from 128 KiB on. */
static ptrdiff_t fc_direct_kc_bytes = 16384, fc_direct_kc_min = 131072;
/* The same at stride 2 along the width at AVX2 (tiles read every other column: each tap row
 * touches twice the input lines), where a block's weights past L1 already cost: 8 KiB chunks
 * from 4 KiB of them.  Zen 3 (2026-12-05), float32 3x3 s2 64 -> 128 on 56x56 (36 KiB a
 * block), batch 8, single calls alternated, 1 / 2 threads: 1.058x / 1.062x one pass (and
 * 1.033x / 1.047x im2col + GEMM, which one pass did not beat: 0.976x / 0.986x); 12 KiB
 * chunks were no better, 4 KiB worse.  The 5x5 stride-1 convolutions (LeNet's conv2,
 * 64 -> 64, 128 -> 128) with these sizes: 0.96-1.00x, so they keep the values above. */
static ptrdiff_t fc_direct_kc2_bytes = 8192, fc_direct_kc2_min = 4096;
#define FC_DIRECT_ACC 16384
/* values of acc that fc_direct_rows_* needs for output rows OW wide (ML channels a block) */
static ptrdiff_t fc_direct_acc(ptrdiff_t OW, ptrdiff_t ML, ptrdiff_t itemsize) {
    ptrdiff_t rg = FC_DIRECT_ACC / (OW * ML * itemsize);
    return (rg < 1 ? 1 : rg) * OW * ML;
}

/* nv pixels x ML float channels (buf pixel-major) into channel rows plane apart: 8x8
 * register transposes of pixels [i, i + 8) (the last block overlapping the one before:
 * the same values twice), scalar below 8 pixels */
#define FC_DSTORE_F(NAME, ML)                                                                   \
FC_T256 static void NAME(const float* buf, ptrdiff_t nv, float* o, ptrdiff_t plane) {           \
    if (nv >= 8) {                                                                              \
        for (ptrdiff_t i = 0;; i += 8) {                                                        \
            if (i > nv - 8)                                                                     \
                i = nv - 8;                                                                     \
            for (int c0 = 0; c0 < ML; c0 += 8)                                                  \
                fc_tr8x8_ps(buf + i * ML + c0, ML, o + c0 * plane + i, plane);                  \
            if (i == nv - 8)                                                                    \
                return;                                                                         \
        }                                                                                       \
    }                                                                                           \
    for (int l = 0; l < ML; l++)                                                                \
        for (ptrdiff_t i = 0; i < nv; i++)                                                      \
            o[l * plane + i] = buf[i * ML + l];                                                 \
}
FC_DSTORE_F(fc_dstore_f, 32)
FC_DSTORE_F(fc_dstore_f256, 16)
#define FC_DSTORE_N(NAME, T, ML)                                                                \
static void NAME(const T* buf, ptrdiff_t nv, T* o, ptrdiff_t plane) {                           \
    for (int l = 0; l < ML; l++)                                                                \
        for (ptrdiff_t i = 0; i < nv; i++)                                                      \
            o[l * plane + i] = buf[i * ML + l];                                                 \
}
FC_DSTORE_N(fc_dstore_d, double, 16)
FC_DSTORE_N(fc_dstore_d256, double, 8)

/* Output rows [0, nrows) of one (image, group) from its padded rows xp (row r of the output
 * reads padded rows r sH + kh dH, Wp values long, channel planes cs values apart; column
 * ow sW + kw dW for output column ow): out row r of channel l at out + l * plane + r * OW.
 * w: the group's weights packed by fc_direct_pack (Lg a multiple of 2 LANES), np: pixels
 * per tile (1..14), off: the offsets of the K taps in xp, acc: fc_direct_acc(OW, 2 LANES,
 * sizeof(T)) values for the sums of a group of rows. */
#define FC_DIRECT_ROWS(NAME, T, LANES, TABLE, DSTORE)                                           \
static void NAME(ptrdiff_t K, ptrdiff_t Lg, const T* w, const T* xp, ptrdiff_t sH,             \
                 ptrdiff_t Wp, ptrdiff_t sW, ptrdiff_t nrows, ptrdiff_t OW, int np,             \
                 const ptrdiff_t* off, T* out, ptrdiff_t plane, const T* bias, int relu,        \
                 T* acc) {                                                                      \
    const ptrdiff_t ML = 2 * LANES;                                                             \
    const int s2 = sW == 2 && fc_gemm_on == 1;                                                  \
    ptrdiff_t kc = (s2 ? fc_direct_kc2_bytes : fc_direct_kc_bytes) / (ML * (ptrdiff_t)sizeof(T)); \
    ptrdiff_t rg = fc_direct_acc(OW, ML, sizeof(T)) / (OW * ML);                                \
    if (kc < 1 || kc > K ||                                                                     \
        K * ML * (ptrdiff_t)sizeof(T) < (s2 ? fc_direct_kc2_min : fc_direct_kc_min))            \
        kc = K;                                                                                 \
    for (ptrdiff_t l0 = 0; l0 < Lg; l0 += ML) {                                                 \
        const T* b = bias != NULL ? bias + l0 : NULL;                                           \
        for (ptrdiff_t r0 = 0; r0 < nrows; r0 += rg) {                                          \
            ptrdiff_t r1 = nrows - r0 < rg ? nrows : r0 + rg;                                   \
            for (ptrdiff_t k0 = 0; k0 < K; k0 += kc) {                                          \
                ptrdiff_t kn = K - k0 < kc ? K - k0 : kc;                                       \
                int last = k0 + kn == K;                                                        \
                for (ptrdiff_t r = r0; r < r1; r++) {                                           \
                    for (ptrdiff_t ow0 = 0; ow0 < OW; ow0 += np) {                              \
                        int nv = OW - ow0 < np ? (int)(OW - ow0) : np;                          \
                        T* a = acc + ((r - r0) * OW + ow0) * ML;                                \
                        TABLE[nv][sW - 1](kn, w + l0 * K + k0 * ML,                             \
                                          xp + r * sH * Wp + ow0 * sW, off + k0,                \
                                          k0 == 0 ? b : a, k0 == 0 ? 0 : ML,                    \
                                          relu && last, a);                                     \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            for (ptrdiff_t r = r0; r < r1; r++)                                                 \
                DSTORE(acc + (r - r0) * OW * ML, OW, out + l0 * plane + r * OW, plane);         \
        }                                                                                       \
    }                                                                                           \
}
FC_DIRECT_ROWS(fc_direct_rows_f512, float, 16, fc_dtile_f, fc_dstore_f)
FC_DIRECT_ROWS(fc_direct_rows_d512, double, 8, fc_dtile_d, fc_dstore_d)
FC_DIRECT_ROWS(fc_direct_rows_f256, float, 8, fc_dtile_f256, fc_dstore_f256)
FC_DIRECT_ROWS(fc_direct_rows_d256, double, 4, fc_dtile_d256, fc_dstore_d256)
/* by the level in use */
#define FC_DIRECT_PICK(NAME, T)                                                                 \
static void NAME(ptrdiff_t K, ptrdiff_t Lg, const T* w, const T* xp, ptrdiff_t sH,             \
                 ptrdiff_t Wp, ptrdiff_t sW, ptrdiff_t nrows, ptrdiff_t OW, int np,             \
                 const ptrdiff_t* off, T* out, ptrdiff_t plane, const T* bias, int relu,        \
                 T* acc) {                                                                      \
    (fc_gemm_on == 2 ? NAME##512 : NAME##256)(K, Lg, w, xp, sH, Wp, sW, nrows, OW, np, off,    \
                                              out, plane, bias, relu, acc);                     \
}
FC_DIRECT_PICK(fc_direct_rows_f, float)
FC_DIRECT_PICK(fc_direct_rows_d, double)

#else   /* no own GEMM: never called (fc_direct_ok() is 0) */
static int fc_direct_ok(void) { return 0; }
static int fc_direct_np(void) { return FC_DIRECT_NP; }
static ptrdiff_t fc_direct_block(ptrdiff_t itemsize) { return 128 / itemsize; }
static ptrdiff_t fc_direct_kc_bytes = 0, fc_direct_kc_min = 0;
static ptrdiff_t fc_direct_acc(ptrdiff_t OW, ptrdiff_t ML, ptrdiff_t itemsize) {
    (void)ML; (void)itemsize;
    return OW;
}
static void fc_direct_rows_f(ptrdiff_t K, ptrdiff_t Lg, const float* w, const float* xp,
                             ptrdiff_t sH, ptrdiff_t Wp, ptrdiff_t sW, ptrdiff_t nrows,
                             ptrdiff_t OW, int np, const ptrdiff_t* off, float* out,
                             ptrdiff_t plane, const float* bias, int relu, float* acc) {
    (void)K; (void)Lg; (void)w; (void)xp; (void)sH; (void)Wp; (void)sW; (void)nrows;
    (void)OW; (void)np; (void)off; (void)out; (void)plane; (void)bias; (void)relu; (void)acc;
}
static void fc_direct_rows_d(ptrdiff_t K, ptrdiff_t Lg, const double* w, const double* xp,
                             ptrdiff_t sH, ptrdiff_t Wp, ptrdiff_t sW, ptrdiff_t nrows,
                             ptrdiff_t OW, int np, const ptrdiff_t* off, double* out,
                             ptrdiff_t plane, const double* bias, int relu, double* acc) {
    (void)K; (void)Lg; (void)w; (void)xp; (void)sH; (void)Wp; (void)sW; (void)nrows;
    (void)OW; (void)np; (void)off; (void)out; (void)plane; (void)bias; (void)relu; (void)acc;
}
#endif

#endif
