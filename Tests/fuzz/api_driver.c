/*
 * api_driver.c — seeded random sequences of libdynmoe C API calls with random and edge-case
 * arguments, for Tests/fuzz/fuzz_checkpoints.py (which runs it in a subprocess per seed).
 *
 * Arguments are drawn from: live handles of the right type, NULL, freed handles, live handles of
 * another type, and pointers that were never handles (the library keeps a handle registry, so
 * all of these must give DYNMOE_ERR_INVALID_ARGUMENT, never a crash); negative, zero and huge
 * sizes; too-small output buffers (capacities are never larger than the real buffer, so the
 * library can only overflow one by breaking the contract); invalid policies, sampling
 * parameters, logits modes, token ids. Callbacks re-enter the library (a generate callback calls
 * eval on the same session and must get DYNMOE_ERR_BUSY; an observer runs a nested forward).
 *
 * Checked after every call (a failed check is a "violation"):
 *  - the status is a known code and not DYNMOE_ERR_INTERNAL;
 *  - a failed call leaves a non-empty dynmoe_last_error();
 *  - *_create / *_load / *_get_stats set their out handle on success and NULL on failure;
 *  - output buffers of a failed call are untouched (canary), a failed eval/rewind/set_routing
 *    leaves the session's position unchanged;
 *  - observer events are well formed (counts in [1, E], experts in [0, E)).
 *
 * Usage:  api_driver FIXTURES_DIR SEED [OPS]
 * Prints per-status counts and violations; exits 0 if no violation, 3 otherwise.
 * Build:  cc -std=c99 -O1 -Iinclude Tests/fuzz/api_driver.c -Lbuild/lib -ldynmoe \
 *            -Wl,-rpath,$PWD/build/lib -lm -o build/bin/fuzz_api_driver
 */
#define _POSIX_C_SOURCE 200809L
#include <dynmoe.h>

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Random numbers and bookkeeping                                                              */
/* ------------------------------------------------------------------------------------------ */

