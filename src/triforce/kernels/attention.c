/* Attention of a few queries over a KV-cache buffer, for decoding and verification on CPU.
 *
 * Why a kernel: with one to a few dozen query rows per KV head, PyTorch's CPU attention and
 * batched matmuls run far below memory bandwidth (and copy strided cache slices). This kernel
 * streams each key and value row once for all query heads that share it (grouped-query
 * attention), keeps an online softmax per query row (flash-decoding), splits the keys of each KV
 * head across threads and merges the partial results. Retrieval caches pass chunk start rows, so
 * the selected chunks are read in place, never gathered.
 *
 * Layout: q [T][Hq][D] float32; out the same in float32 or bf16 (out_is_bf16). k, v: per KV head `head_stride` elements apart, rows of D
 * elements, bf16 (kv_is_bf16) or float32. Query t may see key row j iff j <= first_row + t.
 * The keys of KV head g, in order: chunks[g][0..n_chunks) (each chunk_size rows), then the dense
 * rows [dense_start, num_rows).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "simd.h"

#define BLOCK 16
#define SUB 4 /* 16-key sub-blocks per block in the bf16 path */
/* Keys per parallel task (a multiple of SUB * BLOCK). 2048 rather than 512: each task then
 * streams longer runs of key and value rows and there are fewer partial results to merge.
 * Timed over 30 cold layers (min of 100 steps, alternating builds): decoding 4 x 2K went from
 * about 11.6 to 9.1 ms, 1 x 8K from 10.0 to 8.0, 7-token verification at 8K from 30.4 to 26.3,
 * and 2K alone did not slow down although it now has only one task per KV head. The cost: on
 * many cores, short contexts leave threads idle. */
#define SPLIT_KEYS 2048
#define MAX_CHUNKS 16 /* head_dim <= 256 */

/* Whether passes of more rows than one register group take the staged path (below) or the
 * grouped one; both give every row the same bits, so `triforce bench kernels` can time them in
 * one run. */
static int staged_path = 1;

/* Sets the path (0 grouped, 1 staged; negative leaves it) and returns the previous one. */
int tf_attention_staged(int on) {
    const int was = staged_path;
    if (on >= 0) staged_path = on != 0;
    return was;
}

typedef struct {
    const int32_t *chunks;
    int n_chunks, chunk_size, dense_start, num_rows;
} KeySet;

static inline long keys_of_head(const KeySet *ks) {
    return (long)ks->n_chunks * ks->chunk_size + (ks->num_rows - ks->dense_start);
}

/* Row index of the i-th key of KV head g. */
static inline int key_row(const KeySet *ks, int g, long i) {
    long chunked = (long)ks->n_chunks * ks->chunk_size;
    if (i < chunked) {
        return ks->chunks[(long)g * ks->n_chunks + i / ks->chunk_size] + (int)(i % ks->chunk_size);
    }
    return ks->dense_start + (int)(i - chunked);
}

static inline void load_row(float *dst, const void *base, long row, int D, int bf16) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)base + row * D;
#if defined(__AVX512F__)
        for (int c = 0; c < D; c += 16) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(src + c));
            __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
            _mm512_storeu_ps(dst + c, _mm512_castsi512_ps(wide));
        }
#elif defined(TF_AVX2)
        for (int c = 0; c < D; c += 8) _mm256_storeu_ps(dst + c, bf16x8(src + c));
#elif defined(TF_NEON)
        for (int c = 0; c < D; c += 4) vst1q_f32(dst + c, bf16x4(src + c));
#else
        for (int c = 0; c < D; c++) {
            uint32_t bits = (uint32_t)src[c] << 16;
            memcpy(dst + c, &bits, 4);
        }
#endif
    } else {
        memcpy(dst, (const float *)base + row * D, sizeof(float) * D);
    }
}

#if defined(__AVX512F__)

/* Lane j of the result is the sum of the 16 lanes of a[j]. */
static inline __m512 transpose_sum16(const __m512 *a) {
    __m512 t[8], u[4];
    for (int k = 0; k < 8; k++) {
        t[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]),
                             _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    }
    for (int k = 0; k < 4; k++) {
        __m512d x = _mm512_castps_pd(t[2 * k]), y = _mm512_castps_pd(t[2 * k + 1]);
        u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

/* Transpose a 16x16 matrix of 32-bit elements held in r[0..15] (row i = r[i]) into out. */
static inline void transpose16x16_epi32(const __m512i *r, __m512i *out) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* u[4i+c], 128-bit lane L, holds column 4L+c of rows 4i..4i+3 */
    for (int c = 0; c < 4; c++) {
        __m512i w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), w1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        __m512i w2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44), w3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        out[0 + c] = _mm512_shuffle_i32x4(w0, w2, 0x88);
        out[4 + c] = _mm512_shuffle_i32x4(w0, w2, 0xDD);
        out[8 + c] = _mm512_shuffle_i32x4(w1, w3, 0x88);
        out[12 + c] = _mm512_shuffle_i32x4(w1, w3, 0xDD);
    }
}
#endif

#if defined(TF_AVX2)
/* ar[0..8 NC) = ar * corr + sum_j s[j] v_j[0..8 NC), in j order per column. */
static inline __attribute__((always_inline)) void pv_avx2(float *ar, const float *vf, const float *s, int nk, int D,
                                                          __m256 cv, const int NC) {
    __m256 o[8];
    for (int c = 0; c < NC; c++) o[c] = _mm256_mul_ps(_mm256_loadu_ps(ar + 8 * c), cv);
    for (int j = 0; j < nk; j++) {
        __m256 pj = _mm256_broadcast_ss(s + j);
        for (int c = 0; c < NC; c++) o[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vf + (long)j * D + 8 * c), o[c]);
    }
    for (int c = 0; c < NC; c++) _mm256_storeu_ps(ar + 8 * c, o[c]);
}
#endif

/* One task: keys [lo, hi) of KV head g, for its R = G*T query rows. Leaves per-row running
 * max m, normaliser l and unnormalised output acc. */
