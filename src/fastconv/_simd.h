/* Hand-vectorised inner loops of fastconv's kernels, with a portable fallback.
 *
 * The extension is built for the portable baseline (SSE2 on x86-64: no -march=native).  The
 * loops that are limited by arithmetic rather than memory (exp in the log-sum-exp and
 * softmax-gradient rows) also have an AVX2+FMA version, compiled with a per-function target
 * attribute and chosen once at import from the CPU's feature bits (fc_simd_init).  An AVX2
 * clone made by target_clones was tried first: gcc 12 then refused to if-convert the NaN
 * selects and ran the loop scalar, so the AVX2 code is written with intrinsics instead.
 *
 * Both versions compute the same formulas; they differ only in the order of the partial sums
 * (8 float lanes vs 16), so results agree to rounding.  fc_simd_set(0) forces the portable
 * code, which is how the tests cover both on one machine.
 */
#ifndef FASTCONV_SIMD_H
#define FASTCONV_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

/* ---- portable versions ------------------------------------------------------------------ */

/* exp(x) for x <= 0 (or NaN), written as straight-line arithmetic so that gcc/clang vectorise
   loops that call it: Cephes' range reduction x = n ln2 + r with a polynomial (float, ~1 ulp)
   or a Pade approximant (double, ~1 ulp) for e^r, and 2^n built in the exponent bits.  Inputs
   below the underflow limit give 0, NaN gives NaN.  Only the log-sum-exp code calls these,
   where the argument is z - max(z) <= 0. */
static inline float fc_expf_nonpos(float x) {
    float xs = (x == x) ? (x < -87.33654f ? -87.33654f : x) : 0.0f;
    float t = xs * 1.44269504088896341f - 0.5f;
    int32_t ni = (int32_t)t;                   /* t <= -0.5: truncation rounds to nearest */
    float n = (float)ni;
    float r = xs - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (ni + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    y = (x < -87.33654f) ? 0.0f : y;       /* below FLT_MIN: flushed to zero */
    return (x == x) ? y : x;
}

static inline double fc_exp_nonpos(double x) {
    double xs = (x == x) ? (x < -708.3964 ? -708.3964 : x) : 0.0;
    double t = xs * 1.4426950408889634074 - 0.5;
    int32_t ni = (int32_t)t;
    double n = (double)ni;
    double r = xs - n * 6.93145751953125E-1 - n * 1.42860682030941723212E-6;
    double rr = r * r;
    double px = r * ((1.26177193074810590878E-4 * rr + 3.02994407707441961300E-2) * rr
                     + 9.99999999999999999910E-1);
    double qx = ((3.00198505138664455042E-6 * rr + 2.52448340349684104192E-3) * rr
                 + 2.27265548208155028766E-1) * rr + 2.00000000000000000009E0;
    double e = 1.0 + 2.0 * (px / (qx - px));
    int64_t bits = ((int64_t)ni + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    double y = e * scale;
    y = (x < -708.3964) ? 0.0 : y;         /* below DBL_MIN: flushed to zero */
    return (x == x) ? y : x;
}

/* sum(exp(z - m)): exp into a stack buffer (a plain loop, vectorised), then 8 partial sums
   (fixed lanes, no reassociation needed), accumulated in double per block. */
#define FC_BLOCK 256
static float fc_sumexp_f_base(const float* z, ptrdiff_t n, float m) {
    float buf[FC_BLOCK];
    double total = 0;
    for (ptrdiff_t c0 = 0; c0 < n; c0 += FC_BLOCK) {
        ptrdiff_t k = n - c0 < FC_BLOCK ? n - c0 : FC_BLOCK, j;
        for (j = 0; j < k; j++) buf[j] = fc_expf_nonpos(z[c0 + j] - m);
        for (; j % 8; j++) buf[j] = 0.0f;
        float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (ptrdiff_t i = 0; i < j; i += 8)
            for (int l = 0; l < 8; l++) p[l] += buf[i + l];
        total += (double)(((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7])));
    }
    return (float)total;
}

static double fc_sumexp_d_base(const double* z, ptrdiff_t n, double m) {
    double buf[FC_BLOCK];
    double total = 0;
    for (ptrdiff_t c0 = 0; c0 < n; c0 += FC_BLOCK) {
        ptrdiff_t k = n - c0 < FC_BLOCK ? n - c0 : FC_BLOCK, j;
        for (j = 0; j < k; j++) buf[j] = fc_exp_nonpos(z[c0 + j] - m);
        for (; j % 8; j++) buf[j] = 0.0;
        double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (ptrdiff_t i = 0; i < j; i += 8)
            for (int l = 0; l < 8; l++) p[l] += buf[i + l];
        total += ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
    }
    return total;
}

/* g[c] = a * exp((z[c] - m) - ls) - b * w[c] */
static void fc_softmax_grad_f_base(const float* restrict z, ptrdiff_t n, float m, float ls,
                                   float a, float b, const float* restrict w,
                                   float* restrict g) {
    for (ptrdiff_t c = 0; c < n; c++) g[c] = a * fc_expf_nonpos((z[c] - m) - ls) - b * w[c];
}

static void fc_softmax_grad_d_base(const double* restrict z, ptrdiff_t n, double m, double ls,
                                   double a, double b, const double* restrict w,
                                   double* restrict g) {
    for (ptrdiff_t c = 0; c < n; c++) g[c] = a * fc_exp_nonpos((z[c] - m) - ls) - b * w[c];
}

/* Softmax gradient in two passes for finite m: e = exp(z - m) into g while summing, then
   g = (a / sum) * e - b * w.  One exp per element instead of two (sum, then p). */
static void fc_softmax_grad2_f_base(const float* restrict z, ptrdiff_t n, float m, float a,
                                    float b, const float* restrict w, float* restrict g) {
    double total = 0;
    for (ptrdiff_t c0 = 0; c0 < n; c0 += FC_BLOCK) {
        ptrdiff_t k = n - c0 < FC_BLOCK ? n - c0 : FC_BLOCK, j;
        float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (j = 0; j < k; j++) g[c0 + j] = fc_expf_nonpos(z[c0 + j] - m);
        for (j = 0; j + 8 <= k; j += 8)
            for (int l = 0; l < 8; l++) p[l] += g[c0 + j + l];
        for (; j < k; j++) p[0] += g[c0 + j];
        total += (double)(((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7])));
    }
    float s = (float)(a / total);
    for (ptrdiff_t c = 0; c < n; c++) g[c] = s * g[c] - b * w[c];
}

static void fc_softmax_grad2_d_base(const double* restrict z, ptrdiff_t n, double m, double a,
                                    double b, const double* restrict w, double* restrict g) {
    double total = 0;
    for (ptrdiff_t c0 = 0; c0 < n; c0 += FC_BLOCK) {
        ptrdiff_t k = n - c0 < FC_BLOCK ? n - c0 : FC_BLOCK, j;
        double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (j = 0; j < k; j++) g[c0 + j] = fc_exp_nonpos(z[c0 + j] - m);
        for (j = 0; j + 8 <= k; j += 8)
            for (int l = 0; l < 8; l++) p[l] += g[c0 + j + l];
        for (; j < k; j++) p[0] += g[c0 + j];
        total += ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
    }
    double s = a / total;
    for (ptrdiff_t c = 0; c < n; c++) g[c] = s * g[c] - b * w[c];
}

/* ---- AVX2 + FMA versions (x86-64 with gcc or clang) -------------------------------------- */

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FC_HAVE_AVX2_PATH 1
#include <immintrin.h>
#define FC_AVX2 __attribute__((target("avx2,fma")))
/* AVX2 without FMA: loops whose roundings must stay those of the portable code (no
   contraction of a * b + c) */
#define FC_AVX2_NOFMA __attribute__((target("avx2")))
/* AVX-512 F/VL/BW/DQ, for the loops that also have a build for it (fc_avx512_on) */
#define FC_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")))

/* The same Cephes formulas, 8 floats / 4 doubles at a time; x <= 0 or NaN. */
FC_AVX2 static inline __m256 fc_exp8_nonpos(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    __m256 xs = _mm256_max_ps(x, lo);                 /* NaN -> lo (max returns operand 2) */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xs, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xs);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                   _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_andnot_ps(under, y);                   /* below FLT_MIN: flushed to zero */
    return _mm256_blendv_ps(y, x, nan);
}

FC_AVX2 static inline __m256d fc_exp4_nonpos(__m256d x) {
    const __m256d lo = _mm256_set1_pd(-708.3964);
    __m256d nan = _mm256_cmp_pd(x, x, _CMP_UNORD_Q);
    __m256d under = _mm256_cmp_pd(x, lo, _CMP_LT_OQ);
    __m256d xs = _mm256_max_pd(x, lo);
    __m256d n = _mm256_round_pd(_mm256_mul_pd(xs, _mm256_set1_pd(1.4426950408889634074)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93145751953125E-1), xs);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.42860682030941723212E-6), r);
    __m256d rr = _mm256_mul_pd(r, r);
    __m256d px = _mm256_fmadd_pd(_mm256_set1_pd(1.26177193074810590878E-4), rr,
                                 _mm256_set1_pd(3.02994407707441961300E-2));
    px = _mm256_mul_pd(r, _mm256_fmadd_pd(px, rr, _mm256_set1_pd(9.99999999999999999910E-1)));
    __m256d qx = _mm256_fmadd_pd(_mm256_set1_pd(3.00198505138664455042E-6), rr,
                                 _mm256_set1_pd(2.52448340349684104192E-3));
    qx = _mm256_fmadd_pd(qx, rr, _mm256_set1_pd(2.27265548208155028766E-1));
    qx = _mm256_fmadd_pd(qx, rr, _mm256_set1_pd(2.00000000000000000009E0));
    __m256d e = _mm256_div_pd(px, _mm256_sub_pd(qx, px));
    e = _mm256_fmadd_pd(_mm256_set1_pd(2.0), e, _mm256_set1_pd(1.0));
    __m256i ni = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
    __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(ni, _mm256_set1_epi64x(1023)), 52);
    __m256d y = _mm256_mul_pd(e, _mm256_castsi256_pd(bits));
    y = _mm256_andnot_pd(under, y);
    return _mm256_blendv_pd(y, x, nan);
}

/* lanes [0, k) on, the rest off (0 <= k <= 8 / 4) */
FC_AVX2 static inline __m256i fc_mask8(ptrdiff_t k) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FC_AVX2 static inline __m256i fc_mask4(ptrdiff_t k) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(k), _mm256_setr_epi64x(0, 1, 2, 3));
}

FC_AVX2 static inline double fc_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return (double)_mm_cvtss_f32(s);
}
FC_AVX2 static inline double fc_hsum4(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

/* two float accumulators, flushed to double every FC_BLOCK elements */
FC_AVX2 static float fc_sumexp_f_avx2(const float* z, ptrdiff_t n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    double total = 0;
    for (ptrdiff_t c0 = 0; c0 < n; c0 += FC_BLOCK) {
        ptrdiff_t end = n - c0 < FC_BLOCK ? n : c0 + FC_BLOCK, i = c0;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 16 <= end; i += 16) {
            a0 = _mm256_add_ps(a0, fc_exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + i), vm)));
            a1 = _mm256_add_ps(a1, fc_exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + i + 8), vm)));
        }
        for (; i < end; i += 8) {
            __m256i mk = fc_mask8(end - i);
            __m256 v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(z + i, mk),
                                        _mm256_castsi256_ps(mk));
            a1 = _mm256_add_ps(a1, fc_exp8_nonpos(_mm256_sub_ps(v, vm)));
        }
        total += fc_hsum8(_mm256_add_ps(a0, a1));
    }
    return (float)total;
}

FC_AVX2 static double fc_sumexp_d_avx2(const double* z, ptrdiff_t n, double m) {
    const __m256d vm = _mm256_set1_pd(m);
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 = _mm256_add_pd(a0, fc_exp4_nonpos(_mm256_sub_pd(_mm256_loadu_pd(z + i), vm)));
        a1 = _mm256_add_pd(a1, fc_exp4_nonpos(_mm256_sub_pd(_mm256_loadu_pd(z + i + 4), vm)));
    }
    for (; i < n; i += 4) {
        __m256i mk = fc_mask4(n - i);
        __m256d v = _mm256_blendv_pd(_mm256_set1_pd(-INFINITY), _mm256_maskload_pd(z + i, mk),
                                     _mm256_castsi256_pd(mk));
        a1 = _mm256_add_pd(a1, fc_exp4_nonpos(_mm256_sub_pd(v, vm)));
    }
    return fc_hsum4(_mm256_add_pd(a0, a1));
}

FC_AVX2 static void fc_softmax_grad_f_avx2(const float* z, ptrdiff_t n, float m, float ls,
                                           float a, float b, const float* w, float* g) {
    const __m256 vm = _mm256_set1_ps(m), vls = _mm256_set1_ps(ls);
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    ptrdiff_t i = 0;
    for (; i < n; i += 8) {
        __m256i mk = fc_mask8(n - i);
        int full = n - i >= 8;
        __m256 vz = full ? _mm256_loadu_ps(z + i) : _mm256_maskload_ps(z + i, mk);
        __m256 vw = full ? _mm256_loadu_ps(w + i) : _mm256_maskload_ps(w + i, mk);
        __m256 e = fc_exp8_nonpos(_mm256_sub_ps(_mm256_sub_ps(vz, vm), vls));
        __m256 r = _mm256_fmsub_ps(va, e, _mm256_mul_ps(vb, vw));
        if (full) _mm256_storeu_ps(g + i, r);
        else _mm256_maskstore_ps(g + i, mk, r);
    }
}

FC_AVX2 static void fc_softmax_grad_d_avx2(const double* z, ptrdiff_t n, double m, double ls,
                                           double a, double b, const double* w, double* g) {
    const __m256d vm = _mm256_set1_pd(m), vls = _mm256_set1_pd(ls);
    const __m256d va = _mm256_set1_pd(a), vb = _mm256_set1_pd(b);
    ptrdiff_t i = 0;
    for (; i < n; i += 4) {
        __m256i mk = fc_mask4(n - i);
        int full = n - i >= 4;
        __m256d vz = full ? _mm256_loadu_pd(z + i) : _mm256_maskload_pd(z + i, mk);
        __m256d vw = full ? _mm256_loadu_pd(w + i) : _mm256_maskload_pd(w + i, mk);
        __m256d e = fc_exp4_nonpos(_mm256_sub_pd(_mm256_sub_pd(vz, vm), vls));
        __m256d r = _mm256_fmsub_pd(va, e, _mm256_mul_pd(vb, vw));
        if (full) _mm256_storeu_pd(g + i, r);
        else _mm256_maskstore_pd(g + i, mk, r);
    }
}

