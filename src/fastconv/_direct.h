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
                         const ptrdiff_t* restrict off, const T* init, int relu,                \
                         T* restrict buf) {                                                     \
    /* the sums start at init (the bias: the own GEMM's first K block does the same) */       \
    VT i0 = init != NULL ? LOADU(init) : SET1((T)0);                                            \
    VT i1 = init != NULL ? LOADU(init + LANES) : SET1((T)0);                                    \
    VT c0[NP], c1[NP];                                                                          \
    _Pragma("GCC unroll 14")                                                                    \
    for (int i = 0; i < NP; i++) {                                                              \
        c0[i] = i0;                                                                             \
        c1[i] = i1;                                                                             \
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
                                    _mm512_store_ps, FC_RELU_PS512, FC_T512)
#define FC_DTILE_D(NP, SW) FC_DTILE(fc_dtile_d_##NP##_##SW, double, __m512d, 8, NP, SW,         \
                                    _mm512_set1_pd, _mm512_loadu_pd, _mm512_fmadd_pd,          \
                                    _mm512_store_pd, FC_RELU_PD512, FC_T512)
#define FC_DTILES(NP) FC_DTILE_F(NP, 1) FC_DTILE_F(NP, 2) FC_DTILE_D(NP, 1) FC_DTILE_D(NP, 2)
FC_DTILES(1) FC_DTILES(2) FC_DTILES(3) FC_DTILES(4) FC_DTILES(5) FC_DTILES(6) FC_DTILES(7)
FC_DTILES(8) FC_DTILES(9) FC_DTILES(10) FC_DTILES(11) FC_DTILES(12) FC_DTILES(13)
FC_DTILES(14)

/* AVX2: tiles of 2 vectors (16 float / 8 double channels) x at most FC_DIRECT_NP256 pixels
 * (2 NP accumulators, 2 weight vectors and a broadcast in 16 registers) */
#define FC_DTILE_F256(NP, SW) FC_DTILE(fc_dtile_f256_##NP##_##SW, float, __m256, 8, NP, SW,     \
                                       _mm256_set1_ps, _mm256_loadu_ps, _mm256_fmadd_ps,       \
                                       _mm256_store_ps, FC_RELU_PS256, FC_T256)
#define FC_DTILE_D256(NP, SW) FC_DTILE(fc_dtile_d256_##NP##_##SW, double, __m256d, 4, NP, SW,   \
                                       _mm256_set1_pd, _mm256_loadu_pd, _mm256_fmadd_pd,       \
                                       _mm256_store_pd, FC_RELU_PD256, FC_T256)
#define FC_DTILES256(NP) FC_DTILE_F256(NP, 1) FC_DTILE_F256(NP, 2) FC_DTILE_D256(NP, 1)         \
                         FC_DTILE_D256(NP, 2)
FC_DTILES256(1) FC_DTILES256(2) FC_DTILES256(3) FC_DTILES256(4) FC_DTILES256(5)
FC_DTILES256(6)

typedef void (*fc_dtile_f_fn)(ptrdiff_t, const float*, const float*, const ptrdiff_t*,
                              const float*, int, float*);
typedef void (*fc_dtile_d_fn)(ptrdiff_t, const double*, const double*, const ptrdiff_t*,
                              const double*, int, double*);
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

/* Output rows [0, nrows) of one (image, group) from its padded rows xp (row r of the output
 * reads padded rows r sH + kh dH, Wp values long, channel planes cs values apart; column
 * ow sW + kw dW for output column ow): out row r of channel l at out + l * plane + r * OW.
 * w: the group's weights packed by fc_direct_pack (Lg a multiple of 2 LANES), np: pixels
 * per tile (1..14), off: the offsets of the K taps in xp. */
/* the tile's nv pixels x 32 float channels (buf pixel-major) into channel rows plane apart:
 * 8x8 register transposes of the pixels [0, 8) and [nv - 8, nv) (overlapping: the same values
 * twice), scalar below 8 pixels */
