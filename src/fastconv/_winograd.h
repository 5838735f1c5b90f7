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

#define FC_WINO(T, SUF)                                                                      \
static void fc_wino_weights_##SUF(const T* w, ptrdiff_t L, ptrdiff_t C, T* U) {              \
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
static int fc_wino_finite_##SUF(const T* x, ptrdiff_t n) {                                 \
    T p[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                       \
    ptrdiff_t i = 0;                                                                         \
    for (; i + 8 <= n; i += 8)                    /* x - x is NaN unless x is finite */      \
        for (int l = 0; l < 8; l++) p[l] += x[i + l] - x[i + l];                             \
    for (; i < n; i++) p[0] += x[i] - x[i];                                                  \
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7])) == 0;          \
}                                                                                            \
                                                                                             \
static void fc_wino_input_##SUF(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,          \
                                ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t TW, ptrdiff_t t0,     \
                                ptrdiff_t nt, T* V, ptrdiff_t CT) {                          \
    for (ptrdiff_t c = 0; c < C; c++) {                                                      \
        const T* xc = x + c * H * W;                                                         \
        T* vc = V + c * nt - t0;                                                             \
        for (ptrdiff_t t = t0; t < t0 + nt; t++) {                                           \
            const ptrdiff_t th = t / TW, tw = t - th * TW;                                   \
            const ptrdiff_t h0 = 2 * th - pH;                                                \
            const int rows_in = h0 >= 0 && h0 + 4 <= H;                                      \
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
static void fc_wino_output_##SUF(const T* M, ptrdiff_t L, ptrdiff_t TW, ptrdiff_t t0,        \
                                 ptrdiff_t nt, ptrdiff_t OH, ptrdiff_t OW, const T* b,       \
                                 T* out, ptrdiff_t LT) {                                     \
    for (ptrdiff_t l = 0; l < L; l++) {                                                      \
        const T bias = b ? b[l] : (T)0;                                                      \
        T* ol = out + l * OH * OW;                                                           \
        for (ptrdiff_t t = t0; t < t0 + nt; t++) {                                           \
            const ptrdiff_t th = t / TW, tw = t - th * TW;                                   \
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

FC_WINO(float, f)
FC_WINO(double, d)

#endif /* FASTCONV_WINOGRAD_H */
