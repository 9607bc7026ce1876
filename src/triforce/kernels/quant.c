/* y = x W^T (+ b) with W kept in its GGUF quantized blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K).
 *
 * Why: decoding is bound by the bytes of weights read per token; a 4-bit block format reads 0.56
 * to 0.63 bytes per weight where bf16 reads 2. The blocks are repacked once, at load time, into
 * groups of 16 output rows whose quants are interleaved so one 16- or 32-byte load decodes, in
 * registers, straight into the 64-byte vector linear.c's kernel takes (a pair of input dimensions
 * for 16 outputs); the scales and minimums of the 16 rows sit together ahead of the quants, and
 * four groups interleave their K blocks (a quad) so a four-group pass reads one stream.
 * Repacking keeps the format's bytes per weight exactly; no dequantized copy is ever kept.
 *
 * Exactness: each weight is decoded to gguf-py's float32 value (its numpy operations in its
 * order, each product and sum rounded on its own; fused only where the product is exact, see
 * affine_add), then rounded to bf16 to nearest even: the value PyTorch's `.to(torch.bfloat16)`
 * gives the loader's float32 weights. Each output then accumulates with linear.c's AVX512
 * instruction sequence (zero, then one pair-dot-product per pair of K, in order, one chain per
 * output; the bias added in float32 at the end), so results are bit-identical to tf_linear_bf16
 * on those bf16 weights, whatever M is and whatever rows share the pass. Paths and tiles below
 * are chosen for speed only; none changes the order of any output's sum.
 *
 * Paths: up to 8 rows of x decode the weights in registers and use them at once (up to 4 rows:
 * a whole quad per pass, four independent chains; more: two groups per pass, 8-row tiles);
 * more rows decode each pair of groups once into a per-thread scratch (the packed bf16 layout)
 * and run linear.c's row tiles over it. Measured on 2 Zen 5 cores against tf_linear_bf16, the
 * embedded SmolLM2-135M's projections (Q4_1 layers, Q8_0 head) from memory: 0.45x its time at
 * 1 row, 0.52x at 3-4, 0.6x at 7, 0.9-1.0x from 16 rows to 256.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include "simd.h"

enum { QF_Q8_0, QF_Q4_0, QF_Q4_1, QF_Q4_K, QF_Q5_K, QF_Q6_K, QF_COUNT };
static const int QF_BLOCK[QF_COUNT] = {32, 32, 32, 256, 256, 256};   /* weights per block */
static const int QF_BYTES[QF_COUNT] = {34, 18, 20, 144, 176, 210};   /* bytes per block */

/* Repacked layout, per group of 16 rows and per K block (16 * QF_BYTES bytes):
 *   Q8_0: d[16] (f16) | 16 pairs x 32 int8
 *   Q4_0: d[16]       | 16 pairs x 16 bytes of nibbles
 *   Q4_1: d[16] m[16] | 16 pairs x 16 bytes of nibbles
 *   Q4_K: d[16] dmin[16] | scales byte-major [12][16] | 8 chunks x (16 pairs x 16 nibble bytes)
 *   Q5_K: as Q4_K, each chunk followed by its 16 pairs x 4 bytes of fifth bits
 *   Q6_K: d[16] | scales [16 sub-blocks][16 rows] int8 | 8 chunks x (16 x 16 nibble bytes, then
 *         16 pairs x 4 masks of 16 bits: bit 4 of elements 0-15, of 16-31, bit 5 of 0-15, 16-31)
 * (d, m, dmin: f16, one per row; K-quant scales as GGUF packs them, transposed to [byte][row]).
 * A chunk is 32 consecutive K (16 pairs). Element e (0..31) of a pair vector belongs to row
 * 8 * (e / 16) + (e % 16) / 2 and input dimension 2 p + e % 2; a nibble byte i holds element i
 * in its low half and element 16 + i in its high half. */
static inline int elem_of(int r, int k) { return 16 * (r >> 3) + 2 * (r & 7) + (k & 1); }

static long kblock_bytes(int fmt) { return 16L * QF_BYTES[fmt]; }
static inline int chunks_of(int fmt) { return QF_BLOCK[fmt] / 32; } /* 32-K chunks per K block */

/* Groups are stored in quads: the K blocks of 4 consecutive groups interleave (K block 0 of groups
 * 0-3, then K block 1 of groups 0-3, ...), so a pass over four groups reads one sequential stream.
 * A last, partial quad interleaves its 1-3 groups the same way. Returns the address of group g's
 * first K block and sets *kstride to the distance between its K blocks. */
#define QUAD 4
static inline const uint8_t *group_at(const uint8_t *packed, int g, int groups, int nkb, long kbb, long *kstride) {
    const int q = g / QUAD, s = g % QUAD, nq = groups - q * QUAD < QUAD ? groups - q * QUAD : QUAD;
    *kstride = nq * kbb;
    return packed + (long)q * QUAD * nkb * kbb + s * kbb;
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* One GGUF block -> integer quants q[bs] (K-quants: 0..15 / 0..31 / 0..63 before any offset). */
static void unpack_block(int fmt, const uint8_t *b, int *q) {
    switch (fmt) {
    case QF_Q8_0:
        for (int v = 0; v < 32; v++) q[v] = (int8_t)b[2 + v];
        break;
    case QF_Q4_0:
    case QF_Q4_1: {
        const uint8_t *qs = b + (fmt == QF_Q4_0 ? 2 : 4);
        for (int v = 0; v < 32; v++) q[v] = v < 16 ? qs[v] & 15 : qs[v - 16] >> 4;
        break;
    }
    case QF_Q4_K:
    case QF_Q5_K: {
        const uint8_t *qh = b + 16, *qs = b + (fmt == QF_Q4_K ? 16 : 48);
        for (int v = 0; v < 256; v++) {
            int c = v / 64, s = (v % 64) / 32, i = v % 32;
            q[v] = (qs[c * 32 + i] >> (4 * s)) & 15;
            if (fmt == QF_Q5_K) q[v] |= ((qh[i] >> (v / 32)) & 1) << 4;
        }
        break;
    }
    case QF_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        for (int v = 0; v < 256; v++) {
            int h = v / 128, rem = v % 128;
            q[v] = ((ql[h * 64 + rem % 64] >> (4 * (rem / 64))) & 15) | (((qh[h * 32 + rem % 32] >> (2 * (rem / 32))) & 3) << 4);
        }
        break;
    }
    }
}

/* GGUF blocks src [N][K / bs][bytes] -> the repacked groups of 16 rows, in quads (group_at).
 * Rows past N are all-zero blocks (they decode to zeros and are never stored). */
