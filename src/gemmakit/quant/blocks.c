/* Matrix products straight over a GGUF's own weight blocks: Y[M,N] = X[M,K] @ W[N,K]^T.
 *
 * W stays in the bytes the GGUF file holds (memory-mapped; no copy, no conversion): Q4_0, Q5_0, Q8_0, Q4_K, Q5_K,
 * Q6_K as integer blocks, F16/BF16/F32 as floats. For the integer formats the activations are quantized to int8
 * per row, in units of 32 values with their own fp32 scale (finer than llama.cpp's 256-value Q8_K units for the
 * K-quants), and each unit's weight-activation dot product is an exact integer (maddubs+madd on AVX2, vpdpbusd
 * where VNNI exists: the same integers either way). Per group of 8 units the 8 integer sums are reduced into one
 * vector and scaled in fp32 by (weight scale x activation scale); minimums and offsets (Q4_K/Q5_K mins, the -8 of
 * Q4_0, -16 of Q5_0, -32 of Q6_K) come from the activation's per-unit sums. Float weights multiply fp32
 * activations directly.
 *
 * Why: decode is a stream over every weight byte per token, so the bytes read per token decide the speed; reading
 * the GGUF's 4-6 bit blocks directly reads 1.5-2x fewer bytes than re-quantized Q8_0, and integer dot products keep
 * an AVX2 core ahead of memory even when several rows (a batch, a speculative draft, a prefill tile) share each
 * unpacked weight group.
 *
 * Exactness that speculation relies on: the result for (m, n) depends only on activation row m and weight row n,
 * computed by the same instructions in the same order whatever M is, so verifying k draft tokens in one call gives
 * bit-identical logits to k single steps.
 */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "blocks.h"

/* Elsewhere (ARM64: Apple M-series, Snapdragon X, Graviton, Ampere) the same kernels run on NEON (neon.h). Every
 * build, the scalar one included, computes each product with the float operations of the AVX2 path in the same
 * order (fused multiply-adds where it fuses), so results are bit-identical across CPUs; GEMMAKIT_SCALAR forces the
 * portable C (the ports test's reference). */
#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(GEMMAKIT_SCALAR)
#define NEON 1
#include <arm_neon.h>
#else
#define NEON 0
#endif
#if NEON && defined(__ARM_FEATURE_MATMUL_INT8)
#define I8MM 1  /* two weight rows at a time against pairs of activation rows (neon_pair_sums) */
#else
#define I8MM 0
#endif

#define UNIT 32   /* values per activation scale */
#define GROUP 8   /* units reduced together: 256 values (K-quants: a super-block) */
/* Software prefetch distance of the one-row kernels, in super-blocks (~3.4 KB ahead): with 4 (576 / 840 bytes) a
 * 2-thread decode read rows of 16384 values at 22-24 GB/s, with these at 28-30 GB/s (Zen 4, AVX2 build). */
#define AHEAD_K45 24
#define AHEAD_Q6K 16
#define QUAD 4    /* blocks of 32 (Q4_0, Q5_0, Q8_0) are reduced 4 at a time: 128 values, every Gemma width */

static inline long is_b32(long type) { return type == 2 || type == 6 || type == 8; }  /* Q4_0, Q5_0, Q8_0 */
static inline long group_units(long type) { return is_b32(type) ? QUAD : GROUP; }

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else  /* exact in software: sign, exponent rebiased, subnormals normalised */
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff, u = (uint32_t)(h & 0x8000) << 16;
    if (e == 31) {
        u |= 0x7f800000 | (m << 13);
    } else if (e != 0) {
        u |= ((e + 112) << 23) | (m << 13);
    } else if (m != 0) {
        for (e = 113; !(m & 0x400); e--) m <<= 1;
        u |= (e << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

static inline float bf16_to_fp32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* ---- one weight group (8 units of 32) unpacked to unsigned or signed bytes, with its fp32 factors -------------
 * Every row of a group computes  sum_u  fw[u] * d_a[u] * (sum_i w[u][i] * q_a[u][i])  -  om[u] * fs_a[u]
 * except Q6_K, whose 16-value scales multiply in the integer domain (sc16) and whose -32 offset is exact there.
 * Units past K (tails of Q4_0/Q5_0/Q8_0 rows of 640 values...) are zero with zero factors. */
typedef struct {
    uint8_t w[GROUP][UNIT] __attribute__((aligned(32)));
    float fw[GROUP] __attribute__((aligned(32)));
    float om[GROUP] __attribute__((aligned(32)));
    int16_t sc16[GROUP][16] __attribute__((aligned(32)));  /* Q6_K: each unit's two sub-block scales, x8 each */
    int8_t sc[16];                                         /* Q6_K: the 16 scales of the group */
    int nu;                                                /* units present */
    int signed_w;                                          /* Q8_0: w holds int8 */
} group_t;

#if NEON
#include "neon.h"
#endif

/* ---- activation quantization ------------------------------------------------------------------------------- */

long act_units(long K) { return (K / UNIT + GROUP - 1) / GROUP * GROUP; }

/* Bytes of scratch for M rows of K values (one allocation; act_bind points an act_t into it). */
long act_bytes(long M, long K) {
    const long u = act_units(K);
    return M * u * (UNIT + 2 * (long)sizeof(float) + 2 * (long)sizeof(int16_t) + 3 * (long)sizeof(int32_t)) + 64;
}

static void act_bind(act_t *a, void *buf, const float *x, long M, long K) {
    const long u = act_units(K);
    uint8_t *p = (uint8_t *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    a->q = (int8_t *)p;
    a->d = (float *)(p + M * u * UNIT);
    a->fs = a->d + M * u;
    a->s16 = (int16_t *)(a->fs + M * u);
    a->n32 = (int32_t *)(a->s16 + M * u * 2);
    a->c128 = a->n32 + M * u * 2;
    a->x = x;
    a->rows = M, a->cols = K, a->units = u;
}

/* Row m: per unit of 32, d = max|x| / 127, q = round(x / d) (ties to even), unit sums; units past K are zero. */
static void quantize_row(const float *x, long K, long units, int8_t *q, float *d, float *fs, int16_t *s16,
                         int32_t *n32, int32_t *c128) {
    const long nu = K / UNIT;
    for (long u = 0; u < units; u++) {
        if (u >= nu) {
            memset(q + u * UNIT, 0, UNIT);
            d[u] = fs[u] = 0.0f;
            s16[2 * u] = s16[2 * u + 1] = 0;
            n32[2 * u] = n32[2 * u + 1] = 0;
            c128[u] = 0;
            continue;
        }
        const float *xu = x + u * UNIT;
        int s0 = 0, s1 = 0;
        float du;
#if defined(__AVX2__)
        /* the same values as the scalar loop below: max |x|, x * (1 / d) rounded to nearest even */
        const __m256 sign = _mm256_set1_ps(-0.0f);
        const __m256 x0 = _mm256_loadu_ps(xu), x1 = _mm256_loadu_ps(xu + 8), x2 = _mm256_loadu_ps(xu + 16),
                     x3 = _mm256_loadu_ps(xu + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, x0), _mm256_andnot_ps(sign, x1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, x2), _mm256_andnot_ps(sign, x3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        du = _mm_cvtss_f32(m4) / 127.0f;
        const __m256 id = _mm256_set1_ps(du != 0.0f ? 1.0f / du : 0.0f);
        enum { rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC };  /* a constant, as clang requires */
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x0, id), rnd));
        const __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x1, id), rnd));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x2, id), rnd));
        const __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x3, id), rnd));
        /* pack to int8 in order: packs interleave 128-bit lanes, the permute restores 0..31 */
        const __m256i w16a = _mm256_packs_epi32(i0, i1), w16b = _mm256_packs_epi32(i2, i3);
        const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16a, w16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + u * UNIT), b8);
        const __m256i lo = _mm256_add_epi32(i0, i1), hi = _mm256_add_epi32(i2, i3);
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        s0 = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
        t = _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        s1 = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
#elif NEON
        du = neon_quantize_unit(xu, q + u * UNIT, &s0, &s1);
