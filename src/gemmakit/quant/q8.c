/* Q8_0 weight-only matmul for CPU decode and short prefill: Y[M,N] = X[M,K] @ W[N,K]^T.
 *
 * W is stored in ggml's Q8_0 block layout (per 32 weights: an fp16 scale d, then 32 int8 q; w = d * q), the same
 * bytes a GGUF file holds, so a Q8_0 tensor is used straight from the memory-mapped file. Activations stay fp32:
 * the result equals the dot product with the dequantized weights up to fp32 summation order (no activation
 * quantization, unlike llama.cpp). Built at first use with the machine's gcc (-O3 -march=native -fopenmp); the
 * OpenMP runtime is the one torch already loaded (same soname), so the two share one thread pool.
 */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#include <math.h>

#define QK 32
typedef struct { uint16_t d; int8_t q[QK]; } __attribute__((packed)) block_q8;

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#endif
}

/* One output row n for up to 4 activation rows: the weights of each block are converted once, used MR times. */
#define MR 4
static void row_dot(const block_q8 *w, const float *x, long K, int mr, long ldx, float *out) {
    const long nb = K / QK;
#if defined(__AVX512F__)
    __m512 acc[MR];
    for (int m = 0; m < MR; m++) acc[m] = _mm512_setzero_ps();
    for (long b = 0; b < nb; b++) {
        const __m512 d = _mm512_set1_ps(fp16_to_fp32(w[b].d));
        const __m128i q0 = _mm_loadu_si128((const __m128i *)w[b].q);
        const __m128i q1 = _mm_loadu_si128((const __m128i *)(w[b].q + 16));
        const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
        const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
        for (int m = 0; m < mr; m++) {
            const float *xb = x + m * ldx + b * QK;
            acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[m]);
            acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[MR];
    for (int m = 0; m < MR; m++) acc[m] = _mm256_setzero_ps();
    for (long b = 0; b < nb; b++) {
        _mm_prefetch((const char *)(w + b + 4 * nb), _MM_HINT_T0);
        const __m256 d = _mm256_set1_ps(fp16_to_fp32(w[b].d));
        __m256 wv[4];
        for (int j = 0; j < 4; j++) {
            const __m128i q = _mm_loadl_epi64((const __m128i *)(w[b].q + 8 * j));
            wv[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
        }
        for (int m = 0; m < mr; m++) {
            const float *xb = x + m * ldx + b * QK;
            for (int j = 0; j < 4; j++) acc[m] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xb + 8 * j), acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
        s = _mm_hadd_ps(s, s);
        s = _mm_hadd_ps(s, s);
        out[m] = _mm_cvtss_f32(s);
    }
#else
    for (int m = 0; m < mr; m++) {
        float acc = 0.0f;
        for (long b = 0; b < nb; b++) {
            float s = 0.0f;
            for (int i = 0; i < QK; i++) s += (float)w[b].q[i] * x[m * ldx + b * QK + i];
            acc += fp16_to_fp32(w[b].d) * s;
        }
        out[m] = acc;
    }
#endif
}

/* One activation row against 4 weight rows (decode): 4 independent accumulators hide FMA latency, and the
 * activation block is loaded once for the 4 rows. */
static void dot_1x4(const block_q8 *w, long nb, const float *x, float *out) {
#if defined(__AVX512F__)
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (long b = 0; b < nb; b++) {
        const __m512 x0 = _mm512_loadu_ps(x + b * QK), x1 = _mm512_loadu_ps(x + b * QK + 16);
        for (int r = 0; r < 4; r++) {
            const block_q8 *blk = w + r * nb + b;
            /* Prefetch the same block of the next group of 4 rows into L1, and of the group after 8 into L2:
             * hardware prefetchers alone reached ~half the bandwidth on 4 interleaved streams (head GEMV 12.0 ->
             * 6.7 ms with 2 threads); the second, farther prefetch took the head 9.3 -> 8.5 ms and the layers'
             * GEMVs 6.2 -> 5.1 ms (medians of 8 alternating runs; a non-temporal hint doubled the time). */
            _mm_prefetch((const char *)(blk + 4 * nb), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + 8 * nb), _MM_HINT_T1);
            const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)blk->q)));
            const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk->q + 16))));
            const __m512 p = _mm512_fmadd_ps(w0, x0, _mm512_mul_ps(w1, x1));
            acc[r] = _mm512_fmadd_ps(p, _mm512_set1_ps(fp16_to_fp32(blk->d)), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
#else
    for (int r = 0; r < 4; r++) row_dot(w + r * nb, x, nb * QK, 1, nb * QK, out + r);
#endif
}

/* Four activation rows against four weight rows (draft verification, short prefill): each weight block is
 * converted once and used for the four rows. Per (m, r) the floating-point operations are exactly those of
 * dot_1x4, in the same order, so results are bit-identical to single-row calls. */