void tf_quant_repack(const uint8_t *src, uint8_t *dst, int fmt, int N, int K) {
    const int bs = QF_BLOCK[fmt], bytes = QF_BYTES[fmt], nkb = K / bs, groups = (N + 15) / 16;
    const long kbb = kblock_bytes(fmt);
#pragma omp parallel for schedule(static)
    for (long gk = 0; gk < (long)groups * nkb; gk++) {
        const int g = (int)(gk / nkb), kb = (int)(gk % nkb);
        long kstride;
        uint8_t *o = (uint8_t *)group_at(dst, g, groups, nkb, kbb, &kstride) + kb * kstride;
        uint8_t zero[256];
        int q[256];
        memset(zero, 0, sizeof zero);
        memset(o, 0, kbb);
        for (int r = 0; r < 16; r++) {
            const int n = g * 16 + r;
            const uint8_t *b = n < N ? src + ((long)n * nkb + kb) * bytes : zero;
            unpack_block(fmt, b, q);
            switch (fmt) {
            case QF_Q8_0:
                memcpy(o + 2 * r, b, 2);
                for (int k = 0; k < 32; k++) o[32 + (k / 2) * 32 + elem_of(r, k)] = (uint8_t)q[k];
                break;
            case QF_Q4_0:
            case QF_Q4_1: {
                const int base = fmt == QF_Q4_0 ? 32 : 64;
                memcpy(o + 2 * r, b, 2);
                if (fmt == QF_Q4_1) memcpy(o + 32 + 2 * r, b + 2, 2);
                for (int k = 0; k < 32; k++) {
                    int e = elem_of(r, k);
                    o[base + (k / 2) * 16 + (e & 15)] |= (uint8_t)(q[k] << (4 * (e >> 4)));
                }
                break;
            }
            case QF_Q4_K:
            case QF_Q5_K: {
                const int chunk = fmt == QF_Q4_K ? 256 : 320;
                memcpy(o + 2 * r, b, 2);
                memcpy(o + 32 + 2 * r, b + 2, 2);
                for (int i = 0; i < 12; i++) o[64 + 16 * i + r] = b[4 + i];
                for (int k = 0; k < 256; k++) {
                    int c = k / 32, p = (k % 32) / 2, e = elem_of(r, k);
                    uint8_t *ch = o + 256 + c * chunk;
                    ch[p * 16 + (e & 15)] |= (uint8_t)((q[k] & 15) << (4 * (e >> 4)));
                    if (fmt == QF_Q5_K && (q[k] & 16)) ch[256 + p * 4 + e / 8] |= (uint8_t)(1 << (e % 8));
                }
                break;
            }
            case QF_Q6_K: {
                memcpy(o + 2 * r, b + 208, 2);
                for (int s = 0; s < 16; s++) o[32 + 16 * s + r] = b[192 + s];
                for (int k = 0; k < 256; k++) {
                    int c = k / 32, p = (k % 32) / 2, e = elem_of(r, k);
                    uint8_t *ch = o + 288 + c * 384;
                    ch[p * 16 + (e & 15)] |= (uint8_t)((q[k] & 15) << (4 * (e >> 4)));
                    for (int bit = 0; bit < 2; bit++) {
                        if (q[k] & (16 << bit)) {
                            int mask = 2 * bit + (e >> 4), pos = e & 15; /* 16-bit mask, little-endian */
                            ch[256 + p * 8 + 2 * mask + pos / 8] |= (uint8_t)(1 << (pos % 8));
                        }
                    }
                }
                break;
            }
            }
        }
    }
}

int tf_quant_format_ok(int fmt, int K) {
    return fmt >= 0 && fmt < QF_COUNT && K > 0 && K % QF_BLOCK[fmt] == 0;
}

#if defined(__AVX512BF16__)
#define RN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* Explicit rounding: never contracted into a fused multiply-add (numpy rounds each op). */
#define MUL(a, b) _mm512_mul_round_ps((a), (b), RN)
#define ADD(a, b) _mm512_add_round_ps((a), (b), RN)
#define SUB(a, b) _mm512_sub_round_ps((a), (b), RN)
#define CVT(v) _mm512_cvt_roundepi32_ps((v), RN) /* exact for these small integers */

/* Scale state of one group over one chunk: lane l of *lo is row l/2's value, of *hi row 8+l/2.
 * s: scale; o: minimum/offset (Q6_K: the second sub-block's scale). */
typedef struct {
    __m512 slo, shi, olo, ohi;
} QState;

static inline __attribute__((always_inline)) void spread(__m512 v, __m512 *lo, __m512 *hi) {
    const __m512i il = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i ih = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    *lo = _mm512_permutexvar_ps(il, v);
    *hi = _mm512_permutexvar_ps(ih, v);
}

static inline __attribute__((always_inline)) __m512 f16x16(const uint8_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline __attribute__((always_inline)) __mmask16 ld_mask(const uint8_t *p) { return (__mmask16)rd16(p); }

static inline __attribute__((always_inline)) __m512i u8x16(const uint8_t *p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}

static inline __attribute__((always_inline)) void kquant_scales(const uint8_t *blk, int j, QState *st) {
    const uint8_t *S = blk + 64;
    const __m512i c63 = _mm512_set1_epi32(63), c15 = _mm512_set1_epi32(15), c48 = _mm512_set1_epi32(0x30);
    __m512i sc, m;
    if (j < 4) {
        sc = _mm512_and_si512(u8x16(S + 16 * j), c63);
        m = _mm512_and_si512(u8x16(S + 16 * (4 + j)), c63);
    } else {
        __m512i md = u8x16(S + 16 * (8 + j - 4));
        sc = _mm512_or_si512(_mm512_and_si512(md, c15), _mm512_and_si512(_mm512_srli_epi32(u8x16(S + 16 * (j - 4)), 2), c48));
        m = _mm512_or_si512(_mm512_srli_epi32(md, 4), _mm512_and_si512(_mm512_srli_epi32(u8x16(S + 16 * j), 2), c48));
    }
    spread(MUL(f16x16(blk), CVT(sc)), &st->slo, &st->shi);
    spread(MUL(f16x16(blk + 32), CVT(m)), &st->olo, &st->ohi);
}

/* Scales of chunk c of a K block starting at blk. */
static inline __attribute__((always_inline)) void q_setup(const int FMT, const uint8_t *blk, int c, QState *st) {
    switch (FMT) {
    case QF_Q8_0:
    case QF_Q4_0:
        spread(f16x16(blk), &st->slo, &st->shi);
        break;
    case QF_Q4_1:
        spread(f16x16(blk), &st->slo, &st->shi);
        spread(f16x16(blk + 32), &st->olo, &st->ohi);
        break;
    case QF_Q4_K:
    case QF_Q5_K:
        kquant_scales(blk, c, st);
        break;
    case QF_Q6_K: {
        __m512 d = f16x16(blk);
        __m512i s0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 32 + 16 * (2 * c))));
        __m512i s1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 32 + 16 * (2 * c + 1))));
        spread(MUL(d, CVT(s0)), &st->slo, &st->shi);
        spread(MUL(d, CVT(s1)), &st->olo, &st->ohi);
        break;
    }
    }
}

/* Nibbles to float32 by table lookup: vpermps reads only an index's low 4 bits, so a lane holding
 * a whole byte picks its low nibble's value with no mask, and one instruction replaces a mask and
 * a conversion. The tables hold small integers: exact, as a conversion would give. */
static inline __attribute__((always_inline)) __m512 nib_lo(__m512i L, __m512 table) {
    return _mm512_permutexvar_ps(L, table);
}
static inline __attribute__((always_inline)) __m512 nib_hi(__m512i L, __m512 table) {
    return _mm512_permutexvar_ps(_mm512_srli_epi32(L, 4), table);
}
#define TABLE_0_15 _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)

/* s * q + o and s * q - o. Fused where gguf-py rounds the product first: for Q4_1, Q4_K and Q5_K
 * the product is exact in float32 (an f16 scale's 11 significant bits, times a 6-bit sub-block
 * scale, times a quant of at most 5 bits: at most 22 bits), so rounding it first changes nothing
 * and the fused form gives the same single rounding of the sum. */