#else
        float amax = 0.0f;
        for (int i = 0; i < UNIT; i++) amax = fmaxf(amax, fabsf(xu[i]));
        du = amax / 127.0f;
        const float id = du != 0.0f ? 1.0f / du : 0.0f;
        for (int i = 0; i < UNIT; i++) {
            const int v = (int)nearbyintf(xu[i] * id);
            q[u * UNIT + i] = (int8_t)v;
            if (i < 16) s0 += v; else s1 += v;
        }
#endif
        d[u] = du;
        fs[u] = du * (float)(s0 + s1);
        s16[2 * u] = (int16_t)s0, s16[2 * u + 1] = (int16_t)s1;
        n32[2 * u] = -32 * s0, n32[2 * u + 1] = -32 * s1;
        c128[u] = 128 * (s0 + s1);
    }
}


#if !defined(__AVX2__)
static void kmins(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {  /* Q4_K/Q5_K 6-bit scales and mins */
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}
#endif

#if defined(__AVX2__)
static inline __m256i nibbles_lo(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
static inline __m256i nibbles_hi(__m256i v) {
    return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
}

/* Q6_K: unit u's two 16-value sub-block scales, each repeated over its 8 int16 lanes (from the 16 scales as int16) */
static inline __m256i q6k_unit_scales(__m256i scv, int u) {
    const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                          2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    return _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(scv, _mm256_set1_epi32(u)), pick);
}

/* Q4_K / Q5_K: the 12 packed bytes -> the 8 sub-block scales and 8 mins as floats (6 bits each, see kmins). */
static inline void k_scales(const uint8_t *p, __m256 *sc, __m256 *mn) {
    uint32_t s[3];
    memcpy(s, p, 12);
    const uint32_t u0 = s[0] & 0x3f3f3f3f, u1 = (s[2] & 0x0f0f0f0f) | ((s[0] >> 2) & 0x30303030);
    const uint32_t u2 = s[1] & 0x3f3f3f3f, u3 = ((s[2] >> 4) & 0x0f0f0f0f) | ((s[1] >> 2) & 0x30303030);
    *sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)u1, (int)u0)));
    *mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)u3, (int)u2)));
}
#endif

/* Blocks of 32 (Q4_0, Q5_0, Q8_0): group g of a row = blocks 8g .. 8g+7. */
static void prep_b32(group_t *G, const uint8_t *row, long type, long g, long nb) {
    const long bsz = type == T_Q4_0 ? 18 : type == T_Q5_0 ? 22 : 34;
    const long b0 = g * QUAD;
    G->nu = (int)(nb - b0 < QUAD ? nb - b0 : QUAD);
    G->signed_w = type == T_Q8_0;
    const float off = type == T_Q4_0 ? 8.0f : type == T_Q5_0 ? 16.0f : 0.0f;
    for (int u = 0; u < QUAD; u++) {
        if (u >= G->nu) {
            memset(G->w[u], 0, UNIT);
            G->fw[u] = G->om[u] = 0.0f;
            continue;
        }
        const uint8_t *b = row + (b0 + u) * bsz;
        const float d = fp16_to_fp32(rd16(b));
        G->fw[u] = d;
        G->om[u] = off * d;
        if (type == T_Q8_0) {
            memcpy(G->w[u], b + 2, UNIT);
            continue;
        }
        const uint8_t *qs = b + (type == T_Q4_0 ? 2 : 6);
#if defined(__AVX2__)
        const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
        __m256i v = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
        if (type == T_Q5_0) {
            uint32_t qh;
            memcpy(&qh, b + 2, 4);
            v = _mm256_or_si256(v, bits_to_0x10(qh));
        }
        _mm256_store_si256((__m256i *)G->w[u], v);
#else
        uint32_t qh = 0;
        if (type == T_Q5_0) memcpy(&qh, b + 2, 4);
        for (int i = 0; i < 16; i++) {
            G->w[u][i] = (qs[i] & 0xF) | (((qh >> i) & 1) << 4);
            G->w[u][i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
        }
#endif
    }
}

/* Q4_K / Q5_K: group g = super-block g (256 values, 8 sub-blocks of 32 with 6-bit scales and mins). */
static void prep_k45(group_t *G, const uint8_t *row, long type, long g) {
    const uint8_t *b = row + g * (type == T_Q4_K ? 144 : 176);
    const float d = fp16_to_fp32(rd16(b)), dmin = fp16_to_fp32(rd16(b + 2));
    G->nu = GROUP, G->signed_w = 0;
#if defined(__AVX2__)
    __m256 sc, mn;
    k_scales(b + 4, &sc, &mn);
    _mm256_store_ps(G->fw, _mm256_mul_ps(_mm256_set1_ps(d), sc));
    _mm256_store_ps(G->om, _mm256_mul_ps(_mm256_set1_ps(dmin), mn));
#else
    uint8_t sc[8], mn[8];
    kmins(b + 4, sc, mn);
    for (int j = 0; j < 8; j++) G->fw[j] = d * (float)sc[j], G->om[j] = dmin * (float)mn[j];
#endif
    const uint8_t *qh = b + 16, *qs = type == T_Q4_K ? b + 16 : b + 48;
#if defined(__AVX2__)
    const __m256i h = type == T_Q5_K ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * i));
        __m256i lo = nibbles_lo(v), hi = nibbles_hi(v);
        if (type == T_Q5_K) {
            const __m256i m0 = _mm256_set1_epi8((char)(1 << (2 * i))), m1 = _mm256_set1_epi8((char)(2 << (2 * i)));
            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, m0), m0),
                                                      _mm256_set1_epi8(0x10)));
            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, m1), m1),
                                                      _mm256_set1_epi8(0x10)));
        }
        _mm256_store_si256((__m256i *)G->w[2 * i], lo);
        _mm256_store_si256((__m256i *)G->w[2 * i + 1], hi);
    }
#else
    for (int i = 0; i < 4; i++)
        for (int l = 0; l < 32; l++) {
            uint8_t lo = qs[32 * i + l] & 0xF, hi = qs[32 * i + l] >> 4;
            if (type == T_Q5_K) {
                lo |= ((qh[l] >> (2 * i)) & 1) << 4;
                hi |= ((qh[l] >> (2 * i + 1)) & 1) << 4;
            }
            G->w[2 * i][l] = lo, G->w[2 * i + 1][l] = hi;
        }
#endif
}

/* Q6_K: group g = super-block g (256 values: ql[128], qh[64], 16 int8 scales, fp16 d); values 0..63, offset 32. */
static void prep_q6k(group_t *G, const uint8_t *row, long g) {
    const uint8_t *b = row + g * 210, *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = fp16_to_fp32(rd16(b + 208));
    G->nu = GROUP, G->signed_w = 0;
    memcpy(G->sc, sc, 16);
#if defined(__AVX2__)
    _mm256_store_ps(G->fw, _mm256_set1_ps(d));
    _mm256_store_ps(G->om, _mm256_setzero_ps());
    const __m256i scv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
    for (int u = 0; u < 8; u++) _mm256_store_si256((__m256i *)G->sc16[u], q6k_unit_scales(scv, u));
#else
    for (int u = 0; u < 8; u++) {
        G->fw[u] = d, G->om[u] = 0.0f;
        for (int i = 0; i < 8; i++) G->sc16[u][i] = sc[2 * u], G->sc16[u][i + 8] = sc[2 * u + 1];
    }
#endif
    for (int half = 0; half < 2; half++) {
        const uint8_t *l = ql + 64 * half, *h = qh + 32 * half;
        uint8_t (*w)[UNIT] = G->w + 4 * half;
#if defined(__AVX2__)
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)l), l1 = _mm256_loadu_si256((const __m256i *)(l + 32));
        const __m256i hv = _mm256_loadu_si256((const __m256i *)h), m3 = _mm256_set1_epi8(3);
        const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(hv, m3), 4);
        const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2), m3), 4);
        const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 4), m3), 4);
        const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 6), m3), 4);
        _mm256_store_si256((__m256i *)w[0], _mm256_or_si256(nibbles_lo(l0), h0));
        _mm256_store_si256((__m256i *)w[1], _mm256_or_si256(nibbles_lo(l1), h1));
        _mm256_store_si256((__m256i *)w[2], _mm256_or_si256(nibbles_hi(l0), h2));
        _mm256_store_si256((__m256i *)w[3], _mm256_or_si256(nibbles_hi(l1), h3));