static void dot_4x4(const block_q8 *w, long nb, const float *x, long ldx, float *out, long ldo) {
#if defined(__AVX512F__)
    __m512 acc[4][4];
    for (int m = 0; m < 4; m++)
        for (int r = 0; r < 4; r++) acc[m][r] = _mm512_setzero_ps();
    for (long b = 0; b < nb; b++) {
        __m512 w0[4], w1[4], d[4];
        for (int r = 0; r < 4; r++) {
            const block_q8 *blk = w + r * nb + b;
            _mm_prefetch((const char *)(blk + 4 * nb), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + 8 * nb), _MM_HINT_T1);
            w0[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)blk->q)));
            w1[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk->q + 16))));
            d[r] = _mm512_set1_ps(fp16_to_fp32(blk->d));
        }
        for (int m = 0; m < 4; m++) {
            const __m512 x0 = _mm512_loadu_ps(x + m * ldx + b * QK), x1 = _mm512_loadu_ps(x + m * ldx + b * QK + 16);
            for (int r = 0; r < 4; r++)
                acc[m][r] = _mm512_fmadd_ps(_mm512_fmadd_ps(w0[r], x0, _mm512_mul_ps(w1[r], x1)), d[r], acc[m][r]);
        }
    }
    for (int m = 0; m < 4; m++)
        for (int r = 0; r < 4; r++) out[m * ldo + r] = _mm512_reduce_add_ps(acc[m][r]);
#else
    for (int m = 0; m < 4; m++) {
        float o[4];
        dot_1x4(w, nb, x + m * ldx, o);
        for (int r = 0; r < 4; r++) out[m * ldo + r] = o[r];
    }
#endif
}

/* Y[M,N] = X[M,K] @ W[N,K]^T with W in Q8_0 blocks. Every (m, n) is summed in the same order whatever M is, so
 * verifying k draft tokens in one call gives bit-identical logits to k single decode steps. */
void q8_matmul(const void *wq, const float *x, float *y, long M, long N, long K, int threads) {
    const block_q8 *w = (const block_q8 *)wq;
    const long nb = K / QK;
    const long n4 = N / 4 * 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long n = 0; n < n4; n += 4) {
        float out[4];
        long m = 0;
        for (; m + 4 <= M; m += 4) dot_4x4(w + n * nb, nb, x + m * K, K, y + m * N + n, N);
        for (; m < M; m++) {  /* the 4 weight rows stay in L1 across m */
            dot_1x4(w + n * nb, nb, x + m * K, out);
            for (int r = 0; r < 4; r++) y[m * N + n + r] = out[r];
        }
    }
    for (long n = n4; n < N; n++)
        for (long m = 0; m < M; m++) row_dot(w + n * nb, x + m * K, K, 1, K, y + m * N + n);
}

/* Dequantize rows of a Q8_0 matrix to fp32 (embedding lookups, and whole matrices for long prefill). */
void q8_rows(const void *wq, const int64_t *rows, long n_rows, long K, float *out, int threads) {
    const block_q8 *w = (const block_q8 *)wq;
    const long nb = K / QK;
#pragma omp parallel for schedule(static) num_threads(threads) if (n_rows > 64)
    for (long r = 0; r < n_rows; r++) {
        const block_q8 *src = w + rows[r] * nb;
        float *dst = out + r * K;
        for (long b = 0; b < nb; b++) {
            const float d = fp16_to_fp32(src[b].d);
            for (int i = 0; i < QK; i++) dst[b * QK + i] = d * (float)src[b].q[i];
        }
    }
}

/* Dequantize a whole Q8_0 matrix [N, K] to bf16 (round to nearest even), for AMX/AVX512-BF16 prefill GEMMs. */
void q8_to_bf16(const void *wq, long N, long K, uint16_t *out, int threads) {
    const block_q8 *w = (const block_q8 *)wq;
    const long nb = K / QK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long n = 0; n < N; n++) {
        for (long b = 0; b < nb; b++) {
            const float d = fp16_to_fp32(w[n * nb + b].d);
            for (int i = 0; i < QK; i++) {
                float f = d * (float)w[n * nb + b].q[i];
                uint32_t u;
                memcpy(&u, &f, 4);
                u += 0x7fff + ((u >> 16) & 1);
                out[(n * nb + b) * QK + i] = (uint16_t)(u >> 16);
            }
        }
    }
}

/* Gemma RMSNorm for short inputs (decode): y = x * rsqrt(mean(x^2) + eps) * scale, scale = 1 + w, in fp32.
 * One call instead of torch's ~6 dispatched ops (25 us -> ~3 us per norm on the 270M, 109 norms per token). */
void rms_norm(const float *x, const float *scale, float *y, long rows, long dim, float eps) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        double ss = 0.0;
        for (long i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        const float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
        for (long i = 0; i < dim; i++) yr[i] = xr[i] * inv * scale[i];
    }
}
