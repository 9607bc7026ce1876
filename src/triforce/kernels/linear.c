/* y = x W^T (+ b) for bf16 weights, with few rows of x (decoding, verification) or many (prefill).
 *
 * Why: PyTorch's CPU bf16 matrix-vector path reaches well under half the memory bandwidth here,
 * and a decoding step of a small model is nothing but matrix-vector products. Weights are
 * packed once, at load time, into blocks of 16 output rows laid out as [K/2][16][2]: one 64-byte
 * vector holds a pair of input dimensions for 16 outputs, so y[m, n..n+16] accumulates with one
 * pair-dot-product per vector (AVX512-BF16), the weights stream strictly sequentially, and no
 * horizontal sums are needed. Rows of x are taken in tiles so each weight block is read from
 * memory once per tile (once in total for up to TILE_M rows).
 *
 * On AVX2 (no bf16 dot products) the same packed weights are widened to float32 in registers and
 * summed with multiply-adds in two chains per output (see simd.h's packed_tile_avx2); each block
 * is taken by one thread for all rows, in tiles of up to three rows, so it is read from memory
 * once and from cache for the other tiles (NEON: the same, four lanes wide). Tiles are of
 * near-equal heights: a 1-row tile's four multiply-add chains wait on each other's latency, so
 * 7 rows run as 3 + 2 + 2, not 3 + 3 + 1.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include "simd.h"
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define TF_AMX 1
#endif

/* Rows of x per tile: two blocks' 2 x 14 accumulators, their 2 weight vectors and a broadcast
 * fit the 32 vector registers. */
#define TILE_M 14
/* Tiles of at least this many rows take two adjacent 16-output blocks per pass over K: each
 * broadcast of an x pair then feeds two multiply-adds, and the broadcasts, not the multiply-adds,
 * were what limited a 7-14 row tile. */
#define TWO_BLOCK_MIN_ROWS 5
/* Weight vectors prefetched ahead (1 KiB). With a few rows of x the multiply-adds between loads
 * leave the hardware prefetcher too few misses in flight to stream from memory; a single row
 * streams faster without it. */
#define PREFETCH_VECTORS 16
#define PREFETCH_MIN_ROWS 3

/* Pack W [N][K] (bf16, row-major) into [ceil(N/16)][K/2][16][2]; rows past N are zero. K even. */
void tf_pack_weight(const uint16_t *w, uint16_t *packed, int N, int K) {
    int blocks = (N + 15) / 16, pairs = K / 2;
#pragma omp parallel for
    for (int b = 0; b < blocks; b++) {
        uint16_t *dst = packed + (long)b * pairs * 32;
        for (int p = 0; p < pairs; p++) {
            for (int j = 0; j < 16; j++) {
                int n = b * 16 + j;
                dst[(long)p * 32 + 2 * j] = n < N ? w[(long)n * K + 2 * p] : 0;
                dst[(long)p * 32 + 2 * j + 1] = n < N ? w[(long)n * K + 2 * p + 1] : 0;
            }
        }
    }
}

int tf_has_bf16_linear(void) {
#if defined(__AVX512BF16__) || defined(TF_AVX2) || defined(TF_NEON)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__)
static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* NaN */
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* One tile: mt rows of x against NB (1 or 2) adjacent 16-output blocks; block s's row i sums
 * into acc[s * mt + i]. Each output's sum runs over the pairs in the same order whatever the
 * tiling, so a row's result does not depend on the other rows (batch equals alone). */
static inline __attribute__((always_inline)) void block_tile(const uint32_t *xpairs, int pairs, const int mt,
                                                              const __m512i *wb, __m512 *acc, const int NB) {
    const __m512i *wb1 = wb + pairs; /* the next block */
    __m512 a[2 * TILE_M]; /* local, so the compiler keeps it in registers (acc may alias) */
    for (int i = 0; i < NB * mt; i++) a[i] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        if (mt >= PREFETCH_MIN_ROWS) {
            _mm_prefetch((const char *)(wb + p + PREFETCH_VECTORS), _MM_HINT_T0);
            if (NB == 2) _mm_prefetch((const char *)(wb1 + p + PREFETCH_VECTORS), _MM_HINT_T0);
        }
        __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(wb + p)), w1 = w0;
        if (NB == 2) w1 = (__m512bh)_mm512_loadu_si512((const void *)(wb1 + p));
        for (int i = 0; i < mt; i++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xpairs[(long)i * pairs + p]);
            a[i] = _mm512_dpbf16_ps(a[i], w0, xb);
            if (NB == 2) a[mt + i] = _mm512_dpbf16_ps(a[mt + i], w1, xb);
        }
    }
    for (int i = 0; i < NB * mt; i++) acc[i] = a[i];
}

