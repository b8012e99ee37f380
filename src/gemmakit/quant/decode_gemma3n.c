/* Decode steps of a Gemma 3n (a few new tokens per row: one, or a speculative draft to verify) through every layer,
 * in one native call: decode_gemma4.c's design with Gemma 3n's layer (altup.py altup_layer, HF-3N).
 *
 * The step carries the S AltUp streams [S][M][D]. Per layer:
 *   predict: modalities = tanh(router(router_norm(stream[active]) * 1/D)); coefficients c = pred_coefs @ modalities
 *            ([S*S]); prediction j = sum_i c[j*S+i] * stream i + stream j;
 *   the layer on the active prediction a: attention (decode_gemma4.c's, QK-norm, V-norm, KV sharing, own RoPE) and
 *            LAuReL beside it: x = (a + post_attn_norm(attn) + (h + laurel_norm(right(left(h))))) / sqrt(2), h the
 *            normed a; then x += post_ffw_norm(down(gelu_tanh(topk(gate(h'))) * up(h'))), h' = pre_ffw_norm(x), topk
 *            the Gaussian top-k on the first layers: relu(g - (mean + std * multiplier)), std the population one;
 *   correct: modalities of x; every stream = (x - a) * (corr_coefs @ modalities + 1) + its prediction;
 *   per-layer input: the corrected active stream (times correct_scale) gates this layer's per-layer input,
 *            projected and normed, added to every stream but the first.
 * Before the layers the streams are made from the embedding, after them merged (altup.py expand/merge_streams). The
 * per-layer inputs are computed before the call, the final norm, head and soft-cap after it (model.py).
 *
 * One region per step (team.c); workers split products and elementwise pieces, worker 0 runs the short serial parts.
 * Each row's values are computed by the same code in the same order whatever the number of rows or workers, so a
 * verified draft gives the logits of single steps.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blocks.h"
#include "decode.h"
#include "decode_gemma4.h"

typedef struct {
    qmat_t router, laurel_left, laurel_right; /* [S, D], [R, D], [D, R] */
    const float *router_norm, *laurel_norm;
    const float *correct_scale;               /* [D]; NULL without altup_correct_scale */
    const float *pred_coefs, *corr_coefs;     /* fp32 [S*S][S], [S][S] (nn.Linear weights) */
    float std_multiplier;                     /* Gaussian top-k on the gate: the quantile; 0 on dense layers */
} altup_t;

typedef struct {
    long streams, active;
    const qmat_t *proj, *unembed;             /* S - 1 matrices each [D, D]: the streams from the embedding and back */
} dims3n_t;

/* Buffers of a Gemma 3n layer beside the attention's work_t. */
typedef struct {
    float *pred, *x, *rin, *rl, *coef, *lr, *lo, *first, *gu, *act, *mlp, *pg, *target;
} alt_work_t;

/* sqrt(mean(x^2)) of each of M rows of D. */
static void rms_rows(const float *x, long M, long D, float *out) {
    for (long m = 0; m < M; m++) {
        double ss = 0.0;
        for (long i = 0; i < D; i++) ss += (double)x[m * D + i] * x[m * D + i];
        out[m] = (float)sqrt(ss / D);
    }
}

/* y scaled to the RMS `target` of its row, its own RMS floored at sqrt(1e-5) (altup.py _rescaled). */
static void rescale(float *y, const float *target, long M, long D) {
    for (long m = 0; m < M; m++) {
        double ss = 0.0;
        for (long i = 0; i < D; i++) ss += (double)y[m * D + i] * y[m * D + i];
        const float ms = (float)(ss / D), norm = sqrtf(ms > 1e-5f ? ms : 1e-5f);
        for (long i = 0; i < D; i++) y[m * D + i] = y[m * D + i] * target[m] / norm;
    }
}

