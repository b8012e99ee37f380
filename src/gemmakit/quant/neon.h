/* NEON (ARM64) parts of blocks.c: activation quantization, the exact integer sums of a weight group with an
 * activation row, and float-weight rows. Included by blocks.c on aarch64 (its group_t, UNIT, T_* in scope).
 *
 * Integer dot products: SDOT (vdotq_s32, the dotprod extension: every Apple M-series, Snapdragon X, Graviton 2+,
 * any ARMv8.2-A+ core that lists `asimddp`), otherwise widening multiplies (vmull_s8) and pairwise adds, which every
 * ARMv8 core has; with i8mm, SMMLA for two weight rows x two activation rows (neon_pair_sums). Either way the sums are exact integers, so they equal the scalar build's and the x86 builds'; the
 * float steps around them (blocks.c's group_row and acc_total) follow the AVX2 path's lanes and order.
 *
 * Weights enter as int8: Q8_0 is signed, and every other format's unpacked values are at most 63 (Q6_K), so the
 * signed product of SDOT gives the same sum as x86's unsigned x signed one.
 */

/* Sum of the 16 products w[i] * a[i], as 4 int32 partial sums added into acc. */
static inline int32x4_t dot16(int32x4_t acc, int8x16_t w, int8x16_t a) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, w, a);
#else  /* |w * a| <= 128 * 127 fits int16; pairs are widened before they add */
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w), vget_low_s8(a)));
    return vpadalq_s16(acc, vmull_high_s8(w, a));
#endif
}

/* One unit of 32 activations: d = max|x| / 127, q = round(x / d) ties to even (quantize_row's values), the sums of
 * q over each 16; returns d. */
static inline float neon_quantize_unit(const float *x, int8_t *q, int *s0, int *s1) {
    float32x4_t v[8];
    for (int i = 0; i < 8; i++) v[i] = vld1q_f32(x + 4 * i);
    float32x4_t mx = vabsq_f32(v[0]);
    for (int i = 1; i < 8; i++) mx = vmaxq_f32(mx, vabsq_f32(v[i]));
    const float d = vmaxvq_f32(mx) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int32x4_t r[8];
    for (int i = 0; i < 8; i++) r[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], id));
    const int16x8_t h0 = vcombine_s16(vmovn_s32(r[0]), vmovn_s32(r[1]));
    const int16x8_t h1 = vcombine_s16(vmovn_s32(r[2]), vmovn_s32(r[3]));
    const int16x8_t h2 = vcombine_s16(vmovn_s32(r[4]), vmovn_s32(r[5]));
    const int16x8_t h3 = vcombine_s16(vmovn_s32(r[6]), vmovn_s32(r[7]));
    vst1q_s8(q, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
    vst1q_s8(q + 16, vcombine_s8(vmovn_s16(h2), vmovn_s16(h3)));
    *s0 = vaddvq_s32(vaddq_s32(vaddq_s32(r[0], r[1]), vaddq_s32(r[2], r[3])));
    *s1 = vaddvq_s32(vaddq_s32(vaddq_s32(r[4], r[5]), vaddq_s32(r[6], r[7])));
    return d;
}

/* The 4 integer sums w . a of units u0 .. u0+3 (32 values each), lane u - u0. */
static inline int32x4_t neon_sums4(const group_t *G, const int8_t *aq, int u0) {
    int32x4_t p[4];
    for (int j = 0; j < 4; j++) {
        const int8_t *w = (const int8_t *)G->w[u0 + j], *a = aq + (u0 + j) * UNIT;
        p[j] = dot16(dot16(vdupq_n_s32(0), vld1q_s8(w), vld1q_s8(a)), vld1q_s8(w + 16), vld1q_s8(a + 16));
    }
    return vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3]));
}

