/* The interface of blocks.c (matrix products over GGUF weight blocks), shared with decode.c. */
#include <stdint.h>

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
       T_BF16 = 30 };

/* A weight matrix: `rows` (N) rows of `row_bytes` bytes each, `cols` (K) values per row, in ggml type `type`. */
typedef struct {
    const uint8_t *data;
    long type, rows, cols, row_bytes;
} qmat_t;

/* Quantized activations of M rows (see qmatmul_team): per row `units` (padded to a multiple of 8) units of 32 int8
 * with an fp32 scale d, the fp32 sum d * sum(q) of each unit, and the int16 sums of each 16 values (also as -32
 * times them in int32: Q6_K's offset, where batch.c's accumulators start). */
typedef struct {
    int8_t *q;       /* [M][units * 32], zero past K */
    float *d;        /* [M][units] */
    float *fs;       /* [M][units] */
    int16_t *s16;    /* [M][units * 2] */
    int32_t *n32;    /* [M][units * 2]: -32 * s16 */
    int32_t *c128;   /* [M][units]: 128 x the unit's sum (Q8_0 stored as w + 128 for vpdpbusd: batch.c) */
    const float *x;  /* the fp32 rows themselves, for float weights */
    long rows, cols, units;
} act_t;

long act_bytes(long M, long K);
int qtype_supported(long type);

/* Workers of one region (team.c: OpenMP, or a pthread pool without it) that synchronise without leaving it
 * (decode.c's one region per step); each worker passes the team's size, nth. */
typedef struct {
    int count, gen;  /* arrivals, generation */
    long next;       /* items claimed by the current claim() loop; every team_barrier resets it */
} team_t;

typedef void (*team_fn)(void *ctx, int tid, int nth);
void team_run(int threads, team_fn fn, void *ctx);
void team_barrier(team_t *b, int n);
int release_threads(void);
const char *kernels_threading(void);

/* A spin-wait's pause: lets the core's other hyper-thread run, and saves power. */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield");
#endif
}
long group_bytes(long K);
void qmatmul_team(const qmat_t *W, int n_mats, const float *x, long M, float *const *y, const long *ldy,
                  void *scratch, void *groups, int tid, int nth, team_t *team);

/* Worker `tid` of `nth`'s share [*a, *b) of `total` items: contiguous, sizes differing by at most one (as OpenMP's
 * schedule(static) splits a loop). */
static inline void share(long total, int tid, int nth, long *a, long *b) {
    const long q = total / nth, r = total % nth;
    *a = q * tid + (tid < r ? tid : r);
    *b = *a + q + (tid < r);
}

/* Guided share: the next chunk [*a, *b) of `total` items for the calling worker, 0 when none are left. Chunks
 * shrink with the items left (those over 2 nth, at least one), so a worker whose core another program takes
 * (the server's event loop, its clients, an editor) claims fewer of them instead of stalling the whole step, as a
 * static share() does. A claim loop starts after a team_barrier (which resets the count) and runs alone until the
 * next one. Which worker computes an item does not change its value. */
static inline int claim(team_t *t, long total, int nth, long *a, long *b) {
    long cur = __atomic_load_n(&t->next, __ATOMIC_RELAXED), n;
    do {
        if (cur >= total) return 0;
        n = (total - cur) / (2L * nth);
        n = n < 1 ? 1 : n;
    } while (!__atomic_compare_exchange_n(&t->next, &cur, cur + n, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    *a = cur, *b = cur + n;
    return 1;
}

/* tiles.c: register-blocked products for many activation rows (prefill) over Q4_K, Q5_K, Q6_K. */
int tiles_cover(long type);
long tile_bytes(long K);
void tiles_rows(const qmat_t *W, long n0, long n1, const act_t *A, float *y, long ldy, void *buf);

/* batch.c: register-blocked products for a few rows (decode batches, drafts) over Q4_K, Q5_K, Q6_K, Q4_0, Q5_0
 * and Q8_0, bit-identical to the one-row kernels; buf: batch_bytes(K) (a worker's group buffer, group_bytes). */
int batch_cover(long type);
long batch_bytes(long K);
void batch_rows(const qmat_t *W, long n0, long n1, const act_t *A, float *y, long ldy, void *buf);

#if defined(__AVX2__)
#include <immintrin.h>
/* 32 bits -> 32 bytes, 0x10 where the bit is set (the 5th bit of Q5 values): blocks.c's rows, batch.c's tiles. */
static inline __m256i bits_to_0x10(uint32_t bits) {
    const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                            0x0303030303030303);
    const __m256i bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    v = _mm256_or_si256(v, bit);
    v = _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}
#endif
