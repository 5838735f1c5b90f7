/* Winograd F(2x2, 3x3) transforms for 3x3 stride-1 convolutions (Lavin & Gray, 2015).
 *
 * A 2x2 output tile is  Y = A^T [ (G g G^T) * (B^T d B) ] A  for the 3x3 kernel g and the 4x4
 * input patch d, with
 *     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
 *     A^T = [1 1 1 0; 0 1 -1 -1].
 * The element-wise products summed over input channels are 16 GEMMs, one per position xi of
 * the 4x4 transformed tile:  M[xi] (L x T) = U[xi] (L x C) @ V[xi] (C x T),  T tiles.  That
 * is 16 multiplies per 4 outputs instead of 36: 2.25x fewer flops than im2col + GEMM.
 *
 * The transforms are written out term by term (no multiplications by 0 or 1), so a NaN in
 * the input reaches exactly the outputs whose 3x3 windows contain it.  An infinity could
 * meet its own negative (inf - inf = NaN where direct convolution gives +-inf), so the
 * caller checks fc_wino_finite first and convolves an image with any directly.
 *
 * Layouts: w (L, C, 3, 3); U [16][L][C]; x (C, H, W); tiles t = th * TW + tw, taken in blocks
 * [t0, t0 + nt); V [16][C][nt] and M [16][L][nt] with the 16 planes CT and LT values apart
 * (the caller pads them off multiples of 4 KiB: 16 streams 4 KiB apart thrash the L1's
 * sets, which made a 64-channel 32x32 case 1.9x slower); out (L, OH, OW).
 */
#ifndef FASTCONV_WINOGRAD_H
#define FASTCONV_WINOGRAD_H

#include <stddef.h>
#include "_simd.h"      /* FC_AVX2, FC_PICK */

#define FC_WINO(T, SUF, ATTR)                                                                \
ATTR static void fc_wino_weights_##SUF(const T* w, ptrdiff_t L, ptrdiff_t C, T* U) {              \
    /* U = G g G^T for every (l, c), 64 channels at a time: their 9 taps are first gathered */ \
    /* into rows (g[j][c]), so that the arithmetic and the 16 stores run along c and */        \
    /* vectorise (the per-(l, c) scalar version was a fifth of a batch-1 convolution) */        \
    const ptrdiff_t LC = L * C;                                                              \
    T g[9][64], t[4][3][64];                                                                 \
    for (ptrdiff_t l = 0; l < L; l++)                                                        \
        for (ptrdiff_t c0 = 0; c0 < C; c0 += 64) {                                           \
            ptrdiff_t nc = C - c0 < 64 ? C - c0 : 64;                                        \
            const T* src = w + (l * C + c0) * 9;                                             \
            for (ptrdiff_t c = 0; c < nc; c++)                                               \
                for (int j = 0; j < 9; j++) g[j][c] = src[c * 9 + j];                        \
            for (int j = 0; j < 3; j++)                    /* t = G g */                     \
                for (ptrdiff_t c = 0; c < nc; c++) {                                         \
                    t[0][j][c] = g[j][c];                                                    \
                    t[1][j][c] = (T)0.5 * ((g[j][c] + g[3 + j][c]) + g[6 + j][c]);           \
                    t[2][j][c] = (T)0.5 * ((g[j][c] - g[3 + j][c]) + g[6 + j][c]);           \
                    t[3][j][c] = g[6 + j][c];                                                \
                }                                                                            \
            for (int i = 0; i < 4; i++) {                  /* u = t G^T */                   \
                T* u = U + (i * 4) * LC + l * C + c0;                                        \
                for (ptrdiff_t c = 0; c < nc; c++) {                                         \
                    T a = t[i][0][c], b = t[i][1][c], d = t[i][2][c];                        \
                    u[c] = a;                                                                \
                    u[LC + c] = (T)0.5 * ((a + b) + d);                                      \
                    u[2 * LC + c] = (T)0.5 * ((a - b) + d);                                  \
                    u[3 * LC + c] = d;                                                       \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
}                                                                                            \
                                                                                             \
/* V from x (zero outside the image; pH, pW: top and left padding); returns nonzero when */   \
/* x holds an infinity or NaN (V is then incomplete) */                                       \
ATTR static int fc_wino_finite_##SUF(const T* x, ptrdiff_t n) {                                 \
    T p[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                       \
    ptrdiff_t i = 0;                                                                         \
    for (; i + 8 <= n; i += 8)                    /* x - x is NaN unless x is finite */      \
        for (int l = 0; l < 8; l++) p[l] += x[i + l] - x[i + l];                             \
    for (; i < n; i++) p[0] += x[i] - x[i];                                                  \
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7])) == 0;          \
}                                                                                            \
                                                                                             \