/* Q6_K, units u0 .. u0+3: per 16 values, scale * (w . a - 32 * sum a), summed over the unit's two halves. */
static inline int32x4_t neon_sums4_q6k(const group_t *G, const int8_t *aq, const int16_t *as16, int u0) {
    int32x4_t h[8];  /* h[2j], h[2j+1]: partial sums of unit u0+j's first and second 16 values */
    for (int j = 0; j < 4; j++) {
        const int8_t *w = (const int8_t *)G->w[u0 + j], *a = aq + (u0 + j) * UNIT;
        h[2 * j] = dot16(vdupq_n_s32(0), vld1q_s8(w), vld1q_s8(a));
        h[2 * j + 1] = dot16(vdupq_n_s32(0), vld1q_s8(w + 16), vld1q_s8(a + 16));
    }
    /* [lo0, hi0, lo1, hi1] and [lo2, hi2, lo3, hi3]: the 8 half sums in the order of the scales */
    const int32x4_t s01 = vpaddq_s32(vpaddq_s32(h[0], h[1]), vpaddq_s32(h[2], h[3]));
    const int32x4_t s23 = vpaddq_s32(vpaddq_s32(h[4], h[5]), vpaddq_s32(h[6], h[7]));
    const int16x8_t sc = vmovl_s8(vld1_s8(G->sc + 2 * u0));
    const int16x8_t a16 = vld1q_s16(as16 + 2 * u0);
    const int32x4_t t01 = vmulq_s32(vmovl_s16(vget_low_s16(sc)), vsubq_s32(s01, vshlq_n_s32(vmovl_s16(vget_low_s16(a16)), 5)));
    const int32x4_t t23 = vmulq_s32(vmovl_s16(vget_high_s16(sc)), vsubq_s32(s23, vshlq_n_s32(vmovl_high_s16(a16), 5)));
    return vpaddq_s32(t01, t23);
}

/* The unit sums of one group with one activation row: z[0] units 0-3, z[1] units 4-7 (blocks of 32: z[0] only). */
static inline __attribute__((always_inline)) void neon_group_sums(const group_t *G, long type, const int8_t *aq,
                                                                  const int16_t *as16, int32x4_t z[2]) {
    if (type == T_Q6_K) {
        z[0] = neon_sums4_q6k(G, aq, as16, 0), z[1] = neon_sums4_q6k(G, aq, as16, 4);
        return;
    }
    z[0] = neon_sums4(G, aq, 0);
    z[1] = type == T_Q4_K || type == T_Q5_K ? neon_sums4(G, aq, 4) : vdupq_n_s32(0);
}

/* 8 float weights of a row from value k: lanes 0-3 in w[0], 4-7 in w[1]. */
static inline void neon_weights8(long type, const uint8_t *row, long k, float32x4_t w[2]) {
    if (type == T_F32) {
        w[0] = vld1q_f32((const float *)row + k), w[1] = vld1q_f32((const float *)row + k + 4);
    } else if (type == T_F16) {
        const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *)row + k));
        w[0] = vcvt_f32_f16(vget_low_f16(h)), w[1] = vcvt_high_f32_f16(h);
    } else {  /* BF16: the upper half of an fp32 */
        const uint16x8_t h = vld1q_u16((const uint16_t *)row + k);
        w[0] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
        w[1] = vreinterpretq_f32_u32(vshll_high_n_u16(h, 16));
    }
}

/* Float weights (F32/F16/BF16) against mr <= 8 fp32 rows x (row r at x + r * K), over the first K / 8 * 8 values:
 * the AVX2 loop's 8 lanes, fused multiply-adds and horizontal sum; the caller adds the tail. */
static inline void neon_row_float(long type, const uint8_t *row, const float *x, long K, int mr, float *out) {
    float32x4_t acc[8][2];
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = vdupq_n_f32(0.0f);
    for (long k = 0; k + 8 <= K; k += 8) {
        float32x4_t w[2];
        neon_weights8(type, row, k, w);
        for (int r = 0; r < mr; r++) {
            acc[r][0] = vfmaq_f32(acc[r][0], w[0], vld1q_f32(x + r * K + k));
            acc[r][1] = vfmaq_f32(acc[r][1], w[1], vld1q_f32(x + r * K + k + 4));
        }
    }
    for (int r = 0; r < mr; r++) {
        const float32x4_t s4 = vaddq_f32(acc[r][0], acc[r][1]);
        const float32x2_t s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
        out[r] = vget_lane_f32(s2, 0) + vget_lane_f32(s2, 1);
    }
}

#if defined(__ARM_FEATURE_MATMUL_INT8)
/* i8mm (SMMLA, vmmlaq_s32: Apple M2 and later, Graviton 3/4, Snapdragon X, Neoverse V/N2): one instruction takes
 * 8 values of 2 activation rows and 2 weight rows and adds their 4 dot products, twice SDOT's work. Two weight rows
 * n, n' (groups G, G2) against two activation rows m, m' (aq, aq1): per unit, lanes [mn, mn', m'n, m'n']. */