/* rin = router_norm(x) * 1/D (the 1/D rounded to fp32 as a tensor of the activations' dtype), on worker 0. */
static void router_input(const altup_t *A, const dims4_t *dm, const float *x, float *rin, long M) {
    const long D = dm->dim;
    const float scale = (float)(1.0 / (double)D);
    rms_norm(x, A->router_norm, rin, M, D, dm->eps);
    for (long i = 0; i < M * D; i++) rin[i] *= scale;
}

/* coef[m][j] = sum_k W[j][k] * tanh(rl[m][k]) (+ 1 with `plus_one`): an nn.Linear on the modalities, per row. */
static void coefficients(const float *rl, const float *W, long rows, long S, int plus_one, float *coef, long M) {
    for (long m = 0; m < M; m++) {
        float mod[S];
        for (long k = 0; k < S; k++) mod[k] = tanhf(rl[m * S + k]);
        for (long j = 0; j < rows; j++) {
            float s = 0.0f;
            for (long k = 0; k < S; k++) s += W[j * S + k] * mod[k];
            coef[m * rows + j] = plus_one ? s + 1.0f : s;
        }
    }
}

/* The router product of rin into w->rl and its coefficients (worker 0), complete after a barrier. */
static void route(const altup_t *A, const float *W, long rows, long S, int plus_one, alt_work_t *a, work_t *w,
                  long M, int tid, int nth, team_t *team) {
    float *const y[1] = {a->rl};
    const long ld[1] = {S};
    qmatmul_team(&A->router, 1, a->rin, M, y, ld, w->scratch, w->groups + tid * w->gb, tid, nth, team);
    team_barrier(team, nth);
    if (tid == 0) coefficients(a->rl, W, rows, S, plus_one, a->coef, M);
    team_barrier(team, nth);
}

/* Gaussian top-k of one gate row in place (altup.py gaussian_topk): cutoff = mean + population std * multiplier. */
static void gaussian_topk(float *g, long n, float multiplier) {
    double sum = 0.0, ss = 0.0;
    for (long i = 0; i < n; i++) sum += g[i];
    const double mean = sum / n;
    for (long i = 0; i < n; i++) ss += (g[i] - mean) * (g[i] - mean);
    const float cutoff = (float)mean + (float)sqrt(ss / n) * multiplier;  /* std in double, as torch's Welford */
    for (long i = 0; i < n; i++) g[i] = g[i] - cutoff > 0.0f ? g[i] - cutoff : 0.0f;
}

/* x += post_ffw_norm(MLP(pre_ffw_norm(x))) with the Gaussian top-k on sparse layers. */
static void mlp(const layer4_t *L, const altup_t *A, const dims4_t *dm, float *x, long M, alt_work_t *a, work_t *w,
                int tid, int nth, team_t *team) {
    const long D = dm->dim, I = L->inter, pieces = (I + 63) / 64;
    void *G = w->groups + tid * w->gb;
    long lo, hi;
    if (tid == 0) rms_norm(x, L->pre_ffw_norm, w->h, M, D, dm->eps);
    {
        const qmat_t mats[2] = {L->gate, L->up};
        float *const y[2] = {a->gu, a->gu + I};
        const long ld[2] = {2 * I, 2 * I};
        qmatmul_team(mats, 2, w->h, M, y, ld, w->scratch, G, tid, nth, team);
    }
    team_barrier(team, nth);
    if (A->std_multiplier != 0.0f) {
        share(M, tid, nth, &lo, &hi);
        for (long m = lo; m < hi; m++) gaussian_topk(a->gu + m * 2 * I, I, A->std_multiplier);
        team_barrier(team, nth);
    }
    share(M * pieces, tid, nth, &lo, &hi);
    for (long j = lo; j < hi; j++) {
        const long m = j / pieces, i0 = j % pieces * 64, len = I - i0 < 64 ? I - i0 : 64;
        geglu(a->gu + m * 2 * I + i0, a->gu + m * 2 * I + I + i0, a->act + m * I + i0, len);
    }
    float *const y[1] = {a->mlp};
    const long ld[1] = {D};
    qmatmul_team(&L->down, 1, a->act, M, y, ld, w->scratch, G, tid, nth, team);
    team_barrier(team, nth);
    if (tid == 0) {
        rms_norm(a->mlp, L->post_ffw_norm, a->mlp, M, D, dm->eps);
        for (long i = 0; i < M * D; i++) x[i] += a->mlp[i];
    }
}