static void attend_range(const float *q, const void *k, const void *v, int bf16, int T, int Hq, int G,
                         int D, int g, const KeySet *ks, long lo, long hi, int first_row, float scale,
                         float *m, float *l, float *acc, float *kf, float *vf, float *scores) {
    const int R = G * T;
    int rows[BLOCK];
    for (int r = 0; r < R; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * R * D);
    for (long start = lo; start < hi; start += BLOCK) {
        int nk = (int)((hi - start) < BLOCK ? (hi - start) : BLOCK);
        for (int j = 0; j < nk; j++) {
            rows[j] = key_row(ks, g, start + j);
            load_row(kf + j * D, k, rows[j], D, bf16);
        }
        for (int j = nk; j < BLOCK; j++) {
            rows[j] = INT32_MAX;
            memset(kf + j * D, 0, sizeof(float) * D);
        }
        /* scores[r][j] = q_r . k_j * scale, -inf where masked */
        for (int r = 0; r < R; r++) {
            int t = r / G, h = g * G + r % G;
            const float *qr = q + ((long)t * Hq + h) * D;
            long limit = (long)first_row + t;
            float *s = scores + r * BLOCK;
#if defined(__AVX512F__)
            __m512 a[BLOCK];
            for (int j = 0; j < BLOCK; j++) a[j] = _mm512_setzero_ps();
            for (int c = 0; c < D; c += 16) {
                __m512 qv = _mm512_loadu_ps(qr + c);
                for (int j = 0; j < BLOCK; j++) a[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kf + j * D + c), a[j]);
            }
            __m512 sv = _mm512_mul_ps(transpose_sum16(a), _mm512_set1_ps(scale));
            __m512i rowv = _mm512_loadu_si512((const void *)rows);
            __mmask16 visible = _mm512_cmple_epi32_mask(rowv, _mm512_set1_epi32((int)limit));
            sv = _mm512_mask_blend_ps(visible, _mm512_set1_ps(-INFINITY), sv);
            _mm512_storeu_ps(s, sv);
#elif defined(TF_AVX2)
            for (int half = 0; half < BLOCK; half += 8) {
                __m256 a[8];
                for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
                for (int c = 0; c < D; c += 8) {
                    __m256 qv = _mm256_loadu_ps(qr + c);
                    for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + (half + j) * D + c), a[j]);
                }
                __m256 sv = _mm256_mul_ps(transpose_sum8(a), _mm256_set1_ps(scale));
                __m256i rowv = _mm256_loadu_si256((const __m256i *)(rows + half));
                __m256 hidden = _mm256_castsi256_ps(_mm256_cmpgt_epi32(rowv, _mm256_set1_epi32((int)limit)));
                _mm256_storeu_ps(s + half, _mm256_blendv_ps(sv, _mm256_set1_ps(-INFINITY), hidden));
            }
#elif defined(TF_NEON)
            for (int j0 = 0; j0 < BLOCK; j0 += 4) { /* four keys at once: 4-lane chains, then pairwise sums */
                float32x4_t a[4];
                for (int j = 0; j < 4; j++) a[j] = vdupq_n_f32(0.0f);
                for (int c = 0; c < D; c += 4) {
                    const float32x4_t qv = vld1q_f32(qr + c);
                    for (int j = 0; j < 4; j++) a[j] = vfmaq_f32(a[j], qv, vld1q_f32(kf + (j0 + j) * D + c));
                }
                const float32x4_t sv = vmulq_f32(vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3])),
                                                 vdupq_n_f32(scale));
                const uint32x4_t hidden = vcgtq_s32(vld1q_s32(rows + j0), vdupq_n_s32((int)limit));
                vst1q_f32(s + j0, vbslq_f32(hidden, vdupq_n_f32(-INFINITY), sv));
            }
#else
            for (int j = 0; j < BLOCK; j++) {
                if (rows[j] > limit) {
                    s[j] = -INFINITY;
                    continue;
                }
                float dot = 0.0f;
                for (int c = 0; c < D; c++) dot += qr[c] * kf[j * D + c];
                s[j] = dot * scale;
            }
#endif
        }
        for (int j = 0; j < nk; j++) load_row(vf + j * D, v, rows[j], D, bf16);
        /* online softmax and P @ V */
        for (int r = 0; r < R; r++) {
            float *s = scores + r * BLOCK;
            float bm = -INFINITY;
#if defined(TF_AVX2) /* the same maximum, without a serial chain of 16 compares */
            {
                __m256 mx = _mm256_max_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8)); /* masked keys are -inf */
                __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
                h = _mm_max_ps(h, _mm_movehl_ps(h, h));
                bm = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
            }
#else
            for (int j = 0; j < nk; j++) bm = s[j] > bm ? s[j] : bm;
#endif
            if (bm == -INFINITY) continue;
            float mn = m[r] > bm ? m[r] : bm;
            float corr = expf(m[r] - mn);
            float *ar = acc + (long)r * D;
#if defined(__AVX512F__)
            __m512 sv = _mm512_loadu_ps(s);
            __mmask16 live = _mm512_cmp_ps_mask(sv, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            __m512 p = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mn))));
            _mm512_storeu_ps(s, p);
            l[r] = l[r] * corr + _mm512_reduce_add_ps(p);
            /* D/16 independent accumulators, so consecutive FMAs do not wait on each other */
            __m512 cv = _mm512_set1_ps(corr), o[MAX_CHUNKS];
            const int nc = D / 16;
            for (int c = 0; c < nc; c++) o[c] = _mm512_mul_ps(_mm512_loadu_ps(ar + 16 * c), cv);
            for (int j = 0; j < nk; j++) {
                __m512 pj = _mm512_set1_ps(s[j]);
                for (int c = 0; c < nc; c++) o[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vf + j * D + 16 * c), o[c]);
            }
            for (int c = 0; c < nc; c++) _mm512_storeu_ps(ar + 16 * c, o[c]);
#elif defined(TF_AVX2)
            const __m256 ninf = _mm256_set1_ps(-INFINITY), mv = _mm256_set1_ps(mn);
            float psum = 0.0f;
            for (int half = 0; half < BLOCK; half += 8) {
                __m256 sv = _mm256_loadu_ps(s + half);
                __m256 live = _mm256_cmp_ps(sv, ninf, _CMP_NEQ_OQ);
                __m256 p = _mm256_and_ps(live, exp256(_mm256_sub_ps(sv, mv)));
                _mm256_storeu_ps(s + half, p);
                psum += hsum256(p);
            }
            l[r] = l[r] * corr + psum;
            /* 64 columns (8 independent accumulators, 16 registers) at a time */
            const __m256 cv = _mm256_set1_ps(corr);
            for (int c0 = 0; c0 < D; c0 += 64) {
                if (D - c0 >= 64) {
                    pv_avx2(ar + c0, vf + c0, s, nk, D, cv, 8);
                } else {
                    pv_avx2(ar + c0, vf + c0, s, nk, D, cv, (D - c0) / 8);
                }
            }
#elif defined(TF_NEON)
            const float32x4_t ninf = vdupq_n_f32(-INFINITY), mv = vdupq_n_f32(mn);
            float psum = 0.0f;
            for (int j0 = 0; j0 < BLOCK; j0 += 4) {
                const float32x4_t sv = vld1q_f32(s + j0);
                const uint32x4_t live = vmvnq_u32(vceqq_f32(sv, ninf));
                const uint32x4_t e = vreinterpretq_u32_f32(exp128(vsubq_f32(sv, mv)));
                const float32x4_t pv = vreinterpretq_f32_u32(vandq_u32(live, e));
                vst1q_f32(s + j0, pv);
                psum += vaddvq_f32(pv);
            }
            l[r] = l[r] * corr + psum;
            /* 32 columns (8 independent accumulators) at a time */
            const float32x4_t cv = vdupq_n_f32(corr);
            for (int c0 = 0; c0 < D; c0 += 32) {
                const int nc = D - c0 >= 32 ? 8 : (D - c0) / 4;
                float32x4_t o[8];
                for (int c = 0; c < nc; c++) o[c] = vmulq_f32(vld1q_f32(ar + c0 + 4 * c), cv);
                for (int j = 0; j < nk; j++) {
                    const float32x4_t pj = vdupq_n_f32(s[j]);
                    for (int c = 0; c < nc; c++) o[c] = vfmaq_f32(o[c], pj, vld1q_f32(vf + j * D + c0 + 4 * c));
                }
                for (int c = 0; c < nc; c++) vst1q_f32(ar + c0 + 4 * c, o[c]);
            }
