/* Decode steps (a few new tokens per row: one, or a speculative draft to verify) through every layer of a Q8_0
 * Gemma, in one native call.
 *
 * Why: on the 270M a decode step's weight reads take ~12 ms at memory bandwidth, but running the same layer as
 * ~40 PyTorch ops added ~10 ms of dispatch on top (measured). Here each layer is: RMSNorm -> fused q/k/v GEMV ->
 * QK-norm -> RoPE -> KV-cache write -> attention over the cached slots -> o GEMV -> (post-)norms and residuals ->
 * fused gate/up GEMV -> tanh-GeGLU -> down GEMV, with the same math as model.py (spec §1): norms in fp32 with
 * (1 + w) precomputed, half-split RoPE, masks from the positions each slot holds (-1 = empty; sliding layers see
 * 0 <= pos - slot_pos < W), Gemma 2's attention soft-cap, fp32 softmax. Activations are fp32 between the products;
 * the products are blocks.c's over the GGUF's own blocks (the module path calls the same function, so the two paths
 * agree bit for bit on every product).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__) && !defined(GEMMAKIT_SCALAR)
#include <arm_neon.h>
#endif

#include "blocks.h"
#include "decode.h"

/* A few vector primitives over AVX-512 (16 lanes), AVX2+FMA (8 lanes) or NEON (4), so the kernels below are written once.
 * Without either, VL is undefined and the scalar loops run. */
