/* What tiles.c (prefill) and batch.c (decode batches) share: the vector width, and Q4_K / Q5_K / Q6_K super-blocks
 * unpacked to one byte per value and interleaved so that lane r of a vector holds 4 consecutive values of weight
 * row r (as llama.cpp's CPU "repack" layouts and llamafile's tinyBLAS do). Four bytes of an activation row broadcast
 * to every lane then give, with one vpdpbusd (or maddubs + madd), that row's partial dot products with all the
 * tile's weight rows, in their lanes: nothing is reduced horizontally. Include after blocks.h. */
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TILES 1
#else
#define TILES 0
#endif

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
#define VADD_32(a, b) _mm512_add_epi32(a, b)
#define VSUB_32(a, b) _mm512_sub_epi32(a, b)
#define VMULLO_32(a, b) _mm512_mullo_epi32(a, b)
#define VCVT(z) _mm512_cvtepi32_ps(z)
#define VLOAD_F(p) _mm512_load_ps(p)
#define VBCAST_F(p) _mm512_set1_ps(*(p))
#define VSET1_F(v) _mm512_set1_ps(v)
#define VZERO_F() _mm512_setzero_ps()
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUB(a, b) _mm512_sub_ps(a, b)
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
#define VADD_32(a, b) _mm256_add_epi32(a, b)
#define VSUB_32(a, b) _mm256_sub_epi32(a, b)
#define VMULLO_32(a, b) _mm256_mullo_epi32(a, b)
#define VCVT(z) _mm256_cvtepi32_ps(z)
#define VLOAD_F(p) _mm256_load_ps(p)
#define VBCAST_F(p) _mm256_broadcast_ss(p)
#define VSET1_F(v) _mm256_set1_ps(v)
#define VZERO_F() _mm256_setzero_ps()
#define VADD(a, b) _mm256_add_ps(a, b)
#define VSUB(a, b) _mm256_sub_ps(a, b)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VFNMA(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define VSTORE_F(p, v) _mm256_storeu_ps(p, v)
#endif

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

/* Q4_K / Q5_K super-block b of one weight row: each unit's scale d * sc and minimum dmin * m as 8 floats (blocks.c's
 * k_scales: the same products). */
static inline void k45_scales(const uint8_t *b, __m256 *fw, __m256 *om) {
    uint32_t s[3];
    memcpy(s, b + 4, 12);
    const uint32_t u0 = s[0] & 0x3f3f3f3f, u1 = (s[2] & 0x0f0f0f0f) | ((s[0] >> 2) & 0x30303030);
    const uint32_t u2 = s[1] & 0x3f3f3f3f, u3 = ((s[2] >> 4) & 0x0f0f0f0f) | ((s[1] >> 2) & 0x30303030);
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)u1, (int)u0)));
    const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)u3, (int)u2)));
    *fw = _mm256_mul_ps(_mm256_set1_ps(half_to_float(b)), sc);
    *om = _mm256_mul_ps(_mm256_set1_ps(half_to_float(b + 2)), mn);
}

/* Q6_K super-block b of one weight row: each unit's two 16-value scales as 8 int32 each (s0: the first half's),
 * and d. */
static inline void q6k_scales(const uint8_t *b, __m256i *s0, __m256i *s1, float *d) {
    const __m128i sc = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(b + 192)),
                                        _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    *s0 = _mm256_cvtepi8_epi32(sc);
    *s1 = _mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8));
    *d = half_to_float(b + 208);
}

/* 16 bytes at offset `off` of 8 rows' blocks (b[i] NULL: a missing row, zeros), transposed: V[k] holds dword k of
 * row i in lane i. Rows i and i + 4 share a load (one 128-bit half each), so only in-lane shuffles remain. */