#else
            float sum = 0.0f;
            for (int j = 0; j < nk; j++) {
                s[j] = expf(s[j] - mn);
                sum += s[j];
            }
            l[r] = l[r] * corr + sum;
            for (int c = 0; c < D; c++) {
                float o = ar[c] * corr;
                for (int j = 0; j < nk; j++) o += s[j] * vf[j * D + c];
                ar[c] = o;
            }
#endif
            m[r] = mn;
        }
    }
}

#if defined(__AVX512BF16__)
/* Half `hf` (32 dimensions) of the 16 key rows listed in rows[0..16); rows past `valid` repeat
 * rows[0] (their scores are masked). */
static inline __attribute__((always_inline)) void load_key_tile(const uint16_t *k, const int *rows, int valid, int D,
                                                                int hf, __m512i *out) {
    for (int j = 0; j < BLOCK; j++)
        out[j] = _mm512_loadu_si512((const void *)(k + (long)(j < valid ? rows[j] : rows[0]) * D + 32 * hf));
}

/* Value rows 2 pr and 2 pr + 1 of the block (the second zero past nk), half `hf`, interleaved
 * dimension by dimension: lo holds dimensions 0-7 and 16-23 of the half, hi the others. */
static inline __attribute__((always_inline)) void interleave_values(const uint16_t *v, const int *rows, int nk, int D,
                                                                    int pr, int hf, __m512i *lo, __m512i *hi) {
    const int j0 = 2 * pr, j1 = 2 * pr + 1;
    __m512i a = _mm512_loadu_si512((const void *)(v + (long)rows[j0] * D + 32 * hf));
    __m512i b = j1 < nk ? _mm512_loadu_si512((const void *)(v + (long)rows[j1] * D + 32 * hf)) : _mm512_setzero_si512();
    *lo = _mm512_unpacklo_epi16(a, b);
    *hi = _mm512_unpackhi_epi16(a, b);
}

/* Scores of RB query rows against NS consecutive 16-key sub-blocks (from sb) of the block:
 * sv[i][sb..], with visibility masks. Each score sums its dimension pairs in two chains (even and
 * odd pairs) in the same order whatever RB and NS are, so results do not depend on them. NS = 2
 * shares each broadcast query pair between two tiles and doubles the independent chains (16 for
 * 4 rows): a CPU issuing two pair-dot-products per cycle (AMD Zen 5) needs 12 or more in flight
 * (`triforce bench kernels` sweeps them). Over 30 cold layers at 8K, 3-7-token verification
 * gained 3-7% (builds alternating, medians of 16). */
static inline __attribute__((always_inline)) void block_scores(
    const int RB, const int NS, const int direct, int sb, int r0, int G, const int D, int nk, int first_row,
    float scale, const uint32_t *const *qp, const __m512i *kt, const uint16_t *k, const int *rows,
    __m512 sv[4][SUB], __mmask16 visible[4][SUB]) {
    const int npairs = D / 2, halves = D / 32;
    __m512 a[4][2][2];
    for (int i = 0; i < RB; i++)
        for (int s = 0; s < NS; s++) a[i][s][0] = a[i][s][1] = _mm512_setzero_ps();
    for (int hf = 0; hf < halves; hf++) {
        /* dimension pairs 16 hf .. 16 hf + 15 of each sub-block's 16 keys */
        const __m512i *kb[2];
        __m512i tile[BLOCK];
        for (int s = 0; s < NS; s++) kb[s] = kt + (sb + s) * npairs + 16 * hf;
        if (direct) { /* NS == 1 */
            __m512i raw[BLOCK];
            load_key_tile(k, rows + sb * BLOCK, nk - sb * BLOCK, D, hf, raw);
            transpose16x16_epi32(raw, tile);
            kb[0] = tile;
        }
        for (int p = 0; p < 16; p += 2) {
            const int pr = 16 * hf + p;
            /* each tile loaded once, for every row: left to itself the compiler re-loads it
             * per row (a load per multiply-add, past what the load ports sustain) */
            __m512i t00 = kb[0][p], t01 = kb[0][p + 1], t10 = t00, t11 = t01;
            if (NS == 2) {
                t10 = kb[1][p];
                t11 = kb[1][p + 1];
            }
            __asm__("" : "+v"(t00), "+v"(t01), "+v"(t10), "+v"(t11));
            const __m512bh tl[2][2] = {{(__m512bh)t00, (__m512bh)t01}, {(__m512bh)t10, (__m512bh)t11}};
            for (int i = 0; i < RB; i++) {
                const __m512bh q0 = (__m512bh)_mm512_set1_epi32((int)qp[i][pr]);
                const __m512bh q1 = (__m512bh)_mm512_set1_epi32((int)qp[i][pr + 1]);
                for (int s = 0; s < NS; s++) {
                    a[i][s][0] = _mm512_dpbf16_ps(a[i][s][0], tl[s][0], q0);
                    a[i][s][1] = _mm512_dpbf16_ps(a[i][s][1], tl[s][1], q1);
                }
            }
        }
    }
    for (int s = 0; s < NS; s++) {
        __m512i rowv = _mm512_loadu_si512((const void *)(rows + (sb + s) * BLOCK));
        for (int i = 0; i < RB; i++) {
            sv[i][sb + s] = _mm512_mul_ps(_mm512_add_ps(a[i][s][0], a[i][s][1]), _mm512_set1_ps(scale));
            visible[i][sb + s] = _mm512_cmple_epi32_mask(rowv, _mm512_set1_epi32(first_row + (r0 + i) / G));
        }
    }
}

/* The sum of a's lanes by a fixed tree (halves, then quarters, then pairs), the tree that
 * reduce_add16 below applies to 16 vectors at once: a row's normaliser must not depend on which
 * path or compiler header summed it. */
static inline float reduce_add1(__m512 a) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q)); /* q0 + q2, q1 + q3 */
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
}

/* RB query rows (r0..) against one block of up to SUB*BLOCK keys: scores, online softmax, p.V.
 * Keys and values come from the block's scratch copies (kt, vi: shared by every row group) or,
 * when `direct` (all rows in one group), straight from the cache rows: each transposed 16-key
 * tile and each interleaved value pair then lives only in registers. Storing them and reading
 * them back stalled the loads from memory: one core decoding over a cold 8K cache read it at
 * 7.5-8 GB/s that way, 11-13 GB/s without the round trip. Both ways accumulate in the same
 * order, so results are bit-identical. */