#if defined(__AVX512F__)
#define VL 16
typedef __m512 vf;
static inline vf vset(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vclamp(vf x, float lo, float hi) { return _mm512_max_ps(_mm512_min_ps(x, vset(hi)), vset(lo)); }
static inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vscale2(vf y, vf n) { return _mm512_scalef_ps(y, n); }  /* y * 2^n */
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline __mmask16 tail_mask(long n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }
static inline vf vload_part(const float *p, long n, float fill) {  /* lanes >= n hold `fill` */
    return _mm512_mask_loadu_ps(vset(fill), tail_mask(n), p);
}
static inline void vstore_part(float *p, vf v, long n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }
static inline vf vzero_where(vf v, vf x, float bad) {  /* v, with 0 in the lanes where x == bad */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset(bad), _CMP_NEQ_OQ), v);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
typedef __m256 vf;
static inline vf vset(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vclamp(vf x, float lo, float hi) { return _mm256_max_ps(_mm256_min_ps(x, vset(hi)), vset(lo)); }
static inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vscale2(vf y, vf n) {  /* y * 2^n for integral n in [-126, 127]: build 2^n in the exponent bits */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline __m256i tail_mask(long n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n >= 8 ? 8 : n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vload_part(const float *p, long n, float fill) {
    const __m256i m = tail_mask(n);
    return _mm256_blendv_ps(vset(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
static inline void vstore_part(float *p, vf v, long n) { _mm256_maskstore_ps(p, tail_mask(n), v); }
static inline vf vzero_where(vf v, vf x, float bad) { return _mm256_and_ps(v, _mm256_cmp_ps(x, vset(bad), _CMP_NEQ_OQ)); }
#elif defined(__ARM_NEON) && defined(__aarch64__) && !defined(GEMMAKIT_SCALAR)
#define VL 4
typedef float32x4_t vf;
static inline vf vset(float a) { return vdupq_n_f32(a); }
static inline vf vload(const float *p) { return vld1q_f32(p); }
static inline void vstore(float *p, vf v) { vst1q_f32(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline vf vfnma(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
static inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
static inline vf vclamp(vf x, float lo, float hi) { return vmaxq_f32(vminq_f32(x, vset(hi)), vset(lo)); }
static inline vf vround(vf x) { return vrndnq_f32(x); }
static inline vf vscale2(vf y, vf n) {  /* y * 2^n for integral n in [-126, 127]: build 2^n in the exponent bits */
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}
static inline float vsum(vf v) {
    const float32x2_t s = vadd_f32(vget_low_f32(v), vget_high_f32(v));
    return vget_lane_f32(s, 0) + vget_lane_f32(s, 1);
}
static inline vf vload_part(const float *p, long n, float fill) {
    float t[4] = {fill, fill, fill, fill};
    memcpy(t, p, (n >= 4 ? 4 : n) * sizeof(float));
    return vld1q_f32(t);
}
static inline void vstore_part(float *p, vf v, long n) {
    float t[4];
    vst1q_f32(t, v);
    memcpy(p, t, (n >= 4 ? 4 : n) * sizeof(float));
}
static inline vf vzero_where(vf v, vf x, float bad) {
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(v), vceqq_f32(x, vset(bad))));
}
#endif

#ifdef VL
/* e^x (Cephes expf polynomial, ~1 ulp); inputs clamped to [-87.3, 88.3], where 2^n stays a normal float. */
static inline vf vexp(vf x) {
    x = vclamp(x, -87.3365447505531f, 88.3762626647949f);
    const vf n = vround(vmul(x, vset(1.44269504088896341f)));
    vf r = vfnma(n, vset(0.693359375f), x);
    r = vfnma(n, vset(-2.12194440e-4f), r);
    vf p = vset(1.9875691500e-4f);
    p = vfma(p, r, vset(1.3981999507e-3f));
    p = vfma(p, r, vset(8.3334519073e-3f));
    p = vfma(p, r, vset(4.1665795894e-2f));
    p = vfma(p, r, vset(1.6666665459e-1f));
    p = vfma(p, r, vset(5.0000001201e-1f));
    return vscale2(vadd(vfma(vmul(p, r), r, r), vset(1.0f)), n);
}
#endif

/* out[i] = gelu_tanh(g[i]) * u[i]; gelu_tanh(g) = g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3)). */
void geglu(const float *g, const float *u, float *out, long n) {
    long i = 0;
#ifdef VL
    const vf c = vset(-2.0f * 0.7978845608028654f), a = vset(0.044715f), one = vset(1.0f);
    for (; i + VL <= n; i += VL) {
        const vf x = vload(g + i);
        const vf inner = vmul(x, vfma(vmul(a, x), x, one));
        const vf sig = vdiv(one, vadd(one, vexp(vmul(c, inner))));
        vstore(out + i, vmul(vmul(x, sig), vload(u + i)));
    }
#endif
    for (; i < n; i++) {
        const float x = g[i];
        out[i] = 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))) * u[i];
    }
}

/* geglu over n values by `threads` workers, for the module path's GeGLU (prefills): the decode step's values
 * instead of torch's gelu and multiply, 1.1 -> ~0.2 ms per 512 x 2048 (270M, 2 cores). Shares are whole units of
 * 64 values, so each value takes the same (vector or scalar) code whatever the thread count. */
typedef struct {
    const float *g, *u;
    float *out;
    long n;
} geglu_job;

static void geglu_worker(void *ctx, int tid, int nth) {
    const geglu_job *j = ctx;
    long a, b;
    share(j->n / 64, tid, nth, &a, &b);
    a *= 64;
    b = tid == nth - 1 ? j->n : b * 64;
    if (b > a) geglu(j->g + a, j->u + a, j->out + a, b - a);
}

void geglu_many(const float *g, const float *u, float *out, long n, int threads) {
    geglu_job j = {g, u, out, n};
    team_run(n >= 16384 ? threads : 1, geglu_worker, &j);
}

static void axpy(float a, const float *x, float *y, long n) {  /* y += a * x */
    long i = 0;
#ifdef VL
    const vf av = vset(a);
    for (; i + VL <= n; i += VL) vstore(y + i, vfma(av, vload(x + i), vload(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* Half-split ("NeoX") RoPE in place on `heads` vectors of length H; same roundings as model.apply_rope:
 * x * cos + rotate_half(x) * sin, with cos/sin of (float)pos * inv_freq in fp32 (rope_cs). */
void rope_cs(int64_t pos, const float *inv_freq, long half, float *c, float *s) {
    for (long i = 0; i < half; i++) {
        const float f = (float)pos * inv_freq[i];
        c[i] = cosf(f);
        s[i] = sinf(f);
    }
}

void rope(float *x, long heads, long H, const float *c, const float *s) {
    const long half = H / 2;
    for (long h = 0; h < heads; h++) {
        float *v = x + h * H;
        for (long i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            const float lo = a * c[i], lo2 = -b * s[i], hi = b * c[i], hi2 = a * s[i];
            v[i] = lo + lo2;
            v[i + half] = hi + hi2;
        }
    }
}

/* RoPE over a prefill's heads (the module path's apply_rope): x (B, N, T, H) -> out, cos/sin (B, T, H) in the
 * half-split layout: out = x * cos + rotate_half(x) * sin, each product rounded, then their sum, which are torch's
 * values bit for bit (its separate ops fuse nothing), in one pass instead of five. Rows shared by the workers. */
typedef struct {
    const float *x, *cos, *sin;
    float *out;
    long rows, N, T, H;
} rope_job;

static void rope_worker(void *ctx, int tid, int nth) {
    const rope_job *j = ctx;
    const long H = j->H, half = H / 2;
    long a, b;
    share(j->rows, tid, nth, &a, &b);
    for (long r = a; r < b; r++) {  /* row r: head (r / T) % N of sequence r / (N * T), position r % T */
        const long bt = r / (j->N * j->T) * j->T + r % j->T;
        const float *x = j->x + r * H, *c = j->cos + bt * H, *sn = j->sin + bt * H;
        float *o = j->out + r * H;
        long i = 0;
#ifdef VL
        for (; i + VL <= half; i += VL) {
            const vf lo = vload(x + i), hi = vload(x + half + i);
            vstore(o + i, vsub(vmul(lo, vload(c + i)), vmul(hi, vload(sn + i))));
            vstore(o + half + i, vadd(vmul(hi, vload(c + half + i)), vmul(lo, vload(sn + half + i))));
        }
#endif
        for (; i < half; i++) {
            const float lo = x[i], hi = x[half + i];
            const float p = lo * c[i], q = hi * sn[i], u = hi * c[half + i], w = lo * sn[half + i];
            o[i] = p - q;
            o[half + i] = u + w;
        }
    }
}

void rope_many(const float *x, const float *cos, const float *sin, float *out, long B, long N, long T, long H,
               int threads) {
    rope_job j = {x, cos, sin, out, B * N * T, N, T, H};
    team_run(B * N * T * H >= 16384 ? threads : 1, rope_worker, &j);
}

/* Sum of squares in 16 fixed lanes (lane l: fused multiply-adds of values l, l + 16, ... in order), the lanes
 * added by halves, then the tail: every build (AVX-512, AVX2, NEON, scalar) gets the same bits. */
static float sum_squares(const float *x, long n) {
    float lane[16];
    long i = 0;
#ifdef VL
    vf acc[16 / VL];
    for (int c = 0; c < 16 / VL; c++) acc[c] = vset(0.0f);
    for (; i + 16 <= n; i += 16)
        for (int c = 0; c < 16 / VL; c++) {
            const vf v = vload(x + i + c * VL);
            acc[c] = vfma(v, v, acc[c]);
        }
    for (int c = 0; c < 16 / VL; c++) vstore(lane + c * VL, acc[c]);
#else
    for (int l = 0; l < 16; l++) lane[l] = 0.0f;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) lane[l] = fmaf(x[i + l], x[i + l], lane[l]);
#endif
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) lane[l] += lane[l + w];
    float s = lane[0];
    for (; i < n; i++) s = fmaf(x[i], x[i], s);
    return s;
}

/* Gemma RMSNorm: y = x * rsqrt(mean(x^2) + eps) * scale, scale = 1 + w, in fp32. One call instead of torch's
 * ~6 dispatched ops (25 us -> ~3 us per norm on the 270M, 109 norms per token). */
void rms_norm(const float *x, const float *scale, float *y, long rows, long dim, float eps) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        const float inv = 1.0f / sqrtf(sum_squares(xr, dim) / (float)dim + eps);
        long i = 0;
#ifdef VL
        const vf iv = vset(inv);
        for (; i + VL <= dim; i += VL) vstore(yr + i, vmul(vmul(vload(xr + i), iv), vload(scale + i)));
#endif
        for (; i < dim; i++) yr[i] = xr[i] * inv * scale[i];
    }
}

/* rms_norm over many rows (prefills) by `threads` workers, rows shared: torch's took 0.8 ms for 520 x 640 on 2
 * cores, ~15% of a 270M prefill. A row's values do not depend on the thread count. */
typedef struct {
    const float *x, *scale;
    float *y;
    long rows, dim;
    float eps;
} norm_job;

static void norm_worker(void *ctx, int tid, int nth) {
    const norm_job *j = ctx;
    long a, b;
    share(j->rows, tid, nth, &a, &b);
    if (b > a) rms_norm(j->x + a * j->dim, j->scale, j->y + a * j->dim, b - a, j->dim, j->eps);
}

void rms_norm_many(const float *x, const float *scale, float *y, long rows, long dim, float eps, int threads) {
    norm_job j = {x, scale, y, rows, dim, eps};
    team_run(rows * dim >= 16384 ? threads : 1, norm_worker, &j);
}

/* Attention of the `rep` query heads sharing one KV head over slots [j0, j1) (j0 a multiple of CHUNK): each key
 * is read once for all of them. Per head: the chunk's max score (-inf if nothing is visible), the sum of
 * exp(score - max), and the values weighted by those exps. Slots are masked by the positions they hold; scores
 * are scaled, optionally soft-capped (Gemma 2), in fp32.
 *
 * Register-blocked: scores take two visible slots times up to RB heads per pass over the head dimension, the
 * weighted values RB heads times HB vectors of values per pass over SUB slots, so each key and value vector is
 * loaded once for RB heads and the outputs stay in registers. Every score and output value is still summed in the
 * same order as a one-head, one-slot loop (per head: one vector accumulator over the dimension, then vsum; per
 * output value: slots in ascending order, zero weights skipped), so the results do not depend on the blocking. */
#define RB 4
#if defined(VL) && VL == 8
#define HB 2  /* 16 ymm registers: RB * HB accumulators, HB values, a weight */
#else
#define HB 4
#endif
#define SUB 16  /* slots per pass of weighted values: their 16 value rows stay in L1 across the passes over H */

#define PF_SLOTS 16  /* keys prefetched this many visible slots ahead; each slot's values as its key is read */
static inline void prefetch_row(const float *p, long H) {
#if defined(__x86_64__) || defined(__i386__)
    for (long i = 0; i < H; i += 16) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
#else
    for (long i = 0; i < H; i += 16) __builtin_prefetch(p + i);
#endif
}

static inline __attribute__((always_inline)) void dots_block(const float *q, const int nr, const float *ka,
                                                             const float *kb, long H, float s[RB][2]) {
    long i = 0;
#ifdef VL
    vf acc[RB][2];
    for (int r = 0; r < nr; r++) acc[r][0] = acc[r][1] = vset(0.0f);
    for (; i + VL <= H; i += VL) {
        const vf a = vload(ka + i), b = vload(kb + i);
        for (int r = 0; r < nr; r++) {
            const vf x = vload(q + r * H + i);
            acc[r][0] = vfma(x, a, acc[r][0]);
            acc[r][1] = vfma(x, b, acc[r][1]);
        }
    }
    for (int r = 0; r < nr; r++) s[r][0] = vsum(acc[r][0]), s[r][1] = vsum(acc[r][1]);
#else
    for (int r = 0; r < nr; r++) s[r][0] = s[r][1] = 0.0f;
#endif
    for (; i < H; i++)
        for (int r = 0; r < nr; r++) s[r][0] += q[r * H + i] * ka[i], s[r][1] += q[r * H + i] * kb[i];
}

/* out[r][h0 .. h0 + HB*VL) += w[r][j] * v[j][h0 ..] over the listed slots, in their order. */
#ifdef VL
static inline __attribute__((always_inline)) void values_block(const float *w, const int nr, const long *idx,
                                                               long nl, const float *v, long H, long h0,
                                                               float *out) {
    vf acc[RB][HB];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < HB; c++) acc[r][c] = vload(out + r * H + h0 + c * VL);
    for (long t = 0; t < nl; t++) {
        const long j = idx[t];
        const float *vj = v + j * H + h0;
        vf x[HB];
        for (int c = 0; c < HB; c++) x[c] = vload(vj + c * VL);
        for (int r = 0; r < nr; r++) {
            const float wr = w[r * CHUNK + j];
            if (wr == 0.0f) continue;  /* as a one-head loop: a zero weight (a NaN score's) never reads the value */
            const vf a = vset(wr);
            for (int c = 0; c < HB; c++) acc[r][c] = vfma(a, x[c], acc[r][c]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < HB; c++) vstore(out + r * H + h0 + c * VL, acc[r][c]);
}
#endif

static void dots_heads(const float *q, int nr, const float *ka, const float *kb, long H, float s[RB][2]) {
    switch (nr) {  /* a constant head count per branch: the accumulators stay in registers */
        case 4: dots_block(q, 4, ka, kb, H, s); break;
        case 3: dots_block(q, 3, ka, kb, H, s); break;
        case 2: dots_block(q, 2, ka, kb, H, s); break;
        default: dots_block(q, 1, ka, kb, H, s); break;
    }
}

/* The weighted values of nr <= RB heads (weights w[r * CHUNK + j]) over the listed slots into out[r * H ..]. */
static void values_heads(const float *w, int nr, const long *idx, long nl, const float *v, long H, float *out) {
    long h0 = 0;
#ifdef VL
    for (long t0 = 0; t0 < nl; t0 += SUB) {
        const long n = nl - t0 < SUB ? nl - t0 : SUB;
        for (h0 = 0; h0 + HB * VL <= H; h0 += HB * VL) {
            switch (nr) {
                case 4: values_block(w, 4, idx + t0, n, v, H, h0, out); break;
                case 3: values_block(w, 3, idx + t0, n, v, H, h0, out); break;
                case 2: values_block(w, 2, idx + t0, n, v, H, h0, out); break;
                default: values_block(w, 1, idx + t0, n, v, H, h0, out); break;
            }
        }
    }
    for (; h0 + VL <= H; h0 += VL)  /* the dimension's rest, a vector at a time (axpy's vector part) */
        for (int r = 0; r < nr; r++) {
            vf acc = vload(out + r * H + h0);
            for (long t = 0; t < nl; t++) {
                const float wr = w[r * CHUNK + idx[t]];
                if (wr != 0.0f) acc = vfma(vset(wr), vload(v + idx[t] * H + h0), acc);
            }
            vstore(out + r * H + h0, acc);
        }
#endif
    for (long i = h0; i < H; i++)  /* axpy's scalar tail */
        for (int r = 0; r < nr; r++)
            for (long t = 0; t < nl; t++)
                if (w[r * CHUNK + idx[t]] != 0.0f) out[r * H + i] += w[r * CHUNK + idx[t]] * v[idx[t] * H + i];
}

static void attend_chunk(const float *q, long rep, const float *k, const float *v, const int64_t *slot_pos,
                         long j0, long j1, long H, int64_t pos, long window, float scaling, float cap,
                         float *mx, float *sum, float *out) {
    const long n = j1 - j0;
    float scores[rep][CHUNK];
    long idx[CHUNK], nl = 0;  /* the visible slots, ascending */
    for (long r = 0; r < rep; r++) mx[r] = -INFINITY, sum[r] = 0.0f;
    memset(out, 0, rep * H * sizeof(float));
    for (long j = 0; j < n; j++) {
        const int64_t sp = slot_pos[j0 + j], d = pos - sp;
        if (pos >= 0 && sp >= 0 && d >= 0 && (window == 0 || d < window)) idx[nl++] = j;
        for (long r = 0; r < rep; r++) scores[r][j] = -INFINITY;
    }
    if (nl == 0) return;
    const float *kc = k + j0 * H, *vc = v + j0 * H;
    for (long t = 0; t < nl; t += 2) {
        const long ja = idx[t], jb = t + 1 < nl ? idx[t + 1] : idx[t];
        for (long u = t + PF_SLOTS; u < t + PF_SLOTS + 2 && u < nl; u++) prefetch_row(kc + idx[u] * H, H);
        for (long u = t; u < t + 2 && u < nl; u++) prefetch_row(vc + idx[u] * H, H);
        for (long r0 = 0; r0 < rep; r0 += RB) {
            const int nr = rep - r0 < RB ? (int)(rep - r0) : RB;
            float s[RB][2];
            dots_heads(q + r0 * H, nr, kc + ja * H, kc + jb * H, H, s);
            for (int r = 0; r < nr; r++)
                for (int e = 0; e < (t + 1 < nl ? 2 : 1); e++) {
                    float x = s[r][e] * scaling;
                    if (cap > 0.0f) x = tanhf(x / cap) * cap;
                    if (x > mx[r0 + r]) mx[r0 + r] = x;
                    scores[r0 + r][e ? jb : ja] = x;
                }
        }
    }
    for (long r = 0; r < rep; r++) {
        float *sc = scores[r], total = 0.0f;
#ifdef VL
        /* Slot j always lands in lane j % VL (the tail is a masked chunk, not a scalar loop), so masked slots add
         * exact zeros: a query gets bit-identical weights whether it runs alone or beside later tokens. */
        const vf m = vset(mx[r]);
        vf acc = vset(0.0f);
        for (long j = 0; j < n; j += VL) {
            const vf x = vload_part(sc + j, n - j, -INFINITY);
            const vf e = vzero_where(vexp(vsub(x, m)), x, -INFINITY);
            vstore_part(sc + j, e, n - j);
            acc = vadd(acc, e);
        }
        total = vsum(acc);
#else
        for (long j = 0; j < n; j++) {
            sc[j] = sc[j] == -INFINITY ? 0.0f : expf(sc[j] - mx[r]);
            total += sc[j];
        }
#endif
        sum[r] = total;
    }
    for (long r0 = 0; r0 < rep; r0 += RB)
        values_heads(scores[r0], rep - r0 < RB ? (int)(rep - r0) : RB, idx, nl, vc, H, out + r0 * H);
}

/* Attention for M tokens over `span` slots, by a team: tasks (token, KV head, chunk) split between the workers, a
 * barrier, then per (token, query head) the chunks are merged in chunk order (flash-decoding's rescaling by
 * exp(chunk max - overall max)). `part` holds M * KV * chunks * rep * (H + 2) floats. */
void attention(const layer_t *L, const dims_t *dm, const float *qkv, long QKV, long M, long T,
                      const int64_t *pos, long span, float *att, float *part, int tid, int nth, team_t *team) {
    const long N = dm->n_heads, KV = dm->n_kv, H = dm->head_dim, rep = N / KV, S = L->slots;
    const long chunks = (span + CHUNK - 1) / CHUNK, stride = rep * (H + 2), tasks = M * KV * chunks;
    long a, b;
    share(tasks, tid, nth, &a, &b);
    for (long t = a; t < b; t++) {
        const long m = t / (KV * chunks), kv = t / chunks % KV, c = t % chunks, row = m / T;
        float *p = part + t * stride;
        const long j0 = c * CHUNK, j1 = j0 + CHUNK < span ? j0 + CHUNK : span;
        attend_chunk(qkv + m * QKV + kv * rep * H, rep, L->k_cache + (row * KV + kv) * S * H,
                     L->v_cache + (row * KV + kv) * S * H, L->slot_pos + row * S, j0, j1, H, pos[m], L->window,
                     dm->scaling, dm->softcap, p, p + rep, p + 2 * rep);
    }
    team_barrier(team, nth);
    share(M * N, tid, nth, &a, &b);
    for (long j = a; j < b; j++) {
        const long m = j / N, n = j % N, kv = n / rep, r = n % rep;
        const float *first = part + (m * KV + kv) * chunks * stride;
        float *out = att + (m * N + n) * H, top = -INFINITY, total = 0.0f;
        memset(out, 0, H * sizeof(float));
        for (long c = 0; c < chunks; c++)
            if (first[c * stride + r] > top) top = first[c * stride + r];
        if (top == -INFINITY) continue;  /* padding token: its output is discarded */
        for (long c = 0; c < chunks; c++) {
            const float *p = first + c * stride;
            if (p[r] == -INFINITY) continue;
            const float w = expf(p[r] - top);
            total += w * p[rep + r];
            axpy(w, p + 2 * rep + r * H, out, H);
        }
        const float inv = 1.0f / total;
        for (long i = 0; i < H; i++) out[i] *= inv;
    }
}

/* The state of one step, shared by its workers. */
typedef struct {
    const layer_t *layers;
    long n_layers;
    const dims_t *dm;
    float *x;
    long M, T, end;
    const int64_t *pos, *cols;
    float *h, *qkv, *att, *gu, *act, *o, *part;
    void *scratch;
    uint8_t *groups;
    long gb;  /* bytes of each worker's group buffer */
    team_t team;
} step_t;

/* Worker `tid` of `nth` through every layer of a step. */
static void step_worker(void *arg, int tid, int nth) {
    step_t *st = arg;
    const layer_t *layers = st->layers;
    const dims_t *dm = st->dm;
    const long n_layers = st->n_layers, M = st->M, T = st->T, end = st->end;
    const int64_t *pos = st->pos, *cols = st->cols;
    float *x = st->x, *h = st->h, *qkv = st->qkv, *att = st->att, *gu = st->gu, *act = st->act, *o = st->o;
    float *part = st->part;
    void *scratch = st->scratch, *G = st->groups + tid * st->gb;
    team_t *team = &st->team;
    const long D = dm->dim, N = dm->n_heads, KV = dm->n_kv, H = dm->head_dim, I = dm->inter;
    const long QKV = (N + 2 * KV) * H;
    for (long l = 0; l < n_layers; l++) {
        const layer_t *L = layers + l;
        const long S = L->slots, span = L->ring ? S : end;
        long a, b;
        if (tid == 0) rms_norm(x, L->attn_norm, h, M, D, dm->eps);
        {
            const qmat_t w[3] = {L->q, L->k, L->v};
            float *const y[3] = {qkv, qkv + N * H, qkv + (N + KV) * H};
            const long ld[3] = {QKV, QKV, QKV};
            qmatmul_team(w, 3, h, M, y, ld, scratch, G, tid, nth, team);
        }
        team_barrier(team, nth);
        share(M, tid, nth, &a, &b);
        for (long m = a; m < b; m++) {
            float *q = qkv + m * QKV, *k = q + N * H, *v = k + KV * H;
            const long row = m / T;
            if (L->q_norm) {
                rms_norm(q, L->q_norm, q, N, H, dm->eps);
                rms_norm(k, L->k_norm, k, KV, H, dm->eps);
            }
            float c[H / 2], sn[H / 2];
            rope_cs(pos[m] < 0 ? 0 : pos[m], L->inv_freq, H / 2, c, sn);
            rope(q, N, H, c, sn);
            rope(k, KV, H, c, sn);
            const long slot = L->ring ? cols[m] % S : cols[m];
            for (long kv = 0; kv < KV; kv++) {
                memcpy(L->k_cache + ((row * KV + kv) * S + slot) * H, k + kv * H, H * sizeof(float));
                memcpy(L->v_cache + ((row * KV + kv) * S + slot) * H, v + kv * H, H * sizeof(float));
            }
            L->slot_pos[row * S + slot] = pos[m];
        }
        team_barrier(team, nth);
        attention(L, dm, qkv, QKV, M, T, pos, span, att, part, tid, nth, team);
        {
            float *const y[1] = {o};
            const long ld[1] = {D};
            qmatmul_team(&L->o, 1, att, M, y, ld, scratch, G, tid, nth, team);
        }
        team_barrier(team, nth);
        if (tid == 0) {
            if (L->pre_ffw_norm) {  /* Gemma 2/3: x += post_attn_norm(o); h = pre_ffw_norm(x) */
                rms_norm(o, L->post_attn_norm, o, M, D, dm->eps);
                for (long i = 0; i < M * D; i++) x[i] += o[i];
                rms_norm(x, L->pre_ffw_norm, h, M, D, dm->eps);
            } else {  /* Gemma 1: x += o; h = post_attention_layernorm(x) */
                for (long i = 0; i < M * D; i++) x[i] += o[i];
                rms_norm(x, L->post_attn_norm, h, M, D, dm->eps);
            }
        }
        {
            const qmat_t w[2] = {L->gate, L->up};
            float *const y[2] = {gu, gu + I};
            const long ld[2] = {2 * I, 2 * I};
            qmatmul_team(w, 2, h, M, y, ld, scratch, G, tid, nth, team);
        }
        team_barrier(team, nth);
        const long pieces = (I + 63) / 64;  /* tanh-GeGLU in pieces of 64 values (vector lengths divide 64) */
        share(M * pieces, tid, nth, &a, &b);
        for (long j = a; j < b; j++) {
            const long m = j / pieces, i0 = j % pieces * 64, len = I - i0 < 64 ? I - i0 : 64;
            geglu(gu + m * 2 * I + i0, gu + m * 2 * I + I + i0, act + m * I + i0, len);
        }
        {
            float *const y[1] = {o};
            const long ld[1] = {D};
            qmatmul_team(&L->down, 1, act, M, y, ld, scratch, G, tid, nth, team);
        }
        team_barrier(team, nth);
        if (tid == 0) {
            if (L->post_ffw_norm) rms_norm(o, L->post_ffw_norm, o, M, D, dm->eps);
            for (long i = 0; i < M * D; i++) x[i] += o[i];
        }
    }
}

/* x: [M, D] hidden states of M = B * T new tokens (T per cache row, row-major), updated in place. Token m belongs
 * to cache row m / T, sits at position pos[m] (-1: padding) and writes column cols[m] (slot cols[m] % S on ring
 * layers). Every token's keys and values are written before any attends: masks by position keep causality, and
 * ring slack of at least T - 1 slots (checked by the caller) keeps the slots a query still needs. Tokens attend
 * over slots [0, end) (all S on ring layers).
 *
 * The whole step is one region (team.c: OpenMP, or the pthread pool without it): the workers split every product,
 * the attention tasks and the elementwise work, and meet at team_barrier between phases; short serial parts (norms,
 * RoPE, cache writes) are worker 0's. Every value is computed by the same code in the same order as with one worker. */
void decode_layers(const layer_t *layers, long n_layers, const dims_t *dm, float *x, long M, long T,
                   const int64_t *pos, const int64_t *cols, long end, int threads) {
    const long D = dm->dim, N = dm->n_heads, KV = dm->n_kv, H = dm->head_dim, I = dm->inter;
    const long QKV = (N + 2 * KV) * H, rep = N / KV;
    float *h = malloc(sizeof(float) * M * (D + QKV + N * H + 2 * I + I + D));
    float *qkv = h + M * D, *att = qkv + M * QKV, *gu = att + M * N * H, *act = gu + M * 2 * I, *o = act + M * I;
    const long widest = D > I ? (D > N * H ? D : N * H) : (I > N * H ? I : N * H);
    long chunks = 1;
    for (long l = 0; l < n_layers; l++) {
        const long span = layers[l].ring ? layers[l].slots : end, c = (span + CHUNK - 1) / CHUNK;
        if (c > chunks) chunks = c;
    }
    float *part = malloc(sizeof(float) * M * KV * chunks * rep * (H + 2));
    void *scratch = malloc(act_bytes(M, widest));
    const long gb = group_bytes(widest);
    uint8_t *groups = aligned_alloc(64, gb * (threads > 0 ? threads : 1));
    step_t st = {layers, n_layers, dm, x, M, T, end, pos, cols, h, qkv, att, gu, act, o, part, scratch, groups, gb,
                 {0}};
    team_run(threads, step_worker, &st);
    free(groups);
    free(scratch);
    free(part);
    free(h);
}