FC_AVX2 static void fc_softmax_grad2_f_avx2(const float* z, ptrdiff_t n, float m, float a,
                                            float b, const float* w, float* g) {
    const __m256 vm = _mm256_set1_ps(m);
    double total = 0;
    for (ptrdiff_t c0 = 0; c0 < n; c0 += FC_BLOCK) {
        ptrdiff_t end = n - c0 < FC_BLOCK ? n : c0 + FC_BLOCK, i = c0;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 16 <= end; i += 16) {
            __m256 e0 = fc_exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + i), vm));
            __m256 e1 = fc_exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + i + 8), vm));
            _mm256_storeu_ps(g + i, e0);
            _mm256_storeu_ps(g + i + 8, e1);
            a0 = _mm256_add_ps(a0, e0);
            a1 = _mm256_add_ps(a1, e1);
        }
        for (; i < end; i += 8) {
            __m256i mk = fc_mask8(end - i);
            __m256 v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(z + i, mk),
                                        _mm256_castsi256_ps(mk));
            __m256 e = fc_exp8_nonpos(_mm256_sub_ps(v, vm));
            _mm256_maskstore_ps(g + i, mk, e);
            a1 = _mm256_add_ps(a1, e);
        }
        total += fc_hsum8(_mm256_add_ps(a0, a1));
    }
    const __m256 vs = _mm256_set1_ps((float)(a / total)), vb = _mm256_set1_ps(b);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(g + i, _mm256_fmsub_ps(vs, _mm256_loadu_ps(g + i),
                                                _mm256_mul_ps(vb, _mm256_loadu_ps(w + i))));
    float s = (float)(a / total);
    for (; i < n; i++) g[i] = s * g[i] - b * w[i];
}

FC_AVX2 static void fc_softmax_grad2_d_avx2(const double* z, ptrdiff_t n, double m, double a,
                                            double b, const double* w, double* g) {
    const __m256d vm = _mm256_set1_pd(m);
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256d e0 = fc_exp4_nonpos(_mm256_sub_pd(_mm256_loadu_pd(z + i), vm));
        __m256d e1 = fc_exp4_nonpos(_mm256_sub_pd(_mm256_loadu_pd(z + i + 4), vm));
        _mm256_storeu_pd(g + i, e0);
        _mm256_storeu_pd(g + i + 4, e1);
        a0 = _mm256_add_pd(a0, e0);
        a1 = _mm256_add_pd(a1, e1);
    }
    for (; i < n; i += 4) {
        __m256i mk = fc_mask4(n - i);
        __m256d v = _mm256_blendv_pd(_mm256_set1_pd(-INFINITY), _mm256_maskload_pd(z + i, mk),
                                     _mm256_castsi256_pd(mk));
        __m256d e = fc_exp4_nonpos(_mm256_sub_pd(v, vm));
        _mm256_maskstore_pd(g + i, mk, e);
        a1 = _mm256_add_pd(a1, e);
    }
    double s = a / fc_hsum4(_mm256_add_pd(a0, a1));
    const __m256d vs = _mm256_set1_pd(s), vb = _mm256_set1_pd(b);
    for (i = 0; i + 4 <= n; i += 4)
        _mm256_storeu_pd(g + i, _mm256_fmsub_pd(vs, _mm256_loadu_pd(g + i),
                                                _mm256_mul_pd(vb, _mm256_loadu_pd(w + i))));
    for (; i < n; i++) g[i] = s * g[i] - b * w[i];
}

/* max(z) with NaN propagation (any NaN -> NaN); n >= 1 */
FC_AVX2 static float fc_max_f_avx2(const float* z, ptrdiff_t n) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, bad = _mm256_setzero_ps();
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(z + i), b = _mm256_loadu_ps(z + i + 8);
        m0 = _mm256_max_ps(a, m0);
        m1 = _mm256_max_ps(b, m1);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    }
    m0 = _mm256_max_ps(m0, m1);
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    float m = _mm_cvtss_f32(s);
    if (_mm256_movemask_ps(bad)) return NAN;
    for (; i < n; i++) {
        float v = z[i];
        if (v != v) return v;
        m = v > m ? v : m;
    }
    return m;
}

FC_AVX2 static double fc_max_d_avx2(const double* z, ptrdiff_t n) {
    __m256d m0 = _mm256_set1_pd(-INFINITY), m1 = m0, bad = _mm256_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256d a = _mm256_loadu_pd(z + i), b = _mm256_loadu_pd(z + i + 4);
        m0 = _mm256_max_pd(a, m0);
        m1 = _mm256_max_pd(b, m1);
        bad = _mm256_or_pd(bad, _mm256_cmp_pd(a, b, _CMP_UNORD_Q));
    }
    m0 = _mm256_max_pd(m0, m1);
    __m128d s = _mm_max_pd(_mm256_castpd256_pd128(m0), _mm256_extractf128_pd(m0, 1));
    s = _mm_max_sd(s, _mm_unpackhi_pd(s, s));
    double m = _mm_cvtsd_f64(s);
    if (_mm256_movemask_pd(bad)) return NAN;
    for (; i < n; i++) {
        double v = z[i];
        if (v != v) return v;
        m = v > m ? v : m;
    }
    return m;
}

/* The exp rows again for AVX-512: 16 floats / 8 doubles a vector, lane for lane the same
   operations as fc_exp8_nonpos / fc_exp4_nonpos (so the same exp values; the sums, in 16 or
   8 lanes, differ from the AVX2 ones in rounding only).  The cross-entropy's rows are
   arithmetic-bound: fc_sumexp was 60 % of a 1024 x 1000 float32 forward at the AVX2 level. */
FC_AVX512 static inline __m512 fc_exp16_nonpos(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    __m512 xs = _mm512_max_ps(x, lo);                 /* NaN -> lo (max returns operand 2) */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xs, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xs);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n),
                                                   _mm512_set1_epi32(127)), 23);
    __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    y = _mm512_maskz_mov_ps((__mmask16)~under, y);   /* below FLT_MIN: flushed to zero */
    return _mm512_mask_blend_ps(nan, y, x);
}

FC_AVX512 static inline __m512d fc_exp8d_nonpos(__m512d x) {
    const __m512d lo = _mm512_set1_pd(-708.3964);
    __mmask8 nan = _mm512_cmp_pd_mask(x, x, _CMP_UNORD_Q);
    __mmask8 under = _mm512_cmp_pd_mask(x, lo, _CMP_LT_OQ);
    __m512d xs = _mm512_max_pd(x, lo);
    __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(xs, _mm512_set1_pd(1.4426950408889634074)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93145751953125E-1), xs);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.42860682030941723212E-6), r);
    __m512d rr = _mm512_mul_pd(r, r);
    __m512d px = _mm512_fmadd_pd(_mm512_set1_pd(1.26177193074810590878E-4), rr,
                                 _mm512_set1_pd(3.02994407707441961300E-2));
    px = _mm512_mul_pd(r, _mm512_fmadd_pd(px, rr, _mm512_set1_pd(9.99999999999999999910E-1)));
    __m512d qx = _mm512_fmadd_pd(_mm512_set1_pd(3.00198505138664455042E-6), rr,
                                 _mm512_set1_pd(2.52448340349684104192E-3));
    qx = _mm512_fmadd_pd(qx, rr, _mm512_set1_pd(2.27265548208155028766E-1));
    qx = _mm512_fmadd_pd(qx, rr, _mm512_set1_pd(2.00000000000000000009E0));
    __m512d e = _mm512_div_pd(px, _mm512_sub_pd(qx, px));
    e = _mm512_fmadd_pd(_mm512_set1_pd(2.0), e, _mm512_set1_pd(1.0));
    __m512i ni = _mm512_cvtepi32_epi64(_mm512_cvtpd_epi32(n));
    __m512i bits = _mm512_slli_epi64(_mm512_add_epi64(ni, _mm512_set1_epi64(1023)), 52);
    __m512d y = _mm512_mul_pd(e, _mm512_castsi512_pd(bits));
    y = _mm512_maskz_mov_pd((__mmask8)~under, y);
    return _mm512_mask_blend_pd(nan, y, x);
}

/* sum(exp(z - m)) as fc_sumexp_f_avx2: two accumulators, flushed to double every FC_BLOCK;
   the row's tail as one masked vector (lanes off read as -inf: exp 0) */
FC_AVX512 static float fc_sumexp_f_avx512(const float* z, ptrdiff_t n, float m) {
    const __m512 vm = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
    double total = 0;
    for (ptrdiff_t c0 = 0; c0 < n; c0 += FC_BLOCK) {
        ptrdiff_t end = n - c0 < FC_BLOCK ? n : c0 + FC_BLOCK, i = c0;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (; i + 32 <= end; i += 32) {
            a0 = _mm512_add_ps(a0, fc_exp16_nonpos(_mm512_sub_ps(_mm512_loadu_ps(z + i), vm)));
            a1 = _mm512_add_ps(a1, fc_exp16_nonpos(_mm512_sub_ps(_mm512_loadu_ps(z + i + 16),
                                                                 vm)));
        }
        for (; i < end; i += 16) {
            ptrdiff_t k = end - i < 16 ? end - i : 16;
            __m512 v = _mm512_mask_loadu_ps(ninf, (__mmask16)((1u << k) - 1), z + i);
            a1 = _mm512_add_ps(a1, fc_exp16_nonpos(_mm512_sub_ps(v, vm)));
        }
        total += (double)_mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
    return (float)total;
}

FC_AVX512 static double fc_sumexp_d_avx512(const double* z, ptrdiff_t n, double m) {
    const __m512d vm = _mm512_set1_pd(m), ninf = _mm512_set1_pd(-INFINITY);
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm512_add_pd(a0, fc_exp8d_nonpos(_mm512_sub_pd(_mm512_loadu_pd(z + i), vm)));
        a1 = _mm512_add_pd(a1, fc_exp8d_nonpos(_mm512_sub_pd(_mm512_loadu_pd(z + i + 8), vm)));
    }
    for (; i < n; i += 8) {
        ptrdiff_t k = n - i < 8 ? n - i : 8;
        __m512d v = _mm512_mask_loadu_pd(ninf, (__mmask8)((1u << k) - 1), z + i);
        a1 = _mm512_add_pd(a1, fc_exp8d_nonpos(_mm512_sub_pd(v, vm)));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
}

/* g = a softmax(z) - b w with one exp per element, as fc_softmax_grad2_f_avx2 */
FC_AVX512 static void fc_softmax_grad2_f_avx512(const float* z, ptrdiff_t n, float m, float a,
                                                float b, const float* w, float* g) {
    const __m512 vm = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
    double total = 0;
    for (ptrdiff_t c0 = 0; c0 < n; c0 += FC_BLOCK) {
        ptrdiff_t end = n - c0 < FC_BLOCK ? n : c0 + FC_BLOCK, i = c0;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (; i + 32 <= end; i += 32) {
            __m512 e0 = fc_exp16_nonpos(_mm512_sub_ps(_mm512_loadu_ps(z + i), vm));
            __m512 e1 = fc_exp16_nonpos(_mm512_sub_ps(_mm512_loadu_ps(z + i + 16), vm));
            _mm512_storeu_ps(g + i, e0);
            _mm512_storeu_ps(g + i + 16, e1);
            a0 = _mm512_add_ps(a0, e0);
            a1 = _mm512_add_ps(a1, e1);
        }
        for (; i < end; i += 16) {
            ptrdiff_t k = end - i < 16 ? end - i : 16;
            __mmask16 mk = (__mmask16)((1u << k) - 1);
            __m512 e = fc_exp16_nonpos(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, mk, z + i), vm));
            _mm512_mask_storeu_ps(g + i, mk, e);
            a1 = _mm512_add_ps(a1, e);
        }
        total += (double)_mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
    const __m512 vs = _mm512_set1_ps((float)(a / total)), vb = _mm512_set1_ps(b);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(g + i, _mm512_fmsub_ps(vs, _mm512_loadu_ps(g + i),
                                                _mm512_mul_ps(vb, _mm512_loadu_ps(w + i))));
    float s = (float)(a / total);
    for (; i < n; i++) g[i] = s * g[i] - b * w[i];
}

FC_AVX512 static void fc_softmax_grad2_d_avx512(const double* z, ptrdiff_t n, double m,
                                                double a, double b, const double* w,
                                                double* g) {
    const __m512d vm = _mm512_set1_pd(m), ninf = _mm512_set1_pd(-INFINITY);
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d e0 = fc_exp8d_nonpos(_mm512_sub_pd(_mm512_loadu_pd(z + i), vm));
        __m512d e1 = fc_exp8d_nonpos(_mm512_sub_pd(_mm512_loadu_pd(z + i + 8), vm));
        _mm512_storeu_pd(g + i, e0);
        _mm512_storeu_pd(g + i + 8, e1);
        a0 = _mm512_add_pd(a0, e0);
        a1 = _mm512_add_pd(a1, e1);
    }
    for (; i < n; i += 8) {
        ptrdiff_t k = n - i < 8 ? n - i : 8;
        __mmask8 mk = (__mmask8)((1u << k) - 1);
        __m512d e = fc_exp8d_nonpos(_mm512_sub_pd(_mm512_mask_loadu_pd(ninf, mk, z + i), vm));
        _mm512_mask_storeu_pd(g + i, mk, e);
        a1 = _mm512_add_pd(a1, e);
    }
    double s = a / _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
    const __m512d vs = _mm512_set1_pd(s), vb = _mm512_set1_pd(b);
    for (i = 0; i + 8 <= n; i += 8)
        _mm512_storeu_pd(g + i, _mm512_fmsub_pd(vs, _mm512_loadu_pd(g + i),
                                                _mm512_mul_pd(vb, _mm512_loadu_pd(w + i))));
    for (; i < n; i++) g[i] = s * g[i] - b * w[i];
}

/* max(z) with NaN propagation, as fc_max_f_avx2 */
FC_AVX512 static float fc_max_f_avx512(const float* z, ptrdiff_t n) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    __mmask16 bad = 0;
    ptrdiff_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 a = _mm512_loadu_ps(z + i), b = _mm512_loadu_ps(z + i + 16);
        m0 = _mm512_max_ps(a, m0);
        m1 = _mm512_max_ps(b, m1);
        bad |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    }
    float m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    if (bad) return NAN;
    for (; i < n; i++) {
        float v = z[i];
        if (v != v) return v;
        m = v > m ? v : m;
    }
    return m;
}

FC_AVX512 static double fc_max_d_avx512(const double* z, ptrdiff_t n) {
    __m512d m0 = _mm512_set1_pd(-INFINITY), m1 = m0;
    __mmask8 bad = 0;
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d a = _mm512_loadu_pd(z + i), b = _mm512_loadu_pd(z + i + 8);
        m0 = _mm512_max_pd(a, m0);
        m1 = _mm512_max_pd(b, m1);
        bad |= _mm512_cmp_pd_mask(a, b, _CMP_UNORD_Q);
    }
    double m = _mm512_reduce_max_pd(_mm512_max_pd(m0, m1));
    if (bad) return NAN;
    for (; i < n; i++) {
        double v = z[i];
        if (v != v) return v;
        m = v > m ? v : m;
    }
    return m;
}

static int fc_avx2_ok = 0;      /* set once at import by fc_simd_init, before any kernel runs */
static int fc_avx2_on = 0;

static int fc_avx512_ok = 0;    /* AVX-512 F/VL/BW/DQ: a few loops compiled for it too */
static int fc_avx512_on = 0;

static int fc_simd_init(void) {
    __builtin_cpu_init();
    fc_avx2_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    fc_avx2_on = fc_avx2_ok;
    fc_avx512_ok = fc_avx2_ok && __builtin_cpu_supports("avx512f")
                   && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
                   && __builtin_cpu_supports("avx512dq");
    fc_avx512_on = fc_avx512_ok;
    return fc_avx2_on;
}
#define FC_USE_AVX2 (fc_avx2_on)
#else
static int fc_avx2_ok = 0;
static int fc_avx2_on = 0;
static int fc_avx512_ok = 0;
static int fc_avx512_on = 0;
static int fc_simd_init(void) { return 0; }
#define FC_USE_AVX2 0
#endif