static void tile(const uint32_t *xpairs, int pairs, int mt, const __m512i *wb, __m512 *acc, int NB) {
    switch (mt * 2 + NB - 1) { /* constant trip counts keep the accumulators in registers */
#define CASE(n)                                                    \
    case 2 * n: block_tile(xpairs, pairs, n, wb, acc, 1); break;   \
    case 2 * n + 1: block_tile(xpairs, pairs, n, wb, acc, 2); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7)
        CASE(8) CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14)
#undef CASE
    }
}

/* Adds the bias and writes rows m0..m0+mt of outputs n0..n0+16 (clipped to N). */
static void store_block(const __m512 *acc, int mt, int m0, int n0, int N, const uint16_t *bias, void *y,
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
            _mm512_mask_storeu_ps((float *)y + (long)(m0 + i) * N + n0, mask, r);
        } else {
            __m256i h = (__m256i)_mm512_cvtneps_pbh(r);
            _mm256_mask_storeu_epi16((uint16_t *)y + (long)(m0 + i) * N + n0, mask, h);
        }
    }
}
#endif

#if defined(TF_AMX) && defined(__AVX512BF16__)
/* AMX path (CPUs with tile registers). The packed layout is already the tile layout AMX wants
 * for its second operand: 16 consecutive pairs of one 16-output block are a 16 x 64-byte tile.
 * Why: a verification or retrieval pass sends 12-28 rows through every projection, and there the
 * AVX512 kernel is bound by multiply-adds (about half the weights' streaming speed at 28 rows);
 * one tile instruction does 16 x 16 x 32 of them. Each output element still sums the K
 * dimension in 32-wide steps in the same order whatever M is, so a row's result does not depend
 * on its batch mates; the path is chosen by shape (K % 32) alone, never by M. */
#define AMX_BLOCKS 3 /* 16-output blocks per pass: 3 accumulators + 1 x tile + 3 weight tiles */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Linux hands out the tile state only on request, once per process. */
static int amx_permitted(void) {
    static volatile int state = 0; /* 0 unknown, 1 granted, -1 refused */
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state == 1;
}

/* tiles 0-2: accumulators (mt x 16 floats); 3: mt rows of x (32 bf16); 4-6: weights (16 pairs x 16) */
static void amx_configure(int mt) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 4; t++) {
        cfg.rows[t] = (uint8_t)mt;
        cfg.colsb[t] = 64;
    }
    for (int t = 4; t < 7; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* mt rows of x (row stride K) against nb (1-3) adjacent blocks starting at wb; out[s] gets
 * block s's mt x 16 results. */
static void amx_group(const uint16_t *x, int K, const uint16_t *wb, long block_elems, int nb, __m512 out[][16]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int k = 0; k < K; k += 32) {
        const uint16_t *w = wb + (long)k * 16; /* pair k/2 of block 0: 32 bf16 per pair */
        _tile_loadd(3, x + k, K * 2);
        _tile_loadd(4, w, 64);
        if (nb > 1) _tile_loadd(5, w + block_elems, 64);
        if (nb > 2) _tile_loadd(6, w + 2 * block_elems, 64);
        _tile_dpbf16ps(0, 3, 4);
        if (nb > 1) _tile_dpbf16ps(1, 3, 5);
        if (nb > 2) _tile_dpbf16ps(2, 3, 6);
    }
    _tile_stored(0, out[0], 64);
    if (nb > 1) _tile_stored(1, out[1], 64);
    if (nb > 2) _tile_stored(2, out[2], 64);
}

static void linear_amx(const uint16_t *x, const uint16_t *packed, const uint16_t *bias, void *y, int y_is_f32,
                       int M, int N, int K, int n_threads) {
    const int blocks = (N + 15) / 16, groups = (blocks + AMX_BLOCKS - 1) / AMX_BLOCKS;
    const int tiles = (M + 15) / 16; /* of near-equal heights (at most two distinct) */
    const long block_elems = (long)K * 16;
#pragma omp parallel num_threads(n_threads)
    {
        int configured = 0;
#pragma omp for schedule(static) collapse(2)
        for (int g = 0; g < groups; g++) {
            for (int t = 0; t < tiles; t++) {
                const int m0 = (int)((long)t * M / tiles), mt = (int)((long)(t + 1) * M / tiles) - m0;
                const int b = AMX_BLOCKS * g, nb = blocks - b < AMX_BLOCKS ? blocks - b : AMX_BLOCKS;
                if (configured != mt) { /* per thread: other libraries' tile code may have run here */
                    amx_configure(mt);
                    configured = mt;
                }
                __m512 out[AMX_BLOCKS][16];
                amx_group(x + (long)m0 * K, K, packed + b * block_elems, block_elems, nb, out);
                for (int s = 0; s < nb; s++) store_block(out[s], mt, m0, (b + s) * 16, N, bias, y, y_is_f32);
            }
        }
        if (configured) _tile_release();
    }
}
#endif