static inline __attribute__((always_inline)) __m512 affine_add(__m512 s, __m512 q, __m512 o) {
    return _mm512_fmadd_round_ps(s, q, o, RN);
}
static inline __attribute__((always_inline)) __m512 affine_sub(__m512 s, __m512 q, __m512 o) {
    return _mm512_fmsub_round_ps(s, q, o, RN);
}

/* Pair p of chunk c: the float32 weights of elements 0-15 (*b) and 16-31 (*a). */
static inline __attribute__((always_inline)) void q_decode_f32(const int FMT, const QState *st, const uint8_t *blk,
                                                                int c, int p, __m512 *b, __m512 *a) {
    const __m512i c15 = _mm512_set1_epi32(15);
    switch (FMT) {
    case QF_Q8_0: {
        const uint8_t *q = blk + 32 + 32 * p;
        *b = MUL(CVT(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), st->slo);
        *a = MUL(CVT(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), st->shi);
        break;
    }
    case QF_Q4_0: { /* d * (q - 8) */
        const __m512 t = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
        __m512i L = u8x16(blk + 32 + 16 * p);
        *b = MUL(st->slo, nib_lo(L, t));
        *a = MUL(st->shi, nib_hi(L, t));
        break;
    }
    case QF_Q4_1: { /* d * q + m */
        __m512i L = u8x16(blk + 64 + 16 * p);
        *b = affine_add(st->slo, nib_lo(L, TABLE_0_15), st->olo);
        *a = affine_add(st->shi, nib_hi(L, TABLE_0_15), st->ohi);
        break;
    }
    case QF_Q4_K: { /* (d * sc) * q - dmin * m */
        __m512i L = u8x16(blk + 256 + 256 * c + 16 * p);
        *b = affine_sub(st->slo, nib_lo(L, TABLE_0_15), st->olo);
        *a = affine_sub(st->shi, nib_hi(L, TABLE_0_15), st->ohi);
        break;
    }
    case QF_Q5_K: { /* (d * sc) * (q | fifth bit << 4) - dmin * m */
        const uint8_t *ch = blk + 256 + 320 * c;
        const __m512i c16 = _mm512_set1_epi32(16);
        __m512i L = u8x16(ch + 16 * p);
        __mmask16 hb = ld_mask(ch + 256 + 4 * p);
        __mmask16 ha = ld_mask(ch + 256 + 4 * p + 2);
        __m512i qb = _mm512_and_si512(L, c15), qa = _mm512_srli_epi32(L, 4);
        qb = _mm512_mask_or_epi32(qb, hb, qb, c16);
        qa = _mm512_mask_or_epi32(qa, ha, qa, c16);
        *b = affine_sub(st->slo, CVT(qb), st->olo);
        *a = affine_sub(st->shi, CVT(qa), st->ohi);
        break;
    }
    case QF_Q6_K: { /* (d * sc) * ((q | two bits << 4) - 32) */
        const uint8_t *ch = blk + 288 + 384 * c;
        const __m512i c16 = _mm512_set1_epi32(16), c32 = _mm512_set1_epi32(32), m32 = _mm512_set1_epi32(-32);
        __m512i L = u8x16(ch + 16 * p);
        const uint8_t *hm = ch + 256 + 8 * p;
        __m512i qb = _mm512_ternarylogic_epi32(L, c15, m32, 0xEA);              /* (L & 15) | -32 = lo - 32 */
        __m512i qa = _mm512_or_si512(_mm512_srli_epi32(L, 4), m32);
        qb = _mm512_mask_or_epi32(qb, ld_mask(hm + 0), qb, c16);           /* bit 4: + 16 */
        qa = _mm512_mask_or_epi32(qa, ld_mask(hm + 2), qa, c16);
        qb = _mm512_mask_add_epi32(qb, ld_mask(hm + 4), qb, c32);          /* bit 5: + 32 */
        qa = _mm512_mask_add_epi32(qa, ld_mask(hm + 6), qa, c32);
        *b = MUL(p < 8 ? st->slo : st->olo, CVT(qb));
        *a = MUL(p < 8 ? st->shi : st->ohi, CVT(qa));
        break;
    }
    }
}

static inline __attribute__((always_inline)) __m512bh q_decode(const int FMT, const QState *st, const uint8_t *blk,
                                                                int c, int p) {
    __m512 b, a;
    q_decode_f32(FMT, st, blk, c, p, &b, &a);
    return _mm512_cvtne2ps_pbh(a, b); /* elements 0-15 from b, 16-31 from a; RNE */
}

/* In registers: mt rows of x against NB groups of one quad (group s's K block kb at
 * base + kb * kstride + s * kbb); group s's row i sums into acc[s * mt + i]. */
#define QTILE_M 8
/* Pairs per loop turn: all 16 of a chunk. Unrolling 4 compiles this file in 4 s instead of 18 s
 * and is as fast with the weights in cache, but measured 0.71x against 0.59x of the bf16 kernel's
 * time at 7 rows from memory (and 0.84x against 0.98x at 16 rows for the scratch decoding). */
#ifndef QUNROLL
#define QUNROLL 16
#endif
#define QDO_PRAGMA(x) _Pragma(#x)
#define QUNROLL_PRAGMA(n) QDO_PRAGMA(GCC unroll n)
#ifndef QPREFETCH
#define QPREFETCH 4096 /* bytes ahead to prefetch in software (of 0, 512-16384 the best; T1 hints were worse) */
#endif
static inline __attribute__((always_inline)) void qtile_body(const int FMT, const uint8_t *base, long kstride, int nkb,
                                                             const uint32_t *xp, int pairs, const int mt, const int NB,
                                                             __m512 *acc) {
    const int CH = FMT >= QF_Q4_K ? 8 : 1;
    const long kbb = 16L * (FMT == QF_Q8_0 ? 34 : FMT == QF_Q4_0 ? 18 : FMT == QF_Q4_1 ? 20 : FMT == QF_Q4_K ? 144
                                                    : FMT == QF_Q5_K ? 176 : 210);
    __m512 a[4 * QTILE_M];
    /* prefetch the same chunk of the K block this many K blocks ahead (the whole quad's stream) */
    const long ahead = ((QPREFETCH + kstride - 1) / kstride) * kstride;
    for (int i = 0; i < NB * mt; i++) a[i] = _mm512_setzero_ps();
    for (int kb = 0; kb < nkb; kb++) {
        const uint8_t *blk = base + kb * kstride;
        for (int c = 0; c < CH; c++) {
            QState st[4];
            if (QPREFETCH) { /* the quad's share of this chunk, also when a pass takes half the quad */
                const long span = kstride / CH;
                const uint8_t *pf = blk + ahead + c * span;
                for (long l = 0; l < span; l += 64) _mm_prefetch((const char *)(pf + l), _MM_HINT_T0);
            }
            for (int s = 0; s < NB; s++) {
                q_setup(FMT, blk + s * kbb, c, &st[s]);
            }
            const uint32_t *xc = xp + (kb * CH + c) * 16;
QUNROLL_PRAGMA(QUNROLL)
            for (int p = 0; p < 16; p++) {
                __m512bh w[4];
                for (int s = 0; s < NB; s++) w[s] = q_decode(FMT, &st[s], blk + s * kbb, c, p);
                for (int i = 0; i < mt; i++) {
                    __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xc[(long)i * pairs + p]);
                    for (int s = 0; s < NB; s++) a[s * mt + i] = _mm512_dpbf16_ps(a[s * mt + i], w[s], xb);
                }
            }
        }
    }
    for (int i = 0; i < NB * mt; i++) acc[i] = a[i];
}

