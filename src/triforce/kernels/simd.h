/* Vector helpers shared by the kernels (included; hashed with them by native.py). */
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* float32 -> bf16 bits, rounded to nearest even (as PyTorch does for finite values). */
static inline uint16_t bf16_nearest_even(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* The bias of outputs n0..n0 + nv (bf16, or NULL for none) as float32 b[0..16), zeros past nv. */
static inline void packed_bias(const uint16_t *bias, int n0, int nv, float *b) {
    memset(b, 0, 16 * sizeof(float));
    if (!bias) return;
    for (int j = 0; j < nv; j++) {
        uint32_t bits = (uint32_t)bias[n0 + j] << 16;
        memcpy(b + j, &bits, 4);
    }
}

/* One row's nv outputs, stored at y + at (elements) as float32 or bf16 (nearest even). */
static inline void packed_store_row(const float *out, int nv, void *y, long at, int y_is_f32) {
    if (y_is_f32) {
        memcpy((float *)y + at, out, sizeof(float) * nv);
    } else {
        for (int j = 0; j < nv; j++) ((uint16_t *)y)[at + j] = bf16_nearest_even(out[j]);
    }
}
#if defined(__AVX512F__)
#include <immintrin.h>

/* exp(x) for x <= 0 (softmax arguments); x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor for e^r,
 * relative error ~1e-7; very negative inputs underflow to 0. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#define TF_AVX2 1

/* exp(x) for x <= 0, as exp512: degree-6 Taylor for e^r, 2^n built in the exponent bits; inputs
 * below -87 (where 2^n would leave the normal range) give 0. */
static inline __m256 exp256(__m256 x) {
    const __m256 low = _mm256_set1_ps(-87.0f);
    __m256 tiny = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
    x = _mm256_max_ps(x, low);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

/* Lane j of the result is the sum of the 8 lanes of a[j]. */
static inline __m256 transpose_sum8(const __m256 *a) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    /* lanes: [0 1 2 3 | 0 1 2 3] of s0123 and the same of s4567, halves to be added */
    __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    return _mm256_add_ps(lo, hi);
}

static inline float hsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight bf16 (uint16) to float32, exactly. */
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* float32 rounded to the nearest even bf16, kept as float32 (the bf16 in the high half). */
static inline __m256 round_bf16x8(__m256 x) {
    __m256i b = _mm256_castps_si256(x);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32((int)0xffff0000u)));
}

/* The projections' inner loop on AVX2 (linear.c over bf16 weights, quant.c over decoded float32
 * ones: W32). Weights are in the packed layout [pairs][32]: element 2j + e of pair p is output
 * j's weight for input 2p + e. Rows of x come as float32 [mt][K]. Output j of row i sums in two
 * chains, lanes 2j % 8 (even inputs) and 2j % 8 + 1 (odd inputs) of acc[4 i + j / 4], each one
 * multiply-add per pair in order from zero: the same sequence whatever mt is and whoever decoded
 * the weights, so a row's result does not depend on the rows beside it. */
static inline __attribute__((always_inline)) void packed_tile_avx2(const float *x, long K, const void *w, int pairs,
                                                                   const int mt, __m256 *acc, const int W32) {
    __m256 a[12];
    for (int i = 0; i < 4 * mt; i++) a[i] = _mm256_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        __m256 xp[3];
        for (int i = 0; i < mt; i++) xp[i] = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(x + i * K + 2 * p)));
        for (int v = 0; v < 4; v++) {
            __m256 wv = W32 ? _mm256_loadu_ps((const float *)w + 32L * p + 8 * v)
                            : bf16x8((const uint16_t *)w + 32L * p + 8 * v);
            for (int i = 0; i < mt; i++) a[4 * i + v] = _mm256_fmadd_ps(wv, xp[i], a[4 * i + v]);
        }
    }
    for (int i = 0; i < 4 * mt; i++) acc[i] = a[i];
}

#define PACKED_TILE_M 3 /* 12 accumulators, a weight vector and 3 broadcasts fill the 16 registers */
typedef __m256 PackedAcc;  /* a tile's accumulators: PACKED_ACCS per row */
#define PACKED_ACCS 4