/* V for n consecutive tiles of one tile row that lie wholly inside the image, x0 at the */    \
/* first one's top-left input: a loop over tiles with stride-2 loads and contiguous */         \
/* stores, which vectorises across tiles (the tile-by-tile code only within one tile) */       \
ATTR static inline void fc_wino_in_row_##SUF(const T* restrict x0, ptrdiff_t W, ptrdiff_t n,   \
                                             T* restrict v, ptrdiff_t CT) {                  \
    const T* restrict x1 = x0 + W;                                                           \
    const T* restrict x2 = x0 + 2 * W;                                                       \
    const T* restrict x3 = x0 + 3 * W;                                                       \
    for (ptrdiff_t q = 0; q < n; q++) {                                                      \
        T r[4][4];                                                                           \
        for (int j = 0; j < 4; j++) {                              /* r = B^T d */           \
            T a = x0[2 * q + j], b = x1[2 * q + j], c = x2[2 * q + j], d = x3[2 * q + j];    \
            r[0][j] = a - c;                                                                 \
            r[1][j] = b + c;                                                                 \
            r[2][j] = c - b;                                                                 \
            r[3][j] = b - d;                                                                 \
        }                                                                                    \
        for (int k = 0; k < 4; k++) {                              /* r B */                 \
            v[(k * 4 + 0) * CT + q] = r[k][0] - r[k][2];                                     \
            v[(k * 4 + 1) * CT + q] = r[k][1] + r[k][2];                                     \
            v[(k * 4 + 2) * CT + q] = r[k][2] - r[k][1];                                     \
            v[(k * 4 + 3) * CT + q] = r[k][1] - r[k][3];                                     \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
ATTR static void fc_wino_input_##SUF(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,          \
                                ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t TW, ptrdiff_t t0,     \
                                ptrdiff_t nt, T* V, ptrdiff_t CT) {                          \
    /* tiles tw in [twa, twb) have all four columns in the image */                        \
    /* (within the tile row: twb <= TW; pW < 0 crops, as grad_x's convolution does) */      \
    const ptrdiff_t twa = pW > 0 ? (pW + 1) / 2 : 0;                                         \
    ptrdiff_t twb = W - 4 + pW >= 0 ? (W - 4 + pW) / 2 + 1 : 0;                              \
    twb = twb < TW ? twb : TW;                                                               \
    for (ptrdiff_t c = 0; c < C; c++) {                                                      \
        const T* xc = x + c * H * W;                                                         \
        T* vc = V + c * nt - t0;                                                             \
        for (ptrdiff_t t = t0; t < t0 + nt; t++) {                                           \
            const ptrdiff_t th = t / TW, tw = t - th * TW;                                   \
            const ptrdiff_t h0 = 2 * th - pH;                                                \
            const int rows_in = h0 >= 0 && h0 + 4 <= H;                                      \
            if (rows_in && tw >= twa && tw < twb) {      /* a run of interior tiles */       \
                ptrdiff_t n = twb - tw < t0 + nt - t ? twb - tw : t0 + nt - t;               \
                fc_wino_in_row_##SUF(xc + h0 * W + 2 * tw - pW, W, n, vc + t, CT);           \
                t += n - 1;                                                                  \
                continue;                                                                    \
            }                                                                                \
            {                                                                                \
                const ptrdiff_t w0 = 2 * tw - pW;                                            \
                T d[4][4], r[4][4];                                                          \
                if (rows_in && w0 >= 0 && w0 + 4 <= W) {                                     \
                    for (int i = 0; i < 4; i++)                                              \
                        for (int j = 0; j < 4; j++) d[i][j] = xc[(h0 + i) * W + w0 + j];     \
                } else {                                                                     \
                    for (int i = 0; i < 4; i++)                                              \
                        for (int j = 0; j < 4; j++) {                                        \
                            ptrdiff_t ih = h0 + i, iw = w0 + j;                              \
                            d[i][j] = (ih >= 0 && ih < H && iw >= 0 && iw < W)               \
                                      ? xc[ih * W + iw] : (T)0;                              \
                        }                                                                    \
                }                                                                            \
                for (int j = 0; j < 4; j++) {                      /* r = B^T d */           \
                    r[0][j] = d[0][j] - d[2][j];                                             \
                    r[1][j] = d[1][j] + d[2][j];                                             \
                    r[2][j] = d[2][j] - d[1][j];                                             \
                    r[3][j] = d[1][j] - d[3][j];                                             \
                }                                                                            \
                T* v = vc + t;                                                               \
                for (int i = 0; i < 4; i++) {                      /* r B */                 \
                    v[(i * 4 + 0) * CT] = r[i][0] - r[i][2];                                 \
                    v[(i * 4 + 1) * CT] = r[i][1] + r[i][2];                                 \
                    v[(i * 4 + 2) * CT] = r[i][2] - r[i][1];                                 \
                    v[(i * 4 + 3) * CT] = r[i][1] - r[i][3];                                 \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* out from M (+ bias when b is not NULL), the tiles' parts inside OH x OW */                 \
/* out for n consecutive tiles of one tile row whose 2x2 outputs lie inside OH x OW: */       \
/* contiguous loads of M across tiles, stride-2 stores to the two output rows */              \
ATTR static inline void fc_wino_out_row_##SUF(const T* restrict mp, ptrdiff_t LT, ptrdiff_t n, \
                                              T bias, T* restrict o0, T* restrict o1) {      \
    for (ptrdiff_t q = 0; q < n; q++) {                                                      \
        T m[4][4], s[2][4];                                                                  \
        for (int i = 0; i < 4; i++)                                                          \
            for (int j = 0; j < 4; j++) m[i][j] = mp[(i * 4 + j) * LT + q];                  \
        for (int j = 0; j < 4; j++) {                              /* s = A^T m */           \
            s[0][j] = (m[0][j] + m[1][j]) + m[2][j];                                         \
            s[1][j] = (m[1][j] - m[2][j]) - m[3][j];                                         \
        }                                                                                    \
        o0[2 * q] = ((s[0][0] + s[0][1]) + s[0][2]) + bias;                                  \
        o0[2 * q + 1] = ((s[0][1] - s[0][2]) - s[0][3]) + bias;                              \
        o1[2 * q] = ((s[1][0] + s[1][1]) + s[1][2]) + bias;                                  \
        o1[2 * q + 1] = ((s[1][1] - s[1][2]) - s[1][3]) + bias;                              \
    }                                                                                        \
}                                                                                            \
ATTR static void fc_wino_output_##SUF(const T* M, ptrdiff_t L, ptrdiff_t TW, ptrdiff_t t0,        \
                                 ptrdiff_t nt, ptrdiff_t OH, ptrdiff_t OW, const T* b,       \
                                 T* out, ptrdiff_t LT) {                                     \
    for (ptrdiff_t l = 0; l < L; l++) {                                                      \
        const T bias = b ? b[l] : (T)0;                                                      \
        T* ol = out + l * OH * OW;                                                           \
        for (ptrdiff_t t = t0; t < t0 + nt; t++) {                                           \
            const ptrdiff_t th = t / TW, tw = t - th * TW;                                   \
            if (2 * th + 1 < OH && 2 * tw + 1 < OW) {    /* a run of whole tiles */          \
                ptrdiff_t n = OW / 2 - tw < t0 + nt - t ? OW / 2 - tw : t0 + nt - t;         \
                fc_wino_out_row_##SUF(M + l * nt + (t - t0), LT, n, bias,                    \
                                      ol + 2 * th * OW + 2 * tw, ol + (2 * th + 1) * OW + 2 * tw); \
                t += n - 1;                                                                  \
                continue;                                                                    \
            }                                                                                \
            {                                                                                \
                const T* mp = M + l * nt + (t - t0);                                         \
                T m[4][4], s[2][4];                                                          \
                for (int i = 0; i < 4; i++)                                                  \
                    for (int j = 0; j < 4; j++) m[i][j] = mp[(i * 4 + j) * LT];              \
                for (int j = 0; j < 4; j++) {                      /* s = A^T m */           \
                    s[0][j] = (m[0][j] + m[1][j]) + m[2][j];                                 \
                    s[1][j] = (m[1][j] - m[2][j]) - m[3][j];                                 \
                }                                                                            \
                for (int i = 0; i < 2; i++) {                      /* y = s A */             \
                    ptrdiff_t oh = 2 * th + i;                                               \
                    if (oh >= OH) break;                                                     \
                    T y0 = (s[i][0] + s[i][1]) + s[i][2];                                    \
                    T y1 = (s[i][1] - s[i][2]) - s[i][3];                                    \
                    ol[oh * OW + 2 * tw] = y0 + bias;                                        \
                    if (2 * tw + 1 < OW) ol[oh * OW + 2 * tw + 1] = y1 + bias;               \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}

/* Compiled twice: for the portable baseline and, on x86-64, for AVX2 + FMA (chosen at run
 * time with the rest of _simd.h's loops; the transforms were a third of a batch-1 3x3
 * convolution, which this took from 0.76 to 0.69 ms, before the across-tile runs above took
 * it to 0.64).  Both compute the same terms; FMA contraction may change roundings. */
FC_WINO(float, f_base, )
FC_WINO(double, d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_WINO(float, f_avx2, FC_AVX2)
FC_WINO(double, d_avx2, FC_AVX2)
#endif
#define FC_WINO_DISPATCH(T, S)                                                               \
static void fc_wino_weights_##S(const T* w, ptrdiff_t L, ptrdiff_t C, T* U) {                \
    FC_PICK(fc_wino_weights_##S, w, L, C, U);                                                \
}                                                                                            \
static int fc_wino_finite_##S(const T* x, ptrdiff_t n) {                                     \
    return FC_PICK(fc_wino_finite_##S, x, n);                                                \
}                                                                                            \
static void fc_wino_input_##S(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,             \
                              ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t TW, ptrdiff_t t0,        \
                              ptrdiff_t nt, T* V, ptrdiff_t CT) {                            \
    FC_PICK(fc_wino_input_##S, x, C, H, W, pH, pW, TW, t0, nt, V, CT);                       \
}                                                                                            \
static void fc_wino_output_##S(const T* M, ptrdiff_t L, ptrdiff_t TW, ptrdiff_t t0,          \
                               ptrdiff_t nt, ptrdiff_t OH, ptrdiff_t OW, const T* b,         \
                               T* out, ptrdiff_t LT) {                                       \
    FC_PICK(fc_wino_output_##S, M, L, TW, t0, nt, OH, OW, b, out, LT);                       \
}
FC_WINO_DISPATCH(float, f)
FC_WINO_DISPATCH(double, d)

#endif /* FASTCONV_WINOGRAD_H */
