/* Register-blocked int8 products for a few activation rows (decode batches, speculative drafts: 2 to 16 rows) over
 * Q4_K, Q5_K and Q6_K blocks and blocks of 32 (Q4_0, Q5_0, Q8_0: see qblock_t), bit-identical to blocks.c's
 * one-row kernels. Products of more rows with blocks of 32 (prefill; tiles.c covers the K-quants) run here too,
 * MAX_ROWS rows per unpacking: the 270M, whose matrices 640 wide are Q5_0 and Q8_0, prefilled 256 tokens at
 * 542-691 instead of 477-569 tok/s on the AVX2 build.
 *
 * blocks.c's batched kernel unpacks a weight row once for its rows, but each 32-value unit's integer dot product
 * still ends in its own 8-lane vector and needs a horizontal reduction (hadd chains) per unit and row: at 4-8 rows
 * that reduction, not the multiplies, bounds the step. Here, as in the prefill tiles (tiles.h), TN weight rows are
 * unpacked and interleaved, and broadcast activation bytes give the sums of every weight row in its own lane.
 *
 * Exactness that prompt lookup and drafts rely on: a row's logits must not depend on how many rows share the call,
 * and one row runs blocks.c's row1. Integer unit sums are exact whatever computes them; the float steps that follow
 * must be row1's, in its order. row1 keeps one lane per unit index u (0..7) of a super-block, accumulating over the
 * super-blocks g: dot[u] += float(z) * ((d * sc[u]) * d_a), off[u] += (dmin * m[u]) * fs_a (Q6_K: dot only, its
 * scales and -32 applied to the integers), then sums the 8 lanes as ((0+4) + (2+6)) + ((1+5) + (3+7)). Here lane r
 * holds weight row r, so the same fused multiply-adds run per lane with one accumulator per u: the tile is stored
 * unit-major ([u][g]) and u is the outer loop, so only one u's accumulators (dot, off, sums: 3 x TM vectors) are
 * live at a time; the 8 per-u results then add in row1's order. Each weight row's blocks are unpacked once per call,
 * KB super-blocks of a tile at a time, into the worker's buffer (batch_bytes: 41 KB on AVX-512 builds, whatever K),
 * not at load: no second copy of the weights, nothing to convert when a model loads.
 *
 * AVX-512 VNNI builds: 16 weight rows x 8 activation rows in zmm; AVX2 builds: 8 x 4 in ymm, vpdpbusd where
 * AVX-VNNI exists, maddubs + madd otherwise. Other builds keep blocks.c's kernels (batch_cover() is 0).
 */
#include "blocks.h"
#include "tiles.h"

int batch_cover(long type) {
    return TILES && (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K || type == T_Q4_0 || type == T_Q5_0 ||
                     type == T_Q8_0);
}

#if TILES
#define KB 4  /* super-blocks per block of the tile: its unpacked bytes (<= 24 KB) and activations stay in L1 */
/* Each super-block unpacked prefetches the same bytes PF_ROWS weight rows on (the next tile's on AVX-512): the
 * tile reads TN rows a few hundred bytes at a time, too many streams for the hardware prefetchers. Measured on the
 * Gemma 1 2B shape's matrices from memory at 8 rows: 175 ms with, 251 ms without (32 rows ahead: 181, 64: 190). */
#define PF_ROWS 16
/* Into L2, not L1: the burst of a tile's prefetches then waits on fewer of L1's fill buffers. The 2B shape's Q6_K
 * head at 8 rows, 2 cores: 36.4 instead of 38.7 ms (AVX-512), 40.3 instead of 42.9 ms (AVX2). */
#define PF_HINT _MM_HINT_T1
/* Rows whose accumulators batch_bytes provides for (a decode batch); more go MAX_ROWS at a time, the tile
 * unpacked again for each. On AVX2, 512 (128 passes of 4 rows, 256 KB of accumulators, in L2): a 256-row Q5_0
 * product (prefill) took 2.81 ms with 64 (3.26 with 16); the 270M's four Q5_0 / Q8_0 shapes at 512 rows 7.71
 * instead of 8.34 ms with 64. On AVX-512, 64 rows' accumulators (64 KB) spill L1: 2.74 against 1.97 ms with 16. */