static inline int32x4_t mmla16(int32x4_t c, const int8_t *a, const int8_t *a1, const int8_t *w, const int8_t *w1) {
    const int64x2_t av = vreinterpretq_s64_s8(vld1q_s8(a)), av1 = vreinterpretq_s64_s8(vld1q_s8(a1));
    const int64x2_t wv = vreinterpretq_s64_s8(vld1q_s8(w)), wv1 = vreinterpretq_s64_s8(vld1q_s8(w1));
    c = vmmlaq_s32(c, vreinterpretq_s8_s64(vzip1q_s64(av, av1)), vreinterpretq_s8_s64(vzip1q_s64(wv, wv1)));
    return vmmlaq_s32(c, vreinterpretq_s8_s64(vzip2q_s64(av, av1)), vreinterpretq_s8_s64(vzip2q_s64(wv, wv1)));
}

/* 4 vectors of 4 units' [mn, mn', m'n, m'n'] -> per pair (mn, mn', m'n, m'n'), the 4 units' sums. */
static inline void transpose4(const int32x4_t c[4], int32x4_t out[4]) {
    const int32x4_t t0 = vtrn1q_s32(c[0], c[1]), t1 = vtrn2q_s32(c[0], c[1]);
    const int32x4_t t2 = vtrn1q_s32(c[2], c[3]), t3 = vtrn2q_s32(c[2], c[3]);
#define S64(v) vreinterpretq_s64_s32(v)
#define S32(v) vreinterpretq_s32_s64(v)
    out[0] = S32(vtrn1q_s64(S64(t0), S64(t2))), out[1] = S32(vtrn1q_s64(S64(t1), S64(t3)));
    out[2] = S32(vtrn2q_s64(S64(t0), S64(t2))), out[3] = S32(vtrn2q_s64(S64(t1), S64(t3)));
#undef S64
#undef S32
}

/* The unit sums of groups G (row n) and G2 (row n') with activation rows aq and aq1, as neon_group_sums gives them
 * for each pair: z[p][h], p = (m, n), (m, n'), (m', n), (m', n'). The same integers. */
static inline __attribute__((always_inline)) void neon_pair_sums(const group_t *G, const group_t *G2, long type,
                                                                 const int8_t *aq, const int8_t *aq1,
                                                                 const int16_t *as16, const int16_t *as161,
                                                                 int32x4_t z[4][2]) {
    const int halves = type == T_Q4_K || type == T_Q5_K || type == T_Q6_K ? 2 : 1;
    for (int h = 0; h < 2; h++) {
        int32x4_t c[4], t[4];
        for (int j = 0; j < 4; j++) {
            const int u = 4 * h + j;
            if (h >= halves) {
                c[j] = vdupq_n_s32(0);
                continue;
            }
            const int8_t *a = aq + u * UNIT, *a1 = aq1 + u * UNIT;
            const int8_t *w = (const int8_t *)G->w[u], *w1 = (const int8_t *)G2->w[u];
            if (type != T_Q6_K) {
                c[j] = mmla16(mmla16(vdupq_n_s32(0), a, a1, w, w1), a + 16, a1 + 16, w + 16, w1 + 16);
                continue;
            }
            /* Q6_K: per 16 values, scale (of the weight row) * (w . a - 32 * sum a (of the activation row)) */
            const int32x4_t lo = mmla16(vdupq_n_s32(0), a, a1, w, w1);
            const int32x4_t hi = mmla16(vdupq_n_s32(0), a + 16, a1 + 16, w + 16, w1 + 16);
            const int32_t sl[4] = {G->sc[2 * u], G2->sc[2 * u], G->sc[2 * u], G2->sc[2 * u]};
            const int32_t sh[4] = {G->sc[2 * u + 1], G2->sc[2 * u + 1], G->sc[2 * u + 1], G2->sc[2 * u + 1]};
            const int32_t al[4] = {as16[2 * u], as16[2 * u], as161[2 * u], as161[2 * u]};
            const int32_t ah[4] = {as16[2 * u + 1], as16[2 * u + 1], as161[2 * u + 1], as161[2 * u + 1]};
            c[j] = vaddq_s32(vmulq_s32(vld1q_s32(sl), vsubq_s32(lo, vshlq_n_s32(vld1q_s32(al), 5))),
                             vmulq_s32(vld1q_s32(sh), vsubq_s32(hi, vshlq_n_s32(vld1q_s32(ah), 5))));
        }
        transpose4(c, t);
        for (int p = 0; p < 4; p++) z[p][h] = t[p];
    }
}
#endif