/* The active prediction a -> x = (a + attn + laurel) / sqrt(2), the MLP added (before the correction). */
static void body(const layer4_t *L, const altup_t *A, const dims4_t *dm, const float *act, long M, long T,
                 const int64_t *pos, const int64_t *cols, long end, alt_work_t *a, work_t *w, int tid, int nth,
                 team_t *team) {
    const long D = dm->dim, R = A->laurel_left.rows;
    void *G = w->groups + tid * w->gb;
    attend4(L, dm, act, M, T, pos, cols, end, w, tid, nth, team);
    {
        float *const y[1] = {a->lr};
        const long ld[1] = {R};
        qmatmul_team(&A->laurel_left, 1, w->h, M, y, ld, w->scratch, G, tid, nth, team);
    }
    team_barrier(team, nth);
    {
        float *const y[1] = {a->lo};
        const long ld[1] = {D};
        qmatmul_team(&A->laurel_right, 1, a->lr, M, y, ld, w->scratch, G, tid, nth, team);
    }
    team_barrier(team, nth);
    if (tid == 0) {
        const float root2 = (float)sqrt(2.0);
        rms_norm(w->o, L->post_attn_norm, w->o, M, D, dm->eps);
        rms_norm(a->lo, A->laurel_norm, a->lo, M, D, dm->eps);
        for (long i = 0; i < M * D; i++) a->x[i] = (act[i] + w->o[i] + (w->h[i] + a->lo[i])) / root2;
    }
    mlp(L, A, dm, a->x, M, a, w, tid, nth, team);
}

/* One layer on the streams xs [S][M][D] in place (see the top of the file). ple: [M][n_layers][P]. */
static void layer(const layer4_t *L, const altup_t *A, long l, long n_layers, const dims4_t *dm,
                  const dims3n_t *d3, float *xs, const float *ple, long M, long T, const int64_t *pos,
                  const int64_t *cols, long end, alt_work_t *a, work_t *w, int tid, int nth, team_t *team) {
    const long D = dm->dim, P = dm->ple, S = d3->streams, act = d3->active, pieces = (D + 63) / 64;
    void *G = w->groups + tid * w->gb;
    long lo, hi;
    if (tid == 0) router_input(A, dm, xs + act * M * D, a->rin, M);
    route(A, A->pred_coefs, S * S, S, 0, a, w, M, tid, nth, team);
    share(M * pieces, tid, nth, &lo, &hi);
    for (long p = lo; p < hi; p++) {  /* predictions */
        const long m = p / pieces, i0 = p % pieces * 64, len = D - i0 < 64 ? D - i0 : 64;
        for (long j = 0; j < S; j++) {
            const float *c = a->coef + m * S * S + j * S;
            float *out = a->pred + (j * M + m) * D + i0;
            for (long i = 0; i < len; i++) {
                float s = 0.0f;
                for (long k = 0; k < S; k++) s += xs[(k * M + m) * D + i0 + i] * c[k];
                out[i] = s + xs[(j * M + m) * D + i0 + i];
            }
        }
    }
    team_barrier(team, nth);
    const float *pa = a->pred + act * M * D;
    body(L, A, dm, pa, M, T, pos, cols, end, a, w, tid, nth, team);
    if (tid == 0) router_input(A, dm, a->x, a->rin, M);
    route(A, A->corr_coefs, S, S, 1, a, w, M, tid, nth, team);
    share(M * pieces, tid, nth, &lo, &hi);
    for (long p = lo; p < hi; p++) {  /* corrections, and the corrected active stream scaled for the gate */
        const long m = p / pieces, i0 = p % pieces * 64, len = D - i0 < 64 ? D - i0 : 64;
        for (long j = 0; j < S; j++) {
            const float c = a->coef[m * S + j], *pj = a->pred + (j * M + m) * D + i0;
            float *out = xs + (j * M + m) * D + i0;
            for (long i = 0; i < len; i++) out[i] = (a->x[m * D + i0 + i] - pa[m * D + i0 + i]) * c + pj[i];
        }
        const float *first = xs + (act * M + m) * D + i0;
        for (long i = 0; i < len; i++)
            a->first[m * D + i0 + i] = A->correct_scale ? first[i] * A->correct_scale[i0 + i] : first[i];
    }
    team_barrier(team, nth);
    {
        float *const y[1] = {a->gu};
        const long ld[1] = {P};
        qmatmul_team(&L->ple_gate, 1, a->first, M, y, ld, w->scratch, G, tid, nth, team);
    }
    team_barrier(team, nth);
    share(M, tid, nth, &lo, &hi);
    for (long m = lo; m < hi; m++) geglu(a->gu + m * P, ple + (m * n_layers + l) * P, a->pg + m * P, P);
    {
        float *const y[1] = {w->o};
        const long ld[1] = {D};
        qmatmul_team(&L->ple_proj, 1, a->pg, M, y, ld, w->scratch, G, tid, nth, team);
    }
    team_barrier(team, nth);
    if (tid == 0) {
        rms_norm(w->o, L->ple_norm, w->o, M, D, dm->eps);
        for (long j = 1; j < S; j++)
            for (long i = 0; i < M * D; i++) xs[j * M * D + i] += w->o[i];
    }
    team_barrier(team, nth);
}