/* w: bf16 weights (w32 = 0) or float32 ones (w32 = 1). */
static inline void packed_tile_any(const float *x, long K, const void *w, int pairs, int mt, PackedAcc *acc,
                                   int w32) {
    switch (2 * mt + (w32 != 0)) { /* constant trip counts keep the accumulators in registers */
    case 2: packed_tile_avx2(x, K, w, pairs, 1, acc, 0); break;
    case 3: packed_tile_avx2(x, K, w, pairs, 1, acc, 1); break;
    case 4: packed_tile_avx2(x, K, w, pairs, 2, acc, 0); break;
    case 5: packed_tile_avx2(x, K, w, pairs, 2, acc, 1); break;
    case 6: packed_tile_avx2(x, K, w, pairs, 3, acc, 0); break;
    default: packed_tile_avx2(x, K, w, pairs, 3, acc, 1); break;
    }
}

/* Rows m0..m0+mt of outputs n0..n0+16 (clipped to N) from a tile's chains: the two chains added,
 * then the bias (float32), stored as float32 or bf16 (nearest even), row i at y + i * ldy. */
static inline void packed_store(const PackedAcc *acc, int mt, int m0, int n0, int N, long ldy, const uint16_t *bias,
                                void *y, int y_is_f32) {
    const int nv = N - n0 < 16 ? N - n0 : 16;
    float b[16];
    packed_bias(bias, n0, nv, b);
    for (int i = 0; i < mt; i++) {
        float out[16];
        for (int h = 0; h < 2; h++) { /* hadd pairs lanes (2j, 2j + 1); the permute restores order */
            __m256 s = _mm256_hadd_ps(acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1]);
            s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));
            _mm256_storeu_ps(out + 8 * h, _mm256_add_ps(s, _mm256_loadu_ps(b + 8 * h)));
        }
        packed_store_row(out, nv, y, (long)(m0 + i) * ldy + n0, y_is_f32);
    }
}

#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define TF_NEON 1
#define PACKED_TILE_M 3 /* 24 accumulators, two weight vectors and 3 input pairs fit the 32 registers */
typedef float32x4_t PackedAcc;
#define PACKED_ACCS 8

/* exp(x) for x <= 0, as exp256. */
static inline float32x4_t exp128(float32x4_t x) {
    const float32x4_t low = vdupq_n_f32(-87.0f);
    const uint32x4_t tiny = vcltq_f32(x, low);
    x = vmaxq_f32(x, low);
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.4426950408889634f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693145751953125f));
    r = vfmsq_f32(r, n, vdupq_n_f32(1.428606765330187e-06f));
    float32x4_t p = vdupq_n_f32(1.0f / 720.0f);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    const int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(vmulq_f32(p, vreinterpretq_f32_s32(bits))), tiny));
}

/* Four bf16 (uint16) to float32, exactly. */
static inline float32x4_t bf16x4(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }

/* The projections' inner loop on NEON: simd.h's packed_tile_avx2 in 4-lane vectors, over bf16
 * weights (W32 = 0) or decoded float32 ones (quant.c). Output j of row i sums in the same two
 * chains (even inputs in lane 2 (j % 2), odd ones in the next lane of acc[8 i + j / 2]), one
 * multiply-add per pair in order from zero, so a row's result does not depend on the rows beside
 * it, and equals the AVX2 kernel's bit for bit. */