static inline __attribute__((always_inline)) void load8t16_if(const uint8_t *const b[8], long off, __m256i V[4],
                                                               int any_null) {
    __m256i A[4];
    for (int k = 0; k < 4; k++) {  /* any_null 0 (a constant): no row is checked */
        const __m128i lo = !any_null || b[k] ? _mm_loadu_si128((const __m128i *)(b[k] + off)) : _mm_setzero_si128();
        const __m128i hi = !any_null || b[k + 4] ? _mm_loadu_si128((const __m128i *)(b[k + 4] + off))
                                                 : _mm_setzero_si128();
        A[k] = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    }
    const __m256i t0 = _mm256_unpacklo_epi32(A[0], A[1]), t1 = _mm256_unpackhi_epi32(A[0], A[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(A[2], A[3]), t3 = _mm256_unpackhi_epi32(A[2], A[3]);
    V[0] = _mm256_unpacklo_epi64(t0, t2), V[1] = _mm256_unpackhi_epi64(t0, t2);
    V[2] = _mm256_unpacklo_epi64(t1, t3), V[3] = _mm256_unpackhi_epi64(t1, t3);
}

static inline void load8t16(const uint8_t *const b[8], long off, __m256i V[4]) { load8t16_if(b, off, V, 1); }

/* 32 bytes at offset `off` of 8 rows' blocks, transposed: O[c] holds bytes 4c..4c+3 of row i at 4i. */
static inline __attribute__((always_inline)) void load8t_if(const uint8_t *const b[8], long off, __m256i O[8],
                                                             int any_null) {
    load8t16_if(b, off, O, any_null);
    load8t16_if(b, off + 16, O + 4, any_null);
}

static inline void load8t(const uint8_t *const b[8], long off, __m256i O[8]) { load8t_if(b, off, O, 1); }

/* The values of one super-block of 8 weight rows (b[i]: the row's block; NULL: zeros), interleaved: unit u's chunk c
 * goes to dst + u * ustride + c * 4 * TN, bytes 4i..4i+3 = values 4c..4c+3 of row i (Q4_K/Q5_K: 0..31, Q6_K: 0..63).
 * The packed bytes are transposed before they are split: 4 bytes of a Q4_K/Q5_K row hold 4 values of two units,
 * of a Q6_K row's low and high parts 4 values of two or four units, so 4 (Q4_K), 5 (Q5_K) or 6 (Q6_K) transposes
 * serve the 8 units, not 8. Unpacking alone, a Q4_K 16384 x 2048 matrix for a batch (AVX2, 2 cores): 0.71 instead
 * of 0.82 ms. */
static inline __attribute__((always_inline)) void interleave8_if(const uint8_t *const b[8], long type, uint8_t *dst,
                                                                  long ustride, int any_null) {
#define PUT(u, c, v) _mm256_store_si256((__m256i *)(dst + (u) * ustride + (c) * 4 * TN), v)
    __m256i Q[8], H[8], L[8];
    if (type == T_Q6_K) {
        const __m256i m3 = _mm256_set1_epi8(3);
        for (int half = 0; half < 2; half++) {
            load8t_if(b, 128 + 32 * half, H, any_null);
            load8t_if(b, 64 * half, Q, any_null);
            load8t_if(b, 64 * half + 32, L, any_null);
            for (int c = 0; c < 8; c++) {
                const __m256i hv = H[c];
                PUT(4 * half, c, _mm256_or_si256(low4(Q[c]), _mm256_slli_epi16(_mm256_and_si256(hv, m3), 4)));
                PUT(4 * half + 1, c, _mm256_or_si256(low4(L[c]), _mm256_slli_epi16(
                                                         _mm256_and_si256(_mm256_srli_epi16(hv, 2), m3), 4)));
                PUT(4 * half + 2, c, _mm256_or_si256(high4(Q[c]), _mm256_slli_epi16(
                                                         _mm256_and_si256(_mm256_srli_epi16(hv, 4), m3), 4)));
                PUT(4 * half + 3, c, _mm256_or_si256(high4(L[c]), _mm256_slli_epi16(
                                                         _mm256_and_si256(_mm256_srli_epi16(hv, 6), m3), 4)));
            }
        }
        return;
    }
    const long qs = type == T_Q4_K ? 16 : 48;
    if (type == T_Q5_K) load8t_if(b, 16, H, any_null);
    const __m256i x10 = _mm256_set1_epi8(0x10);
    for (int i = 0; i < 4; i++) {
        load8t_if(b, qs + 32 * i, Q, any_null);
        for (int c = 0; c < 8; c++) {
            __m256i lo = low4(Q[c]), hi = high4(Q[c]);
            if (type == T_Q5_K) {
                const __m256i m0 = _mm256_set1_epi8((char)(1 << (2 * i))), m1 = _mm256_set1_epi8((char)(2 << (2 * i)));
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(H[c], m0), m0), x10));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(H[c], m1), m1), x10));
            }
            PUT(2 * i, c, lo);
            PUT(2 * i + 1, c, hi);
        }
    }
#undef PUT
}

static inline void interleave8(const uint8_t *const b[8], long type, uint8_t *dst, long ustride) {
    interleave8_if(b, type, dst, ustride, 1);
}

/* One row's nr <= TN outputs: a whole tile's as one vector store, not a library call per row (memcpy of a
 * variable size was ~10% of a 270M prefill); a partial tile's through `buf`. */
static inline void store_cols(float *y, vflt v, float *buf, int nr) {
    if (nr == TN) {
        VSTORE_F(y, v);
    } else {
        VSTORE_F(buf, v);
        memcpy(y, buf, sizeof(float) * nr);
    }
}

static inline vint bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return VSET1_32(v);
}

/* z[r] += the integer dot products of interleaved chunks c0 .. c0+n-1 at `wt` (4 * TN bytes each) with activation
 * row a[r]'s values 4c .. 4c+3, for r < R: one sum per weight row, in its lane. Without VNNI the int16 pair sums of
 * maddubs are added over runs of `run` chunks before one madd: run = 4 for values up to 31
 * (4 x 2 x 31 x 127 = 31496) and 2 for Q6_K's up to 63 (2 x 2 x 63 x 127 = 32004): no wrap. */
#define DOT_ROWS(Z, wt, c0, n)                                                                                 \
    for (int c = (c0); c < (c0) + (n); c++) {                                                                   \
        const vint w = VLOAD_I((wt) + c * 4 * TN);                                                             \
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
#define UNIT_SUMS(Z, wt, c0, n) DOT_ROWS(Z, wt, c0, n)
#else
#define DOT_STEP(z, w, a) _mm256_add_epi16(z, _mm256_maddubs_epi16(w, a))
#define UNIT_SUMS(Z, wt, c0, n)                                                                                 \
    for (int s = (c0); s < (c0) + (n); s += run) {                                                              \
        __m256i p16[TM];                                                                                        \
        for (int r = 0; r < R; r++) p16[r] = _mm256_setzero_si256();                                            \
        DOT_ROWS(p16, wt, s, run)                                                                               \
        for (int r = 0; r < R; r++) Z[r] = _mm256_add_epi32(Z[r], _mm256_madd_epi16(p16[r], _mm256_set1_epi16(1))); \
    }
#endif
#endif /* TILES */