FC_T512 static void fc_dstore_f(const float* buf, int nv, float* o, ptrdiff_t plane) {
    if (nv >= 8) {
        for (int c0 = 0; c0 < 32; c0 += 8) {
            fc_tr8x8_ps(buf + c0, 32, o + c0 * plane, plane);
            if (nv > 8)
                fc_tr8x8_ps(buf + (nv - 8) * 32 + c0, 32, o + c0 * plane + nv - 8, plane);
        }
        return;
    }
    for (int l = 0; l < 32; l++)
        for (int i = 0; i < nv; i++)
            o[l * plane + i] = buf[i * 32 + l];
}
#define FC_DSTORE_N(NAME, T, ML)                                                                \
static void NAME(const T* buf, int nv, T* o, ptrdiff_t plane) {                                 \
    for (int l = 0; l < ML; l++)                                                                \
        for (int i = 0; i < nv; i++)                                                            \
            o[l * plane + i] = buf[i * ML + l];                                                 \
}
FC_DSTORE_N(fc_dstore_d, double, 16)
FC_DSTORE_N(fc_dstore_f256, float, 16)
FC_DSTORE_N(fc_dstore_d256, double, 8)

#define FC_DIRECT_ROWS(NAME, T, LANES, TABLE, DSTORE)                                           \
static void NAME(ptrdiff_t K, ptrdiff_t Lg, const T* w, const T* xp, ptrdiff_t sH,             \
                 ptrdiff_t Wp, ptrdiff_t sW, ptrdiff_t nrows, ptrdiff_t OW, int np,             \
                 const ptrdiff_t* off, T* out, ptrdiff_t plane, const T* bias, int relu) {      \
    T buf[FC_DIRECT_NP * 2 * LANES] __attribute__((aligned(64)));                               \
    const ptrdiff_t ML = 2 * LANES;                                                             \
    /* one block of channels at a time over all the rows: its weights (K x 2 LANES) stay in */ \
    /* L2 with the padded rows (all blocks' weights, over 1 MiB in a 128->256 3x3, did not) */ \
    for (ptrdiff_t l0 = 0; l0 < Lg; l0 += ML) {                                                 \
        for (ptrdiff_t r = 0; r < nrows; r++) {                                                 \
            for (ptrdiff_t ow0 = 0; ow0 < OW; ow0 += np) {                                      \
                int nv = OW - ow0 < np ? (int)(OW - ow0) : np;                                  \
                const T* xt = xp + r * sH * Wp + ow0 * sW;                                      \
                TABLE[nv][sW - 1](K, w + l0 * K, xt, off, bias != NULL ? bias + l0 : NULL,     \
                                  relu, buf);                                                   \
                DSTORE(buf, nv, out + l0 * plane + r * OW + ow0, plane);                        \
            }                                                                                   \
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
                 const ptrdiff_t* off, T* out, ptrdiff_t plane, const T* bias, int relu) {      \
    (fc_gemm_on == 2 ? NAME##512 : NAME##256)(K, Lg, w, xp, sH, Wp, sW, nrows, OW, np, off,    \
                                              out, plane, bias, relu);                          \
}
FC_DIRECT_PICK(fc_direct_rows_f, float)
FC_DIRECT_PICK(fc_direct_rows_d, double)

#else   /* no own GEMM: never called (fc_direct_ok() is 0) */
static int fc_direct_ok(void) { return 0; }
static int fc_direct_np(void) { return FC_DIRECT_NP; }
static ptrdiff_t fc_direct_block(ptrdiff_t itemsize) { return 128 / itemsize; }
static void fc_direct_rows_f(ptrdiff_t K, ptrdiff_t Lg, const float* w, const float* xp,
                             ptrdiff_t sH, ptrdiff_t Wp, ptrdiff_t sW, ptrdiff_t nrows,
                             ptrdiff_t OW, int np, const ptrdiff_t* off, float* out,
                             ptrdiff_t plane, const float* bias, int relu) {
    (void)K; (void)Lg; (void)w; (void)xp; (void)sH; (void)Wp; (void)sW; (void)nrows;
    (void)OW; (void)np; (void)off; (void)out; (void)plane; (void)bias; (void)relu;
}
static void fc_direct_rows_d(ptrdiff_t K, ptrdiff_t Lg, const double* w, const double* xp,
                             ptrdiff_t sH, ptrdiff_t Wp, ptrdiff_t sW, ptrdiff_t nrows,
                             ptrdiff_t OW, int np, const ptrdiff_t* off, double* out,
                             ptrdiff_t plane, const double* bias, int relu) {
    (void)K; (void)Lg; (void)w; (void)xp; (void)sH; (void)Wp; (void)sW; (void)nrows;
    (void)OW; (void)np; (void)off; (void)out; (void)plane; (void)bias; (void)relu;
}
#endif

#endif