#if ZMM
#define MAX_ROWS 16
#else
#define MAX_ROWS 512
#endif

/* KB super-blocks of a tile of TN weight rows, unit-major; index (u * KB + g) * TN + r for the scales. */
typedef struct {
    uint8_t w[8][KB][8][4 * TN] __attribute__((aligned(64)));  /* [unit][super-block][chunk][row: 4 bytes] */
    float f[8][KB][TN] __attribute__((aligned(64)));     /* Q4_K/Q5_K: d * sc[u]; Q6_K: d, in f[0] */
    float om[8][KB][TN] __attribute__((aligned(64)));    /* Q4_K/Q5_K: dmin * m[u] */
    float s0[8][KB][TN] __attribute__((aligned(64)));  /* Q6_K: the unit's two 16-value scales (int8 values) */
    float s1[8][KB][TN] __attribute__((aligned(64)));
} xblock_t;

/* Per activation row and unit index u, the running dot and off of row1 (one lane per weight row). */
typedef struct {
    vflt dot[8][TM], off[8][TM];
} xacc_t;

/* Blocks of 32: Q8_0 (the 270M's tied head, ~60% of its batch-8 step), Q4_0 and Q5_0 (Gemma's QAT files). KQ
 * quads of 4 blocks of TN weight rows, unit-major like xblock_t. row1_b32 keeps one lane per block position u
 * (0..3) of a quad, accumulating over the quads dot[u] += float(z) * (d_w * d_a) and (Q4_0, Q5_0, whose values are
 * stored unsigned, 8 or 16 above the true ones) off[u] += d_w * fs_a, then sums its lanes dot - off * 8 (16) as
 * (0+2) + (1+3); here lane r holds weight row r and there is one accumulator per u. The integer z of a unit is exact
 * however computed. Q8_0's weights are signed: with VNNI they are stored as unsigned w + 128 and 128 * (the unit's
 * activation sum) comes off after the dot product; without it, maddubs would saturate on w + 128, so |w| is stored
 * with the weights themselves and the activations take their signs (row1's own trick), a madd after every chunk
 * (2 x 128 x 127 = 32512 fits int16). Q4_0 / Q5_0 values (at most 31) run as the K-quants' do. */
#define KQ 8  /* quads per block of the tile: 18 KB of unpacked weights (AVX-512), in L1 with the activations */
typedef struct {
    uint8_t w[4][KQ][8][4 * TN] __attribute__((aligned(64)));  /* [unit of the quad][quad][chunk][row: 4 bytes] */
#if !VNNI
    int8_t sg[4][KQ][8][4 * TN] __attribute__((aligned(64)));  /* the signed weights, whose signs the rows take */
#endif
    float f[4][KQ][TN] __attribute__((aligned(64)));            /* d_w */
} qblock_t;

static long b32_bytes(long type) { return type == T_Q4_0 ? 18 : type == T_Q5_0 ? 22 : 34; }

long batch_bytes(long K) {
    (void)K;
    const size_t tile = sizeof(xblock_t) > sizeof(qblock_t) ? sizeof(xblock_t) : sizeof(qblock_t);
    return (long)(tile + sizeof(xacc_t) * ((MAX_ROWS + TM - 1) / TM)) + 64;
}

/* Super-block g of 8 weight rows h*8 .. h*8+7 (b[i]: row i's block; NULL, with any_null: zeros) into the tile;
 * type and any_null are constants where it is inlined, so 8 full rows run without the missing-row checks. */
