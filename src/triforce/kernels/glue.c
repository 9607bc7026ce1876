/* The small per-layer steps between projections, each fused into one call.
 *
 * Why: on a 2-core CPU a decoding step of a small model spends as long dispatching a few
 * thousand tiny PyTorch ops (norms, rotary embedding, cache writes, activation) as it does
 * reading its weights; RMSNorm alone is ~40 us as separate ops and ~1 us here. Numerics follow
 * the reference models: statistics in float32, results rounded to the model dtype where they
 * round.
 *
 * dtype codes: 0 = float32, 1 = bfloat16 (stored as uint16).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#include "simd.h"

static inline __m512 load16(const void *p, long i, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}

static inline __m512i bf16_bits(__m512 x) { /* round to nearest even; the bf16 in the high half */
    __m512i b = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_and_si512(b, _mm512_set1_epi32((int)0xffff0000u));
}
#endif

static inline float load_f(const void *p, long i, int bf16) {
    if (bf16) {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return ((const float *)p)[i];
}

static inline float round_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return f;
    bits += 0x7fff + ((bits >> 16) & 1);
    bits &= 0xffff0000u;
    memcpy(&f, &bits, 4);
    return f;
}

static inline void store_f(void *p, long i, float f, int bf16) {
    if (bf16) {
        uint32_t bits;
        f = round_bf16(f);
        memcpy(&bits, &f, 4);
        ((uint16_t *)p)[i] = (uint16_t)(bits >> 16);
    } else {
        ((float *)p)[i] = f;
    }
}

/* out[m] = w * cast(x[m] / rms(x[m])), as LlamaRMSNorm: normalise in float32, cast to the model
 * dtype, then multiply by the weight in the model dtype. */
void tf_rms_norm(const void *x, const void *w, void *out, int M, int H, float eps, int bf16) {
#pragma omp parallel for if (M > 8)
    for (int m = 0; m < M; m++) {
        double ss = 0.0;
        for (int i = 0; i < H; i++) {
            float v = load_f(x, (long)m * H + i, bf16);
            ss += (double)v * v;
        }
        float inv = 1.0f / sqrtf((float)(ss / H) + eps);
        for (int i = 0; i < H; i++) {
            float v = load_f(x, (long)m * H + i, bf16) * inv;
            if (bf16) v = round_bf16(v);
            store_f(out, (long)m * H + i, load_f(w, i, bf16) * v, bf16);
        }
    }
}

/* Rotary embedding (rotate-half layout) and cache write for T tokens of one sequence.
 * qkv [T][Hq + 2 Hkv][D] in the model dtype; cos/sin [*][D/2] float32 indexed by positions;
 * q_out [T][Hq][D] float32 (what the attention kernel reads); rotated keys and the values are
 * stored, in the model dtype, at rows row0.. of k/v ([Hkv][head_stride] elements). */
void tf_rope_store(const void *qkv, const float *cos_t, const float *sin_t, const int64_t *positions,
                   float *q_out, void *k_cache, void *v_cache, long head_stride, int row0, int T, int Hq,
                   int Hkv, int D, int bf16) {
    const int half = D / 2, heads = Hq + 2 * Hkv;
#pragma omp parallel for if (T > 8)
    for (int t = 0; t < T; t++) {
        const float *c = cos_t + positions[t] * half, *s = sin_t + positions[t] * half;
        for (int h = 0; h < Hq + Hkv; h++) {
            long base = ((long)t * heads + h) * D;
            for (int i = 0; i < half; i++) {
                float x1 = load_f(qkv, base + i, bf16), x2 = load_f(qkv, base + half + i, bf16);
                float r1 = x1 * c[i] - x2 * s[i], r2 = x2 * c[i] + x1 * s[i];
                if (h < Hq) {
                    float *q = q_out + ((long)t * Hq + h) * D;
                    /* the reference rotates in the model dtype; round as it would */
                    q[i] = bf16 ? round_bf16(r1) : r1;
                    q[half + i] = bf16 ? round_bf16(r2) : r2;
                } else {
                    long row = (long)(h - Hq) * head_stride + (long)(row0 + t) * D;
                    store_f(k_cache, row + i, r1, bf16);
                    store_f(k_cache, row + half + i, r2, bf16);
                }
            }
        }
        for (int h = 0; h < Hkv; h++) {
            long src = ((long)t * heads + Hq + Hkv + h) * D;
            long row = (long)h * head_stride + (long)(row0 + t) * D;
            if (bf16)
                memcpy((uint16_t *)v_cache + row, (const uint16_t *)qkv + src, 2 * (size_t)D);
            else
                memcpy((float *)v_cache + row, (const float *)qkv + src, 4 * (size_t)D);
        }
    }
}

/* out[m] = silu(gate) * up, from gate_up [M][2I] (gate first). The reference computes silu in the
 * model dtype, then the product; both round. Each element is computed the same way whatever M
 * is (16 at a time, the row's last I % 16 one by one), so a row rounds identically alone, in a
 * verification or in a batch. */
void tf_silu_mul(const void *gate_up, void *out, int M, int I, int bf16) {
#pragma omp parallel for if (M > 8)
    for (int m = 0; m < M; m++) {
        const long in = (long)m * 2 * I, at = (long)m * I;
        int i = 0;
#if defined(__AVX512F__)
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= I; i += 16) {
            __m512 g = load16(gate_up, in + i, bf16), u = load16(gate_up, in + I + i, bf16);
            /* sigmoid from e = exp(-|g|) <= 1, which never overflows */
            __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
            __mmask16 pos = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
            __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(pos, e, one), _mm512_add_ps(one, e));
            __m512 a = _mm512_mul_ps(g, sig);
            if (bf16) {
                a = _mm512_castsi512_ps(bf16_bits(a));
                __m512i r = _mm512_srli_epi32(bf16_bits(_mm512_mul_ps(a, u)), 16);
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + at + i), _mm512_cvtepi32_epi16(r));
            } else {
                _mm512_storeu_ps((float *)out + at + i, _mm512_mul_ps(a, u));
            }
        }
#endif
        for (; i < I; i++) {
            float g = load_f(gate_up, in + i, bf16), u = load_f(gate_up, in + I + i, bf16);
            float a = g / (1.0f + expf(-g));
            if (bf16) a = round_bf16(a);
            store_f(out, at + i, a * u, bf16);
        }
    }
}