#else
        for (int i = 0; i < 32; i++) {
            w[0][i] = (l[i] & 0xF) | ((h[i] & 3) << 4);
            w[1][i] = (l[i + 32] & 0xF) | (((h[i] >> 2) & 3) << 4);
            w[2][i] = (l[i] >> 4) | (((h[i] >> 4) & 3) << 4);
            w[3][i] = (l[i + 32] >> 4) | (((h[i] >> 6) & 3) << 4);
        }
#endif
    }
}

static void prep_group(group_t *G, const uint8_t *row, long type, long g, long K) {
    if (type == T_Q4_K || type == T_Q5_K) prep_k45(G, row, type, g);
    else if (type == T_Q6_K) prep_q6k(G, row, g);
    else prep_b32(G, row, type, g, K / UNIT);
}

/* ---- one group x one activation row ---------------------------------------------------------------------------- */

#if defined(__AVX2__)
/* Sum of the 32 products of unsigned w and signed a, as 8 int32 partial sums. */
static inline __m256i udot(__m256i w, __m256i a) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, a);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1));
#endif
}

/* Without VNNI, 4- and 5-bit weights (Q4_0, Q5_0, Q4_K, Q5_K) keep maddubs' 16 int16 pair sums per unit (each at
 * most 2 x 31 x 127 = 7874) and reduce them with two rounds of hadd_epi16 (at most 4 x 7874 = 31496: no wrap)
 * before one madd to int32: 2 multiplies per 4 units instead of 4 madds, the same integers. Q8_0 (pair sums up to
 * 32258) and VNNI builds reduce int32 partial sums. */
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define NARROW 0
#else
#define NARROW 1
#endif

/* udot's partial sums, or (NARROW) the int16 pair sums: for the reduce*n functions only. */
static inline __m256i udot_n(__m256i w, __m256i a) {
#if NARROW
    return _mm256_maddubs_epi16(w, a);
#else
    return udot(w, a);
#endif
}

/* Q6_K: per 16 values, the sub-block scale multiplies the integer sums (exact). */
static inline __m256i udot_scaled(__m256i w, __m256i a, __m256i sc16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), sc16);
}

static inline __attribute__((always_inline)) __m256i unit_dot(const group_t *G, long type, int u, const int8_t *aq) {
    const __m256i w = _mm256_load_si256((const __m256i *)G->w[u]);
    const __m256i a = _mm256_loadu_si256((const __m256i *)(aq + u * UNIT));
    if (type == T_Q8_0) return udot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    return udot(w, a);
}

/* Lane u of the result = the sum of p[u]'s 8 lanes. */
static inline float hsum4(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Lane u of the result = the sum of p[u]'s 8 lanes (4 units). */
static inline __m128i reduce4(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {
    const __m256i c = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
    return _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
}

static inline __m256i reduce8(__m256i p0, __m256i p1, __m256i p2, __m256i p3, __m256i p4, __m256i p5, __m256i p6,
                              __m256i p7) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p4, p5), _mm256_hadd_epi32(p6, p7));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* Per 128-bit half, the sums of p0..p3 over that half as int32 (udot_n's partial sums). */
static inline __m256i halves4n(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {
#if NARROW
    return _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(p0, p1), _mm256_hadd_epi16(p2, p3)),
                             _mm256_set1_epi16(1));
#else
    return _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
#endif
}

/* reduce4 and reduce8 over udot_n's partial sums: the same integers, in the same lanes. */
static inline __m128i reduce4n(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {
    const __m256i c = halves4n(p0, p1, p2, p3);
    return _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
}

static inline __m256i reduce8n(__m256i p0, __m256i p1, __m256i p2, __m256i p3, __m256i p4, __m256i p5, __m256i p6,
                               __m256i p7) {
    const __m256i a = halves4n(p0, p1, p2, p3), b = halves4n(p4, p5, p6, p7);
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

#endif


/* Per lane (one per unit): dot += isum * (fw * d_a), off += om * fs_a (blocks of 32: off += fw * fs_a, times the
 * offset at the end, as row1_b32); the total is the lanes' sum, dot - off, in the AVX2 path's order. */
typedef struct {
#if defined(__AVX2__)
    __m256 dot, off;     /* K-quants: 8 lanes, one per unit of a super-block */
    __m128 dot4, off4;   /* Q4_0 / Q5_0 / Q8_0: 4 lanes, one per block of a quad */
#elif NEON
    float32x4_t dot[2], off[2];  /* lanes 0-3 and 4-7 (blocks of 32: 0-3 only) */
#else
    float dot[GROUP], off[GROUP];
#endif
} acc_t;

#if defined(__AVX2__)
/* The 8 exact integer unit sums of one group and one activation row (Q6_K: scales and -32 offset applied). */
static inline __attribute__((always_inline)) __m256i group_z(const group_t *G, long type, const int8_t *aq,
                                                             const int16_t *as16) {
    if (type == T_Q6_K) {
        __m256i p[8];
        for (int u = 0; u < 8; u++)
            p[u] = udot_scaled(_mm256_load_si256((const __m256i *)G->w[u]),
                               _mm256_loadu_si256((const __m256i *)(aq + u * UNIT)),
                               _mm256_load_si256((const __m256i *)G->sc16[u]));
        const __m256i z = reduce8(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
        /* -32 * sum over the unit's two sub-blocks of scale * (sum of their 16 activations) */
        const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)G->sc));
        const __m256i corr = _mm256_madd_epi16(sc, _mm256_loadu_si256((const __m256i *)as16));
        return _mm256_sub_epi32(z, _mm256_slli_epi32(corr, 5));
    }
#define UD(u) udot_n(_mm256_load_si256((const __m256i *)G->w[u]), _mm256_loadu_si256((const __m256i *)(aq + (u) * UNIT)))
    return reduce8n(UD(0), UD(1), UD(2), UD(3), UD(4), UD(5), UD(6), UD(7));  /* Q4_K, Q5_K: unsigned, <= 31 */
#undef UD
}
#endif

#if !defined(__AVX2__) && !NEON
/* The exact integer sum of each unit of a group with one activation row (Q6_K: scales and -32 offset applied). */
static inline __attribute__((always_inline)) void group_sums(const group_t *G, long type, const int8_t *aq,
                                                             const int16_t *as16, int32_t z[GROUP]) {
    for (int u = 0; u < group_units(type); u++) {
        int32_t s = 0;
        if (type == T_Q6_K) {
            int32_t s0 = 0, s1 = 0;
            for (int i = 0; i < 16; i++) s0 += (int32_t)G->w[u][i] * aq[u * UNIT + i];
            for (int i = 16; i < 32; i++) s1 += (int32_t)G->w[u][i] * aq[u * UNIT + i];
            s = G->sc[2 * u] * (s0 - 32 * as16[2 * u]) + G->sc[2 * u + 1] * (s1 - 32 * as16[2 * u + 1]);
        } else if (type == T_Q8_0) {
            for (int i = 0; i < UNIT; i++) s += (int32_t)(int8_t)G->w[u][i] * aq[u * UNIT + i];
        } else {
            for (int i = 0; i < UNIT; i++) s += (int32_t)G->w[u][i] * aq[u * UNIT + i];
        }
        z[u] = s;
    }
}

/* The AVX2 path's horizontal sum of 8 lanes (hsum): ((0+4) + (2+6)) + ((1+5) + (3+7)); of 4 lanes (hsum4):
 * (0+2) + (1+3). */
static inline float lanes_sum8(const float *t) {
    return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}
static inline float lanes_sum4(const float *t) { return (t[0] + t[2]) + (t[1] + t[3]); }
#endif

static inline float b32_offset(long type) { return type == T_Q4_0 ? 8.0f : 16.0f; }  /* Q4_0: -8, Q5_0: -16 */