static inline __attribute__((always_inline)) void xblock_unpack8(xblock_t *t, const uint8_t *const b[8], long type,
                                                                 int any_null, long g, int h) {
    __m256i V[4];
    if (type == T_Q6_K) {  /* 16 int8 scales, unit u's at bytes 2u and 2u + 1; d at 208 */
        load8t16_if(b, 192, V, any_null);
        for (int u = 0; u < 8; u++) {
            const __m256i v = V[u >> 1];
            const int lo = 16 * (u & 1);  /* the bit where the unit's first scale starts in the dword */
            _mm256_store_ps(t->s0[u][g] + 8 * h,
                            _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - lo), 24)));
            _mm256_store_ps(t->s1[u][g] + 8 * h,
                            _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16 - lo), 24)));
        }
        for (int i = 0; i < 8; i++) t->f[0][g][8 * h + i] = !any_null || b[i] ? half_to_float(b[i] + 208) : 0.0f;
    } else {  /* d, dmin, then 12 bytes of 6-bit scales and mins (blocks.c's k_scales) */
        load8t16_if(b, 0, V, any_null);
        const __m256i m6 = _mm256_set1_epi32(0x3f3f3f3f), m4 = _mm256_set1_epi32(0x0f0f0f0f);
        const __m256i m2 = _mm256_set1_epi32(0x30303030);
        const __m256i su[4] = {
            _mm256_and_si256(V[1], m6),
            _mm256_or_si256(_mm256_and_si256(V[3], m4), _mm256_and_si256(_mm256_srli_epi32(V[1], 2), m2)),
            _mm256_and_si256(V[2], m6),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(V[3], 4), m4),
                            _mm256_and_si256(_mm256_srli_epi32(V[2], 2), m2))};
        const __m256i pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4,
                                              5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
        const __m256i dd = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(V[0], pick), 0xD8);
        const __m256 d = _mm256_cvtph_ps(_mm256_castsi256_si128(dd));
        const __m256 dmin = _mm256_cvtph_ps(_mm256_extracti128_si256(dd, 1));
        const __m256i ff = _mm256_set1_epi32(0xff);
        for (int u = 0; u < 8; u++) {
            const __m256i sc = _mm256_and_si256(_mm256_srli_epi32(su[u >> 2], 8 * (u & 3)), ff);
            const __m256i mn = _mm256_and_si256(_mm256_srli_epi32(su[2 + (u >> 2)], 8 * (u & 3)), ff);
            _mm256_store_ps(t->f[u][g] + 8 * h, _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)));
            _mm256_store_ps(t->om[u][g] + 8 * h, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn)));
        }
    }
    interleave8_if(b, type, t->w[0][g][0] + 32 * h, sizeof(t->w[0]), any_null);
}

static inline __attribute__((always_inline)) void xblock_unpack_type(xblock_t *t, const qmat_t *W, long type,
                                                                     long n0, int nr, long g0, long gn) {
    const long bsz = type == T_Q4_K ? 144 : type == T_Q5_K ? 176 : 210;
    for (long g = 0; g < gn; g++)
        for (int h = 0; h < TN / 8; h++) {
            const uint8_t *b[8];
            for (int i = 0; i < 8; i++) {
                const int r = 8 * h + i;
                b[i] = r < nr ? W->data + (n0 + r) * W->row_bytes + (g0 + g) * bsz : NULL;
                if (b[i] && n0 + r + PF_ROWS < W->rows)  /* see PF_ROWS */
                    for (long k = 0; k < bsz; k += 64)
                        _mm_prefetch((const char *)(b[i] + PF_ROWS * W->row_bytes + k), PF_HINT);
            }
            if (8 * h + 8 <= nr) xblock_unpack8(t, b, type, 0, g, h);
            else xblock_unpack8(t, b, type, 1, g, h);
        }
}

/* Super-blocks g0 .. g0+gn-1 (gn <= KB) of weight rows n0 .. n0+nr-1 (nr <= TN; missing lanes zero), 8 rows at a
 * time. Their scales come transposed (load8t16: lane i = row i), so each unit's scales for the 8 rows are a few
 * lane-wise shifts and masks, the same products as blocks.c's. Decoded one row at a time, then transposed, they
 * took ~30% of the unpacking: a Q4_K 16384 x 2048 product of 8 rows (AVX2, 2 cores) 1.94 ms, now 1.76. */
