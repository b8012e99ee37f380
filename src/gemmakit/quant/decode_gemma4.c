/* Decode steps of a Gemma 4 (a few new tokens per row: one, or a speculative draft to verify) through every layer,
 * in one native call: decode.c's design for Gemma 1-3, with Gemma 4's kinds of layer (model.py, moe.py, HF-G4).
 *
 * Per layer: RMSNorm -> q (and, unless the layer reads another layer's cache, k and v) products -> QK-norm and the
 * weightless V-norm (with attention_k_eq_v the values are k's product before its norm) -> RoPE with this layer's
 * head dim and frequencies (proportional partial RoPE: the unrotated pairs have frequency 0) -> cache write (KV-shared
 * layers write nothing and attend over their source layer's cache, written earlier in this step) -> attention ->
 * o product -> post-attention norm -> the MLP (2F wide on E2B's shared layers) -> MoE (26B-A4B: the router in F32
 * blocks, fp32 softmax, top-k, renormalised, per-expert scale; each routed expert's blocks read once for the rows
 * routed to it; slot outputs summed per token in slot order) -> post-feedforward norm -> per-layer input (E2B/E4B:
 * gelu_tanh(gate(x)) * this layer's slice of the per-layer embedding, projected and normed) -> layer scalar.
 * Norm scales arrive precomputed (Gemma 4 scales by w itself). The per-layer embeddings (table row + projection of
 * the embedded tokens) are computed before the call, the final norm, LM head and soft-cap after it (model.py).
 *
 * Like decode.c: one region per step (team.c: OpenMP, or the pthread pool without it); the workers split every
 * product, attention task and elementwise piece, meet at team_barrier, and worker 0 runs the short serial parts.
 * Each row's values are computed by the same code in the same order whatever the number of rows or workers, so a
 * verified draft gives the logits of single steps.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "blocks.h"
#include "decode.h"
#include "decode_gemma4.h"

static void add(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++) x[i] += y[i];
}

/* moe.Router on M rows (worker 0): the top_k experts of each row (idx, by falling probability) and their weights.
 * hr: the rows scaled as the router reads them; logits [M, E] from the router product. */
static void route(const layer4_t *L, long M, long E, long k, float *logits, int *idx, float *wts) {
    for (long m = 0; m < M; m++) {
        float *p = logits + m * E, top = -INFINITY, total = 0.0f;
        for (long e = 0; e < E; e++) top = p[e] > top ? p[e] : top;
        for (long e = 0; e < E; e++) total += p[e] = expf(p[e] - top);
        for (long e = 0; e < E; e++) p[e] /= total;
        float sum = 0.0f;
        for (long j = 0; j < k; j++) {  /* selection: the largest left, the lowest index among equals */
            long best = -1;
            for (long e = 0; e < E; e++)
                if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
            idx[m * k + j] = (int)best;
            wts[m * k + j] = p[best];
            sum += p[best];
            p[best] = -1.0f;
        }
        for (long j = 0; j < k; j++) wts[m * k + j] = wts[m * k + j] / sum * L->expert_scale[idx[m * k + j]];
    }
}

/* The MoE branch (moe.py, Block._experts) on the residual stream x, added to mlp: worker 0 routes and gathers the
 * routed rows in expert order, the team runs each used expert's products on its rows, worker 0 sums the slots. */
