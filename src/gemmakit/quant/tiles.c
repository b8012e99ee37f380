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
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "blocks.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TILES 1
#else
#define TILES 0
#endif

int tiles_cover(long type) { return TILES && (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K); }

#if TILES
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define ZMM 1  /* 512-bit vectors: 16 weight rows, 8 activation rows (32 registers) */
#define TN 16
#define TM 8
typedef __m512i vint;
typedef __m512 vflt;
#define VLOAD_I(p) _mm512_load_si512((const void *)(p))
#define VZERO_I() _mm512_setzero_si512()
#define VSET1_32(v) _mm512_set1_epi32(v)
#define VSUB_32(a, b) _mm512_sub_epi32(a, b)
#define VCVT(z) _mm512_cvtepi32_ps(z)
#define VLOAD_F(p) _mm512_load_ps(p)
#define VBCAST_F(p) _mm512_set1_ps(*(p))
#define VZERO_F() _mm512_setzero_ps()
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VFNMA(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define VSTORE_F(p, v) _mm512_storeu_ps(p, v)
#else
#define ZMM 0
#define TN 8  /* weight rows per tile: one per 32-bit lane */
#define TM 4  /* activation rows per pass over the tile's weights */
typedef __m256i vint;
typedef __m256 vflt;
#define VLOAD_I(p) _mm256_load_si256((const __m256i *)(p))
#define VZERO_I() _mm256_setzero_si256()
#define VSET1_32(v) _mm256_set1_epi32(v)
#define VSUB_32(a, b) _mm256_sub_epi32(a, b)
#define VCVT(z) _mm256_cvtepi32_ps(z)
#define VLOAD_F(p) _mm256_load_ps(p)
#define VBCAST_F(p) _mm256_broadcast_ss(p)
#define VZERO_F() _mm256_setzero_ps()
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VFNMA(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define VSTORE_F(p, v) _mm256_storeu_ps(p, v)
#endif

/* One super-block (256 values) of a tile's TN weight rows, unpacked and interleaved. */
typedef struct {
    uint8_t w[8][8][4 * TN] __attribute__((aligned(64)));  /* [unit][4-value chunk][row r: 4 bytes at 4r] */
    float fw[8][TN] __attribute__((aligned(64)));  /* [unit][row]: d * scale (Q6_K: of the unit's first half) */
    float om[8][TN] __attribute__((aligned(64)));  /* Q4_K/Q5_K: dmin * min; Q6_K: d * scale of the 2nd half */
} tile_sb;

long tile_bytes(long K) { return (long)sizeof(tile_sb) * (K / 256) + 64; }

#if ZMM || (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define VNNI 1
#else
#define VNNI 0
#endif

static inline void kmins(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {  /* Q4_K/Q5_K 6-bit scales and mins */
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* Rows R[0..7] of 8 dwords (a unit's 8 chunks of 4 values) -> O[c] = chunk c of the 8 rows: an 8x8 transpose. */
static inline void transpose8(const __m256i R[8], __m256i O[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(R[2 * i], R[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(R[2 * i], R[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) {  /* rows 0-3, rows 4-7 */
        u[4 * h] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int c = 0; c < 4; c++) {
        O[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
        O[c + 4] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
}

static inline __m256i low4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
static inline __m256i high4(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

/* Q4_K / Q5_K super-block b of one weight row into lane r (values 0..31, scales d*sc, minimums dmin*m). */
static void unpack_k45(tile_sb *t, const uint8_t *b, long type, int r, __m256i v[8]) {
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    uint8_t sc[8], mn[8];
    kmins(b + 4, sc, mn);
    for (int u = 0; u < 8; u++) t->fw[u][r] = d * (float)sc[u], t->om[u][r] = dmin * (float)mn[u];
    const uint8_t *qs = b + (type == T_Q4_K ? 16 : 48);
    const __m256i h = type == T_Q5_K ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * i));
        __m256i lo = low4(q), hi = high4(q);
        if (type == T_Q5_K) {
            const __m256i m0 = _mm256_set1_epi8((char)(1 << (2 * i))), m1 = _mm256_set1_epi8((char)(2 << (2 * i)));
            const __m256i x10 = _mm256_set1_epi8(0x10);
            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, m0), m0), x10));
            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, m1), m1), x10));
        }
        v[2 * i] = lo, v[2 * i + 1] = hi;
    }
}

/* Q6_K super-block b of one weight row into lane r: values 0..63 (the -32 is applied from activation sums), the
 * unit's two 16-value scales times d (exact in fp32: an fp16 times an int8). */
static void unpack_q6k(tile_sb *t, const uint8_t *b, int r, __m256i v[8]) {
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = half_to_float(b + 208);
    for (int u = 0; u < 8; u++) t->fw[u][r] = d * (float)sc[2 * u], t->om[u][r] = d * (float)sc[2 * u + 1];
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int half = 0; half < 2; half++) {
        const uint8_t *l = b + 64 * half, *qh = b + 128 + 32 * half;
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)l), l1 = _mm256_loadu_si256((const __m256i *)(l + 32));
        const __m256i hv = _mm256_loadu_si256((const __m256i *)qh);
        v[4 * half] = _mm256_or_si256(low4(l0), _mm256_slli_epi16(_mm256_and_si256(hv, m3), 4));
        v[4 * half + 1] = _mm256_or_si256(low4(l1), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2), m3), 4));
        v[4 * half + 2] = _mm256_or_si256(high4(l0), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 4), m3), 4));
        v[4 * half + 3] = _mm256_or_si256(high4(l1), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 6), m3), 4));
    }
}