#define QCASE(F, m, nb) case 4 * m + nb - 1: qtile_body(F, base, kstride, nkb, xp, pairs, m, nb, acc); break;
#define QTILE_FN(F)                                                                                               \
    static void qtile_##F(const uint8_t *base, long kstride, int nkb, const uint32_t *xp, int pairs, int mt,      \
                          int NB, __m512 *acc) {                                                                  \
        switch (mt * 4 + NB - 1) {                                                                                \
            QCASE(F, 1, 1) QCASE(F, 1, 2) QCASE(F, 1, 4) QCASE(F, 2, 1) QCASE(F, 2, 2) QCASE(F, 2, 4)             \
            QCASE(F, 3, 1) QCASE(F, 3, 2) QCASE(F, 3, 4) QCASE(F, 4, 1) QCASE(F, 4, 2) QCASE(F, 4, 4)             \
            QCASE(F, 5, 1) QCASE(F, 5, 2) QCASE(F, 6, 1) QCASE(F, 6, 2) QCASE(F, 7, 1) QCASE(F, 7, 2)             \
            QCASE(F, 8, 1) QCASE(F, 8, 2)                                                                         \
        }                                                                                                         \
    }                                                                                                             \
    static void qdecode_##F(const uint8_t *base, long kstride, int nkb, __m512i *out) {                           \
        const int CH = F >= QF_Q4_K ? 8 : 1;                                                                      \
        for (int kb = 0; kb < nkb; kb++) {                                                                        \
            for (int c = 0; c < CH; c++) {                                                                        \
                QState st;                                                                                        \
                q_setup(F, base + kb * kstride, c, &st);                                                          \
                __m512i *o = out + (kb * CH + c) * 16;                                                            \
                QUNROLL_PRAGMA(QUNROLL) for (int p = 0; p < 16; p++) o[p] =                                      \
                    (__m512i)q_decode(F, &st, base + kb * kstride, c, p);                                         \
            }                                                                                                     \
        }                                                                                                         \
    }
QTILE_FN(QF_Q8_0)
QTILE_FN(QF_Q4_0)
QTILE_FN(QF_Q4_1)
QTILE_FN(QF_Q4_K)
QTILE_FN(QF_Q5_K)
QTILE_FN(QF_Q6_K)
#undef QCASE

typedef void (*QTileFn)(const uint8_t *, long, int, const uint32_t *, int, int, int, __m512 *);
typedef void (*QDecodeFn)(const uint8_t *, long, int, __m512i *);
static const QTileFn QTILES[QF_COUNT] = {qtile_QF_Q8_0, qtile_QF_Q4_0, qtile_QF_Q4_1,
                                         qtile_QF_Q4_K, qtile_QF_Q5_K, qtile_QF_Q6_K};
static const QDecodeFn QDECODES[QF_COUNT] = {qdecode_QF_Q8_0, qdecode_QF_Q4_0, qdecode_QF_Q4_1,
                                             qdecode_QF_Q4_K, qdecode_QF_Q5_K, qdecode_QF_Q6_K};

/* linear.c's bf16 tile, over decoded (packed-layout) weights: the same instruction sequence. */
#define TILE_M 14
static inline __attribute__((always_inline)) void btile_body(const uint32_t *xpairs, int pairs, const int mt,
                                                             const __m512i *wb, __m512 *acc, const int NB) {
    const __m512i *wb1 = wb + pairs;
    __m512 a[2 * TILE_M];
    for (int i = 0; i < NB * mt; i++) a[i] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        __m512bh w0 = (__m512bh)_mm512_load_si512((const void *)(wb + p)), w1 = w0;
        if (NB == 2) w1 = (__m512bh)_mm512_load_si512((const void *)(wb1 + p));
        for (int i = 0; i < mt; i++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xpairs[(long)i * pairs + p]);
            a[i] = _mm512_dpbf16_ps(a[i], w0, xb);
            if (NB == 2) a[mt + i] = _mm512_dpbf16_ps(a[mt + i], w1, xb);
        }
    }
    for (int i = 0; i < NB * mt; i++) acc[i] = a[i];
}

static void btile(const uint32_t *xpairs, int pairs, int mt, const __m512i *wb, __m512 *acc, int NB) {
    switch (mt * 2 + NB - 1) {
#define CASE(n)                                                     \
    case 2 * n: btile_body(xpairs, pairs, n, wb, acc, 1); break;    \
    case 2 * n + 1: btile_body(xpairs, pairs, n, wb, acc, 2); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7)
        CASE(8) CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14)
#undef CASE
    }
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* linear.c's store_block with a row stride: bias added in float32, then stored. */
static void qstore_block(const __m512 *acc, int mt, int m0, int n0, int N, long ldy, const uint16_t *bias, void *y,
                         int y_is_f32) {
    int nv = N - n0 < 16 ? N - n0 : 16;
    __mmask16 mask = (__mmask16)((1u << nv) - 1);
    __m512 bv = _mm512_setzero_ps();
    if (bias) {
        for (int j = 0; j < nv; j++) ((float *)&bv)[j] = bf16_to_float(bias[n0 + j]);
    }
    for (int i = 0; i < mt; i++) {
        __m512 r = _mm512_add_ps(acc[i], bv);
        if (y_is_f32) {
            _mm512_mask_storeu_ps((float *)y + (long)(m0 + i) * ldy + n0, mask, r);
        } else {
            __m256i h = (__m256i)_mm512_cvtneps_pbh(r);
            _mm256_mask_storeu_epi16((uint16_t *)y + (long)(m0 + i) * ldy + n0, mask, h);
        }
    }
}

/* Per-thread scratch for decoded groups (64-byte aligned), grown on demand. */
static __thread __m512i *scratch_buf;
static __thread long scratch_len;

static __m512i *scratch(long vectors) {
    if (vectors > scratch_len) {
        free(scratch_buf);
        scratch_buf = aligned_alloc(64, (size_t)vectors * 64);
        scratch_len = scratch_buf ? vectors : 0;
    }
    return scratch_buf;
}
#endif

#if defined(TF_AVX2)
/* AVX2: the weights are decoded, in registers, to gguf-py's float32 values (its operations in
 * its order, as in the AVX512 path; this variant is compiled without contraction) in vectors of
 * 8 elements of a pair (rows 4v..4v+3 of vector v, even and odd input each) and multiplied by x
 * at once: output j of a row sums in two chains, even and odd inputs, one multiply-add per pair
 * in order from zero, whatever the tile (simd.h's packed tile has the same structure). Unlike
 * the AVX512 path the weights are not rounded to bf16 first: on 2 cores that rounding cost as
 * much as the rest of the decoding. Up to PACKED_TILE_M rows decode each quad in registers as
 * they use it; more rows decode each quad once into a float32 scratch that simd.h's packed tile
 * then reads for every tile of rows. */

/* Four rows' values (a float32 [4]) spread to the eight lanes of their elements. */
static inline __m256 dup4(__m128 x) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(x), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
}
static inline __m128 f16x4(const uint8_t *p) { return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)); }
static inline __m128i u8x4(const uint8_t *p) { int v; memcpy(&v, p, 4); return _mm_cvtepu8_epi32(_mm_cvtsi32_si128(v)); }
static inline __m128i i8x4(const uint8_t *p) { int v; memcpy(&v, p, 4); return _mm_cvtepi8_epi32(_mm_cvtsi32_si128(v)); }

/* Per vector v (rows 4v..4v+3): scale s and offset o (Q6_K: the two sub-blocks' scales). */
typedef struct {
    __m256 s[4], o[4];
} QState2;

