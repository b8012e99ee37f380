/* Attention of a decode step (decode.c, decode_gemma4.c, decode_gemma3n.c): each token's queries over the
 * cached keys and values of its row, in chunks of CHUNK slots split between the team's workers, merged as
 * flash-decoding does. */
#include <stdint.h>
#include <string.h>
#include <math.h>

#include "blocks.h"
#include "decode.h"
#include "vec.h"

static void axpy(float a, const float *x, float *y, long n) {  /* y += a * x */
    long i = 0;
#ifdef VL
    const vf av = vset(a);
    for (; i + VL <= n; i += VL) vstore(y + i, vfma(av, vload(x + i), vload(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
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
