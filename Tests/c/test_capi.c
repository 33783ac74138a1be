/*
 * test_capi.c — tests of libdynmoe's C API (include/dynmoe.h) against the reference fixtures.
 *
 * For every fixture in Tests/Fixtures (dynamic-moe-tiny, mixtral-tiny, olmoe-tiny,
 * qwen2moe-tiny, qwen3moe-tiny-bf16) it loads the checkpoint and checks:
 *  - dynmoe_model_get_info and dynmoe_model_get_moe_layers against the checkpoints' configs;
 *  - every reference run (native, top-k, top-p with clamps and weighting rules): logits (max abs
 *    error <= 1e-3, relative L2 <= 1e-4), hidden states, router probabilities, weights, and exact
 *    expert selections from the trace (mask and per-token lists), and the trace's statistics
 *    (counts, histograms, weight sums, load, entropy, kept mass, activated parameters) recomputed
 *    from the reference;
 *  - sessions: prefill + decode logits equal the forward's last-position logits, rewind, routing
 *    changes, greedy generation equal to the reference's greedy tokens.
 * Then, on particular fixtures: argument and error handling (status codes, messages, buffers
 * left untouched), per-layer routing overrides, the observer callback, context-full sessions,
 * stop tokens and callback stops, seeded sampling, model/session statistics and their JSON, and
 * concurrent forwards from two threads with thread-local error messages.
 *
 * The reference tensors are read from reference.safetensors with a minimal safetensors reader
 * (8-byte little-endian header length, JSON header searched with strstr/sscanf).
 *
 * Usage:  test_capi PATH/TO/Tests/Fixtures
 * Prints every failed check, then "N passed, M failed" as its last line; exits 1 on failure.
 * Build:  cc -std=c99 -Wall -Wextra -Werror -pedantic -Iinclude Tests/c/test_capi.c -o test_capi \
 *            -Lbuild/lib -ldynmoe -Wl,-rpath,$PWD/build/lib -lpthread -lm
 */
#define _POSIX_C_SOURCE 200809L

#include <dynmoe.h>

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Checks                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static int g_passed, g_failed;
static char g_context[128] = "";

static void set_context(const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(g_context, sizeof g_context, format, args);
    va_end(args);
}

/* Records a check; on failure prints where it was, what, and an optional formatted detail. */
static int check_impl(int ok, const char *expr, int line, const char *format, ...) {
    if (ok) {
        g_passed++;
        return 1;
    }
    g_failed++;
    fprintf(stderr, "FAIL [%s] test_capi.c:%d: %s", g_context, line, expr);
    if (format && *format) {
        va_list args;
        va_start(args, format);
        fputs(" -- ", stderr);
        vfprintf(stderr, format, args);
        va_end(args);
    }
    fputc('\n', stderr);
    return 0;
}

#define CHECK(cond) check_impl((cond) ? 1 : 0, #cond, __LINE__, NULL)
#define CHECKF(cond, ...) check_impl((cond) ? 1 : 0, #cond, __LINE__, __VA_ARGS__)

static int check_status_impl(dynmoe_status got, dynmoe_status want, const char *expr, int line) {
    return check_impl(got == want, expr, line, "returned %s, expected %s; last error: \"%s\"", dynmoe_status_name(got),
                      dynmoe_status_name(want), dynmoe_last_error());
}

/* CHECK_ST(call, status): the call returns `status`. */
#define CHECK_ST(call, want) check_status_impl((call), (want), #call, __LINE__)
#define CHECK_OK(call) CHECK_ST(call, DYNMOE_OK)

static void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* Max abs error and relative L2 error of `got` against `want`; prints the worst element on failure. */
static int check_close_impl(const float *got, const float *want, size_t n, double max_abs, double rel_l2,
                            const char *what, int line) {
    double worst = 0, diff2 = 0, ref2 = 0;
    size_t worst_i = 0, i;
    for (i = 0; i < n; ++i) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= worst)) { /* also catches NaN */
            worst = d;
            worst_i = i;
        }
        diff2 += d * d;
        ref2 += (double)want[i] * (double)want[i];
    }
    {
        double rel = ref2 > 0 ? sqrt(diff2 / ref2) : sqrt(diff2);
        int ok = worst <= max_abs && (rel_l2 <= 0 || rel <= rel_l2);
        return check_impl(ok, what, line, "max abs %.3g at [%zu] (got %.6g, want %.6g), rel L2 %.3g", worst, worst_i,
                          n ? (double)got[worst_i] : 0.0, n ? (double)want[worst_i] : 0.0, rel);
    }
}

#define CHECK_CLOSE(got, want, n, max_abs, rel_l2, what)                                           \
    check_close_impl((got), (want), (n), (max_abs), (rel_l2), (what), __LINE__)

/* ------------------------------------------------------------------------------------------ */
/* A minimal safetensors reader                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef struct st_file {
    unsigned char *bytes;
    size_t size;
    char *header;                /* NUL-terminated copy of the JSON header */
    const unsigned char *body;   /* start of the data section */
    size_t body_size;
} st_file;

static int st_open(st_file *f, const char *path) {
    FILE *fp = fopen(path, "rb");
    long size;
    uint64_t n = 0;
    int i;
    memset(f, 0, sizeof *f);
    if (!fp) return 0;
    if (fseek(fp, 0, SEEK_END) != 0 || (size = ftell(fp)) < 8 || fseek(fp, 0, SEEK_SET) != 0) {
        fclose(fp);
        return 0;
    }
    f->size = (size_t)size;
    f->bytes = (unsigned char *)xcalloc(f->size, 1);
    if (fread(f->bytes, 1, f->size, fp) != f->size) {
        fclose(fp);
        return 0;
    }
    fclose(fp);
    for (i = 7; i >= 0; --i) n = (n << 8) | f->bytes[i];
    if (n > f->size - 8) return 0;
    f->header = (char *)xcalloc((size_t)n + 1, 1);
    memcpy(f->header, f->bytes + 8, (size_t)n);
    f->body = f->bytes + 8 + n;
    f->body_size = f->size - 8 - (size_t)n;
    return 1;
}

static void st_close(st_file *f) {
    free(f->bytes);
    free(f->header);
    memset(f, 0, sizeof *f);
}

/*
 * Finds tensor `name`: checks its dtype, writes its shape (up to 4 dims) and element count, and
 * returns a pointer to its data, or NULL if it is absent or malformed.
 */
static const void *st_tensor(const st_file *f, const char *name, const char *dtype, int64_t shape[4], int *ndim,
                             size_t *count) {
    char key[256], entry[512], want_dtype[32];
    const char *p, *end, *q;
    size_t len, elem = 0;
    unsigned long long begin, stop;
    int n = 0;
    snprintf(key, sizeof key, "\"%s\":", name);
    p = strstr(f->header, key);
    if (!p) return NULL;
    p += strlen(key);
    end = strchr(p, '}');
    if (!end || (len = (size_t)(end - p)) >= sizeof entry) return NULL;
    memcpy(entry, p, len);
    entry[len] = '\0';
    snprintf(want_dtype, sizeof want_dtype, "\"dtype\":\"%s\"", dtype);
    if (!strstr(entry, want_dtype)) return NULL;
    if (strcmp(dtype, "F32") == 0) elem = 4;
    else if (strcmp(dtype, "I64") == 0) elem = 8;
    else if (strcmp(dtype, "U8") == 0) elem = 1;
    else return NULL;
    q = strstr(entry, "\"data_offsets\":[");
    if (!q || sscanf(q + strlen("\"data_offsets\":["), "%llu,%llu", &begin, &stop) != 2) return NULL;
    if (stop < begin || stop > f->body_size) return NULL;
    q = strstr(entry, "\"shape\":[");
    if (!q) return NULL;
    q += strlen("\"shape\":[");
    *count = 1;
    while (*q && *q != ']') {
        char *next;
        long long d = strtoll(q, &next, 10);
        if (next == q || n == 4) return NULL;
        shape[n++] = d;
        *count *= (size_t)d;
        q = next;
        if (*q == ',') ++q;
    }
    *ndim = n;
    if (*count * elem != stop - begin) return NULL;
    return f->body + begin;
}

/* A tensor of known dtype whose element count must be `expected` (0 = any); NULL if absent. */
static const void *st_get(const st_file *f, const char *name, const char *dtype, size_t expected) {
    int64_t shape[4];
    int ndim = 0;
    size_t count = 0;
    const void *data = st_tensor(f, name, dtype, shape, &ndim, &count);
    if (data && expected && count != expected) return NULL;
    return data;
}

/* Element i of an F32 / I64 tensor (read bytewise: the data section need not be aligned). */
static float st_f32(const void *data, size_t i) {
    float v;
    memcpy(&v, (const unsigned char *)data + 4 * i, 4);
    return v;
}

static int64_t st_i64(const void *data, size_t i) {
    int64_t v;
    memcpy(&v, (const unsigned char *)data + 8 * i, 8);
    return v;
}