/* F(...) through F##_avx2 or F##_base, whichever the level in use picks */
#ifdef FC_HAVE_AVX2_PATH
#define FC_PICK(F, ...) (FC_USE_AVX2 ? F##_avx2(__VA_ARGS__) : F##_base(__VA_ARGS__))
#else
#define FC_PICK(F, ...) F##_base(__VA_ARGS__)
#endif

/* 1: use AVX2 where the CPU has it; 0: portable code.  Returns the level in use. */
static int fc_simd_set(int on) {
    fc_avx2_on = on && fc_avx2_ok;
    return fc_avx2_on;
}
static int fc_simd_level(void) { return fc_avx2_on; }
/* 1: the loops that have an AVX-512 build use it (with AVX2 on and the CPU able); 0: not.
   Returns the setting in use (tests and A/B timing, while no kernel runs). */
static int fc_simd512_set(int on) {
    fc_avx512_on = on && fc_avx512_ok;
    return fc_avx512_on;
}

/* ---- dispatchers called by the kernels --------------------------------------------------- */

static float fc_sumexp_f(const float* z, ptrdiff_t n, float m) {
#ifdef FC_HAVE_AVX2_PATH
    if (FC_USE_AVX2 && fc_avx512_on) return fc_sumexp_f_avx512(z, n, m);
    if (FC_USE_AVX2) return fc_sumexp_f_avx2(z, n, m);
#endif
    return fc_sumexp_f_base(z, n, m);
}

static double fc_sumexp_d(const double* z, ptrdiff_t n, double m) {
#ifdef FC_HAVE_AVX2_PATH
    if (FC_USE_AVX2 && fc_avx512_on) return fc_sumexp_d_avx512(z, n, m);
    if (FC_USE_AVX2) return fc_sumexp_d_avx2(z, n, m);
#endif
    return fc_sumexp_d_base(z, n, m);
}

static void fc_softmax_grad_f(const float* z, ptrdiff_t n, float m, float ls, float a, float b,
                              const float* w, float* g) {
    FC_PICK(fc_softmax_grad_f, z, n, m, ls, a, b, w, g);
}

static void fc_softmax_grad_d(const double* z, ptrdiff_t n, double m, double ls, double a,
                              double b, const double* w, double* g) {
    FC_PICK(fc_softmax_grad_d, z, n, m, ls, a, b, w, g);
}

static void fc_softmax_grad2_f(const float* z, ptrdiff_t n, float m, float a, float b,
                               const float* w, float* g) {
#ifdef FC_HAVE_AVX2_PATH
    if (FC_USE_AVX2 && fc_avx512_on) {
        fc_softmax_grad2_f_avx512(z, n, m, a, b, w, g);
        return;
    }
#endif
    FC_PICK(fc_softmax_grad2_f, z, n, m, a, b, w, g);
}

static void fc_softmax_grad2_d(const double* z, ptrdiff_t n, double m, double a, double b,
                               const double* w, double* g) {
#ifdef FC_HAVE_AVX2_PATH
    if (FC_USE_AVX2 && fc_avx512_on) {
        fc_softmax_grad2_d_avx512(z, n, m, a, b, w, g);
        return;
    }
#endif
    FC_PICK(fc_softmax_grad2_d, z, n, m, a, b, w, g);
}

/* max(z[0:n]) (NaN if any is NaN) into *out and 1 when the AVX2 path ran; 0 otherwise, and
   the caller runs its portable loop */
static inline int fc_max_f(const float* z, ptrdiff_t n, float* out) {
#ifdef FC_HAVE_AVX2_PATH
    if (FC_USE_AVX2 && fc_avx512_on) { *out = fc_max_f_avx512(z, n); return 1; }
    if (FC_USE_AVX2) { *out = fc_max_f_avx2(z, n); return 1; }
#endif
    (void)z; (void)n; (void)out;
    return 0;
}

static inline int fc_max_d(const double* z, ptrdiff_t n, double* out) {
#ifdef FC_HAVE_AVX2_PATH
    if (FC_USE_AVX2 && fc_avx512_on) { *out = fc_max_d_avx512(z, n); return 1; }
    if (FC_USE_AVX2) { *out = fc_max_d_avx2(z, n); return 1; }
#endif
    (void)z; (void)n; (void)out;
    return 0;
}

/* ---- depthwise convolution rows (portable; gcc/clang vectorise them) ------------------- */

/* o[i] += w0 a[s i] + w1 a[s i + d] + w2 a[s i + 2d], added in that order (the same rounding
   as three separate passes, one tap each) */
