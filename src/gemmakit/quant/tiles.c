/* Register-blocked int8 products for many activation rows (prefill) over Q4_K, Q5_K and Q6_K blocks.
 *
 * blocks.c's kernels compute one (activation row, weight row) pair at a time: each 32-value unit's integer dot
 * product ends in its own 8-lane vector, and a horizontal reduction per unit (hadd chains) costs as much as the
 * multiplies. Here a tile of TN = 8 weight rows is unpacked once, interleaved so that lane r of a 256-bit vector
 * holds 4 consecutive values of weight row r (as llama.cpp's CPU "repack" layouts and llamafile's tinyBLAS do).
 * Four bytes of an activation row broadcast to every lane then give, with one vpdpbusd (or maddubs + madd), the
 * partial dot products of that row with all 8 weight rows: the sums stay in their lanes, TM = 4 activation rows
 * share each loaded weight vector, and nothing is reduced horizontally. Per unit the lanes are scaled in fp32
 * (weight scale x the unit's activation scale) and the Q4_K/Q5_K minimums and the Q6_K offset of -32 are applied
 * from the activation's unit sums, as blocks.c does.
 *
 * Only for products with many rows (qmatmul's prefill, M >= TILE_ROWS): results differ from the one-row kernels in
 * the order of the float sums (within the int8-activation tolerance of the gguf dequantization), so decode and
 * draft verification (qmatmul_team) never come here and a row's logits do not depend on how many rows share them.
 * Builds with AVX-512 VNNI use 512-bit vectors (TN = 16 weight rows x TM = 8 activation rows: 32 registers), AVX2
 * builds 256-bit ones (8 x 4), with vpdpbusd where AVX-VNNI exists and maddubs + madd otherwise. x86 only; other
 * builds keep blocks.c's paths (tiles_cover() is 0 there).
 */
#include "blocks.h"
#include "tiles.h"

int tiles_cover(long type) { return TILES && (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K); }

#if TILES
/* One super-block (256 values) of a tile's TN weight rows, unpacked and interleaved. */
typedef struct {
    uint8_t w[8][8][4 * TN] __attribute__((aligned(64)));  /* [unit][4-value chunk][row r: 4 bytes at 4r] */
    float fw[8][TN] __attribute__((aligned(64)));  /* [unit][row]: d * scale (Q6_K: of the unit's first half) */
    float om[8][TN] __attribute__((aligned(64)));  /* Q4_K/Q5_K: dmin * min; Q6_K: d * scale of the 2nd half */
} tile_sb;

long tile_bytes(long K) { return (long)sizeof(tile_sb) * (K / 256) + 64; }

/* Weight rows n0 .. n0+nr-1 (nr <= TN; missing lanes are zero) of every super-block: each row's scales, then 8 rows
 * at a time their values interleaved (interleave8). */
static void unpack_tile(tile_sb *t, const qmat_t *W, long n0, int nr) {
    const long nsb = W->cols / 256, bsz = W->type == T_Q4_K ? 144 : W->type == T_Q5_K ? 176 : 210;
    if (nr < TN) memset(t, 0, sizeof(tile_sb) * nsb);
    for (long g = 0; g < nsb; g++) {
        const uint8_t *b[TN];
        for (int r = 0; r < TN; r++) b[r] = r < nr ? W->data + (n0 + r) * W->row_bytes + g * bsz : NULL;
        for (int r = 0; r < nr; r++) {
            float fw[8], om[8];
            if (W->type == T_Q6_K) {  /* the unit's two 16-value scales times d (exact: an fp16 times an int8) */
                __m256i s0, s1;
                float d;
                q6k_scales(b[r], &s0, &s1, &d);
                _mm256_storeu_ps(fw, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s0)));
                _mm256_storeu_ps(om, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s1)));
            } else {
                __m256 f, o;
                k45_scales(b[r], &f, &o);
                _mm256_storeu_ps(fw, f), _mm256_storeu_ps(om, o);
            }
            for (int u = 0; u < 8; u++) t[g].fw[u][r] = fw[u], t[g].om[u][r] = om[u];
        }
        for (int h = 0; h < TN / 8; h++) interleave8(b + 8 * h, W->type, t[g].w[0][0] + 32 * h, sizeof(t[g].w[0]));
    }
}