/* A copy of an F32 tensor as an aligned float array (caller frees), or NULL if absent. */
static float *st_floats(const st_file *f, const char *name, size_t expected) {
    const void *data = st_get(f, name, "F32", expected);
    float *out;
    size_t i;
    if (!data) return NULL;
    out = (float *)xcalloc(expected, sizeof *out);
    for (i = 0; i < expected; ++i) out[i] = st_f32(data, i);
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* Fixtures                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct run_spec {
    const char *name; /* NULL ends the list */
    int32_t mode, k;
    float threshold;
    int32_t min_experts, max_experts, renormalize;
} run_spec;

typedef struct fixture_spec {
    const char *dir, *family, *architecture;
    int32_t num_layers, num_moe_layers, moe_layers[4], num_experts, vocab, kv_heads, head_dim, dtype;
    int32_t native_mode, native_k;
    float native_p;
    int32_t native_renormalize, shared_expert, bos, eos;
    int64_t parameters_per_expert, total_parameters, always_active; /* 0 = not checked */
    run_spec runs[5];
} fixture_spec;

#define N_ (-1) /* renormalize as the checkpoint does */
#define NATIVE_RUN {"native", DYNMOE_ROUTING_NATIVE, 0, 0, 0, 0, N_}
#define TOP_K(name, k) {name, DYNMOE_ROUTING_TOP_K, k, 0, 0, 0, N_}
#define TOP_P(name, p, lo, hi, renorm) {name, DYNMOE_ROUTING_TOP_P, 0, p, lo, hi, renorm}
#define END_RUNS {NULL, 0, 0, 0, 0, 0, 0}

static const fixture_spec FIXTURES[] = {
    {"dynamic-moe-tiny", "dynamic_moe", "MoEForCausalLM", 4, 2, {0, 2}, 8, 96, 4, 8, DYNMOE_DTYPE_F32,
     DYNMOE_ROUTING_TOP_P, 0, 0.4f, 0, 0, 1, 2, 3 * 32 * 48, 0, 0,
     {NATIVE_RUN, TOP_P("top_p_0.6", 0.6f, 0, 0, N_), TOP_K("top_k_2", 2), TOP_P("top_p_0.6_max2", 0.6f, 0, 2, N_),
      END_RUNS}},
    {"mixtral-tiny", "mixtral", "MixtralForCausalLM", 2, 2, {0, 1}, 8, 80, 2, 8, DYNMOE_DTYPE_F32,
     DYNMOE_ROUTING_TOP_K, 2, 0, 1, 0, 1, 2, 3 * 32 * 40, 73376, 73376 - 80 * 32 - 2 * 8 * 3 * 32 * 40,
     {NATIVE_RUN, TOP_P("top_p_0.5", 0.5f, 0, 0, N_), TOP_P("top_p_0.5_raw", 0.5f, 0, 0, 0), TOP_K("top_k_1", 1),
      END_RUNS}},
    /* config.json names eos 50279 (OLMoE's real tokenizer), outside this vocabulary of 64: reported as -1 */
    {"olmoe-tiny", "olmoe", "OlmoeForCausalLM", 2, 2, {0, 1}, 16, 64, 4, 8, DYNMOE_DTYPE_F32,
     DYNMOE_ROUTING_TOP_K, 4, 0, 0, 0, -1, -1, 3 * 32 * 16, 62752, 62752 - 64 * 32 - 2 * 16 * 3 * 32 * 16,
     {NATIVE_RUN, TOP_P("top_p_0.5", 0.5f, 0, 0, N_), TOP_P("top_p_0.5_min2_max3", 0.5f, 2, 3, N_), END_RUNS}},
    /* tied embeddings: the LM head is the embedding table, counted once in the total and as always active */
    {"qwen2moe-tiny", "qwen2_moe", "Qwen2MoeForCausalLM", 3, 2, {0, 2}, 6, 72, 2, 8, DYNMOE_DTYPE_F32,
     DYNMOE_ROUTING_TOP_K, 2, 0, 0, 1, -1, -1, 3 * 32 * 24, 53856, 53856 - 2 * 6 * 3 * 32 * 24,
     {NATIVE_RUN, TOP_P("top_p_0.4", 0.4f, 0, 0, N_), TOP_K("top_k_3", 3), END_RUNS}},
    {"qwen3moe-tiny-bf16", "qwen3_moe", "Qwen3MoeForCausalLM", 2, 2, {0, 1}, 8, 88, 2, 16, DYNMOE_DTYPE_BF16,
     DYNMOE_ROUTING_TOP_K, 2, 0, 1, 0, -1, -1, 3 * 32 * 24, 55520, 55520 - 88 * 32 - 2 * 8 * 3 * 32 * 24,
     {NATIVE_RUN, TOP_P("top_p_0.5", 0.5f, 0, 0, N_), END_RUNS}},
};
#define N_FIXTURES (sizeof FIXTURES / sizeof FIXTURES[0])

static const char *g_fixtures_dir;

/* A loaded fixture: model, reference tensors and input. */
typedef struct fixture {
    const fixture_spec *spec;
    dynmoe_model *model;
    dynmoe_model_info info;
    st_file ref;
    int32_t *tokens; /* [B, T] */
    int32_t B, T, V, E, H;
} fixture;

static int fixture_open(fixture *fx, const fixture_spec *spec) {
    char path[1024];
    int64_t shape[4];
    int ndim = 0;
    size_t count = 0, i;
    const void *ids;
    memset(fx, 0, sizeof *fx);
    fx->spec = spec;
    set_context("%s", spec->dir);
    snprintf(path, sizeof path, "%s/%s/model", g_fixtures_dir, spec->dir);
    if (!CHECK_OK(dynmoe_model_load(path, NULL, &fx->model))) return 0;
    if (!CHECK_OK(dynmoe_model_get_info(fx->model, &fx->info))) return 0;
    snprintf(path, sizeof path, "%s/%s/reference.safetensors", g_fixtures_dir, spec->dir);
    if (!CHECKF(st_open(&fx->ref, path), "cannot read %s", path)) return 0;
    ids = st_tensor(&fx->ref, "input_ids", "I64", shape, &ndim, &count);
    if (!CHECK(ids != NULL && ndim == 2)) return 0;
    fx->B = (int32_t)shape[0];
    fx->T = (int32_t)shape[1];
    fx->V = fx->info.vocab_size;
    fx->E = fx->info.num_experts;
    fx->H = fx->info.hidden_size;
    fx->tokens = (int32_t *)xcalloc(count, sizeof *fx->tokens);
    for (i = 0; i < count; ++i) fx->tokens[i] = (int32_t)st_i64(ids, i);
    return 1;
}

static void fixture_close(fixture *fx) {
    dynmoe_model_free(fx->model);
    st_close(&fx->ref);
    free(fx->tokens);
    memset(fx, 0, sizeof *fx);
}

static dynmoe_policy run_policy(const run_spec *run) {
    dynmoe_policy p = dynmoe_policy_native();
    if (run->mode == DYNMOE_ROUTING_TOP_K) p = dynmoe_policy_top_k(run->k);
    if (run->mode == DYNMOE_ROUTING_TOP_P) {
        p = dynmoe_policy_top_p(run->threshold);
        p.min_experts = run->min_experts;
        p.max_experts = run->max_experts;
    }
    p.renormalize = run->renormalize;
    return p;
}

/* The routing plan of a run; NULL for "native" (the default routing). */
static dynmoe_routing *run_routing(const fixture *fx, const run_spec *run) {
    dynmoe_routing *routing = NULL;
    dynmoe_policy p = run_policy(run);
    if (run->mode == DYNMOE_ROUTING_NATIVE) return NULL;
    CHECK_OK(dynmoe_routing_create(fx->model, &p, &routing));
    return routing;
}

static int is_moe_layer(const fixture_spec *spec, int32_t layer) {
    int i;
    for (i = 0; i < spec->num_moe_layers; ++i)
        if (spec->moe_layers[i] == layer) return 1;
    return 0;
}

/* Copies [B, T, V] reference logits' last position into [B, V]. */
static void last_positions(const fixture *fx, const float *all, float *out) {
    int32_t b;
    for (b = 0; b < fx->B; ++b)
        memcpy(out + (size_t)b * fx->V, all + ((size_t)b * fx->T + (size_t)fx->T - 1) * fx->V, (size_t)fx->V * sizeof *out);
}

/* Tokens [B, from..to) of the fixture input, contiguous ([B, to - from]); caller frees. */
static int32_t *token_slice(const fixture *fx, int32_t from, int32_t to) {
    int32_t *out = (int32_t *)xcalloc((size_t)fx->B * (size_t)(to - from), sizeof *out);
    int32_t b;
    for (b = 0; b < fx->B; ++b)
        memcpy(out + (size_t)b * (size_t)(to - from), fx->tokens + (size_t)b * fx->T + from,
               (size_t)(to - from) * sizeof *out);
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* Per-fixture tests                                                                           */
/* ------------------------------------------------------------------------------------------ */

static void test_info(const fixture *fx) {
    const fixture_spec *s = fx->spec;
    const dynmoe_model_info *in = &fx->info;
    int32_t layers[8] = {-7, -7, -7, -7, -7, -7, -7, -7};
    size_t count = 99;
    int i;
    set_context("%s: info", s->dir);
    CHECKF(strcmp(in->family, s->family) == 0, "family \"%s\"", in->family);
    CHECKF(strcmp(in->architecture, s->architecture) == 0, "architecture \"%s\"", in->architecture);
    CHECKF(in->num_layers == s->num_layers, "%d", (int)in->num_layers);
    CHECKF(in->num_moe_layers == s->num_moe_layers, "%d", (int)in->num_moe_layers);
    CHECKF(in->num_experts == s->num_experts, "%d", (int)in->num_experts);
    CHECK(in->hidden_size == 32);
    CHECKF(in->vocab_size == s->vocab, "%d", (int)in->vocab_size);
    CHECK(in->num_attention_heads == 4);
    CHECKF(in->num_key_value_heads == s->kv_heads, "%d", (int)in->num_key_value_heads);
    CHECKF(in->head_dim == s->head_dim, "%d", (int)in->head_dim);
    CHECK(in->max_position_embeddings == 256);
    CHECKF(in->dtype == s->dtype, "dtype %d", (int)in->dtype);
    CHECKF(in->native_mode == s->native_mode, "native_mode %d", (int)in->native_mode);
    if (s->native_mode == DYNMOE_ROUTING_TOP_K) CHECKF(in->native_top_k == s->native_k, "%d", (int)in->native_top_k);
    else CHECKF(fabsf(in->native_top_p - s->native_p) < 1e-6f, "%g", (double)in->native_top_p);
    CHECKF(in->native_renormalize == s->native_renormalize, "%d", (int)in->native_renormalize);
    CHECKF((in->has_shared_expert != 0) == (s->shared_expert != 0), "%d", (int)in->has_shared_expert);
    CHECKF(in->bos_token_id == s->bos, "bos %d", (int)in->bos_token_id);
    CHECKF(in->eos_token_id == s->eos, "eos %d", (int)in->eos_token_id);
    CHECKF(in->parameters_per_expert == s->parameters_per_expert, "%lld", (long long)in->parameters_per_expert);
    if (s->total_parameters)
        CHECKF(in->total_parameters == s->total_parameters, "%lld", (long long)in->total_parameters);
    if (s->always_active)
        CHECKF(in->always_active_parameters == s->always_active, "%lld", (long long)in->always_active_parameters);
    CHECK(in->always_active_parameters > 0 &&
          in->always_active_parameters + in->parameters_per_expert * in->num_experts * in->num_moe_layers <=
              in->total_parameters);

    CHECK_OK(dynmoe_model_get_moe_layers(fx->model, NULL, 0, &count));
    CHECK(count == (size_t)s->num_moe_layers);
    CHECK_OK(dynmoe_model_get_moe_layers(fx->model, layers, 8, &count));
    CHECK(count == (size_t)s->num_moe_layers);
    for (i = 0; i < s->num_moe_layers; ++i) CHECKF(layers[i] == s->moe_layers[i], "moe layer %d = %d", i, (int)layers[i]);
    CHECK_OK(dynmoe_model_get_moe_layers(fx->model, layers, 8, NULL));
    layers[0] = -7;
    CHECK_ST(dynmoe_model_get_moe_layers(fx->model, layers, (size_t)s->num_moe_layers - 1, &count),
             DYNMOE_ERR_BUFFER_TOO_SMALL);
    CHECK(layers[0] == -7);
}

/* Checks a trace's statistics against figures recomputed from the reference selections/probs/weights. */
static void check_trace_stats(const fixture *fx, dynmoe_trace *trace, const char *run) {
    dynmoe_stats *stats = NULL;
    dynmoe_stats_summary sum;
    const size_t N = (size_t)fx->B * fx->T;
    const int32_t E = fx->E;
    int64_t *counts = (int64_t *)xcalloc((size_t)E + 1, sizeof *counts);
    int64_t *hist = (int64_t *)xcalloc((size_t)E + 1, sizeof *hist);
    double *wsum = (double *)xcalloc((size_t)E, sizeof *wsum);
    double sum_of_means = 0;
    int32_t layer;
    char name[128];

    if (!CHECK_OK(dynmoe_trace_get_stats(trace, &stats))) goto done;
    CHECK_OK(dynmoe_stats_get_summary(stats, &sum));
    CHECKF(sum.tokens == (int64_t)N, "%lld", (long long)sum.tokens);
    CHECK(sum.num_layers == fx->spec->num_layers && sum.num_moe_layers == fx->spec->num_moe_layers);
    CHECK(sum.total_parameters == fx->info.total_parameters);

    for (layer = 0; layer < fx->spec->num_layers; ++layer) {
        dynmoe_layer_stats ls;
        const uint8_t *sel;
        float *probs, *weights;
        int64_t want_counts[64] = {0}, want_hist[65] = {0};
        double want_wsum[64] = {0}, entropy = 0, kept = 0, mean, max_c = 0, var = 0;
        int32_t busiest = 0, idlest = 0, e;
        size_t t;
        memset(&ls, 0, sizeof ls);
        CHECK_OK(dynmoe_stats_get_layer(stats, layer, &ls));
        CHECK(ls.layer == layer);
        if (!is_moe_layer(fx->spec, layer)) {
            CHECKF(ls.is_moe == 0, "layer %d", (int)layer);
            CHECK(dynmoe_stats_get_expert_counts(stats, layer, counts, (size_t)E) != DYNMOE_OK);
            continue;
        }
        CHECKF(ls.is_moe == 1, "layer %d", (int)layer);
        CHECK(ls.num_experts == E && ls.tokens == (int64_t)N);
        snprintf(name, sizeof name, "%s.selected.%d", run, (int)layer);
        sel = (const uint8_t *)st_get(&fx->ref, name, "U8", N * (size_t)E);
        snprintf(name, sizeof name, "%s.router_probs.%d", run, (int)layer);
        probs = st_floats(&fx->ref, name, N * (size_t)E);
        snprintf(name, sizeof name, "%s.weights.%d", run, (int)layer);
        weights = st_floats(&fx->ref, name, N * (size_t)E);
        if (!CHECKF(sel && probs && weights, "reference tensors of %s layer %d", run, (int)layer)) {
            free(probs);
            free(weights);
            continue;
        }
        for (t = 0; t < N; ++t) {
            int k = 0;
            for (e = 0; e < E; ++e) {
                double p = probs[t * (size_t)E + (size_t)e];
                if (p > 0) entropy -= p * log(p);
                if (sel[t * (size_t)E + (size_t)e]) {
                    k++;
                    want_counts[e]++;
                    kept += p;
                    want_wsum[e] += weights[t * (size_t)E + (size_t)e];
                }
            }
            want_hist[k]++;
        }
        entropy /= (double)N;
        kept /= (double)N;
        mean = 0;
        for (e = 0; e <= E; ++e) mean += (double)e * (double)want_hist[e];
        mean /= (double)N;
        sum_of_means += mean;

        CHECK_OK(dynmoe_stats_get_expert_counts(stats, layer, counts, (size_t)E));
        for (e = 0; e < E; ++e) CHECKF(counts[e] == want_counts[e], "layer %d expert %d: %lld tokens, want %lld",
                                       (int)layer, (int)e, (long long)counts[e], (long long)want_counts[e]);
        CHECK_OK(dynmoe_stats_get_histogram(stats, layer, hist, (size_t)E + 1));
        for (e = 0; e <= E; ++e) CHECKF(hist[e] == want_hist[e], "layer %d histogram[%d] = %lld, want %lld",
                                        (int)layer, (int)e, (long long)hist[e], (long long)want_hist[e]);
        CHECK_OK(dynmoe_stats_get_expert_weight_sums(stats, layer, wsum, (size_t)E));
        for (e = 0; e < E; ++e) CHECKF(fabs(wsum[e] - want_wsum[e]) < 1e-3, "layer %d expert %d: %g, want %g",
                                       (int)layer, (int)e, wsum[e], want_wsum[e]);
        CHECK_ST(dynmoe_stats_get_expert_counts(stats, layer, counts, (size_t)E - 1), DYNMOE_ERR_BUFFER_TOO_SMALL);
        CHECK_ST(dynmoe_stats_get_histogram(stats, layer, hist, (size_t)E), DYNMOE_ERR_BUFFER_TOO_SMALL);

        CHECKF(fabs(ls.mean_experts_per_token - mean) < 1e-9, "layer %d: %g, want %g", (int)layer,
               ls.mean_experts_per_token, mean);
        CHECKF(fabs(ls.mean_router_entropy - entropy) < 1e-4, "layer %d: %g, want %g", (int)layer,
               ls.mean_router_entropy, entropy);
        CHECKF(fabs(ls.mean_kept_mass - kept) < 1e-4, "layer %d: %g, want %g", (int)layer, ls.mean_kept_mass, kept);
        for (e = 0; e < E; ++e) {
            if (want_counts[e] > want_counts[busiest]) busiest = e;
            if (want_counts[e] < want_counts[idlest]) idlest = e;
        }
        CHECKF(ls.busiest_expert == busiest && ls.idlest_expert == idlest, "layer %d: busiest %d idlest %d, want %d %d",
               (int)layer, (int)ls.busiest_expert, (int)ls.idlest_expert, (int)busiest, (int)idlest);
        {
            double total = 0, m;
            for (e = 0; e < E; ++e) total += (double)want_counts[e];
            m = total / E;
            max_c = (double)want_counts[busiest];
            for (e = 0; e < E; ++e) var += ((double)want_counts[e] - m) * ((double)want_counts[e] - m);
            var /= E;
            CHECKF(fabs(ls.load_max_over_mean - max_c / m) < 1e-9, "layer %d: %g, want %g", (int)layer,
                   ls.load_max_over_mean, max_c / m);
            CHECKF(fabs(ls.load_coefficient_of_variation - sqrt(var) / m) < 1e-9,
                   "layer %d: %g, want population std/mean %g", (int)layer, ls.load_coefficient_of_variation,
                   sqrt(var) / m);
        }
        free(probs);
        free(weights);
    }
    {
        double want_mean = sum_of_means / fx->spec->num_moe_layers;
        double want_act = (double)fx->info.always_active_parameters + sum_of_means * (double)fx->info.parameters_per_expert;
        CHECKF(fabs(sum.mean_experts_per_token - want_mean) < 1e-9, "%g, want %g", sum.mean_experts_per_token, want_mean);
        CHECKF(fabs(sum.activated_parameters_per_token - want_act) < 1e-6 * want_act, "%g, want %g",
               sum.activated_parameters_per_token, want_act);
        CHECKF(fabs(sum.activated_parameter_fraction - want_act / (double)fx->info.total_parameters) < 1e-9, "%g",
               sum.activated_parameter_fraction);
    }
done:
    dynmoe_stats_free(stats);
    free(counts);
    free(hist);
    free(wsum);
}

/* One reference run: forward with a trace and compare everything the trace records. */
static void test_run(const fixture *fx, const run_spec *run) {
    const size_t N = (size_t)fx->B * fx->T, E = (size_t)fx->E;
    const size_t n_logits = N * (size_t)fx->V;
    dynmoe_routing *routing;
    dynmoe_forward_params fp = dynmoe_forward_params_default();
    dynmoe_trace *trace = NULL;
    float *logits = (float *)xcalloc(n_logits, sizeof *logits);
    float *want;
    float *buf = (float *)xcalloc(N * (size_t)(fx->H > fx->E ? fx->H : fx->E), sizeof *buf);
    uint8_t *mask = (uint8_t *)xcalloc(N * E, 1);
    char name[128];
    int32_t b, t, l, layer, shape[4];

    set_context("%s: run %s", fx->spec->dir, run->name);
    routing = run_routing(fx, run);
    fp.routing = routing;
    fp.record_trace = 1;
    if (!CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, &fp, logits, n_logits, &trace))) goto done;
    snprintf(name, sizeof name, "%s.logits", run->name);
    want = st_floats(&fx->ref, name, n_logits);
    if (CHECKF(want != NULL, "reference %s", name)) CHECK_CLOSE(logits, want, n_logits, 1e-3, 1e-4, "logits match the reference");
    free(want);

    if (!CHECK(trace != NULL)) goto done;
    CHECK_OK(dynmoe_trace_get_shape(trace, &shape[0], &shape[1], &shape[2], &shape[3]));
    CHECK(shape[0] == fx->B && shape[1] == fx->T && shape[2] == fx->spec->num_layers && shape[3] == fx->H);
    CHECK_OK(dynmoe_trace_get_shape(trace, NULL, NULL, NULL, NULL));

    for (layer = 0; layer < fx->spec->num_layers; ++layer) {
        const uint8_t *want_sel;
        snprintf(name, sizeof name, "%s.hidden.%d", run->name, (int)layer);
        want = st_floats(&fx->ref, name, N * (size_t)fx->H);
        CHECK_OK(dynmoe_trace_get_hidden(trace, layer, buf, N * (size_t)fx->H));
        if (want) CHECK_CLOSE(buf, want, N * (size_t)fx->H, 1e-3, 1e-4, "hidden states match the reference");
        else CHECKF(strcmp(run->name, "native") != 0, "reference %s", name);
        free(want);

        if (!is_moe_layer(fx->spec, layer)) {
            CHECK_ST(dynmoe_trace_get_router_probs(trace, layer, buf, N * E), DYNMOE_ERR_NOT_AVAILABLE);
            CHECK_ST(dynmoe_trace_get_selected(trace, layer, mask, N * E), DYNMOE_ERR_NOT_AVAILABLE);
            continue;
        }
        snprintf(name, sizeof name, "%s.router_probs.%d", run->name, (int)layer);
        want = st_floats(&fx->ref, name, N * E);
        CHECK_OK(dynmoe_trace_get_router_probs(trace, layer, buf, N * E));
        if (CHECKF(want != NULL, "reference %s", name)) CHECK_CLOSE(buf, want, N * E, 1e-4, 0, "router probabilities");
        free(want);

        snprintf(name, sizeof name, "%s.selected.%d", run->name, (int)layer);
        want_sel = (const uint8_t *)st_get(&fx->ref, name, "U8", N * E);
        CHECK_OK(dynmoe_trace_get_selected(trace, layer, mask, N * E));
        if (CHECKF(want_sel != NULL, "reference %s", name)) {
            size_t i, bad = 0;
            for (i = 0; i < N * E; ++i) bad += (mask[i] != want_sel[i]);
            CHECKF(bad == 0, "layer %d: %zu of %zu selection entries differ from the reference", (int)layer, bad, N * E);
        }

        snprintf(name, sizeof name, "%s.weights.%d", run->name, (int)layer);
        want = st_floats(&fx->ref, name, N * E);
        CHECK_OK(dynmoe_trace_get_weights(trace, layer, buf, N * E));
        if (CHECKF(want != NULL, "reference %s", name)) CHECK_CLOSE(buf, want, N * E, 1e-4, 0, "expert weights");
        free(want);

        /* per-token expert lists agree with the mask and weights, by descending weight */
        for (b = 0; b < fx->B; ++b) {
            for (t = 0; t < fx->T; ++t) {
                int32_t experts[64];
                float w[64];
                size_t count = 999, k, selected = 0;
                const size_t row = ((size_t)b * fx->T + (size_t)t) * E;
                int ok = 1;
                if (!CHECK_OK(dynmoe_trace_get_token_experts(trace, layer, b, t, experts, w, 64, &count))) break;
                for (k = 0; k < E; ++k) selected += mask[row + k];
                for (k = 0; k < count && k < 64; ++k) {
                    ok &= experts[k] >= 0 && (size_t)experts[k] < E && mask[row + (size_t)experts[k]];
                    if (ok) ok &= fabsf(w[k] - buf[row + (size_t)experts[k]]) <= 1e-6f;
                    if (k > 0) ok &= w[k] <= w[k - 1];
                }
                if (!CHECKF(ok && count == selected, "layer %d b %d t %d: %zu experts, mask has %zu", (int)layer, (int)b,
                            (int)t, count, selected))
                    break;
            }
        }
        {
            size_t count = 0;
            CHECK_OK(dynmoe_trace_get_token_experts(trace, layer, 0, 0, NULL, NULL, 0, &count));
            CHECK(count >= 1 && count <= E);
            CHECK(dynmoe_trace_get_token_experts(trace, layer, fx->B, 0, NULL, NULL, 0, &count) != DYNMOE_OK);
            CHECK(dynmoe_trace_get_token_experts(trace, layer, 0, fx->T, NULL, NULL, 0, &count) != DYNMOE_OK);
        }
        CHECK_ST(dynmoe_trace_get_selected(trace, layer, mask, N * E - 1), DYNMOE_ERR_BUFFER_TOO_SMALL);
        CHECK_ST(dynmoe_trace_get_router_probs(trace, layer, buf, N * E - 1), DYNMOE_ERR_BUFFER_TOO_SMALL);
    }
    l = fx->spec->num_layers;
    CHECK(dynmoe_trace_get_hidden(trace, l, buf, N * (size_t)fx->H) != DYNMOE_OK);
    CHECK(dynmoe_trace_get_selected(trace, -1, mask, N * E) != DYNMOE_OK);
    check_trace_stats(fx, trace, run->name);
done:
    dynmoe_trace_free(trace);
    dynmoe_routing_free(routing);
    free(logits);
    free(buf);
    free(mask);
}

