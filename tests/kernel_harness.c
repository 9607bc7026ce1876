/* Runs one kernel call from a file, for tests of builds this machine cannot load into Python (the
 * NEON kernels, cross-compiled and run under qemu-user).
 *
 *   kernel_harness OP IN OUT
 *
 * IN holds an int32 header (OP's parameters) and then its inputs, raw and back to back; OUT gets the
 * output, raw. OP:
 *   linear     M N K has_bias y_is_f32 threads | x bf16 [M][K], W bf16 [N][K], bias bf16 [N] | y [M][N]
 *   attention  T Hq Hkv D kv_bf16 out_bf16 cap num_rows first_row n_chunks chunk_size dense_start threads
 *              scale (float32 bits) | q f32 [T][Hq][D], k, v [Hkv][cap][D], chunks int32 [Hkv][n_chunks] | out [T][Hq][D]
 *   quant      fmt M N K has_bias y_is_f32 threads | GGUF blocks [N][K / block * bytes], x bf16 [M][K],
 *              bias bf16 [N] | y [M][N]
 *   quant_rows fmt N K n out_is_f32 | GGUF blocks, ids int64 [n] | rows [n][K]
 *   isa        (no input) | int32: whether the bf16 and the block-format projections run natively
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tf_pack_weight(const uint16_t *w, uint16_t *packed, int N, int K);
int tf_linear_bf16(const uint16_t *x, const uint16_t *packed, const uint16_t *bias, void *y, int y_is_f32, int M,
                   int N, int K, int n_threads);
int tf_has_bf16_linear(void);
void tf_quant_repack(const uint8_t *src, uint8_t *dst, int fmt, int N, int K);
int tf_quant_linear(const uint16_t *x, const uint8_t *packed, int fmt, const uint16_t *bias, void *y, int y_is_f32,
                    long ldy, int M, int N, int K, int n_threads);
int tf_quant_rows(const uint8_t *packed, int fmt, int N, int K, const int64_t *ids, int n, void *out, int out_is_f32);
int tf_has_quant_linear(void);
int tf_attention(const float *q, const void *k, const void *v, int kv_is_bf16, long head_stride, void *out_ptr,
                 int out_is_bf16, int T, int Hq, int Hkv, int D, const int32_t *chunks, int n_chunks, int chunk_size,
                 int dense_start, int num_rows, int first_row, float scale, int n_threads);

static char *data;
static long size, at;

static void *take(long bytes) {
    if (at + bytes > size) {
        fprintf(stderr, "input too short: need %ld bytes at %ld of %ld\n", bytes, at, size);
        exit(2);
    }
    void *p = data + at;
    at += bytes;
    return p;
}

static void put(const char *path, const void *p, long bytes) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, (size_t)bytes, f) != (size_t)bytes) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
    fclose(f);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: kernel_harness OP IN OUT\n");
        return 2;
    }
    if (!strcmp(argv[1], "isa")) {
        int32_t native[2] = {tf_has_bf16_linear(), tf_has_quant_linear()};
        put(argv[3], native, 8);
        return 0;
    }
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        fprintf(stderr, "cannot read %s\n", argv[2]);
        return 2;
    }
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = malloc((size_t)size + 1);
    if (!data || fread(data, 1, (size_t)size, f) != (size_t)size) return 2;
    fclose(f);
    if (!strcmp(argv[1], "linear")) {
        const int32_t *h = take(6 * 4);
        const int M = h[0], N = h[1], K = h[2], has_bias = h[3], y_is_f32 = h[4], threads = h[5];
        const uint16_t *x = take(2L * M * K), *w = take(2L * N * K);
        const uint16_t *bias = has_bias ? take(2L * N) : NULL;
        uint16_t *packed = calloc((size_t)((N + 15) / 16) * 16 * K, 2);
        const long out_bytes = (long)M * N * (y_is_f32 ? 4 : 2);
        void *y = malloc((size_t)out_bytes);
        tf_pack_weight(w, packed, N, K);
        if (tf_linear_bf16(x, packed, bias, y, y_is_f32, M, N, K, threads) != 0) {
            fprintf(stderr, "tf_linear_bf16 failed\n");
            return 1;
        }
        put(argv[3], y, out_bytes);
        return 0;
    }
    if (!strcmp(argv[1], "quant") || !strcmp(argv[1], "quant_rows")) {
        static const int block[] = {32, 32, 32, 256, 256, 256}, bytes[] = {34, 18, 20, 144, 176, 210};
        const int rows_op = !strcmp(argv[1], "quant_rows");
        const int32_t *h = take((rows_op ? 5 : 7) * 4);
        const int fmt = h[0];
        if (fmt < 0 || fmt > 5) return 2;
        const int M = rows_op ? 0 : h[1], N = h[rows_op ? 1 : 2], K = h[rows_op ? 2 : 3];
        const long row_bytes = (long)K / block[fmt] * bytes[fmt];
        const uint8_t *blocks = take(row_bytes * N);
        uint8_t *packed = calloc((size_t)((N + 15) / 16) * 16 * row_bytes, 1);
        tf_quant_repack(blocks, packed, fmt, N, K);
        if (rows_op) {
            const int n = h[3], f32 = h[4];
            const int64_t *ids = take(8L * n);
            void *out = malloc((size_t)n * K * (f32 ? 4 : 2));
            if (tf_quant_rows(packed, fmt, N, K, ids, n, out, f32) != 0) return 1;
            put(argv[3], out, (long)n * K * (f32 ? 4 : 2));
            return 0;
        }
        const int has_bias = h[4], y_is_f32 = h[5], threads = h[6];
        const uint16_t *x = take(2L * M * K), *bias = has_bias ? take(2L * N) : NULL;
        const long out_bytes = (long)M * N * (y_is_f32 ? 4 : 2);
        void *y = malloc((size_t)out_bytes);
        if (tf_quant_linear(x, packed, fmt, bias, y, y_is_f32, N, M, N, K, threads) != 0) {
            fprintf(stderr, "tf_quant_linear failed\n");
            return 1;
        }
        put(argv[3], y, out_bytes);
        return 0;
    }
    if (!strcmp(argv[1], "attention")) {
        const int32_t *h = take(14 * 4);
        const int T = h[0], Hq = h[1], Hkv = h[2], D = h[3], kv_bf16 = h[4], out_bf16 = h[5], cap = h[6];
        const int num_rows = h[7], first_row = h[8], n_chunks = h[9], chunk_size = h[10], dense_start = h[11];
        const int threads = h[12];
        const long kv_bytes = (long)Hkv * cap * D * (kv_bf16 ? 2 : 4);
        const float *q = take(4L * T * Hq * D);
        const void *k = take(kv_bytes), *v = take(kv_bytes);
        const int32_t *chunks = n_chunks ? take(4L * Hkv * n_chunks) : NULL;
        const long out_bytes = (long)T * Hq * D * (out_bf16 ? 2 : 4);
        void *out = malloc((size_t)out_bytes);
        float scale;
        memcpy(&scale, h + 13, 4);
        if (tf_attention(q, k, v, kv_bf16, (long)cap * D, out, out_bf16, T, Hq, Hkv, D, chunks, n_chunks, chunk_size,
                         dense_start, num_rows, first_row, scale, threads) != 0) {
            fprintf(stderr, "tf_attention failed\n");
            return 1;
        }
        put(argv[3], out, out_bytes);
        return 0;
    }
    fprintf(stderr, "unknown OP %s\n", argv[1]);
    return 2;
}
