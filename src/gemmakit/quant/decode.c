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

#include "blocks.h"
#include "decode.h"
#include "vec.h"

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