/* The state of one step, shared by its workers. */
typedef struct {
    const layer4_t *layers;
    const altup_t *alt;
    long n_layers;
    const dims4_t *dm;
    const dims3n_t *d3;
    float *x, *xs;
    const float *ple;
    long M, T;
    const int64_t *pos, *cols;
    long end;
    alt_work_t *a;
    work_t *w;
    team_t team;
} step3n_t;

/* The embedding x [M, D] -> streams xs [S][M][D]: x, then its projections at its RMS (altup.py expand_streams). */
static void expand(step3n_t *st, int tid, int nth) {
    const long M = st->M, D = st->dm->dim, S = st->d3->streams;
    work_t *w = st->w;
    if (S > 1) {
        float *y[8];
        long ld[8];
        for (long i = 0; i < S - 1; i++) y[i] = st->xs + (i + 1) * M * D, ld[i] = D;
        qmatmul_team(st->d3->proj, (int)(S - 1), st->x, M, y, ld, w->scratch, w->groups + tid * w->gb, tid, nth,
                     &st->team);
    }
    team_barrier(&st->team, nth);
    if (tid == 0) {
        memcpy(st->xs, st->x, M * D * sizeof(float));
        rms_rows(st->x, M, D, st->a->target);
        for (long i = 1; i < S; i++) rescale(st->xs + i * M * D, st->a->target, M, D);
    }
}

/* Streams -> x: streams 1.. un-projected to stream 0's RMS, then the mean of all (altup.py merge_streams). */
static void merge(step3n_t *st, int tid, int nth) {
    const long M = st->M, D = st->dm->dim, S = st->d3->streams;
    work_t *w = st->w;
    float *parts = st->a->pred;  /* S - 1 un-projected streams */
    for (long i = 0; i < S - 1; i++) {
        float *const y[1] = {parts + i * M * D};
        const long ld[1] = {D};
        qmatmul_team(st->d3->unembed + i, 1, st->xs + (i + 1) * M * D, M, y, ld, w->scratch,
                     w->groups + tid * w->gb, tid, nth, &st->team);
    }
    team_barrier(&st->team, nth);
    if (tid == 0) {
        rms_rows(st->xs, M, D, st->a->target);
        for (long i = 0; i < S - 1; i++) rescale(parts + i * M * D, st->a->target, M, D);
        for (long j = 0; j < M * D; j++) {
            float sum = st->xs[j];
            for (long i = 0; i < S - 1; i++) sum += parts[i * M * D + j];
            st->x[j] = sum / (float)S;
        }
    }
}