#if NEON
/* One group's unit sums z (lanes as neon_group_sums) into a row's accumulators. */
static inline __attribute__((always_inline)) acc_t neon_acc(acc_t acc, const group_t *G, long type,
                                                            const int32x4_t z[2], const float *ad, const float *afs) {
    const int b32 = is_b32(type);
    for (int h = 0; h < 2 - b32; h++) {
        const float32x4_t f = vmulq_f32(vld1q_f32(G->fw + 4 * h), vld1q_f32(ad + 4 * h));
        acc.dot[h] = vfmaq_f32(acc.dot[h], vcvtq_f32_s32(z[h]), f);
        acc.off[h] = vfmaq_f32(acc.off[h], vld1q_f32((b32 ? G->fw : G->om) + 4 * h), vld1q_f32(afs + 4 * h));
    }
    return acc;
}
#endif

/* Accumulators go in and out by value, so they stay in registers (through a pointer GCC kept them on the stack:
 * a store-to-load round trip per group). */
static inline __attribute__((always_inline)) acc_t group_row(const group_t *G, long type, const int8_t *aq,
                                                             const float *ad, const float *afs, const int16_t *as16,
                                                             acc_t acc) {
#if defined(__AVX2__)
    if (is_b32(type)) {  /* blocks of 32: one quad (unused: rows_b32 reads these blocks directly) */
        const __m128i z = reduce4(unit_dot(G, type, 0, aq), unit_dot(G, type, 1, aq), unit_dot(G, type, 2, aq),
                                  unit_dot(G, type, 3, aq));
        const __m128 f = _mm_mul_ps(_mm_load_ps(G->fw), _mm_loadu_ps(ad));
        acc.dot4 = _mm_fmadd_ps(_mm_cvtepi32_ps(z), f, acc.dot4);
        acc.off4 = _mm_fmadd_ps(_mm_load_ps(G->fw), _mm_loadu_ps(afs), acc.off4);
        return acc;
    }
    const __m256i z = group_z(G, type, aq, as16);
    const __m256 f = _mm256_mul_ps(_mm256_load_ps(G->fw), _mm256_loadu_ps(ad));
    acc.dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(z), f, acc.dot);
    acc.off = _mm256_fmadd_ps(_mm256_load_ps(G->om), _mm256_loadu_ps(afs), acc.off);
#elif NEON
    int32x4_t z[2];
    neon_group_sums(G, type, aq, as16, z);
    acc = neon_acc(acc, G, type, z, ad, afs);
#else
    int32_t z[GROUP];
    group_sums(G, type, aq, as16, z);
    for (int u = 0; u < group_units(type); u++) {
        acc.dot[u] = fmaf((float)z[u], G->fw[u] * ad[u], acc.dot[u]);
        acc.off[u] = fmaf(is_b32(type) ? G->fw[u] : G->om[u], afs[u], acc.off[u]);
    }
#endif
    return acc;
}

static inline __attribute__((always_inline)) float acc_total(acc_t acc, long type) {
#if defined(__AVX2__)
    if (is_b32(type))
        return hsum4(type == T_Q8_0 ? acc.dot4 : _mm_fnmadd_ps(acc.off4, _mm_set1_ps(b32_offset(type)), acc.dot4));
    const __m256 v = _mm256_sub_ps(acc.dot, acc.off);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#elif NEON
    float32x4_t v;
    if (is_b32(type))
        v = type == T_Q8_0 ? acc.dot[0] : vfmsq_f32(acc.dot[0], acc.off[0], vdupq_n_f32(b32_offset(type)));
    else
        v = vaddq_f32(vsubq_f32(acc.dot[0], acc.off[0]), vsubq_f32(acc.dot[1], acc.off[1]));
    const float32x2_t s = vadd_f32(vget_low_f32(v), vget_high_f32(v));
    return vget_lane_f32(s, 0) + vget_lane_f32(s, 1);
#else
    float t[GROUP];
    if (is_b32(type)) {
        for (int u = 0; u < QUAD; u++)
            t[u] = type == T_Q8_0 ? acc.dot[u] : fmaf(-acc.off[u], b32_offset(type), acc.dot[u]);
        return lanes_sum4(t);
    }
    for (int u = 0; u < GROUP; u++) t[u] = acc.dot[u] - acc.off[u];
    return lanes_sum8(t);
#endif
}

static inline __attribute__((always_inline)) acc_t acc_zero(void) {
    acc_t acc;
#if defined(__AVX2__)
    acc.dot = acc.off = _mm256_setzero_ps();
    acc.dot4 = acc.off4 = _mm_setzero_ps();
#elif NEON
    acc.dot[0] = acc.dot[1] = acc.off[0] = acc.off[1] = vdupq_n_f32(0.0f);
#else
    for (int u = 0; u < GROUP; u++) acc.dot[u] = acc.off[u] = 0.0f;
#endif
    return acc;
}

#if defined(__AVX2__)
/* ---- decode: one weight row x one activation row, unpacked in registers (no group buffer) -------------------- */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 4 fp16 values `stride` bytes apart (0 past n), as floats: built in a register (a narrow-store/wide-load buffer
 * would stall store-to-load forwarding every quad). */
static inline __m128 f16x4(const uint8_t *p, long stride, int n) {
    __m128i h = _mm_cvtsi32_si128(rd16(p));
    if (n > 1) h = _mm_insert_epi16(h, rd16(p + stride), 1);
    if (n > 2) h = _mm_insert_epi16(h, rd16(p + 2 * stride), 2);
    if (n > 3) h = _mm_insert_epi16(h, rd16(p + 3 * stride), 3);
    return _mm_cvtph_ps(h);
}

/* The dot product of one Q4_0 / Q5_0 / Q8_0 block (unit) with 32 int8 activations, as 8 int32 partial sums. */
static inline __attribute__((always_inline)) __m256i b32_dot(const uint8_t *b, long type, __m256i a) {
    if (type == T_Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(b + 2));
        return udot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    }
    const __m128i raw = _mm_loadu_si128((const __m128i *)(b + (type == T_Q4_0 ? 2 : 6)));
    __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    if (type == T_Q5_0) {
        uint32_t qh;
        memcpy(&qh, b + 2, 4);
        w = _mm256_or_si256(w, bits_to_0x10(qh));
    }
    return udot_n(w, a);  /* Q4_0 / Q5_0: reduced by reduce4t */
}

/* The 4 unit sums of a quad of b32_dot results. */
static inline __attribute__((always_inline)) __m128i reduce4t(long type, __m256i p0, __m256i p1, __m256i p2,
                                                              __m256i p3) {
    return type == T_Q8_0 ? reduce4(p0, p1, p2, p3) : reduce4n(p0, p1, p2, p3);
}

/* Q4_0 / Q5_0 / Q8_0 row, in quads of 4 blocks (128 values: every Gemma width is a multiple, 640 included); the
 * float accumulation runs on 4 lanes per quad, exactly as group_row does for these types. */
static inline __attribute__((always_inline)) float row1_b32(const uint8_t *row, long type, long nb,
                                                            const int8_t *aq, const float *ad, const float *afs) {
    const long bsz = type == T_Q4_0 ? 18 : type == T_Q5_0 ? 22 : 34;
    const float off = type == T_Q4_0 ? 8.0f : 16.0f;
    __m128 acc = _mm_setzero_ps(), acc_off = _mm_setzero_ps();
    long q0 = 0;
    for (; q0 + 4 <= nb; q0 += 4) {
        const uint8_t *blk = row + q0 * bsz;
        _mm_prefetch((const char *)(blk + 16 * bsz), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + 16 * bsz + 64), _MM_HINT_T0);
        const int8_t *a = aq + q0 * UNIT;
        const __m128i z = reduce4t(type, b32_dot(blk, type, _mm256_load_si256((const __m256i *)a)),
                                   b32_dot(blk + bsz, type, _mm256_load_si256((const __m256i *)(a + 32))),
                                   b32_dot(blk + 2 * bsz, type, _mm256_load_si256((const __m256i *)(a + 64))),
                                   b32_dot(blk + 3 * bsz, type, _mm256_load_si256((const __m256i *)(a + 96))));
        const __m128 dw = f16x4(blk, bsz, 4);
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(z), _mm_mul_ps(dw, _mm_load_ps(ad + q0)), acc);
        if (type != T_Q8_0) acc_off = _mm_fmadd_ps(dw, _mm_load_ps(afs + q0), acc_off);
    }
    if (q0 < nb) {  /* a short last quad (widths that are not a multiple of 128) */
        const int n = (int)(nb - q0);
        const uint8_t *blk = row + q0 * bsz;
        __m256i p[4];
        for (int u = 0; u < 4; u++)
            p[u] = u < n ? b32_dot(blk + u * bsz, type, _mm256_load_si256((const __m256i *)(aq + (q0 + u) * UNIT)))
                         : _mm256_setzero_si256();
        const __m128 dw = f16x4(blk, bsz, n);
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(reduce4t(type, p[0], p[1], p[2], p[3])), _mm_mul_ps(dw, _mm_load_ps(ad + q0)),
                           acc);
        if (type != T_Q8_0) acc_off = _mm_fmadd_ps(dw, _mm_load_ps(afs + q0), acc_off);
    }
    if (type == T_Q8_0) return hsum4(acc);
    return hsum4(_mm_fnmadd_ps(acc_off, _mm_set1_ps(off), acc));
}