/* x [M][K] bf16, packed weights, bias [N] bf16 or NULL; y [M][N] written as bf16 (y_is_f32 = 0)
 * or float32. Returns 0, -1 when this build has none of AVX512-BF16, AVX2 and NEON, -3 when out of memory. */
int tf_linear_bf16(const uint16_t *x, const uint16_t *packed, const uint16_t *bias, void *y, int y_is_f32, int M,
                   int N, int K, int n_threads) {
#if defined(__AVX512BF16__)
    const int pairs = K / 2, blocks = (N + 15) / 16, groups = (blocks + 1) / 2;
    const int tiles = (M + TILE_M - 1) / TILE_M; /* of near-equal heights, so no tile is short */
    if (n_threads < 1) n_threads = 1;
#if defined(TF_AMX)
    if (K % 32 == 0 && amx_permitted()) {
        linear_amx(x, packed, bias, y, y_is_f32, M, N, K, n_threads);
        return 0;
    }
#endif
#pragma omp parallel for num_threads(n_threads) schedule(static) collapse(2)
    for (int g = 0; g < groups; g++) {
        for (int t = 0; t < tiles; t++) {
            const int b = 2 * g, nb = b + 1 < blocks ? 2 : 1;
            const int m0 = (int)((long)t * M / tiles), mt = (int)((long)(t + 1) * M / tiles) - m0;
            const __m512i *wb = (const __m512i *)(packed + (long)b * pairs * 32);
            const uint32_t *xp = (const uint32_t *)(x + (long)m0 * K);
            __m512 acc[2 * TILE_M];
            if (nb == 2 && mt >= TWO_BLOCK_MIN_ROWS) {
                tile(xp, pairs, mt, wb, acc, 2);
                store_block(acc, mt, m0, b * 16, N, bias, y, y_is_f32);
                store_block(acc + mt, mt, m0, (b + 1) * 16, N, bias, y, y_is_f32);
            } else {
                for (int s = 0; s < nb; s++) { /* in order: the weights stream forwards */
                    tile(xp, pairs, mt, wb + (long)s * pairs, acc, 1);
                    store_block(acc, mt, m0, (b + s) * 16, N, bias, y, y_is_f32);
                }
            }
        }
    }
    (void)float_to_bf16;
    return 0;
#elif defined(TF_AVX2) || defined(TF_NEON)
    const int pairs = K / 2, blocks = (N + 15) / 16;
    float *xf = widen_rows(x, (long)M * K);
    if (!xf) return -3;
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        const uint16_t *wb = packed + (long)b * pairs * 32;
        const int tiles = (M + PACKED_TILE_M - 1) / PACKED_TILE_M;
        for (int t = 0; t < tiles; t++) {
            const int m0 = (int)((long)t * M / tiles), mt = (int)((long)(t + 1) * M / tiles) - m0;
            PackedAcc acc[PACKED_ACCS * PACKED_TILE_M];
            packed_tile_any(xf + (long)m0 * K, K, wb, pairs, mt, acc, 0);
            packed_store(acc, mt, m0, b * 16, N, N, bias, y, y_is_f32);
        }
    }
    free(xf);
    return 0;
#else
    (void)x; (void)packed; (void)bias; (void)y; (void)y_is_f32; (void)M; (void)N; (void)K; (void)n_threads;
    return -1;
#endif
}

/* The machine's multiply-add ceiling for the kernels' own instruction, for `triforce bench kernels`:
 * each thread runs `iterations` rounds of NC independent chains of it, in the form the kernels use
 * (a weight register times an input broadcast from memory): AVX512-BF16's pair dot product (32
 * multiply-adds), AVX2's float32 multiply-add (8), NEON's (4); tf_mac_lanes says which. With fewer
 * chains than the instruction's latency in cycles the units wait on it; the sweep over NC shows how
 * many a loop needs. Returns a sum of the results (so none is optimised away), or -1 without
 * kernels. */