/* Weight rows n0 .. n0+nr-1 (nr <= TN; missing lanes are zero) of every super-block: each row's units unpacked,
 * then 8 rows at a time transposed into the interleaved chunks. */
static void unpack_tile(tile_sb *t, const qmat_t *W, long n0, int nr) {
    const long nsb = W->cols / 256, bsz = W->type == T_Q4_K ? 144 : W->type == T_Q5_K ? 176 : 210;
    __m256i v[TN][8], R[8], O[8];  /* [row][unit] */
    if (nr < TN) {
        memset(t, 0, sizeof(tile_sb) * nsb);
        for (int r = nr; r < TN; r++)
            for (int u = 0; u < 8; u++) v[r][u] = _mm256_setzero_si256();
    }
    for (long g = 0; g < nsb; g++) {
        for (int r = 0; r < nr; r++) {
            const uint8_t *b = W->data + (n0 + r) * W->row_bytes + g * bsz;
            if (W->type == T_Q6_K) unpack_q6k(t + g, b, r, v[r]);
            else unpack_k45(t + g, b, W->type, r, v[r]);
        }
        for (int u = 0; u < 8; u++)
            for (int h = 0; h < TN / 8; h++) {
                for (int i = 0; i < 8; i++) R[i] = v[8 * h + i][u];
                transpose8(R, O);
                for (int c = 0; c < 8; c++) _mm256_store_si256((__m256i *)(t[g].w[u][c] + 32 * h), O[c]);
            }
    }
}

static inline vint bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return VSET1_32(v);
}

/* Chunks c0 .. c0+n-1 of one unit, times activation row a (n 4-value chunks): the exact integer sums, one per
 * weight row. Without VNNI the int16 pair sums of maddubs are added over `n` chunks before one madd: n = 4 for
 * values up to 31 (4 x 2 x 31 x 127 = 31496) and n = 2 for Q6_K's up to 63 (2 x 2 x 63 x 127 = 32004): no wrap. */
#define DOT_ROWS(Z, c0, n)                                                                                      \
    for (int c = (c0); c < (c0) + (n); c++) {                                                                   \
        const vint w = VLOAD_I(t->w[u][c]);                                                                    \
        for (int r = 0; r < R; r++) Z[r] = DOT_STEP(Z[r], w, bcast4(a[r] + 4 * c));                             \
    }

#if VNNI
#if ZMM
#define DOT_STEP(z, w, a) _mm512_dpbusd_epi32(z, w, a)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT_STEP(z, w, a) _mm256_dpbusd_epi32(z, w, a)
#else
#define DOT_STEP(z, w, a) _mm256_dpbusd_avx_epi32(z, w, a)
#endif
#define UNIT_SUMS(Z, c0, n) DOT_ROWS(Z, c0, n)
#else
/* int16 accumulation over chunk runs of `run` (see above), widened once per run */
#define DOT_STEP(z, w, a) _mm256_add_epi16(z, _mm256_maddubs_epi16(w, a))
#define UNIT_SUMS(Z, c0, n)                                                                                     \
    for (int s = (c0); s < (c0) + (n); s += run) {                                                              \
        __m256i p16[TM];                                                                                        \
        for (int r = 0; r < R; r++) p16[r] = _mm256_setzero_si256();                                            \
        DOT_ROWS(p16, s, run)                                                                                   \
        for (int r = 0; r < R; r++) Z[r] = _mm256_add_epi32(Z[r], _mm256_madd_epi16(p16[r], _mm256_set1_epi16(1))); \
    }
#endif

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
                UNIT_SUMS(z0, 0, 4)
                UNIT_SUMS(z1, 4, 4)
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
                UNIT_SUMS(z, 0, 8)
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
            for (int r = 0; r < R; r++) memcpy(y + (m + r) * ldy + n, out[r], sizeof(float) * nr);
        }
    }
}
#else
long tile_bytes(long K) { (void)K; return 0; }
void tiles_rows(const qmat_t *W, long n0, long n1, const act_t *A, float *y, long ldy, void *buf) {
    (void)W, (void)n0, (void)n1, (void)A, (void)y, (void)ldy, (void)buf;  /* never called: tiles_cover() is 0 */
}
#endif