static uint64_t g_rng;
static uint64_t rnd(void) {
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static int below(int n) { return n <= 0 ? 0 : (int)(rnd() % (uint64_t)n); }
static int chance(int percent) { return below(100) < percent; }
#define PICK(array) ((array)[below((int)(sizeof(array) / sizeof((array)[0])))])

static long g_calls, g_violations, g_status_counts[11], g_unknown_status;
static const char *g_op = "";

static void violation(const char *format, ...) {
    va_list args;
    va_start(args, format);
    g_violations++;
    if (g_violations <= 20) {
        fprintf(stdout, "VIOLATION [op %s] ", g_op);
        vfprintf(stdout, format, args);
        fputc('\n', stdout);
    }
    va_end(args);
}

/* Records a status and checks the error contract; returns the status. */
static dynmoe_status checked(const char *call, dynmoe_status s) {
    g_calls++;
    if (s < DYNMOE_OK || s > DYNMOE_ERR_INTERNAL) {
        g_unknown_status++;
        violation("%s returned unknown status %d", call, (int)s);
        return s;
    }
    g_status_counts[s]++;
    if (s == DYNMOE_ERR_INTERNAL) violation("%s returned DYNMOE_ERR_INTERNAL: %s", call, dynmoe_last_error());
    if (s != DYNMOE_OK) {
        const char *m = dynmoe_last_error();
        if (m == NULL || m[0] == '\0') violation("%s failed with %s but dynmoe_last_error() is empty", call, dynmoe_status_name(s));
    }
    return s;
}

/* ------------------------------------------------------------------------------------------ */
/* Handles                                                                                     */
/* ------------------------------------------------------------------------------------------ */

enum { K_MODEL, K_ROUTING, K_SESSION, K_TRACE, K_STATS, K_KINDS };
enum { MAX_LIVE = 16, MAX_FREED = 64 };

typedef struct {
    void *p;
    int vocab, layers, experts, maxpos; /* of the model it belongs to */
    int sequences;                      /* sessions */
    int batch, length;                  /* traces */
} handle_t;

static handle_t g_live[K_KINDS][MAX_LIVE];
static int g_nlive[K_KINDS];
static void *g_freed[MAX_FREED];
static int g_nfreed;
static char g_not_a_handle[64]; /* addresses that were never handles */

static const char *g_fixtures[] = {"dynamic-moe-tiny", "mixtral-tiny", "olmoe-tiny", "qwen2moe-tiny", "qwen3moe-tiny-bf16"};
static const char *g_fixture_dir;

static handle_t *add_live(int kind, handle_t h) {
    if (g_nlive[kind] == MAX_LIVE) return NULL; /* caller frees */
    g_live[kind][g_nlive[kind]] = h;
    return &g_live[kind][g_nlive[kind]++];
}

static void remember_freed(void *p) {
    if (p == NULL) return;
    if (g_nfreed < MAX_FREED) g_freed[g_nfreed++] = p;
    else g_freed[below(MAX_FREED)] = p;
}

/* The default facts used when an argument handle is not a live one of the right kind. */
static handle_t g_default = {NULL, 96, 4, 8, 256, 1, 1, 1};

/* A handle argument for a function expecting `kind`: usually a live one, sometimes NULL, a freed
 * one, a live one of another kind, or an address that never was a handle. `*facts` describes it. */
static void *pick_handle_raw(int kind, handle_t *facts) {
    *facts = g_default;
    int r = below(100);
    if (r < 72 && g_nlive[kind] > 0) {
        *facts = g_live[kind][below(g_nlive[kind])];
        return facts->p;
    }
    if (r < 80) return NULL;
    if (r < 88 && g_nfreed > 0) return g_freed[below(g_nfreed)];
    if (r < 95) {
        int other = below(K_KINDS);
        if (other != kind && g_nlive[other] > 0) return g_live[other][below(g_nlive[other])].p;
    }
    return &g_not_a_handle[below(8) * 8];
}

static void *pick_handle(int kind, handle_t *facts) {
    void *p = pick_handle_raw(kind, facts);
    /* A freed handle's address may have been reused by a new object of the same kind: then it is
     * a live handle (and the call may succeed), described by that object's facts. */
    for (int i = 0; p != NULL && i < g_nlive[kind]; i++)
        if (g_live[kind][i].p == p) *facts = g_live[kind][i];
    return p;
}

static void free_any(int kind, void *p) {
    switch (kind) {
    case K_MODEL: dynmoe_model_free(p); break;
    case K_ROUTING: dynmoe_routing_free(p); break;
    case K_SESSION: dynmoe_session_free(p); break;
    case K_TRACE: dynmoe_trace_free(p); break;
    default: dynmoe_stats_free(p); break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Argument generators                                                                         */
/* ------------------------------------------------------------------------------------------ */

static const int32_t g_edge_ints[] = {0, -1, 1, 2, INT32_MIN, INT32_MAX, 4097, 65536, -4096};

static int32_t some_int(int lo, int hi) {
    if (chance(75)) return lo + below(hi - lo + 1);
    return PICK(g_edge_ints);
}

static float some_float(float lo, float hi) {
    static const float edges[] = {0.0f, -0.0f, 1.0f, 1.0000001f, 0.9999999f, -1.0f, 1e-38f, 1e-45f, 2.0f, 1e30f};
    int r = below(100);
    if (r < 70) return lo + (hi - lo) * (float)(rnd() % 1000001) / 1000000.0f;
    if (r < 80) return NAN;
    if (r < 85) return r % 2 ? INFINITY : -INFINITY;
    return PICK(edges);
}

static dynmoe_policy some_policy(int experts) {
    dynmoe_policy p;
    switch (below(4)) {
    case 0: p = dynmoe_policy_native(); break;
    case 1: p = dynmoe_policy_top_k(some_int(1, experts)); break;
    default: p = dynmoe_policy_top_p(some_float(0.0f, 1.0f)); break;
    }
    if (chance(15)) p.mode = PICK(g_edge_ints);
    if (chance(30)) p.min_experts = some_int(0, experts);
    if (chance(30)) p.max_experts = some_int(0, experts);
    if (chance(30)) p.renormalize = chance(80) ? below(3) - 1 : PICK(g_edge_ints);
    return p;
}

static int32_t some_token(int vocab) {
    if (chance(97)) return below(vocab);
    static const int32_t bad[] = {-1, INT32_MIN, INT32_MAX, 96, 80, 72, 64, 88};
    return chance(50) ? vocab : PICK(bad);
}

/* Buffers: capacities passed to the library never exceed these sizes. */
enum { TOKENS_CAP = 8192, OUT_CAP = 65536 };
static int32_t g_tokens[TOKENS_CAP];
static float g_floats[OUT_CAP];
static int64_t g_int64s[OUT_CAP];
static double g_doubles[OUT_CAP];
static int32_t g_int32s[OUT_CAP];
static uint8_t g_bytes[OUT_CAP];
static char g_chars[OUT_CAP];

static void fill_tokens(int vocab) {
    for (int i = 0; i < TOKENS_CAP; i++) g_tokens[i] = some_token(vocab);
}

/* Capacity for an output of `needed` elements into a buffer of `cap`: exact, too small, zero or
 * generous, never above `cap`. */
static size_t some_capacity(size_t needed, size_t cap) {
    size_t c;
    switch (below(5)) {
    case 0: c = 0; break;
    case 1: c = needed > 0 ? needed - 1 : 0; break;
    case 2: c = (size_t)below((int)(needed < 1000 ? needed + 1 : 1000)); break;
    default: c = needed; break;
    }
    return c > cap ? cap : c;
}

/* Canary: fill, then verify a failed call wrote nothing. */
static void canary_fill(void *p, size_t bytes) { memset(p, 0xA5, bytes); }
static void canary_check(const char *call, dynmoe_status s, const void *p, size_t bytes) {
    if (s == DYNMOE_OK) return;
    const unsigned char *b = p;
    for (size_t i = 0; i < bytes; i++)
        if (b[i] != 0xA5) {
            violation("%s failed (%s) but wrote to its output buffer (byte %zu)", call, dynmoe_status_name(s), i);
            return;
        }
}

/* ------------------------------------------------------------------------------------------ */
/* Callbacks                                                                                   */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    int num_experts; /* expected experts per event, 0 = unknown */
    int events;
    dynmoe_model *model;   /* for the nested forward, may be NULL */
    int nested;            /* nested forwards still allowed */
} observer_state;

static void observer(const dynmoe_routing_event *e, void *user_data) {
    observer_state *st = user_data;
    st->events++;
    if (e == NULL) {
        violation("observer got a NULL event");
        return;
    }
    if (st->num_experts && e->num_experts != st->num_experts)
        violation("observer: num_experts %d, expected %d", e->num_experts, st->num_experts);
    if (e->stride < e->num_experts && e->stride < 1) violation("observer: stride %d", e->stride);
    for (int t = 0; t < e->num_tokens; t++) {
        int c = e->counts[t];
        if (c < 1 || c > e->num_experts || c > e->stride) {
            violation("observer: token %d has %d experts (E = %d, stride %d)", t, c, e->num_experts, e->stride);
            continue;
        }
        for (int i = 0; i < c; i++) {
            int x = e->experts[t * e->stride + i];
            if (x < 0 || x >= e->num_experts) violation("observer: expert id %d outside [0, %d)", x, e->num_experts);
        }
    }
    if (st->nested > 0 && st->model && chance(30)) {
        st->nested--;
        int32_t tok = 1;
        checked("dynmoe_forward (nested in observer)", dynmoe_forward(st->model, &tok, 1, 1, NULL, NULL, 0, NULL));
    }
}

typedef struct {
    dynmoe_session *session;
    int sequences;
    int stop_after;
    int reentered;
} generate_state;

static int32_t token_callback(const int32_t *tokens, int32_t n_sequences, int32_t step, void *user_data) {
    generate_state *st = user_data;
    if (tokens == NULL || n_sequences != st->sequences)
        violation("generate callback: tokens %p, n_sequences %d (expected %d)", (const void *)tokens, n_sequences,
                  st->sequences);
    if (!st->reentered && chance(30)) {
        st->reentered = 1;
        int32_t tok[8] = {0};
        dynmoe_status s = checked("dynmoe_session_eval (re-entered from generate callback)",
                                  dynmoe_session_eval(st->session, tok, 1, NULL, NULL, 0, NULL));
        if (s != DYNMOE_ERR_BUSY)
            violation("eval on the generating session from its callback returned %s, expected DYNMOE_ERR_BUSY",
                      dynmoe_status_name(s));
    }
    return step + 1 >= st->stop_after;
}

/* ------------------------------------------------------------------------------------------ */
/* Operations                                                                                  */
/* ------------------------------------------------------------------------------------------ */

static void op_load(void) {
    g_op = "load";
    char path[4096];
    int r = below(100);
    const char *arg = path;
    if (r < 75) snprintf(path, sizeof path, "%s/%s/model", g_fixture_dir, PICK(g_fixtures));
    else if (r < 85) snprintf(path, sizeof path, "%s/%s", g_fixture_dir, PICK(g_fixtures)); /* not a checkpoint */
    else if (r < 92) snprintf(path, sizeof path, "%s/no-such-dir-%d", g_fixture_dir, below(1000));
    else if (r < 96) arg = NULL;
    else snprintf(path, sizeof path, "%s", "");
    dynmoe_load_params params = dynmoe_load_params_default();
    params.n_threads = chance(85) ? below(3) : PICK(g_edge_ints) % 300; /* 300 threads is allowed, capped at 256 */
    if (params.n_threads > 4) params.n_threads = -params.n_threads; /* keep thread counts small, test negatives */
    params.prefetch = below(2);
    dynmoe_model *m = (dynmoe_model *)&g_not_a_handle[0];
    int null_out = chance(4);
    dynmoe_status s = checked("dynmoe_model_load", dynmoe_model_load(arg, chance(10) ? NULL : &params, null_out ? NULL : &m));
    if (null_out) {
        if (s == DYNMOE_OK) violation("dynmoe_model_load with out_model NULL succeeded");
        return;
    }
    if (s != DYNMOE_OK) {
        if (m != NULL) violation("dynmoe_model_load failed but out_model is not NULL");
        return;
    }
    if (m == NULL) {
        violation("dynmoe_model_load succeeded with out_model NULL");
        return;
    }
    dynmoe_model_info info;
    if (checked("dynmoe_model_get_info", dynmoe_model_get_info(m, &info)) != DYNMOE_OK) {
        violation("get_info failed on a freshly loaded model");
        dynmoe_model_free(m);
        return;
    }
    handle_t h = {m, info.vocab_size, info.num_layers, info.num_experts, info.max_position_embeddings, 1, 1, 1};
    if (!add_live(K_MODEL, h)) dynmoe_model_free(m);
}

static void op_model_queries(void) {
    g_op = "model_queries";
    handle_t f;
    void *m = pick_handle(K_MODEL, &f);
    dynmoe_model_info info;
    canary_fill(&info, sizeof info);
    dynmoe_status s = checked("dynmoe_model_get_info", dynmoe_model_get_info(m, chance(8) ? NULL : &info));
    canary_check("dynmoe_model_get_info", s, &info, sizeof info);
    size_t count = 12345;
    size_t cap = some_capacity((size_t)f.layers, 64);
    int null_buffer = chance(15);
    canary_fill(g_int32s, 64 * sizeof(int32_t));
    s = checked("dynmoe_model_get_moe_layers",
                dynmoe_model_get_moe_layers(m, null_buffer ? NULL : g_int32s, null_buffer ? (chance(50) ? 0 : 3) : cap,
                                            chance(20) ? NULL : &count));
    canary_check("dynmoe_model_get_moe_layers", s, g_int32s, 64 * sizeof(int32_t));
    if (chance(20)) checked("dynmoe_model_reset_stats", dynmoe_model_reset_stats(m));
}

static void op_routing_create(void) {
    g_op = "routing_create";
    handle_t f;
    void *m = pick_handle(K_MODEL, &f);
    dynmoe_policy p = some_policy(f.experts);
    dynmoe_routing *r = (dynmoe_routing *)&g_not_a_handle[8];
    int null_out = chance(4);
    dynmoe_status s = checked("dynmoe_routing_create", dynmoe_routing_create(m, chance(20) ? NULL : &p, null_out ? NULL : &r));
    if (null_out) return;
    if (s != DYNMOE_OK) {
        if (r != NULL) violation("dynmoe_routing_create failed but out_routing is not NULL");
        return;
    }
    if (r == NULL) {
        violation("dynmoe_routing_create succeeded with NULL");
        return;
    }
    handle_t h = f;
    h.p = r;
    if (!add_live(K_ROUTING, h)) dynmoe_routing_free(r);
}

static void op_routing_set_layer(void) {
    g_op = "routing_set_layer";
    handle_t f;
    void *r = pick_handle(K_ROUTING, &f);
    dynmoe_policy p = some_policy(f.experts);
    checked("dynmoe_routing_set_layer", dynmoe_routing_set_layer(r, some_int(-1, f.layers), chance(15) ? NULL : &p));
}

static dynmoe_forward_params some_forward_params(const handle_t *model_facts, observer_state *obs, int allow_trace) {
    dynmoe_forward_params fp = dynmoe_forward_params_default();
    if (chance(40)) {
        handle_t rf;
        fp.routing = pick_handle(K_ROUTING, &rf);
    }
    fp.record_trace = allow_trace && chance(40);
    if (chance(5)) fp.record_trace = PICK(g_edge_ints);
    fp.logits_mode = chance(85) ? below(3) : PICK(g_edge_ints);
    if (chance(30)) {
        obs->num_experts = model_facts->experts;
        obs->events = 0;
        obs->nested = 1;
        fp.observer = observer;
        fp.observer_user_data = obs;
    }
    return fp;
}

static void keep_trace(dynmoe_trace *t, const handle_t *facts, int batch, int length) {
    if (t == NULL) return;
    handle_t h = *facts;
    h.p = t;
    h.batch = batch;
    h.length = length;
    if (!add_live(K_TRACE, h)) dynmoe_trace_free(t);
}

static void op_forward(void) {
    g_op = "forward";
    handle_t f;
    void *m = pick_handle(K_MODEL, &f);
    static const int32_t bad_dims[] = {0, -1, INT32_MIN, INT32_MAX, 4097, 300};
    int32_t batch = chance(90) ? 1 + below(3) : PICK(bad_dims);
    int32_t length = chance(90) ? 1 + below(8) : PICK(bad_dims);
    fill_tokens(f.vocab);
    observer_state obs = {0, 0, NULL, 0};
    obs.model = m;
    dynmoe_forward_params fp = some_forward_params(&f, &obs, 1);
    size_t rows = fp.logits_mode == DYNMOE_LOGITS_LAST ? (size_t)(batch > 0 ? batch : 1)
                                                       : (size_t)(batch > 0 ? batch : 1) * (size_t)(length > 0 ? length : 1);
    size_t needed = rows * (size_t)f.vocab;
    int no_logits = chance(15);
    size_t cap = no_logits ? (chance(80) ? 0 : 7) : some_capacity(needed, OUT_CAP);
    dynmoe_trace *t = (dynmoe_trace *)&g_not_a_handle[16];
    int null_trace = chance(10);
    canary_fill(g_floats, OUT_CAP * sizeof(float));
    dynmoe_status s = checked("dynmoe_forward", dynmoe_forward(m, chance(3) ? NULL : g_tokens, batch, length, chance(10) ? NULL : &fp,
                                                               no_logits ? NULL : g_floats, cap, null_trace ? NULL : &t));
    canary_check("dynmoe_forward", s, g_floats, OUT_CAP * sizeof(float));
    if (!null_trace) {
        if (s != DYNMOE_OK && t != NULL) violation("dynmoe_forward failed but out_trace is not NULL");
        if (s == DYNMOE_OK) keep_trace(t, &f, batch, length);
    }
}

static void op_trace_queries(void) {
    g_op = "trace_queries";
    handle_t f;
    void *t = pick_handle(K_TRACE, &f);
    int32_t b, l, nl, hs;
    checked("dynmoe_trace_get_shape", dynmoe_trace_get_shape(t, chance(20) ? NULL : &b, &l, chance(20) ? NULL : &nl, &hs));
    int32_t layer = some_int(-1, f.layers);
    size_t per_token = 64; /* >= H and >= E for the fixtures */
    size_t needed = (size_t)f.batch * (size_t)f.length * per_token;
    size_t cap = some_capacity(needed, OUT_CAP);
    const char *call = "";
    dynmoe_status s;
    void *buffer;
    size_t bytes;
    switch (below(5)) {
    case 0:
        call = "dynmoe_trace_get_hidden";
        buffer = g_floats, bytes = sizeof g_floats;
        canary_fill(buffer, bytes);
        s = checked(call, dynmoe_trace_get_hidden(t, layer, chance(8) ? NULL : g_floats, cap));
        break;
    case 1:
        call = "dynmoe_trace_get_router_probs";
        buffer = g_floats, bytes = sizeof g_floats;
        canary_fill(buffer, bytes);
        s = checked(call, dynmoe_trace_get_router_probs(t, layer, chance(8) ? NULL : g_floats, cap));
        break;
    case 2:
        call = "dynmoe_trace_get_selected";
        buffer = g_bytes, bytes = sizeof g_bytes;
        canary_fill(buffer, bytes);
        s = checked(call, dynmoe_trace_get_selected(t, layer, chance(8) ? NULL : g_bytes, cap));
        break;
    case 3:
        call = "dynmoe_trace_get_weights";
        buffer = g_floats, bytes = sizeof g_floats;
        canary_fill(buffer, bytes);
        s = checked(call, dynmoe_trace_get_weights(t, layer, chance(8) ? NULL : g_floats, cap));
        break;
    default: {
        call = "dynmoe_trace_get_token_experts";
        size_t count = 0, c = (size_t)below(18);
        buffer = g_int32s, bytes = 64 * sizeof(int32_t);
        canary_fill(g_int32s, bytes);
        canary_fill(g_floats, 64 * sizeof(float));
        s = checked(call, dynmoe_trace_get_token_experts(t, layer, some_int(0, f.batch), some_int(0, f.length),
                                                         chance(20) ? NULL : g_int32s, chance(20) ? NULL : g_floats, c,
                                                         chance(10) ? NULL : &count));
        canary_check(call, s, g_floats, 64 * sizeof(float));
        break;
    }
    }
    canary_check(call, s, buffer, bytes);
}

static void keep_stats(dynmoe_status s, dynmoe_stats *st, const char *call, const handle_t *facts) {
    if (s != DYNMOE_OK) {
        if (st != NULL) violation("%s failed but out_stats is not NULL", call);
        return;
    }
    if (st == NULL) {
        violation("%s succeeded with out_stats NULL", call);
        return;
    }
    handle_t h = *facts;
    h.p = st;
    if (!add_live(K_STATS, h)) dynmoe_stats_free(st);
}

static void op_get_stats(void) {
    g_op = "get_stats";
    handle_t f;
    dynmoe_stats *st = (dynmoe_stats *)&g_not_a_handle[24];
    int null_out = chance(5);
    dynmoe_status s;
    const char *call;
    switch (below(3)) {
    case 0: {
        void *m = pick_handle(K_MODEL, &f);
        call = "dynmoe_model_get_stats";
        s = checked(call, dynmoe_model_get_stats(m, null_out ? NULL : &st));
        break;
    }
    case 1: {
        void *se = pick_handle(K_SESSION, &f);
        call = "dynmoe_session_get_stats";
        s = checked(call, dynmoe_session_get_stats(se, null_out ? NULL : &st));
        break;
    }
    default: {
        void *t = pick_handle(K_TRACE, &f);
        call = "dynmoe_trace_get_stats";
        s = checked(call, dynmoe_trace_get_stats(t, null_out ? NULL : &st));
        break;
    }
    }
    if (!null_out) keep_stats(s, st, call, &f);
}

static void op_stats_queries(void) {
    g_op = "stats_queries";
    handle_t f;
    void *st = pick_handle(K_STATS, &f);
    int32_t layer = some_int(-1, f.layers);
    size_t needed = (size_t)f.experts + 1;
    size_t cap = some_capacity(needed, 64);
    dynmoe_status s;
    switch (below(6)) {
    case 0: {
        dynmoe_stats_summary sum;
        canary_fill(&sum, sizeof sum);
        s = checked("dynmoe_stats_get_summary", dynmoe_stats_get_summary(st, chance(10) ? NULL : &sum));
        canary_check("dynmoe_stats_get_summary", s, &sum, sizeof sum);
        break;
    }
    case 1: {
        dynmoe_layer_stats ls;
        canary_fill(&ls, sizeof ls);
        s = checked("dynmoe_stats_get_layer", dynmoe_stats_get_layer(st, layer, chance(10) ? NULL : &ls));
        canary_check("dynmoe_stats_get_layer", s, &ls, sizeof ls);
        break;
    }
    case 2:
        canary_fill(g_int64s, 64 * sizeof(int64_t));
        s = checked("dynmoe_stats_get_expert_counts", dynmoe_stats_get_expert_counts(st, layer, chance(8) ? NULL : g_int64s, cap));
        canary_check("dynmoe_stats_get_expert_counts", s, g_int64s, 64 * sizeof(int64_t));
        break;
    case 3:
        canary_fill(g_doubles, 64 * sizeof(double));
        s = checked("dynmoe_stats_get_expert_weight_sums",
                    dynmoe_stats_get_expert_weight_sums(st, layer, chance(8) ? NULL : g_doubles, cap));
        canary_check("dynmoe_stats_get_expert_weight_sums", s, g_doubles, 64 * sizeof(double));
        break;
    case 4:
        canary_fill(g_int64s, 64 * sizeof(int64_t));
        s = checked("dynmoe_stats_get_histogram", dynmoe_stats_get_histogram(st, layer, chance(8) ? NULL : g_int64s, cap));
        canary_check("dynmoe_stats_get_histogram", s, g_int64s, 64 * sizeof(int64_t));
        break;
    default: {
        size_t length = 0;
        s = checked("dynmoe_stats_to_json (length)", dynmoe_stats_to_json(st, NULL, 0, &length));
        size_t c = s == DYNMOE_OK ? some_capacity(length + 1, OUT_CAP) : (size_t)below(100);
        int null_buf = chance(8);
        canary_fill(g_chars, sizeof g_chars);
        s = checked("dynmoe_stats_to_json", dynmoe_stats_to_json(st, null_buf ? NULL : g_chars, null_buf ? 5 : c,
                                                                  chance(10) ? NULL : &length));
        canary_check("dynmoe_stats_to_json", s, g_chars, sizeof g_chars);
        if (s == DYNMOE_OK && !null_buf && (c == 0 || memchr(g_chars, 0, c) == NULL))
            violation("dynmoe_stats_to_json succeeded without a NUL inside the capacity");
        break;
    }
    }
}

static void op_session_create(void) {
    g_op = "session_create";
    handle_t f;
    void *m = pick_handle(K_MODEL, &f);
    dynmoe_session_params p = dynmoe_session_params_default();
    static const int32_t seqs[] = {1, 1, 1, 2, 3, 4, 0, -1, 4097, INT32_MAX, INT32_MIN};
    /* Capacities that either fit easily or are refused (never a multi-GB allocation that succeeds). */
    static const int32_t caps[] = {0, 0, 1, 2, 3, 5, 8, 16, 64, 256, 4096, -1, INT32_MIN, INT32_MAX};
    static const int64_t budgets[] = {0, 0, 0, 1, 100, 4096, 65536, 1 << 20, INT64_MAX, -1, INT64_MIN};
    p.n_sequences = PICK(seqs);
    p.capacity = PICK(caps);
    p.memory_budget_bytes = PICK(budgets);
    static const int32_t kv_dtypes[] = {DYNMOE_DTYPE_F32, DYNMOE_DTYPE_F32, DYNMOE_DTYPE_F16, DYNMOE_DTYPE_BF16, 3, -1, INT32_MAX};
    p.kv_dtype = PICK(kv_dtypes);
    if (chance(25)) {
        handle_t rf;
        p.routing = pick_handle(K_ROUTING, &rf);
    }
    dynmoe_session *se = (dynmoe_session *)&g_not_a_handle[32];
    int null_out = chance(4), null_params = chance(10);
    if (null_params) p = dynmoe_session_params_default(); /* what the library uses for NULL */
    dynmoe_status s = checked("dynmoe_session_create", dynmoe_session_create(m, null_params ? NULL : &p, null_out ? NULL : &se));
    if (null_out) return;
    if (s != DYNMOE_OK) {
        if (se != NULL) violation("dynmoe_session_create failed but out_session is not NULL");
        return;
    }
    if (se == NULL) {
        violation("dynmoe_session_create succeeded with NULL");
        return;
    }
    handle_t h = f;
    h.p = se;
    h.sequences = p.n_sequences >= 1 ? p.n_sequences : 1;
    if (!add_live(K_SESSION, h)) dynmoe_session_free(se);
}

static int32_t position_of(void *session) {
    int32_t pos = -1;
    if (dynmoe_session_get_position(session, &pos) != DYNMOE_OK) return -1;
    return pos;
}

static void op_session_eval(void) {
    g_op = "session_eval";
    handle_t f;
    void *se = pick_handle(K_SESSION, &f);
    static const int32_t bad_lengths[] = {0, -1, INT32_MIN, INT32_MAX, 300, 1000};
    int32_t length = chance(90) ? 1 + below(6) : PICK(bad_lengths);
    fill_tokens(f.vocab);
    observer_state obs = {0, 0, NULL, 0};
    dynmoe_forward_params fp = some_forward_params(&f, &obs, 1);
    size_t rows = fp.logits_mode == DYNMOE_LOGITS_ALL ? (size_t)f.sequences * (size_t)(length > 0 ? length : 1) : (size_t)f.sequences;
    size_t needed = rows * (size_t)f.vocab;
    int no_logits = chance(20);
    size_t cap = no_logits ? 0 : some_capacity(needed, OUT_CAP);
    dynmoe_trace *t = (dynmoe_trace *)&g_not_a_handle[40];
    int null_trace = chance(10);
    int32_t before = position_of(se);
    canary_fill(g_floats, OUT_CAP * sizeof(float));
    dynmoe_status s = checked("dynmoe_session_eval", dynmoe_session_eval(se, chance(3) ? NULL : g_tokens, length, chance(10) ? NULL : &fp,
                                                                         no_logits ? NULL : g_floats, cap, null_trace ? NULL : &t));
    canary_check("dynmoe_session_eval", s, g_floats, OUT_CAP * sizeof(float));
    if (s != DYNMOE_OK && before >= 0 && position_of(se) != before)
        violation("dynmoe_session_eval failed (%s) but moved the position from %d to %d", dynmoe_status_name(s), before,
                  position_of(se));
    if (!null_trace) {
        if (s != DYNMOE_OK && t != NULL) violation("dynmoe_session_eval failed but out_trace is not NULL");
        if (s == DYNMOE_OK) keep_trace(t, &f, f.sequences, length);
    }
}

static void op_session_generate(void) {
    g_op = "session_generate";
    handle_t f;
    void *se = pick_handle(K_SESSION, &f);
    static const int32_t bad[] = {-1, INT32_MIN, INT32_MAX, 1000};
    int32_t prompt_length = chance(90) ? below(5) : PICK(bad);
    int32_t max_new = chance(90) ? below(5) : PICK(bad);
    fill_tokens(f.vocab);
    dynmoe_sampling_params sp = dynmoe_sampling_params_default();
    if (chance(50)) {
        sp.temperature = some_float(0.0f, 2.0f);
        sp.top_k = some_int(0, f.vocab);
        sp.top_p = some_float(0.0f, 1.0f);
        sp.seed = rnd();
    }
    int32_t stops[4] = {some_token(f.vocab), some_token(f.vocab), 2, 0};
    size_t n_stops = (size_t)below(5);
    const int32_t *stop_arg = stops;
    if (chance(5)) stop_arg = NULL;
    observer_state obs = {0, 0, NULL, 0};
    dynmoe_forward_params fp = some_forward_params(&f, &obs, 0);
    if (chance(5)) fp.record_trace = 1;
    generate_state gs = {se, f.sequences, 1 + below(4), 0};
    size_t needed = (size_t)f.sequences * (size_t)(max_new > 0 ? max_new : 0);
    size_t cap = some_capacity(needed, OUT_CAP);
    int32_t steps = -7;
    int32_t before = position_of(se);
    canary_fill(g_int32s, sizeof g_int32s);
    dynmoe_status s = checked("dynmoe_session_generate",
                              dynmoe_session_generate(se, chance(5) ? NULL : g_tokens, prompt_length, max_new, chance(20) ? NULL : &sp,
                                                      stop_arg, n_stops, chance(20) ? NULL : &fp, chance(60) ? token_callback : NULL,
                                                      &gs, chance(5) ? NULL : g_int32s, cap, chance(10) ? NULL : &steps));
    if (s != DYNMOE_OK && before >= 0) {
        /* Only argument errors are guaranteed to come before any token is evaluated. */
        if ((s == DYNMOE_ERR_INVALID_ARGUMENT || s == DYNMOE_ERR_BUFFER_TOO_SMALL || s == DYNMOE_ERR_CONTEXT_FULL) &&
            position_of(se) != before)
            violation("dynmoe_session_generate failed (%s) but moved the position from %d to %d", dynmoe_status_name(s),
                      before, position_of(se));
        if (s == DYNMOE_ERR_BUFFER_TOO_SMALL || s == DYNMOE_ERR_CONTEXT_FULL) canary_check("dynmoe_session_generate", s, g_int32s, sizeof g_int32s);
    }
}

static void op_session_misc(void) {
    g_op = "session_misc";
    handle_t f;
    void *se = pick_handle(K_SESSION, &f);
    int32_t pos = position_of(se), v = -5;
    dynmoe_status s;
    switch (below(5)) {
    case 0: {
        dynmoe_timing timing;
        checked("dynmoe_session_get_position", dynmoe_session_get_position(se, chance(10) ? NULL : &v));
        checked("dynmoe_session_get_capacity", dynmoe_session_get_capacity(se, chance(10) ? NULL : &v));
        canary_fill(&timing, sizeof timing);
        s = checked("dynmoe_session_get_timing", dynmoe_session_get_timing(se, chance(10) ? NULL : &timing));
        if (s == DYNMOE_OK && (timing.passes < 0 || timing.tokens < timing.passes || !(timing.total_seconds >= 0) ||
                               !(timing.moe_seconds >= 0) || timing.moe_seconds > timing.total_seconds))
            violation("dynmoe_session_get_timing returned inconsistent figures");
        break;
    }
    case 1:
        s = checked("dynmoe_session_rewind", dynmoe_session_rewind(se, chance(70) && pos >= 0 ? below(pos + 2) : PICK(g_edge_ints)));
        if (s != DYNMOE_OK && pos >= 0 && position_of(se) != pos) violation("a failed rewind moved the position");
        break;
    case 2: {
        handle_t rf;
        void *r = chance(20) ? NULL : pick_handle(K_ROUTING, &rf);
        s = checked("dynmoe_session_set_routing", dynmoe_session_set_routing(se, r));
        if (position_of(se) != pos) violation("set_routing moved the position");
        break;
    }
    case 3: checked("dynmoe_session_reset_stats", dynmoe_session_reset_stats(se)); break;
    default: {
        const char *name = dynmoe_status_name((int32_t)((uint32_t)PICK(g_edge_ints) + (uint32_t)below(12)));
        if (name == NULL) violation("dynmoe_status_name returned NULL");
        if (dynmoe_version() == NULL) violation("dynmoe_version returned NULL");
        if (dynmoe_last_error() == NULL) violation("dynmoe_last_error returned NULL");
        if (chance(30)) {
            dynmoe_clear_error();
            if (dynmoe_last_error() == NULL || dynmoe_last_error()[0] != '\0') violation("clear_error left a message");
        }
        break;
    }
    }
}

static void op_free(void) {
    g_op = "free";
    int kind = below(K_KINDS);
    int r = below(100);
    if (r < 60 && g_nlive[kind] > 0) {
        int i = below(g_nlive[kind]);
        void *p = g_live[kind][i].p;
        free_any(kind, p);
        remember_freed(p);
        g_live[kind][i] = g_live[kind][--g_nlive[kind]];
    } else if (r < 75 && g_nfreed > 0) {
        free_any(kind, g_freed[below(g_nfreed)]); /* double free or wrong type: must be harmless */
    } else if (r < 90) {
        int other = below(K_KINDS);
        if (other != kind && g_nlive[other] > 0) free_any(kind, g_live[other][below(g_nlive[other])].p); /* wrong type: no-op */
    } else if (r < 95) {
        free_any(kind, NULL);
    } else {
        free_any(kind, &g_not_a_handle[below(8) * 8]);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s FIXTURES_DIR SEED [OPS]\n", argv[0]);
        return 64;
    }
    g_fixture_dir = argv[1];
    g_rng = strtoull(argv[2], NULL, 10) * 0x2545F4914F6CDD1Dull + 1;
    long ops = argc > 3 ? strtol(argv[3], NULL, 10) : 300;

    op_load(); /* usually gives a model to work with */
    for (long i = 0; i < ops; i++) {
        int r = below(100);
        if (r < 6) op_load();
        else if (r < 12) op_model_queries();
        else if (r < 20) op_routing_create();
        else if (r < 25) op_routing_set_layer();
        else if (r < 37) op_forward();
        else if (r < 45) op_trace_queries();
        else if (r < 50) op_get_stats();
        else if (r < 58) op_stats_queries();
        else if (r < 65) op_session_create();
        else if (r < 77) op_session_eval();
        else if (r < 83) op_session_generate();
        else if (r < 91) op_session_misc();
        else op_free();
    }
    for (int k = K_KINDS - 1; k >= 0; k--)
        for (int i = 0; i < g_nlive[k]; i++) free_any(k, g_live[k][i].p);

    printf("calls=%ld", g_calls);
    for (int s = 0; s <= DYNMOE_ERR_INTERNAL; s++)
        if (g_status_counts[s]) printf(" %s=%ld", dynmoe_status_name(s), g_status_counts[s]);
    printf(" unknown=%ld violations=%ld\n", g_unknown_status, g_violations);
    return g_violations ? 3 : 0;
}