static inline void q_setup2(int fmt, const uint8_t *blk, int c, QState2 *st) {
    for (int v = 0; v < 4; v++) {
        switch (fmt) {
        case QF_Q8_0:
        case QF_Q4_0:
            st->s[v] = dup4(f16x4(blk + 8 * v));
            break;
        case QF_Q4_1:
            st->s[v] = dup4(f16x4(blk + 8 * v));
            st->o[v] = dup4(f16x4(blk + 32 + 8 * v));
            break;
        case QF_Q4_K:
        case QF_Q5_K: {
            const uint8_t *S = blk + 64 + 4 * v;
            const __m128i c63 = _mm_set1_epi32(63), c15 = _mm_set1_epi32(15), c48 = _mm_set1_epi32(0x30);
            __m128i sc, m;
            if (c < 4) {
                sc = _mm_and_si128(u8x4(S + 16 * c), c63);
                m = _mm_and_si128(u8x4(S + 16 * (4 + c)), c63);
            } else {
                __m128i md = u8x4(S + 16 * (8 + c - 4));
                sc = _mm_or_si128(_mm_and_si128(md, c15), _mm_and_si128(_mm_srli_epi32(u8x4(S + 16 * (c - 4)), 2), c48));
                m = _mm_or_si128(_mm_srli_epi32(md, 4), _mm_and_si128(_mm_srli_epi32(u8x4(S + 16 * c), 2), c48));
            }
            st->s[v] = dup4(_mm_mul_ps(f16x4(blk + 8 * v), _mm_cvtepi32_ps(sc)));
            st->o[v] = dup4(_mm_mul_ps(f16x4(blk + 32 + 8 * v), _mm_cvtepi32_ps(m)));
            break;
        }
        case QF_Q6_K: {
            __m128 d = f16x4(blk + 8 * v);
            st->s[v] = dup4(_mm_mul_ps(d, _mm_cvtepi32_ps(i8x4(blk + 32 + 16 * (2 * c) + 4 * v))));
            st->o[v] = dup4(_mm_mul_ps(d, _mm_cvtepi32_ps(i8x4(blk + 32 + 16 * (2 * c + 1) + 4 * v))));
            break;
        }
        }
    }
}

/* Lanes j of bit (first + j) of a 16-bit mask, as 0 or 1. */
static inline __m256i mask_bits(const uint8_t *p, int first) {
    __m256i m = _mm256_set1_epi32(rd16(p));
    return _mm256_and_si256(_mm256_srlv_epi32(m, _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))),
                            _mm256_set1_epi32(1));
}

/* Pair p of chunk c: its 32 float32 weights (gguf-py's values) in w[0..4). */
static inline __attribute__((always_inline)) void q_decode2(const int fmt, const QState2 *st, const uint8_t *blk, int c,
                                                            int p, __m256 *w) {
    const __m256i c15 = _mm256_set1_epi32(15);
    for (int v = 0; v < 4; v++) {
        const int low = v < 2, at = 8 * (v & 1); /* nibble bytes at..at+7: low halves for v < 2 */
        __m256i L, q;
        switch (fmt) {
        case QF_Q8_0:
            w[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 32 + 32 * p + 8 * v)))), st->s[v]);
            break;
        case QF_Q4_0:
            L = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 32 + 16 * p + at)));
            q = low ? _mm256_and_si256(L, c15) : _mm256_srli_epi32(L, 4);
            w[v] = _mm256_mul_ps(st->s[v], _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(8))));
            break;
        case QF_Q4_1: /* fused: the product is exact (see affine_add) */
            L = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 64 + 16 * p + at)));
            q = low ? _mm256_and_si256(L, c15) : _mm256_srli_epi32(L, 4);
            w[v] = _mm256_fmadd_ps(st->s[v], _mm256_cvtepi32_ps(q), st->o[v]);
            break;
        case QF_Q4_K:
            L = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 256 + 256 * c + 16 * p + at)));
            q = low ? _mm256_and_si256(L, c15) : _mm256_srli_epi32(L, 4);
            w[v] = _mm256_fmsub_ps(st->s[v], _mm256_cvtepi32_ps(q), st->o[v]);
            break;
        case QF_Q5_K: {
            const uint8_t *ch = blk + 256 + 320 * c;
            L = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ch + 16 * p + at)));
            q = low ? _mm256_and_si256(L, c15) : _mm256_srli_epi32(L, 4);
            q = _mm256_or_si256(q, _mm256_slli_epi32(mask_bits(ch + 256 + 4 * p + (low ? 0 : 2), at), 4));
            w[v] = _mm256_fmsub_ps(st->s[v], _mm256_cvtepi32_ps(q), st->o[v]);
            break;
        }
        case QF_Q6_K: {
            const uint8_t *ch = blk + 288 + 384 * c, *hm = ch + 256 + 8 * p;
            L = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ch + 16 * p + at)));
            q = low ? _mm256_and_si256(L, c15) : _mm256_srli_epi32(L, 4);
            q = _mm256_or_si256(q, _mm256_slli_epi32(mask_bits(hm + (low ? 0 : 2), at), 4));
            q = _mm256_or_si256(q, _mm256_slli_epi32(mask_bits(hm + (low ? 4 : 6), at), 5));
            q = _mm256_sub_epi32(q, _mm256_set1_epi32(32));
            w[v] = _mm256_mul_ps(p < 8 ? st->s[v] : st->o[v], _mm256_cvtepi32_ps(q));
            break;
        }
        }
    }
}

/* mt rows of x (float32 [mt][K]) against the nb (1-4) groups of one quad, decoding in registers:
 * within each K block the groups' blocks follow one another, so the pass reads one sequential
 * stream (one group at a time would read a quarter of every span, four times over). Group s's
 * row i sums into acc[(s * PACKED_TILE_M + i) * 4 ..]. */
static inline __attribute__((always_inline)) void qtile2_body(const int FMT, const uint8_t *base, long kstride,
                                                              int nkb, int nb, const float *x, long K, const int mt,
                                                              __m256 *acc) {
    const int CH = chunks_of(FMT);
    const long kbb = kblock_bytes(FMT);
    for (int i = 0; i < 4 * 4 * PACKED_TILE_M; i++) acc[i] = _mm256_setzero_ps();
    for (int kb = 0; kb < nkb; kb++) {
        for (int c = 0; c < CH; c++) {
            const float *xc = x + (long)(kb * CH + c) * 32;
            for (int s = 0; s < nb; s++) {
                const uint8_t *blk = base + kb * kstride + s * kbb;
                __m256 *as = acc + s * 4 * PACKED_TILE_M, a[4 * PACKED_TILE_M];
                for (int i = 0; i < 4 * mt; i++) a[i] = as[i];
                QState2 st;
                q_setup2(FMT, blk, c, &st);
                for (int p = 0; p < 16; p++) {
                    __m256 w[4];
                    q_decode2(FMT, &st, blk, c, p, w);
                    for (int i = 0; i < mt; i++) {
                        __m256 xp = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(xc + i * K + 2 * p)));
                        for (int v = 0; v < 4; v++) a[4 * i + v] = _mm256_fmadd_ps(w[v], xp, a[4 * i + v]);
                    }
                }
                for (int i = 0; i < 4 * mt; i++) as[i] = a[i];
            }
        }
    }
}