static inline __attribute__((always_inline)) void rows_block(
    const int RB, const int direct, int r0, int G, const int D, int nk, int nsub, int first_row, float scale,
    const uint16_t *qb, const __m512i *kt, const uint16_t *vi, const uint16_t *k, const uint16_t *v,
    const int *rows, float *m, float *l, float *acc) {
    const int nc = D / 16, halves = D / 32;
    __m512 sv[4][SUB];
    __mmask16 visible[4][SUB];
    const uint32_t *qp[4];
    for (int i = 0; i < RB; i++) qp[i] = (const uint32_t *)(qb + (long)(r0 + i) * D);
    int sb = 0;
    if (!direct) /* tiles in scratch: two sub-blocks at a time */
        for (; sb + 1 < nsub; sb += 2)
            block_scores(RB, 2, 0, sb, r0, G, D, nk, first_row, scale, qp, kt, k, rows, sv, visible);
    for (; sb < nsub; sb++)
        block_scores(RB, 1, direct, sb, r0, G, D, nk, first_row, scale, qp, kt, k, rows, sv, visible);
    uint32_t pairs[4][SUB * BLOCK / 2];
    float mnew[4], shift[16] = {0};
    int none[4];
    for (int i = 0; i < RB; i++) {
        __m512 bmv = _mm512_set1_ps(-INFINITY);
        for (int sb = 0; sb < nsub; sb++) bmv = _mm512_mask_max_ps(bmv, visible[i][sb], bmv, sv[i][sb]);
        const float bm = _mm512_reduce_max_ps(bmv), mo = m[r0 + i];
        mnew[i] = mo > bm ? mo : bm;
        none[i] = bm == -INFINITY;
        shift[i] = none[i] ? 0.0f : mo - mnew[i];
    }
    /* every row's correction in one vector exp: a libm call here would spill every live
     * vector register (the scores) per row. Lane i depends only on row i, so a row gets the
     * same value whatever group it is computed in. */
    float corr[16];
    _mm512_storeu_ps(corr, exp512(_mm512_loadu_ps(shift)));
    for (int i = 0; i < RB; i++) {
        const int r = r0 + i;
        if (none[i]) { /* nothing visible in this block: leave the row as it is */
            corr[i] = 1.0f;
            memset(pairs[i], 0, sizeof(pairs[i]));
            continue;
        }
        const float mn = mnew[i];
        const __m512 mnv = _mm512_set1_ps(mn);
        __m512 total = _mm512_setzero_ps();
        for (int sb = 0; sb < nsub; sb++) {
            __m512 p = _mm512_maskz_mov_ps(visible[i][sb], exp512(_mm512_sub_ps(sv[i][sb], mnv)));
            total = _mm512_add_ps(total, p);
            _mm256_storeu_si256((__m256i *)(pairs[i] + sb * BLOCK / 2), (__m256i)_mm512_cvtneps_pbh(p));
        }
        for (int sb = nsub; sb < SUB; sb++) memset(pairs[i] + sb * BLOCK / 2, 0, sizeof(uint32_t) * BLOCK / 2);
        /* the staged path's vector update, spelled out: a fused multiply-add and the same tree */
        l[r] = fmaf(l[r], corr[i], reduce_add1(total));
        m[r] = mn;
    }
    __m512 o[4][MAX_CHUNKS];
    for (int i = 0; i < RB; i++) {
        const __m512 cv = _mm512_set1_ps(corr[i]);
        for (int c = 0; c < nc; c++) o[i][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + (long)(r0 + i) * D + 16 * c), cv);
    }
    for (int pr = 0; pr < (nk + 1) / 2; pr++) {
        const uint16_t *src = vi + (long)pr * halves * 64;
        for (int c = 0; c < nc; c++) {
            __m512i vc;
            if (direct) {
                __m512i lo, hi;
                interleave_values(v, rows, nk, D, pr, c / 2, &lo, &hi);
                vc = c % 2 ? hi : lo;
            } else {
                vc = _mm512_loadu_si512((const void *)(src + 32 * c));
            }
            for (int i = 0; i < RB; i++)
                o[i][c] = _mm512_dpbf16_ps(o[i][c], (__m512bh)vc, (__m512bh)_mm512_set1_epi32((int)pairs[i][pr]));
        }
    }
    for (int i = 0; i < RB; i++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(acc + (long)(r0 + i) * D + 16 * c, o[i][c]);
}

/* rows_block with the row count as a compile-time constant (the accumulators stay in registers). */
static inline __attribute__((always_inline)) void rows_group(
    const int direct, int rb, int r0, int G, const int D, int nk, int nsub, int first_row, float scale,
    const uint16_t *qb, const __m512i *kt, const uint16_t *vi, const uint16_t *k, const uint16_t *v,
    const int *rows, float *m, float *l, float *acc) {
    switch (rb) {
    case 4: rows_block(4, direct, r0, G, D, nk, nsub, first_row, scale, qb, kt, vi, k, v, rows, m, l, acc); break;
    case 3: rows_block(3, direct, r0, G, D, nk, nsub, first_row, scale, qb, kt, vi, k, v, rows, m, l, acc); break;
    case 2: rows_block(2, direct, r0, G, D, nk, nsub, first_row, scale, qb, kt, vi, k, v, rows, m, l, acc); break;
    default: rows_block(1, direct, r0, G, D, nk, nsub, first_row, scale, qb, kt, vi, k, v, rows, m, l, acc); break;
    }
}

/* Every key and value line of keys [a, b) of KV head g, into L2. */
static inline __attribute__((always_inline)) void prefetch_keys(const uint16_t *k, const uint16_t *v, const KeySet *ks, int g, long a, long b,
                                 int D) {
    for (long i = a; i < b; i++) {
        const long row = key_row(ks, g, i);
        for (int c = 0; c < D; c += 32) {
            _mm_prefetch((const char *)(k + row * D + c), _MM_HINT_T1);
            _mm_prefetch((const char *)(v + row * D + c), _MM_HINT_T1);
        }
    }
}

/* ---- the staged path: many rows against one staged block ------------------------------------
 * The block's keys (transposed, kt) and values (interleaved, vi) are staged once; then rows go
 * through it in chunks of up to ROW_CHUNK, each chunk in three loops with nothing else in them:
 * scores of every row (register tiles of 4 rows x 2 sub-blocks: 16 accumulation chains), the
 * online-softmax update of every row, and p.V of every row (tiles of 16 accumulators). The
 * arithmetic of each row is exactly that of rows_block (same chains, same order, same exp), so
 * a row gets the same bits on either path. Against the grouped path (rows_block per group of up
 * to 4 rows, all three steps before the next group; AMD Zen 5, 2 threads, 30 cold layers, runs
 * alternating): 7 tokens over 16-32K keys 0.73-0.91x the time, 2-5 tokens 0.77-0.85x, a
 * 1024-token prefill chunk 0.93-0.96x. */
#define ROW_CHUNK 32
/* Blocks ahead whose lines are asked for: 2 or 3 measured 4-13% slower than 1 (7 tokens over
 * 16-32K keys, AMD Zen 5) */
#define PF_BLOCKS 1

/* Scores of RB rows (qp) against sub-blocks sb .. sb + NS - 1: sc[i][16 (sb + s) + lane]. */
static inline __attribute__((always_inline)) void staged_scores(const int RB, const int NS, const int D, int sb,
                                                                const uint32_t *const *qp, const __m512i *kt,
                                                                float scale, float *sc) {
    const int npairs = D / 2;
    __m512 a[4][2][2];
    for (int i = 0; i < RB; i++)
        for (int s = 0; s < NS; s++) a[i][s][0] = a[i][s][1] = _mm512_setzero_ps();
    for (int p = 0; p < npairs; p += 2) {
        __m512i t00 = kt[sb * npairs + p], t01 = kt[sb * npairs + p + 1], t10 = t00, t11 = t01;
        if (NS == 2) {
            t10 = kt[(sb + 1) * npairs + p];
            t11 = kt[(sb + 1) * npairs + p + 1];
        }
        __asm__("" : "+v"(t00), "+v"(t01), "+v"(t10), "+v"(t11));
        const __m512bh tl[2][2] = {{(__m512bh)t00, (__m512bh)t01}, {(__m512bh)t10, (__m512bh)t11}};
        for (int i = 0; i < RB; i++) {
            const __m512bh q0 = (__m512bh)_mm512_set1_epi32((int)qp[i][p]);
            const __m512bh q1 = (__m512bh)_mm512_set1_epi32((int)qp[i][p + 1]);
            for (int s = 0; s < NS; s++) {
                a[i][s][0] = _mm512_dpbf16_ps(a[i][s][0], tl[s][0], q0);
                a[i][s][1] = _mm512_dpbf16_ps(a[i][s][1], tl[s][1], q1);
            }
        }
    }
    for (int i = 0; i < RB; i++)
        for (int s = 0; s < NS; s++)
            _mm512_storeu_ps(sc + i * SUB * BLOCK + (sb + s) * BLOCK,
                             _mm512_mul_ps(_mm512_add_ps(a[i][s][0], a[i][s][1]), _mm512_set1_ps(scale)));
}