/* Prefetch `lines` cache lines at p: into L1, or for long rows into L2 only (a row of 16384 values has 20 KB of
 * activations that L1 must keep while the weights stream past: +5-10% there, -5-10% on short rows). */
#define LONG_ROW 32  /* super-blocks: rows of 8192 values and more */
static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *p, int lines, int long_row) {
    for (int c = 0; c < lines; c++) {
        if (long_row) _mm_prefetch((const char *)(p + 64 * c), _MM_HINT_T1);
        else _mm_prefetch((const char *)(p + 64 * c), _MM_HINT_T0);
    }
}

/* Q4_K / Q5_K row: per super-block, 8 sub-blocks with 6-bit scales and mins. */
static inline __attribute__((always_inline)) float row1_k45(const uint8_t *row, long type, long nsb,
                                                            const int8_t *aq, const float *ad, const float *afs) {
    const long bsz = type == T_Q4_K ? 144 : 176;
    __m256 acc = _mm256_setzero_ps(), acc_off = _mm256_setzero_ps();
    for (long g = 0; g < nsb; g++) {
        const uint8_t *b = row + g * bsz;
        prefetch_ahead(b + AHEAD_K45 * bsz, 3, nsb >= LONG_ROW);
        __m256 sc, mn;
        k_scales(b + 4, &sc, &mn);
        const int8_t *a = aq + g * 256;
        const uint8_t *qs = b + (type == T_Q4_K ? 16 : 48);
        __m256i h = type == T_Q5_K ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
        __m256i p[8];
        for (int i = 0; i < 4; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * i));
            __m256i lo = nibbles_lo(v), hi = nibbles_hi(v);
            if (type == T_Q5_K) {
                const __m256i m0 = _mm256_set1_epi8(1), m1 = _mm256_set1_epi8(2), x10 = _mm256_set1_epi8(0x10);
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, m0), m0), x10));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, m1), m1), x10));
                h = _mm256_srli_epi16(h, 2);
            }
            p[2 * i] = udot_n(lo, _mm256_load_si256((const __m256i *)(a + 64 * i)));
            p[2 * i + 1] = udot_n(hi, _mm256_load_si256((const __m256i *)(a + 64 * i + 32)));
        }
        const __m256i z = reduce8n(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
        const float d = fp16_to_fp32(rd16(b)), dmin = fp16_to_fp32(rd16(b + 2));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(z), _mm256_mul_ps(_mm256_mul_ps(sc, _mm256_set1_ps(d)),
                                                                   _mm256_load_ps(ad + 8 * g)), acc);
        acc_off = _mm256_fmadd_ps(_mm256_mul_ps(mn, _mm256_set1_ps(dmin)), _mm256_load_ps(afs + 8 * g), acc_off);
    }
    return hsum(_mm256_sub_ps(acc, acc_off));
}

/* Q6_K row: 16 sub-blocks of 16 with int8 scales, applied in the integer domain; the -32 offset too. */
static float row1_q6k(const uint8_t *row, long nsb, const int8_t *aq, const float *ad, const int16_t *as16) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i m3 = _mm256_set1_epi8(3);
    for (long g = 0; g < nsb; g++) {
        const uint8_t *b = row + g * 210;
        prefetch_ahead(b + AHEAD_Q6K * 210, 4, nsb >= LONG_ROW);
        const __m256i scv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
        const int8_t *a = aq + g * 256;
        __m256i p[8];
        for (int half = 0; half < 2; half++) {
            const uint8_t *l = b + 64 * half, *hq = b + 128 + 32 * half;
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)l), l1 = _mm256_loadu_si256((const __m256i *)(l + 32));
            const __m256i hv = _mm256_loadu_si256((const __m256i *)hq);
            const __m256i w[4] = {
                _mm256_or_si256(nibbles_lo(l0), _mm256_slli_epi16(_mm256_and_si256(hv, m3), 4)),
                _mm256_or_si256(nibbles_lo(l1), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2), m3), 4)),
                _mm256_or_si256(nibbles_hi(l0), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 4), m3), 4)),
                _mm256_or_si256(nibbles_hi(l1), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 6), m3), 4))};
            for (int j = 0; j < 4; j++) {
                const int u = 4 * half + j;
                p[u] = udot_scaled(w[j], _mm256_load_si256((const __m256i *)(a + 32 * u)), q6k_unit_scales(scv, u));
            }
        }
        __m256i z = reduce8(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
        const __m256i corr = _mm256_madd_epi16(scv, _mm256_loadu_si256((const __m256i *)(as16 + 16 * g)));
        z = _mm256_sub_epi32(z, _mm256_slli_epi32(corr, 5));
        const float d = fp16_to_fp32(rd16(b + 208));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(z), _mm256_mul_ps(_mm256_set1_ps(d), _mm256_load_ps(ad + 8 * g)), acc);
    }
    return hsum(acc);
}

static float row1(const qmat_t *W, long n, const act_t *A, long m) {
    const uint8_t *row = W->data + n * W->row_bytes;
    const long U = A->units, K = W->cols;
    const int8_t *aq = A->q + m * U * UNIT;
    const float *ad = A->d + m * U, *afs = A->fs + m * U;
    switch (W->type) {
        case T_Q8_0: return row1_b32(row, T_Q8_0, K / UNIT, aq, ad, afs);
        case T_Q4_0: return row1_b32(row, T_Q4_0, K / UNIT, aq, ad, afs);
        case T_Q5_0: return row1_b32(row, T_Q5_0, K / UNIT, aq, ad, afs);
        case T_Q4_K: return row1_k45(row, T_Q4_K, K / 256, aq, ad, afs);
        case T_Q5_K: return row1_k45(row, T_Q5_K, K / 256, aq, ad, afs);
        default: return row1_q6k(row, K / 256, aq, ad, A->s16 + m * U * 2);
    }
}
#endif

#define MR 8  /* activation rows per pass over a weight row: each unpacked group serves them all */

/* One weight row, its groups already unpacked (G[0 .. groups-1]), against activation rows m0 .. m1-1. */
static inline __attribute__((always_inline)) void rows_int_t(const group_t *G, long groups, long type,
                                                             const act_t *A, long m0, long m1, float *y, long ldy,
                                                             long n) {
    const long U = A->units;
    const long gw = group_units(type);
#define ROW_ARGS(m, g) G + (g), type, A->q + ((m) * U + (g) * gw) * UNIT, A->d + (m) * U + (g) * gw, \
        A->fs + (m) * U + (g) * gw, A->s16 + ((m) * U + (g) * gw) * 2
    long m = m0;
    for (; m + 4 <= m1; m += 4) {  /* 4 rows per pass: the unpacked weights are loaded once for them */
        acc_t a0 = acc_zero(), a1 = acc_zero(), a2 = acc_zero(), a3 = acc_zero();
        for (long g = 0; g < groups; g++) {
            a0 = group_row(ROW_ARGS(m, g), a0);
            a1 = group_row(ROW_ARGS(m + 1, g), a1);
            a2 = group_row(ROW_ARGS(m + 2, g), a2);
            a3 = group_row(ROW_ARGS(m + 3, g), a3);
        }
        y[m * ldy + n] = acc_total(a0, type);
        y[(m + 1) * ldy + n] = acc_total(a1, type);
        y[(m + 2) * ldy + n] = acc_total(a2, type);
        y[(m + 3) * ldy + n] = acc_total(a3, type);
    }
    for (; m < m1; m++) {
        acc_t a0 = acc_zero();
        for (long g = 0; g < groups; g++) a0 = group_row(ROW_ARGS(m, g), a0);
        y[m * ldy + n] = acc_total(a0, type);
    }
#undef ROW_ARGS
}

