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

/* values of the padded-row buffer of the input transform (32 KiB of floats: on the stack of
 * whichever thread runs it) */
#define FC_WINO_PAD_VALS 8192

/* fc_wino_in_tiles for floats in AVX-512 intrinsics: 16 tiles a vector (a 32-wide image's
 * tile row is one), the 16 planes' stores from one base CT apart, the last tiles masked.  The
 * same additions in the same order as the loop below (no FMA in them): the same V.  gcc's
 * AVX2 build of that loop kept its 16 plane pointers on the stack and reloaded one per store
 * (perf: the input transform was 19 % of a batch-1 64-channel 32x32 convolution). */
#ifdef FC_HAVE_AVX2_PATH
FC_AVX512 static void fc_wino_in_tiles_f_avx512(const float* e0, const float* e1,
        const float* e2, const float* e3, ptrdiff_t S, ptrdiff_t n, ptrdiff_t ta, float* v,
        ptrdiff_t CT) {
    const float* E[4] = {e0 + ta, e1 + ta, e2 + ta, e3 + ta};
    for (ptrdiff_t q = 0; q < n; q += 16) {
        __mmask16 mk = n - q >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - q)) - 1);
        __m512 d[4][4], r[4][4];
        for (int i = 0; i < 4; i++) {             /* E_i[q], O_i[q], E_i[q + 1], O_i[q + 1] */
            d[i][0] = _mm512_maskz_loadu_ps(mk, E[i] + q);
            d[i][1] = _mm512_maskz_loadu_ps(mk, E[i] + S + q);
            d[i][2] = _mm512_maskz_loadu_ps(mk, E[i] + q + 1);
            d[i][3] = _mm512_maskz_loadu_ps(mk, E[i] + S + q + 1);
        }
        for (int j = 0; j < 4; j++) {                                      /* r = B^T d */
            r[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
            r[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
            r[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
            r[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
        }
        for (int k = 0; k < 4; k++) {                                      /* r B */
            float* vk = v + 4 * k * CT + q;
            _mm512_mask_storeu_ps(vk, mk, _mm512_sub_ps(r[k][0], r[k][2]));
            _mm512_mask_storeu_ps(vk + CT, mk, _mm512_add_ps(r[k][1], r[k][2]));
            _mm512_mask_storeu_ps(vk + 2 * CT, mk, _mm512_sub_ps(r[k][2], r[k][1]));
            _mm512_mask_storeu_ps(vk + 3 * CT, mk, _mm512_sub_ps(r[k][1], r[k][3]));
        }
    }
}
/* E[i] = xr[2i], O[i] = xr[2i + 1] for i in [ia, ib): 32 values a step split by two permutes */
FC_AVX512 static void fc_wino_split_f_avx512(const float* xr, float* E, float* O, ptrdiff_t ia,
                                             ptrdiff_t ib) {
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (ptrdiff_t i = ia; i < ib; i += 16) {
        ptrdiff_t k = ib - i < 16 ? ib - i : 16;          /* pairs; 2k values */
        __mmask16 m0 = k >= 8 ? (__mmask16)0xffff : (__mmask16)((1u << (2 * k)) - 1);
        __mmask16 m1 = k > 8 ? (__mmask16)((1u << (2 * k - 16)) - 1) : (__mmask16)0;
        __mmask16 mk = k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << k) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m0, xr + 2 * i);
        __m512 b = _mm512_maskz_loadu_ps(m1, xr + 2 * i + 16);
        _mm512_mask_storeu_ps(E + i, mk, _mm512_permutex2var_ps(a, ev, b));
        _mm512_mask_storeu_ps(O + i, mk, _mm512_permutex2var_ps(a, od, b));
    }
}
#define FC_WINO_TILES512 (FC_USE_AVX2 && fc_avx512_on)
#else
#define FC_WINO_TILES512 0
#define fc_wino_in_tiles_f_avx512(...) ((void)0)
#define fc_wino_split_f_avx512(...) ((void)0)
#endif