static inline __attribute__((always_inline)) void staged_scores_rows(const int RB, const int D, int nsub,
                                                                     const uint32_t *const *qp, const __m512i *kt,
                                                                     float scale, float *sc) {
    int sb = 0;
    for (; sb + 1 < nsub; sb += 2) staged_scores(RB, 2, D, sb, qp, kt, scale, sc);
    if (sb < nsub) staged_scores(RB, 1, D, sb, qp, kt, scale, sc);
}

/* p.V of RB rows: acc = acc * corr + sum over the block's value pairs, as in rows_block. */
static inline __attribute__((always_inline)) void staged_pv(const int RB, const int D, int npr, const uint32_t *pairs,
                                                            const float *corr, const uint16_t *vi, float *acc) {
    const int nc = D / 16, halves = D / 32;
    __m512 o[4][MAX_CHUNKS];
    for (int i = 0; i < RB; i++) {
        const __m512 cv = _mm512_set1_ps(corr[i]);
        for (int c = 0; c < nc; c++) o[i][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + (long)i * D + 16 * c), cv);
    }
    for (int pr = 0; pr < npr; pr++) {
        const uint16_t *src = vi + (long)pr * halves * 64;
        for (int c = 0; c < nc; c++) {
            const __m512i vc = _mm512_loadu_si512((const void *)(src + 32 * c));
            for (int i = 0; i < RB; i++)
                o[i][c] = _mm512_dpbf16_ps(o[i][c], (__m512bh)vc,
                                           (__m512bh)_mm512_set1_epi32((int)pairs[i * (SUB * BLOCK / 2) + pr]));
        }
    }
    for (int i = 0; i < RB; i++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(acc + (long)i * D + 16 * c, o[i][c]);
}

/* Lane i of the result is reduce_add1(a[i]) (i < 16), bit for bit: the same tree of additions
 * (halves, quarters, then pairs), done for 16 rows at once; about 3 instructions a row instead
 * of 8. */
static inline __m512 reduce_add16(const __m512 *a) {
    __m512 s1[8], s2[4], s3[2];
    for (int k = 0; k < 8; k++) /* lanes 0-7: a[2k][i] + a[2k][8 + i]; 8-15: the same of a[2k + 1] */
        s1[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE),
                              _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44));
    for (int k = 0; k < 4; k++) /* 128-bit lane j: row 4k + j, its T3[4 + i] + T3[i] */
        s2[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * k], s1[2 * k + 1], 0xDD),
                              _mm512_shuffle_f32x4(s1[2 * k], s1[2 * k + 1], 0x88));
    for (int k = 0; k < 2; k++) { /* lane j: [T8[0], T8[1]] of rows 8k + j and 8k + 4 + j */
        __m512d x = _mm512_castps_pd(s2[2 * k]), y = _mm512_castps_pd(s2[2 * k + 1]);
        s3[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    /* lane j: rows j, 4 + j, 8 + j, 12 + j */
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), r);
}

/* Lane i: the largest lane of a[i] (maxima are exact, so any order gives reduce_max's value). */
static inline __m512 reduce_max16(const __m512 *a) {
    __m512 s1[8], s2[4], s3[2];
    for (int k = 0; k < 8; k++)
        s1[k] = _mm512_max_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE),
                              _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44));
    for (int k = 0; k < 4; k++)
        s2[k] = _mm512_max_ps(_mm512_shuffle_f32x4(s1[2 * k], s1[2 * k + 1], 0xDD),
                              _mm512_shuffle_f32x4(s1[2 * k], s1[2 * k + 1], 0x88));
    for (int k = 0; k < 2; k++) {
        __m512d x = _mm512_castps_pd(s2[2 * k]), y = _mm512_castps_pd(s2[2 * k + 1]);
        s3[k] = _mm512_max_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 r = _mm512_max_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), r);
}

/* Asks for the lines of keys [next, end) of a later block, a share at a time while this block
 * computes: one burst of a whole block's lines overflows the core's queue of misses. */
typedef struct {
    const uint16_t *k, *v;
    const KeySet *ks;
    int g, D;
    long next, start, end;
} Prefetch;

/* Prefetch up to `done` / `total` of the range. */
static inline void prefetch_upto(Prefetch *pf, long done, long total) {
    const long want = pf->start + (pf->end - pf->start) * done / total;
    if (want > pf->next) {
        prefetch_keys(pf->k, pf->v, pf->ks, pf->g, pf->next, want, pf->D);
        pf->next = want;
    }
}

/* Rows r0 .. r0 + n (n <= ROW_CHUNK) against the staged block. `full`: every row sees all 64
 * keys (no masks). `units` counts row-phases done for the prefetch's pacing. */
