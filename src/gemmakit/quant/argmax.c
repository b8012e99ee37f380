/* The greedy token of each row of float32 logits: the index of its first maximum, as torch's max(dim=-1) gives it
 * (a NaN counts as the maximum: the first NaN's index; a row of -inf gives 0).
 *
 * torch took 1.6 ms for 8 rows of Gemma's 262k vocabulary on 2 cores, 4% of a batch-8 decode step of the 270M
 * (~42 ms), on every step of a greedy batch and of the server. Here the team reduces chunks of the rows to their
 * maxima in one vectorized pass, then each row scans only its first chunk that holds the maximum. */
#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__) && !defined(GEMMAKIT_SCALAR)
#include <arm_neon.h>
#endif

#include "blocks.h"

#define CHUNK 4096  /* values a chunk's maximum covers: 64 chunks per 262k row, a scan of 16 KB for the index */

typedef struct {
    const float *x;
    long rows, n, stride, chunks;
    float *best;    /* [rows * chunks] each chunk's maximum */
    char *nan;      /* [rows * chunks] whether the chunk holds a NaN */
} argmax_t;

/* The maximum of p[0..len) ignoring NaNs, and whether a NaN is there. Four accumulators: a max waits for the last. */
static float chunk_max(const float *p, long len, int *nan) {
    float m = -INFINITY;
    int bad = 0;
    long i = 0;
#if defined(__AVX512F__)
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    __mmask16 u = 0;
    for (; i + 64 <= len; i += 64) {
        const __m512 a = _mm512_loadu_ps(p + i), b = _mm512_loadu_ps(p + i + 16);
        const __m512 c = _mm512_loadu_ps(p + i + 32), d = _mm512_loadu_ps(p + i + 48);
        u |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(c, d, _CMP_UNORD_Q);
        m0 = _mm512_max_ps(a, m0), m1 = _mm512_max_ps(b, m1), m2 = _mm512_max_ps(c, m2), m3 = _mm512_max_ps(d, m3);
    }
    m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    bad = u != 0;
#elif defined(__AVX2__)
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0, u = _mm256_setzero_ps();
    for (; i + 32 <= len; i += 32) {
        const __m256 a = _mm256_loadu_ps(p + i), b = _mm256_loadu_ps(p + i + 8);
        const __m256 c = _mm256_loadu_ps(p + i + 16), d = _mm256_loadu_ps(p + i + 24);
        u = _mm256_or_ps(u, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
        m0 = _mm256_max_ps(a, m0), m1 = _mm256_max_ps(b, m1), m2 = _mm256_max_ps(c, m2), m3 = _mm256_max_ps(d, m3);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
    bad = _mm256_movemask_ps(u) != 0;
#elif defined(__ARM_NEON) && defined(__aarch64__) && !defined(GEMMAKIT_SCALAR)
    float32x4_t m0 = vdupq_n_f32(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    uint32x4_t ok = vdupq_n_u32(~0u);
    for (; i + 16 <= len; i += 16) {
        const float32x4_t a = vld1q_f32(p + i), b = vld1q_f32(p + i + 4), c = vld1q_f32(p + i + 8);
        const float32x4_t d = vld1q_f32(p + i + 12);
        ok = vandq_u32(ok, vandq_u32(vandq_u32(vceqq_f32(a, a), vceqq_f32(b, b)),
                                     vandq_u32(vceqq_f32(c, c), vceqq_f32(d, d))));
        m0 = vmaxnmq_f32(a, m0), m1 = vmaxnmq_f32(b, m1), m2 = vmaxnmq_f32(c, m2), m3 = vmaxnmq_f32(d, m3);
    }
    m = vmaxnmvq_f32(vmaxnmq_f32(vmaxnmq_f32(m0, m1), vmaxnmq_f32(m2, m3)));
    bad = vminvq_u32(ok) == 0;
#endif
    for (; i < len; i++) {
        const float v = p[i];
        m = v > m ? v : m;
        bad |= v != v;
    }
    *nan = bad;
    return m;
}

static void chunk_maxima(void *ctx, int tid, int nth) {
    const argmax_t *a = ctx;
    long lo, hi;
    share(a->rows * a->chunks, tid, nth, &lo, &hi);
    for (long t = lo; t < hi; t++) {
        const long r = t / a->chunks, c0 = t % a->chunks * CHUNK;
        const long len = a->n - c0 < CHUNK ? a->n - c0 : CHUNK;
        int nan;
        a->best[t] = chunk_max(a->x + r * a->stride + c0, len, &nan);
        a->nan[t] = (char)nan;
    }
}

/* out[r] = the first index of row r's maximum, for rows r of x (rows x n, rows `stride` floats apart). `work`:
 * rows * ceil(n / CHUNK) floats and as many bytes (argmax_work). */
void argmax_rows(const float *x, long rows, long n, long stride, int64_t *out, float *work, int threads) {
    const long chunks = (n + CHUNK - 1) / CHUNK;
    argmax_t a = {x, rows, n, stride, chunks, work, (char *)(work + rows * chunks)};
    if (rows * chunks < 2 * (long)threads) threads = 1;
    team_run(threads, chunk_maxima, &a);
    for (long r = 0; r < rows; r++) {
        const float *best = a.best + r * chunks;
        const char *nan = a.nan + r * chunks;
        long c = 0;
        for (long k = 0; k < chunks; k++) {
            if (nan[k]) {
                c = k;
                break;
            }
            if (best[k] > best[c]) c = k;
        }
        const long c0 = c * CHUNK, len = n - c0 < CHUNK ? n - c0 : CHUNK;
        const float *p = x + r * stride + c0;
        long i = 0;
        if (nan[c]) {
            while (p[i] == p[i]) i++;
        } else {
            while (i < len - 1 && p[i] != best[c]) i++;
        }
        out[r] = c0 + i;
    }
}

int argmax_vectorized(void) {  /* 0: the scalar loop, slower than torch's: callers keep torch */
#if defined(__AVX512F__) || defined(__AVX2__) || (defined(__ARM_NEON) && defined(__aarch64__) && !defined(GEMMAKIT_SCALAR))
    return 1;
#else
    return 0;
#endif
}

long argmax_work(long rows, long n) {  /* floats of work argmax_rows needs (its bytes of flags included) */
    const long cells = rows * ((n + CHUNK - 1) / CHUNK);
    return cells + (cells + sizeof(float) - 1) / sizeof(float);
}