/* Activation rows m .. m+R-1 (R <= TM) against one tile: out[r][lane] = y[m + r][n0 + lane]. */
static inline __attribute__((always_inline)) void tile_rows(const tile_sb *T, long nsb, long type, int R,
                                                            const act_t *A, long m, float out[TM][TN]) {
    vflt acc[TM];
    for (int r = 0; r < R; r++) acc[r] = VZERO_F();
#if !VNNI
    const int run = type == T_Q6_K ? 2 : 4;
#endif
    for (long g = 0; g < nsb; g++) {
        const tile_sb *t = T + g;
        for (int u = 0; u < 8; u++) {
            const long o = g * 8 + u;  /* the unit's index in an activation row */
            const int8_t *a[TM];
            for (int r = 0; r < R; r++) a[r] = A->q + ((m + r) * A->units + o) * 32;
            if (type == T_Q6_K) {
                vint z0[TM], z1[TM];
                for (int r = 0; r < R; r++) z0[r] = z1[r] = VZERO_I();
                UNIT_SUMS(z0, t->w[u][0], 0, 4)
                UNIT_SUMS(z1, t->w[u][0], 4, 4)
                const vflt f0 = VLOAD_F(t->fw[u]), f1 = VLOAD_F(t->om[u]);
                for (int r = 0; r < R; r++) {
                    const int16_t *s = A->s16 + ((m + r) * A->units + o) * 2;
                    const vint c0 = VSUB_32(z0[r], VSET1_32(32 * s[0])), c1 = VSUB_32(z1[r], VSET1_32(32 * s[1]));
                    const vflt v = VFMA(VCVT(c1), f1, VMUL(VCVT(c0), f0));
                    acc[r] = VFMA(v, VBCAST_F(A->d + (m + r) * A->units + o), acc[r]);
                }
            } else {
                vint z[TM];
                for (int r = 0; r < R; r++) z[r] = VZERO_I();
                UNIT_SUMS(z, t->w[u][0], 0, 8)
                const vflt fw = VLOAD_F(t->fw[u]), om = VLOAD_F(t->om[u]);
                for (int r = 0; r < R; r++) {
                    const long i = (m + r) * A->units + o;
                    acc[r] = VFMA(VCVT(z[r]), VMUL(fw, VBCAST_F(A->d + i)), acc[r]);
                    acc[r] = VFNMA(om, VBCAST_F(A->fs + i), acc[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) VSTORE_F(out[r], acc[r]);
}

/* One specialised loop per (block type, row count): the tests leave the inner loops. */
#if ZMM
#define ZMM_CASES(TY)                                                                                \
    case 8: tile_rows(T, nsb, TY, 8, A, m, out); break;                                              \
    case 7: tile_rows(T, nsb, TY, 7, A, m, out); break;                                              \
    case 6: tile_rows(T, nsb, TY, 6, A, m, out); break;                                              \
    case 5: tile_rows(T, nsb, TY, 5, A, m, out); break;
#else
#define ZMM_CASES(TY)
#endif
static void tile_pass(const tile_sb *T, long nsb, long type, int R, const act_t *A, long m, float out[TM][TN]) {
#define PASS(TY)                                                                                     \
    switch (R) {                                                                                     \
        ZMM_CASES(TY)                                                                                \
        case 4: tile_rows(T, nsb, TY, 4, A, m, out); break;                                          \
        case 3: tile_rows(T, nsb, TY, 3, A, m, out); break;                                          \
        case 2: tile_rows(T, nsb, TY, 2, A, m, out); break;                                          \
        default: tile_rows(T, nsb, TY, 1, A, m, out); break;                                         \
    }
    if (type == T_Q6_K) { PASS(T_Q6_K) } else { PASS(T_Q4_K) }  /* Q5_K: unpacked as Q4_K's 0..31 */
#undef PASS
}

/* Y[m, n] for every activation row and weight rows n0 .. n1-1 (any count): TN rows unpacked at a time into `buf`
 * (tile_bytes(K)), then every TM activation rows pass over them. */
void tiles_rows(const qmat_t *W, long n0, long n1, const act_t *A, float *y, long ldy, void *buf) {
    tile_sb *T = (tile_sb *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    const long nsb = W->cols / 256;
    float out[TM][TN] __attribute__((aligned(64)));
    for (long n = n0; n < n1; n += TN) {
        const int nr = (int)(n1 - n < TN ? n1 - n : TN);
        unpack_tile(T, W, n, nr);
        for (long m = 0; m < A->rows; m += TM) {
            const int R = (int)(A->rows - m < TM ? A->rows - m : TM);
            tile_pass(T, nsb, W->type, R, A, m, out);
            for (int r = 0; r < R; r++) store_cols(y + (m + r) * ldy + n, VLOAD_F(out[r]), out[r], nr);
        }
    }
}
#else
long tile_bytes(long K) { (void)K; return 0; }
void tiles_rows(const qmat_t *W, long n0, long n1, const act_t *A, float *y, long ldy, void *buf) {
    (void)W, (void)n0, (void)n1, (void)A, (void)y, (void)ldy, (void)buf;  /* never called: tiles_cover() is 0 */
}
#endif