static inline __attribute__((always_inline)) void staged_chunk(int r0, int n, int G, const int D, int nk, int nsub,
                                                               int full, int first_row, float scale,
                                                               const uint16_t *qb, const __m512i *kt,
                                                               const uint16_t *vi, const int *rows, float *m, float *l,
                                                               float *acc, Prefetch *pf, long *units, long total) {
    float sc[ROW_CHUNK * SUB * BLOCK] __attribute__((aligned(64)));
    uint32_t pairs[ROW_CHUNK * SUB * BLOCK / 2] __attribute__((aligned(64)));
    float corr[ROW_CHUNK] __attribute__((aligned(64)));
    /* scores: groups of 4 rows as even as possible (a group of 1 has too few chains) */
    {
        const int ng = (n + 3) / 4;
        for (int i = 0, groups = ng; i < n; groups--) {
            const int rb = (n - i + groups - 1) / groups;
            const uint32_t *qp[4];
            for (int x = 0; x < rb; x++) qp[x] = (const uint32_t *)(qb + (long)(r0 + i + x) * D);
            float *s = sc + i * SUB * BLOCK;
            *units += rb;
            prefetch_upto(pf, *units, total);
            switch (rb) {
            case 4: staged_scores_rows(4, D, nsub, qp, kt, scale, s); break;
            case 3: staged_scores_rows(3, D, nsub, qp, kt, scale, s); break;
            case 2: staged_scores_rows(2, D, nsub, qp, kt, scale, s); break;
            default: staged_scores_rows(1, D, nsub, qp, kt, scale, s); break;
            }
            i += rb;
        }
    }
    /* online softmax, 16 rows at a time: the same arithmetic as rows_block, with the per-row
     * reductions, maxima and corrections done for the 16 rows in one vector each */
    __m512i rowv[SUB];
    for (int sb = 0; sb < SUB; sb++) rowv[sb] = _mm512_loadu_si512((const void *)(rows + sb * BLOCK));
    for (int i0 = 0; i0 < n; i0 += 16) {
        const int nb = n - i0 < 16 ? n - i0 : 16;
        const __mmask16 live = (__mmask16)((1u << nb) - 1);
        __m512 red[16];
        for (int i = 0; i < 16; i++) {
            __m512 bmv = _mm512_set1_ps(-INFINITY);
            if (i < nb) {
                const float *si = sc + (i0 + i) * SUB * BLOCK;
                if (full) {
                    for (int sb = 0; sb < SUB; sb++) bmv = _mm512_max_ps(bmv, _mm512_loadu_ps(si + sb * BLOCK));
                } else {
                    const __m512i limit = _mm512_set1_epi32(first_row + (r0 + i0 + i) / G);
                    for (int sb = 0; sb < nsub; sb++)
                        bmv = _mm512_mask_max_ps(bmv, _mm512_cmple_epi32_mask(rowv[sb], limit), bmv,
                                                 _mm512_loadu_ps(si + sb * BLOCK));
                }
            }
            red[i] = bmv;
        }
        const __m512 bm = reduce_max16(red);
        const __m512 mo = _mm512_maskz_loadu_ps(live, m + r0 + i0);
        const __m512 mn = _mm512_max_ps(mo, bm); /* mo > bm ? mo : bm */
        const __mmask16 none = _mm512_cmp_ps_mask(bm, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
        const __m512 cv = _mm512_mask_mov_ps(exp512(_mm512_maskz_sub_ps((__mmask16)~none, mo, mn)), none,
                                             _mm512_set1_ps(1.0f));
        _mm512_storeu_ps(corr + i0, cv);
        float mnew[16] __attribute__((aligned(64)));
        _mm512_store_ps(mnew, mn);
        for (int i = 0; i < 16; i++) {
            __m512 sum = _mm512_setzero_ps();
            if (i < nb) {
                uint32_t *pp = pairs + (i0 + i) * (SUB * BLOCK / 2);
                const float *si = sc + (i0 + i) * SUB * BLOCK;
                const __m512 mnv = _mm512_set1_ps(mnew[i]);
                if (full) {
                    for (int sb = 0; sb < SUB; sb++) {
                        __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(si + sb * BLOCK), mnv));
                        sum = _mm512_add_ps(sum, p);
                        _mm256_storeu_si256((__m256i *)(pp + sb * BLOCK / 2), (__m256i)_mm512_cvtneps_pbh(p));
                    }
                } else if ((none >> i) & 1) {
                    memset(pp, 0, sizeof(uint32_t) * SUB * BLOCK / 2);
                } else {
                    const __m512i limit = _mm512_set1_epi32(first_row + (r0 + i0 + i) / G);
                    for (int sb = 0; sb < nsub; sb++) {
                        const __mmask16 vis = _mm512_cmple_epi32_mask(rowv[sb], limit);
                        __m512 p = _mm512_maskz_mov_ps(vis, exp512(_mm512_sub_ps(_mm512_loadu_ps(si + sb * BLOCK), mnv)));
                        sum = _mm512_add_ps(sum, p);
                        _mm256_storeu_si256((__m256i *)(pp + sb * BLOCK / 2), (__m256i)_mm512_cvtneps_pbh(p));
                    }
                    for (int sb = nsub; sb < SUB; sb++) memset(pp + sb * BLOCK / 2, 0, sizeof(uint32_t) * BLOCK / 2);
                }
            }
            red[i] = sum;
        }
        const __m512 lo = _mm512_maskz_loadu_ps(live, l + r0 + i0);
        const __mmask16 upd = live & (__mmask16)~none;
        _mm512_mask_storeu_ps(l + r0 + i0, upd, _mm512_fmadd_ps(lo, cv, reduce_add16(red)));
        _mm512_mask_storeu_ps(m + r0 + i0, upd, mn);
    }
    /* p.V: as many rows per tile as keep 16 accumulators (D = 64: 4 rows, D = 128: 2) */
    const int npr = (nk + 1) / 2, nc = D / 16;
    const int rbv = nc >= 16 ? 1 : 16 / nc > 4 ? 4 : 16 / nc;
    const int ng = (n + rbv - 1) / rbv;
    for (int i = 0, groups = ng; i < n; groups--) {
        const int rb = (n - i + groups - 1) / groups;
        const uint32_t *pp = pairs + i * (SUB * BLOCK / 2);
        float *ar = acc + (long)(r0 + i) * D;
        *units += rb;
        prefetch_upto(pf, *units, total);
        switch (rb) {
        case 4: staged_pv(4, D, npr, pp, corr + i, vi, ar); break;
        case 3: staged_pv(3, D, npr, pp, corr + i, vi, ar); break;
        case 2: staged_pv(2, D, npr, pp, corr + i, vi, ar); break;
        default: staged_pv(1, D, npr, pp, corr + i, vi, ar); break;
        }
        i += rb;
    }
}

/* The same task for bf16 caches on CPUs with AVX512-BF16: keys and values are used as stored
 * (no conversion to float). Keys come in blocks of 64, transposed 16 at a time so that
 * kt[p] holds dimension pair p of 16 keys; then q.k for 16 keys is D/2 pair-dot-product
 * instructions with no horizontal sums, and the transposition is shared by all query rows.
 * p.V interleaves two value rows, so one instruction adds p_j v_j + p_j+1 v_j+1 over 16
 * dimensions, with p rounded to bf16 (the precision of the cache itself). The softmax
 * bookkeeping runs once per 64 keys. Accumulators hold dimensions in the interleaved order and
 * are put back in order at the end. */