/* Sessions: prefill + decode, rewind, routing per session / per call, greedy generation. */
static void test_session(const fixture *fx, const run_spec *run) {
    const size_t BV = (size_t)fx->B * fx->V, n_all = BV * (size_t)fx->T;
    dynmoe_routing *routing;
    dynmoe_session_params sp = dynmoe_session_params_default();
    dynmoe_session *session = NULL;
    float *want_all, *want_last = (float *)xcalloc(BV, sizeof(float)), *logits = (float *)xcalloc(n_all, sizeof(float));
    int32_t *prefix = token_slice(fx, 0, fx->T - 1), *last = token_slice(fx, fx->T - 1, fx->T);
    int32_t *tail = token_slice(fx, fx->T - 2, fx->T);
    int32_t pos = -1;
    char name[128];
    const void *greedy;
    int64_t gshape[4];
    int gndim = 0;
    size_t gcount = 0;

    set_context("%s: session %s", fx->spec->dir, run->name);
    snprintf(name, sizeof name, "%s.logits", run->name);
    want_all = st_floats(&fx->ref, name, n_all);
    if (!CHECK(want_all != NULL)) goto done;
    last_positions(fx, want_all, want_last);

    routing = run_routing(fx, run);
    sp.n_sequences = fx->B;
    sp.routing = routing;
    if (!CHECK_OK(dynmoe_session_create(fx->model, &sp, &session))) {
        dynmoe_routing_free(routing);
        goto done;
    }
    dynmoe_routing_free(routing); /* the session keeps a copy */
    CHECK_OK(dynmoe_session_get_capacity(session, &pos));
    CHECKF(pos == fx->info.max_position_embeddings, "capacity %d", (int)pos);

    /* prefill T-1 tokens, then decode the last one */
    CHECK_OK(dynmoe_session_eval(session, prefix, fx->T - 1, NULL, NULL, 0, NULL));
    CHECK_OK(dynmoe_session_get_position(session, &pos));
    CHECK(pos == fx->T - 1);
    CHECK_OK(dynmoe_session_eval(session, last, 1, NULL, logits, BV, NULL));
    CHECK_CLOSE(logits, want_last, BV, 1e-3, 1e-4, "prefill + decode logits = forward logits at the last position");
    CHECK_OK(dynmoe_session_get_position(session, &pos));
    CHECK(pos == fx->T);

    /* rewind two positions and evaluate the last two tokens again */
    CHECK_OK(dynmoe_session_rewind(session, fx->T - 2));
    CHECK_OK(dynmoe_session_get_position(session, &pos));
    CHECK(pos == fx->T - 2);
    memset(logits, 0, BV * sizeof *logits);
    CHECK_OK(dynmoe_session_eval(session, tail, 2, NULL, logits, BV, NULL));
    CHECK_CLOSE(logits, want_last, BV, 1e-3, 1e-4, "logits after rewind");

    /* rewind to 0 and evaluate everything at once with every position's logits */
    CHECK_OK(dynmoe_session_rewind(session, 0));
    {
        dynmoe_forward_params fp = dynmoe_forward_params_default();
        fp.logits_mode = DYNMOE_LOGITS_ALL;
        CHECK_ST(dynmoe_session_eval(session, fx->tokens, fx->T, &fp, logits, n_all - 1, NULL),
                 DYNMOE_ERR_BUFFER_TOO_SMALL);
        CHECK_OK(dynmoe_session_get_position(session, &pos));
        CHECK(pos == 0);
        CHECK_OK(dynmoe_session_eval(session, fx->tokens, fx->T, &fp, logits, n_all, NULL));
        CHECK_CLOSE(logits, want_all, n_all, 1e-3, 1e-4, "session prefill, all positions");
    }
    CHECK(dynmoe_session_rewind(session, fx->T + 1) != DYNMOE_OK);
    CHECK(dynmoe_session_rewind(session, -1) != DYNMOE_OK);
    CHECK_OK(dynmoe_session_get_position(session, &pos));
    CHECK(pos == fx->T);

    /* greedy generation equals the reference's greedy continuation */
    snprintf(name, sizeof name, "%s.greedy", run->name);
    greedy = st_tensor(&fx->ref, name, "I64", gshape, &gndim, &gcount);
    if (greedy && CHECK(gndim == 2 && gshape[0] == fx->B)) {
        int32_t steps_n = (int32_t)gshape[1], steps = -1;
        int32_t *out = (int32_t *)xcalloc(gcount, sizeof *out);
        dynmoe_sampling_params greedy_sampling = dynmoe_sampling_params_default();
        size_t i, bad = 0;
        CHECK(greedy_sampling.temperature == 0);
        CHECK_OK(dynmoe_session_rewind(session, 0));
        CHECK_OK(dynmoe_session_generate(session, fx->tokens, fx->T, steps_n, &greedy_sampling, NULL, 0, NULL, NULL,
                                         NULL, out, gcount, &steps));
        CHECK(steps == steps_n);
        for (i = 0; i < gcount; ++i) bad += out[i] != (int32_t)st_i64(greedy, i);
        CHECKF(bad == 0, "%zu of %zu greedy tokens differ", bad, gcount);
        free(out);
    }
    dynmoe_session_free(session);
done:
    free(want_all);
    free(want_last);
    free(logits);
    free(prefix);
    free(last);
    free(tail);
}