static void xblock_unpack(void *tile, const qmat_t *W, long n0, int nr, long g0, long gn) {
    if (W->type == T_Q4_K) xblock_unpack_type(tile, W, T_Q4_K, n0, nr, g0, gn);
    else if (W->type == T_Q5_K) xblock_unpack_type(tile, W, T_Q5_K, n0, nr, g0, gn);
    else xblock_unpack_type(tile, W, T_Q6_K, n0, nr, g0, gn);
}

/* Activation rows m .. m+R-1 (R <= TM) against super-blocks g0 .. g0+gn-1 of a tile, into their accumulators
 * (zeroed first when g0 is 0): row1's fused multiply-adds per lane, in its order over the super-blocks. */
static inline __attribute__((always_inline)) void xblock_rows(const xblock_t *t, long g0, long gn, long type, int R,
                                                              const act_t *A, long m, xacc_t *acc) {
    const long U = A->units;
#if !VNNI
    const int run = type == T_Q6_K ? 2 : 4;
#endif
    for (int u = 0; u < 8; u++) {
        vflt dot[TM], off[TM];
        for (int r = 0; r < R; r++) dot[r] = g0 ? acc->dot[u][r] : VZERO_F();
        for (long g = 0; g < gn; g++) {
            const long o = (g0 + g) * 8 + u;  /* the unit's index in an activation row */
            const uint8_t *wt = t->w[u][g][0];
            const int8_t *a[TM];
            for (int r = 0; r < R; r++) a[r] = A->q + ((m + r) * U + o) * 32;
            vint z[TM];
            vflt zf[TM];
            if (type == T_Q6_K) {
                /* row1's integer sc0 * (sum0 - 32 s0) + sc1 * (sum1 - 32 s1), in fp32 and exactly: each half's sum
                 * starts at -32 times its activation sum, so it ends within 16 x 32 x 127 = 65024 of zero; times
                 * a scale (|sc| <= 128) that is below 2^23, and the two together at most 2^24, every value an
                 * integer that fp32 holds exactly. Two conversions, a multiply and an fma: no 32-bit multiplies,
                 * no broadcasts through the shuffle port. */
                vint zz[TM];
                for (int r = 0; r < R; r++) {
                    z[r] = VSET1_32(A->n32[((m + r) * U + o) * 2]);
                    zz[r] = VSET1_32(A->n32[((m + r) * U + o) * 2 + 1]);
                }
                UNIT_SUMS(z, wt, 0, 4)
                UNIT_SUMS(zz, wt, 4, 4)
                const vflt s0 = VLOAD_F(t->s0[u][g]), s1 = VLOAD_F(t->s1[u][g]);
                for (int r = 0; r < R; r++) zf[r] = VFMA(VCVT(zz[r]), s1, VMUL(VCVT(z[r]), s0));
            } else {
                for (int r = 0; r < R; r++) z[r] = VZERO_I();
                UNIT_SUMS(z, wt, 0, 8)
                for (int r = 0; r < R; r++) zf[r] = VCVT(z[r]);
            }
            const vflt f = VLOAD_F(t->f[type == T_Q6_K ? 0 : u][g]);  /* Q6_K: d */
            for (int r = 0; r < R; r++) dot[r] = VFMA(zf[r], VMUL(f, VBCAST_F(A->d + (m + r) * U + o)), dot[r]);
        }
        for (int r = 0; r < R; r++) acc->dot[u][r] = dot[r];
        if (type == T_Q6_K) continue;
        for (int r = 0; r < R; r++) off[r] = g0 ? acc->off[u][r] : VZERO_F();
        for (long g = 0; g < gn; g++) {  /* the minimums: off[u] += (dmin * m[u]) * fs_a */
            const vflt om = VLOAD_F(t->om[u][g]);
            for (int r = 0; r < R; r++) off[r] = VFMA(om, VBCAST_F(A->fs + (m + r) * U + (g0 + g) * 8 + u), off[r]);
        }
        for (int r = 0; r < R; r++) acc->off[u][r] = off[r];
    }
}