static inline __attribute__((always_inline)) void attend_range_bf16_impl(
    const float *q, const uint16_t *k, const uint16_t *v, int T, int Hq, int G, const int D, int g,
    const KeySet *ks, long lo, long hi, int first_row, float scale, float *m, float *l, float *acc,
    uint16_t *qb, uint16_t *vi, __m512i *kt) {
    const int R = G * T, halves = D / 32, nc = D / 16, npairs = D / 2;
    int rows[SUB * BLOCK];
    for (int r = 0; r < R; r++) {
        int t = r / G, h = g * G + r % G;
        const float *qr = q + ((long)t * Hq + h) * D;
        for (int c = 0; c < D; c += 32) {
            __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qr + c + 16), _mm512_loadu_ps(qr + c));
            _mm512_storeu_si512((void *)(qb + (long)r * D + c), (__m512i)pair);
        }
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * R * D);
    for (long start = lo; start < hi; start += SUB * BLOCK) {
        const int nk = (int)((hi - start) < SUB * BLOCK ? (hi - start) : SUB * BLOCK);
        const int nsub = (nk + BLOCK - 1) / BLOCK;
        for (int j = 0; j < SUB * BLOCK; j++) rows[j] = j < nk ? key_row(ks, g, start + j) : INT32_MAX;
        /* rows in register blocks of up to rb_max; when one block holds them all (decoding:
         * R = G), keys and values go straight from the cache to registers */
        const int rb_max = D <= 64 ? 4 : 2;
        if (R <= rb_max) {
            rows_group(1, R, 0, G, D, nk, nsub, first_row, scale, qb, kt, vi, k, v, rows, m, l, acc);
            continue;
        }
        /* The first block's lines are asked for (into L2) before copying any: the copies go
         * tile by tile and alone leave too few misses in flight to stream from memory. Later
         * blocks are asked for PF_BLOCKS ahead, a share before each row group's work. */
        if (start == lo) prefetch_keys(k, v, ks, g, start, start + (long)PF_BLOCKS * SUB * BLOCK < hi ? start + (long)PF_BLOCKS * SUB * BLOCK : hi, D);
        for (int sb = 0; sb < nsub; sb++) {
            for (int hf = 0; hf < halves; hf++) {
                __m512i tile[BLOCK];
                load_key_tile(k, rows + sb * BLOCK, nk - sb * BLOCK, D, hf, tile);
                transpose16x16_epi32(tile, kt + sb * npairs + 16 * hf);
            }
        }
        /* interleave value rows pairwise: vi[pair][half][lo|hi] */
        for (int pr = 0; pr < (nk + 1) / 2; pr++) {
            for (int hf = 0; hf < halves; hf++) {
                uint16_t *dst = vi + ((long)pr * halves + hf) * 64;
                __m512i lo, hi;
                interleave_values(v, rows, nk, D, pr, hf, &lo, &hi);
                _mm512_storeu_si512((void *)dst, lo);
                _mm512_storeu_si512((void *)(dst + 32), hi);
            }
        }
        if (!staged_path) {
            /* groups as even as possible (21 rows: 4,4,4,3,3,3, not 4,4,4,4,4,1): a lone row has
             * only two accumulation chains and waits on the multiply-add latency */
            const long ng = (R + rb_max - 1) / rb_max; /* row groups */
            for (int r = 0, groups = (int)ng; r < R; groups--) {
                int rb = (R - r + groups - 1) / groups;
                /* Each row group asks for its share of the next block's lines, so loads from
                 * memory overlap this block's arithmetic (a burst of 256 prefetches overflows
                 * the core's queue of misses and most are dropped). */
                const long next = start + SUB * BLOCK, gi = ng - groups;
                const long share_end = next + SUB * BLOCK * (gi + 1) / ng;
                prefetch_keys(k, v, ks, g, next + SUB * BLOCK * gi / ng, share_end < hi ? share_end : hi, D);
                rows_group(0, rb, r, G, D, nk, nsub, first_row, scale, qb, kt, vi, k, v, rows, m, l, acc);
                r += rb;
            }
            continue;
        }
        int maxrow = rows[0];
        for (int j = 1; j < nk; j++) maxrow = rows[j] > maxrow ? rows[j] : maxrow;
        const long ahead = start + (long)PF_BLOCKS * SUB * BLOCK;
        Prefetch pf = {k, v, ks, g, D, ahead, ahead, ahead + SUB * BLOCK < hi ? ahead + SUB * BLOCK : hi};
        long units = 0;
        const long total = 2L * R;
        for (int r = 0; r < R; r += ROW_CHUNK) {
            const int n = R - r < ROW_CHUNK ? R - r : ROW_CHUNK;
            const int full = nk == SUB * BLOCK && maxrow <= first_row + r / G;
            staged_chunk(r, n, G, D, nk, nsub, full, first_row, scale, qb, kt, vi, rows, m, l, acc, &pf, &units, total);
        }
    }
    /* accumulator lane (vector c, lane L) holds dimension 32*(c/2) + 8*(L/4) + 4*(c%2) + L%4 */
    float tmp[16 * MAX_CHUNKS];
    for (int r = 0; r < R; r++) {
        float *ar = acc + (long)r * D;
        for (int c = 0; c < nc; c++)
            for (int L = 0; L < 16; L++) tmp[32 * (c / 2) + 8 * (L / 4) + 4 * (c % 2) + L % 4] = ar[16 * c + L];
        memcpy(ar, tmp, sizeof(float) * D);
    }
}

/* Specialised for the common head sizes, so the per-dimension loops unroll and the output
 * accumulators stay in registers. */
static void attend_range_bf16(const float *q, const uint16_t *k, const uint16_t *v, int T, int Hq, int G, int D,
                              int g, const KeySet *ks, long lo, long hi, int first_row, float scale, float *m,
                              float *l, float *acc, uint16_t *qb, uint16_t *vi, __m512i *kt) {
    if (D == 64)
        attend_range_bf16_impl(q, k, v, T, Hq, G, 64, g, ks, lo, hi, first_row, scale, m, l, acc, qb, vi, kt);
    else if (D == 128)
        attend_range_bf16_impl(q, k, v, T, Hq, G, 128, g, ks, lo, hi, first_row, scale, m, l, acc, qb, vi, kt);
    else
        attend_range_bf16_impl(q, k, v, T, Hq, G, D, g, ks, lo, hi, first_row, scale, m, l, acc, qb, vi, kt);
}
#endif

static void store_out(void *out, long at, const float *o, int D, int bf16) {
    if (!bf16) {
        memcpy((float *)out + at, o, sizeof(float) * D);
        return;
    }
    uint16_t *dst = (uint16_t *)out + at;
    for (int c = 0; c < D; c++) { /* round to nearest even */
        uint32_t bits;
        memcpy(&bits, o + c, 4);
        bits += 0x7fff + ((bits >> 16) & 1);
        dst[c] = (uint16_t)(bits >> 16);
    }
}

/* One sequence's attention: its queries, cache buffers, output and visible keys. */
typedef struct {
    const float *q;
    const void *k, *v;
    void *out;
    long head_stride;
    int T, first_row;
    KeySet ks;
    long splits, first_task, partial_at; /* filled in by attention_jobs */
} Job;

/* Every job's tasks (KV head x fixed key range) in one parallel region, then each job's merge.
 * A batch of sequences thus costs one thread fork/join per layer, and each sequence's result is
 * bit-identical to running it alone (same tasks, same merge order). */