#define QTILE2_FN(F)                                                                                     \
    static void qtile2_##F(const uint8_t *base, long kstride, int nkb, int nb, const float *x, long K,   \
                           int mt, __m256 *acc) {                                                        \
        switch (mt) {                                                                                    \
        case 1: qtile2_body(F, base, kstride, nkb, nb, x, K, 1, acc); break;                             \
        case 2: qtile2_body(F, base, kstride, nkb, nb, x, K, 2, acc); break;                             \
        default: qtile2_body(F, base, kstride, nkb, nb, x, K, 3, acc); break;                            \
        }                                                                                                \
    }
QTILE2_FN(QF_Q8_0)
QTILE2_FN(QF_Q4_0)
QTILE2_FN(QF_Q4_1)
QTILE2_FN(QF_Q4_K)
QTILE2_FN(QF_Q5_K)
QTILE2_FN(QF_Q6_K)
typedef void (*QTile2Fn)(const uint8_t *, long, int, int, const float *, long, int, __m256 *);
static const QTile2Fn QTILES2[QF_COUNT] = {qtile2_QF_Q8_0, qtile2_QF_Q4_0, qtile2_QF_Q4_1,
                                           qtile2_QF_Q4_K, qtile2_QF_Q5_K, qtile2_QF_Q6_K};

/* The nb groups of one quad -> float32 [nb][pairs][32] at out, read in the quad's stream order. */
static inline __attribute__((always_inline)) void qdecode_quad2_body(const int FMT, const uint8_t *base, long kstride,
                                                                     int nkb, int nb, long pairs, float *out) {
    const int CH = chunks_of(FMT);
    const long kbb = kblock_bytes(FMT);
    for (int kb = 0; kb < nkb; kb++) {
        for (int c = 0; c < CH; c++) {
            for (int s = 0; s < nb; s++) {
                const uint8_t *blk = base + kb * kstride + s * kbb;
                QState2 st;
                q_setup2(FMT, blk, c, &st);
                float *o = out + s * pairs * 32 + (long)(kb * CH + c) * 16 * 32;
                for (int p = 0; p < 16; p++) {
                    __m256 w[4];
                    q_decode2(FMT, &st, blk, c, p, w);
                    for (int v = 0; v < 4; v++) _mm256_storeu_ps(o + 32 * p + 8 * v, w[v]);
                }
            }
        }
    }
}

static void qdecode_quad2(int fmt, const uint8_t *base, long kstride, int nkb, int nb, long pairs, float *out) {
    switch (fmt) { /* one body per format, the format's switches folded away */
    case QF_Q8_0: qdecode_quad2_body(QF_Q8_0, base, kstride, nkb, nb, pairs, out); break;
    case QF_Q4_0: qdecode_quad2_body(QF_Q4_0, base, kstride, nkb, nb, pairs, out); break;
    case QF_Q4_1: qdecode_quad2_body(QF_Q4_1, base, kstride, nkb, nb, pairs, out); break;
    case QF_Q4_K: qdecode_quad2_body(QF_Q4_K, base, kstride, nkb, nb, pairs, out); break;
    case QF_Q5_K: qdecode_quad2_body(QF_Q5_K, base, kstride, nkb, nb, pairs, out); break;
    default: qdecode_quad2_body(QF_Q6_K, base, kstride, nkb, nb, pairs, out); break;
    }
}

static int quant_linear_scratch(const uint16_t *x, const uint8_t *packed, int fmt, const uint16_t *bias, void *y,
                                int y_is_f32, long ldy, int M, int N, int K, int n_threads);

/* Up to PACKED_TILE_M rows decode in registers; more take the scratch path below. */
static int quant_linear_avx2(const uint16_t *x, const uint8_t *packed, int fmt, const uint16_t *bias, void *y,
                             int y_is_f32, long ldy, int M, int N, int K, int n_threads) {
    if (M > PACKED_TILE_M) return quant_linear_scratch(x, packed, fmt, bias, y, y_is_f32, ldy, M, N, K, n_threads);
    const int groups = (N + 15) / 16, nkb = K / QF_BLOCK[fmt];
    const long kbb = kblock_bytes(fmt);
    float *xf = widen_rows(x, (long)M * K);
    if (!xf) return -3;
    if (n_threads < 1) n_threads = 1;
    const int quads = (groups + QUAD - 1) / QUAD;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int q = 0; q < quads; q++) {
        const int nb = groups - q * QUAD < QUAD ? groups - q * QUAD : QUAD;
        long kstride;
        const uint8_t *base = group_at(packed, q * QUAD, groups, nkb, kbb, &kstride);
        __m256 acc[4 * 4 * PACKED_TILE_M];
        QTILES2[fmt](base, kstride, nkb, nb, xf, K, M, acc);
        for (int s = 0; s < nb; s++)
            packed_store(acc + s * 4 * PACKED_TILE_M, M, 0, (q * QUAD + s) * 16, N, ldy, bias, y, y_is_f32);
    }
    free(xf);
    return 0;
}

/* Row r of group g, dequantized (bf16 nearest even or float32) into out [K]. */
static void quant_row(const uint8_t *g, long kstride, int fmt, int nkb, int r, void *out, int out_is_f32) {
    const int CH = chunks_of(fmt), e0 = 16 * (r >> 3) + 2 * (r & 7);
    for (int kb = 0; kb < nkb; kb++) {
        const uint8_t *blk = g + kb * kstride;
        for (int c = 0; c < CH; c++) {
            QState2 st;
            q_setup2(fmt, blk, c, &st);
            for (int p = 0; p < 16; p++) {
                __m256 w[4];
                float v[32];
                q_decode2(fmt, &st, blk, c, p, w);
                for (int i = 0; i < 4; i++) _mm256_storeu_ps(v + 8 * i, out_is_f32 ? w[i] : round_bf16x8(w[i]));
                const long k = ((long)(kb * CH + c) * 16 + p) * 2;
                for (int e = 0; e < 2; e++) {
                    if (out_is_f32) {
                        ((float *)out)[k + e] = v[e0 + e];
                    } else {
                        uint32_t bits;
                        memcpy(&bits, v + e0 + e, 4);
                        ((uint16_t *)out)[k + e] = (uint16_t)(bits >> 16);
                    }
                }
            }
        }
    }
}
#endif

#if defined(TF_NEON)
/* NEON: each group of 16 rows is decoded, one weight at a time in portable C, to gguf-py's float32
 * values by the AVX2 path's operations (compiled without contraction; the Q4_1 and K-quant
 * products are exact, so unfused equals fused), into a float32 scratch in the packed layout; the
 * row tiles of simd.h's NEON projections then read it. Results equal the AVX2 kernel's bit for bit.
 * Correctness first: nothing here has been timed on an ARM CPU. */