/* One specialised loop per (block type, row count): the tests leave the inner loops. ROW_SWITCH(R, CALL) runs
 * CALL(r) for the r that equals R, a constant in each branch. */
#if ZMM
#define ZMM_ROW_CASES(CALL)                                                                                      \
    case 8: CALL(8); break;                                                                                      \
    case 7: CALL(7); break;                                                                                      \
    case 6: CALL(6); break;                                                                                      \
    case 5: CALL(5); break;
#else
#define ZMM_ROW_CASES(CALL)
#endif
#define ROW_SWITCH(R, CALL)                                                                                      \
    switch (R) {                                                                                                 \
        ZMM_ROW_CASES(CALL)                                                                                      \
        case 4: CALL(4); break;                                                                                  \
        case 3: CALL(3); break;                                                                                  \
        case 2: CALL(2); break;                                                                                  \
        default: CALL(1); break;                                                                                 \
    }

static void xblock_pass(const void *tile, long g0, long gn, long type, int R, const act_t *A, long m, xacc_t *acc) {
    const xblock_t *t = tile;
#define Q6(r) xblock_rows(t, g0, gn, T_Q6_K, r, A, m, acc)
#define Q4(r) xblock_rows(t, g0, gn, T_Q4_K, r, A, m, acc)
    if (type == T_Q6_K) { ROW_SWITCH(R, Q6) } else { ROW_SWITCH(R, Q4) }  /* Q5_K: unpacked as Q4_K's 0..31 */
#undef Q6
#undef Q4
}

/* Rows m .. m+R-1 of Y at columns n .. n+nr-1 from their accumulators: dot - off per unit index (Q6_K: dot), then
 * row1's horizontal sum ((0+4) + (2+6)) + ((1+5) + (3+7)). */
static void xacc_store(const xacc_t *acc, long type, int R, float *y, long ldy, int nr) {
    float out[TN] __attribute__((aligned(64)));
    for (int r = 0; r < R; r++) {
        vflt p[8];
        for (int u = 0; u < 8; u++) p[u] = type == T_Q6_K ? acc->dot[u][r] : VSUB(acc->dot[u][r], acc->off[u][r]);
        const vflt sum = VADD(VADD(VADD(p[0], p[4]), VADD(p[2], p[6])), VADD(VADD(p[1], p[5]), VADD(p[3], p[7])));
        store_cols(y + r * ldy, sum, out, nr);
    }
}

/* The fifth bits of Q5_0 values 4c .. 4c+3 of 8 rows (lane i: row i's 32 bits, qh), as 0x10 bytes in their lanes. */
static inline __m256i fifth_bits(__m256i qh, int c) {
    const __m256i low = _mm256_shuffle_epi8(_mm256_srli_epi32(qh, 4 * c),  /* each lane's low byte, 4 times */
                                            _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                             0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12));
    const __m256i bit = _mm256_set1_epi32(0x08040201);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(low, bit), bit), _mm256_set1_epi8(0x10));
}

/* One block of 8 weight rows (blk[i]: row i's block; NULL, with any_null: zeros) into the tile; type and any_null
 * are constants where it is inlined, so the common case (8 rows, a block within the row) runs without a branch. */
