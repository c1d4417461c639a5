/* One environment step of a Decision Aaren policy on the CPU, as one C call.
 *
 * The same function as DecisionModel.step on an Aaren backbone for the three tokens of one
 * environment step (aaren_rl/model.py, blocks.py, layer.py), for a batch of n environments:
 *
 *   tokens (a_{t-1}, R_t, s_t) per environment, each plus its timestep's embedding
 *   -> embed_ln
 *   -> per layer: ln_1 -> values and scores (one product: the key projection folded into the
 *      learned query, as in layer.py) -> fold into the (m, u, w) state (m first drops by the
 *      layer's recency decay, one per token: 0 unless the model was built with recency)
 *      (the a-token at an episode start is padding and folds nothing) -> readout w / u -> out
 *      projection -> residual -> ln_2 -> MLP (fc, exact-erf GELU, proj) -> residual
 *   -> ln_f at the s_t token -> action head (tanh, or logits when discrete).
 *
 * The episode bookkeeping (returns to go, timesteps, episode starts) is the caller's
 * (aaren_rl/policy.py); this file computes only the model.
 *
 * Why one call: at batch 1 the model is ~1.3 M multiply-adds per environment step, about 30 us
 * of arithmetic on one core, while calling ~100 small operators from Python costs ~1-2 ms.
 *
 * Two savings that change no output: the matrix products run on all 3 tokens (x n envs) at once
 * (each weight is read once per step and used 3n times), and the last layer's out projection and
 * MLP run only on the s_t rows: the other tokens' last-layer outputs feed nothing.
 *
 * Weights come packed by cpu_step.py: every Linear as (in, out), so that a row of outputs is a
 * sum of weight rows scaled by inputs (vector FMAs, no horizontal sums), cut into panels of
 * aaren_panel_width() output columns; output widths padded to a multiple of 16 floats. `meta`
 * holds the dimensions and each tensor's offset, in the order of META_FIELDS, whose names
 * aaren_meta_names() exports so that the Python side fills it by name.
 *
 * The state (m, u, w) per layer and head is updated in place. The empty state is m = -inf,
 * u = 0 (as AarenState.empty); the fold tests u == 0 instead of computing with infinities.
 * Built without -ffast-math (see cpu_step.py): only the flags that let gcc vectorize the sums.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16 1
#else
#define HAVE_BF16 0
#endif

/* Vector width and register tile by instruction set: VL floats per vector; a tile of the matrix
 * product is up to 4 rows x NVMAX vectors of accumulators, which must fit in the registers
 * (32 with AVX-512, 16 otherwise). Weight panels are NVMAX * VL columns wide. */
#if defined(__AVX512F__)
#define VL 16
#define NVMAX 4
#elif defined(__AVX__)
#define VL 8
#define NVMAX 2
#else
#define VL 4
#define NVMAX 2
#endif
typedef float vf __attribute__((vector_size(VL * 4)));

int64_t aaren_panel_width(void) { return NVMAX * VL; }
int64_t aaren_has_bf16(void) { return HAVE_BF16; }

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* ---- meta: dims, then offsets (in floats) into the packed parameter buffer ---------------- */
#define META_FIELDS(X)                                                                            \
    /* dimensions */                                                                              \
    X(E) X(H) X(L) X(OBS) X(ACT) X(DISCRETE) X(TMAX) X(APAD) X(BF16)                              \
    /* global tensors */                                                                          \
    X(temb) X(ret_w) X(ret_b) X(state_w) X(state_b) X(act_w) X(act_b) X(eln_w) X(eln_b)           \
    X(lnf_w) X(lnf_b) X(head_w) X(head_b) X(obs_mean) X(obs_std) X(ret_scale)                     \
    /* where the layers start, and the floats from one layer to the next */                       \
    X(layer0) X(layer_stride)                                                                     \
    /* per layer, relative to the layer's start */                                                \
    X(ln1_w) X(ln1_b) X(sv_w) X(sv_b) X(out_w) X(out_b) X(ln2_w) X(ln2_b)                         \
    X(fc_w) X(fc_b) X(proj_w) X(proj_b) X(decay)