static inline float f16_value(const uint8_t *p) { /* IEEE half to float32, exactly */
    const uint16_t h = rd16(p);
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t bits;
    if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-08f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Weight of element e (row e / 2, input 2 p + e % 2) of pair p of chunk c of a repacked block. */
static float q_weight(int fmt, const uint8_t *blk, int c, int p, int e) {
    const int r = e / 2, v = e / 8, low = v < 2, byte = 8 * (v & 1) + e % 8, bit = byte;
    switch (fmt) {
    case QF_Q8_0:
        return (float)(int8_t)blk[32 + 32 * p + e] * f16_value(blk + 2 * r);
    case QF_Q4_0: {
        const int L = blk[32 + 16 * p + byte], q = low ? L & 15 : L >> 4;
        return f16_value(blk + 2 * r) * (float)(q - 8);
    }
    case QF_Q4_1: {
        const int L = blk[64 + 16 * p + byte], q = low ? L & 15 : L >> 4;
        return f16_value(blk + 2 * r) * (float)q + f16_value(blk + 32 + 2 * r);
    }
    case QF_Q4_K:
    case QF_Q5_K: {
        const uint8_t *S = blk + 64 + r;
        int sc, m;
        if (c < 4) {
            sc = S[16 * c] & 63;
            m = S[16 * (4 + c)] & 63;
        } else {
            const int md = S[16 * (8 + c - 4)];
            sc = (md & 15) | ((S[16 * (c - 4)] >> 2) & 0x30);
            m = (md >> 4) | ((S[16 * c] >> 2) & 0x30);
        }
        const float scale = f16_value(blk + 2 * r) * (float)sc, offset = f16_value(blk + 32 + 2 * r) * (float)m;
        int q;
        if (fmt == QF_Q4_K) {
            const int L = blk[256 + 256 * c + 16 * p + byte];
            q = low ? L & 15 : L >> 4;
        } else {
            const uint8_t *ch = blk + 256 + 320 * c;
            const int L = ch[16 * p + byte];
            q = (low ? L & 15 : L >> 4) | (((rd16(ch + 256 + 4 * p + (low ? 0 : 2)) >> bit) & 1) << 4);
        }
        return scale * (float)q - offset;
    }
    default: { /* Q6_K */
        const uint8_t *ch = blk + 288 + 384 * c, *hm = ch + 256 + 8 * p;
        const int L = ch[16 * p + byte];
        int q = (low ? L & 15 : L >> 4) | (((rd16(hm + (low ? 0 : 2)) >> bit) & 1) << 4) |
                (((rd16(hm + (low ? 4 : 6)) >> bit) & 1) << 5);
        const float scale = f16_value(blk + 2 * r) * (float)(int8_t)blk[32 + 16 * (2 * c + (p >= 8)) + r];
        return scale * (float)(q - 32);
    }
    }
}

/* Group g's weights -> float32 [pairs][32] (the packed layout). */
static void q_decode_group(int fmt, const uint8_t *g, long kstride, int nkb, float *out) {
    const int CH = chunks_of(fmt);
    for (int kb = 0; kb < nkb; kb++)
        for (int c = 0; c < CH; c++)
            for (int p = 0; p < 16; p++) {
                float *o = out + ((long)(kb * CH + c) * 16 + p) * 32;
                for (int e = 0; e < 32; e++) o[e] = q_weight(fmt, g + kb * kstride, c, p, e);
            }
}

/* The nb groups of one quad -> float32 [nb][pairs][32] at out. */
static void qdecode_quad2(int fmt, const uint8_t *base, long kstride, int nkb, int nb, long pairs, float *out) {
    for (int s = 0; s < nb; s++) q_decode_group(fmt, base + s * kblock_bytes(fmt), kstride, nkb, out + s * pairs * 32);
}

/* Row r of group g, dequantized (bf16 nearest even or float32) into out [K]. */
static void quant_row(const uint8_t *g, long kstride, int fmt, int nkb, int r, void *out, int out_is_f32) {
    const int CH = chunks_of(fmt);
    for (int kb = 0; kb < nkb; kb++)
        for (int c = 0; c < CH; c++)
            for (int p = 0; p < 16; p++)
                for (int e = 0; e < 2; e++) {
                    const long k = ((long)(kb * CH + c) * 16 + p) * 2 + e;
                    const float f = q_weight(fmt, g + kb * kstride, c, p, 2 * r + e);
                    if (out_is_f32)
                        ((float *)out)[k] = f;
                    else
                        ((uint16_t *)out)[k] = bf16_nearest_even(f);
                }
}
#endif

#if defined(TF_AVX2) || defined(TF_NEON)
/* More rows than a register tile (AVX2), or any rows (NEON): each quad is decoded once into a kept
 * per-thread float32 scratch (qdecode_quad2, gguf-py's values), then every row tile reads it. */
static int quant_linear_scratch(const uint16_t *x, const uint8_t *packed, int fmt, const uint16_t *bias, void *y,
                                int y_is_f32, long ldy, int M, int N, int K, int n_threads) {
    const int pairs = K / 2, groups = (N + 15) / 16, nkb = K / QF_BLOCK[fmt];
    const long kbb = kblock_bytes(fmt);
    float *xf = widen_rows(x, (long)M * K);
    if (!xf) return -3;
    int failed = 0;
    if (n_threads < 1) n_threads = 1;
    const int quads = (groups + QUAD - 1) / QUAD;
#pragma omp parallel num_threads(n_threads)
    {
        float *w = float_scratch((long)QUAD * pairs * 32);
        const int tiles = (M + PACKED_TILE_M - 1) / PACKED_TILE_M; /* near-equal heights (linear.c) */
        if (!w) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int q = 0; q < quads; q++) {
            if (!w) continue;
            const int nb = groups - q * QUAD < QUAD ? groups - q * QUAD : QUAD;
            long kstride;
            const uint8_t *base = group_at(packed, q * QUAD, groups, nkb, kbb, &kstride);
            PackedAcc acc[PACKED_ACCS * PACKED_TILE_M];
            qdecode_quad2(fmt, base, kstride, nkb, nb, pairs, w);
            for (int s = 0; s < nb; s++) {
                for (int t = 0; t < tiles; t++) {
                    const int m0 = (int)((long)t * M / tiles), mt = (int)((long)(t + 1) * M / tiles) - m0;
                    packed_tile_any(xf + (long)m0 * K, K, w + (long)s * pairs * 32, pairs, mt, acc, 1);
                    packed_store(acc, mt, m0, (q * QUAD + s) * 16, N, ldy, bias, y, y_is_f32);
                }
            }
        }
    }
    free(xf);
    return failed ? -3 : 0;
}
#endif

/* Rows at or below this count decode in registers; more rows decode each group once into scratch. */
#ifndef REGISTER_MAX_ROWS
#define REGISTER_MAX_ROWS 8
#endif
/* Rows up to this count take whole quads (four chains) per pass; more take pairs of groups. */
#ifndef QUAD_MAX_ROWS
#define QUAD_MAX_ROWS 4
#endif

/* x [M][K] bf16; packed: tf_quant_repack's groups; bias [N] bf16 or NULL; y row i at y + i * ldy
 * (elements), bf16 (y_is_f32 = 0) or float32. Returns 0; -1 without AVX512-BF16, AVX2 or NEON; -2 for a bad
 * format or K; -3 when scratch could not be allocated. */
