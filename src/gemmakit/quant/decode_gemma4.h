/* The interface of decode_gemma4.c shared with decode_gemma3n.c: the Gemma 4 layer table, the step's scratch and the
 * attention half of a layer, which Gemma 3n's layers run as they are. Include after blocks.h and decode.h. */
#include <stdint.h>

typedef struct {
    qmat_t q, k, v, o, gate, up, down;      /* k.data NULL on KV-shared layers; v.data NULL with attention_k_eq_v */
    qmat_t ple_gate, ple_proj;              /* [P, D], [D, P]; data NULL without per-layer embeddings */
    qmat_t router;                          /* [E, D] (F32 blocks); data NULL without experts */
    const qmat_t *gate_up_exps, *down_exps; /* E matrices each: [2F, D], [D, F] */
    const float *attn_norm, *q_norm, *k_norm, *post_attn_norm, *pre_ffw_norm, *post_ffw_norm;
    const float *post_ffw_norm_1, *pre_ffw_norm_2, *post_ffw_norm_2; /* MoE */
    const float *router_scale, *expert_scale; /* router.scale [D], router.per_expert_scale [E] */
    const float *ple_norm;                  /* post_per_layer_input_norm */
    const float *inv_freq;                  /* H/2 RoPE frequencies of this layer */
    float *k_cache, *v_cache;               /* [rows][KV][S][H]: the source layer's on KV-shared layers */
    int64_t *slot_pos;                      /* [rows][S] */
    long slots, ring, window;               /* as decode.c's layer_t */
    long head_dim, n_kv, inter, n_experts;
    float layer_scalar;
} layer4_t;

typedef struct {
    long dim, n_heads, ple, top_k;          /* ple: per-layer input width P (0 = none); top_k experts per token */
    float eps, scaling, softcap;            /* softcap 0 = none */
} dims4_t;

/* Scratch of one step, sized for its widest layer. */
typedef struct {
    float *h, *qkv, *att, *o, *gu, *act, *mlp, *pg, *logits, *wts, *xs, *gus, *acts, *ys, *part, *ones;
    int *idx, *order, *first, *count;  /* routed slots in expert order; each used expert's first slot and count */
    int used;                           /* experts routed to in this layer, their ids in used_ids */
    int *used_ids;
    void *scratch;
    uint8_t *groups;
    long gb;
} work_t;

/* Attention of a layer on x [M, D] -> w->o [M, D] (o product), w->h = attn_norm(x); complete after a barrier. */
INTERNAL void attend4(const layer4_t *L, const dims4_t *dm, const float *x, long M, long T, const int64_t *pos,
                      const int64_t *cols, long end, work_t *w, int tid, int nth, team_t *team);