static inline __attribute__((always_inline)) void qblock_unpack8(qblock_t *t, const uint8_t *const blk[8], long type,
                                                                 int any_null, int u, long q, int h) {
    if (!any_null) {  /* the 8 scales converted at once */
        uint16_t hs[8];
        for (int i = 0; i < 8; i++) memcpy(&hs[i], blk[i], 2);
        _mm256_store_ps(t->f[u][q] + 8 * h, _mm256_cvtph_ps(_mm_setr_epi16((short)hs[0], (short)hs[1], (short)hs[2],
                                                                                (short)hs[3], (short)hs[4], (short)hs[5],
                                                                                (short)hs[6], (short)hs[7])));
    } else {
        for (int i = 0; i < 8; i++) t->f[u][q][8 * h + i] = blk[i] ? half_to_float(blk[i]) : 0.0f;
    }
    __m256i O[8];
    if (type == T_Q8_0) {
        load8t_if(blk, 2, O, any_null);
#if !VNNI
        for (int c = 0; c < 8; c++) _mm256_store_si256((__m256i *)(t->sg[u][q][c] + 32 * h), O[c]);
#endif
        for (int c = 0; c < 8; c++)
#if VNNI
            O[c] = _mm256_xor_si256(O[c], _mm256_set1_epi8((char)0x80));  /* w + 128 as an unsigned byte */
#else
            O[c] = _mm256_sign_epi8(O[c], O[c]);
#endif
    } else {  /* row1_b32's values: 0..15 (+16 from Q5_0's fifth bits); chunk c < 4: low nibbles, c >= 4: high */
        __m256i V[4];
        load8t16_if(blk, type == T_Q4_0 ? 2 : 6, V, any_null);
        for (int c = 0; c < 4; c++) O[c] = low4(V[c]), O[c + 4] = high4(V[c]);
        if (type == T_Q5_0) {
            int32_t qh[8];  /* into a register, not through memory: a 256-bit load of 8 just-stored dwords would wait
                               for the stores (no forwarding) */
            for (int i = 0; i < 8; i++)
                if (!any_null || blk[i]) memcpy(&qh[i], blk[i] + 2, 4); else qh[i] = 0;
            const __m256i hv = _mm256_setr_epi32(qh[0], qh[1], qh[2], qh[3], qh[4], qh[5], qh[6], qh[7]);
            for (int c = 0; c < 8; c++) O[c] = _mm256_or_si256(O[c], fifth_bits(hv, c));
        }
    }
    for (int c = 0; c < 8; c++) _mm256_store_si256((__m256i *)(t->w[u][q][c] + 32 * h), O[c]);
}

static inline __attribute__((always_inline)) void qblock_unpack_type(qblock_t *t, const qmat_t *W, long type, long n0,
                                                                     int nr, long q0, long qn) {
    const long nb = W->cols / 32, bsz = b32_bytes(type);
    for (long q = 0; q < qn; q++)
        for (int u = 0; u < 4; u++) {
            const long b = (q0 + q) * 4 + u;  /* the block's index in a row */
            for (int h = 0; h < TN / 8; h++) {
                const uint8_t *blk[8];
                for (int i = 0; i < 8; i++) {
                    const int r = 8 * h + i;
                    blk[i] = r < nr && b < nb ? W->data + (n0 + r) * W->row_bytes + b * bsz : NULL;
                    if (blk[i] && n0 + r + PF_ROWS < W->rows)
                        _mm_prefetch((const char *)(blk[i] + PF_ROWS * W->row_bytes), PF_HINT);
                }
                if (8 * h + 8 <= nr && b < nb) qblock_unpack8(t, blk, type, 0, u, q, h);
                else qblock_unpack8(t, blk, type, 1, u, q, h);
            }
        }
}

/* Quads q0 .. q0+qn-1 (qn <= KQ) of weight rows n0 .. n0+nr-1 (nr <= TN; missing rows and blocks zero). Each block
 * of 8 rows is loaded transposed (load8t: 128-bit halves and in-lane shuffles), and Q4_0 / Q5_0 are transposed
 * while packed, 4 dwords for their 8 chunks: unpacked a row at a time, then transposed (24 shuffles, 8 of them
 * across lanes, per block of 8 rows), they took as long as the products themselves (the 270M's tied Q8_0 head at 8
 * rows, AVX2 build, 2 cores: 16.2 ms, 11.9 without the unpacking; 13.9 ms now, with qblock_unpack8). */