#define META_ENUM(name) MT_##name,
enum { META_FIELDS(META_ENUM) META_LEN };
#define META_NAME(name) #name ","
const char *aaren_meta_names(void) { return META_FIELDS(META_NAME); }

/* Everything one call reads and writes, in the order of IO_FIELDS (names exported too). */
#define IO_FIELDS(X)                                                                              \
    X(const float *, params)                                                                      \
    X(const int64_t *, meta)                                                                      \
    X(int64_t, n)              /* environments */                                                 \
    X(const float *, obs)      /* (n, obs_dim) in env units (normalized here) */                  \
    X(const uint8_t *, start)  /* (n,) 1 = this row begins an episode */                          \
    X(const float *, rtg)      /* (n,) R_t */                                                     \
    X(const int64_t *, timestep) /* (n,) t of this observation */                                 \
    X(const float *, prev_action) /* (n, act) continuous a_{t-1} in model units */                \
    X(const int64_t *, prev_index) /* (n,) discrete a_{t-1} */                                    \
    X(float *, m) X(float *, u) X(float *, w) /* (L, n, H), (L, n, H), (L, n, H, Dh), in place */ \
    X(float *, out)            /* (n, act): tanh actions in [-1, 1], or logits */                 \
    X(float *, scratch)        /* aaren_scratch_floats(meta, n) floats */

#define IO_MEMBER(type, name) type name;
typedef struct { IO_FIELDS(IO_MEMBER) } io_t;
#define IO_NAME(type, name) #name ","
const char *aaren_io_names(void) { return IO_FIELDS(IO_NAME); }
int64_t aaren_io_size(void) { return (int64_t)sizeof(io_t); }

/* ---- matrix products --------------------------------------------------------------------- */

