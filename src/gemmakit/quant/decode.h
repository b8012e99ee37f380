/* The interface of decode.c shared with decode_gemma4.c: its layer table and the pieces of a step both reuse. */
/* Include after blocks.h (qmat_t, team_t). */
#include <stdint.h>

typedef struct {
    qmat_t q, k, v, o, gate, up, down;      /* [NH, D], [KH, D], [KH, D], [D, NH], [I, D], [I, D], [D, I] */
    const float *attn_norm, *q_norm, *k_norm; /* (1 + w) scales; q/k NULL without QK-norm (Gemma 1/2) */
    const float *post_attn_norm, *pre_ffw_norm, *post_ffw_norm; /* Gemma 1: post_attn is the pre-MLP norm, rest NULL */
    const float *inv_freq;                  /* H/2 RoPE frequencies of this layer (base and linear scale applied) */
    float *k_cache, *v_cache;               /* [rows][K][S][H] */
    int64_t *slot_pos;                      /* [rows][S] */
    long slots;                             /* S */
    long ring;                              /* sliding ring buffer: slot = column % S, attend over all S slots */
    long window;                            /* sliding window W, 0 on global layers */
} layer_t;

typedef struct {
    long dim, n_heads, n_kv, head_dim, inter;
    float eps, scaling, softcap;            /* softcap 0 = none */
} dims_t;

#define CHUNK 256  /* slots per attention task, at fixed offsets: results do not depend on how many slots follow */

void rms_norm(const float *x, const float *scale, float *y, long rows, long dim, float eps);
void rope_many(const float *x, const float *cos, const float *sin, float *out, long B, long N, long T, long H,
               int threads);
void rms_norm_many(const float *x, const float *scale, float *y, long rows, long dim, float eps, int threads);
void geglu_many(const float *g, const float *u, float *out, long n, int threads);
/* Hidden: calls between the two files bind here, never to a same-named symbol another loaded library exports. */
#define INTERNAL __attribute__((visibility("hidden")))

INTERNAL void geglu(const float *g, const float *u, float *out, long n);
INTERNAL void rope_cs(int64_t pos, const float *inv_freq, long half, float *c, float *s);
INTERNAL void rope(float *x, long heads, long H, const float *c, const float *s);
INTERNAL void attention(const layer_t *L, const dims_t *dm, const float *qkv, long QKV, long M, long T,
                        const int64_t *pos, long span, float *att, float *part, int tid, int nth, team_t *team);