static void experts(const layer4_t *L, const dims4_t *dm, const float *x, long M, work_t *w, int tid, int nth,
                    team_t *team) {
    const long D = dm->dim, E = L->n_experts, k = dm->top_k, F = L->gate_up_exps[0].rows / 2;
    const float root = 1.0f / sqrtf((float)D);
    long a, b;
    if (tid == 0) {
        float *hr = w->o;
        for (long m = 0; m < M; m++) {  /* scale-free RMSNorm, * scale * D^-0.5 (HF-G4 router) */
            const float *xr = x + m * D;
            double ss = 0.0;
            for (long i = 0; i < D; i++) ss += (double)xr[i] * xr[i];
            const float inv = 1.0f / sqrtf((float)(ss / D) + dm->eps);
            for (long i = 0; i < D; i++) hr[m * D + i] = xr[i] * inv * L->router_scale[i] * root;
        }
        rms_norm(x, L->pre_ffw_norm_2, w->h, M, D, dm->eps);
    }
    {
        float *const y[1] = {w->logits};
        const long ld[1] = {E};
        qmatmul_team(&L->router, 1, w->o, M, y, ld, w->scratch, w->groups + tid * w->gb, tid, nth, team);
    }
    team_barrier(team, nth);
    if (tid == 0) {
        route(L, M, E, k, w->logits, w->idx, w->wts);
        w->used = 0;
        for (long e = 0, s = 0; e < E; e++) {
            const int start = (int)s;
            for (long j = 0; j < M * k; j++)
                if (w->idx[j] == e) {
                    w->order[j] = (int)s;
                    memcpy(w->xs + s * D, w->h + j / k * D, D * sizeof(float));
                    s++;
                }
            if (s > start) w->used_ids[w->used] = (int)e, w->first[w->used] = start, w->count[w->used++] = s - start;
        }
    }
    team_barrier(team, nth);
    void *G = w->groups + tid * w->gb;
    if (M == 1) {  /* one row: every expert reads the same activation, so up to 8 share one product */
        for (int u0 = 0; u0 < w->used; u0 += 8) {
            const int n = w->used - u0 < 8 ? w->used - u0 : 8;
            qmat_t mats[8];
            float *y[8];
            long ld[8];
            for (int u = 0; u < n; u++)
                mats[u] = L->gate_up_exps[w->used_ids[u0 + u]], y[u] = w->gus + (long)w->first[u0 + u] * 2 * F,
                ld[u] = 2 * F;
            qmatmul_team(mats, n, w->xs, 1, y, ld, w->scratch, G, tid, nth, team);
        }
    } else {
        for (int u = 0; u < w->used; u++) {
            float *const y[1] = {w->gus + (long)w->first[u] * 2 * F};
            const long ld[1] = {2 * F};
            qmatmul_team(L->gate_up_exps + w->used_ids[u], 1, w->xs + (long)w->first[u] * D, w->count[u], y, ld,
                         w->scratch, G, tid, nth, team);
        }
    }
    team_barrier(team, nth);
    const long pieces = (F + 63) / 64;
    share(M * k * pieces, tid, nth, &a, &b);
    for (long j = a; j < b; j++) {
        const long s = j / pieces, i0 = j % pieces * 64, len = F - i0 < 64 ? F - i0 : 64;
        geglu(w->gus + s * 2 * F + i0, w->gus + s * 2 * F + F + i0, w->acts + s * F + i0, len);
    }
    for (int u = 0; u < w->used; u++) {
        float *const y[1] = {w->ys + (long)w->first[u] * D};
        const long ld[1] = {D};
        qmatmul_team(L->down_exps + w->used_ids[u], 1, w->acts + (long)w->first[u] * F, w->count[u], y, ld,
                     w->scratch, G, tid, nth, team);
    }
    team_barrier(team, nth);
    if (tid == 0) {  /* h = post_ffw_norm_1(mlp) + post_ffw_norm_2(sum over slots of weight * expert output) */
        float *sum = w->o;
        for (long m = 0; m < M; m++) {
            float *out = sum + m * D;
            memset(out, 0, D * sizeof(float));
            for (long j = 0; j < k; j++) {
                const float wt = w->wts[m * k + j], *y = w->ys + (long)w->order[m * k + j] * D;
                for (long i = 0; i < D; i++) out[i] += y[i] * wt;
            }
        }
        rms_norm(sum, L->post_ffw_norm_2, sum, M, D, dm->eps);
        rms_norm(w->mlp, L->post_ffw_norm_1, w->mlp, M, D, dm->eps);
        add(w->mlp, sum, M * D);
    }
}

/* The attention half of a layer: x -> w->o (o product of the attention output), complete after a barrier; w->h holds
 * the normed x. */