#define FC_WINO(T, SUF, ATTR)                                                                \
ATTR static void fc_wino_weights_##SUF(const T* w, ptrdiff_t L, ptrdiff_t C, ptrdiff_t l0,      \
                                        ptrdiff_t l1, T* U) {                               \
    /* U = G g G^T for every (l, c), 64 channels at a time: their 9 taps are first gathered */ \
    /* into rows (g[j][c]), so that the arithmetic and the 16 stores run along c and */        \
    /* vectorise (the per-(l, c) scalar version was a fifth of a batch-1 convolution) */        \
    const ptrdiff_t LC = L * C;                                                              \
    T g[9][64], t[4][3][64];                                                                 \
    /* (output channels l0 <= l < l1 of the L: threads split them for a batch of one) */    \
    for (ptrdiff_t l = l0; l < l1; l++)                                                      \
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
/* V for tiles q in [ta, ta + n) of one tile row from the split rows (E, O) r0..r3: the */    \
/* 16 planes as separate restrict pointers (one base with 16 offsets CT apart made gcc give */  \
/* up: more alias checks than it versions for) */                                               \
ATTR static inline void fc_wino_in_tiles_##SUF(const T* restrict e0, const T* restrict e1,     \
        const T* restrict e2, const T* restrict e3, const T* restrict o0,                    \
        const T* restrict o1, const T* restrict o2, const T* restrict o3, ptrdiff_t n,       \
        ptrdiff_t ta, T* restrict v0, T* restrict v1, T* restrict v2, T* restrict v3,        \
        T* restrict v4, T* restrict v5, T* restrict v6, T* restrict v7, T* restrict v8,      \
        T* restrict v9, T* restrict v10, T* restrict v11, T* restrict v12, T* restrict v13,  \
        T* restrict v14, T* restrict v15) {                                                  \
    e0 += ta; e1 += ta; e2 += ta; e3 += ta; o0 += ta; o1 += ta; o2 += ta; o3 += ta;          \
    for (ptrdiff_t q = 0; q < n; q++) {       /* tile columns 2q .. 2q + 3 of row i: */      \
        T r[4][4];                            /* E_i[q], O_i[q], E_i[q + 1], O_i[q + 1] */   \
        T d[4][4] = {{e0[q], o0[q], e0[q + 1], o0[q + 1]}, {e1[q], o1[q], e1[q + 1], o1[q + 1]}, \
                     {e2[q], o2[q], e2[q + 1], o2[q + 1]}, {e3[q], o3[q], e3[q + 1], o3[q + 1]}}; \
        for (int j = 0; j < 4; j++) {                                      /* r = B^T d */   \
            r[0][j] = d[0][j] - d[2][j];                                                     \
            r[1][j] = d[1][j] + d[2][j];                                                     \
            r[2][j] = d[2][j] - d[1][j];                                                     \
            r[3][j] = d[1][j] - d[3][j];                                                     \
        }                                                                  /* r B */         \
        v0[q] = r[0][0] - r[0][2]; v1[q] = r[0][1] + r[0][2];                                \
        v2[q] = r[0][2] - r[0][1]; v3[q] = r[0][1] - r[0][3];                                \
        v4[q] = r[1][0] - r[1][2]; v5[q] = r[1][1] + r[1][2];                                \
        v6[q] = r[1][2] - r[1][1]; v7[q] = r[1][1] - r[1][3];                                \
        v8[q] = r[2][0] - r[2][2]; v9[q] = r[2][1] + r[2][2];                                \
        v10[q] = r[2][2] - r[2][1]; v11[q] = r[2][1] - r[2][3];                              \
        v12[q] = r[3][0] - r[3][2]; v13[q] = r[3][1] + r[3][2];                              \
        v14[q] = r[3][2] - r[3][1]; v15[q] = r[3][1] - r[3][3];                              \
    }                                                                                        \
}                                                                                            \
/* The same V through a zero-padded copy of the input rows of up to a buffer's worth of tile */ \
/* rows at a time, each row stored split into its even and odd columns (E, O): tile q of a */   \
/* row then reads E[q], O[q], E[q + 1], O[q + 1], contiguous across tiles, so the loop over */  \
/* tiles vectorises (fc_wino_in_row's stride-2 loads did not), and no tile takes the */        \
/* bounds-checked path (the first and last tile rows and columns of a padded image: a */       \
/* quarter of a 32x32 image's tiles).  The padding is zeroed once per block of rows, then */   \
/* only the image's values are copied for each channel.  Returns 0 (nothing written) when */   \
/* one tile row's padded rows do not fit. */                                                   \
ATTR static int fc_wino_input_padded_##SUF(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,  \
        ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t TW, ptrdiff_t t0, ptrdiff_t nt, ptrdiff_t ld,   \
        T* V, ptrdiff_t CT) {                                                                      \
    T buf[FC_WINO_PAD_VALS];                                                                 \
    const ptrdiff_t S = TW + 1, Wp = 2 * S, rows = (FC_WINO_PAD_VALS / Wp - 2) / 2;           \
    if (nt <= 0 || rows < 1)                                                                 \
        return 0;                                                                            \
    /* padded column u = 2i (E[i]) or 2i + 1 (O[i]) holds x[.., u - pW] inside the image */   \
    const ptrdiff_t ua = pW > 0 ? pW : 0, ub = W + pW < Wp ? W + pW : Wp;                    \
    const ptrdiff_t ia = (ua + 1) / 2, ib = ub / 2;     /* pairs wholly inside: [ia, ib) */  \
    const ptrdiff_t tha = t0 / TW, thz = (t0 + nt - 1) / TW;                                 \
    for (ptrdiff_t th0 = tha; th0 <= thz; th0 += rows) {                                     \
        const ptrdiff_t th1 = thz - th0 + 1 < rows ? thz + 1 : th0 + rows;                   \
        const ptrdiff_t R = 2 * (th1 - th0) + 2, ih0 = 2 * th0 - pH;                         \
        const ptrdiff_t ra = ih0 < 0 ? -ih0 : 0, rb = H - ih0 < R ? H - ih0 : R;             \
        for (ptrdiff_t i = 0; i < R * Wp; i++) buf[i] = (T)0;                                \
        for (ptrdiff_t c = 0; c < C; c++) {                                                  \
            const T* xc = x + c * H * W;                                                     \
            for (ptrdiff_t r = ra; r < rb; r++) {                                            \
                const T* restrict xr = xc + (ih0 + r) * W - pW;   /* xr[u]: column u */      \
                T* restrict E = buf + r * Wp;                                                \
                T* restrict O = E + S;                                                       \
                if (sizeof(T) == sizeof(float) && FC_WINO_TILES512)                          \
                    fc_wino_split_f_avx512((const float*)xr, (float*)E, (float*)O, ia, ib);  \
                else                                                                         \
                    for (ptrdiff_t i = ia; i < ib; i++) {                                    \
                        E[i] = xr[2 * i];                                                    \
                        O[i] = xr[2 * i + 1];                                                \
                    }                                                                        \
                if (ua & 1) O[ua / 2] = xr[ua];                 /* odd first column */       \
                if (ub & 1) E[ub / 2] = xr[ub - 1];             /* even last column */       \
            }                                                                                \
            T* vc = V + c * ld - t0;                                                         \
            for (ptrdiff_t th = th0; th < th1; th++) {                                       \
                ptrdiff_t ta = th * TW < t0 ? t0 - th * TW : 0;                              \
                ptrdiff_t tb = (th + 1) * TW > t0 + nt ? t0 + nt - th * TW : TW;             \
                const T* restrict e0 = buf + 2 * (th - th0) * Wp;                            \
                const T* restrict e1 = e0 + Wp;                                              \
                const T* restrict e2 = e1 + Wp;                                              \
                const T* restrict e3 = e2 + Wp;                                              \
                T* vt = vc + th * TW + ta;                                                   \
                if (sizeof(T) == sizeof(float) && FC_WINO_TILES512) {                        \
                    fc_wino_in_tiles_f_avx512((const float*)e0, (const float*)e1,            \
                        (const float*)e2, (const float*)e3, S, tb - ta, ta, (float*)vt, CT); \
                    continue;                                                                \
                }                                                                            \
                fc_wino_in_tiles_##SUF(e0, e1, e2, e3, e0 + S, e1 + S, e2 + S, e3 + S,       \
                    tb - ta, ta, vt, vt + CT, vt + 2 * CT, vt + 3 * CT, vt + 4 * CT,         \
                    vt + 5 * CT, vt + 6 * CT, vt + 7 * CT, vt + 8 * CT, vt + 9 * CT,         \
                    vt + 10 * CT, vt + 11 * CT, vt + 12 * CT, vt + 13 * CT, vt + 14 * CT,    \
                    vt + 15 * CT);                                                           \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    return 1;                                                                                \
}                                                                                            \
ATTR static void fc_wino_input_##SUF(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,          \
                                ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t TW, ptrdiff_t t0,     \
                                ptrdiff_t nt, ptrdiff_t ld, T* V, ptrdiff_t CT) {            \
    /* tiles tw in [twa, twb) have all four columns in the image */                        \
    /* (within the tile row: twb <= TW; pW < 0 crops, as grad_x's convolution does) */      \
    if (fc_wino_input_padded_##SUF(x, C, H, W, pH, pW, TW, t0, nt, ld, V, CT))                  \
        return;                                                                              \
    const ptrdiff_t twa = pW > 0 ? (pW + 1) / 2 : 0;                                         \
    ptrdiff_t twb = W - 4 + pW >= 0 ? (W - 4 + pW) / 2 + 1 : 0;                              \
    twb = twb < TW ? twb : TW;                                                               \
    for (ptrdiff_t c = 0; c < C; c++) {                                                      \
        const T* xc = x + c * H * W;                                                         \
        T* vc = V + c * ld - t0;                                                             \
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
                                 ptrdiff_t nt, ptrdiff_t ld, ptrdiff_t OH, ptrdiff_t OW,     \
                                 const T* b, T* out, ptrdiff_t LT) {                                     \
    for (ptrdiff_t l = 0; l < L; l++) {                                                      \
        const T bias = b ? b[l] : (T)0;                                                      \
        T* ol = out + l * OH * OW;                                                           \
        for (ptrdiff_t t = t0; t < t0 + nt; t++) {                                           \
            const ptrdiff_t th = t / TW, tw = t - th * TW;                                   \
            if (2 * th + 1 < OH && 2 * tw + 1 < OW) {    /* a run of whole tiles */          \
                ptrdiff_t n = OW / 2 - tw < t0 + nt - t ? OW / 2 - tw : t0 + nt - t;         \
                fc_wino_out_row_##SUF(M + l * ld + (t - t0), LT, n, bias,                    \
                                      ol + 2 * th * OW + 2 * tw, ol + (2 * th + 1) * OW + 2 * tw); \
                t += n - 1;                                                                  \
                continue;                                                                    \
            }                                                                                \
            {                                                                                \
                const T* mp = M + l * ld + (t - t0);                                         \
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
static void fc_wino_weights_##S(const T* w, ptrdiff_t L, ptrdiff_t C, ptrdiff_t l0,        \
                                ptrdiff_t l1, T* U) {                                        \
    FC_PICK(fc_wino_weights_##S, w, L, C, l0, l1, U);                                        \
}                                                                                            \
static int fc_wino_finite_##S(const T* x, ptrdiff_t n) {                                     \
    return FC_PICK(fc_wino_finite_##S, x, n);                                                \
}                                                                                            \
static void fc_wino_input_##S(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,             \
                              ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t TW, ptrdiff_t t0,        \
                              ptrdiff_t nt, ptrdiff_t ld, T* V, ptrdiff_t CT) {              \
    FC_PICK(fc_wino_input_##S, x, C, H, W, pH, pW, TW, t0, nt, ld, V, CT);                       \
}                                                                                            \
static void fc_wino_output_##S(const T* M, ptrdiff_t L, ptrdiff_t TW, ptrdiff_t t0,          \
                               ptrdiff_t nt, ptrdiff_t ld, ptrdiff_t OH, ptrdiff_t OW,       \
                               const T* b, T* out, ptrdiff_t LT) {                           \
    FC_PICK(fc_wino_output_##S, M, L, TW, t0, nt, ld, OH, OW, b, out, LT);                       \
}
FC_WINO_DISPATCH(float, f)
FC_WINO_DISPATCH(double, d)

/* The weight gradient of F(2x2, 3x3), by the transposition of the forward: with
 * M = U * V (element-wise) and Y = A^T M A for each tile, dM = A dY A^T, so
 *     dU[xi] (L x C) = sum over tiles of Z[xi] (L x T) @ V[xi]^T (T x C),  Z = A dY A^T,
 * 16 GEMMs over the tiles (their sum over a batch's images too), then dW = G^T dU G for each
 * (l, c): 16 multiplies per tile and (l, c) where im2col + GEMM takes 36.  V is the forward's
 * input transform; A = [1 0; 1 1; 1 -1; 0 -1], G^T = [1 .5 .5 0; 0 .5 -.5 0; 0 .5 .5 1].
 * Infinities and NaN mix across a tile's 16 terms (and, through G^T dU G, across the 9
 * taps), so the caller checks both inputs with fc_wino_finite first, as the forward does.
 *
 * Layouts: gy (L, OH, OW); Z [16][L][nt] with the planes LT values apart, as V; D [16][C][L]
 * (dU transposed, as the GEMM with V as its A makes it); gw (L, C, 3, 3). */
/* m[xi][l] = the sum over the P parts (PS values apart) of D[xi][c][l0 + l], for the a planes
 * and nl output channels from l0: the weight gradient's last step, both kernel sizes */
#define FC_WINOG_PARTS(T, m, a, D, P, PS, CL, c, L, l0, nl)                                  \
    for (int xi_ = 0; xi_ < (a); xi_++) {                                                    \
        const T* d_ = (D) + xi_ * (CL) + (c) * (L) + (l0);                                   \
        for (ptrdiff_t l_ = 0; l_ < (nl); l_++) m[xi_][l_] = d_[l_];                         \
        for (ptrdiff_t p_ = 1; p_ < (P); p_++)                                               \
            for (ptrdiff_t l_ = 0; l_ < (nl); l_++) m[xi_][l_] += d_[p_ * (PS) + l_];        \
    }
#define FC_WINOG(T, SUF, ATTR)                                                               \
/* Z for n consecutive tiles of one tile row whose 2x2 outputs lie inside the plane, g0 and */ \
/* g1 at the first one's two rows: stride-2 loads, contiguous stores across tiles */          \
ATTR static inline void fc_wino_gout_row_##SUF(const T* restrict g0, const T* restrict g1,        \
        ptrdiff_t n, T* restrict z0, T* restrict z1, T* restrict z2, T* restrict z3,         \
        T* restrict z4, T* restrict z5, T* restrict z6, T* restrict z7, T* restrict z8,      \
        T* restrict z9, T* restrict z10, T* restrict z11, T* restrict z12,                   \
        T* restrict z13, T* restrict z14, T* restrict z15) {                                 \
    for (ptrdiff_t q = 0; q < n; q++) {                                                      \
        T a = g0[2 * q], b = g0[2 * q + 1], c = g1[2 * q], d = g1[2 * q + 1];                \
        T s10 = a + c, s11 = b + d, s20 = a - c, s21 = b - d;        /* s = A dy */          \
        z0[q] = a; z1[q] = a + b; z2[q] = a - b; z3[q] = -b;         /* z = s A^T */         \
        z4[q] = s10; z5[q] = s10 + s11; z6[q] = s10 - s11; z7[q] = -s11;                     \
        z8[q] = s20; z9[q] = s20 + s21; z10[q] = s20 - s21; z11[q] = -s21;                   \
        z12[q] = -c; z13[q] = -(c + d); z14[q] = d - c; z15[q] = d;                          \
    }                                                                                        \
}                                                                                            \
/* Z for tiles [t0, t0 + nt) of gy (zero outside OH x OW); plane 5 holds each tile's sum */ \
/* of its outputs (the bias gradient's terms) */                                              \
ATTR static void fc_wino_gout_##SUF(const T* gy, ptrdiff_t L, ptrdiff_t OH, ptrdiff_t OW,       \
                                    ptrdiff_t TW, ptrdiff_t t0, ptrdiff_t nt, ptrdiff_t ld,  \
                                    T* Z, ptrdiff_t LT) {                                    \
    for (ptrdiff_t l = 0; l < L; l++) {                                                      \
        const T* gl = gy + l * OH * OW;                                                      \
        T* zl = Z + l * ld - t0;                                                             \
        for (ptrdiff_t t = t0; t < t0 + nt; t++) {                                           \
            const ptrdiff_t th = t / TW, tw = t - th * TW;                                   \
            if (2 * th + 1 < OH && 2 * tw + 1 < OW) {    /* a run of whole tiles */          \
                ptrdiff_t n = OW / 2 - tw < t0 + nt - t ? OW / 2 - tw : t0 + nt - t;         \
                T* z = zl + t;                                                               \
                const T* g0 = gl + 2 * th * OW + 2 * tw;                                     \
                fc_wino_gout_row_##SUF(g0, g0 + OW, n, z, z + LT, z + 2 * LT,         \
                    z + 3 * LT, z + 4 * LT, z + 5 * LT, z + 6 * LT, z + 7 * LT, z + 8 * LT,  \
                    z + 9 * LT, z + 10 * LT, z + 11 * LT, z + 12 * LT, z + 13 * LT,          \
                    z + 14 * LT, z + 15 * LT);                                               \
                t += n - 1;                                                                  \
                continue;                                                                    \
            }                                                                                \
            {                                  /* a tile at the plane's bottom or right */   \
                const ptrdiff_t oh = 2 * th, ow = 2 * tw;                                    \
                T a = gl[oh * OW + ow];                                                      \
                T b = ow + 1 < OW ? gl[oh * OW + ow + 1] : (T)0;                             \
                T c = oh + 1 < OH ? gl[(oh + 1) * OW + ow] : (T)0;                           \
                T d = oh + 1 < OH && ow + 1 < OW ? gl[(oh + 1) * OW + ow + 1] : (T)0;        \
                T s10 = a + c, s11 = b + d, s20 = a - c, s21 = b - d;                        \
                T* z = zl + t;                                                               \
                z[0] = a; z[LT] = a + b; z[2 * LT] = a - b; z[3 * LT] = -b;                  \
                z[4 * LT] = s10; z[5 * LT] = s10 + s11; z[6 * LT] = s10 - s11;               \
                z[7 * LT] = -s11;                                                            \
                z[8 * LT] = s20; z[9 * LT] = s20 + s21; z[10 * LT] = s20 - s21;              \
                z[11 * LT] = -s21;                                                           \
                z[12 * LT] = -c; z[13 * LT] = -(c + d); z[14 * LT] = d - c; z[15 * LT] = d;  \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
/* gw[l][c] = G^T (sum over the parts of D[xi][c][l]) G for input channel c and every l: */   \
/* parts P, PS values apart; gw (L, C, 3, 3) */                                              \
ATTR static void fc_wino_wgrad_##SUF(const T* D, ptrdiff_t P, ptrdiff_t PS, ptrdiff_t C,      \
                                     ptrdiff_t L, ptrdiff_t c, T* gw) {                      \
    const ptrdiff_t CL = C * L;                                                              \
    T m[16][64];                                                                             \
    for (ptrdiff_t l0 = 0; l0 < L; l0 += 64) {                                               \
        const ptrdiff_t nl = L - l0 < 64 ? L - l0 : 64;                                      \
        FC_WINOG_PARTS(T, m, 16, D, P, PS, CL, c, L, l0, nl)                                 \
        for (ptrdiff_t l = 0; l < nl; l++) {                                                 \
            T r[3][4], *o = gw + ((l0 + l) * C + c) * 9;                                     \
            for (int j = 0; j < 4; j++) {                              /* r = G^T m */       \
                T p = m[4 + j][l] + m[8 + j][l], q = m[4 + j][l] - m[8 + j][l];              \
                r[0][j] = m[j][l] + (T)0.5 * p;                                              \
                r[1][j] = (T)0.5 * q;                                                        \
                r[2][j] = (T)0.5 * p + m[12 + j][l];                                         \
            }                                                                                \
            for (int a = 0; a < 3; a++) {                              /* dg = r G */        \
                T p = r[a][1] + r[a][2], q = r[a][1] - r[a][2];                              \
                o[3 * a] = r[a][0] + (T)0.5 * p;                                             \
                o[3 * a + 1] = (T)0.5 * q;                                                   \
                o[3 * a + 2] = (T)0.5 * p + r[a][3];                                         \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}

FC_WINOG(float, f_base, )
FC_WINOG(double, d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_WINOG(float, f_avx2, FC_AVX2)
FC_WINOG(double, d_avx2, FC_AVX2)
#endif
#define FC_WINOG_DISPATCH(T, S)                                                              \
static void fc_wino_gout_##S(const T* gy, ptrdiff_t L, ptrdiff_t OH, ptrdiff_t OW,           \
                             ptrdiff_t TW, ptrdiff_t t0, ptrdiff_t nt, ptrdiff_t ld, T* Z,   \
                             ptrdiff_t LT) {                                                 \
    FC_PICK(fc_wino_gout_##S, gy, L, OH, OW, TW, t0, nt, ld, Z, LT);                         \
}                                                                                            \
static void fc_wino_wgrad_##S(const T* D, ptrdiff_t P, ptrdiff_t PS, ptrdiff_t C,            \
                              ptrdiff_t L, ptrdiff_t c, T* gw) {                             \
    FC_PICK(fc_wino_wgrad_##S, D, P, PS, C, L, c, gw);                                       \
}
FC_WINOG_DISPATCH(float, f)
FC_WINOG_DISPATCH(double, d)

/* Winograd F(2x2, 5x5) for 5x5 stride-1 convolutions: 6x6 input patches at stride 2, the
 * points 0, 1, -1, 2, -2 and infinity (the F(4, 3) input transform's), 36 multiplies per 4
 * outputs instead of 100 (2.78x fewer flops in the GEMMs):
 *     B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
 *            0 4 0 -5 0 1],
 *     G = [1/4 0 0 0 0; -1/6 -1/6 -1/6 -1/6 -1/6; -1/6 1/6 -1/6 1/6 -1/6;
 *          1/24 1/12 1/6 1/3 2/3; 1/24 -1/12 1/6 -1/3 2/3; 0 0 0 0 1],
 *     A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 1].
 * The same layouts as above with 36 planes (U [36][L][C], V [36][C][nt], M [36][L][nt]) and
 * the same rules: terms written out (no multiplications by 0), images with an infinity or
 * NaN convolved directly by the caller.  float32 rounding: about 7x that of the direct sum
 * (2e-6 of the largest output against 3e-7 for 32 channels of N(0, 1)).  The transforms
 * run on blocks of FC_W5B tiles held in local arrays, so that every step is a loop over the
 * block that vectorises (one AVX2 register of floats). */
#define FC_W5B 8

/* o = B^T d for six vectors of a block (d[j][v], o[k][v]) */
#define FC_W5_BT(T, o, d)                                                                       \
    for (int v_ = 0; v_ < FC_W5B; v_++) {                                                    \
        T a_ = d[4][v_] - 4 * d[2][v_], b_ = d[3][v_] - 4 * d[1][v_];                          \
        T c_ = d[4][v_] - d[2][v_], e_ = 2 * (d[3][v_] - d[1][v_]);                            \
        o[0][v_] = (4 * d[0][v_] - 5 * d[2][v_]) + d[4][v_];                                   \
        o[1][v_] = a_ + b_;                                                                  \
        o[2][v_] = a_ - b_;                                                                  \
        o[3][v_] = c_ + e_;                                                                  \
        o[4][v_] = c_ - e_;                                                                  \
        o[5][v_] = (4 * d[1][v_] - 5 * d[3][v_]) + d[5][v_];                                   \
    }

#define FC_WINO5(T, SUF, ATTR)                                                               \
ATTR static void fc_wino5_weights_##SUF(const T* w, ptrdiff_t L, ptrdiff_t C, ptrdiff_t l0,  \
                                        ptrdiff_t l1, T* U) {                                \
    /* U = G g G^T for every (l, c) of output channels [l0, l1), 64 input channels at a */   \
    /* time, their 25 taps first gathered into rows (g[j][c]) so that the work runs along c */ \
    const ptrdiff_t LC = L * C;                                                              \
    T g[25][64], t[6][5][64];                                                                \
    for (ptrdiff_t l = l0; l < l1; l++)                                                      \
        for (ptrdiff_t c0 = 0; c0 < C; c0 += 64) {                                           \
            ptrdiff_t nc = C - c0 < 64 ? C - c0 : 64;                                        \
            const T* src = w + (l * C + c0) * 25;                                            \
            for (ptrdiff_t c = 0; c < nc; c++)                                               \
                for (int j = 0; j < 25; j++) g[j][c] = src[c * 25 + j];                      \
            for (int j = 0; j < 5; j++)                    /* t = G g (column j) */          \
                for (ptrdiff_t c = 0; c < nc; c++) {                                         \
                    T g0 = g[j][c], g1 = g[5 + j][c], g2 = g[10 + j][c];                     \
                    T g3 = g[15 + j][c], g4 = g[20 + j][c];                                  \
                    t[0][j][c] = g0 * (T)0.25;                                               \
                    t[1][j][c] = ((((g0 + g1) + g2) + g3) + g4) * (T)(-1.0 / 6);             \
                    t[2][j][c] = ((((g0 - g1) + g2) - g3) + g4) * (T)(-1.0 / 6);             \
                    t[3][j][c] = ((((g0 + 2 * g1) + 4 * g2) + 8 * g3) + 16 * g4) * (T)(1.0 / 24); \
                    t[4][j][c] = ((((g0 - 2 * g1) + 4 * g2) - 8 * g3) + 16 * g4) * (T)(1.0 / 24); \
                    t[5][j][c] = g4;                                                         \
                }                                                                            \
            for (int i = 0; i < 6; i++) {                  /* u = t G^T */                   \
                T* u = U + (i * 6) * LC + l * C + c0;                                        \
                for (ptrdiff_t c = 0; c < nc; c++) {                                         \
                    T g0 = t[i][0][c], g1 = t[i][1][c], g2 = t[i][2][c];                     \
                    T g3 = t[i][3][c], g4 = t[i][4][c];                                      \
                    u[c] = g0 * (T)0.25;                                                     \
                    u[LC + c] = ((((g0 + g1) + g2) + g3) + g4) * (T)(-1.0 / 6);              \
                    u[2 * LC + c] = ((((g0 - g1) + g2) - g3) + g4) * (T)(-1.0 / 6);          \
                    u[3 * LC + c] = ((((g0 + 2 * g1) + 4 * g2) + 8 * g3) + 16 * g4) * (T)(1.0 / 24); \
                    u[4 * LC + c] = ((((g0 - 2 * g1) + 4 * g2) - 8 * g3) + 16 * g4) * (T)(1.0 / 24); \
                    u[5 * LC + c] = g4;                                                      \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
}                                                                                            \
                                                                                             \
/* V for tiles [ta, tb) of one tile row from its six padded input rows, each split into */    \
/* its even and odd columns (e[i], e[i] + S): tile q's row i is E[q], O[q], E[q + 1], */      \
/* O[q + 1], E[q + 2], O[q + 2], contiguous across tiles; rows are read up to FC_W5B - 1 */  \
/* values past tb + 2 (the buffer's slack), never stored */                                  \
ATTR static void fc_wino5_in_tiles_##SUF(const T* const* e, ptrdiff_t S, ptrdiff_t ta,        \
                                         ptrdiff_t tb, T* v, ptrdiff_t CT, int spill) {      \
    for (ptrdiff_t q0 = ta; q0 < tb; q0 += FC_W5B) {                                         \
        T s[6][6][FC_W5B], d[6][FC_W5B], o[6][FC_W5B];                                       \
        for (int i = 0; i < 6; i++) {                      /* s_i = row i of d B */          \
            const T* E = e[i] + q0;                                                          \
            const T* O = E + S;                                                              \
            for (int v_ = 0; v_ < FC_W5B; v_++) {                                            \
                d[0][v_] = E[v_]; d[1][v_] = O[v_]; d[2][v_] = E[v_ + 1];                    \
                d[3][v_] = O[v_ + 1]; d[4][v_] = E[v_ + 2]; d[5][v_] = O[v_ + 2];            \
            }                                                                                \
            FC_W5_BT(T, s[i], d)                                                                \
        }                                                                                    \
        const ptrdiff_t nb = tb - q0 < FC_W5B ? tb - q0 : FC_W5B;                            \
        for (int l = 0; l < 6; l++) {                      /* column l of B^T s */           \
            for (int i = 0; i < 6; i++)                                                      \
                for (int v_ = 0; v_ < FC_W5B; v_++) d[i][v_] = s[i][l][v_];                  \
            FC_W5_BT(T, o, d)                                                                 \
            for (int k = 0; k < 6; k++) {                                                    \
                T* dst = v + (k * 6 + l) * CT + q0;                                          \
                if (nb == FC_W5B || spill)                                                   \
                    for (int v_ = 0; v_ < FC_W5B; v_++) dst[v_] = o[k][v_];                  \
                else                                                                         \
                    for (ptrdiff_t v_ = 0; v_ < nb; v_++) dst[v_] = o[k][v_];                \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* V for tiles [t0, t0 + nt) of x (C, H, W; pH, pW: top and left padding, negative crops): */ \
/* the input rows of a block of tile rows copied zero-padded and split into even and odd */   \
/* columns (the padding zeroed once a block, then only the image's values copied per */       \
/* channel); tile rows too wide for the buffer one tile (scalar, bounds-checked) at a time */ \
ATTR static void fc_wino5_input_##SUF(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,        \
        ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t TW, ptrdiff_t t0, ptrdiff_t nt, ptrdiff_t ld,   \
        T* V, ptrdiff_t CT) {                                                                \
    T buf[FC_WINO_PAD_VALS];                                                                 \
    const ptrdiff_t S = TW + 2 + FC_W5B, Wp = 2 * S;                                         \
    const ptrdiff_t rows = (FC_WINO_PAD_VALS / Wp - 4) / 2;                                  \
    if (nt <= 0)                                                                             \
        return;                                                                              \
    const ptrdiff_t tha = t0 / TW, thz = (t0 + nt - 1) / TW;                                 \
    if (rows < 1) {                                                                          \
        for (ptrdiff_t c = 0; c < C; c++)                                                    \
            for (ptrdiff_t t = t0; t < t0 + nt; t++) {                                       \
                const ptrdiff_t th = t / TW, tw = t - th * TW;                               \
                T d[6][6], r[6][6];                                                          \
                for (int i = 0; i < 6; i++)                                                  \
                    for (int j = 0; j < 6; j++) {                                            \
                        ptrdiff_t ih = 2 * th - pH + i, iw = 2 * tw - pW + j;                \
                        d[i][j] = (ih >= 0 && ih < H && iw >= 0 && iw < W)                   \
                                  ? x[(c * H + ih) * W + iw] : (T)0;                         \
                    }                                                                        \
                for (int i = 0; i < 6; i++) {              /* r = d B (row by row) */        \
                    T a_ = d[i][4] - 4 * d[i][2], b_ = d[i][3] - 4 * d[i][1];                \
                    T c_ = d[i][4] - d[i][2], e_ = 2 * (d[i][3] - d[i][1]);                  \
                    r[i][0] = (4 * d[i][0] - 5 * d[i][2]) + d[i][4];                         \
                    r[i][1] = a_ + b_; r[i][2] = a_ - b_; r[i][3] = c_ + e_;                 \
                    r[i][4] = c_ - e_;                                                       \
                    r[i][5] = (4 * d[i][1] - 5 * d[i][3]) + d[i][5];                         \
                }                                                                            \
                T* vt = V + c * ld + (t - t0);                                               \
                for (int l = 0; l < 6; l++) {              /* B^T r (column by column) */    \
                    T a_ = r[4][l] - 4 * r[2][l], b_ = r[3][l] - 4 * r[1][l];                \
                    T c_ = r[4][l] - r[2][l], e_ = 2 * (r[3][l] - r[1][l]);                  \
                    vt[l * CT] = (4 * r[0][l] - 5 * r[2][l]) + r[4][l];                      \
                    vt[(6 + l) * CT] = a_ + b_;                                              \
                    vt[(12 + l) * CT] = a_ - b_;                                             \
                    vt[(18 + l) * CT] = c_ + e_;                                             \
                    vt[(24 + l) * CT] = c_ - e_;                                             \
                    vt[(30 + l) * CT] = (4 * r[1][l] - 5 * r[3][l]) + r[5][l];               \
                }                                                                            \
            }                                                                                \
        return;                                                                              \
    }                                                                                        \
    /* padded column u = 2i (E[i]) or 2i + 1 (O[i]) holds x[.., u - pW] inside the image */   \
    const ptrdiff_t ua = pW > 0 ? pW : 0, ub = W + pW < 2 * (TW + 2) ? W + pW : 2 * (TW + 2); \
    const ptrdiff_t ia = (ua + 1) / 2, ib = ub / 2;     /* pairs wholly inside: [ia, ib) */  \
    /* one block of tile rows: a tile row's last block may store all FC_W5B lanes, the */    \
    /* extra ones landing on tiles stored after it (the next tile row's, the next */         \
    /* channel's) or in the planes' padding past the last channel (>= FC_W5B values) */      \
    const int spill = thz - tha + 1 <= rows;                                                 \
    for (ptrdiff_t th0 = tha; th0 <= thz; th0 += rows) {                                     \
        const ptrdiff_t th1 = thz - th0 + 1 < rows ? thz + 1 : th0 + rows;                   \
        const ptrdiff_t R = 2 * (th1 - th0) + 4, ih0 = 2 * th0 - pH;                         \
        const ptrdiff_t ra = ih0 < 0 ? -ih0 : 0, rb = H - ih0 < R ? H - ih0 : R;             \
        for (ptrdiff_t i = 0; i < R * Wp; i++) buf[i] = (T)0;                                \
        for (ptrdiff_t c = 0; c < C; c++) {                                                  \
            const T* xc = x + c * H * W;                                                     \
            for (ptrdiff_t r = ra; r < rb; r++) {                                            \
                const T* xr = xc + (ih0 + r) * W - pW;            /* xr[u]: column u */      \
                T* E = buf + r * Wp;                                                         \
                T* O = E + S;                                                                \
                for (ptrdiff_t i = ia; i < ib; i++) {                                        \
                    E[i] = xr[2 * i];                                                        \
                    O[i] = xr[2 * i + 1];                                                    \
                }                                                                            \
                if (ua & 1) O[ua / 2] = xr[ua];                 /* odd first column */       \
                if (ub & 1) E[ub / 2] = xr[ub - 1];             /* even last column */       \
            }                                                                                \
            T* vc = V + c * ld - t0;                                                         \
            for (ptrdiff_t th = th0; th < th1; th++) {                                       \
                ptrdiff_t ta = th * TW < t0 ? t0 - th * TW : 0;                              \
                ptrdiff_t tb = (th + 1) * TW > t0 + nt ? t0 + nt - th * TW : TW;             \
                const T* e[6];                                                               \
                for (int i = 0; i < 6; i++) e[i] = buf + (2 * (th - th0) + i) * Wp;          \
                fc_wino5_in_tiles_##SUF(e, S, ta, tb, vc + th * TW, CT, spill);              \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* out (+ bias when b is not NULL; out NULL: not stored) from M for tiles [t0, t0 + nt), */  \
/* their parts inside OH x OW (then max(., 0) when relu): blocks of FC_W5B consecutive */    \
/* tiles (across tile rows), A^T m A in local arrays, then each tile's 2x2 stored.  pool */  \
/* (not NULL): also each whole tile's max (NaN kept) into the POH x POW planes there: a */   \
/* 2x2 stride-2 max-pool, whose windows are the tiles.  The last block's loads run up to */  \
/* FC_W5B - 1 values past the chunk's tiles (the row's slack, the next row or the */         \
/* planes' padding: read, never stored) */                                                   \
ATTR static void fc_wino5_output_##SUF(const T* M, ptrdiff_t L, ptrdiff_t TW, ptrdiff_t t0,     \
                                       ptrdiff_t nt, ptrdiff_t ld, ptrdiff_t OH,             \
                                       ptrdiff_t OW, const T* b, T* out, ptrdiff_t LT,       \
                                       int relu, T* pool, ptrdiff_t POH, ptrdiff_t POW) {    \
    for (ptrdiff_t l = 0; l < L; l++) {                                                      \
        const T bias = b ? b[l] : (T)0;                                                      \
        T* ol = out ? out + l * OH * OW : NULL;                                              \
        T* pl = pool ? pool + l * POH * POW : NULL;                                          \
        const T* ml = M + l * ld;                                                            \
        ptrdiff_t th = t0 / TW, tw = t0 - th * TW;                                           \
        for (ptrdiff_t q0 = 0; q0 < nt; q0 += FC_W5B) {                                      \
            const ptrdiff_t nb = nt - q0 < FC_W5B ? nt - q0 : FC_W5B;                        \
            T s[2][6][FC_W5B], y[4][FC_W5B], pm[FC_W5B];                                     \
            for (int j = 0; j < 6; j++) {                  /* s = A^T m, column j */         \
                T m[6][FC_W5B];                                                              \
                for (int i = 0; i < 6; i++) {                                                \
                    const T* mp = ml + (i * 6 + j) * LT + q0;                                \
                    for (int v_ = 0; v_ < FC_W5B; v_++) m[i][v_] = mp[v_];                   \
                }                                                                            \
                for (int v_ = 0; v_ < FC_W5B; v_++) {                                        \
                    s[0][j][v_] = (((m[0][v_] + m[1][v_]) + m[2][v_]) + m[3][v_]) + m[4][v_]; \
                    s[1][j][v_] = ((m[1][v_] - m[2][v_]) + 2 * (m[3][v_] - m[4][v_]))        \
                                  + m[5][v_];                                                \
                }                                                                            \
            }                                                                                \
            for (int v_ = 0; v_ < FC_W5B; v_++) {            /* y = s A */                   \
                T y_[4];                                                                     \
                for (int i = 0; i < 2; i++) {                                                \
                    T a_ = ((((s[i][0][v_] + s[i][1][v_]) + s[i][2][v_])                     \
                             + s[i][3][v_]) + s[i][4][v_]) + bias;                           \
                    T c_ = (((s[i][1][v_] - s[i][2][v_])                                     \
                             + 2 * (s[i][3][v_] - s[i][4][v_])) + s[i][5][v_]) + bias;       \
                    if (relu) {          /* max(y, 0) as nn.ReLU: NaN kept, -0 -> +0 */      \
                        a_ = (a_ > (T)0) | (a_ != a_) ? a_ : (T)0;                           \
                        c_ = (c_ > (T)0) | (c_ != c_) ? c_ : (T)0;                           \
                    }                                                                        \
                    y_[2 * i] = a_;                                                          \
                    y_[2 * i + 1] = c_;                                                      \
                }                                                                            \
                if (pl) {               /* the 2x2 max, NaN kept (as max_pool2d) */          \
                    T m_ = y_[0];                                                            \
                    m_ = (y_[1] > m_) | (y_[1] != y_[1]) ? y_[1] : m_;                       \
                    m_ = (y_[2] > m_) | (y_[2] != y_[2]) ? y_[2] : m_;                       \
                    m_ = (y_[3] > m_) | (y_[3] != y_[3]) ? y_[3] : m_;                       \
                    pm[v_] = m_;                                                             \
                }                                                                            \
                for (int k = 0; k < 4; k++) y[k][v_] = y_[k];                                \
            }                                                                                \
            for (ptrdiff_t v_ = 0; v_ < nb; v_++) {                                          \
                if (pl && th < POH && tw < POW) pl[th * POW + tw] = pm[v_];                  \
                if (ol) {                                                                    \
                    T* o0 = ol + 2 * th * OW + 2 * tw;                                       \
                    if (2 * th + 1 < OH && 2 * tw + 1 < OW) {  /* a whole tile */            \
                        o0[0] = y[0][v_]; o0[1] = y[1][v_];                                  \
                        o0[OW] = y[2][v_]; o0[OW + 1] = y[3][v_];                            \
                    } else                                                                   \
                        for (int i = 0; i < 2 && 2 * th + i < OH; i++) {                     \
                            o0[i * OW] = y[2 * i][v_];                                       \
                            if (2 * tw + 1 < OW) o0[i * OW + 1] = y[2 * i + 1][v_];          \
                        }                                                                    \
                }                                                                            \
                if (++tw == TW) {                                                            \
                    tw = 0;                                                                  \
                    th++;                                                                    \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}

FC_WINO5(float, f_base, )
FC_WINO5(double, d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_WINO5(float, f_avx2, FC_AVX2)
FC_WINO5(double, d_avx2, FC_AVX2)
#endif
#define FC_WINO5_DISPATCH(T, S)                                                              \
static void fc_wino5_weights_##S(const T* w, ptrdiff_t L, ptrdiff_t C, ptrdiff_t l0,       \
                                 ptrdiff_t l1, T* U) {                                       \
    FC_PICK(fc_wino5_weights_##S, w, L, C, l0, l1, U);                                       \
}                                                                                            \
static void fc_wino5_input_##S(const T* x, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,            \
                               ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t TW, ptrdiff_t t0,       \
                               ptrdiff_t nt, ptrdiff_t ld, T* V, ptrdiff_t CT) {             \
    FC_PICK(fc_wino5_input_##S, x, C, H, W, pH, pW, TW, t0, nt, ld, V, CT);                  \
}                                                                                            \
static void fc_wino5_output_##S(const T* M, ptrdiff_t L, ptrdiff_t TW, ptrdiff_t t0,         \
                                ptrdiff_t nt, ptrdiff_t ld, ptrdiff_t OH, ptrdiff_t OW,      \
                                const T* b, T* out, ptrdiff_t LT, int relu, T* pool,         \
                                ptrdiff_t POH, ptrdiff_t POW) {                              \
    FC_PICK(fc_wino5_output_##S, M, L, TW, t0, nt, ld, OH, OW, b, out, LT, relu, pool, POH,  \
            POW);                                                                            \
}
FC_WINO5_DISPATCH(float, f)
FC_WINO5_DISPATCH(double, d)

/* The weight gradient of F(2x2, 5x5), as F(2x2, 3x3)'s above: 36 planes, Z = A dY A^T with
 * A = [1 0; 1 1; 1 -1; 1 2; 1 -2; 0 1], V the forward's input transform, dW = G^T dU G with
 * the G of F(2x2, 5x5); plane 7 holds each tile's sum of its outputs (the bias gradient's).
 * Layouts: Z [36][L][nt], D [36][C][L], gw (L, C, 5, 5). */
#define FC_WINOG5(T, SUF, ATTR)                                                              \
ATTR static void fc_wino5_gout_##SUF(const T* gy, ptrdiff_t L, ptrdiff_t OH, ptrdiff_t OW,      \
                                     ptrdiff_t TW, ptrdiff_t t0, ptrdiff_t nt, ptrdiff_t ld, \
                                     T* Z, ptrdiff_t LT) {                                   \
    for (ptrdiff_t l = 0; l < L; l++) {                                                      \
        const T* gl = gy + l * OH * OW;                                                      \
        T* zl = Z + l * ld - t0;                                                             \
        for (ptrdiff_t t = t0; t < t0 + nt; t++) {                                           \
            const ptrdiff_t th = t / TW, tw = t - th * TW, oh = 2 * th, ow = 2 * tw;         \
            const int right = ow + 1 < OW, below = oh + 1 < OH;                              \
            T d[2][2] = {{gl[oh * OW + ow], right ? gl[oh * OW + ow + 1] : (T)0},            \
                         {below ? gl[(oh + 1) * OW + ow] : (T)0,                             \
                          below && right ? gl[(oh + 1) * OW + ow + 1] : (T)0}};               \
            T s[6][2];                                                   /* s = A dy */     \
            for (int b = 0; b < 2; b++) {                                                    \
                s[0][b] = d[0][b];                                                           \
                s[1][b] = d[0][b] + d[1][b];                                                 \
                s[2][b] = d[0][b] - d[1][b];                                                 \
                s[3][b] = d[0][b] + 2 * d[1][b];                                             \
                s[4][b] = d[0][b] - 2 * d[1][b];                                             \
                s[5][b] = d[1][b];                                                           \
            }                                                                                \
            T* z = zl + t;                                                                   \
            for (int i = 0; i < 6; i++) {                                /* z = s A^T */    \
                z[(6 * i) * LT] = s[i][0];                                                   \
                z[(6 * i + 1) * LT] = s[i][0] + s[i][1];                                     \
                z[(6 * i + 2) * LT] = s[i][0] - s[i][1];                                     \
                z[(6 * i + 3) * LT] = s[i][0] + 2 * s[i][1];                                 \
                z[(6 * i + 4) * LT] = s[i][0] - 2 * s[i][1];                                 \
                z[(6 * i + 5) * LT] = s[i][1];                                               \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}

/* The last step, from the partial sums D (double) into gw (TO): float32's sums are kept in
 * double across chunks, each chunk's GEMMs summing in float32 (float32 sums over all tiles
 * had 10-15x im2col's rounding, 3e-5 of the largest value for LeNet's conv2 at batch 64) */
#define FC_WINOG5W(TO, SUF, ATTR)                                                            \
ATTR static void fc_wino5_wgrad_##SUF(const double* D, ptrdiff_t P, ptrdiff_t PS,              \
                                      ptrdiff_t C, ptrdiff_t L, ptrdiff_t c, TO* gw) {       \
    typedef double T;                                                                        \
    const ptrdiff_t CL = C * L;                                                              \
    T m[36][32];                                                                             \
    for (ptrdiff_t l0 = 0; l0 < L; l0 += 32) {                                               \
        const ptrdiff_t nl = L - l0 < 32 ? L - l0 : 32;                                      \
        FC_WINOG_PARTS(T, m, 36, D, P, PS, CL, c, L, l0, nl)                                 \
        for (ptrdiff_t l = 0; l < nl; l++) {                                                 \
            T r[5][6];                                                                       \
            TO* o = gw + ((l0 + l) * C + c) * 25;                                            \
            for (int j = 0; j < 6; j++) {                              /* r = G^T m */       \
                T m0 = m[j][l], m5 = m[30 + j][l];                                           \
                T p = m[6 + j][l] + m[12 + j][l], q = m[6 + j][l] - m[12 + j][l];            \
                T u = m[18 + j][l] + m[24 + j][l], v = m[18 + j][l] - m[24 + j][l];          \
                r[0][j] = 0.25 * m0 - p * (1.0 / 6) + u * (1.0 / 24);                        \
                r[1][j] = v * (1.0 / 12) - q * (1.0 / 6);                                    \
                r[2][j] = (u - p) * (1.0 / 6);                                               \
                r[3][j] = v * (1.0 / 3) - q * (1.0 / 6);                                     \
                r[4][j] = (u * (2.0 / 3) - p * (1.0 / 6)) + m5;                              \
            }                                                                                \
            for (int a = 0; a < 5; a++) {                              /* dg = r G */        \
                T m0 = r[a][0], m5 = r[a][5];                                                \
                T p = r[a][1] + r[a][2], q = r[a][1] - r[a][2];                              \
                T u = r[a][3] + r[a][4], v = r[a][3] - r[a][4];                              \
                o[5 * a] = (TO)(0.25 * m0 - p * (1.0 / 6) + u * (1.0 / 24));                 \
                o[5 * a + 1] = (TO)(v * (1.0 / 12) - q * (1.0 / 6));                         \
                o[5 * a + 2] = (TO)((u - p) * (1.0 / 6));                                    \
                o[5 * a + 3] = (TO)(v * (1.0 / 3) - q * (1.0 / 6));                          \
                o[5 * a + 4] = (TO)((u * (2.0 / 3) - p * (1.0 / 6)) + m5);                   \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}

FC_WINOG5(float, f_base, )
FC_WINOG5(double, d_base, )
FC_WINOG5W(double, d_base, )
FC_WINOG5W(float, df_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_WINOG5(float, f_avx2, FC_AVX2)
FC_WINOG5(double, d_avx2, FC_AVX2)
FC_WINOG5W(double, d_avx2, FC_AVX2)
FC_WINOG5W(float, df_avx2, FC_AVX2)
#endif
#define FC_WINOG5_DISPATCH(T, S)                                                             \
static void fc_wino5_gout_##S(const T* gy, ptrdiff_t L, ptrdiff_t OH, ptrdiff_t OW,          \
                              ptrdiff_t TW, ptrdiff_t t0, ptrdiff_t nt, ptrdiff_t ld, T* Z,  \
                              ptrdiff_t LT) {                                                \
    FC_PICK(fc_wino5_gout_##S, gy, L, OH, OW, TW, t0, nt, ld, Z, LT);                        \
}
#define FC_WINOG5W_DISPATCH(TO, S)                                                           \
static void fc_wino5_wgrad_##S(const double* D, ptrdiff_t P, ptrdiff_t PS, ptrdiff_t C,      \
                               ptrdiff_t L, ptrdiff_t c, TO* gw) {                           \
    FC_PICK(fc_wino5_wgrad_##S, D, P, PS, C, L, c, gw);                                      \
}
FC_WINOG5_DISPATCH(float, f)
FC_WINOG5_DISPATCH(double, d)
FC_WINOG5W_DISPATCH(float, df)
FC_WINOG5W_DISPATCH(double, d)

#endif /* FASTCONV_WINOGRAD_H */