static void qblock_unpack(void *tile, const qmat_t *W, long n0, int nr, long q0, long qn) {
    if (W->type == T_Q8_0) qblock_unpack_type(tile, W, T_Q8_0, n0, nr, q0, qn);
    else if (W->type == T_Q4_0) qblock_unpack_type(tile, W, T_Q4_0, n0, nr, q0, qn);
    else qblock_unpack_type(tile, W, T_Q5_0, n0, nr, q0, qn);
}

/* Activation rows m .. m+R-1 (R <= TM) against quads q0 .. q0+qn-1 of a tile, into acc->dot[u] and acc->off[u]
 * (zeroed first when q0 is 0): row1_b32's multiply-adds per lane, in its order over the quads. */
static inline __attribute__((always_inline)) void qblock_rows(const qblock_t *t, long q0, long qn, long type, int R,
                                                              const act_t *A, long m, xacc_t *acc) {
    const long U = A->units;
#if !VNNI
    const int run = 4;  /* Q4_0 / Q5_0: values up to 31, as the K-quants' (DOT_ROWS) */
#endif
    for (int u = 0; u < 4; u++) {
        vflt dot[TM], off[TM];
        for (int r = 0; r < R; r++) dot[r] = q0 ? acc->dot[u][r] : VZERO_F();
        for (int r = 0; r < R; r++) off[r] = q0 ? acc->off[u][r] : VZERO_F();
        for (long q = 0; q < qn; q++) {
            const long o = (q0 + q) * 4 + u;  /* the unit's index in an activation row */
            const uint8_t *wt = t->w[u][q][0];
            const int8_t *a[TM];
            for (int r = 0; r < R; r++) a[r] = A->q + ((m + r) * U + o) * 32;
            vint z[TM];
            for (int r = 0; r < R; r++) z[r] = VZERO_I();
            if (type != T_Q8_0) {
                UNIT_SUMS(z, wt, 0, 8)
            } else {
#if VNNI
            DOT_ROWS(z, wt, 0, 8)
            for (int r = 0; r < R; r++) z[r] = VSUB_32(z[r], VSET1_32(A->c128[(m + r) * U + o]));
#else
            for (int c = 0; c < 8; c++) {
                const __m256i w = VLOAD_I(wt + c * 4 * TN), sg = VLOAD_I(t->sg[u][q][c]);
                for (int r = 0; r < R; r++)
                    z[r] = _mm256_add_epi32(z[r], _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_sign_epi8(
                                                                        bcast4(a[r] + 4 * c), sg)),
                                                                    _mm256_set1_epi16(1)));
            }
#endif
            }
            const vflt f = VLOAD_F(t->f[u][q]);
            for (int r = 0; r < R; r++) dot[r] = VFMA(VCVT(z[r]), VMUL(f, VBCAST_F(A->d + (m + r) * U + o)), dot[r]);
            if (type != T_Q8_0)
                for (int r = 0; r < R; r++) off[r] = VFMA(f, VBCAST_F(A->fs + (m + r) * U + o), off[r]);
        }
        for (int r = 0; r < R; r++) acc->dot[u][r] = dot[r];
        for (int r = 0; r < R; r++) acc->off[u][r] = off[r];
    }
}

static void qblock_pass(const void *tile, long q0, long qn, long type, int R, const act_t *A, long m, xacc_t *acc) {
    const qblock_t *t = tile;
#define Q8(r) qblock_rows(t, q0, qn, T_Q8_0, r, A, m, acc)
#define Q4(r) qblock_rows(t, q0, qn, T_Q4_0, r, A, m, acc)
    if (type == T_Q8_0) { ROW_SWITCH(R, Q8) } else { ROW_SWITCH(R, Q4) }  /* Q5_0: unpacked as Q4_0's 0..31 */
#undef Q8
#undef Q4
}

/* Rows m .. m+R-1 of Y at columns n .. n+nr-1: row1_b32's dot - off * 8 (Q5_0: 16; Q8_0: dot) per accumulator,
 * then its horizontal sum (0+2) + (1+3). */