static int attention_jobs(Job *jobs, int n_jobs, int kv_is_bf16, int out_is_bf16, int Hq, int Hkv, int D,
                          float scale, int n_threads) {
    if (n_jobs < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || D < 16 || D > 16 * MAX_CHUNKS || (D % 16)) return -1;
    const int G = Hq / Hkv;
    long tasks = 0, partial_floats = 0;
    int R_max = 0;
    for (int j = 0; j < n_jobs; j++) {
        Job *jb = &jobs[j];
        if (jb->T < 1 || jb->ks.num_rows < jb->ks.dense_start) return -1;
        if (jb->ks.n_chunks > 0 && (jb->ks.chunks == NULL || jb->ks.chunk_size < 1)) return -1;
        if (jb->ks.n_chunks < 0) jb->ks.n_chunks = 0;
        /* Keys are split into fixed, aligned ranges of SPLIT_KEYS (each its own task, merged by
         * log-sum-exp): never ranges that depend on N, so a query row gets bit-identical results
         * whether it is decoded alone or verified with other rows (which see a few more keys). */
        const long N = keys_of_head(&jb->ks);
        jb->splits = (N + SPLIT_KEYS - 1) / SPLIT_KEYS;
        if (jb->splits < 1) jb->splits = 1;
        jb->first_task = tasks;
        jb->partial_at = partial_floats;
        const int R = G * jb->T;
        tasks += (long)Hkv * jb->splits;
        partial_floats += (long)Hkv * jb->splits * R * (D + 2);
        if (R > R_max) R_max = R;
    }
    if (n_threads < 1) n_threads = 1;
    float *partial = (float *)malloc(sizeof(float) * partial_floats);
    if (!partial) return -2;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        /* fp32 path: converted K and V blocks and scores; bf16 path: bf16 queries, the
         * interleaved V block and the transposed K block */
        const int R = R_max;
        size_t floats = 2 * BLOCK * D + R * BLOCK;
        size_t bf16_floats = R * D / 2 + SUB * BLOCK * D / 2 + SUB * BLOCK * D / 2 + 16;
        float *scratch = (float *)aligned_alloc(64, sizeof(float) * ((floats > bf16_floats ? floats : bf16_floats) + 16) / 64 * 64 + 64);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
        int j = 0;
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < tasks; task++) {
            if (!scratch) continue;
            while (j + 1 < n_jobs && task >= jobs[j + 1].first_task) j++;
            while (task < jobs[j].first_task) j--;
            const Job *jb = &jobs[j];
            const int Rj = G * jb->T;
            const long local = task - jb->first_task;
            int g = (int)(local / jb->splits);
            long s = local % jb->splits;
            const long N = keys_of_head(&jb->ks);
            long lo = s * SPLIT_KEYS, hi = lo + SPLIT_KEYS < N ? lo + SPLIT_KEYS : N;
            float *m = partial + jb->partial_at + local * (long)Rj * (D + 2), *l = m + Rj, *acc = l + Rj;
            const char *kb = (const char *)jb->k + (long)g * jb->head_stride * (kv_is_bf16 ? 2 : 4);
            const char *vb = (const char *)jb->v + (long)g * jb->head_stride * (kv_is_bf16 ? 2 : 4);
#if defined(__AVX512BF16__)
            if (kv_is_bf16 && D % 32 == 0) {
                uint16_t *qb = (uint16_t *)scratch;
                uint16_t *vi = qb + ((Rj * D + 31) / 32) * 32;
                __m512i *kt = (__m512i *)(vi + SUB * BLOCK * D);
                attend_range_bf16(jb->q, (const uint16_t *)kb, (const uint16_t *)vb, jb->T, Hq, G, D, g, &jb->ks, lo,
                                  hi, jb->first_row, scale, m, l, acc, qb, vi, kt);
                continue;
            }
#endif
            attend_range(jb->q, kb, vb, kv_is_bf16, jb->T, Hq, G, D, g, &jb->ks, lo, hi, jb->first_row,
                         scale, m, l, acc, scratch, scratch + BLOCK * D, scratch + 2 * BLOCK * D);
        }
        free(scratch);
    }
    if (failed) {
        free(partial);
        return -2;
    }
    /* merge the splits of each KV head */
    float o[16 * MAX_CHUNKS];
    for (int j = 0; j < n_jobs; j++) {
        const Job *jb = &jobs[j];
        const int R = G * jb->T;
        const long per_task = (long)R * (D + 2);
        const float *part = partial + jb->partial_at;
        for (int g = 0; g < Hkv; g++) {
            for (int r = 0; r < R; r++) {
                int t = r / G, h = g * G + r % G;
                long at = ((long)t * Hq + h) * D;
                float M = -INFINITY;
                for (long s = 0; s < jb->splits; s++) {
                    float ms = part[((long)g * jb->splits + s) * per_task + r];
                    M = ms > M ? ms : M;
                }
                memset(o, 0, sizeof(float) * D);
                if (M == -INFINITY) {
                    store_out(jb->out, at, o, D, out_is_bf16);
                    continue;
                }
                float L = 0.0f;
                for (long s = 0; s < jb->splits; s++) {
                    const float *base = part + ((long)g * jb->splits + s) * per_task;
                    if (base[r] == -INFINITY) continue;
                    float w = expf(base[r] - M);
                    L += base[R + r] * w;
                    const float *acc = base + 2 * R + (long)r * D;
                    for (int c = 0; c < D; c++) o[c] += acc[c] * w;
                }
                float inv = 1.0f / L;
                for (int c = 0; c < D; c++) o[c] *= inv;
                store_out(jb->out, at, o, D, out_is_bf16);
            }
        }
    }
    free(partial);
    return 0;
}

/* Returns 0 on success, a negative code on bad arguments or allocation failure. */
int tf_attention(const float *q, const void *k, const void *v, int kv_is_bf16, long head_stride, void *out_ptr,
                 int out_is_bf16, int T, int Hq, int Hkv, int D, const int32_t *chunks, int n_chunks, int chunk_size,
                 int dense_start, int num_rows, int first_row, float scale, int n_threads) {
    Job job = {q, k, v, out_ptr, head_stride, T, first_row, {chunks, n_chunks, chunk_size, dense_start, num_rows}, 0, 0, 0};
    return attention_jobs(&job, 1, kv_is_bf16, out_is_bf16, Hq, Hkv, D, scale, n_threads);
}

void tf_rope_store(const void *qkv, const float *cos_t, const float *sin_t, const int64_t *positions,
                   float *q_out, void *k_cache, void *v_cache, long head_stride, int row0, int T, int Hq,
                   int Hkv, int D, int bf16);

/* A batch step's whole attention for one layer in one call: for each sequence, rotate its rows
 * of qkv [N][Hq + 2 Hkv][D] (tokens of the sequences one after another), write its keys and
 * values into its own cache at row0.., then attend as tf_attention does for each. qkv, the caches and out
 * share one dtype (bf16 flag); q_out [N][Hq][D] float32 receives the rotated queries.
 * fields[9 j ..]: k, v (addresses), head_stride, row0, T, chunks (address or 0), n_chunks,
 * chunk_size, dense_start; the sequence sees rows up to row0 + T. */
int tf_rope_attention_many(const void *qkv, const float *cos_t, const float *sin_t, const int64_t *positions,
                           float *q_out, void *out, const int64_t *fields, int n_jobs, int Hq, int Hkv, int D,
                           int bf16, float scale, int n_threads) {
    if (n_jobs < 1) return -1;
    Job *jobs = (Job *)calloc((size_t)n_jobs, sizeof(Job));
    if (!jobs) return -2;
    const size_t elt = bf16 ? 2 : 4;
    long at = 0;
    for (int j = 0; j < n_jobs; j++) {
        const int64_t *f = fields + 9 * (long)j;
        Job *jb = &jobs[j];
        jb->k = (const void *)(intptr_t)f[0];
        jb->v = (const void *)(intptr_t)f[1];
        jb->head_stride = (long)f[2];
        jb->first_row = (int)f[3];
        jb->T = (int)f[4];
        jb->ks = (KeySet){(const int32_t *)(intptr_t)f[5], (int)f[6], (int)f[7], (int)f[8], jb->first_row + jb->T};
        jb->q = q_out + at * Hq * D;
        jb->out = (char *)out + at * Hq * D * elt;
        tf_rope_store((const char *)qkv + at * (Hq + 2 * Hkv) * D * elt, cos_t, sin_t, positions + at,
                      (float *)jb->q, (void *)jb->k, (void *)jb->v, jb->head_stride, jb->first_row, jb->T, Hq, Hkv,
                      D, bf16);
        at += jb->T;
    }
    int code = attention_jobs(jobs, n_jobs, bf16, bf16, Hq, Hkv, D, scale, n_threads);
    free(jobs);
    return code;
}
