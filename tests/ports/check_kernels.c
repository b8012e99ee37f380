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
#include <math.h>

#include "blocks.h"

/* decode.c's layer table and sizes (decode.h once that header exists) */
#if __has_include("decode.h")
#include "decode.h"
#else
typedef struct {
    qmat_t q, k, v, o, gate, up, down;
    const float *attn_norm, *q_norm, *k_norm;
    const float *post_attn_norm, *pre_ffw_norm, *post_ffw_norm;
    const float *inv_freq;
    float *k_cache, *v_cache;
    int64_t *slot_pos;
    long slots, ring, window;
} layer_t;

typedef struct {
    long dim, n_heads, n_kv, head_dim, inter;
    float eps, scaling, softcap;
} dims_t;
#endif
void rms_norm(const float *x, const float *scale, float *y, long rows, long dim, float eps);
void decode_layers(const layer_t *layers, long n_layers, const dims_t *dm, float *x, long M, long T,
                   const int64_t *pos, const int64_t *cols, long end, int threads);

enum { F32 = 0, F16 = 1, Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

void qmatmul(const uint8_t *data, long type, long N, long K, long row_bytes, const float *x, long M, float *y,
             void *scratch, int threads);
void dequant_rows(const uint8_t *data, long type, long K, long row_bytes, const int64_t *rows, long n_rows,
                  float *out, int threads);
void dequant_rows_bf16(const uint8_t *data, long type, long K, long row_bytes, long row0, long n_rows,
                       uint16_t *out, int threads);

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

/* A random matrix of `type` (rows x cols) for the decode check. */
static qmat_t random_matrix(long type, long rows, long cols) {
    long vals, bsz;
    block_info(type, &vals, &bsz);
    const long row_bytes = cols / vals * bsz;
    uint8_t *w = malloc(rows * row_bytes);
    for (long j = 0; j < rows * (cols / vals); j++) fill_block(type, w + j * bsz, bsz);
    return (qmat_t){w, type, rows, cols, row_bytes};
}

static float *random_floats(long n, float lo, float hi) {
    float *v = malloc(sizeof(float) * n);
    for (long i = 0; i < n; i++) v[i] = lo + (hi - lo) * (uniform() + 1.0f) / 2.0f;
    return v;
}

/* Two layers (global with QK-norm, then sliding with soft-cap off), a prompt of 3 tokens then one step; returns
 * the hidden states after both calls, [4][D]. */
static float *decode_run(int threads, uint64_t seed) {
    enum { D = 256, N = 4, KV = 2, H = 64, I = 512, S = 16, L = 2 };
    rng = seed;
    const dims_t dm = {D, N, KV, H, I, 1e-6f, 0.125f, 0.0f};
    layer_t layers[L];
    for (int l = 0; l < L; l++) {
        layer_t *y = layers + l;
        y->q = random_matrix(Q8_0, N * H, D), y->k = random_matrix(Q4_0, KV * H, D);
        y->v = random_matrix(Q5_0, KV * H, D), y->o = random_matrix(Q8_0, D, N * H);
        y->gate = random_matrix(Q4_K, I, D), y->up = random_matrix(Q5_K, I, D), y->down = random_matrix(Q6_K, D, I);
        y->attn_norm = random_floats(D, 0.5f, 1.5f), y->q_norm = random_floats(H, 0.5f, 1.5f);
        y->k_norm = random_floats(H, 0.5f, 1.5f), y->post_attn_norm = random_floats(D, 0.5f, 1.5f);
        y->pre_ffw_norm = random_floats(D, 0.5f, 1.5f), y->post_ffw_norm = random_floats(D, 0.5f, 1.5f);
        float *f = malloc(sizeof(float) * H / 2);
        for (int i = 0; i < H / 2; i++) f[i] = powf(10000.0f, -2.0f * (float)i / H);
        y->inv_freq = f;
        y->k_cache = calloc(S * KV * H, sizeof(float)), y->v_cache = calloc(S * KV * H, sizeof(float));
        y->slot_pos = malloc(sizeof(int64_t) * S);
        for (int i = 0; i < S; i++) y->slot_pos[i] = -1;
        y->slots = S, y->ring = 0, y->window = l == 1 ? 2 : 0;
    }
    float *x = random_floats(4 * D, -2.0f, 2.0f);
    const int64_t pos[4] = {0, 1, 2, 3};
    decode_layers(layers, L, &dm, x, 3, 3, pos, pos, 3, threads);
    decode_layers(layers, L, &dm, x + 3 * D, 1, 1, pos + 3, pos + 3, 4, threads);
    for (int l = 0; l < L; l++) {
        layer_t *y = layers + l;
        free((void *)y->q.data), free((void *)y->k.data), free((void *)y->v.data), free((void *)y->o.data);
        free((void *)y->gate.data), free((void *)y->up.data), free((void *)y->down.data);
        free((void *)y->attn_norm), free((void *)y->q_norm), free((void *)y->k_norm);
        free((void *)y->post_attn_norm), free((void *)y->pre_ffw_norm), free((void *)y->post_ffw_norm);
        free((void *)y->inv_freq), free(y->k_cache), free(y->v_cache), free(y->slot_pos);
    }
    return x;
}

static double max_abs_diff(const float *a, const float *b, long n) {  /* b NULL: max |a| */
    double worst = 0.0;
    for (long i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - (b ? (double)b[i] : 0.0));
        if (!(d <= worst)) worst = d;  /* NaN sticks */
    }
    return worst;
}