#if defined(__AVX2__)
/* Blocks of 32 (Q4_0, Q5_0, Q8_0) for several activation rows, straight from the blocks: each quad's weights are
 * unpacked once (Q8_0: their absolute values) with their scales, for R rows (R = 4, then single rows). Per row the
 * arithmetic is row1_b32's, so results equal single-row calls bit for bit. */
static inline __attribute__((always_inline)) void b32_rows(const uint8_t *row, long type, long nb, const act_t *A,
                                                           long m, int R, float *y, long ldy, long n) {
    const long bsz = type == T_Q4_0 ? 18 : type == T_Q5_0 ? 22 : 34, U = A->units;
    const float off = type == T_Q4_0 ? 8.0f : 16.0f;
    __m128 acc[4], acc_off[4];
    for (int r = 0; r < 4; r++) acc[r] = acc_off[r] = _mm_setzero_ps();
    for (long q0 = 0; q0 < nb; q0 += 4) {
        const int nq = (int)(nb - q0 < 4 ? nb - q0 : 4);
        const uint8_t *blk = row + q0 * bsz;
        __m256i w[4], uw[4];  /* Q8_0: signed weights and their absolute values; others: unsigned weights */
        for (int u = 0; u < 4; u++) {
            const uint8_t *b = blk + u * bsz;
            if (u >= nq) {
                w[u] = uw[u] = _mm256_setzero_si256();
            } else if (type == T_Q8_0) {
                w[u] = _mm256_loadu_si256((const __m256i *)(b + 2));
                uw[u] = _mm256_sign_epi8(w[u], w[u]);
            } else {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(b + (type == T_Q4_0 ? 2 : 6)));
                uw[u] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
                if (type == T_Q5_0) {
                    uint32_t qh;
                    memcpy(&qh, b + 2, 4);
                    uw[u] = _mm256_or_si256(uw[u], bits_to_0x10(qh));
                }
            }
        }
        const __m128 dw = f16x4(blk, bsz, nq);
        for (int r = 0; r < R; r++) {
            const int8_t *a = A->q + ((m + r) * U + q0) * UNIT;
            __m256i p[4];
            for (int u = 0; u < 4; u++) {
                const __m256i av = _mm256_load_si256((const __m256i *)(a + u * UNIT));
                p[u] = type == T_Q8_0 ? udot(uw[u], _mm256_sign_epi8(av, w[u])) : udot_n(uw[u], av);
            }
            const __m128 f = _mm_mul_ps(dw, _mm_load_ps(A->d + (m + r) * U + q0));
            acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(reduce4t(type, p[0], p[1], p[2], p[3])), f, acc[r]);
            if (type != T_Q8_0) acc_off[r] = _mm_fmadd_ps(dw, _mm_load_ps(A->fs + (m + r) * U + q0), acc_off[r]);
        }
    }
    for (int r = 0; r < R; r++)
        y[(m + r) * ldy + n] = type == T_Q8_0 ? hsum4(acc[r]) : hsum4(_mm_fnmadd_ps(acc_off[r], _mm_set1_ps(off), acc[r]));
}

static void rows_b32(const uint8_t *row, long type, long K, const act_t *A, long m0, long m1, float *y, long ldy,
                     long n) {
    long m = m0;
#define B32_ROWS(T)                                                                 \
    for (; m + 4 <= m1; m += 4) b32_rows(row, T, K / UNIT, A, m, 4, y, ldy, n);     \
    for (; m < m1; m++) b32_rows(row, T, K / UNIT, A, m, 1, y, ldy, n);
    if (type == T_Q8_0) { B32_ROWS(T_Q8_0) } else if (type == T_Q4_0) { B32_ROWS(T_Q4_0) } else { B32_ROWS(T_Q5_0) }
#undef B32_ROWS
}
#endif

static void rows_int(const group_t *G, long groups, long type, const act_t *A, long m0, long m1, float *y, long ldy,
                     long n) {
    switch (type) {  /* one specialised loop per block type: the type tests leave the inner loop */
        case T_Q8_0: rows_int_t(G, groups, T_Q8_0, A, m0, m1, y, ldy, n); break;
        case T_Q4_0: rows_int_t(G, groups, T_Q4_0, A, m0, m1, y, ldy, n); break;  /* unsigned, 32 */
        case T_Q5_0: rows_int_t(G, groups, T_Q5_0, A, m0, m1, y, ldy, n); break;
        case T_Q6_K: rows_int_t(G, groups, T_Q6_K, A, m0, m1, y, ldy, n); break;
        default: rows_int_t(G, groups, T_Q4_K, A, m0, m1, y, ldy, n); break;  /* Q4_K, Q5_K: unsigned, mins */
    }
}

#if I8MM
/* Weight rows n and n+1, unpacked in G and G2, against activation rows m0 .. m1-1: pairs of rows through SMMLA,
 * then per (row, weight row) the float steps of group_row in its order, so every result equals rows_int_t's. */
static inline __attribute__((always_inline)) void rows_pair_t(const group_t *G, const group_t *G2, long groups,
                                                              long type, const act_t *A, long m0, long m1,
                                                              float *y, long ldy, long n) {
    const long U = A->units, gw = group_units(type);
    long m = m0;
    for (; m + 2 <= m1; m += 2) {
        acc_t acc[4] = {acc_zero(), acc_zero(), acc_zero(), acc_zero()};  /* (m, n) (m, n+1) (m+1, n) (m+1, n+1) */
        for (long g = 0; g < groups; g++) {
            const long o = m * U + g * gw, o1 = o + U;
            int32x4_t z[4][2];
            neon_pair_sums(G + g, G2 + g, type, A->q + o * UNIT, A->q + o1 * UNIT, A->s16 + o * 2, A->s16 + o1 * 2, z);
            acc[0] = neon_acc(acc[0], G + g, type, z[0], A->d + o, A->fs + o);
            acc[1] = neon_acc(acc[1], G2 + g, type, z[1], A->d + o, A->fs + o);
            acc[2] = neon_acc(acc[2], G + g, type, z[2], A->d + o1, A->fs + o1);
            acc[3] = neon_acc(acc[3], G2 + g, type, z[3], A->d + o1, A->fs + o1);
        }
        y[m * ldy + n] = acc_total(acc[0], type), y[m * ldy + n + 1] = acc_total(acc[1], type);
        y[(m + 1) * ldy + n] = acc_total(acc[2], type), y[(m + 1) * ldy + n + 1] = acc_total(acc[3], type);
    }
    if (m < m1) {  /* an odd last row: each weight row alone */
        rows_int_t(G, groups, type, A, m, m1, y, ldy, n);
        rows_int_t(G2, groups, type, A, m, m1, y, ldy, n + 1);
    }
}

static void rows_pair(const group_t *G, const group_t *G2, long groups, long type, const act_t *A, long m0,
                      long m1, float *y, long ldy, long n) {
    switch (type) {
        case T_Q8_0: rows_pair_t(G, G2, groups, T_Q8_0, A, m0, m1, y, ldy, n); break;
        case T_Q4_0: rows_pair_t(G, G2, groups, T_Q4_0, A, m0, m1, y, ldy, n); break;
        case T_Q5_0: rows_pair_t(G, G2, groups, T_Q5_0, A, m0, m1, y, ldy, n); break;
        case T_Q6_K: rows_pair_t(G, G2, groups, T_Q6_K, A, m0, m1, y, ldy, n); break;
        default: rows_pair_t(G, G2, groups, T_Q4_K, A, m0, m1, y, ldy, n); break;  /* Q4_K, Q5_K */
    }
}
#endif

#if defined(__AVX2__)
/* 8 weights of a float row from column k, as fp32. */
static inline __m256 float_w8(long type, const uint8_t *row, long k) {
    if (type == T_F32) return _mm256_loadu_ps((const float *)row + k);
#if defined(__F16C__)
    if (type == T_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k)));