#define FC_ROW3(T, NAME, ATTR)                                                                     \
ATTR static void NAME(T* restrict o, const T* restrict a, ptrdiff_t n, ptrdiff_t s, ptrdiff_t d,  \
                 T w0, T w1, T w2) {                                                         \
    if (s == 1 && d == 1)                                                                    \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            o[i] = ((o[i] + w0 * a[i]) + w1 * a[i + 1]) + w2 * a[i + 2];                     \
    else if (s == 1 && d == -1)                                                              \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            o[i] = ((o[i] + w0 * a[i]) + w1 * a[i - 1]) + w2 * a[i - 2];                     \
    else if (s == 2 && d == 1)                                                               \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            o[i] = ((o[i] + w0 * a[2 * i]) + w1 * a[2 * i + 1]) + w2 * a[2 * i + 2];         \
    else                                                                                     \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            o[i] = ((o[i] + w0 * a[s * i]) + w1 * a[s * i + d]) + w2 * a[s * i + 2 * d];     \
}
FC_ROW3(float, fc_row3_f_base, )
FC_ROW3(double, fc_row3_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_ROW3(float, fc_row3_f_avx2, FC_AVX2_NOFMA)
FC_ROW3(double, fc_row3_d_avx2, FC_AVX2_NOFMA)
#endif
static void fc_row3_f(float* o, const float* a, ptrdiff_t n, ptrdiff_t s, ptrdiff_t d, float w0, float w1, float w2) {
    FC_PICK(fc_row3_f, o, a, n, s, d, w0, w1, w2);
}
static void fc_row3_d(double* o, const double* a, ptrdiff_t n, ptrdiff_t s, ptrdiff_t d, double w0, double w1, double w2) {
    FC_PICK(fc_row3_d, o, a, n, s, d, w0, w1, w2);
}

/* sum_i a[i] b[s i] with 8 partial sums (vectorised), returned in double */
#define FC_DOT(T, NAME)                                                                      \
static double NAME(const T* restrict a, const T* restrict b, ptrdiff_t n, ptrdiff_t s) {     \
    T p[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                       \
    ptrdiff_t i = 0;                                                                         \
    if (s == 1)                                                                              \
        for (; i + 8 <= n; i += 8)                                                           \
            for (int l = 0; l < 8; l++) p[l] += a[i + l] * b[i + l];                         \
    else if (s == 2)                                                                         \
        for (; i + 8 <= n; i += 8)                                                           \
            for (int l = 0; l < 8; l++) p[l] += a[i + l] * b[2 * (i + l)];                   \
    double t = (double)(((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7])));  \
    for (; i < n; i++) t += (double)a[i] * (double)b[s * i];                                 \
    return t;                                                                                \
}
FC_DOT(float, fc_dot_f)
FC_DOT(double, fc_dot_d)

/* A whole output row of a 3x3 (or 2x3 / 1x3) stride-1 depthwise window in one pass:
   o[i] += sum over rows r < R, taps k < 3 of wr[k] * ar[i + k], added row by row and tap by
   tap (the same order, so the same rounding, as one pass per tap). */
#define FC_DW3(T, NAME, ATTR)                                                                      \
ATTR static void NAME(T* restrict o, ptrdiff_t n, int R, const T* restrict a0,                    \
                 const T* restrict a1, const T* restrict a2, const T* restrict w0,           \
                 const T* restrict w1, const T* restrict w2) {                               \
    const T u0 = w0[0], u1 = w0[1], u2 = w0[2];                                              \
    if (R == 1) {                                                                            \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            o[i] = ((o[i] + u0 * a0[i]) + u1 * a0[i + 1]) + u2 * a0[i + 2];                  \
        return;                                                                              \
    }                                                                                        \
    const T v0 = w1[0], v1 = w1[1], v2 = w1[2];                                              \
    if (R == 2) {                                                                            \
        for (ptrdiff_t i = 0; i < n; i++) {                                                  \
            T t = ((o[i] + u0 * a0[i]) + u1 * a0[i + 1]) + u2 * a0[i + 2];                   \
            o[i] = ((t + v0 * a1[i]) + v1 * a1[i + 1]) + v2 * a1[i + 2];                     \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    const T z0 = w2[0], z1 = w2[1], z2 = w2[2];                                              \
    for (ptrdiff_t i = 0; i < n; i++) {                                                      \
        T t = ((o[i] + u0 * a0[i]) + u1 * a0[i + 1]) + u2 * a0[i + 2];                       \
        t = ((t + v0 * a1[i]) + v1 * a1[i + 1]) + v2 * a1[i + 2];                            \
        o[i] = ((t + z0 * a2[i]) + z1 * a2[i + 1]) + z2 * a2[i + 2];                         \
    }                                                                                        \
}
FC_DW3(float, fc_dw3_f_base, )
FC_DW3(double, fc_dw3_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_DW3(float, fc_dw3_f_avx2, FC_AVX2_NOFMA)
FC_DW3(double, fc_dw3_d_avx2, FC_AVX2_NOFMA)
#endif
static void fc_dw3_f(float* o, ptrdiff_t n, int R, const float* a0, const float* a1, const float* a2, const float* w0, const float* w1, const float* w2) {
    FC_PICK(fc_dw3_f, o, n, R, a0, a1, a2, w0, w1, w2);
}
static void fc_dw3_d(double* o, ptrdiff_t n, int R, const double* a0, const double* a1, const double* a2, const double* w0, const double* w1, const double* w2) {
    FC_PICK(fc_dw3_d, o, n, R, a0, a1, a2, w0, w1, w2);
}

/* sum over r < rows, i < n of a[r lda + i] b[r ldb + i]: 8 partial sums kept across the
   rows (vectorised), returned in double */
#define FC_DOT2D(T, NAME)                                                                    \
static double NAME(const T* restrict a, ptrdiff_t lda, const T* restrict b, ptrdiff_t ldb,   \
                   ptrdiff_t rows, ptrdiff_t n) {                                            \
    T p[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                       \
    double t = 0;                                                                            \
    for (ptrdiff_t r = 0; r < rows; r++) {                                                   \
        const T* ar = a + r * lda;                                                           \
        const T* br = b + r * ldb;                                                           \
        ptrdiff_t i = 0;                                                                     \
        for (; i + 8 <= n; i += 8)                                                           \
            for (int l = 0; l < 8; l++) p[l] += ar[i + l] * br[i + l];                       \
        for (; i < n; i++) t += (double)ar[i] * (double)br[i];                               \
    }                                                                                        \
    return t + (double)(((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7])));  \
}
FC_DOT2D(float, fc_dot2d_f)
FC_DOT2D(double, fc_dot2d_d)

/* ---- 3x3 stride-1 depthwise planes over a zero-padded copy --------------------------------
   P: the input plane with its padding written out (rows of PW values, at least OH + 2 rows
   and OW + 2 columns).  No edge cases in the loops: the padding's zeros are multiplied like
   any value, which changes nothing but the sign of a zero sum while the other factor is
   finite (the callers check).  The AVX2 builds contract to FMA. */

/* out[oh][ow] = b + sum over kh, kw of w[3 kh + kw] P[oh + kh][ow + kw]: two output rows a
   pass (their four input rows loaded once for both), bias first, then the taps row by row */
#define FC_DW33_FWD(T, NAME, ATTR)                                                           \
ATTR static void NAME(const T* restrict P, ptrdiff_t PW, const T* restrict w, T b,          \
                      T* restrict out, ptrdiff_t OH, ptrdiff_t OW) {                         \
    const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5];                \
    const T w6 = w[6], w7 = w[7], w8 = w[8];                                                 \
    ptrdiff_t oh = 0;                                                                        \
    for (; oh + 2 <= OH; oh += 2) {                                                          \
        const T* restrict r0 = P + oh * PW;                                                  \
        const T* restrict r1 = r0 + PW;                                                      \
        const T* restrict r2 = r1 + PW;                                                      \
        const T* restrict r3 = r2 + PW;                                                      \
        T* restrict o0 = out + oh * OW;                                                      \
        T* restrict o1 = o0 + OW;                                                            \
        for (ptrdiff_t i = 0; i < OW; i++) {                                                 \
            T a = b + w0 * r0[i];                                                            \
            a = a + w1 * r0[i + 1];                                                          \
            a = a + w2 * r0[i + 2];                                                          \
            T c = b + w0 * r1[i];                                                            \
            a = a + w3 * r1[i];                                                              \
            c = c + w1 * r1[i + 1];                                                          \
            a = a + w4 * r1[i + 1];                                                          \
            c = c + w2 * r1[i + 2];                                                          \
            a = a + w5 * r1[i + 2];                                                          \
            c = c + w3 * r2[i];                                                              \
            a = a + w6 * r2[i];                                                              \
            c = c + w4 * r2[i + 1];                                                          \
            a = a + w7 * r2[i + 1];                                                          \
            c = c + w5 * r2[i + 2];                                                          \
            a = a + w8 * r2[i + 2];                                                          \
            c = c + w6 * r3[i];                                                              \
            c = c + w7 * r3[i + 1];                                                          \
            c = c + w8 * r3[i + 2];                                                          \
            o0[i] = a;                                                                       \
            o1[i] = c;                                                                       \
        }                                                                                    \
    }                                                                                        \
    if (oh < OH) {                                                                           \
        const T* restrict r0 = P + oh * PW;                                                  \
        const T* restrict r1 = r0 + PW;                                                      \
        const T* restrict r2 = r1 + PW;                                                      \
        T* restrict o0 = out + oh * OW;                                                      \
        for (ptrdiff_t i = 0; i < OW; i++) {                                                 \
            T a = b + w0 * r0[i];                                                            \
            a = a + w1 * r0[i + 1];                                                          \
            a = a + w2 * r0[i + 2];                                                          \
            a = a + w3 * r1[i];                                                              \
            a = a + w4 * r1[i + 1];                                                          \
            a = a + w5 * r1[i + 2];                                                          \
            a = a + w6 * r2[i];                                                              \
            a = a + w7 * r2[i + 1];                                                          \
            a = a + w8 * r2[i + 2];                                                          \
            o0[i] = a;                                                                       \
        }                                                                                    \
    }                                                                                        \
}
FC_DW33_FWD(float, fc_dw33_fwd_f_base, )
FC_DW33_FWD(double, fc_dw33_fwd_d_base, )
#ifdef FC_HAVE_AVX2_PATH
/* (gcc left the plain loop above scalar at -O3 with avx2: by hand, the same order of
   operations, each tap's product added by FMA).  Hooks as FC_DW33_GW_AVX2's, and ST, MST
   (masked store), SET1 */
/* t0, t1, t2 = a row's values at i, i + 1, i + 2: whole vectors while i < full, else the
   lanes of mask m (the rest 0) */
#define FC_DW33_LOAD3(LD, MLD, r, i, full, m, t0, t1, t2)                                    \
    do {                                                                                     \
        if ((i) < (full)) {                                                                  \
            t0 = LD((r) + (i)); t1 = LD((r) + (i) + 1); t2 = LD((r) + (i) + 2);              \
        } else {                                                                             \
            t0 = MLD((r) + (i), m); t1 = MLD((r) + (i) + 1, m); t2 = MLD((r) + (i) + 2, m);  \
        }                                                                                    \
    } while (0)
#define FC_DW33_FWD_AVX2(T, NAME, V, L, LD, MLD, ST, MST, SET1, FMA, MASK)                  \
FC_AVX2 static void NAME(const T* P, ptrdiff_t PW, const T* w, T b, T* out, ptrdiff_t OH,    \
                         ptrdiff_t OW) {                                                     \
    const V w0 = SET1(w[0]), w1 = SET1(w[1]), w2 = SET1(w[2]), w3 = SET1(w[3]);              \
    const V w4 = SET1(w[4]), w5 = SET1(w[5]), w6 = SET1(w[6]), w7 = SET1(w[7]);              \
    const V w8 = SET1(w[8]), vb = SET1(b);                                                   \
    const ptrdiff_t full = OW - OW % L;                                                      \
    const __m256i m = MASK(OW - full);                                                       \
    ptrdiff_t oh = 0;                                                                        \
    for (; oh + 2 <= OH; oh += 2) {                                                          \
        const T* r0 = P + oh * PW;                                                           \
        const T* r1 = r0 + PW;                                                               \
        const T* r2 = r1 + PW;                                                               \
        const T* r3 = r2 + PW;                                                               \
        T* o0 = out + oh * OW;                                                               \
        T* o1 = o0 + OW;                                                                     \
        for (ptrdiff_t i = 0; i < OW; i += L) {                                              \
            V a, c, t0, t1, t2;                                                              \
            FC_DW33_LOAD3(LD, MLD, r0, i, full, m, t0, t1, t2);                              \
            a = FMA(w0, t0, vb);                                                             \
            a = FMA(w1, t1, a);                                                              \
            a = FMA(w2, t2, a);                                                              \
            FC_DW33_LOAD3(LD, MLD, r1, i, full, m, t0, t1, t2);                              \
            c = FMA(w0, t0, vb);                                                             \
            a = FMA(w3, t0, a);                                                              \
            c = FMA(w1, t1, c);                                                              \
            a = FMA(w4, t1, a);                                                              \
            c = FMA(w2, t2, c);                                                              \
            a = FMA(w5, t2, a);                                                              \
            FC_DW33_LOAD3(LD, MLD, r2, i, full, m, t0, t1, t2);                              \
            c = FMA(w3, t0, c);                                                              \
            a = FMA(w6, t0, a);                                                              \
            c = FMA(w4, t1, c);                                                              \
            a = FMA(w7, t1, a);                                                              \
            c = FMA(w5, t2, c);                                                              \
            a = FMA(w8, t2, a);                                                              \
            FC_DW33_LOAD3(LD, MLD, r3, i, full, m, t0, t1, t2);                              \
            c = FMA(w6, t0, c);                                                              \
            c = FMA(w7, t1, c);                                                              \
            c = FMA(w8, t2, c);                                                              \
            if (i < full) {                                                                  \
                ST(o0 + i, a);                                                               \
                ST(o1 + i, c);                                                               \
            } else {                                                                         \
                MST(o0 + i, m, a);                                                           \
                MST(o1 + i, m, c);                                                           \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    if (oh < OH) {                    /* the last row of an odd count: a zero-weight 4th */ \
        const T* r0 = P + oh * PW;                                                           \
        const T* r1 = r0 + PW;                                                               \
        const T* r2 = r1 + PW;                                                               \
        T* o0 = out + oh * OW;                                                               \
        for (ptrdiff_t i = 0; i < OW; i += L) {                                              \
            const __m256i mm = i < full ? MASK(L) : m;                                       \
            V a = FMA(w0, MLD(r0 + i, mm), vb);                                              \
            a = FMA(w1, MLD(r0 + i + 1, mm), a);                                             \
            a = FMA(w2, MLD(r0 + i + 2, mm), a);                                             \
            a = FMA(w3, MLD(r1 + i, mm), a);                                                 \
            a = FMA(w4, MLD(r1 + i + 1, mm), a);                                             \
            a = FMA(w5, MLD(r1 + i + 2, mm), a);                                             \
            a = FMA(w6, MLD(r2 + i, mm), a);                                                 \
            a = FMA(w7, MLD(r2 + i + 1, mm), a);                                             \
            a = FMA(w8, MLD(r2 + i + 2, mm), a);                                             \
            MST(o0 + i, mm, a);                                                              \
        }                                                                                    \
    }                                                                                        \
}
#endif

/* The weight gradient's share of one plane: s[3 kh + kw] = sum over oh, ow of
   gy[oh][ow] P[oh + kh][ow + kw] and s[9] = sum of gy, each in double (lane partial sums of
   the type within the plane).  Portable: nine fc_dot2d passes; AVX2: one pass, ten
   accumulator vectors, the row's tail by masked loads. */
static void fc_dw33_gw_f_base(const float* P, ptrdiff_t PW, const float* gy, ptrdiff_t OH,
                              ptrdiff_t OW, double* s) {
    for (int k = 0; k < 9; k++)
        s[k] = fc_dot2d_f(gy, OW, P + (k / 3) * PW + k % 3, PW, OH, OW);
    double t = 0;
    for (ptrdiff_t i = 0; i < OH * OW; i++) t += gy[i];
    s[9] = t;
}
static void fc_dw33_gw_d_base(const double* P, ptrdiff_t PW, const double* gy, ptrdiff_t OH,
                              ptrdiff_t OW, double* s) {
    for (int k = 0; k < 9; k++)
        s[k] = fc_dot2d_d(gy, OW, P + (k / 3) * PW + k % 3, PW, OH, OW);
    double t = 0;
    for (ptrdiff_t i = 0; i < OH * OW; i++) t += gy[i];
    s[9] = t;
}
#ifdef FC_HAVE_AVX2_PATH
/* V: vector type; L: lanes; LD, MLD (masked), Z (zero), FMA, ADD, MASK, HSUM */
#define FC_DW33_GW_AVX2(T, NAME, V, L, LD, MLD, Z, FMA, ADD, MASK, HSUM)                    \
FC_AVX2 static void NAME(const T* P, ptrdiff_t PW, const T* gy, ptrdiff_t OH, ptrdiff_t OW,  \
                         double* s) {                                                        \
    V a0 = Z(), a1 = Z(), a2 = Z(), a3 = Z(), a4 = Z(), a5 = Z(), a6 = Z(), a7 = Z();        \
    V a8 = Z(), ab = Z();                                                                    \
    const ptrdiff_t full = OW - OW % L;                                                      \
    const __m256i m = MASK(OW - full);                                                       \
    for (ptrdiff_t oh = 0; oh < OH; oh++) {                                                  \
        const T* g = gy + oh * OW;                                                           \
        const T* r0 = P + oh * PW;                                                           \
        const T* r1 = r0 + PW;                                                               \
        const T* r2 = r1 + PW;                                                               \
        ptrdiff_t i = 0;                                                                     \
        for (; i < full; i += L) {                                                           \
            V v = LD(g + i);                                                                 \
            ab = ADD(ab, v);                                                                 \
            a0 = FMA(v, LD(r0 + i), a0);                                                     \
            a1 = FMA(v, LD(r0 + i + 1), a1);                                                 \
            a2 = FMA(v, LD(r0 + i + 2), a2);                                                 \
            a3 = FMA(v, LD(r1 + i), a3);                                                     \
            a4 = FMA(v, LD(r1 + i + 1), a4);                                                 \
            a5 = FMA(v, LD(r1 + i + 2), a5);                                                 \
            a6 = FMA(v, LD(r2 + i), a6);                                                     \
            a7 = FMA(v, LD(r2 + i + 1), a7);                                                 \
            a8 = FMA(v, LD(r2 + i + 2), a8);                                                 \
        }                                                                                    \
        if (i < OW) {                 /* lanes past the row load 0 from both factors */     \
            V v = MLD(g + i, m);                                                             \
            ab = ADD(ab, v);                                                                 \
            a0 = FMA(v, MLD(r0 + i, m), a0);                                                 \
            a1 = FMA(v, MLD(r0 + i + 1, m), a1);                                             \
            a2 = FMA(v, MLD(r0 + i + 2, m), a2);                                             \
            a3 = FMA(v, MLD(r1 + i, m), a3);                                                 \
            a4 = FMA(v, MLD(r1 + i + 1, m), a4);                                             \
            a5 = FMA(v, MLD(r1 + i + 2, m), a5);                                             \
            a6 = FMA(v, MLD(r2 + i, m), a6);                                                 \
            a7 = FMA(v, MLD(r2 + i + 1, m), a7);                                             \
            a8 = FMA(v, MLD(r2 + i + 2, m), a8);                                             \
        }                                                                                    \
    }                                                                                        \
    s[0] = HSUM(a0); s[1] = HSUM(a1); s[2] = HSUM(a2); s[3] = HSUM(a3); s[4] = HSUM(a4);     \
    s[5] = HSUM(a5); s[6] = HSUM(a6); s[7] = HSUM(a7); s[8] = HSUM(a8); s[9] = HSUM(ab);     \
}
FC_AVX2 static inline __m256 fc_mld8(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }
FC_AVX2 static inline __m256d fc_mld4(const double* p, __m256i m) { return _mm256_maskload_pd(p, m); }
FC_DW33_FWD_AVX2(float, fc_dw33_fwd_f_avx2, __m256, 8, _mm256_loadu_ps, fc_mld8,
                 _mm256_storeu_ps, _mm256_maskstore_ps, _mm256_set1_ps, _mm256_fmadd_ps,
                 fc_mask8)
FC_DW33_FWD_AVX2(double, fc_dw33_fwd_d_avx2, __m256d, 4, _mm256_loadu_pd, fc_mld4,
                 _mm256_storeu_pd, _mm256_maskstore_pd, _mm256_set1_pd, _mm256_fmadd_pd,
                 fc_mask4)
FC_DW33_GW_AVX2(float, fc_dw33_gw_f_avx2, __m256, 8, _mm256_loadu_ps, fc_mld8,
                _mm256_setzero_ps, _mm256_fmadd_ps, _mm256_add_ps, fc_mask8, fc_hsum8)
FC_DW33_GW_AVX2(double, fc_dw33_gw_d_avx2, __m256d, 4, _mm256_loadu_pd, fc_mld4,
                _mm256_setzero_pd, _mm256_fmadd_pd, _mm256_add_pd, fc_mask4, fc_hsum4)
#endif
static void fc_dw33_fwd_f(const float* P, ptrdiff_t PW, const float* w, float b, float* out,
                          ptrdiff_t OH, ptrdiff_t OW) {
    FC_PICK(fc_dw33_fwd_f, P, PW, w, b, out, OH, OW);
}
static void fc_dw33_fwd_d(const double* P, ptrdiff_t PW, const double* w, double b,
                          double* out, ptrdiff_t OH, ptrdiff_t OW) {
    FC_PICK(fc_dw33_fwd_d, P, PW, w, b, out, OH, OW);
}
static void fc_dw33_gw_f(const float* P, ptrdiff_t PW, const float* gy, ptrdiff_t OH,
                         ptrdiff_t OW, double* s) {
    FC_PICK(fc_dw33_gw_f, P, PW, gy, OH, OW, s);
}
static void fc_dw33_gw_d(const double* P, ptrdiff_t PW, const double* gy, ptrdiff_t OH,
                         ptrdiff_t OW, double* s) {
    FC_PICK(fc_dw33_gw_d, P, PW, gy, OH, OW, s);
}

/* ---- depthwise planes of any kernel at stride 1 or 2 over a zero-padded copy ----------------
   P: the padded plane (stride 1 along the width), or its even columns then its odd columns
   (stride 2: two planes one after the other), with slack after it for whole-vector reads.
   off[t]: tap t's offset from the first input value of an output row's window; rs: values
   between consecutive output rows' first inputs.  So output (oh, ow) sums w[t] P[oh rs +
   off[t] + ow] over the taps t, each tap a run of consecutive values. */

/* out[oh][ow] = b + sum over t of w[t] P[oh rs + off[t] + ow] */
#define FC_DWK_FWD_BASE(T, NAME)                                                             \
static void NAME(const T* P, ptrdiff_t rs, const ptrdiff_t* off, const T* w, ptrdiff_t ntap, \
                 T b, T* out, ptrdiff_t OH, ptrdiff_t OW) {                                  \
    for (ptrdiff_t oh = 0; oh < OH; oh++) {                                                  \
        T* restrict o = out + oh * OW;                                                       \
        for (ptrdiff_t i = 0; i < OW; i++) o[i] = b;                                         \
        for (ptrdiff_t t = 0; t < ntap; t++) {                                               \
            const T* restrict p = P + oh * rs + off[t];                                      \
            const T wv = w[t];                                                               \
            for (ptrdiff_t i = 0; i < OW; i++) o[i] = o[i] + wv * p[i];                      \
        }                                                                                    \
    }                                                                                        \
}
FC_DWK_FWD_BASE(float, fc_dwk_fwd_f_base)
FC_DWK_FWD_BASE(double, fc_dwk_fwd_d_base)

/* s[t] = sum over oh, ow of gy[oh][ow] P[oh rs + off[t] + ow] (in double) */
#define FC_DWK_GW_BASE(T, NAME, DOT2D)                                                       \
static void NAME(const T* P, ptrdiff_t rs, const ptrdiff_t* off, ptrdiff_t ntap,             \
                 const T* gy, ptrdiff_t OH, ptrdiff_t OW, double* s) {                       \
    for (ptrdiff_t t = 0; t < ntap; t++) s[t] = DOT2D(gy, OW, P + off[t], rs, OH, OW);       \
}
FC_DWK_GW_BASE(float, fc_dwk_gw_f_base, fc_dot2d_f)
FC_DWK_GW_BASE(double, fc_dwk_gw_d_base, fc_dot2d_d)

#ifdef FC_HAVE_AVX2_PATH
/* NR output rows x NV vectors a block (8 accumulators: as many FMA chains as two pipes of
   4-cycle FMAs keep busy), every tap's weight broadcast once for the block.  Rows past OH
   repeat the last row (not stored); columns past OW read the next values (the slack: lanes
   never stored). */
#define FC_DWK_FWD_AVX2(T, NAME, V, L, NV, NR, LD, ST, MST, SET1, FMA, MASK)                \
FC_AVX2 static void NAME(const T* P, ptrdiff_t rs, const ptrdiff_t* off, const T* w,        \
                         ptrdiff_t ntap, T b, T* out, ptrdiff_t OH, ptrdiff_t OW) {          \
    const V vb = SET1(b);                                                                    \
    for (ptrdiff_t oh = 0; oh < OH; oh += NR) {                                              \
        const T* r[NR];                                                                      \
        _Pragma("GCC unroll 8")                                                              \
        for (int q = 0; q < NR; q++) r[q] = P + (oh + q < OH ? oh + q : OH - 1) * rs;        \
        for (ptrdiff_t ow = 0; ow < OW; ow += NV * L) {                                      \
            V acc[NR][NV];                                                                   \
            _Pragma("GCC unroll 8")                                                          \
            for (int q = 0; q < NR; q++)                                                     \
                _Pragma("GCC unroll 8")                                                      \
                for (int v = 0; v < NV; v++) acc[q][v] = vb;                                 \
            for (ptrdiff_t t = 0; t < ntap; t++) {                                           \
                const V wv = SET1(w[t]);                                                     \
                const ptrdiff_t o = off[t] + ow;                                             \
                _Pragma("GCC unroll 8")                                                      \
                for (int q = 0; q < NR; q++)                                                 \
                    _Pragma("GCC unroll 8")                                                  \
                    for (int v = 0; v < NV; v++)                                             \
                        acc[q][v] = FMA(wv, LD(r[q] + o + v * L), acc[q][v]);                \
            }                                                                                \
            _Pragma("GCC unroll 8")                                                          \
            for (int q = 0; q < NR; q++) {                                                   \
                if (oh + q >= OH) break;                                                     \
                T* o = out + (oh + q) * OW + ow;                                             \
                _Pragma("GCC unroll 8")                                                      \
                for (int v = 0; v < NV; v++) {                                               \
                    const ptrdiff_t n = OW - ow - v * L;                                     \
                    if (n >= L) ST(o + v * L, acc[q][v]);                                    \
                    else if (n > 0) MST(o + v * L, MASK(n), acc[q][v]);                      \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}
FC_DWK_FWD_AVX2(float, fc_dwk_fwd_f_4x2, __m256, 8, 4, 2, _mm256_loadu_ps, _mm256_storeu_ps,
                _mm256_maskstore_ps, _mm256_set1_ps, _mm256_fmadd_ps, fc_mask8)
FC_DWK_FWD_AVX2(float, fc_dwk_fwd_f_2x4, __m256, 8, 2, 4, _mm256_loadu_ps, _mm256_storeu_ps,
                _mm256_maskstore_ps, _mm256_set1_ps, _mm256_fmadd_ps, fc_mask8)
FC_DWK_FWD_AVX2(float, fc_dwk_fwd_f_1x8, __m256, 8, 1, 8, _mm256_loadu_ps, _mm256_storeu_ps,
                _mm256_maskstore_ps, _mm256_set1_ps, _mm256_fmadd_ps, fc_mask8)
FC_DWK_FWD_AVX2(double, fc_dwk_fwd_d_4x2, __m256d, 4, 4, 2, _mm256_loadu_pd, _mm256_storeu_pd,
                _mm256_maskstore_pd, _mm256_set1_pd, _mm256_fmadd_pd, fc_mask4)
FC_DWK_FWD_AVX2(double, fc_dwk_fwd_d_2x4, __m256d, 4, 2, 4, _mm256_loadu_pd, _mm256_storeu_pd,
                _mm256_maskstore_pd, _mm256_set1_pd, _mm256_fmadd_pd, fc_mask4)
FC_DWK_FWD_AVX2(double, fc_dwk_fwd_d_1x8, __m256d, 4, 1, 8, _mm256_loadu_pd, _mm256_storeu_pd,
                _mm256_maskstore_pd, _mm256_set1_pd, _mm256_fmadd_pd, fc_mask4)

/* G taps (G <= 8 accumulators) in one pass over the plane: one gy vector load for G FMAs;
   the row's tail by masked loads of gy and P (lanes past OW add 0 * 0) */
#define FC_DWK_GW_AVX2(T, NAME, V, L, G, LD, MLD, Z, FMA, MASK, HSUM)                        \
FC_AVX2 static void NAME(const T* P, ptrdiff_t rs, const ptrdiff_t* off, const T* gy,        \
                         ptrdiff_t OH, ptrdiff_t OW, double* s) {                            \
    V acc[G];                                                                                \
    _Pragma("GCC unroll 8")                                                                  \
    for (int j = 0; j < G; j++) acc[j] = Z();                                                \
    const ptrdiff_t full = OW - OW % L;                                                      \
    const __m256i m = MASK(OW - full);                                                       \
    for (ptrdiff_t oh = 0; oh < OH; oh++) {                                                  \
        const T* g = gy + oh * OW;                                                           \
        const T* r = P + oh * rs;                                                            \
        ptrdiff_t i = 0;                                                                     \
        for (; i < full; i += L) {                                                           \
            const V gv = LD(g + i);                                                          \
            _Pragma("GCC unroll 8")                                                          \
            for (int j = 0; j < G; j++) acc[j] = FMA(gv, LD(r + off[j] + i), acc[j]);        \
        }                                                                                    \
        if (i < OW) {                                                                        \
            const V gv = MLD(g + i, m);                                                      \
            _Pragma("GCC unroll 8")                                                          \
            for (int j = 0; j < G; j++) acc[j] = FMA(gv, MLD(r + off[j] + i, m), acc[j]);    \
        }                                                                                    \
    }                                                                                        \
    _Pragma("GCC unroll 8")                                                                  \
    for (int j = 0; j < G; j++) s[j] = HSUM(acc[j]);                                         \
}
#define FC_DWK_GW_F(G) FC_DWK_GW_AVX2(float, fc_dwk_gw_f_##G, __m256, 8, G, _mm256_loadu_ps,  \
                                      fc_mld8, _mm256_setzero_ps, _mm256_fmadd_ps, fc_mask8,  \
                                      fc_hsum8)
#define FC_DWK_GW_D(G) FC_DWK_GW_AVX2(double, fc_dwk_gw_d_##G, __m256d, 4, G, _mm256_loadu_pd, \
                                      fc_mld4, _mm256_setzero_pd, _mm256_fmadd_pd, fc_mask4,  \
                                      fc_hsum4)
FC_DWK_GW_F(1) FC_DWK_GW_F(2) FC_DWK_GW_F(3) FC_DWK_GW_F(4) FC_DWK_GW_F(5) FC_DWK_GW_F(6)
FC_DWK_GW_F(7) FC_DWK_GW_F(8)
FC_DWK_GW_D(1) FC_DWK_GW_D(2) FC_DWK_GW_D(3) FC_DWK_GW_D(4) FC_DWK_GW_D(5) FC_DWK_GW_D(6)
FC_DWK_GW_D(7) FC_DWK_GW_D(8)

/* the taps in ceil(ntap / 8) groups of about equal size */
#define FC_DWK_GW_PICK(T, NAME, PRE)                                                         \
static void NAME(const T* P, ptrdiff_t rs, const ptrdiff_t* off, ptrdiff_t ntap,             \
                 const T* gy, ptrdiff_t OH, ptrdiff_t OW, double* s) {                       \
    const ptrdiff_t ng = (ntap + 7) / 8;                                                     \
    for (ptrdiff_t t0 = 0, gi = 0; t0 < ntap; gi++) {                                        \
        const ptrdiff_t G = (ntap - t0 + (ng - gi) - 1) / (ng - gi);                         \
        switch (G) {                                                                         \
            case 1: PRE##1(P, rs, off + t0, gy, OH, OW, s + t0); break;                      \
            case 2: PRE##2(P, rs, off + t0, gy, OH, OW, s + t0); break;                      \
            case 3: PRE##3(P, rs, off + t0, gy, OH, OW, s + t0); break;                      \
            case 4: PRE##4(P, rs, off + t0, gy, OH, OW, s + t0); break;                      \
            case 5: PRE##5(P, rs, off + t0, gy, OH, OW, s + t0); break;                      \
            case 6: PRE##6(P, rs, off + t0, gy, OH, OW, s + t0); break;                      \
            case 7: PRE##7(P, rs, off + t0, gy, OH, OW, s + t0); break;                      \
            default: PRE##8(P, rs, off + t0, gy, OH, OW, s + t0); break;                     \
        }                                                                                    \
        t0 += G;                                                                             \
    }                                                                                        \
}
FC_DWK_GW_PICK(float, fc_dwk_gw_f_avx2, fc_dwk_gw_f_)
FC_DWK_GW_PICK(double, fc_dwk_gw_d_avx2, fc_dwk_gw_d_)
#endif

/* values of slack a padded plane needs after it for fc_dwk_fwd's whole-vector reads */
#define FC_DWK_SLACK 64

/* fc_dwk_fwd_f / _d: the AVX2 block shape by the output width (4x2 vectors x rows above two
   vectors of L values, 2x4 above one, else 1x8), or the portable loop */
#ifdef FC_HAVE_AVX2_PATH
#define FC_DWK_FWD_SHAPE(S, L)                                                                 \
    if (FC_USE_AVX2) {                                                                         \
        if (OW > 2 * (L)) fc_dwk_fwd_##S##_4x2(P, rs, off, w, ntap, b, out, OH, OW);           \
        else if (OW > (L)) fc_dwk_fwd_##S##_2x4(P, rs, off, w, ntap, b, out, OH, OW);          \
        else fc_dwk_fwd_##S##_1x8(P, rs, off, w, ntap, b, out, OH, OW);                        \
        return;                                                                                \
    }
#else
#define FC_DWK_FWD_SHAPE(S, L)
#endif
#define FC_DWK_FWD_PICK(T, S, L)                                                               \
static void fc_dwk_fwd_##S(const T* P, ptrdiff_t rs, const ptrdiff_t* off, const T* w,         \
                           ptrdiff_t ntap, T b, T* out, ptrdiff_t OH, ptrdiff_t OW) {          \
    FC_DWK_FWD_SHAPE(S, L)                                                                     \
    fc_dwk_fwd_##S##_base(P, rs, off, w, ntap, b, out, OH, OW);                                \
}
FC_DWK_FWD_PICK(float, f, 8)
FC_DWK_FWD_PICK(double, d, 4)
/* gcc turns short copy and zeroing loops into memcpy / memset calls (a libc call per short
   row); functions with this attribute keep their loops */
#if defined(__GNUC__) && !defined(__clang__)
#define FC_NO_LIBCALLS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define FC_NO_LIBCALLS
#endif

/* d[0, lo) = 0, d[lo, lo + n) = s[0, n), d[lo + n, m) = 0 (lo + n <= m): a row of the
   depthwise paths' zero-padded copy (memcpy and memset calls for 32-value rows had been as
   long as the 3x3 depthwise forward's arithmetic) */
#define FC_PAD_ROW(T, NAME, ATTR)                                                              \
ATTR FC_NO_LIBCALLS static void NAME(const T* restrict s, ptrdiff_t lo, ptrdiff_t n,           \
                                     ptrdiff_t m, T* restrict d) {                             \
    for (ptrdiff_t j = 0; j < lo; j++) d[j] = (T)0;                                            \
    for (ptrdiff_t j = 0; j < n; j++) d[lo + j] = s[j];                                        \
    for (ptrdiff_t j = lo + n; j < m; j++) d[j] = (T)0;                                        \
}
FC_PAD_ROW(float, fc_pad_row_f_base, )
FC_PAD_ROW(double, fc_pad_row_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_PAD_ROW(float, fc_pad_row_f_avx2, FC_AVX2)
FC_PAD_ROW(double, fc_pad_row_d_avx2, FC_AVX2)
#endif
static void fc_pad_row_f(const float* s, ptrdiff_t lo, ptrdiff_t n, ptrdiff_t m, float* d) {
    FC_PICK(fc_pad_row_f, s, lo, n, m, d);
}
static void fc_pad_row_d(const double* s, ptrdiff_t lo, ptrdiff_t n, ptrdiff_t m, double* d) {
    FC_PICK(fc_pad_row_d, s, lo, n, m, d);
}

/* e[j] = s[2j], o[j] = s[2j + 1] for j < n: the even and odd columns of a row (the stride-2
   depthwise paths' padded copy, whose scalar loop with bounds checks was 66 % of a 3x3 s2
   forward) */
#define FC_DEINT(T, NAME, ATTR)                                                                \
ATTR static void NAME(const T* restrict s, ptrdiff_t n, T* restrict e, T* restrict o) {        \
    for (ptrdiff_t j = 0; j < n; j++) {                                                        \
        e[j] = s[2 * j];                                                                       \
        o[j] = s[2 * j + 1];                                                                   \
    }                                                                                          \
}
FC_DEINT(float, fc_deint_f_base, )
FC_DEINT(double, fc_deint_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_DEINT(float, fc_deint_f_avx2, FC_AVX2)
FC_DEINT(double, fc_deint_d_avx2, FC_AVX2)
#endif
/* d[2j] = s[j], d[2j + 1] = 0 for j < n: a row of the stride-2 depthwise input gradient's
   zero-stuffed copy of grad_out */
#define FC_SPREAD2(T, NAME, ATTR)                                                              \
ATTR static void NAME(const T* restrict s, ptrdiff_t n, T* restrict d) {                       \
    for (ptrdiff_t j = 0; j < n; j++) {                                                        \
        d[2 * j] = s[j];                                                                       \
        d[2 * j + 1] = (T)0;                                                                   \
    }                                                                                          \
}
FC_SPREAD2(float, fc_spread2_f_base, )
FC_SPREAD2(double, fc_spread2_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_SPREAD2(float, fc_spread2_f_avx2, FC_AVX2)
FC_SPREAD2(double, fc_spread2_d_avx2, FC_AVX2)
#endif
static void fc_spread2_f(const float* s, ptrdiff_t n, float* d) { FC_PICK(fc_spread2_f, s, n, d); }
static void fc_spread2_d(const double* s, ptrdiff_t n, double* d) {
    FC_PICK(fc_spread2_d, s, n, d);
}
static void fc_deint_f(const float* s, ptrdiff_t n, float* e, float* o) {
    FC_PICK(fc_deint_f, s, n, e, o);
}
static void fc_deint_d(const double* s, ptrdiff_t n, double* e, double* o) {
    FC_PICK(fc_deint_d, s, n, e, o);
}
static void fc_dwk_gw_f(const float* P, ptrdiff_t rs, const ptrdiff_t* off, ptrdiff_t ntap,
                        const float* gy, ptrdiff_t OH, ptrdiff_t OW, double* s) {
    FC_PICK(fc_dwk_gw_f, P, rs, off, ntap, gy, OH, OW, s);
}
static void fc_dwk_gw_d(const double* P, ptrdiff_t rs, const ptrdiff_t* off, ptrdiff_t ntap,
                        const double* gy, ptrdiff_t OH, ptrdiff_t OW, double* s) {
    FC_PICK(fc_dwk_gw_d, P, rs, off, ntap, gy, OH, OW, s);
}

/* Max-pool backward for 2x2 windows with stride 2, one output row: the gradient goes to the
   first (row-major) element equal to the window's maximum, the three others get 0, all in
   one vectorisable pass (loads, compares and selects; the argmax kept as a T so that gcc
   if-converts doubles too: with int masks the double loop ran scalar, on branches).
   Returns nonzero when a window holds a NaN (PyTorch: the last NaN wins; +inf and -inf
   together also count, harmlessly), and the caller redoes the row. */
#define FC_MAXPOOL22_BWD(T, NAME, ATTR)                                                      \
ATTR static int NAME(const T* restrict x0, const T* restrict x1, const T* restrict g,        \
                     ptrdiff_t OW, T* restrict gx0, T* restrict gx1) {                       \
    T nan_seen = 0;                                                                          \
    for (ptrdiff_t i = 0; i < OW; i++) {                                                     \
        T a = x0[2 * i], b = x0[2 * i + 1], c = x1[2 * i], d = x1[2 * i + 1], gv = g[i];     \
        T m = a, s = 0;                /* the argmax as a T: selects of one vector type */   \
        s = b > m ? (T)1 : s;                                                                \
        m = b > m ? b : m;                                                                   \
        s = c > m ? (T)2 : s;                                                                \
        m = c > m ? c : m;                                                                   \
        s = d > m ? (T)3 : s;                                                                \
        gx0[2 * i] = s == 0 ? gv : (T)0;                                                     \
        gx0[2 * i + 1] = s == 1 ? gv : (T)0;                                                 \
        gx1[2 * i] = s == 2 ? gv : (T)0;                                                     \
        gx1[2 * i + 1] = s == 3 ? gv : (T)0;                                                 \
        nan_seen = (a + b + c + d) != (a + b + c + d) ? (T)1 : nan_seen;                     \
    }                                                                                        \
    return nan_seen != 0;                                                                    \
}
FC_MAXPOOL22_BWD(float, fc_maxpool22_bwd_f_base, )
FC_MAXPOOL22_BWD(double, fc_maxpool22_bwd_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_MAXPOOL22_BWD(float, fc_maxpool22_bwd_f_avx2, FC_AVX2)
FC_MAXPOOL22_BWD(double, fc_maxpool22_bwd_d_avx2, FC_AVX2)
#endif
static int fc_maxpool22_bwd_f(const float* x0, const float* x1, const float* g, ptrdiff_t OW,
                              float* gx0, float* gx1) {
    return FC_PICK(fc_maxpool22_bwd_f, x0, x1, g, OW, gx0, gx1);
}
static int fc_maxpool22_bwd_d(const double* x0, const double* x1, const double* g,
                              ptrdiff_t OW, double* gx0, double* gx1) {
    return FC_PICK(fc_maxpool22_bwd_d, x0, x1, g, OW, gx0, gx1);
}

/* Max-pool backward for 3x3 windows with stride 2 (dilation 1), one output row, windows
   i in [lo, hi), whose columns 2i .. 2i+2 of the rows x0, x1, x2 (already shifted by the
   padding) all lie in the image.  Each window's argmax follows PyTorch's scan: taps row-major,
   taking ``v > m or isnan(v)`` from m = -inf, so the first maximum wins and the last NaN;
   when nothing takes (all -inf) it stays at tap ordinal ``first`` (the first in-image tap: a
   row in the padding is passed as a row of -inf).  The argmax, as a tap ordinal, is kept in
   a float (sel): selects on one vector type, which the compiler vectorises.  Then
   gx_r[2i + k] += g[i] where window i's argmax is tap 3r + k: each column gets its even
   taps from windows i and i - 1, all in one pass per row without a scatter.  sel and c2
   hold at least hi + 1 entries. */
#define FC_MAXPOOL33S2_ROW(T, NAME, ATTR)                                                        \
ATTR static void NAME##_add(T* restrict gxr, const T* restrict sel, const T* restrict g,        \
                       T* restrict c2, T code, ptrdiff_t lo, ptrdiff_t hi) {                 \
    c2[lo] = 0;                                                                              \
    for (ptrdiff_t i = lo; i < hi; i++) {                                                    \
        T s = sel[i], gv = g[i];                                                             \
        c2[i + 1] = s == code + 2 ? gv : (T)0;                                               \
    }                                                                                        \
    for (ptrdiff_t i = lo; i < hi; i++) {                                                    \
        T s = sel[i], gv = g[i];                                                             \
        gxr[2 * i] += (s == code ? gv : (T)0) + c2[i];                                       \
        gxr[2 * i + 1] += s == code + 1 ? gv : (T)0;                                         \
    }                                                                                        \
    gxr[2 * hi] += c2[hi];                                                                   \
}                                                                                            \
ATTR static void NAME(const T* restrict x0, const T* restrict x1, const T* restrict x2,           \
                 const T* restrict g, ptrdiff_t lo, ptrdiff_t hi, T first, T* restrict sel,  \
                 T* restrict c2, T* gx0, T* gx1, T* gx2) {                                   \
    for (ptrdiff_t i = lo; i < hi; i++) {                                                    \
        T m = -INFINITY, s = first, v;                                                       \
        int t;                                                                               \
        const T* r0 = x0 + 2 * i;                                                            \
        const T* r1 = x1 + 2 * i;                                                            \
        const T* r2 = x2 + 2 * i;                                                            \
        v = r0[0]; t = (v > m) | (v != v); m = t ? v : m; s = t ? (T)0 : s;                  \
        v = r0[1]; t = (v > m) | (v != v); m = t ? v : m; s = t ? (T)1 : s;                  \
        v = r0[2]; t = (v > m) | (v != v); m = t ? v : m; s = t ? (T)2 : s;                  \
        v = r1[0]; t = (v > m) | (v != v); m = t ? v : m; s = t ? (T)3 : s;                  \
        v = r1[1]; t = (v > m) | (v != v); m = t ? v : m; s = t ? (T)4 : s;                  \
        v = r1[2]; t = (v > m) | (v != v); m = t ? v : m; s = t ? (T)5 : s;                  \
        v = r2[0]; t = (v > m) | (v != v); m = t ? v : m; s = t ? (T)6 : s;                  \
        v = r2[1]; t = (v > m) | (v != v); m = t ? v : m; s = t ? (T)7 : s;                  \
        v = r2[2]; t = (v > m) | (v != v); s = t ? (T)8 : s;                                 \
        sel[i] = s;                                                                          \
    }                                                                                        \
    NAME##_add(gx0, sel, g, c2, (T)0, lo, hi);                                               \
    NAME##_add(gx1, sel, g, c2, (T)3, lo, hi);                                               \
    NAME##_add(gx2, sel, g, c2, (T)6, lo, hi);                                               \
}
FC_MAXPOOL33S2_ROW(float, fc_maxpool33s2_bwd_f_base, )
FC_MAXPOOL33S2_ROW(double, fc_maxpool33s2_bwd_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_MAXPOOL33S2_ROW(float, fc_maxpool33s2_bwd_f_avx2, FC_AVX2)
FC_MAXPOOL33S2_ROW(double, fc_maxpool33s2_bwd_d_avx2, FC_AVX2)
#endif
static void fc_maxpool33s2_bwd_f(const float* x0, const float* x1, const float* x2,
                                 const float* g, ptrdiff_t lo, ptrdiff_t hi, float first,
                                 float* sel, float* c2, float* gx0, float* gx1, float* gx2) {
    FC_PICK(fc_maxpool33s2_bwd_f, x0, x1, x2, g, lo, hi, first, sel, c2, gx0, gx1, gx2);
}
static void fc_maxpool33s2_bwd_d(const double* x0, const double* x1, const double* x2,
                                 const double* g, ptrdiff_t lo, ptrdiff_t hi, double first,
                                 double* sel, double* c2, double* gx0, double* gx1,
                                 double* gx2) {
    FC_PICK(fc_maxpool33s2_bwd_d, x0, x1, x2, g, lo, hi, first, sel, c2, gx0, gx1, gx2);
}

/* Average pooling 2x2, stride 2, one output row of windows wholly in the image:
   o[i] = ((0 + (x0[2i] + x1[2i])) + (x0[2i+1] + x1[2i+1])) / div, the order of the general
   path (rows folded first, then taps, onto a zero: so an all -0 window gives +0, as
   PyTorch's sum from 0). */
#define FC_AVGPOOL22(T, NAME, ATTR)                                                          \
ATTR static void NAME(const T* restrict x0, const T* restrict x1, ptrdiff_t OW, T div,       \
                      T* restrict o) {                                                       \
    for (ptrdiff_t i = 0; i < OW; i++)                                                       \
        o[i] = (((T)0 + (x0[2 * i] + x1[2 * i])) + (x0[2 * i + 1] + x1[2 * i + 1])) / div;  \
}
FC_AVGPOOL22(float, fc_avgpool22_f_base, )
FC_AVGPOOL22(double, fc_avgpool22_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_AVGPOOL22(float, fc_avgpool22_f_avx2, FC_AVX2)
FC_AVGPOOL22(double, fc_avgpool22_d_avx2, FC_AVX2)
#endif
static void fc_avgpool22_f(const float* x0, const float* x1, ptrdiff_t OW, float div,
                           float* o) {
    FC_PICK(fc_avgpool22_f, x0, x1, OW, div, o);
}
static void fc_avgpool22_d(const double* x0, const double* x1, ptrdiff_t OW, double div,
                           double* o) {
    FC_PICK(fc_avgpool22_d, x0, x1, OW, div, o);
}

/* Max pooling 2x2, stride 2, values only, for a plane whose width is even (W = 2 OW) and
   rows 0 .. 2 OH - 1: the row pairs folded first (vm = NaN-aware max of rows 2oh and
   2oh + 1, contiguous), then adjacent pairs of vm, which for W = 2 OW are adjacent pairs of
   one flat array across output rows: a vector loop even for 7-wide outputs.  NaN-aware as
   PyTorch (``v > m or isnan(v)``); like the other separable paths only the sign of a zero
   maximum can differ from the row-major scan.  Rows are folded in chunks of FC_MP22_BUF
   values (W <= FC_MP22_BUF). */
#define FC_MP22_BUF 2048
#define FC_MP22_PAD 16      /* Wr: W rounded up to a multiple of this (a 512-bit vector of floats) */
#define FC_MX(a, m) (((a) > (m)) | ((a) != (a)) ? (a) : (m))
/* LANES values at a time (1: scalar, left to the compiler's vectoriser) by LOADU / STOREU,
   NANMAX(p, q) = FC_MX(q, p) of each lane, PAIRMAX(v0, v1): NANMAX of the adjacent pairs of
   the 2 LANES values, in order (scalar: NANMAX) */
#define FC_MAXPOOL22_FWD(T, NAME, ATTR, LANES, LOADU, STOREU, NANMAX, PAIRMAX)               \
ATTR static void NAME(const T* restrict x, ptrdiff_t OH, ptrdiff_t W, T* restrict out) {     \
    T vm[FC_MP22_BUF + FC_MP22_PAD];                                                         \
    ptrdiff_t OW = W / 2, rows = FC_MP22_BUF / W;                                            \
    ptrdiff_t Wr = (W + FC_MP22_PAD - 1) / FC_MP22_PAD * FC_MP22_PAD;                        \
    for (ptrdiff_t oh0 = 0; oh0 < OH; oh0 += rows) {                                         \
        ptrdiff_t nr = OH - oh0 < rows ? OH - oh0 : rows;                                    \
        /* row pairs fold Wr >= W values (a whole number of vectors, no scalar tail: 6 of */ \
        /* a 14-wide row's 14 were) where that stays inside the 2 OH rows: the excess reads */ \
        /* the next rows and lands on the next pair's values, rewritten by the next pass */  \
        /* (a plane 2 wide read 14 values past its end) */                                   \
        for (ptrdiff_t r = 0; r < nr; r++) {                                                 \
            const T* a = x + 2 * (oh0 + r) * W;                                              \
            const T* b = a + W;                                                              \
            T* v = vm + r * W;                                                               \
            ptrdiff_t n = (2 * (oh0 + r) + 1) * W + Wr <= 2 * OH * W ? Wr : W, w = 0;        \
            for (; w + LANES <= n; w += LANES)                                               \
                STOREU(v + w, NANMAX(LOADU(a + w), LOADU(b + w)));                           \
            for (; w < n; w++)                                                               \
                v[w] = FC_MX(b[w], a[w]);                                                    \
        }                                                                                    \
        T* o = out + oh0 * OW;                                                               \
        ptrdiff_t m = nr * OW, i = 0;                                                        \
        for (; i + LANES <= m; i += LANES)                                                   \
            STOREU(o + i, PAIRMAX(LOADU(vm + 2 * i), LOADU(vm + 2 * i + LANES)));            \
        for (; i < m; i++)                                                                   \
            o[i] = FC_MX(vm[2 * i + 1], vm[2 * i]);                                          \
    }                                                                                        \
}
#define FC_LOAD1(p) (*(p))
#define FC_STORE1(p, v) (*(p) = (v))
#define FC_NANMAX1(p, q) FC_MX(q, p)
FC_MAXPOOL22_FWD(float, fc_maxpool22_f_base, , 1, FC_LOAD1, FC_STORE1, FC_NANMAX1, FC_NANMAX1)
FC_MAXPOOL22_FWD(double, fc_maxpool22_d_base, , 1, FC_LOAD1, FC_STORE1, FC_NANMAX1,
                 FC_NANMAX1)
#ifdef FC_HAVE_AVX2_PATH
/* At AVX2 by hand: gcc's vectorisation of the scalar loops took 4 instructions for each
   NaN-aware max and gathered the pairs by vpermd, 2 input values a cycle (the pool fused
   after LeNet's conv1 was 20 % of that call at batch 64, Zen 3).  max(q, p) is q > p ? q :
   p (p when either is NaN), then q where q is NaN: FC_MX(q, p) bit for bit; the pairs by
   two shuffles (float) or unpacks (double), each giving the lanes (o0, o1, o4, o5 | o2, o3,
   o6, o7) or (o0, o2 | o1, o3), and one lane permute. */
FC_AVX2 static inline __m256 fc_nanmax8(__m256 p, __m256 q) {
    return _mm256_blendv_ps(_mm256_max_ps(q, p), q, _mm256_cmp_ps(q, q, _CMP_UNORD_Q));
}
FC_AVX2 static inline __m256d fc_nanmax4(__m256d p, __m256d q) {
    return _mm256_blendv_pd(_mm256_max_pd(q, p), q, _mm256_cmp_pd(q, q, _CMP_UNORD_Q));
}
FC_AVX2 static inline __m256 fc_pairmax8(__m256 v0, __m256 v1) {
    __m256 r = fc_nanmax8(_mm256_shuffle_ps(v0, v1, 0x88), _mm256_shuffle_ps(v0, v1, 0xDD));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(r), 0xD8));
}
FC_AVX2 static inline __m256d fc_pairmax4(__m256d v0, __m256d v1) {
    __m256d r = fc_nanmax4(_mm256_unpacklo_pd(v0, v1), _mm256_unpackhi_pd(v0, v1));
    return _mm256_permute4x64_pd(r, 0xD8);
}
FC_MAXPOOL22_FWD(float, fc_maxpool22_f_avx2, FC_AVX2, 8, _mm256_loadu_ps, _mm256_storeu_ps,
                 fc_nanmax8, fc_pairmax8)
FC_MAXPOOL22_FWD(double, fc_maxpool22_d_avx2, FC_AVX2, 4, _mm256_loadu_pd, _mm256_storeu_pd,
                 fc_nanmax4, fc_pairmax4)
#endif
static void fc_maxpool22_f(const float* x, ptrdiff_t OH, ptrdiff_t W, float* out) {
    FC_PICK(fc_maxpool22_f, x, OH, W, out);
}
static void fc_maxpool22_d(const double* x, ptrdiff_t OH, ptrdiff_t W, double* out) {
    FC_PICK(fc_maxpool22_d, x, OH, W, out);
}

/* Max pooling 3x3, stride 2, dilation 1, padding 0 or 1 in each direction, values only, one
   plane.  Separable the other way round from the general path: each input row is reduced
   horizontally once (h[i] = max of its columns 2i - pW .. 2i - pW + 2; a row is used by two
   output rows with stride 2, so this halves the horizontal work), then each output row is
   the max of its (up to) three h rows.  The row is first split into E[j] = row[2j - 1] and
   O[j] = row[2j] (-inf outside the row), so that the three taps read contiguously:
   pW = 1: E[i], O[i], E[i+1];  pW = 0: O[i], E[i+1], O[i+1].  NaN-aware as PyTorch
   (``v > m or isnan(v)``); like the other separable paths only the sign of a zero maximum
   (and which NaN) can differ from the row-major scan.  h rows are kept for a block of
   output rows at a time (FC_MP33_BUF values).  The common case, even W with pW = 1 and
   OW = W / 2 (ResNet's stem pool), goes the other way (_flat): rows folded first, split
   into even and odd columns as they are stored, then one flat loop over the whole block of
   output rows (no short-row tails), column 0 redone without its padding tap; the same
   operations in the same order as max_pool_row_fast.  Needs OW + 2 <= FC_MP33_ROW,
   W / 2 + 2 <= FC_MP33_ROW and 3 * OW <= FC_MP33_BUF (the caller checks). */
#define FC_MP33_ROW 1024
#define FC_MP33_BUF 4096
#define FC_MAXPOOL33S2_FWD(T, NAME, ATTR)                                                    \
ATTR static void NAME##_hrow(const T* restrict row, ptrdiff_t W, ptrdiff_t OW, int pW,       \
                             T* restrict E, T* restrict O, T* restrict h) {                  \
    ptrdiff_t n = W / 2, lim = (OW + 2 > n + 2 ? OW + 2 : n + 2), j;                         \
    E[0] = -INFINITY;                                                                        \
    for (j = 0; j < n; j++) {                                                                \
        O[j] = row[2 * j];                                                                   \
        E[j + 1] = row[2 * j + 1];                                                           \
    }                                                                                        \
    for (j = n + 1; j < lim; j++) E[j] = -INFINITY;                                          \
    for (j = n; j < lim; j++) O[j] = -INFINITY;                                              \
    if (W & 1) O[n] = row[W - 1];                                                            \
    if (pW) {                                                                                \
        for (ptrdiff_t i = 0; i < OW; i++) {                                                 \
            T m = E[i], a = O[i], b = E[i + 1];                                              \
            m = FC_MX(a, m);                                                                 \
            h[i] = FC_MX(b, m);                                                              \
        }                                                                                    \
    } else {                                                                                 \
        for (ptrdiff_t i = 0; i < OW; i++) {                                                 \
            T m = O[i], a = E[i + 1], b = O[i + 1];                                          \
            m = FC_MX(a, m);                                                                 \
            h[i] = FC_MX(b, m);                                                              \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
ATTR static void NAME##_flat(const T* restrict x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,     \
                             int pH, T* restrict out, T* restrict hb) {                     \
    ptrdiff_t n = W / 2, nb = (FC_MP33_BUF - 1) / 2 / n;                                     \
    T* restrict Ev = hb + 1;                                                                 \
    for (ptrdiff_t oh0 = 0; oh0 < OH; oh0 += nb) {                                           \
        ptrdiff_t oh1 = OH - oh0 < nb ? OH : oh0 + nb, len = (oh1 - oh0) * n;                \
        T* restrict Ov = Ev + len;                                                           \
        for (ptrdiff_t oh = oh0; oh < oh1; oh++) {                                           \
            const T* v[3];                                                                   \
            int nv = 0;                                                                      \
            for (ptrdiff_t r = 2 * oh - pH; r < 2 * oh - pH + 3; r++)                        \
                if (r >= 0 && r < H) v[nv++] = x + r * W;                                    \
            T* restrict e = Ev + (oh - oh0) * n;                                             \
            T* restrict o = Ov + (oh - oh0) * n;                                             \
            if (nv == 3) {                                                                   \
                const T* restrict a = v[0];                                                  \
                const T* restrict b = v[1];                                                  \
                const T* restrict c = v[2];                                                  \
                for (ptrdiff_t j = 0; j < n; j++) {                                          \
                    T m0 = a[2 * j], m1 = a[2 * j + 1], p0 = b[2 * j], p1 = b[2 * j + 1];    \
                    T q0 = c[2 * j], q1 = c[2 * j + 1];                                      \
                    m0 = FC_MX(p0, m0);                                                      \
                    m1 = FC_MX(p1, m1);                                                      \
                    o[j] = FC_MX(q0, m0);                                                    \
                    e[j] = FC_MX(q1, m1);                                                    \
                }                                                                            \
            } else if (nv == 2) {                                                            \
                const T* restrict a = v[0];                                                  \
                const T* restrict b = v[1];                                                  \
                for (ptrdiff_t j = 0; j < n; j++) {                                          \
                    T m0 = a[2 * j], m1 = a[2 * j + 1], p0 = b[2 * j], p1 = b[2 * j + 1];    \
                    o[j] = FC_MX(p0, m0);                                                    \
                    e[j] = FC_MX(p1, m1);                                                    \
                }                                                                            \
            } else {                                                                         \
                for (ptrdiff_t j = 0; j < n; j++) {                                          \
                    o[j] = nv ? v[0][2 * j] : -INFINITY;                                     \
                    e[j] = nv ? v[0][2 * j + 1] : -INFINITY;                                 \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        T* restrict y = out + oh0 * n;                                                       \
        for (ptrdiff_t k = 0; k < len; k++) {      /* taps 2i - 1, 2i, 2i + 1, flat */       \
            T m = Ev[k - 1], a = Ov[k], b = Ev[k];                                           \
            m = FC_MX(a, m);                                                                 \
            y[k] = FC_MX(b, m);                                                              \
        }                                                                                    \
        for (ptrdiff_t k = 0; k < len; k += n) {   /* column 0: tap 2i - 1 is padding */     \
            T a = Ov[k], b = Ev[k];                                                          \
            y[k] = FC_MX(b, a);                                                              \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
ATTR static void NAME(const T* restrict x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,           \
                      ptrdiff_t OW, int pH, int pW, T* restrict out) {                       \
    T E[FC_MP33_ROW], O[FC_MP33_ROW], hb[FC_MP33_BUF];                                       \
    if (pW == 1 && !(W & 1) && OW == W / 2 && W <= FC_MP33_BUF / 4) {                        \
        hb[0] = -INFINITY;                                                                   \
        NAME##_flat(x, H, W, OH, pH, out, hb);                                               \
        return;                                                                              \
    }                                                                                        \
    ptrdiff_t nb = (FC_MP33_BUF / OW - 1) / 2;          /* output rows a block */            \
    for (ptrdiff_t oh0 = 0; oh0 < OH; oh0 += nb) {                                           \
        ptrdiff_t oh1 = OH - oh0 < nb ? OH : oh0 + nb;                                       \
        ptrdiff_t ra = 2 * oh0 - pH, rb = 2 * (oh1 - 1) - pH + 3;                            \
        if (ra < 0) ra = 0;                                                                  \
        if (rb > H) rb = H;                                                                  \
        for (ptrdiff_t r = ra; r < rb; r++)                                                  \
            NAME##_hrow(x + r * W, W, OW, pW, E, O, hb + (r - ra) * OW);                     \
        for (ptrdiff_t oh = oh0; oh < oh1; oh++) {                                           \
            const T* v[3];                                                                   \
            int nv = 0;                                                                      \
            for (ptrdiff_t r = 2 * oh - pH; r < 2 * oh - pH + 3; r++)                        \
                if (r >= ra && r < rb) v[nv++] = hb + (r - ra) * OW;                         \
            T* o = out + oh * OW;                                                            \
            if (nv == 3) {                                                                   \
                const T* restrict a = v[0];                                                  \
                const T* restrict b = v[1];                                                  \
                const T* restrict c = v[2];                                                  \
                for (ptrdiff_t i = 0; i < OW; i++) {                                         \
                    T m = a[i], p = b[i], q = c[i];                                          \
                    m = FC_MX(p, m);                                                         \
                    o[i] = FC_MX(q, m);                                                      \
                }                                                                            \
            } else if (nv == 2) {                                                            \
                const T* restrict a = v[0];                                                  \
                const T* restrict b = v[1];                                                  \
                for (ptrdiff_t i = 0; i < OW; i++) {                                         \
                    T m = a[i], p = b[i];                                                    \
                    o[i] = FC_MX(p, m);                                                      \
                }                                                                            \
            } else {                                                                         \
                for (ptrdiff_t i = 0; i < OW; i++) o[i] = nv ? v[0][i] : -INFINITY;          \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}
FC_MAXPOOL33S2_FWD(float, fc_maxpool33s2_f_base, )
FC_MAXPOOL33S2_FWD(double, fc_maxpool33s2_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_MAXPOOL33S2_FWD(float, fc_maxpool33s2_f_avx2, FC_AVX2)
FC_MAXPOOL33S2_FWD(double, fc_maxpool33s2_d_avx2, FC_AVX2)
/* float64 also compiled for AVX-512 (8 lanes): 3x3 stride-2 forward 1.36x, where the float
   build for it was 0.51x (Intel Xeon model 207) */
FC_MAXPOOL33S2_FWD(double, fc_maxpool33s2_d_avx512, FC_AVX512)
#endif
static void fc_maxpool33s2_f(const float* x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,
                             ptrdiff_t OW, int pH, int pW, float* out) {
    FC_PICK(fc_maxpool33s2_f, x, H, W, OH, OW, pH, pW, out);
}
static void fc_maxpool33s2_d(const double* x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,
                             ptrdiff_t OW, int pH, int pW, double* out) {
#ifdef FC_HAVE_AVX2_PATH
    if (FC_USE_AVX2 && fc_avx512_on) {
        fc_maxpool33s2_d_avx512(x, H, W, OH, OW, pH, pW, out);
        return;
    }
#endif
    FC_PICK(fc_maxpool33s2_d, x, H, W, OH, OW, pH, pW, out);
}

/* Max pooling of 16 small planes at once, values only, any window (kernel, stride, padding,
   dilation): the planes are interleaved into buf (value (h, w) of plane l at
   buf[(h * W + w) * 16 + l]), each window is scanned once with its 16 lanes as one vector
   per tap, and the outputs are de-interleaved from obuf.  For planes too small for the
   per-plane paths to run full vectors (7x7, 14x14: there the set-up and the scalar tails of
   each plane cost 5-8x ONNX Runtime's time, which keeps channels in vector lanes too).  The
   scan is the per-plane one: rows, then columns, ``v > m or isnan(v)``, from -inf.
   Needs H * W <= FC_POOL_LANE_VALS and OH * OW <= FC_POOL_LANE_VALS (the caller checks). */
#define FC_POOL_LANE_VALS 256
/* the interleaving of 16 planes into buf and out of obuf (FC_MAXPOOL_LANES, FC_AVGPOOL_LANES) */
#define FC_LANES_IN(T, x, HW, buf)                                                           \
    for (ptrdiff_t i0 = 0; i0 < HW; i0 += 8) {       /* 8 columns of 16 planes at a time */  \
        const ptrdiff_t n = HW - i0 < 8 ? HW - i0 : 8;                                       \
        for (int l = 0; l < 16; l++) {                                                       \
            const T* restrict xl = x + l * HW + i0;                                          \
            T* restrict bl = buf + i0 * 16 + l;                                              \
            for (ptrdiff_t i = 0; i < n; i++) bl[i * 16] = xl[i];                            \
        }                                                                                    \
    }
#define FC_LANES_OUT(T)                                                                      \
    for (int l = 0; l < 16; l++) {                                                           \
        T* restrict ol = out + l * OHW;                                                      \
        for (ptrdiff_t i = 0; i < OHW; i++) ol[i] = obuf[i * 16 + l];                        \
    }
/* FC_LANES_IN for floats with AVX2: 8 values of 8 planes at a time by an 8x8 transpose in
   registers (the scalar one stores one value at a time, 16 apart: most of a 7x7 pool) */
#ifdef FC_HAVE_AVX2_PATH
/* o[j * ldo + r] = s[r * lds + j] for r, j < 8: an 8x8 transpose in registers (also the own
   GEMM's transposes, _gemm.h) */
/* the 8x8 transpose of rows r0..r7 into o (column j at o + j * ldo), stores in increasing
   order of j (fc_tr6x8_ps in _gemm.h relies on it) */
FC_AVX2 static inline void fc_tr8x8_regs(__m256 r0, __m256 r1, __m256 r2, __m256 r3, __m256 r4,
                                         __m256 r5, __m256 r6, __m256 r7, float* o,
                                         ptrdiff_t ldo) {
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(o, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(o + ldo, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(o + 2 * ldo, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(o + 3 * ldo, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(o + 4 * ldo, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(o + 5 * ldo, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(o + 6 * ldo, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(o + 7 * ldo, _mm256_permute2f128_ps(s3, s7, 0x31));
}
FC_AVX2 static inline void fc_tr8x8_ps(const float* s, ptrdiff_t lds, float* o,
                                       ptrdiff_t ldo) {
    fc_tr8x8_regs(_mm256_loadu_ps(s), _mm256_loadu_ps(s + lds), _mm256_loadu_ps(s + 2 * lds),
                  _mm256_loadu_ps(s + 3 * lds), _mm256_loadu_ps(s + 4 * lds),
                  _mm256_loadu_ps(s + 5 * lds), _mm256_loadu_ps(s + 6 * lds),
                  _mm256_loadu_ps(s + 7 * lds), o, ldo);
}
FC_AVX2 static inline void fc_lanes_in8_f(const float* x, ptrdiff_t HW, ptrdiff_t i0,
                                          float* b) {
    fc_tr8x8_ps(x + i0, HW, b + i0 * 16, 16);   /* column j of the 8 planes: b + 16 j */
}
#define FC_LANES_IN_AVX2F(T, x, HW, buf)                                                     \
    {                                                                                        \
        ptrdiff_t i0 = 0;                                                                    \
        for (; i0 + 8 <= HW; i0 += 8) {                                                      \
            fc_lanes_in8_f(x, HW, i0, buf);                                                  \
            fc_lanes_in8_f(x + 8 * HW, HW, i0, buf + 8);                                     \
        }                                                                                    \
        for (int l = 0; l < 16; l++)                                                         \
            for (ptrdiff_t i = i0; i < HW; i++) buf[i * 16 + l] = x[l * HW + i];             \
    }
#endif
#define FC_MAXPOOL_LANES(T, NAME, ATTR, LANES_IN)                                            \
ATTR static void NAME(const T* restrict x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,           \
                      ptrdiff_t OW, ptrdiff_t kH, ptrdiff_t kW, ptrdiff_t sH, ptrdiff_t sW,  \
                      ptrdiff_t pH, ptrdiff_t pW, ptrdiff_t dH, ptrdiff_t dW, T* restrict out) {\
    T buf[16 * FC_POOL_LANE_VALS], obuf[16 * FC_POOL_LANE_VALS];                             \
    const ptrdiff_t HW = H * W, OHW = OH * OW;                                               \
    LANES_IN(T, x, HW, buf)                                                                  \
    for (ptrdiff_t oh = 0; oh < OH; oh++)                                                    \
        for (ptrdiff_t ow = 0; ow < OW; ow++) {                                              \
            /* the window's taps inside the plane: [kh0, kh1) x [kw0, kw1) (no branch */     \
            /* in the tap loops, which kept gcc from vectorising the lane loop) */           \
            const ptrdiff_t h0 = oh * sH - pH, w0 = ow * sW - pW;                            \
            ptrdiff_t kh0 = 0, kh1 = kH, kw0 = 0, kw1 = kW;                                  \
            while (kh0 < kH && h0 + kh0 * dH < 0) kh0++;                                     \
            while (kh1 > kh0 && h0 + (kh1 - 1) * dH >= H) kh1--;                             \
            while (kw0 < kW && w0 + kw0 * dW < 0) kw0++;                                     \
            while (kw1 > kw0 && w0 + (kw1 - 1) * dW >= W) kw1--;                             \
            T m[16];                                                                         \
            for (int l = 0; l < 16; l++) m[l] = -INFINITY;                                   \
            for (ptrdiff_t kh = kh0; kh < kh1; kh++)                                         \
                for (ptrdiff_t kw = kw0; kw < kw1; kw++) {                                   \
                    const T* restrict v = buf + ((h0 + kh * dH) * W + w0 + kw * dW) * 16;    \
                    _Pragma("GCC unroll 1")    /* else unrolled, then not vectorised */      \
                    for (int l = 0; l < 16; l++) {                                           \
                        T a = v[l], c = m[l];                                                \
                        m[l] = (a > c) | (a != a) ? a : c;                                   \
                    }                                                                        \
                }                                                                            \
            T* restrict o = obuf + (oh * OW + ow) * 16;                                      \
            for (int l = 0; l < 16; l++) o[l] = m[l];                                        \
        }                                                                                    \
    FC_LANES_OUT(T)                                                                          \
}
/* Average pooling of 16 small planes at once (as FC_MAXPOOL_LANES): window sums over the
   taps inside the plane, then out = sum / dv[o], or 0 where em[o] (an empty window); dv
   and em per output position, the same for every plane, made by the caller with
   avg_divisor's rules.  Needs the sizes FC_MAXPOOL_LANES needs. */
#define FC_AVGPOOL_LANES(T, NAME, ATTR, LANES_IN)                                            \
ATTR static void NAME(const T* restrict x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,           \
                      ptrdiff_t OW, ptrdiff_t kH, ptrdiff_t kW, ptrdiff_t sH, ptrdiff_t sW,  \
                      ptrdiff_t pH, ptrdiff_t pW, const T* restrict dv,                      \
                      const unsigned char* restrict em, T* restrict out) {                   \
    T buf[16 * FC_POOL_LANE_VALS], obuf[16 * FC_POOL_LANE_VALS];                             \
    const ptrdiff_t HW = H * W, OHW = OH * OW;                                               \
    LANES_IN(T, x, HW, buf)                                                                  \
    for (ptrdiff_t oh = 0; oh < OH; oh++)                                                    \
        for (ptrdiff_t ow = 0; ow < OW; ow++) {                                              \
            const ptrdiff_t h0 = oh * sH - pH, w0 = ow * sW - pW;                            \
            const ptrdiff_t ha = h0 > 0 ? h0 : 0, hb = h0 + kH < H ? h0 + kH : H;            \
            const ptrdiff_t wa = w0 > 0 ? w0 : 0, wb = w0 + kW < W ? w0 + kW : W;            \
            const ptrdiff_t o = oh * OW + ow;                                                \
            T acc[16];                                                                       \
            for (int l = 0; l < 16; l++) acc[l] = 0;                                         \
            for (ptrdiff_t ih = ha; ih < hb; ih++)                                           \
                for (ptrdiff_t iw = wa; iw < wb; iw++) {                                     \
                    const T* restrict v = buf + (ih * W + iw) * 16;                          \
                    _Pragma("GCC unroll 1")    /* else unrolled, then not vectorised */      \
                    for (int l = 0; l < 16; l++) acc[l] += v[l];                             \
                }                                                                            \
            const T d = dv[o];                                                               \
            T* restrict ob = obuf + o * 16;                                                  \
            if (em[o])                                                                       \
                for (int l = 0; l < 16; l++) ob[l] = 0;                                      \
            else                                                                             \
                for (int l = 0; l < 16; l++) ob[l] = acc[l] / d;                             \
        }                                                                                    \
    FC_LANES_OUT(T)                                                                          \
}
FC_MAXPOOL_LANES(float, fc_maxpool_lanes_f_base, , FC_LANES_IN)
FC_MAXPOOL_LANES(double, fc_maxpool_lanes_d_base, , FC_LANES_IN)
FC_AVGPOOL_LANES(float, fc_avgpool_lanes_f_base, , FC_LANES_IN)
FC_AVGPOOL_LANES(double, fc_avgpool_lanes_d_base, , FC_LANES_IN)
#ifdef FC_HAVE_AVX2_PATH
FC_MAXPOOL_LANES(float, fc_maxpool_lanes_f_avx2, FC_AVX2, FC_LANES_IN_AVX2F)
FC_MAXPOOL_LANES(double, fc_maxpool_lanes_d_avx2, FC_AVX2, FC_LANES_IN)
FC_AVGPOOL_LANES(float, fc_avgpool_lanes_f_avx2, FC_AVX2, FC_LANES_IN_AVX2F)
FC_AVGPOOL_LANES(double, fc_avgpool_lanes_d_avx2, FC_AVX2, FC_LANES_IN)
#endif
#define FC_MAXPOOL_LANES_PICK(T, S)                                                          \
static void fc_maxpool_lanes_##S(const T* x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,         \
        ptrdiff_t OW, ptrdiff_t kH, ptrdiff_t kW, ptrdiff_t sH, ptrdiff_t sW, ptrdiff_t pH,  \
        ptrdiff_t pW, ptrdiff_t dH, ptrdiff_t dW, T* out) {                                  \
    FC_PICK(fc_maxpool_lanes_##S, x, H, W, OH, OW, kH, kW, sH, sW, pH, pW, dH, dW, out);     \
}
FC_MAXPOOL_LANES_PICK(float, f)
FC_MAXPOOL_LANES_PICK(double, d)
#define FC_AVGPOOL_LANES_PICK(T, S)                                                          \
static void fc_avgpool_lanes_##S(const T* x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,         \
        ptrdiff_t OW, ptrdiff_t kH, ptrdiff_t kW, ptrdiff_t sH, ptrdiff_t sW, ptrdiff_t pH,  \
        ptrdiff_t pW, const T* dv, const unsigned char* em, T* out) {                        \
    FC_PICK(fc_avgpool_lanes_##S, x, H, W, OH, OW, kH, kW, sH, sW, pH, pW, dv, em, out);     \
}
FC_AVGPOOL_LANES_PICK(float, f)
FC_AVGPOOL_LANES_PICK(double, d)

/* col2im's scatter-add for stride 2 along the width, two adjacent taps (kw, kw + 1) at once:
   d[2i] += a[i], d[2i + 1] += b[i], which interleaves into contiguous vector adds instead of
   the stride-2 scalar adds one tap at a time (a quarter of a transposed convolution's time). */
#define FC_COL2IM_PAIR(T, NAME, ATTR)                                                        \
ATTR static void NAME(T* restrict d, const T* restrict a, const T* restrict b, ptrdiff_t n) { \
    for (ptrdiff_t i = 0; i < n; i++) {                                                      \
        d[2 * i] += a[i];                                                                    \
        d[2 * i + 1] += b[i];                                                                \
    }                                                                                        \
}
FC_COL2IM_PAIR(float, fc_col2im_pair_f_base, )
FC_COL2IM_PAIR(double, fc_col2im_pair_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_COL2IM_PAIR(float, fc_col2im_pair_f_avx2, FC_AVX2)
FC_COL2IM_PAIR(double, fc_col2im_pair_d_avx2, FC_AVX2)
#endif
static void fc_col2im_pair_f(float* d, const float* a, const float* b, ptrdiff_t n) {
    FC_PICK(fc_col2im_pair_f, d, a, b, n);
}
static void fc_col2im_pair_d(double* d, const double* a, const double* b, ptrdiff_t n) {
    FC_PICK(fc_col2im_pair_d, d, a, b, n);
}

/* col2im's scatter-add for stride 1 along the width, a run of rows at once:
   d[r * ds + ow] += s[r * OW + ow] for r < rows and lo <= ow < hi (d: the image rows of one
   tap, ds apart; s: that tap's row of the column matrix).  The Cython loop did this row by
   row in baseline SSE; here the AVX2 copy runs 8 floats a vector (LeNet's conv2 input
   gradient: col2im was 7 % of a training step). */
#define FC_COL2IM_S1(T, NAME, ATTR)                                                          \
ATTR static void NAME(T* restrict d, ptrdiff_t ds, const T* restrict s, ptrdiff_t OW,        \
                      ptrdiff_t rows, ptrdiff_t lo, ptrdiff_t hi) {                          \
    for (ptrdiff_t r = 0; r < rows; r++) {                                                   \
        T* restrict dr = d + r * ds;                                                         \
        const T* restrict sr = s + r * OW;                                                   \
        for (ptrdiff_t ow = lo; ow < hi; ow++) dr[ow] += sr[ow];                             \
    }                                                                                        \
}
FC_COL2IM_S1(float, fc_col2im_s1_f_base, )
FC_COL2IM_S1(double, fc_col2im_s1_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_COL2IM_S1(float, fc_col2im_s1_f_avx2, FC_AVX2)
FC_COL2IM_S1(double, fc_col2im_s1_d_avx2, FC_AVX2)
#endif
static void fc_col2im_s1_f(float* d, ptrdiff_t ds, const float* s, ptrdiff_t OW,
                           ptrdiff_t rows, ptrdiff_t lo, ptrdiff_t hi) {
    FC_PICK(fc_col2im_s1_f, d, ds, s, OW, rows, lo, hi);
}
static void fc_col2im_s1_d(double* d, ptrdiff_t ds, const double* s, ptrdiff_t OW,
                           ptrdiff_t rows, ptrdiff_t lo, ptrdiff_t hi) {
    FC_PICK(fc_col2im_s1_d, d, ds, s, OW, rows, lo, hi);
}

/* Nearest upsampling by 2 along the width: one input row of W values -> the output row
   d0 of 2W values (d0[2i] = d0[2i + 1] = s[i]) and, when d1 is not NULL, the same row again
   at d1 (x2 along the height too).  The portable loop compiles to shuffles of SSE2 vectors;
   the AVX-512 one widens 16 floats (8 doubles) into two vectors by a permute and stores them
   to both rows, the row's tail by masked loads and stores (Intel Xeon model 207, 64 x 28^2
   -> 56^2 float32, batch 16: 1.16x with the output far past the L2, 1.55x within it). */
#define FC_UPS2_ROW(T, NAME, ATTR)                                                           \
ATTR static void NAME(const T* restrict s, ptrdiff_t W, T* restrict d0, T* restrict d1) {   \
    if (d1 != NULL) {                                                                        \
        for (ptrdiff_t i = 0; i < W; i++) {                                                  \
            T v = s[i];                                                                      \
            d0[2 * i] = v; d0[2 * i + 1] = v; d1[2 * i] = v; d1[2 * i + 1] = v;              \
        }                                                                                    \
    } else {                                                                                 \
        for (ptrdiff_t i = 0; i < W; i++) {                                                  \
            T v = s[i];                                                                      \
            d0[2 * i] = v; d0[2 * i + 1] = v;                                                \
        }                                                                                    \
    }                                                                                        \
}
FC_UPS2_ROW(float, fc_ups2_row_f_base, )
FC_UPS2_ROW(double, fc_ups2_row_d_base, )
#ifdef FC_HAVE_AVX2_PATH
FC_UPS2_ROW(float, fc_ups2_row_f_avx2, FC_AVX2)
FC_UPS2_ROW(double, fc_ups2_row_d_avx2, FC_AVX2)
/* L lanes of T a vector (V, mask type __mmask##L, intrinsics suffix SFX); lo and hi pick
   lanes [0, L/2) and [L/2, L) of the loaded vector twice each */
#define FC_UPS2_ROW512(T, NAME, V, L, SFX, LO, HI)                                            \
FC_AVX512 static void NAME(const T* restrict s, ptrdiff_t W, T* restrict d0,                  \
                           T* restrict d1) {                                                  \
    const __m512i lo = LO, hi = HI;                                                          \
    ptrdiff_t i = 0;                                                                         \
    for (; i + L <= W; i += L) {                                                             \
        V v = _mm512_loadu_##SFX(s + i);                                                     \
        V a = _mm512_permutexvar_##SFX(lo, v), b = _mm512_permutexvar_##SFX(hi, v);          \
        _mm512_storeu_##SFX(d0 + 2 * i, a);                                                  \
        _mm512_storeu_##SFX(d0 + 2 * i + L, b);                                              \
        if (d1 != NULL) {                                                                    \
            _mm512_storeu_##SFX(d1 + 2 * i, a);                                              \
            _mm512_storeu_##SFX(d1 + 2 * i + L, b);                                          \
        }                                                                                    \
    }                                                                                        \
    if (i < W) {                    /* k = W - i in [1, L): 2k output values */             \
        unsigned k = (unsigned)(W - i);                                                      \
        V v = _mm512_maskz_loadu_##SFX((__mmask##L)((1u << k) - 1), s + i);                  \
        V a = _mm512_permutexvar_##SFX(lo, v), b = _mm512_permutexvar_##SFX(hi, v);          \
        __mmask##L ma = k >= L / 2 ? (__mmask##L)~0u : (__mmask##L)((1u << (2 * k)) - 1);    \
        __mmask##L mb = k > L / 2 ? (__mmask##L)((1u << (2 * k - L)) - 1) : (__mmask##L)0;   \
        _mm512_mask_storeu_##SFX(d0 + 2 * i, ma, a);                                         \
        _mm512_mask_storeu_##SFX(d0 + 2 * i + L, mb, b);                                     \
        if (d1 != NULL) {                                                                    \
            _mm512_mask_storeu_##SFX(d1 + 2 * i, ma, a);                                     \
            _mm512_mask_storeu_##SFX(d1 + 2 * i + L, mb, b);                                 \
        }                                                                                    \
    }                                                                                        \
}
FC_UPS2_ROW512(float, fc_ups2_row_f_avx512, __m512, 16, ps,
               _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0),
               _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8))
FC_UPS2_ROW512(double, fc_ups2_row_d_avx512, __m512d, 8, pd,
               _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0), _mm512_set_epi64(7, 7, 6, 6, 5, 5, 4, 4))
#endif
static void fc_ups2_row_f(const float* s, ptrdiff_t W, float* d0, float* d1) {
#ifdef FC_HAVE_AVX2_PATH
    if (FC_USE_AVX2 && fc_avx512_on) {
        fc_ups2_row_f_avx512(s, W, d0, d1);
        return;
    }
#endif
    FC_PICK(fc_ups2_row_f, s, W, d0, d1);
}
static void fc_ups2_row_d(const double* s, ptrdiff_t W, double* d0, double* d1) {
#ifdef FC_HAVE_AVX2_PATH
    if (FC_USE_AVX2 && fc_avx512_on) {
        fc_ups2_row_d_avx512(s, W, d0, d1);
        return;
    }
#endif
    FC_PICK(fc_ups2_row_d, s, W, d0, d1);
}

/* d[i] -= g[i] * s for i < n, the product rounded first: numpy's multiply into a temporary,
 * then subtract (the optimizers' update), bit for bit.  Never contracted into an FMA (which
 * rounds once: 18 % of float32 values differ), whatever the target's defaults (gcc contracts
 * where FMA exists, e.g. aarch64 or -march=native). */
#if defined(__clang__)
#define FC_NO_CONTRACT
#elif defined(__GNUC__)
#define FC_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define FC_NO_CONTRACT
#endif
#define FC_SUB_SCALED(NAME, T)                                                                  \
FC_NO_CONTRACT static void NAME(T* d, const T* g, T s, ptrdiff_t n) {                          \
    FC_CLANG_NO_CONTRACT                                                                        \
    for (ptrdiff_t i = 0; i < n; i++) {                                                         \
        T p = g[i] * s;                                                                         \
        d[i] = d[i] - p;                                                                        \
    }                                                                                           \
}
#if defined(__clang__)
#define FC_CLANG_NO_CONTRACT _Pragma("STDC FP_CONTRACT OFF")
#else
#define FC_CLANG_NO_CONTRACT
#endif
FC_SUB_SCALED(fc_sub_scaled_f, float)
FC_SUB_SCALED(fc_sub_scaled_d, double)

#endif /* FASTCONV_SIMD_H */