static void check_decode(const char *mode, const char *file) {
    const long n = 4 * 256;
    float *one = decode_run(1, 7), *three = decode_run(3, 7);
    if (memcmp(one, three, sizeof(float) * n)) {
        printf("FAIL decode: 3 workers differ from 1\n");
        failures++;
    }
    const double scale = max_abs_diff(one, NULL, n);
    if (!(scale > 0.0) || !isfinite(scale)) {
        printf("FAIL decode: hidden states not finite\n");
        failures++;
    }
    if (mode && !strcmp(mode, "--write")) {
        FILE *f = fopen(file, "wb");
        if (!f || fwrite(one, sizeof(float), n, f) != (size_t)n) printf("FAIL decode: cannot write %s\n", file), failures++;
        if (f) fclose(f);
    } else if (mode && !strcmp(mode, "--compare")) {
        float *ref = malloc(sizeof(float) * n);
        FILE *f = fopen(file, "rb");
        if (!f || fread(ref, sizeof(float), n, f) != (size_t)n) {
            printf("FAIL decode: cannot read %s\n", file);
            failures++;
        } else {
            const double worst = max_abs_diff(one, ref, n);
            if (!(worst <= 1e-5 * scale)) printf("FAIL decode: %.3g from the scalar build (scale %.3g)\n", worst, scale), failures++;
        }
        if (f) fclose(f);
        free(ref);
    }
    free(one), free(three);
}

void argmax_rows(const float *x, long rows, long n, long stride, int64_t *out, float *work, int threads);
long argmax_work(long rows, long n);

/* argmax.c: each row's first maximum over rows that put it in every place a vector loop could lose it: the tail,
 * a tie across chunks and lanes, a NaN (the first one wins), a row of -inf. Printed, so every build agrees. */
static void check_argmax(void) {
    enum { ROWS = 7, N = 9001, STRIDE = 9017 };
    float *x = malloc(sizeof(float) * ROWS * STRIDE);
    float *work = malloc(sizeof(float) * argmax_work(ROWS, N));
    int64_t out[ROWS], one[ROWS];
    srand(7);
    for (long i = 0; i < ROWS * STRIDE; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    x[1 * STRIDE + 8999] = 3.0f;                                   /* in the tail */
    x[2 * STRIDE + 4097] = 3.0f, x[2 * STRIDE + 37] = 3.0f;        /* a tie: the first */
    x[3 * STRIDE + 6000] = NAN, x[3 * STRIDE + 7000] = NAN, x[3 * STRIDE + 10] = 9.0f;
    for (long i = 0; i < N; i++) x[4 * STRIDE + i] = -INFINITY;
    x[5 * STRIDE + 4095] = 2.0f, x[5 * STRIDE + 4096] = 2.0f;      /* across a chunk's edge */
    argmax_rows(x, ROWS, N, STRIDE, out, work, 3);
    for (long r = 0; r < ROWS; r++) {
        argmax_rows(x + r * STRIDE, 1, N, STRIDE, one + r, work, 1);
        if (one[r] != out[r]) printf("argmax row %ld: %lld alone, %lld beside others\n", r, (long long)one[r],
                                     (long long)out[r]), failures++;
    }
    printf("argmax");
    for (long r = 0; r < ROWS; r++) printf(" %lld", (long long)out[r]);
    printf("\n");
    free(x), free(work);
}

int main(int argc, char **argv) {
    static const struct { long type; const char *name; long K[4]; } cases[] = {
        {Q4_0, "Q4_0", {32, 160, 640, 1152}}, {Q5_0, "Q5_0", {32, 160, 640, 1152}},
        {Q8_0, "Q8_0", {32, 160, 640, 1152}}, {Q4_K, "Q4_K", {256, 768, 1280, 2304}},
        {Q5_K, "Q5_K", {256, 768, 1280, 2304}}, {Q6_K, "Q6_K", {256, 768, 1280, 2304}},
        {F16, "F16", {40, 100, 640, 1152}}, {BF16, "BF16", {40, 100, 640, 1152}}, {F32, "F32", {40, 100, 640, 1152}},
    };
    static const long Ns[] = {1, 7, 19, 40};
    fprintf(stderr, "threads: %s\n", kernels_threading());
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int k = 0; k < 4; k++) check(cases[c].type, cases[c].name, cases[c].K[k], Ns[(c + k) % 4]);
    check_decode(argc > 2 ? argv[1] : NULL, argc > 2 ? argv[2] : NULL);
    check_argmax();
    if (failures) printf("%d FAILURES\n", failures);
    return failures != 0;
}