/* ------------------------------------------------------------------------------------------ */
/* Specific tests                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* The value of `key` in a line of space-separated key=value pairs, copied into out; 0 if absent. */
static int info_value(const char *line, const char *key, char *out, size_t size) {
    size_t n = strlen(key);
    const char *p = line;
    while (p && *p) {
        if (strncmp(p, key, n) == 0 && p[n] == '=') {
            size_t len = strcspn(p + n + 1, " ");
            if (len >= size) return 0;
            memcpy(out, p + n + 1, len);
            out[len] = 0;
            return 1;
        }
        p = strchr(p, ' ');
        if (p) ++p;
    }
    return 0;
}

/* Whether the library's AVX-512 kernels should run: the CPU, as CPUID shows it to this process,
 * runs AVX-512 F + BW (what the library checks too; valgrind, which the C test also runs under,
 * hides AVX-512 from CPUID) and DYNMOE_MAX_ISA does not cap the kernels at AVX2. */
static int cpu_runs_avx512(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    const char *cap = getenv("DYNMOE_MAX_ISA"); /* the library's kernel cap (dynmoe_system_info) */
    if (cap && strcmp(cap, "avx2") == 0) return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

static void test_system_info(const char *version) {
    const char *info = dynmoe_system_info();
    char value[256];
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    CHECK(info != NULL);
    if (!info) return;
    CHECKF(dynmoe_system_info() == info, "\"%s\": not the same static string twice", info);
    CHECKF(info_value(info, "version", value, sizeof value) && strcmp(value, version) == 0, "\"%s\"", info);
    CHECKF(info_value(info, "build", value, sizeof value) && value[0] != 0, "\"%s\"", info);
    CHECKF(info_value(info, "cpus", value, sizeof value) && atol(value) == online, "\"%s\" (sysconf says %ld)", info, online);
    CHECKF(info_value(info, "prefill", value, sizeof value), "\"%s\"", info);
    {
        /* AVX-512 exactly when the CPU runs it and the build has AVX2 (the portable build has no C kernel). */
        char build[256] = "";
        int has_avx2 = info_value(info, "build", build, sizeof build) && strstr(build, "avx2") != NULL;
        int has_fma = strstr(build, "fma") != NULL;
        const char *expected = !has_avx2 ? "swift" : cpu_runs_avx512() ? "avx512" : "avx2";
        CHECKF(strcmp(value, expected) == 0, "\"%s\": prefill should be %s", info, expected);
        /* the decode kernel: AVX-512 likewise, else the Swift kernel in AVX2 + FMA or portable */
        expected = !(has_avx2 && has_fma) ? "simd8" : cpu_runs_avx512() ? "avx512" : "avx2";
        CHECKF(info_value(info, "decode", value, sizeof value) && strcmp(value, expected) == 0,
               "\"%s\": decode should be %s", info, expected);
    }
}

static void test_globals(void) {
    char version[32];
    static const char *names[] = {"DYNMOE_OK", "DYNMOE_ERR_INVALID_ARGUMENT", "DYNMOE_ERR_IO", "DYNMOE_ERR_FORMAT",
                                  "DYNMOE_ERR_UNSUPPORTED", "DYNMOE_ERR_BUFFER_TOO_SMALL", "DYNMOE_ERR_OUT_OF_MEMORY",
                                  "DYNMOE_ERR_CONTEXT_FULL", "DYNMOE_ERR_BUSY", "DYNMOE_ERR_NOT_AVAILABLE",
                                  "DYNMOE_ERR_INTERNAL"};
    int i;
    set_context("globals");
    snprintf(version, sizeof version, "%d.%d.%d", DYNMOE_VERSION_MAJOR, DYNMOE_VERSION_MINOR, DYNMOE_VERSION_PATCH);
    CHECK(dynmoe_version() != NULL);
    CHECKF(strcmp(dynmoe_version(), version) == 0, "\"%s\"", dynmoe_version());
    for (i = 0; i <= DYNMOE_ERR_INTERNAL; ++i)
        CHECKF(strcmp(dynmoe_status_name(i), names[i]) == 0, "%d -> \"%s\"", i, dynmoe_status_name(i));
    CHECK(strcmp(dynmoe_status_name(11), "DYNMOE_ERR_UNKNOWN") == 0);
    CHECK(strcmp(dynmoe_status_name(-1), "DYNMOE_ERR_UNKNOWN") == 0);
    CHECK(strcmp(dynmoe_status_name(INT32_MAX), "DYNMOE_ERR_UNKNOWN") == 0);
    test_system_info(version);

    dynmoe_clear_error();
    CHECK(dynmoe_last_error() != NULL && strcmp(dynmoe_last_error(), "") == 0);

    /* *_free(NULL) are no-ops */
    dynmoe_model_free(NULL);
    dynmoe_routing_free(NULL);
    dynmoe_trace_free(NULL);
    dynmoe_stats_free(NULL);
    dynmoe_session_free(NULL);
    CHECK(1);

    {
        dynmoe_load_params lp = dynmoe_load_params_default();
        dynmoe_forward_params fp = dynmoe_forward_params_default();
        dynmoe_session_params sp = dynmoe_session_params_default();
        dynmoe_sampling_params sa = dynmoe_sampling_params_default();
        dynmoe_policy p = dynmoe_policy_native();
        CHECK(lp.n_threads == 0 && lp.prefetch == 0 && lp.progress_callback == NULL);
        CHECK(fp.routing == NULL && fp.record_trace == 0 && fp.logits_mode == DYNMOE_LOGITS_DEFAULT && fp.observer == NULL);
        CHECK(sp.n_sequences == 1 && sp.capacity == 0 && sp.memory_budget_bytes == 0 && sp.routing == NULL &&
              sp.kv_dtype == DYNMOE_DTYPE_F32);
        CHECK(sa.temperature == 0 && sa.top_k == 0 && sa.top_p == 1.0f);
        CHECK(p.mode == DYNMOE_ROUTING_NATIVE && p.renormalize == DYNMOE_RENORMALIZE_NATIVE);
        p = dynmoe_policy_top_k(3);
        CHECK(p.mode == DYNMOE_ROUTING_TOP_K && p.k == 3 && p.renormalize == DYNMOE_RENORMALIZE_NATIVE);
        p = dynmoe_policy_top_p(0.25f);
        CHECK(p.mode == DYNMOE_ROUTING_TOP_P && p.threshold == 0.25f && p.min_experts == 0 && p.max_experts == 0 &&
              p.renormalize == DYNMOE_RENORMALIZE_NATIVE);
    }
}

static void on_progress(float progress, void *user_data) {
    float *last = (float *)user_data;
    if (progress < last[0] || progress < 0 || progress > 1) last[1] = 1; /* not monotonic / out of range */
    last[0] = progress;
    last[2] += 1;
}

static void test_load_errors(void) {
    char path[1024];
    dynmoe_model *model = (dynmoe_model *)&model; /* non-NULL sentinel */
    set_context("load errors");
    CHECK_ST(dynmoe_model_load(NULL, NULL, &model), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK(model == NULL);
    CHECK(strlen(dynmoe_last_error()) > 0);
    dynmoe_clear_error();
    CHECK(strcmp(dynmoe_last_error(), "") == 0);

    snprintf(path, sizeof path, "%s/no-such-checkpoint-dir", g_fixtures_dir);
    model = (dynmoe_model *)&model;
    CHECK_ST(dynmoe_model_load(path, NULL, &model), DYNMOE_ERR_IO);
    CHECK(model == NULL);
    CHECKF(strstr(dynmoe_last_error(), path) != NULL, "message \"%s\" does not name %s", dynmoe_last_error(), path);

    snprintf(path, sizeof path, "%s/mixtral-tiny/model", g_fixtures_dir);
    CHECK_ST(dynmoe_model_load(path, NULL, NULL), DYNMOE_ERR_INVALID_ARGUMENT);

    /* a directory that exists but is not a checkpoint (no config.json) */
    snprintf(path, sizeof path, "%s/mixtral-tiny", g_fixtures_dir);
    model = (dynmoe_model *)&model;
    CHECK(dynmoe_model_load(path, NULL, &model) != DYNMOE_OK);
    CHECK(model == NULL);

    /* progress callback and explicit threads */
    {
        dynmoe_load_params lp = dynmoe_load_params_default();
        float progress[3] = {0, 0, 0};
        lp.n_threads = 1;
        lp.prefetch = 1;
        lp.progress_callback = on_progress;
        lp.progress_user_data = progress;
        snprintf(path, sizeof path, "%s/olmoe-tiny/model", g_fixtures_dir);
        CHECK_OK(dynmoe_model_load(path, &lp, &model));
        CHECKF(progress[2] >= 1 && progress[1] == 0 && progress[0] == 1.0f, "calls %g, last %g, bad %g",
               (double)progress[2], (double)progress[0], (double)progress[1]);
        dynmoe_model_free(model);
    }
}

/* Threads of this process ("Threads:" in /proc/self/status), or -1 where that is not readable. */
static int process_threads(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int n = -1;
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %d", &n) == 1) break;
    fclose(f);
    return n;
}

/* Handles over their whole life: freeing a model joins its worker threads; a freed handle stays
 * invalid even when a new object of the same type is created right after it (the double free
 * must not free the new one), whatever the allocator reuses. */
static void test_handle_lifetimes(void) {
    char path[1024];
    dynmoe_load_params lp = dynmoe_load_params_default();
    dynmoe_model *model = NULL, *again = NULL;
    dynmoe_session *a = NULL, *b = NULL;
    dynmoe_model_info info;
    const int32_t token = 1;
    int before, i;

    set_context("handle lifetimes");
    snprintf(path, sizeof path, "%s/mixtral-tiny/model", g_fixtures_dir);
    lp.n_threads = 4;
    before = process_threads();
    for (i = 0; i < 5; ++i) {
        float logits[128];
        CHECK_OK(dynmoe_model_load(path, &lp, &model));
        CHECK_OK(dynmoe_forward(model, &token, 1, 1, NULL, logits, sizeof logits / sizeof *logits, NULL));
        dynmoe_model_free(model);
    }
    if (before > 0) CHECKF(process_threads() == before, "%d threads before 5 loads and frees, %d after", before, process_threads());

    CHECK_OK(dynmoe_model_load(path, NULL, &model));
    for (i = 0; i < 20; ++i) {
        CHECK_OK(dynmoe_session_create(model, NULL, &a));
        dynmoe_session_free(a);
        CHECK_OK(dynmoe_session_create(model, NULL, &b));
        CHECK(b != a);
        dynmoe_session_free(a); /* a double free: must leave b alone */
        CHECK_OK(dynmoe_session_eval(b, &token, 1, NULL, NULL, 0, NULL));
        CHECK_ST(dynmoe_session_eval(a, &token, 1, NULL, NULL, 0, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
        dynmoe_session_free(b);
    }
    dynmoe_model_free(model);
    CHECK_OK(dynmoe_model_load(path, NULL, &again));
    CHECK(again != model);
    CHECK_ST(dynmoe_model_get_info(model, &info), DYNMOE_ERR_INVALID_ARGUMENT);
    dynmoe_model_free(model);
    CHECK_OK(dynmoe_model_get_info(again, &info));
    dynmoe_model_free(again);
}

/* Argument errors on forward, routing and info (mixtral-tiny). */
static void test_call_errors(const fixture *fx) {
    const size_t N = (size_t)fx->B * fx->T, n_logits = N * (size_t)fx->V;
    float *logits = (float *)xcalloc(n_logits, sizeof *logits);
    int32_t *bad = (int32_t *)xcalloc(N, sizeof *bad);
    dynmoe_routing *routing = (dynmoe_routing *)&routing;
    dynmoe_trace *trace = (dynmoe_trace *)&trace;
    dynmoe_policy p;
    dynmoe_forward_params fp = dynmoe_forward_params_default();
    dynmoe_model_info info;
    char id[32];
    size_t i;

    set_context("%s: errors", fx->spec->dir);
    CHECK_ST(dynmoe_model_get_info(NULL, &info), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_model_get_info(fx->model, NULL), DYNMOE_ERR_INVALID_ARGUMENT);

    /* token outside the vocabulary: the message names it */
    memcpy(bad, fx->tokens, N * sizeof *bad);
    bad[5] = fx->V + 1000;
    snprintf(id, sizeof id, "%d", (int)bad[5]);
    CHECK_ST(dynmoe_forward(fx->model, bad, fx->B, fx->T, NULL, logits, n_logits, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECKF(strstr(dynmoe_last_error(), id) != NULL, "message \"%s\" does not mention %s", dynmoe_last_error(), id);
    bad[5] = -3;
    CHECK_ST(dynmoe_forward(fx->model, bad, fx->B, fx->T, NULL, logits, n_logits, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECKF(strstr(dynmoe_last_error(), "-3") != NULL, "message \"%s\"", dynmoe_last_error());
    CHECK_ST(dynmoe_forward(fx->model, NULL, fx->B, fx->T, NULL, logits, n_logits, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_forward(NULL, fx->tokens, fx->B, fx->T, NULL, logits, n_logits, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_forward(fx->model, fx->tokens, -1, fx->T, NULL, logits, n_logits, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_forward(fx->model, fx->tokens, fx->B, -1, NULL, logits, n_logits, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, NULL, NULL, n_logits, NULL),
             DYNMOE_ERR_INVALID_ARGUMENT);
    fp.logits_mode = 7;
    CHECK_ST(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, &fp, logits, n_logits, NULL),
             DYNMOE_ERR_INVALID_ARGUMENT);
    fp = dynmoe_forward_params_default();
    fp.record_trace = 1;
    CHECK_ST(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, &fp, logits, n_logits, NULL),
             DYNMOE_ERR_INVALID_ARGUMENT);

    /* the shape is checked before the buffer: a batch over the limit is an invalid argument
       even when the buffer is also too small */
    CHECK_ST(dynmoe_forward(fx->model, fx->tokens, 4097, fx->T, NULL, logits, 1, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECKF(strstr(dynmoe_last_error(), "4097") != NULL, "\"%s\"", dynmoe_last_error());
    /* a capacity of 2^63 or more is simply large (size_t, not a negative count) */
    CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, NULL, logits, SIZE_MAX, NULL));
    CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, NULL, logits, (size_t)1 << 63, NULL));

    /* too small logits buffer: error, nothing written */
    for (i = 0; i < n_logits; ++i) logits[i] = 12345.0f;
    CHECK_ST(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, NULL, logits, n_logits - 1, NULL),
             DYNMOE_ERR_BUFFER_TOO_SMALL);
    {
        size_t touched = 0;
        for (i = 0; i < n_logits; ++i) touched += logits[i] != 12345.0f;
        CHECKF(touched == 0, "%zu floats written", touched);
    }
    fp = dynmoe_forward_params_default();
    fp.logits_mode = DYNMOE_LOGITS_LAST;
    CHECK_ST(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, &fp, logits, (size_t)fx->B * fx->V - 1, NULL),
             DYNMOE_ERR_BUFFER_TOO_SMALL);

    /* no trace requested: *out_trace is set to NULL */
    CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, NULL, logits, n_logits, &trace));
    CHECK(trace == NULL);
    /* no logits wanted */
    CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, NULL, NULL, 0, NULL));
    /* LOGITS_LAST = the last position of LOGITS_ALL */
    {
        float *all = (float *)xcalloc(n_logits, sizeof *all), *want = (float *)xcalloc((size_t)fx->B * fx->V, sizeof *want);
        fp = dynmoe_forward_params_default();
        fp.logits_mode = DYNMOE_LOGITS_ALL;
        CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, &fp, all, n_logits, NULL));
        last_positions(fx, all, want);
        fp.logits_mode = DYNMOE_LOGITS_LAST;
        CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, &fp, logits, (size_t)fx->B * fx->V, NULL));
        CHECK_CLOSE(logits, want, (size_t)fx->B * fx->V, 1e-6, 0, "LOGITS_LAST = last position of LOGITS_ALL");
        /* one sequence alone = its row of the batch */
        CHECK_OK(dynmoe_forward(fx->model, fx->tokens + fx->T, 1, fx->T, &fp, logits, (size_t)fx->V, NULL));
        CHECK_CLOSE(logits, want + fx->V, (size_t)fx->V, 1e-4, 0, "sequence 1 alone = row 1 of the batch");
        free(all);
        free(want);
    }

    /* invalid policies */
    p = dynmoe_policy_top_k(fx->E + 1);
    CHECK_ST(dynmoe_routing_create(fx->model, &p, &routing), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK(routing == NULL);
    p = dynmoe_policy_top_k(0);
    CHECK_ST(dynmoe_routing_create(fx->model, &p, &routing), DYNMOE_ERR_INVALID_ARGUMENT);
    p = dynmoe_policy_top_p(0.0f);
    CHECK_ST(dynmoe_routing_create(fx->model, &p, &routing), DYNMOE_ERR_INVALID_ARGUMENT);
    p = dynmoe_policy_top_p(1.5f);
    CHECK_ST(dynmoe_routing_create(fx->model, &p, &routing), DYNMOE_ERR_INVALID_ARGUMENT);
    p = dynmoe_policy_top_p(0.5f);
    p.max_experts = fx->E + 1;
    CHECK_ST(dynmoe_routing_create(fx->model, &p, &routing), DYNMOE_ERR_INVALID_ARGUMENT);
    p = dynmoe_policy_top_p(0.5f);
    p.renormalize = 2;
    CHECK_ST(dynmoe_routing_create(fx->model, &p, &routing), DYNMOE_ERR_INVALID_ARGUMENT);
    p.renormalize = DYNMOE_RENORMALIZE_NATIVE;
    p.mode = 9;
    CHECK_ST(dynmoe_routing_create(fx->model, &p, &routing), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_routing_create(NULL, NULL, &routing), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_routing_create(fx->model, NULL, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    p = dynmoe_policy_top_k(fx->E); /* k = E is valid */
    CHECK_OK(dynmoe_routing_create(fx->model, &p, &routing));
    p = dynmoe_policy_top_k(fx->E + 1);
    CHECK_ST(dynmoe_routing_set_layer(routing, 0, &p), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_routing_set_layer(routing, fx->spec->num_layers, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_routing_set_layer(NULL, 0, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    dynmoe_routing_free(routing);
    /* a freed handle is refused (the pointer is only looked up, never followed); the message
       names the C type the caller knows */
    CHECK_ST(dynmoe_routing_set_layer(routing, 0, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECKF(strstr(dynmoe_last_error(), "not a live dynmoe_routing") != NULL, "\"%s\"", dynmoe_last_error());

    free(logits);
    free(bad);
}

/* Per-layer overrides: layer 0 native, layer 1 top-1 (mixtral-tiny); a failed set_layer changes nothing. */
static void test_layer_override(const fixture *fx) {
    const size_t N = (size_t)fx->B * fx->T, E = (size_t)fx->E;
    dynmoe_routing *routing = NULL;
    dynmoe_policy top1 = dynmoe_policy_top_k(1), bad = dynmoe_policy_top_k(fx->E + 5);
    dynmoe_forward_params fp = dynmoe_forward_params_default();
    dynmoe_trace *trace = NULL;
    uint8_t *mask = (uint8_t *)xcalloc(N * E, 1);
    float *hidden = (float *)xcalloc(N * (size_t)fx->H, sizeof *hidden), *want_h, *probs1;
    const uint8_t *native0;
    size_t t, bad_rows = 0;

    set_context("%s: layer override", fx->spec->dir);
    CHECK_OK(dynmoe_routing_create(fx->model, NULL, &routing));
    CHECK_OK(dynmoe_routing_set_layer(routing, 1, &top1));
    CHECK_ST(dynmoe_routing_set_layer(routing, 1, &bad), DYNMOE_ERR_INVALID_ARGUMENT);
    fp.routing = routing;
    fp.record_trace = 1;
    if (!CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, &fp, NULL, 0, &trace))) goto done;
    native0 = (const uint8_t *)st_get(&fx->ref, "native.selected.0", "U8", N * E);
    CHECK_OK(dynmoe_trace_get_selected(trace, 0, mask, N * E));
    CHECK(native0 && memcmp(mask, native0, N * E) == 0);
    want_h = st_floats(&fx->ref, "native.hidden.0", N * (size_t)fx->H);
    CHECK_OK(dynmoe_trace_get_hidden(trace, 0, hidden, N * (size_t)fx->H));
    if (CHECK(want_h != NULL)) CHECK_CLOSE(hidden, want_h, N * (size_t)fx->H, 1e-3, 1e-4, "layer 0 unchanged");
    free(want_h);
    /* layer 1 sees native hidden states, so its single expert is the argmax of native router probs */
    probs1 = st_floats(&fx->ref, "native.router_probs.1", N * E);
    CHECK_OK(dynmoe_trace_get_selected(trace, 1, mask, N * E));
    for (t = 0; probs1 && t < N; ++t) {
        size_t e, best = 0, k = 0;
        for (e = 0; e < E; ++e) {
            if (probs1[t * E + e] > probs1[t * E + best]) best = e;
            k += mask[t * E + e];
        }
        bad_rows += !(k == 1 && mask[t * E + best]);
    }
    CHECKF(probs1 && bad_rows == 0, "%zu tokens did not use exactly their top expert", bad_rows);
    free(probs1);

    /* removing the override restores native routing on layer 1 */
    dynmoe_trace_free(trace);
    trace = NULL;
    CHECK_OK(dynmoe_routing_set_layer(routing, 1, NULL));
    if (CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, &fp, NULL, 0, &trace))) {
        const uint8_t *native1 = (const uint8_t *)st_get(&fx->ref, "native.selected.1", "U8", N * E);
        CHECK_OK(dynmoe_trace_get_selected(trace, 1, mask, N * E));
        CHECK(native1 && memcmp(mask, native1, N * E) == 0);
    }
done:
    dynmoe_trace_free(trace);
    dynmoe_routing_free(routing);
    free(mask);
    free(hidden);
}

/* qwen2moe-tiny: layer 1 is dense. */
static void test_dense_layer(const fixture *fx) {
    dynmoe_routing *routing = NULL;
    dynmoe_policy p = dynmoe_policy_top_k(1);
    set_context("%s: dense layer", fx->spec->dir);
    CHECK_OK(dynmoe_routing_create(fx->model, NULL, &routing));
    CHECK_ST(dynmoe_routing_set_layer(routing, 1, &p), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECKF(strstr(dynmoe_last_error(), "1") != NULL, "\"%s\"", dynmoe_last_error());
    CHECK_ST(dynmoe_routing_set_layer(routing, 1, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_OK(dynmoe_routing_set_layer(routing, 2, &p));
    CHECK_OK(dynmoe_routing_set_layer(routing, 0, &p));
    dynmoe_routing_free(routing);
}

typedef struct observed {
    int events;
    int32_t layers[8];
    int bad;             /* events whose shape or contents disagree with the trace */
    size_t N, E;
    uint8_t *masks[8];   /* [N, E] per event, rebuilt from experts/counts */
    float *weights[8];   /* [N, E] per event */
    float *probs[8];     /* [N, E] per event */
} observed;

static void on_routing(const dynmoe_routing_event *ev, void *user_data) {
    observed *o = (observed *)user_data;
    int i = o->events++;
    int32_t t, k;
    if (i >= 8) return;
    o->layers[i] = ev->layer;
    if ((size_t)ev->num_tokens != o->N || (size_t)ev->num_experts != o->E || ev->stride < 1 || !ev->experts ||
        !ev->weights || !ev->counts || !ev->probabilities) {
        o->bad++;
        return;
    }
    o->masks[i] = (uint8_t *)xcalloc(o->N * o->E, 1);
    o->weights[i] = (float *)xcalloc(o->N * o->E, sizeof(float));
    o->probs[i] = (float *)xcalloc(o->N * o->E, sizeof(float));
    memcpy(o->probs[i], ev->probabilities, o->N * o->E * sizeof(float));
    for (t = 0; t < ev->num_tokens; ++t) {
        if (ev->counts[t] < 1 || ev->counts[t] > ev->stride) {
            o->bad++;
            continue;
        }
        for (k = 0; k < ev->counts[t]; ++k) {
            int32_t e = ev->experts[(size_t)t * ev->stride + k];
            if (e < 0 || (size_t)e >= o->E) {
                o->bad++;
                continue;
            }
            o->masks[i][(size_t)t * o->E + e] = 1;
            o->weights[i][(size_t)t * o->E + e] = ev->weights[(size_t)t * ev->stride + k];
            if (k > 0 && ev->probabilities[(size_t)t * o->E + e] >
                             ev->probabilities[(size_t)t * o->E + ev->experts[(size_t)t * ev->stride + k - 1]])
                o->bad++; /* not by descending probability */
        }
    }
}

static void test_observer(const fixture *fx, const run_spec *run) {
    const size_t N = (size_t)fx->B * fx->T, E = (size_t)fx->E;
    observed o;
    dynmoe_forward_params fp = dynmoe_forward_params_default();
    dynmoe_trace *trace = NULL;
    uint8_t *mask = (uint8_t *)xcalloc(N * E, 1);
    float *buf = (float *)xcalloc(N * E, sizeof *buf);
    int i;

    set_context("%s: observer %s", fx->spec->dir, run->name);
    memset(&o, 0, sizeof o);
    o.N = N;
    o.E = E;
    fp.routing = run_routing(fx, run);
    fp.record_trace = 1;
    fp.observer = on_routing;
    fp.observer_user_data = &o;
    if (CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, &fp, NULL, 0, &trace))) {
        CHECKF(o.events == fx->spec->num_moe_layers, "%d events", o.events);
        CHECKF(o.bad == 0, "%d malformed entries", o.bad);
        for (i = 0; i < o.events && i < fx->spec->num_moe_layers && i < 8; ++i) {
            int32_t layer = fx->spec->moe_layers[i];
            CHECKF(o.layers[i] == layer, "event %d is layer %d", i, (int)o.layers[i]);
            if (!o.masks[i]) continue;
            CHECK_OK(dynmoe_trace_get_selected(trace, layer, mask, N * E));
            CHECKF(memcmp(mask, o.masks[i], N * E) == 0, "layer %d: observer selections differ from the trace", (int)layer);
            CHECK_OK(dynmoe_trace_get_weights(trace, layer, buf, N * E));
            CHECK_CLOSE(o.weights[i], buf, N * E, 1e-6, 0, "observer weights = trace weights");
            CHECK_OK(dynmoe_trace_get_router_probs(trace, layer, buf, N * E));
            CHECK_CLOSE(o.probs[i], buf, N * E, 1e-6, 0, "observer probabilities = trace probabilities");
        }
    }
    for (i = 0; i < 8; ++i) {
        free(o.masks[i]);
        free(o.weights[i]);
        free(o.probs[i]);
    }
    dynmoe_routing_free((dynmoe_routing *)fp.routing);
    dynmoe_trace_free(trace);
    free(mask);
    free(buf);
}

/* Session errors and state: capacity, context full, bad tokens, set_routing, statistics. */
static void test_session_misc(const fixture *fx) {
    const size_t V = (size_t)fx->V;
    dynmoe_session_params sp = dynmoe_session_params_default();
    dynmoe_session *session = (dynmoe_session *)&session;
    float *logits = (float *)xcalloc(V * (size_t)fx->T, sizeof *logits);
    int32_t pos = -1, cap = -1;
    int32_t five[5];
    dynmoe_stats *stats = NULL;
    dynmoe_stats_summary sum;
    memcpy(five, fx->tokens, sizeof five);

    set_context("%s: session misc", fx->spec->dir);
    CHECK_ST(dynmoe_session_create(NULL, NULL, &session), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK(session == NULL);
    sp.n_sequences = 0;
    CHECK_ST(dynmoe_session_create(fx->model, &sp, &session), DYNMOE_ERR_INVALID_ARGUMENT);
    sp = dynmoe_session_params_default();
    sp.capacity = 4;
    if (!CHECK_OK(dynmoe_session_create(fx->model, &sp, &session))) goto done;
    CHECK_OK(dynmoe_session_get_capacity(session, &cap));
    CHECK(cap == 4);
    CHECK_ST(dynmoe_session_eval(session, five, 5, NULL, logits, V, NULL), DYNMOE_ERR_CONTEXT_FULL);
    CHECK_OK(dynmoe_session_get_position(session, &pos));
    CHECK(pos == 0);
    CHECK_OK(dynmoe_session_eval(session, five, 3, NULL, logits, V, NULL));
    five[4] = fx->V; /* out of vocabulary */
    CHECK_ST(dynmoe_session_eval(session, five + 4, 1, NULL, logits, V, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_OK(dynmoe_session_get_position(session, &pos));
    CHECK(pos == 3);
    CHECK_OK(dynmoe_session_eval(session, five + 3, 1, NULL, logits, V, NULL));
    CHECK_ST(dynmoe_session_eval(session, five, 1, NULL, logits, V, NULL), DYNMOE_ERR_CONTEXT_FULL);
    CHECK_OK(dynmoe_session_get_position(session, &pos));
    CHECK(pos == 4);

    /* session statistics: 4 tokens so far; reset zeroes them */
    CHECK_OK(dynmoe_session_get_stats(session, &stats));
    CHECK_OK(dynmoe_stats_get_summary(stats, &sum));
    CHECKF(sum.tokens == 4, "%lld", (long long)sum.tokens);
    dynmoe_stats_free(stats);

    /* session timing: the two calls that ran (3 tokens, then 1; the refused ones do not count),
     * split into parts that add up to the total; reset_stats zeroes it too */
    {
        dynmoe_timing timing;
        double parts;
        memset(&timing, 0xff, sizeof timing);
        CHECK_OK(dynmoe_session_get_timing(session, &timing));
        CHECKF(timing.passes == 2 && timing.tokens == 4, "%lld passes, %lld tokens", (long long)timing.passes,
               (long long)timing.tokens);
        parts = timing.attention_seconds + timing.moe_seconds + timing.dense_seconds + timing.head_seconds +
                timing.other_seconds;
        CHECK(timing.attention_seconds > 0 && timing.moe_seconds > 0 && timing.head_seconds > 0);
        CHECK(timing.dense_seconds >= 0 && timing.other_seconds >= 0);
        CHECKF(parts <= timing.total_seconds * (1 + 1e-9) && parts >= timing.total_seconds * (1 - 1e-9),
               "parts %g, total %g", parts, timing.total_seconds);
        CHECK_ST(dynmoe_session_get_timing(session, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
        CHECK_ST(dynmoe_session_get_timing(NULL, &timing), DYNMOE_ERR_INVALID_ARGUMENT);
        CHECK_OK(dynmoe_session_reset_stats(session));
        CHECK_OK(dynmoe_session_get_timing(session, &timing));
        CHECK(timing.passes == 0 && timing.tokens == 0 && timing.total_seconds == 0 && timing.moe_seconds == 0 &&
              timing.other_seconds == 0);
    }
    CHECK_OK(dynmoe_session_get_stats(session, &stats));
    CHECK_OK(dynmoe_stats_get_summary(stats, &sum));
    CHECK(sum.tokens == 0);
    dynmoe_stats_free(stats);

    /* set_routing keeps the cache; the next call uses the new routing (top-1: one expert per token) */
    {
        dynmoe_routing *routing = NULL;
        dynmoe_policy p = dynmoe_policy_top_k(1);
        dynmoe_trace *trace = NULL;
        dynmoe_forward_params fp = dynmoe_forward_params_default();
        size_t count = 0;
        CHECK_OK(dynmoe_routing_create(fx->model, &p, &routing));
        CHECK_OK(dynmoe_session_rewind(session, 2));
        CHECK_OK(dynmoe_session_set_routing(session, routing));
        dynmoe_routing_free(routing);
        CHECK_OK(dynmoe_session_get_position(session, &pos));
        CHECK(pos == 2);
        fp.record_trace = 1;
        CHECK_OK(dynmoe_session_eval(session, five, 1, &fp, logits, V, &trace));
        CHECK_OK(dynmoe_trace_get_token_experts(trace, fx->spec->moe_layers[0], 0, 0, NULL, NULL, 0, &count));
        CHECKF(count == 1, "%zu experts under top-1 session routing", count);
        dynmoe_trace_free(trace);
        CHECK_OK(dynmoe_session_set_routing(session, NULL));
    }
    CHECK_ST(dynmoe_session_eval(NULL, five, 1, NULL, logits, V, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK_ST(dynmoe_session_eval(session, five, 1, NULL, logits, V - 1, NULL), DYNMOE_ERR_BUFFER_TOO_SMALL);
    dynmoe_session_free(session);

    /* a budget too small for even one position fails cleanly */
    sp = dynmoe_session_params_default();
    sp.memory_budget_bytes = 1;
    session = (dynmoe_session *)&session;
    CHECK(dynmoe_session_create(fx->model, &sp, &session) != DYNMOE_OK);
    CHECK(session == NULL);
    /* a budget caps the default capacity */
    sp.memory_budget_bytes = 16 * 1024;
    if (CHECK_OK(dynmoe_session_create(fx->model, &sp, &session))) {
        CHECK_OK(dynmoe_session_get_capacity(session, &cap));
        CHECKF(cap >= 1 && cap < fx->info.max_position_embeddings, "capacity %d", (int)cap);
        dynmoe_session_free(session);
    }
done:
    free(logits);
}

/* KV-cache element types: f16 and bf16 caches stay within 10 units of roundoff of the
 * reference logits (relative L2), hold twice the positions under a budget; other values fail. */
static void test_kv_dtype(const fixture *fx) {
    const size_t n_all = (size_t)fx->B * fx->V * (size_t)fx->T;
    const int32_t dtypes[2] = {DYNMOE_DTYPE_F16, DYNMOE_DTYPE_BF16};
    const double unit_roundoff[2] = {1.0 / 2048, 1.0 / 256};
    dynmoe_session_params sp = dynmoe_session_params_default();
    dynmoe_forward_params fp = dynmoe_forward_params_default();
    dynmoe_session *session = NULL;
    float *want = st_floats(&fx->ref, "native.logits", n_all), *logits = (float *)xcalloc(n_all, sizeof(float));
    int32_t cap32 = -1, cap = -1;
    int i;

    set_context("%s: kv_dtype", fx->spec->dir);
    CHECK(sp.kv_dtype == DYNMOE_DTYPE_F32);
    sp.kv_dtype = 3;
    session = (dynmoe_session *)&session;
    CHECK_ST(dynmoe_session_create(fx->model, &sp, &session), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK(session == NULL && strstr(dynmoe_last_error(), "kv_dtype") != NULL);
    sp.kv_dtype = -1;
    CHECK_ST(dynmoe_session_create(fx->model, &sp, &session), DYNMOE_ERR_INVALID_ARGUMENT);

    sp = dynmoe_session_params_default();
    sp.memory_budget_bytes = 16 * 1024;
    if (CHECK_OK(dynmoe_session_create(fx->model, &sp, &session))) {
        CHECK_OK(dynmoe_session_get_capacity(session, &cap32));
        dynmoe_session_free(session);
    }
    if (!CHECK(want != NULL)) goto done;
    fp.logits_mode = DYNMOE_LOGITS_ALL;
    for (i = 0; i < 2; ++i) {
        sp.kv_dtype = dtypes[i];
        if (CHECK_OK(dynmoe_session_create(fx->model, &sp, &session))) {
            CHECK_OK(dynmoe_session_get_capacity(session, &cap));
            CHECKF(cap == 2 * cap32 || cap == 2 * cap32 + 1 || cap == fx->info.max_position_embeddings,
                   "capacity %d vs %d for f32", (int)cap, (int)cap32);
            dynmoe_session_free(session);
        }
        sp.memory_budget_bytes = 0;
        sp.n_sequences = fx->B;
        if (!CHECK_OK(dynmoe_session_create(fx->model, &sp, &session))) continue;
        if (CHECK_OK(dynmoe_session_eval(session, fx->tokens, fx->T, &fp, logits, n_all, NULL)))
            CHECK_CLOSE(logits, want, n_all, 0.25, 10 * unit_roundoff[i], i == 0 ? "f16 KV logits" : "bf16 KV logits");
        dynmoe_session_free(session);
        sp = dynmoe_session_params_default();
        sp.memory_budget_bytes = 16 * 1024;
    }
done:
    free(want);
    free(logits);
}

typedef struct stop_counter {
    int calls, stop_after, bad;
    int32_t n_sequences;
} stop_counter;

static int32_t on_token(const int32_t *tokens, int32_t n_sequences, int32_t step, void *user_data) {
    stop_counter *c = (stop_counter *)user_data;
    (void)tokens;
    if (n_sequences != c->n_sequences || step < c->calls - 1 || step > c->calls + 1) c->bad++;
    c->calls++;
    return c->calls >= c->stop_after;
}

/* A token callback that tries to re-enter its own session: reading works, rewinding is BUSY. */
typedef struct reentry {
    dynmoe_session *session;
    dynmoe_status rewind_status;
    int message_names_callback;
    int32_t position;
} reentry;

static int32_t reenter(const int32_t *tokens, int32_t n_sequences, int32_t step, void *user_data) {
    reentry *r = (reentry *)user_data;
    (void)tokens;
    (void)n_sequences;
    (void)step;
    r->rewind_status = dynmoe_session_rewind(r->session, 0);
    r->message_names_callback = strstr(dynmoe_last_error(), "callback") != NULL;
    if (dynmoe_session_get_position(r->session, &r->position) != DYNMOE_OK) r->position = -1;
    return 1;
}

/* Generation: callback stop, stop tokens, seeded sampling (fixture with a recorded native greedy run). */
static void test_generate(const fixture *fx) {
    int64_t shape[4];
    int ndim = 0;
    size_t count = 0, i;
    const void *greedy = st_tensor(&fx->ref, "native.greedy", "I64", shape, &ndim, &count);
    dynmoe_session_params sp = dynmoe_session_params_default();
    dynmoe_session *session = NULL;
    dynmoe_sampling_params sampling = dynmoe_sampling_params_default();
    int32_t steps_n, steps = -1, *out, *out2, want[64];
    stop_counter c;

    set_context("%s: generate", fx->spec->dir);
    if (!CHECK(greedy != NULL && ndim == 2 && shape[0] == fx->B && shape[1] >= 3 && count <= 64)) return;
    steps_n = (int32_t)shape[1];
    out = (int32_t *)xcalloc(count, sizeof *out);
    out2 = (int32_t *)xcalloc(count, sizeof *out2);
    sp.n_sequences = fx->B;
    if (!CHECK_OK(dynmoe_session_create(fx->model, &sp, &session))) goto done;

    /* the callback stops generation after 2 steps */
    memset(&c, 0, sizeof c);
    c.stop_after = 2;
    c.n_sequences = fx->B;
    CHECK_OK(dynmoe_session_generate(session, fx->tokens, fx->T, steps_n, &sampling, NULL, 0, NULL, on_token, &c, out,
                                     count, &steps));
    CHECKF(steps == 2 && c.calls == 2 && c.bad == 0, "steps %d, calls %d, bad %d", (int)steps, c.calls, c.bad);
    for (i = 0; i < 2; ++i) {
        CHECK(out[i] == (int32_t)st_i64(greedy, i));
        CHECK(out[steps_n + i] == (int32_t)st_i64(greedy, (size_t)steps_n + i));
    }
    /* continue from the cache (prompt_length 0): the next greedy tokens */
    memset(&c, 0, sizeof c);
    c.stop_after = 1000;
    c.n_sequences = fx->B;
    CHECK_OK(dynmoe_session_generate(session, NULL, 0, steps_n - 2, &sampling, NULL, 0, NULL, on_token, &c, out2, count,
                                     &steps));
    CHECKF(steps == steps_n - 2 && c.calls == steps, "steps %d calls %d", (int)steps, c.calls);
    for (i = 0; i + 2 < (size_t)steps_n; ++i) {
        CHECKF(out2[i] == (int32_t)st_i64(greedy, i + 2), "seq 0 step %zu", i + 2);
        CHECKF(out2[(size_t)(steps_n - 2) + i] == (int32_t)st_i64(greedy, (size_t)steps_n + i + 2), "seq 1 step %zu", i + 2);
    }

    /* stop tokens: each sequence stops at its second greedy token (or earlier if it occurs
       earlier); later slots repeat the stop token; generation ends when all have stopped */
    {
        int32_t stop[2];
        int32_t b, expect_steps = 0;
        stop[0] = (int32_t)st_i64(greedy, 1);
        stop[1] = (int32_t)st_i64(greedy, (size_t)steps_n + 1);
        for (b = 0; b < fx->B; ++b) {
            int32_t s, stopped = -1;
            for (s = 0; s < steps_n; ++s) {
                int32_t tok = (int32_t)st_i64(greedy, (size_t)b * steps_n + s);
                if (stopped < 0) {
                    want[b * steps_n + s] = tok;
                    if (tok == stop[0] || tok == stop[1]) stopped = s;
                } else {
                    want[b * steps_n + s] = want[b * steps_n + stopped];
                }
            }
            if (stopped < 0) stopped = steps_n - 1;
            if (stopped + 1 > expect_steps) expect_steps = stopped + 1;
        }
        CHECK_OK(dynmoe_session_rewind(session, 0));
        for (i = 0; i < count; ++i) out[i] = -5;
        CHECK_OK(dynmoe_session_generate(session, fx->tokens, fx->T, steps_n, &sampling, stop, 2, NULL, NULL, NULL, out,
                                         count, &steps));
        CHECKF(steps == expect_steps, "steps %d, want %d", (int)steps, (int)expect_steps);
        for (b = 0; b < fx->B; ++b)
            for (i = 0; i < (size_t)expect_steps; ++i)
                CHECKF(out[(size_t)b * steps_n + i] == want[(size_t)b * steps_n + i], "seq %d slot %zu: %d, want %d",
                       (int)b, i, (int)out[(size_t)b * steps_n + i], (int)want[(size_t)b * steps_n + i]);
    }
    CHECK_OK(dynmoe_session_rewind(session, 0));
    CHECK_ST(dynmoe_session_generate(session, fx->tokens, fx->T, steps_n, &sampling, NULL, 0, NULL, NULL, NULL, out,
                                     count - 1, &steps),
             DYNMOE_ERR_BUFFER_TOO_SMALL);

    /* seeded sampling is reproducible and stays in the vocabulary */
    sampling.temperature = 1.0f;
    sampling.seed = 42;
    CHECK_OK(dynmoe_session_rewind(session, 0));
    CHECK_OK(dynmoe_session_generate(session, fx->tokens, fx->T, steps_n, &sampling, NULL, 0, NULL, NULL, NULL, out,
                                     count, &steps));
    CHECK_OK(dynmoe_session_rewind(session, 0));
    CHECK_OK(dynmoe_session_generate(session, fx->tokens, fx->T, steps_n, &sampling, NULL, 0, NULL, NULL, NULL, out2,
                                     count, &steps));
    CHECK(memcmp(out, out2, count * sizeof *out) == 0);
    for (i = 0; i < count; ++i) CHECK(out[i] >= 0 && out[i] < fx->V);
    /* top_k = 1 sampling is greedy whatever the temperature */
    sampling.top_k = 1;
    CHECK_OK(dynmoe_session_rewind(session, 0));
    CHECK_OK(dynmoe_session_generate(session, fx->tokens, fx->T, steps_n, &sampling, NULL, 0, NULL, NULL, NULL, out,
                                     count, &steps));
    for (i = 0; i < count; ++i) CHECKF(out[i] == (int32_t)st_i64(greedy, i), "slot %zu", i);

    /* re-entry from the token callback: refused as BUSY, generation itself unharmed */
    {
        reentry r;
        memset(&r, 0, sizeof r);
        r.session = session;
        CHECK_OK(dynmoe_session_rewind(session, 0));
        CHECK_OK(dynmoe_session_generate(session, fx->tokens, fx->T, steps_n, &sampling, NULL, 0, NULL, reenter, &r, out,
                                         count, &steps));
        CHECKF(r.rewind_status == DYNMOE_ERR_BUSY && r.message_names_callback, "rewind from the callback: %s",
               dynmoe_status_name(r.rewind_status));
        CHECKF(r.position == fx->T && steps == 1, "position %d in the callback, %d steps", (int)r.position, (int)steps);
    }
    dynmoe_session_free(session);
done:
    free(out);
    free(out2);
}

/* Model statistics accumulate over calls and reset; JSON length query then fill. */
static void test_model_stats(const fixture *fx) {
    const int64_t N = (int64_t)fx->B * fx->T;
    dynmoe_stats *stats = NULL;
    dynmoe_stats_summary sum;
    size_t length = 0, length2 = 0;
    char *json, small[8];

    set_context("%s: model stats", fx->spec->dir);
    CHECK_OK(dynmoe_model_reset_stats(fx->model));
    CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, NULL, NULL, 0, NULL));
    CHECK_OK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, NULL, NULL, 0, NULL));
    if (!CHECK_OK(dynmoe_model_get_stats(fx->model, &stats))) return;
    CHECK_OK(dynmoe_stats_get_summary(stats, &sum));
    CHECKF(sum.tokens == 2 * N, "%lld", (long long)sum.tokens);
    if (fx->info.native_mode == DYNMOE_ROUTING_TOP_K)
        CHECKF(fabs(sum.mean_experts_per_token - fx->info.native_top_k) < 1e-9, "%g", sum.mean_experts_per_token);
    CHECK_ST(dynmoe_stats_get_summary(stats, NULL), DYNMOE_ERR_INVALID_ARGUMENT);
    CHECK(dynmoe_stats_get_layer(stats, fx->spec->num_layers, &(dynmoe_layer_stats){0}) != DYNMOE_OK);

    /* JSON: query the length, too-small buffer, then fill */
    CHECK_OK(dynmoe_stats_to_json(stats, NULL, 0, &length));
    CHECK(length > 0);
    json = (char *)xcalloc(length + 1, 1);
    memset(small, 'x', sizeof small);
    CHECK_ST(dynmoe_stats_to_json(stats, small, sizeof small, &length2), DYNMOE_ERR_BUFFER_TOO_SMALL);
    CHECK(length2 == length);
    CHECK_ST(dynmoe_stats_to_json(stats, json, length, &length2), DYNMOE_ERR_BUFFER_TOO_SMALL); /* no room for NUL */
    CHECK_OK(dynmoe_stats_to_json(stats, json, length + 1, &length2));
    CHECK(length2 == length && strlen(json) == length);
    CHECK(json[0] == '{' && json[length - 1] == '}');
    CHECK(strstr(json, "\"dynmoe.stats\"") != NULL);
    CHECK(strstr(json, fx->info.family) != NULL);
    free(json);
    dynmoe_stats_free(stats);

    CHECK_OK(dynmoe_model_reset_stats(fx->model));
    CHECK_OK(dynmoe_model_get_stats(fx->model, &stats));
    CHECK_OK(dynmoe_stats_get_summary(stats, &sum));
    CHECK(sum.tokens == 0);
    dynmoe_stats_free(stats);
}

/* Two threads forward on one model at once; error messages are per thread. */
typedef struct worker {
    const fixture *fx;
    const float *want;
    int mismatches, failures, error_was_empty, own_error_named;
} worker;

static void *worker_main(void *arg) {
    worker *w = (worker *)arg;
    const size_t n = (size_t)w->fx->B * w->fx->T * w->fx->V;
    float *logits = (float *)xcalloc(n, sizeof *logits);
    int32_t bad = w->fx->V + 4242;
    char bad_text[32];
    int i;
    size_t j;
    snprintf(bad_text, sizeof bad_text, "%d", (int)bad);
    w->error_was_empty = strcmp(dynmoe_last_error(), "") == 0;
    for (i = 0; i < 4; ++i) {
        if (dynmoe_forward(w->fx->model, w->fx->tokens, w->fx->B, w->fx->T, NULL, logits, n, NULL) != DYNMOE_OK) {
            w->failures++;
            continue;
        }
        for (j = 0; j < n; ++j)
            if (fabsf(logits[j] - w->want[j]) > 1e-3f) {
                w->mismatches++;
                break;
            }
    }
    dynmoe_forward(w->fx->model, &bad, 1, 1, NULL, NULL, 0, NULL);
    w->own_error_named = strstr(dynmoe_last_error(), bad_text) != NULL;
    free(logits);
    return NULL;
}

static void test_threads(const fixture *fx) {
    const size_t n = (size_t)fx->B * fx->T * fx->V;
    float *want = st_floats(&fx->ref, "native.logits", n);
    worker w[2];
    pthread_t th[2];
    int i;
    char mine[64];

    set_context("%s: threads", fx->spec->dir);
    if (!CHECK(want != NULL)) return;
    /* this thread's error must survive the workers' failures */
    CHECK(dynmoe_model_load(NULL, NULL, NULL) != DYNMOE_OK);
    snprintf(mine, sizeof mine, "%.60s", dynmoe_last_error());
    for (i = 0; i < 2; ++i) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].fx = fx;
        w[i].want = want;
        CHECK(pthread_create(&th[i], NULL, worker_main, &w[i]) == 0);
    }
    for (i = 0; i < 2; ++i) {
        pthread_join(th[i], NULL);
        CHECKF(w[i].failures == 0 && w[i].mismatches == 0, "thread %d: %d failures, %d mismatches", i, w[i].failures,
               w[i].mismatches);
        CHECK(w[i].error_was_empty);
        CHECK(w[i].own_error_named);
    }
    CHECKF(strncmp(dynmoe_last_error(), mine, strlen(mine)) == 0, "\"%s\" became \"%s\"", mine, dynmoe_last_error());
    free(want);
}

/* Loading and freeing models on several threads at once, each running forwards on its own
 * model, while another thread reads the shared model's statistics during forwards. */
typedef struct churn {
    const fixture *fx;
    const float *want;
    int failures, mismatches;
} churn;

static void *churn_main(void *arg) {
    churn *c = (churn *)arg;
    const size_t n = (size_t)c->fx->B * c->fx->T * c->fx->V;
    float *logits = (float *)xcalloc(n, sizeof *logits);
    char path[1024];
    int round;
    size_t j;
    dynmoe_load_params params = dynmoe_load_params_default();
    params.n_threads = 1; /* no extra pool threads: keeps the test quick under valgrind */
    snprintf(path, sizeof path, "%s/%s/model", g_fixtures_dir, c->fx->spec->dir);
    for (round = 0; round < 3; ++round) {
        dynmoe_model *m = NULL;
        if (dynmoe_model_load(path, &params, &m) != DYNMOE_OK) { c->failures++; continue; }
        if (dynmoe_forward(m, c->fx->tokens, c->fx->B, c->fx->T, NULL, logits, n, NULL) != DYNMOE_OK) c->failures++;
        else
            for (j = 0; j < n; ++j)
                if (fabsf(logits[j] - c->want[j]) > 1e-3f) { c->mismatches++; break; }
        dynmoe_model_free(m);
        dynmoe_model_free(m); /* a second free of the same handle is a no-op */
    }
    free(logits);
    return NULL;
}

typedef struct stats_reader {
    dynmoe_model *model;
    int32_t moe_layer, num_experts;
    volatile int stop;
    volatile int snapshots;
    int inconsistent, failures;
} stats_reader;

/* Every snapshot must be internally consistent: the histogram covers exactly the layer's tokens
 * and the expert counts add up to sum(n x histogram[n]). */
static void *stats_reader_main(void *arg) {
    stats_reader *r = (stats_reader *)arg;
    int64_t *counts = (int64_t *)xcalloc((size_t)r->num_experts, sizeof *counts);
    int64_t *hist = (int64_t *)xcalloc((size_t)r->num_experts + 1, sizeof *hist);
    while (!r->stop) {
        dynmoe_stats *st = NULL;
        dynmoe_layer_stats ls;
        int64_t tokens = 0, weighted = 0, total = 0;
        int32_t e;
        if (dynmoe_model_get_stats(r->model, &st) != DYNMOE_OK ||
            dynmoe_stats_get_layer(st, r->moe_layer, &ls) != DYNMOE_OK ||
            dynmoe_stats_get_expert_counts(st, r->moe_layer, counts, (size_t)r->num_experts) != DYNMOE_OK ||
            dynmoe_stats_get_histogram(st, r->moe_layer, hist, (size_t)r->num_experts + 1) != DYNMOE_OK) {
            r->failures++;
        } else {
            for (e = 0; e <= r->num_experts; ++e) { tokens += hist[e]; weighted += e * hist[e]; }
            for (e = 0; e < r->num_experts; ++e) total += counts[e];
            if (tokens != ls.tokens || weighted != total) r->inconsistent++;
            r->snapshots++;
        }
        dynmoe_stats_free(st);
        sched_yield(); /* let the forwards run (valgrind runs one thread at a time) */
    }
    free(counts);
    free(hist);
    return NULL;
}

static void test_concurrent_models(const fixture *fx) {
    const size_t n = (size_t)fx->B * fx->T * fx->V;
    float *want = st_floats(&fx->ref, "native.logits", n);
    float *logits = (float *)xcalloc(n, sizeof *logits);
    churn c[3];
    pthread_t th[3], reader_thread;
    stats_reader reader;
    dynmoe_stats *st = NULL;
    dynmoe_layer_stats ls;
    int i, forwards = 6;

    set_context("%s: concurrent load/free and stats reads", fx->spec->dir);
    if (!CHECK(want != NULL)) { free(logits); return; }
    for (i = 0; i < 3; ++i) {
        memset(&c[i], 0, sizeof c[i]);
        c[i].fx = fx;
        c[i].want = want;
        CHECK(pthread_create(&th[i], NULL, churn_main, &c[i]) == 0);
    }
    memset(&reader, 0, sizeof reader);
    reader.model = fx->model;
    reader.moe_layer = fx->spec->moe_layers[0];
    reader.num_experts = fx->E;
    CHECK(dynmoe_model_reset_stats(fx->model) == DYNMOE_OK);
    CHECK(pthread_create(&reader_thread, NULL, stats_reader_main, &reader) == 0);
    /* the forwards must overlap the reader: wait until it is running */
    while (reader.snapshots == 0 && reader.failures == 0) sched_yield();
    for (i = 0; i < forwards; ++i)
        CHECK(dynmoe_forward(fx->model, fx->tokens, fx->B, fx->T, NULL, logits, n, NULL) == DYNMOE_OK);
    reader.stop = 1;
    pthread_join(reader_thread, NULL);
    for (i = 0; i < 3; ++i) {
        pthread_join(th[i], NULL);
        CHECKF(c[i].failures == 0 && c[i].mismatches == 0, "churn thread %d: %d failures, %d mismatches", i,
               c[i].failures, c[i].mismatches);
    }
    CHECKF(reader.failures == 0 && reader.inconsistent == 0 && reader.snapshots > 0,
           "stats reader: %d snapshots, %d inconsistent, %d failed", reader.snapshots, reader.inconsistent,
           reader.failures);
    /* the shared model saw exactly this thread's forwards: the churn threads used their own models */
    CHECK(dynmoe_model_get_stats(fx->model, &st) == DYNMOE_OK);
    CHECK(dynmoe_stats_get_layer(st, reader.moe_layer, &ls) == DYNMOE_OK);
    CHECKF(ls.tokens == (int64_t)forwards * fx->B * fx->T, "tokens %lld", (long long)ls.tokens);
    dynmoe_stats_free(st);
    free(logits);
    free(want);
}

/* ------------------------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    size_t f;
    const run_spec *run;
    if (argc != 2) {
        fprintf(stderr, "usage: %s PATH/TO/Tests/Fixtures\n", argv[0]);
        return 2;
    }
    g_fixtures_dir = argv[1];
    setvbuf(stdout, NULL, _IOLBF, 0); /* keep progress lines and failures (stderr) in order */
    setvbuf(stderr, NULL, _IONBF, 0);

    test_globals();
    test_load_errors();
    test_handle_lifetimes();
    printf("%-20s %5d checks passed, %d failed\n", "globals, loading", g_passed, g_failed);

    for (f = 0; f < N_FIXTURES; ++f) {
        fixture fx;
        const fixture_spec *spec = &FIXTURES[f];
        int passed0 = g_passed, failed0 = g_failed;
        if (!fixture_open(&fx, spec)) {
            fixture_close(&fx);
            continue;
        }
        test_info(&fx);
        for (run = spec->runs; run->name; ++run) {
            test_run(&fx, run);
            test_session(&fx, run);
        }
        test_observer(&fx, &spec->runs[0]);
        test_observer(&fx, &spec->runs[1]);
        test_model_stats(&fx);
        if (strcmp(spec->dir, "mixtral-tiny") == 0) {
            test_call_errors(&fx);
            test_layer_override(&fx);
            test_session_misc(&fx);
            test_kv_dtype(&fx);
            test_generate(&fx);
            test_threads(&fx);
            test_concurrent_models(&fx);
        }
        if (strcmp(spec->dir, "qwen2moe-tiny") == 0) test_dense_layer(&fx);
        if (strcmp(spec->dir, "qwen3moe-tiny-bf16") == 0) {
            test_session_misc(&fx);
            test_threads(&fx);
            test_concurrent_models(&fx);
        }
        fixture_close(&fx);
        printf("%-20s %5d checks passed, %d failed\n", spec->dir, g_passed - passed0, g_failed - failed0);
    }

    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
