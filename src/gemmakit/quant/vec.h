/* Float vector primitives shared by decode.c and attention.c: AVX-512 (16 lanes), AVX2+FMA (8) or NEON (4),
 * so their kernels are written once; without any of them VL is undefined and the scalar loops run. */
#ifndef GEMMAKIT_VEC_H
#define GEMMAKIT_VEC_H
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__) && !defined(GEMMAKIT_SCALAR)
#include <arm_neon.h>
#endif

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

#endif