static void qacc_store(const xacc_t *acc, long type, int R, float *y, long ldy, int nr) {
    float out[TN] __attribute__((aligned(64)));
    const vflt k = VSET1_F(type == T_Q4_0 ? 8.0f : 16.0f);
    for (int r = 0; r < R; r++) {
        vflt p[4];
        for (int u = 0; u < 4; u++) p[u] = type == T_Q8_0 ? acc->dot[u][r] : VFNMA(acc->off[u][r], k, acc->dot[u][r]);
        store_cols(y + r * ldy, VADD(VADD(p[0], p[2]), VADD(p[1], p[3])), out, nr);
    }
}

/* One family of tiles: its tile's size, blocks per row (super-blocks, quads) and per unpacking, and its functions. */
typedef struct {
    size_t size;
    long blocks, per;
    void (*unpack)(void *t, const qmat_t *W, long n0, int nr, long b0, long bn);
    void (*pass)(const void *t, long b0, long bn, long type, int R, const act_t *A, long m, xacc_t *acc);
    void (*store)(const xacc_t *acc, long type, int R, float *y, long ldy, int nr);
} family_t;

/* Y[m, n] for every activation row and weight rows n0 .. n1-1 (any count): per tile of TN weight rows, `per` blocks
 * at a time are unpacked into `buf` (batch_bytes) and every TM activation rows pass over them. */
#define PFW 2  /* output rows prefetched for writing PFW passes ahead: rows 2^k floats apart share cache sets */
void batch_rows(const qmat_t *W, long n0, long n1, const act_t *A, float *y, long ldy, void *buf) {
    const int b32 = W->type == T_Q8_0 || W->type == T_Q4_0 || W->type == T_Q5_0;
    const family_t F = b32 ? (family_t){sizeof(qblock_t), (W->cols / 32 + 3) / 4, KQ, qblock_unpack, qblock_pass,
                                       qacc_store}
                           : (family_t){sizeof(xblock_t), W->cols / 256, KB, xblock_unpack, xblock_pass, xacc_store};
    const long M = A->rows;
    void *t = (void *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    xacc_t *acc = (xacc_t *)((char *)t + F.size);  /* both tiles' sizes are multiples of 64 */
    const long passes = (M + TM - 1) / TM, held = (MAX_ROWS + TM - 1) / TM;  /* accumulators for `held` passes */
    for (long n = n0; n < n1; n += TN) {
        const int nr = (int)(n1 - n < TN ? n1 - n : TN);
        for (long p0 = 0; p0 < passes; p0 += held) {  /* more than MAX_ROWS rows: the weights unpacked again */
            const long p1 = p0 + held < passes ? p0 + held : passes;
            for (long b0 = 0; b0 < F.blocks; b0 += F.per) {
                const long bn = F.blocks - b0 < F.per ? F.blocks - b0 : F.per;
                F.unpack(t, W, n, nr, b0, bn);
                for (long p = p0; p < p1; p++)
                    F.pass(t, b0, bn, W->type, (int)(M - p * TM < TM ? M - p * TM : TM), A, p * TM, acc + (p - p0));
            }
            for (long p = p0; p < p1; p++) {
                for (long r = (p + PFW) * TM; r < (p + PFW + 1) * TM && r < M; r++)
                    __builtin_prefetch(y + r * ldy + n, 1, 3);
                F.store(acc + (p - p0), W->type, (int)(M - p * TM < TM ? M - p * TM : TM), y + p * TM * ldy + n, ldy,
                        nr);
            }
        }
    }
}
#else
long batch_bytes(long K) { (void)K; return 0; }
void batch_rows(const qmat_t *W, long n0, long n1, const act_t *A, float *y, long ldy, void *buf) {
    (void)W, (void)n0, (void)n1, (void)A, (void)y, (void)ldy, (void)buf;  /* never called: batch_cover() is 0 */
}
#endif