void attend4(const layer4_t *L, const dims4_t *dm, const float *x, long M, long T, const int64_t *pos,
                   const int64_t *cols, long end, work_t *w, int tid, int nth, team_t *team) {
    const long D = dm->dim, N = dm->n_heads, KV = L->n_kv, H = L->head_dim, S = L->slots;
    const long QKV = (N + 2 * KV) * H;
    const int shared = L->k.data == NULL, k_eq_v = L->v.data == NULL;
    void *G = w->groups + tid * w->gb;
    long a, b;
    if (tid == 0) rms_norm(x, L->attn_norm, w->h, M, D, dm->eps);
    {
        const qmat_t mats[3] = {L->q, L->k, L->v};
        float *const y[3] = {w->qkv, w->qkv + N * H, w->qkv + (N + KV) * H};
        const long ld[3] = {QKV, QKV, QKV};
        qmatmul_team(mats, shared ? 1 : k_eq_v ? 2 : 3, w->h, M, y, ld, w->scratch, G, tid, nth, team);
    }
    team_barrier(team, nth);
    share(M, tid, nth, &a, &b);
    for (long m = a; m < b; m++) {
        float *q = w->qkv + m * QKV, *k = q + N * H, *v = k + KV * H;
        float c[H / 2], sn[H / 2];
        rope_cs(pos[m] < 0 ? 0 : pos[m], L->inv_freq, H / 2, c, sn);
        rms_norm(q, L->q_norm, q, N, H, dm->eps);
        rope(q, N, H, c, sn);
        if (shared) continue;
        if (k_eq_v) memcpy(v, k, KV * H * sizeof(float));
        rms_norm(k, L->k_norm, k, KV, H, dm->eps);
        rms_norm(v, w->ones, v, KV, H, dm->eps);
        rope(k, KV, H, c, sn);
        const long row = m / T, slot = L->ring ? cols[m] % S : cols[m];
        for (long kv = 0; kv < KV; kv++) {
            memcpy(L->k_cache + ((row * KV + kv) * S + slot) * H, k + kv * H, H * sizeof(float));
            memcpy(L->v_cache + ((row * KV + kv) * S + slot) * H, v + kv * H, H * sizeof(float));
        }
        L->slot_pos[row * S + slot] = pos[m];
    }
    team_barrier(team, nth);
    const layer_t Lt = {.inv_freq = L->inv_freq, .k_cache = L->k_cache, .v_cache = L->v_cache,
                        .slot_pos = L->slot_pos, .slots = S, .ring = L->ring, .window = L->window};
    const dims_t dt = {.dim = D, .n_heads = N, .n_kv = KV, .head_dim = H, .inter = L->inter, .eps = dm->eps,
                       .scaling = dm->scaling, .softcap = dm->softcap};
    attention(&Lt, &dt, w->qkv, QKV, M, T, pos, L->ring ? S : end, w->att, w->part, tid, nth, team);
    float *const y[1] = {w->o};
    const long ld[1] = {D};
    qmatmul_team(&L->o, 1, w->att, M, y, ld, w->scratch, G, tid, nth, team);
    team_barrier(team, nth);
}

/* One layer on x [M, D] in place (see the top of the file). ple: this step's per-layer inputs [M][n_layers][P]. */
static void layer(const layer4_t *L, long l, long n_layers, const dims4_t *dm, float *x, const float *ple, long M,
                  long T, const int64_t *pos, const int64_t *cols, long end, work_t *w, int tid, int nth,
                  team_t *team) {
    const long D = dm->dim, I = L->inter, P = dm->ple;
    void *G = w->groups + tid * w->gb;
    long a, b;
    attend4(L, dm, x, M, T, pos, cols, end, w, tid, nth, team);
    if (tid == 0) {
        rms_norm(w->o, L->post_attn_norm, w->o, M, D, dm->eps);
        add(x, w->o, M * D);
        rms_norm(x, L->pre_ffw_norm, w->h, M, D, dm->eps);
    }
    {
        const qmat_t mats[2] = {L->gate, L->up};
        float *const y[2] = {w->gu, w->gu + I};
        const long ld[2] = {2 * I, 2 * I};
        qmatmul_team(mats, 2, w->h, M, y, ld, w->scratch, G, tid, nth, team);
    }
    team_barrier(team, nth);
    const long pieces = (I + 63) / 64;
    share(M * pieces, tid, nth, &a, &b);
    for (long j = a; j < b; j++) {
        const long m = j / pieces, i0 = j % pieces * 64, len = I - i0 < 64 ? I - i0 : 64;
        geglu(w->gu + m * 2 * I + i0, w->gu + m * 2 * I + I + i0, w->act + m * I + i0, len);
    }
    {
        float *const y[1] = {w->mlp};
        const long ld[1] = {D};
        qmatmul_team(&L->down, 1, w->act, M, y, ld, w->scratch, G, tid, nth, team);
    }
    team_barrier(team, nth);
    if (L->router.data) experts(L, dm, x, M, w, tid, nth, team);
    if (tid == 0) {
        rms_norm(w->mlp, L->post_ffw_norm, w->mlp, M, D, dm->eps);
        add(x, w->mlp, M * D);
    }
    if (L->ple_gate.data) {  /* x += norm(proj(gelu_tanh(gate(x)) * per-layer input)) */
        float *const y[1] = {w->gu};
        const long ld[1] = {P};
        qmatmul_team(&L->ple_gate, 1, x, M, y, ld, w->scratch, G, tid, nth, team);
        team_barrier(team, nth);
        share(M, tid, nth, &a, &b);
        for (long m = a; m < b; m++) geglu(w->gu + m * P, ple + (m * n_layers + l) * P, w->pg + m * P, P);
        float *const y2[1] = {w->o};
        const long ld2[1] = {D};
        qmatmul_team(&L->ple_proj, 1, w->pg, M, y2, ld2, w->scratch, G, tid, nth, team);
        team_barrier(team, nth);
        if (tid == 0) {
            rms_norm(w->o, L->ple_norm, w->o, M, D, dm->eps);
            add(x, w->o, M * D);
        }
    }
    if (tid == 0)
        for (long i = 0; i < M * D; i++) x[i] *= L->layer_scalar;
}