int tf_quant_linear(const uint16_t *x, const uint8_t *packed, int fmt, const uint16_t *bias, void *y, int y_is_f32,
                    long ldy, int M, int N, int K, int n_threads) {
#if defined(__AVX512BF16__)
    if (!tf_quant_format_ok(fmt, K)) return -2;
    const int pairs = K / 2, groups = (N + 15) / 16, nkb = K / QF_BLOCK[fmt];
    const long kbb = kblock_bytes(fmt);
    const uint32_t *xp0 = (const uint32_t *)x;
    const int npairs = (groups + 1) / 2; /* work is divided in pairs of groups (never straddling a quad) */
    int failed = 0;
    if (n_threads < 1) n_threads = 1;
    if (M <= REGISTER_MAX_ROWS) {
        if (n_threads > npairs) n_threads = npairs; /* work comes in pairs of groups */
        const QTileFn fn = QTILES[fmt];
        const int tiles = (M + QTILE_M - 1) / QTILE_M; /* of near-equal heights */
#pragma omp parallel num_threads(n_threads)
        {
            int t = 0, T = 1;
#ifdef _OPENMP
            t = omp_get_thread_num();
            T = omp_get_num_threads();
#endif
            /* a contiguous run of groups per thread: one stream, balanced to a pair of groups */
            const int r0 = (int)((long)npairs * t / T), r1 = (int)((long)npairs * (t + 1) / T);
            const int g1 = 2 * r1 < groups ? 2 * r1 : groups;
            for (int g = 2 * r0; g < g1;) {
                int nb = g1 - g < 2 ? g1 - g : 2; /* a pair never straddles a quad: g is even */
                if (M <= QUAD_MAX_ROWS && g % QUAD == 0 && g1 - g >= QUAD) nb = QUAD;
                long kstride;
                const uint8_t *base = group_at(packed, g, groups, nkb, kbb, &kstride);
                for (int ti = 0; ti < tiles; ti++) { /* the second tile finds the weights in cache */
                    const int m0 = (int)((long)ti * M / tiles), mt = (int)((long)(ti + 1) * M / tiles) - m0;
                    __m512 acc[4 * QTILE_M];
                    fn(base, kstride, nkb, xp0 + (long)m0 * pairs, pairs, mt, nb, acc);
                    for (int s = 0; s < nb; s++)
                        qstore_block(acc + s * mt, mt, m0, (g + s) * 16, N, ldy, bias, y, y_is_f32);
                }
                g += nb;
            }
        }
        return 0;
    }
    /* decode a pair of groups per item into scratch; run every row tile of its row range over it */
    const int tiles = (M + TILE_M - 1) / TILE_M;
    int chunks = (2 * n_threads + npairs - 1) / npairs; /* split the rows when there are few groups */
    if (chunks > tiles) chunks = tiles;
    if (chunks < 1) chunks = 1;
    const QDecodeFn dec = QDECODES[fmt];
#pragma omp parallel num_threads(n_threads)
    {
        __m512i *w = scratch(2L * pairs);
        if (!w) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static) collapse(2)
        for (int i = 0; i < npairs; i++) {
            for (int ch = 0; ch < chunks; ch++) {
                if (!w) continue;
                const int g = 2 * i, nb = g + 1 < groups ? 2 : 1;
                const int t0 = (int)((long)ch * tiles / chunks), t1 = (int)((long)(ch + 1) * tiles / chunks);
                long kstride;
                const uint8_t *base = group_at(packed, g, groups, nkb, kbb, &kstride);
                for (int s = 0; s < nb; s++) dec(base + s * kbb, kstride, nkb, w + (long)s * pairs);
                for (int t = t0; t < t1; t++) {
                    const int m0 = (int)((long)t * M / tiles), mt = (int)((long)(t + 1) * M / tiles) - m0;
                    const uint32_t *xp = xp0 + (long)m0 * pairs;
                    __m512 acc[2 * TILE_M];
                    btile(xp, pairs, mt, w, acc, nb);
                    for (int s = 0; s < nb; s++)
                        qstore_block(acc + s * mt, mt, m0, (g + s) * 16, N, ldy, bias, y, y_is_f32);
                }
            }
        }
    }
    return failed ? -3 : 0;
#elif defined(TF_AVX2)
    if (!tf_quant_format_ok(fmt, K)) return -2;
    return quant_linear_avx2(x, packed, fmt, bias, y, y_is_f32, ldy, M, N, K, n_threads);
#elif defined(TF_NEON)
    if (!tf_quant_format_ok(fmt, K)) return -2;
    return quant_linear_scratch(x, packed, fmt, bias, y, y_is_f32, ldy, M, N, K, n_threads);
#else
    (void)x; (void)packed; (void)fmt; (void)bias; (void)y; (void)y_is_f32; (void)ldy; (void)M; (void)N; (void)K;
    (void)n_threads;
    return -1;
#endif
}

/* Rows ids[0..n) of the repacked matrix, dequantized (bf16 RNE or float32) into out [n][K].
 * Each row's values are exactly the kernel's (and gguf-py's) float32 weights. */
int tf_quant_rows(const uint8_t *packed, int fmt, int N, int K, const int64_t *ids, int n, void *out, int out_is_f32) {
#if defined(__AVX512BF16__)
    if (!tf_quant_format_ok(fmt, K)) return -2;
    const int nkb = K / QF_BLOCK[fmt], CH = chunks_of(fmt);
    const long kbb = kblock_bytes(fmt);
    const int groups = (N + 15) / 16;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= N) return -4;
    }
#pragma omp parallel for schedule(static) if (n > 8)
    for (int i = 0; i < n; i++) {
        const int row = (int)ids[i], r = row & 15;
        long kstride;
        const uint8_t *g = group_at(packed, row >> 4, groups, nkb, kbb, &kstride);
        const int e0 = 16 * (r >> 3) + 2 * (r & 7); /* its elements e0, e0 + 1 in every pair */
        for (int kb = 0; kb < nkb; kb++) {
            for (int c = 0; c < CH; c++) {
                for (int p = 0; p < 16; p++) {
                    QState st;
                    __m512 b = _mm512_setzero_ps(), a = b;
                    float v[32];
                    const uint8_t *blk = g + kb * kstride;
                    switch (fmt) {
#define ROWCASE(F) case F: q_setup(F, blk, c, &st); q_decode_f32(F, &st, blk, c, p, &b, &a); break;
                    ROWCASE(QF_Q8_0) ROWCASE(QF_Q4_0) ROWCASE(QF_Q4_1) ROWCASE(QF_Q4_K) ROWCASE(QF_Q5_K)
                    ROWCASE(QF_Q6_K)
#undef ROWCASE
                    }
                    _mm512_storeu_ps(v, b);
                    _mm512_storeu_ps(v + 16, a);
                    const long k = ((long)(kb * CH + c) * 16 + p) * 2;
                    if (out_is_f32) {
                        float *o = (float *)out + (long)i * K + k;
                        o[0] = v[e0];
                        o[1] = v[e0 + 1];
                    } else {
                        uint16_t h[32];
                        _mm512_storeu_si512(h, (__m512i)_mm512_cvtne2ps_pbh(a, b));
                        uint16_t *o = (uint16_t *)out + (long)i * K + k;
                        o[0] = h[e0];
                        o[1] = h[e0 + 1];
                    }
                }
            }
        }
    }
    return 0;
#elif defined(TF_AVX2) || defined(TF_NEON)
    if (!tf_quant_format_ok(fmt, K)) return -2;
    const int nkb = K / QF_BLOCK[fmt], groups = (N + 15) / 16;
    const long kbb = kblock_bytes(fmt), elt = out_is_f32 ? 4 : 2;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= N) return -4;
    }
#pragma omp parallel for schedule(static) if (n > 8)
    for (int i = 0; i < n; i++) {
        long kstride;
        const uint8_t *g = group_at(packed, (int)(ids[i] >> 4), groups, nkb, kbb, &kstride);
        quant_row(g, kstride, fmt, nkb, (int)(ids[i] & 15), (char *)out + (long)i * K * elt, out_is_f32);
    }
    return 0;
#else
    (void)packed; (void)fmt; (void)N; (void)K; (void)ids; (void)n; (void)out; (void)out_is_f32;
    return -1;
#endif
}

int tf_has_quant_linear(void) {
#if defined(__AVX512BF16__) || defined(TF_AVX2) || defined(TF_NEON)
    return 1;
#else
    return 0;
#endif
}