static inline __attribute__((always_inline)) void packed_tile_neon(const float *x, long K, const void *w, int pairs,
                                                                   const int mt, float32x4_t *acc, const int W32) {
    float32x4_t a[8 * PACKED_TILE_M];
    for (int i = 0; i < 8 * mt; i++) a[i] = vdupq_n_f32(0.0f);
    for (int p = 0; p < pairs; p++) {
        float32x4_t xp[PACKED_TILE_M];
        for (int i = 0; i < mt; i++) {
            uint64_t pair;
            memcpy(&pair, x + i * K + 2 * p, 8);
            xp[i] = vreinterpretq_f32_u64(vdupq_n_u64(pair));
        }
        for (int q = 0; q < 4; q++) { /* vectors 2q and 2q + 1: elements 8q..8q + 7 (outputs 4q..4q + 3) */
            float32x4_t lo, hi;
            if (W32) {
                lo = vld1q_f32((const float *)w + 32L * p + 8 * q);
                hi = vld1q_f32((const float *)w + 32L * p + 8 * q + 4);
            } else {
                const uint16x8_t raw = vld1q_u16((const uint16_t *)w + 32L * p + 8 * q);
                lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(raw), 16));
                hi = vreinterpretq_f32_u32(vshll_high_n_u16(raw, 16));
            }
            for (int i = 0; i < mt; i++) {
                a[8 * i + 2 * q] = vfmaq_f32(a[8 * i + 2 * q], lo, xp[i]);
                a[8 * i + 2 * q + 1] = vfmaq_f32(a[8 * i + 2 * q + 1], hi, xp[i]);
            }
        }
    }
    for (int i = 0; i < 8 * mt; i++) acc[i] = a[i];
}

static inline void packed_tile_any(const float *x, long K, const void *w, int pairs, int mt, PackedAcc *acc,
                                   int w32) {
    switch (2 * mt + (w32 != 0)) { /* constant trip counts keep the accumulators in registers */
    case 2: packed_tile_neon(x, K, w, pairs, 1, acc, 0); break;
    case 3: packed_tile_neon(x, K, w, pairs, 1, acc, 1); break;
    case 4: packed_tile_neon(x, K, w, pairs, 2, acc, 0); break;
    case 5: packed_tile_neon(x, K, w, pairs, 2, acc, 1); break;
    case 6: packed_tile_neon(x, K, w, pairs, 3, acc, 0); break;
    default: packed_tile_neon(x, K, w, pairs, 3, acc, 1); break;
    }
}

/* As the AVX2 packed_store: the two chains added, then the bias, stored as float32 or bf16. */
static inline void packed_store(const PackedAcc *acc, int mt, int m0, int n0, int N, long ldy, const uint16_t *bias,
                                void *y, int y_is_f32) {
    const int nv = N - n0 < 16 ? N - n0 : 16;
    float b[16];
    packed_bias(bias, n0, nv, b);
    for (int i = 0; i < mt; i++) {
        float out[16];
        for (int q = 0; q < 4; q++) /* pairwise: lane 2j + lane 2j + 1, even chain first */
            vst1q_f32(out + 4 * q, vaddq_f32(vpaddq_f32(acc[8 * i + 2 * q], acc[8 * i + 2 * q + 1]), vld1q_f32(b + 4 * q)));
        packed_store_row(out, nv, y, (long)(m0 + i) * ldy + n0, y_is_f32);
    }
}

#endif

#if defined(TF_AVX2) || defined(TF_NEON)
/* Per-thread float32 scratch (64-byte aligned), grown on demand and kept: a fresh mapping per
 * call would fault in every page of it again. */
static __thread float *float_scratch_buf;
static __thread long float_scratch_len;

static inline float *float_scratch(long floats) {
    if (floats > float_scratch_len) {
        free(float_scratch_buf);
        float_scratch_buf = (float *)aligned_alloc(64, ((size_t)floats * 4 + 63) / 64 * 64);
        float_scratch_len = float_scratch_buf ? floats : 0;
    }
    return float_scratch_buf;
}

/* x [M][K] bf16 -> float32 (exact), into a buffer the caller frees. */
static inline float *widen_rows(const uint16_t *x, long n) {
    float *f = (float *)aligned_alloc(64, ((size_t)n * 4 + 63) / 64 * 64);
    if (!f) return NULL;
    long i = 0;
#if defined(TF_AVX2)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, bf16x8(x + i));
#else
    for (; i + 4 <= n; i += 4) vst1q_f32(f + i, bf16x4(x + i));
#endif
    for (; i < n; i++) {
        uint32_t bits = (uint32_t)x[i] << 16;
        memcpy(f + i, &bits, 4);
    }
    return f;
}
#endif