#endif
    if (type == T_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k))), 16));
    float t[8];
    for (int i = 0; i < 8; i++) t[i] = fp16_to_fp32(rd16(row + 2 * (k + i)));
    return _mm256_loadu_ps(t);
}
#endif

/* One float weight row (F32/F16/BF16) against fp32 activation rows. */
static void row_float(const qmat_t *W, long n, const act_t *A, long m0, int mr, float *y, long ldy) {
    const uint8_t *row = W->data + n * W->row_bytes;
    const long K = W->cols;
    long k = 0;
#if defined(__AVX2__)
    __m256 acc[MR];
    if (mr == 1) {  /* one row (decode): its sum in a register, not in acc[] on the stack (~2.5x faster); the same
                       multiply-adds in the same order */
        const float *x = A->x + m0 * K;
        __m256 a = _mm256_setzero_ps();
        for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(float_w8(W->type, row, k), _mm256_loadu_ps(x + k), a);
        acc[0] = a;
    } else {
        for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
        for (; k + 8 <= K; k += 8) {
            const __m256 w = float_w8(W->type, row, k);
            for (int r = 0; r < mr; r++)
                acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(A->x + (m0 + r) * K + k), acc[r]);
        }
    }
    float out[MR];
    for (int r = 0; r < mr; r++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        out[r] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
#elif NEON
    float out[MR];
    neon_row_float(W->type, row, A->x + m0 * K, K, mr, out);
    k = K / 8 * 8;
#else  /* the AVX2 loop's 8 lanes, fused multiply-adds and horizontal sum */
    float acc[MR][8], out[MR];
    for (int r = 0; r < mr; r++)
        for (int i = 0; i < 8; i++) acc[r][i] = 0.0f;
    for (; k + 8 <= K; k += 8)
        for (int i = 0; i < 8; i++) {
            const float w = W->type == T_F32 ? ((const float *)row)[k + i]
                            : W->type == T_F16 ? fp16_to_fp32(rd16(row + 2 * (k + i)))
                                               : bf16_to_fp32(rd16(row + 2 * (k + i)));
            for (int r = 0; r < mr; r++) acc[r][i] = fmaf(w, A->x[(m0 + r) * K + k + i], acc[r][i]);
        }
    for (int r = 0; r < mr; r++) out[r] = lanes_sum8(acc[r]);
#endif
    for (; k < K; k++) {
        const float w = W->type == T_F32 ? ((const float *)row)[k]
                        : W->type == T_F16 ? fp16_to_fp32(rd16(row + 2 * k)) : bf16_to_fp32(rd16(row + 2 * k));
        for (int r = 0; r < mr; r++) out[r] += w * A->x[(m0 + r) * K + k];
    }
    for (int r = 0; r < mr; r++) y[(m0 + r) * ldy + n] = out[r];
}

static int is_float(long type) { return type == T_F32 || type == T_F16 || type == T_BF16; }

int qtype_supported(long type) {
    return is_float(type) || type == T_Q4_0 || type == T_Q5_0 || type == T_Q8_0 || type == T_Q4_K ||
           type == T_Q5_K || type == T_Q6_K;
}

/* qmatmul (prefill) products of this many rows go through tiles.c; up to 16 (a full decode batch) the tied head's
 * product keeps batch.c's exact kernels, so a row's logits do not depend on the batch. The native step's products
 * (qmatmul_team) stay exact at any row count. */
#define TILE_ROWS 17
#define NB 16   /* weight rows per task: their bytes stay in L2 while every activation tile passes */
#define MC_BYTES (192 << 10)  /* int8 activation bytes per pass over a task's weight rows: they stay in L2 */

/* Several products sharing one activation (q, k and v of a layer; gate and up): the tasks are NB-row blocks of every
 * matrix. Decode steps and batches claim them in guided chunks (claim()): a worker whose core the server's event
 * loop or its clients take runs fewer, instead of the step waiting for it. Prefill (tiles) keeps worker `tid`'s
 * static share: guided chunks measured 1029-1203 against 1182-1362 tok/s for the 270M's 512-token prefill, within
 * this 2-core VM's noise but not better. Y_i[m, :] is written at y[i] + m * ldy[i]. Each
 * weight row is unpacked once per MC activation rows (once per call in decode and batches; MC keeps those rows'
 * int8 values in L2), then every row reads it from L1. G: this worker's group buffer (group_bytes). */
static void matmuls_share(const qmat_t *W, int n_mats, const act_t *A, float *const *y, const long *ldy, int tid,
                          int nth, team_t *team, group_t *G, void *tiles) {
    long first[9], total = 0;
    for (int i = 0; i < n_mats; i++) first[i] = total, total += (W[i].rows + NB - 1) / NB;
    first[n_mats] = total;
    const long M = A->rows;
    long MC = A->units ? MC_BYTES / (A->units * UNIT) : 256;  /* no units: float rows narrower than 32 */
    MC = MC < 4 ? 4 : MC > 256 ? 256 : MC;
    long t = 0, t1 = 0;
    if (tiles) share(total, tid, nth, &t, &t1);  /* prefill: guided chunks measured no faster (see above) */
    for (; t < t1 || (!tiles && claim(team, total, nth, &t, &t1)); t++) {  /* a share, or each claimed chunk */
        int i = 0;
        while (t >= first[i + 1]) i++;
        const qmat_t *w = W + i;
        const long n0 = (t - first[i]) * NB, n1 = n0 + NB < w->rows ? n0 + NB : w->rows;
        const long groups = (w->cols / UNIT + group_units(w->type) - 1) / group_units(w->type);
        if (tiles && M >= TILE_ROWS && tiles_cover(w->type)) {  /* prefill: register tiles (tiles.c) */
            tiles_rows(w, n0, n1, A, y[i], ldy[i], tiles);
            continue;
        }
        /* decode batches, drafts: exact register tiles (batch.c), faster than the loops below from 2 rows (the
         * Gemma 1 2B shape's matrices from memory, 2 cores: 116 vs 148 ms at 2 rows, 175 vs 254 ms at 8) */
        if (M >= 2 && batch_cover(w->type)) {
            batch_rows(w, n0, n1, A, y[i], ldy[i], G);
            continue;
        }
        for (long m0 = 0; m0 < M; m0 += MC) {
            const long m1 = m0 + MC < M ? m0 + MC : M;
            for (long n = n0; n < n1; n++) {
                if (is_float(w->type)) {
                    for (long m = m0; m < m1; m += MR)
                        row_float(w, n, A, m, (int)(m1 - m < MR ? m1 - m : MR), y[i], ldy[i]);
                    continue;
                }
#if defined(__AVX2__)
                if (M == 1) {
                    y[i][n] = row1(w, n, A, 0);
                    continue;
                }
#endif
                const uint8_t *row = w->data + n * w->row_bytes;
#if defined(__AVX2__)
                if (is_b32(w->type)) {  /* blocks of 32: unpacked in registers, a quad at a time */
                    rows_b32(row, w->type, w->cols, A, m0, m1, y[i], ldy[i], n);
                    continue;
                }
#endif
#if I8MM
                if (m1 - m0 >= 2 && n + 1 < n1) {  /* two weight rows at once (group_bytes holds both) */
                    for (long g = 0; g < groups; g++) {
                        prep_group(G + g, row, w->type, g, w->cols);
                        prep_group(G + groups + g, row + w->row_bytes, w->type, g, w->cols);
                    }
                    rows_pair(G, G + groups, groups, w->type, A, m0, m1, y[i], ldy[i], n);
                    n++;
                    continue;
                }
#endif
                for (long g = 0; g < groups; g++) prep_group(G + g, row, w->type, g, w->cols);
                rows_int(G, groups, w->type, A, m0, m1, y[i], ldy[i], n);
            }
        }
    }
}

/* Bytes of one worker's group buffer for rows of up to K values (64-byte multiples, so buffers can sit side by side). */
long group_bytes(long K) {
    const long max_groups = (K / UNIT + QUAD - 1) / QUAD;
    const long b = (long)(sizeof(group_t) * max_groups * (I8MM ? 2 : 1));  /* i8mm: two rows' groups */
    const long x = batch_bytes(K);  /* or batch.c's tile (K-quant rows: K a multiple of 256) */
    return ((b > x ? b : x) + 63) / 64 * 64;
}

