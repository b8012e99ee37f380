/* The ports test's driver: every block kernel of src/gemmakit/quant on random blocks and odd shapes.
 *
 * Prints one line per (format, K, N): a digest of the products of 11 activation rows, of the fp32 and bf16
 * dequantized rows and of an RMSNorm. Builds for other CPUs (NEON with and without dotprod under qemu, x86 without
 * OpenMP, clang) must print exactly the lines of the scalar build (GEMMAKIT_SCALAR): tests/ports/run.sh compares
 * them. Inside one build it checks what speculation and batching rely on: a row's result is the same whether it
 * is computed alone or beside others, by one worker or several. Exit status 1 on any mismatch.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, F16 = 1, Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

void qmatmul(const uint8_t *data, long type, long N, long K, long row_bytes, const float *x, long M, float *y,
             void *scratch, int threads);
void dequant_rows(const uint8_t *data, long type, long K, long row_bytes, const int64_t *rows, long n_rows,
                  float *out, int threads);
void dequant_rows_bf16(const uint8_t *data, long type, long K, long row_bytes, long row0, long n_rows,
                       uint16_t *out, int threads);
void rms_norm(const float *x, const float *scale, float *y, long rows, long dim, float eps);
long act_bytes(long M, long K);
const char *kernels_threading(void) __attribute__((weak));  /* weak: the driver also runs older sources */

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next(void) {  /* xorshift64* */
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    return (uint32_t)((rng * 0x2545F4914F6CDD1Dull) >> 32);
}
static float uniform(void) { return (float)(next() >> 8) / 16777216.0f * 2.0f - 1.0f; }  /* [-1, 1) */
static uint16_t f16_bits(int lo_exp, int hi_exp) {  /* a random normal fp16 with exponent field in [lo, hi] */
    const uint32_t e = (uint32_t)lo_exp + next() % (uint32_t)(hi_exp - lo_exp + 1);
    return (uint16_t)(((next() & 1) << 15) | (e << 10) | (next() & 0x3ff));
}

static void block_info(long type, long *values, long *bytes) {
    switch (type) {
        case F32: *values = 1, *bytes = 4; break;
        case F16: case BF16: *values = 1, *bytes = 2; break;
        case Q4_0: *values = 32, *bytes = 18; break;
        case Q5_0: *values = 32, *bytes = 22; break;
        case Q8_0: *values = 32, *bytes = 34; break;
        case Q4_K: *values = 256, *bytes = 144; break;
        case Q5_K: *values = 256, *bytes = 176; break;
        default: *values = 256, *bytes = 210; break;  /* Q6_K */
    }
}

/* Random bytes for each block, with finite scales of plausible size at their places. */
static void fill_block(long type, uint8_t *b, long bytes) {
    for (long i = 0; i < bytes; i++) b[i] = (uint8_t)next();
    uint16_t h;
    switch (type) {
        case F32: { const float f = uniform() * 2.0f; memcpy(b, &f, 4); break; }
        case F16: h = f16_bits(10, 16); memcpy(b, &h, 2); break;
        case BF16: h = (uint16_t)(((next() & 1) << 15) | ((118u + next() % 10) << 7) | (next() & 0x7f)); memcpy(b, &h, 2); break;
        case Q4_0: case Q5_0: case Q8_0: h = f16_bits(5, 12); memcpy(b, &h, 2); break;
        case Q4_K: case Q5_K: h = f16_bits(5, 12); memcpy(b, &h, 2); h = f16_bits(5, 12); memcpy(b + 2, &h, 2); break;
        default: h = f16_bits(5, 12); memcpy(b + 208, &h, 2); break;  /* Q6_K: d last */
    }
}

static uint64_t digest(const void *p, size_t n, uint64_t h) {  /* FNV-1a */
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}

static int failures;

static void check(long type, const char *name, long K, long N) {
    enum { M = 11 };
    long vals, bsz;
    block_info(type, &vals, &bsz);
    const long row_bytes = K / vals * bsz;
    uint8_t *W = malloc(N * row_bytes);
    for (long n = 0; n < N; n++)
        for (long j = 0; j < K / vals; j++) fill_block(type, W + n * row_bytes + j * bsz, bsz);
    float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N), *y1 = malloc(sizeof(float) * N);
    for (long i = 0; i < M * K; i++) x[i] = uniform() * (1.0f + (float)(i % 7));
    for (long i = 0; i < 40 && i < K; i++) x[3 * K + i] = 0.0f;  /* row 3 starts with all-zero units */
    void *scratch = malloc(act_bytes(M, K));
    qmatmul(W, type, N, K, row_bytes, x, M, y, scratch, 3);
    for (long m = 0; m < M; m++)  /* each row alone, one worker: the same bits */
        for (int threads = 1; threads <= 2; threads++) {
            qmatmul(W, type, N, K, row_bytes, x + m * K, 1, y1, scratch, threads);
            if (memcmp(y1, y + m * N, sizeof(float) * N)) {
                printf("FAIL %s K=%ld N=%ld: row %ld alone (threads=%d) differs from the batch\n", name, K, N, m,
                       threads);
                failures++;
            }
        }
    float *d = malloc(sizeof(float) * N * K);
    uint16_t *d16 = malloc(sizeof(uint16_t) * N * K);
    int64_t *rows = malloc(sizeof(int64_t) * N);
    for (long n = 0; n < N; n++) rows[n] = N - 1 - n;
    dequant_rows(W, type, K, row_bytes, rows, N, d, 2);
    dequant_rows_bf16(W, type, K, row_bytes, 0, N, d16, 2);
    float *scale = malloc(sizeof(float) * K), *nrm = malloc(sizeof(float) * M * K);
    for (long i = 0; i < K; i++) scale[i] = 1.0f + uniform();
    rms_norm(x, scale, nrm, M, K, 1e-6f);
    printf("%-5s K=%-5ld N=%-3ld products %016llx dequant %016llx bf16 %016llx norm %016llx\n", name, K, N,
           (unsigned long long)digest(y, sizeof(float) * M * N, 0xcbf29ce484222325ull),
           (unsigned long long)digest(d, sizeof(float) * N * K, 0xcbf29ce484222325ull),
           (unsigned long long)digest(d16, sizeof(uint16_t) * N * K, 0xcbf29ce484222325ull),
           (unsigned long long)digest(nrm, sizeof(float) * M * K, 0xcbf29ce484222325ull));
    free(W), free(x), free(y), free(y1), free(scratch), free(d), free(d16), free(rows), free(scale), free(nrm);
}

int main(void) {
    static const struct { long type; const char *name; long K[4]; } cases[] = {
        {Q4_0, "Q4_0", {32, 160, 640, 1152}}, {Q5_0, "Q5_0", {32, 160, 640, 1152}},
        {Q8_0, "Q8_0", {32, 160, 640, 1152}}, {Q4_K, "Q4_K", {256, 768, 1280, 2304}},
        {Q5_K, "Q5_K", {256, 768, 1280, 2304}}, {Q6_K, "Q6_K", {256, 768, 1280, 2304}},
        {F16, "F16", {40, 100, 640, 1152}}, {BF16, "BF16", {40, 100, 640, 1152}}, {F32, "F32", {40, 100, 640, 1152}},
    };
    static const long Ns[] = {1, 7, 19, 40};
    fprintf(stderr, "threads: %s\n", kernels_threading ? kernels_threading() : "openmp");
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int k = 0; k < 4; k++) check(cases[c].type, cases[c].name, cases[c].K[k], Ns[(c + k) % 4]);
    if (failures) printf("%d FAILURES\n", failures);
    return failures != 0;
}