/* The state of one step, shared by its workers. */
typedef struct {
    const layer4_t *layers;
    long n_layers;
    const dims4_t *dm;
    float *x;
    const float *ple;
    long M, T;
    const int64_t *pos, *cols;
    long end;
    work_t *w;
    team_t team;
} step4_t;

/* Worker `tid` of `nth` through every layer of a step. */
static void step_worker(void *arg, int tid, int nth) {
    step4_t *st = arg;
    for (long l = 0; l < st->n_layers; l++)
        layer(st->layers + l, l, st->n_layers, st->dm, st->x, st->ple, st->M, st->T, st->pos, st->cols, st->end,
              st->w, tid, nth, &st->team);
}

/* x: [M, D] embedded tokens of M = B * T new tokens (T per cache row), updated in place to the hidden states after
 * the last layer; pos, cols, end and the ring slack as decode.c's decode_layers. ple: [M][n_layers][P] per-layer
 * inputs, NULL without them. */
void decode_gemma4(const layer4_t *layers, long n_layers, const dims4_t *dm, float *x, const float *ple, long M,
                   long T, const int64_t *pos, const int64_t *cols, long end, int threads) {
    const long D = dm->dim, N = dm->n_heads, K = dm->top_k, P = dm->ple;
    long H = 0, QKV = 0, I = 0, F = 0, E = 0, chunks = 1;
    for (long l = 0; l < n_layers; l++) {
        const layer4_t *L = layers + l;
        const long span = L->ring ? L->slots : end, c = (span + CHUNK - 1) / CHUNK;
        chunks = c > chunks ? c : chunks;
        H = L->head_dim > H ? L->head_dim : H;
        QKV = (N + 2 * L->n_kv) * L->head_dim > QKV ? (N + 2 * L->n_kv) * L->head_dim : QKV;
        I = L->inter > I ? L->inter : I;
        if (L->router.data) {
            F = L->gate_up_exps[0].rows / 2 > F ? L->gate_up_exps[0].rows / 2 : F;
            E = L->n_experts > E ? L->n_experts : E;
        }
    }
    const long MK = M * (K > 0 ? K : 1), wide_i = I > 2 * F ? I : 2 * F;
    long widest = D > N * H ? D : N * H;
    widest = widest > wide_i ? widest : wide_i;
    widest = widest > P ? widest : P;
    work_t w;
    const long floats = M * (D + QKV + N * H + D + 2 * I + I + D + P + E + K) + MK * (D + 2 * F + F + D) +
                        M * N * chunks * (H + 2) + H;
    float *buf = malloc(sizeof(float) * floats), *p = buf;
    w.h = p, p += M * D;
    w.qkv = p, p += M * QKV;
    w.att = p, p += M * N * H;
    w.o = p, p += M * D;
    w.gu = p, p += M * (2 * I > P ? 2 * I : P);  /* also the per-layer gate's output */
    w.act = p, p += M * I;
    w.mlp = p, p += M * D;
    w.pg = p, p += M * P;
    w.logits = p, p += M * E;
    w.wts = p, p += M * K;
    w.xs = p, p += MK * D;
    w.gus = p, p += MK * 2 * F;
    w.acts = p, p += MK * F;
    w.ys = p, p += MK * D;
    w.part = p, p += M * N * chunks * (H + 2);
    w.ones = p;
    for (long i = 0; i < H; i++) w.ones[i] = 1.0f;
    int *ints = malloc(sizeof(int) * (2 * MK + 3 * (E + 1)));
    w.idx = ints, w.order = ints + MK, w.first = ints + 2 * MK, w.count = w.first + E + 1,
    w.used_ids = w.count + E + 1;
    w.scratch = malloc(act_bytes(M, widest));
    w.gb = group_bytes(widest);
    w.groups = aligned_alloc(64, w.gb * (threads > 0 ? threads : 1));
    step4_t st = {layers, n_layers, dm, x, ple, M, T, pos, cols, end, &w, {0}};
    team_run(threads, step_worker, &st);
    free(w.groups);
    free(w.scratch);
    free(ints);
    free(buf);
}