/* Y_i = X @ W_i^T for n_mats matrices of the same K (at most 8), by worker `tid` of `nth`: every worker calls it
 * with the same arguments and its own group buffer (group_bytes; unused by one-row AVX2 products). X [M, K] fp32
 * (complete before the call: the team waits at a barrier first) is quantized once, each worker a share of its
 * units; Y is complete only after the caller's next barrier. */
static void qmatmul_run(const qmat_t *W, int n_mats, const float *x, long M, float *const *y, const long *ldy,
                        void *scratch, void *groups, void *tiles, int tid, int nth, team_t *team) {
    act_t A;
    const long K = W[0].cols;
    act_bind(&A, scratch, x, M, K);
    int quantized = 0;
    for (int i = 0; i < n_mats; i++) quantized |= !is_float(W[i].type);
    team_barrier(team, nth);
    if (quantized) {
        const long u = A.units;
        long a, b;
        share(M * (u / GROUP), tid, nth, &a, &b);  /* GROUP units at a time */
        for (long j = a; j < b; j++) {
            const long m = j / (u / GROUP), u0 = j % (u / GROUP) * GROUP;
            quantize_row(x + m * K + u0 * UNIT, K - u0 * UNIT, GROUP, A.q + (m * u + u0) * UNIT, A.d + m * u + u0,
                         A.fs + m * u + u0, A.s16 + (m * u + u0) * 2, A.n32 + (m * u + u0) * 2,
                         A.c128 + m * u + u0);
        }
        team_barrier(team, nth);
    }
    matmuls_share(W, n_mats, &A, y, ldy, tid, nth, team, groups, tiles);
}

/* Decode steps and draft verification: never the prefill tiles, so that a row's result does not depend on M. */
void qmatmul_team(const qmat_t *W, int n_mats, const float *x, long M, float *const *y, const long *ldy,
                  void *scratch, void *groups, int tid, int nth, team_t *team) {
    qmatmul_run(W, n_mats, x, M, y, ldy, scratch, groups, NULL, tid, nth, team);
}

/* Y[M, N] = X[M, K] @ W^T, scratch from the caller (act_bytes(M, K)); the entry point for Python: qmatmul_team in
 * a region of its own. */
typedef struct {
    qmat_t w;
    const float *x;
    long M;
    float *y;
    void *scratch;
    team_t team;
} qmatmul_job;

static void qmatmul_worker(void *arg, int tid, int nth) {
    qmatmul_job *j = arg;
    float *const ys[1] = {j->y};
    const long ld[1] = {j->w.rows};
#if defined(__AVX2__)
    void *G = j->M > 1 ? aligned_alloc(64, group_bytes(j->w.cols)) : NULL;  /* M == 1: row1, no buffer */
#else
    void *G = aligned_alloc(64, group_bytes(j->w.cols));
#endif
    /* prefill: a tile buffer instead of the group buffer (aligned_alloc wants a multiple of the alignment) */
    void *T = j->M >= TILE_ROWS && tiles_cover(j->w.type) ? aligned_alloc(64, (tile_bytes(j->w.cols) + 63) / 64 * 64)
                                                          : NULL;
    qmatmul_run(&j->w, 1, j->x, j->M, ys, ld, j->scratch, G, T, tid, nth, &j->team);
    free(G), free(T);
}

void qmatmul(const uint8_t *data, long type, long N, long K, long row_bytes, const float *x, long M, float *y,
             void *scratch, int threads) {
    qmatmul_job j = {{data, type, N, K, row_bytes}, x, M, y, scratch, {0}};
    team_run((N + NB - 1) / NB > 1 ? threads : 1, qmatmul_worker, &j);
}

/* ---- dequantization of rows (embedding lookups, and float copies where a caller needs them) ------------------- */

/* fp32 -> bf16, round to nearest even (as torch's .bfloat16()). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* One unit's 32 values, exactly as gguf dequantizes them: Q6_K (d*sc)*(q-32), Q8_0 d*q, the others d*q - m with
 * a separate multiply and subtract (no fused multiply-add: the same roundings as numpy). */
static void dequant_unit(const group_t *G, long type, int u, float *o) {
    int i = 0;
#if defined(__AVX2__)
    for (; i < UNIT; i += 8) {
        const __m128i q8 = _mm_loadl_epi64((const __m128i *)(G->w[u] + i));
        __m256 v;
        if (type == T_Q6_K) {
            const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(q8), _mm256_set1_epi32(32));
            const float f = G->fw[u] * (float)G->sc[2 * u + (i >= 16)];
            v = _mm256_mul_ps(_mm256_set1_ps(f), _mm256_cvtepi32_ps(q));
        } else if (G->signed_w) {
            v = _mm256_mul_ps(_mm256_set1_ps(G->fw[u]), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
        } else {
            v = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(G->fw[u]), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8))),
                              _mm256_set1_ps(G->om[u]));
        }
        _mm256_storeu_ps(o + i, v);
    }
#endif
    for (; i < UNIT; i++) {
        if (type == T_Q6_K)
            o[i] = G->fw[u] * (float)G->sc[2 * u + (i >= 16)] * (float)((int)G->w[u][i] - 32);
        else if (G->signed_w)
            o[i] = G->fw[u] * (float)(int8_t)G->w[u][i];
        else
            o[i] = G->fw[u] * (float)G->w[u][i] - G->om[u];
    }
}

/* A row in fp32 (out) or bf16 (out16, when out is NULL). */
static void dequant_row(const uint8_t *row, long type, long K, float *out, uint16_t *out16) {
    float tmp[UNIT];
    if (is_float(type)) {
        for (long k = 0; k < K; k++) {
            const float f = type == T_F32 ? ((const float *)row)[k]
                            : type == T_F16 ? fp16_to_fp32(rd16(row + 2 * k)) : bf16_to_fp32(rd16(row + 2 * k));
            if (out) out[k] = f; else out16[k] = to_bf16(f);
        }
        return;
    }
    group_t G;
    const long gw = group_units(type), groups = (K / UNIT + gw - 1) / gw;
    for (long g = 0; g < groups; g++) {
        prep_group(&G, row, type, g, K);
        for (int u = 0; u < G.nu; u++) {
            const long k0 = (g * gw + u) * UNIT;
            if (out) {
                dequant_unit(&G, type, u, out + k0);
                continue;
            }
            dequant_unit(&G, type, u, tmp);
            for (int i = 0; i < UNIT; i++) out16[k0 + i] = to_bf16(tmp[i]);
        }
    }
}

typedef struct {
    const uint8_t *data;
    long type, K, row_bytes, row0, n_rows;
    const int64_t *rows;  /* NULL: rows row0 .. row0 + n_rows - 1 */
    float *out;           /* NULL: bf16 into out16 */
    uint16_t *out16;
} dequant_job;

static void dequant_worker(void *arg, int tid, int nth) {
    const dequant_job *j = arg;
    long a, b;
    share(j->n_rows, tid, nth, &a, &b);
    for (long r = a; r < b; r++) {
        const uint8_t *row = j->data + (j->rows ? j->rows[r] : j->row0 + r) * j->row_bytes;
        dequant_row(row, j->type, j->K, j->out ? j->out + r * j->K : NULL, j->out ? NULL : j->out16 + r * j->K);
    }
}

void dequant_rows(const uint8_t *data, long type, long K, long row_bytes, const int64_t *rows, long n_rows,
                  float *out, int threads) {
    dequant_job j = {data, type, K, row_bytes, 0, n_rows, rows, out, NULL};
    team_run(n_rows > 64 ? threads : 1, dequant_worker, &j);
}

/* Rows row0 .. row0+n_rows-1 as bf16: tiles for the bf16 GEMM of long prefills on CPUs that multiply bf16
 * natively (AVX512-BF16, AMX), where it beats the int8 kernels; no whole-matrix copy is ever made. */
void dequant_rows_bf16(const uint8_t *data, long type, long K, long row_bytes, long row0, long n_rows,
                       uint16_t *out, int threads) {
    dequant_job j = {data, type, K, row_bytes, row0, n_rows, NULL, NULL, out};
    team_run(n_rows > 16 ? threads : 1, dequant_worker, &j);
}