static void step_worker(void *arg, int tid, int nth) {
    step3n_t *st = arg;
    expand(st, tid, nth);
    team_barrier(&st->team, nth);
    for (long l = 0; l < st->n_layers; l++)
        layer(st->layers + l, st->alt + l, l, st->n_layers, st->dm, st->d3, st->xs, st->ple, st->M, st->T, st->pos,
              st->cols, st->end, st->a, st->w, tid, nth, &st->team);
    merge(st, tid, nth);
}

/* x: [M, D] embedded tokens of M = B * T new tokens (T per cache row), updated in place to the merged streams after
 * the last layer; ple: [M][n_layers][P] per-layer inputs; pos, cols, end as decode_gemma4. */
void decode_gemma3n(const layer4_t *layers, const altup_t *alt, long n_layers, const dims4_t *dm,
                    const dims3n_t *d3, float *x, const float *ple, long M, long T, const int64_t *pos,
                    const int64_t *cols, long end, int threads) {
    const long D = dm->dim, N = dm->n_heads, P = dm->ple, S = d3->streams;
    long H = 0, QKV = 0, I = 0, R = 0, chunks = 1;
    for (long l = 0; l < n_layers; l++) {
        const layer4_t *L = layers + l;
        const long span = L->ring ? L->slots : end, c = (span + CHUNK - 1) / CHUNK;
        chunks = c > chunks ? c : chunks;
        H = L->head_dim > H ? L->head_dim : H;
        QKV = (N + 2 * L->n_kv) * L->head_dim > QKV ? (N + 2 * L->n_kv) * L->head_dim : QKV;
        I = L->inter > I ? L->inter : I;
        R = alt[l].laurel_left.rows > R ? alt[l].laurel_left.rows : R;
    }
    long widest = D > N * H ? D : N * H;
    widest = widest > I ? widest : I;
    widest = widest > R ? widest : R;
    widest = widest > P ? widest : P;
    const long GU = 2 * I > P ? 2 * I : P;
    const long floats = M * (D + QKV + N * H + D) + M * N * chunks * (H + 2) + H +
                        M * (S * D + D + D + S + S * S + R + D + D + GU + I + D + P + 1 + S * D);
    float *buf = malloc(sizeof(float) * floats), *p = buf;
    work_t w = {0};
    alt_work_t a;
    w.h = p, p += M * D;
    w.qkv = p, p += M * QKV;
    w.att = p, p += M * N * H;
    w.o = p, p += M * D;
    w.part = p, p += M * N * chunks * (H + 2);
    w.ones = p, p += H;
    for (long i = 0; i < H; i++) w.ones[i] = 1.0f;
    a.pred = p, p += M * S * D;
    a.x = p, p += M * D;
    a.rin = p, p += M * D;
    a.rl = p, p += M * S;
    a.coef = p, p += M * S * S;
    a.lr = p, p += M * R;
    a.lo = p, p += M * D;
    a.first = p, p += M * D;
    a.gu = p, p += M * GU;
    a.act = p, p += M * I;
    a.mlp = p, p += M * D;
    a.pg = p, p += M * P;
    a.target = p, p += M;
    float *xs = p;  /* the streams [S][M][D] */
    w.scratch = malloc(act_bytes(M, widest));
    w.gb = group_bytes(widest);
    w.groups = aligned_alloc(64, w.gb * (threads > 0 ? threads : 1));
    step3n_t st = {layers, alt, n_layers, dm, d3, x, xs, ple, M, T, pos, cols, end, &a, &w, {0}};
    team_run(threads, step_worker, &st);
    free(w.groups);
    free(w.scratch);
    free(buf);
}