/* Y[R rows, NV*16 cols] (=|+=) X[R, K] @ W[K, NV*16] + b, the tile in registers. */
static inline __attribute__((always_inline)) void
tile(const int R, const int NV, const float *X, int64_t ldx, int64_t K, const float *W, int64_t ldw,
     const float *b, float *Y, int64_t ldy, int accumulate)
{
    vf acc[4][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = vload(b + v * VL);
    for (int64_t k = 0; k < K; k++) {
        vf wv[4];
        for (int v = 0; v < NV; v++) {
            wv[v] = vload(W + k * ldw + v * VL);
            /* keep it in a register: gcc would otherwise fold the load into each row's FMA and
             * load every weight R times (load-bound instead of FMA-bound) */
#if defined(__x86_64__) || defined(__i386__)
            __asm__("" : "+v"(wv[v]));
#endif
        }
        for (int r = 0; r < R; r++) {
            vf x = (vf){0} + X[r * ldx + k];
            for (int v = 0; v < NV; v++) acc[r][v] += x * wv[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            float *y = Y + r * ldy + v * VL;
            vstore(y, accumulate ? vload(y) + acc[r][v] : acc[r][v]);
        }
}

#define TILE_CASES(R)                                                                             \
    switch (nv) {                                                                                 \
    case 4: tile(R, 4, x, ldx, K, w, ldw, bb, y, ldy, accumulate); break;                         \
    case 3: tile(R, 3, x, ldx, K, w, ldw, bb, y, ldy, accumulate); break;                         \
    case 2: tile(R, 2, x, ldx, K, w, ldw, bb, y, ldy, accumulate); break;                         \
    default: tile(R, 1, x, ldx, K, w, ldw, bb, y, ldy, accumulate); break;                        \
    }

/* Y[M, N] (=|+=) X[M, K] @ W[K, N] + b; N a multiple of 16; rows strided by ldx, ldy.
 * W is stored in panels of NVMAX * VL columns, each K x width contiguous (the last one
 * narrower), so a column tile streams through memory in order. Column tiles outside, row tiles
 * inside: a panel stays in L1/L2 across the row tiles. */
static void linear(const float *X, int64_t ldx, int64_t M, int64_t K, const float *W, const float *b,
                   int64_t N, float *Y, int64_t ldy, int accumulate)
{
    for (int64_t j = 0; j < N; j += NVMAX * VL) {
        const int nv = (N - j) / VL >= NVMAX ? NVMAX : (int)((N - j) / VL);
        const int64_t ldw = nv * VL;
        const float *w = W + j * K, *bb = b + j;
        for (int64_t i = 0; i < M; i += 4) {
            const float *x = X + i * ldx;
            float *y = Y + i * ldy + j;
            switch (M - i >= 4 ? 4 : M - i) {
            case 4: TILE_CASES(4); break;
            case 3: TILE_CASES(3); break;
            case 2: TILE_CASES(2); break;
            default: TILE_CASES(1); break;
            }
        }
    }
}

#if HAVE_BF16
/* The optional bf16 variant (AVX512_BF16): weights stored as bf16, the inputs rounded to bf16,
 * products summed in float32 by vdpbf16ps, two k at a time (twice the multiply-adds of an FMA
 * per instruction, half the weight bytes). A panel holds, for each pair of inputs (k, k+1), its
 * 64 columns as interleaved pairs: w[k][j], w[k+1][j]. Not exact: ~1e-2 relative. */
static inline __attribute__((always_inline)) void
tile_bf16(const int R, const int NV, const uint16_t *X, int64_t ldx, int64_t Kp, const uint16_t *W, int64_t ldw,
          const float *b, float *Y, int64_t ldy, int accumulate)
{
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_loadu_ps(b + v * 16);
    for (int64_t k = 0; k < Kp; k++) {
        __m512i wv[4];
        for (int v = 0; v < NV; v++) wv[v] = _mm512_loadu_si512((const void *)(W + k * ldw + v * 32));
        for (int r = 0; r < R; r++) {
            int32_t pair;
            memcpy(&pair, X + r * ldx + 2 * k, sizeof pair);
            const __m512i x = _mm512_set1_epi32(pair);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)x, (__m512bh)wv[v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            float *y = Y + r * ldy + v * 16;
            _mm512_storeu_ps(y, accumulate ? _mm512_add_ps(_mm512_loadu_ps(y), acc[r][v]) : acc[r][v]);
        }
}

#define TILE_BF16_CASES(R)                                                                        \
    switch (nv) {                                                                                 \
    case 4: tile_bf16(R, 4, x, Kpad, Kp, w, ldw, bb, y, ldy, accumulate); break;                  \
    case 3: tile_bf16(R, 3, x, Kpad, Kp, w, ldw, bb, y, ldy, accumulate); break;                  \
    case 2: tile_bf16(R, 2, x, Kpad, Kp, w, ldw, bb, y, ldy, accumulate); break;                  \
    default: tile_bf16(R, 1, x, Kpad, Kp, w, ldw, bb, y, ldy, accumulate); break;                 \
    }

static inline uint16_t to_bf16(float f) /* round to nearest even, as torch's .to(bfloat16) */
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static void linear_bf16(const float *X, int64_t ldx, int64_t M, int64_t K, const float *Wf, const float *b,
                        int64_t N, float *Y, int64_t ldy, int accumulate, uint16_t *xb)
{
    const int64_t Kp = (K + 1) / 2, Kpad = 2 * Kp;
    for (int64_t i = 0; i < M; i++) {
        for (int64_t k = 0; k < K; k++) xb[i * Kpad + k] = to_bf16(X[i * ldx + k]);
        if (Kpad > K) xb[i * Kpad + K] = 0;
    }
    const uint16_t *W = (const uint16_t *)Wf;
    for (int64_t j = 0; j < N; j += 64) {
        const int nv = (N - j) / 16 >= 4 ? 4 : (int)((N - j) / 16);
        const int64_t ldw = nv * 32;
        const uint16_t *w = W + j * Kpad;
        const float *bb = b + j;
        for (int64_t i = 0; i < M; i += 4) {
            const uint16_t *x = xb + i * Kpad;
            float *y = Y + i * ldy + j;
            switch (M - i >= 4 ? 4 : M - i) {
            case 4: TILE_BF16_CASES(4); break;
            case 3: TILE_BF16_CASES(3); break;
            case 2: TILE_BF16_CASES(2); break;
            default: TILE_BF16_CASES(1); break;
            }
        }
    }
}
#endif

/* The layers' matrix products: float32, or bf16 where the model was packed so (meta[MT_BF16]). */
static void layer_linear(int bf16, uint16_t *xb, const float *X, int64_t ldx, int64_t M, int64_t K, const float *W,
                         const float *b, int64_t N, float *Y, int64_t ldy, int accumulate)
{
#if HAVE_BF16
    if (bf16) { linear_bf16(X, ldx, M, K, W, b, N, Y, ldy, accumulate, xb); return; }
#endif
    (void)bf16; (void)xb;
    linear(X, ldx, M, K, W, b, N, Y, ldy, accumulate);
}

/* ---- elementwise ------------------------------------------------------------------------- */

static void layer_norm(const float *x, int64_t ldx, int64_t M, int64_t E, const float *g, const float *b,
                       float *y, int64_t ldy)
{
    for (int64_t i = 0; i < M; i++) {
        const float *xi = x + i * ldx;
        float *yi = y + i * ldy;
        float mean = 0.f, var = 0.f;
        for (int64_t e = 0; e < E; e++) mean += xi[e];
        mean /= (float)E;
        for (int64_t e = 0; e < E; e++) { float d = xi[e] - mean; var += d * d; }
        const float rstd = 1.f / sqrtf(var / (float)E + 1e-5f); /* nn.LayerNorm's eps */
        for (int64_t e = 0; e < E; e++) yi[e] = (xi[e] - mean) * rstd * g[e] + b[e];
    }
}

/* erf as a rational function of x on [-4, 4] (beyond, erf is +-1 in float32); absolute error
 * below 2e-7. The well-known float32 approximation of Eigen and XLA. No libm call, so the GELU
 * loop vectorizes. */
static inline float erf_f32(float x)
{
    x = x < -4.f ? -4.f : (x > 4.f ? 4.f : x); /* not fminf/fmaxf: their NaN rules keep them calls */
    const float x2 = x * x;
    float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = x2 * p + -2.10102402082508e-06f;
    p = x2 * p + -5.69250639462346e-05f;
    p = x2 * p + -7.34990630326855e-04f;
    p = x2 * p + -2.95459980854025e-03f;
    p = x2 * p + -1.60960333262415e-02f;
    float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
    q = x2 * q + -1.68282697438203e-03f;
    q = x2 * q + -7.37332916720468e-03f;
    q = x2 * q + -1.42647390514189e-02f;
    return x * p / q;
}

static void gelu(float *x, int64_t count) /* F.gelu's default: exact, with erf */
{
    for (int64_t i = 0; i < count; i++) x[i] = 0.5f * x[i] * (1.f + erf_f32(x[i] * 0.70710678118654752f));
}

/* ---- the Aaren fold: one token into one head's (m, u, w), exactly `combine` ---------------- */

static inline void fold(float *m, float *u, float *w, float s, const float *v, int64_t Dh)
{
    if (*u == 0.f) { /* empty state (m = -inf): the token alone */
        *m = s; *u = 1.f;
        for (int64_t d = 0; d < Dh; d++) w[d] = v[d];
    } else if (s <= *m) { /* the max stays: old terms keep weight 1 */
        const float e = expf(s - *m);
        *u += e;
        for (int64_t d = 0; d < Dh; d++) w[d] += v[d] * e;
    } else { /* a new max: rescale the old terms */
        const float e = expf(*m - s);
        *m = s;
        *u = *u * e + 1.f;
        for (int64_t d = 0; d < Dh; d++) w[d] = w[d] * e + v[d];
    }
}

/* ---- scratch layout ---------------------------------------------------------------------- */

static inline int64_t up16(int64_t x) { return (x + 15) & ~(int64_t)15; }

int64_t aaren_scratch_floats(const int64_t *meta, int64_t n)
{
    const int64_t E = meta[MT_E], M = 3 * n;
    /* x, h, o: M x E each; sv: M x 2E (>= its SV columns); f: M x 4E; xs: n x E; head: n x APAD; obs: n x OBS */
    return up16(M * E) * 3 + up16(M * 2 * E) + up16(M * 4 * E) + up16(n * E) + up16(n * meta[MT_APAD]) +
           up16(n * meta[MT_OBS]) + up16(M * 4 * E) + 64; /* last: bf16 copies of a product's input */
}

/* ---- the step ---------------------------------------------------------------------------- */

int aaren_step(const io_t *io)
{
    const int64_t *mt = io->meta;
    const float *P = io->params;
    const int64_t n = io->n, E = mt[MT_E], H = mt[MT_H], L = mt[MT_L], OBS = mt[MT_OBS], ACT = mt[MT_ACT];
    const int64_t TMAX = mt[MT_TMAX], APAD = mt[MT_APAD], Dh = E / H, M = 3 * n;
    const int discrete = (int)mt[MT_DISCRETE];

    float *sc = io->scratch;
    float *x = sc;                      sc += up16(M * E);     /* residual stream, rows 3b + {a, R, s} */
    float *h = sc;                      sc += up16(M * E);     /* normed rows */
    float *o = sc;                      sc += up16(M * E);     /* attention readouts */
    float *sv = sc;                     sc += up16(M * 2 * E); /* values | scores | zeros */
    const int64_t SV = up16(E + H);     /* its columns (E is a multiple of 16 and H <= E) */
    float *f = sc;                      sc += up16(M * 4 * E); /* MLP hidden */
    float *xs = sc;                     sc += up16(n * E);     /* last layer: the s_t rows only */
    float *head = sc;                   sc += up16(n * APAD);
    float *obs = sc;                    sc += up16(n * OBS);
    uint16_t *xb = (uint16_t *)sc;
    const int bf16 = (int)mt[MT_BF16];

    /* -- tokens: (a_{t-1}, R_t, s_t), each + its timestep's embedding (a: t - 1) -- */
    {
        const float *mean = P + mt[MT_obs_mean], *std = P + mt[MT_obs_std];
        for (int64_t b = 0; b < n; b++)
            for (int64_t i = 0; i < OBS; i++) obs[b * OBS + i] = (io->obs[b * OBS + i] - mean[i]) / std[i];
    }
    linear(obs, OBS, n, OBS, P + mt[MT_state_w], P + mt[MT_state_b], E, x + 2 * E, 3 * E, 0);
    if (!discrete)
        linear(io->prev_action, ACT, n, ACT, P + mt[MT_act_w], P + mt[MT_act_b], E, x, 3 * E, 0);
    const float *ret_w = P + mt[MT_ret_w], *ret_b = P + mt[MT_ret_b], *temb = P + mt[MT_temb];
    const float scale = P[mt[MT_ret_scale]];
    for (int64_t b = 0; b < n; b++) {
        int64_t t = io->timestep[b];
        const int64_t ts = t < 0 ? 0 : (t >= TMAX ? TMAX - 1 : t);
        const int64_t ta = t - 1 < 0 ? 0 : (t - 1 >= TMAX ? TMAX - 1 : t - 1);
        float *xa = x + (3 * b) * E, *xr = xa + E, *xst = xr + E;
        const float r = io->rtg[b] / scale;
        if (discrete) {
            int64_t a = io->prev_index[b];
            a = a < 0 ? 0 : (a >= ACT ? ACT - 1 : a);
            const float *row = P + mt[MT_act_w] + a * E;
            for (int64_t e = 0; e < E; e++) xa[e] = row[e] + temb[ta * E + e];
        } else {
            for (int64_t e = 0; e < E; e++) xa[e] += temb[ta * E + e];
        }
        for (int64_t e = 0; e < E; e++) xr[e] = (r * ret_w[e] + ret_b[e]) + temb[ts * E + e];
        for (int64_t e = 0; e < E; e++) xst[e] += temb[ts * E + e];
    }
    layer_norm(x, E, M, E, P + mt[MT_eln_w], P + mt[MT_eln_b], x, E);

    /* rows that begin an episode start from the empty state */
    for (int64_t l = 0; l < L; l++)
        for (int64_t b = 0; b < n; b++) {
            if (!io->start[b]) continue;
            for (int64_t hd = 0; hd < H; hd++) {
                const int64_t s = (l * n + b) * H + hd;
                io->m[s] = -INFINITY;
                io->u[s] = 0.f;
                memset(io->w + s * Dh, 0, sizeof(float) * Dh);
            }
        }

    for (int64_t l = 0; l < L; l++) {
        const float *lp = P + mt[MT_layer0] + l * mt[MT_layer_stride];
        const int last = l == L - 1;
        layer_norm(x, E, M, E, lp + mt[MT_ln1_w], lp + mt[MT_ln1_b], h, E);
        layer_linear(bf16, xb, h, E, M, E, lp + mt[MT_sv_w], lp + mt[MT_sv_b], SV, sv, SV, 0);
        for (int64_t b = 0; b < n; b++)
            for (int64_t hd = 0; hd < H; hd++) {
                const int64_t s_ix = (l * n + b) * H + hd;
                float *m = io->m + s_ix, *u = io->u + s_ix, *w = io->w + s_ix * Dh;
                const float decay = lp[mt[MT_decay] + hd]; /* recency: m drops by it per token */
                for (int64_t i = 0; i < 3; i++) {
                    const float *row = sv + (3 * b + i) * SV;
                    if (*u != 0.f) *m -= decay; /* the state's m is referred to its last token */
                    if (!(i == 0 && io->start[b])) /* the a-token at t = 0 is padding */
                        fold(m, u, w, row[E + hd], row + hd * Dh, Dh);
                    if (last && i != 2) continue; /* only s_t's output is used after the last fold */
                    float *od = (last ? o + b * E : o + (3 * b + i) * E) + hd * Dh;
                    if (*u == 0.f) memset(od, 0, sizeof(float) * Dh);
                    else for (int64_t d = 0; d < Dh; d++) od[d] = w[d] / *u;
                }
            }
        if (!last) {
            layer_linear(bf16, xb, o, E, M, E, lp + mt[MT_out_w], lp + mt[MT_out_b], E, x, E, 1);
            layer_norm(x, E, M, E, lp + mt[MT_ln2_w], lp + mt[MT_ln2_b], h, E);
            layer_linear(bf16, xb, h, E, M, E, lp + mt[MT_fc_w], lp + mt[MT_fc_b], 4 * E, f, 4 * E, 0);
            gelu(f, M * 4 * E);
            layer_linear(bf16, xb, f, 4 * E, M, 4 * E, lp + mt[MT_proj_w], lp + mt[MT_proj_b], E, x, E, 1);
        } else {
            for (int64_t b = 0; b < n; b++) memcpy(xs + b * E, x + (3 * b + 2) * E, sizeof(float) * E);
            layer_linear(bf16, xb, o, E, n, E, lp + mt[MT_out_w], lp + mt[MT_out_b], E, xs, E, 1);
            layer_norm(xs, E, n, E, lp + mt[MT_ln2_w], lp + mt[MT_ln2_b], h, E);
            layer_linear(bf16, xb, h, E, n, E, lp + mt[MT_fc_w], lp + mt[MT_fc_b], 4 * E, f, 4 * E, 0);
            gelu(f, n * 4 * E);
            layer_linear(bf16, xb, f, 4 * E, n, 4 * E, lp + mt[MT_proj_w], lp + mt[MT_proj_b], E, xs, E, 1);
        }
    }
    layer_norm(xs, E, n, E, P + mt[MT_lnf_w], P + mt[MT_lnf_b], h, E);
    linear(h, E, n, E, P + mt[MT_head_w], P + mt[MT_head_b], APAD, head, APAD, 0);
    for (int64_t b = 0; b < n; b++)
        for (int64_t a = 0; a < ACT; a++) {
            const float z = head[b * APAD + a];
            io->out[b * ACT + a] = discrete ? z : tanhf(z);
        }
    return 0;
}