#if defined(__AVX512BF16__)
#define MAC_LANES 32
static inline __attribute__((always_inline)) float dot_chains(long iterations, const int NC) {
    uint32_t pairs[256 * 8];
    for (int i = 0; i < 256 * 8; i++) pairs[i] = 0x3c003c00u + (uint32_t)(i & 7);
    __m512 acc[16];
    for (int i = 0; i < NC; i++) acc[i] = _mm512_set1_ps((float)i);
    const __m512bh w0 = (__m512bh)_mm512_set1_epi32(0x3f803f80), w1 = (__m512bh)_mm512_set1_epi32(0x3f813f80);
    for (long it = 0; it < iterations; it++) {
        const uint32_t *p = pairs + (it & 255) * 8;
        for (int j = 0; j < NC; j++)
            acc[j] = _mm512_dpbf16_ps(acc[j], j & 1 ? w1 : w0, (__m512bh)_mm512_set1_epi32((int)p[j & 7]));
    }
    float total = 0.0f;
    for (int i = 0; i < NC; i++) total += _mm512_reduce_add_ps(acc[i]);
    return total;
}
#elif defined(TF_AVX2)
#define MAC_LANES 8
/* Named accumulators, not an array: GCC kept an array's chains in memory, storing each one every
 * round. 16 chains do not fit AVX2's 16 registers with the two weights and a broadcast. */
#define MAC_STEP(j) if (NC > j) a##j = _mm256_fmadd_ps((j) & 1 ? w1 : w0, _mm256_broadcast_ss(p + ((j) & 7)), a##j)
static inline __attribute__((always_inline)) float dot_chains(long iterations, const int NC) {
    float xs[256 * 8];
    for (int i = 0; i < 256 * 8; i++) xs[i] = 1e-3f * (float)(i & 7);
    __m256 a0 = _mm256_set1_ps(0.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0,
           a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
    const __m256 w0 = _mm256_set1_ps(0.999f), w1 = _mm256_set1_ps(1.001f);
    for (long it = 0; it < iterations; it++) {
        const float *p = xs + (it & 255) * 8;
        MAC_STEP(0); MAC_STEP(1); MAC_STEP(2); MAC_STEP(3); MAC_STEP(4); MAC_STEP(5); MAC_STEP(6); MAC_STEP(7);
        MAC_STEP(8); MAC_STEP(9); MAC_STEP(10); MAC_STEP(11); MAC_STEP(12); MAC_STEP(13); MAC_STEP(14);
        MAC_STEP(15);
    }
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                   _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    const __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)),
                                   _mm256_add_ps(_mm256_add_ps(a12, a13), _mm256_add_ps(a14, a15)));
    return hsum256(_mm256_add_ps(s, t));
}
#elif defined(TF_NEON)
#define MAC_LANES 4
static inline __attribute__((always_inline)) float dot_chains(long iterations, const int NC) {
    float xs[256 * 8];
    for (int i = 0; i < 256 * 8; i++) xs[i] = 1e-3f * (float)(i & 7);
    float32x4_t acc[16];
    for (int i = 0; i < NC; i++) acc[i] = vdupq_n_f32((float)i);
    const float32x4_t w0 = vdupq_n_f32(0.999f), w1 = vdupq_n_f32(1.001f);
    for (long it = 0; it < iterations; it++) {
        const float *p = xs + (it & 255) * 8;
        for (int j = 0; j < NC; j++) acc[j] = vfmaq_f32(acc[j], j & 1 ? w1 : w0, vld1q_dup_f32(p + (j & 7)));
    }
    float32x4_t sum = acc[0];
    for (int i = 1; i < NC; i++) sum = vaddq_f32(sum, acc[i]);
    return vaddvq_f32(sum);
}
#else
#define MAC_LANES 0
#endif

int tf_mac_lanes(void) { return MAC_LANES; }

float tf_mac_peak(long iterations, int n_threads, int chains) {
#if MAC_LANES
    float total = 0.0f;
#pragma omp parallel num_threads(n_threads) reduction(+ : total)
    switch (chains) {
    case 2: total += dot_chains(iterations, 2); break;
    case 4: total += dot_chains(iterations, 4); break;
    case 6: total += dot_chains(iterations, 6); break;
    case 8: total += dot_chains(iterations, 8); break;
    case 12: total += dot_chains(iterations, 12); break;
    default: total += dot_chains(iterations, 16); break;
    }
    return total;
#else
    (void)iterations;
    (void)n_threads;
    (void)chains;
    return -1.0f;
#endif
}
