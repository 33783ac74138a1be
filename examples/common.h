/*
 * common.h — helpers shared by the dynmoe example programs (header only, C99).
 *
 * What it provides:
 *  - error reporting: EX_TRY(call) prints "error: <DYNMOE_STATUS_NAME>: <dynmoe_last_error()>"
 *    and exits with status 1 when a dynmoe call fails; ex_usage_error() does the same for bad
 *    command lines;
 *  - option parsing: "--name value" and "--name=value" forms, checked integers and reals;
 *  - routing options shared by every example:
 *        --routing native | top_k:K | top_p:P[:MIN[:MAX]]   default policy of every MoE layer
 *        --renormalize 0|1|native                            weighting rule of those policies
 *        --layer L=SPEC                                      per-layer override (repeatable)
 *        --threads N                                         compute threads (0 = all CPUs)
 *    parsed into an ex_routing_args and turned into a dynmoe_routing plan;
 *  - inputs: token ids from the command line (ids or comma-separated lists), a short default
 *    prompt, or --batch x --tokens deterministic pseudo-random ids (--seed);
 *  - model loading and a printed model summary; human-readable parameter counts.
 *
 * Every function is `static inline` so that a program includes this header once and compiles
 * as a single translation unit: cc -std=c99 -Iinclude examples/<name>.c -ldynmoe.
 */
#ifndef DYNMOE_EXAMPLES_COMMON_H
#define DYNMOE_EXAMPLES_COMMON_H

#include <dynmoe.h>

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/** Prints "error: <status name>: <last error>" to stderr and exits with status 1. */
static inline void ex_die(dynmoe_status status) {
    fprintf(stderr, "error: %s: %s\n", dynmoe_status_name(status), dynmoe_last_error());
    exit(1);
}

/** Runs a dynmoe call and exits through ex_die() if it fails. */
#define EX_TRY(call)                                                                               \
    do {                                                                                           \
        dynmoe_status ex_status_ = (call);                                                         \
        if (ex_status_ != DYNMOE_OK) ex_die(ex_status_);                                           \
    } while (0)

/** Reports a bad command line ("error: <message> (see --help)") and exits with status 1. */
static inline void ex_usage_error(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("error: ", stderr);
    vfprintf(stderr, format, args);
    fputs(" (see --help)\n", stderr);
    va_end(args);
    exit(1);
}

/** calloc that exits with a clean message when memory runs out. */
static inline void *ex_calloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "error: out of memory (%zu x %zu bytes)\n", count, size);
        exit(1);
    }
    return p;
}

/* ------------------------------------------------------------------------------------------ */
/* Option parsing                                                                              */
/* ------------------------------------------------------------------------------------------ */

/**
 * If argv[*i] is option `name` ("--name value" or "--name=value"), stores its value in *value,
 * advances *i past it and returns 1; otherwise returns 0. A missing value is a usage error.
 */
static inline int ex_option(int argc, char **argv, int *i, const char *name, const char **value) {
    const char *arg = argv[*i];
    size_t n = strlen(name);
    if (strncmp(arg, name, n) != 0) return 0;
    if (arg[n] == '=') {
        *value = arg + n + 1;
        return 1;
    }
    if (arg[n] != '\0') return 0;
    if (*i + 1 >= argc) ex_usage_error("option %s needs a value", name);
    *value = argv[++*i];
    return 1;
}

/** Parses a whole string as an integer in [min, max]; `what` names it in the error message. */
static inline long long ex_parse_int(const char *s, const char *what, long long min, long long max) {
    char *end = NULL;
    long long v;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0') ex_usage_error("%s: '%s' is not an integer", what, s);
    if (v < min || v > max) {
        if (min == INT32_MIN && max == INT32_MAX) /* the library checks the real range */
            ex_usage_error("%s: %lld does not fit in a 32-bit integer", what, v);
        ex_usage_error("%s: %lld is outside [%lld, %lld]", what, v, min, max);
    }
    return v;
}

/** Parses a whole string as a finite real number; `what` names it in the error message. */
static inline double ex_parse_real(const char *s, const char *what) {
    char *end = NULL;
    double v;
    errno = 0;
    v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || v != v) ex_usage_error("%s: '%s' is not a number", what, s);
    return v;
}

/* ------------------------------------------------------------------------------------------ */
/* Routing options                                                                             */
/* ------------------------------------------------------------------------------------------ */

#define EX_MAX_LAYER_OVERRIDES 256

/** Routing-related command-line options (see the top of this file). */
typedef struct ex_routing_args {
    dynmoe_policy default_policy;
    /** --renormalize: 0, 1, DYNMOE_RENORMALIZE_NATIVE, or EX_RENORMALIZE_UNSET. */
    int32_t renormalize;
    int n_overrides;
    int32_t override_layers[EX_MAX_LAYER_OVERRIDES];
    dynmoe_policy override_policies[EX_MAX_LAYER_OVERRIDES];
    /** --threads: compute threads, 0 = every online CPU. */
    int32_t threads;
} ex_routing_args;

#define EX_RENORMALIZE_UNSET (-100)

/** Help text of the routing options, for the examples' --help. */
#define EX_ROUTING_HELP                                                                            \
    "  --routing SPEC       routing of every MoE layer (default: native):\n"                     \
    "                         native             the checkpoint's own rule\n"                     \
    "                         top_k:K            the K most probable experts\n"                   \
    "                         top_p:P[:MIN[:MAX]] dynamic: fewest experts whose probabilities\n"  \
    "                                            sum to more than P, clamped to [MIN, MAX]\n"     \
    "  --renormalize 0|1|native\n"                                                            \
    "                       divide the chosen experts' weights by their sum (1) or not (0);\n"    \
    "                       default: as the checkpoint's native routing does\n"                   \
    "  --layer L=SPEC       routing of MoE layer L only (repeatable), e.g. --layer 3=top_p:0.6\n" \
    "  --threads N          compute threads; 0 = every online CPU (default)\n"

static inline void ex_routing_args_init(ex_routing_args *args) {
    memset(args, 0, sizeof *args);
    args->default_policy = dynmoe_policy_native();
    args->renormalize = EX_RENORMALIZE_UNSET;
    args->threads = 0;
}

/** Parses "native", "top_k:K" or "top_p:P[:MIN[:MAX]]" (values are checked by the library). */
static inline dynmoe_policy ex_parse_policy(const char *spec) {
    char buf[128];
    char *fields[5];
    int n = 0;
    char *p;
    dynmoe_policy policy = dynmoe_policy_native();
    if (strlen(spec) >= sizeof buf) ex_usage_error("routing '%s' is too long", spec);
    strcpy(buf, spec);
    fields[n++] = buf;
    for (p = buf; *p; ++p) {
        if (*p == ':') {
            if (n == 5) ex_usage_error("routing '%s' has too many fields", spec);
            *p = '\0';
            fields[n++] = p + 1;
        }
    }
    if (strcmp(fields[0], "native") == 0) {
        if (n != 1) ex_usage_error("routing '%s': native takes no parameters", spec);
        return dynmoe_policy_native();
    }
    if (strcmp(fields[0], "top_k") == 0) {
        if (n != 2) ex_usage_error("routing '%s': expected top_k:K", spec);
        return dynmoe_policy_top_k((int32_t)ex_parse_int(fields[1], "top_k K", INT32_MIN, INT32_MAX));
    }
    if (strcmp(fields[0], "top_p") == 0) {
        if (n < 2 || n > 4) ex_usage_error("routing '%s': expected top_p:P[:MIN[:MAX]]", spec);
        policy = dynmoe_policy_top_p((float)ex_parse_real(fields[1], "top_p P"));
        if (n >= 3) policy.min_experts = (int32_t)ex_parse_int(fields[2], "top_p MIN", INT32_MIN, INT32_MAX);
        if (n >= 4) policy.max_experts = (int32_t)ex_parse_int(fields[3], "top_p MAX", INT32_MIN, INT32_MAX);
        return policy;
    }
    ex_usage_error("unknown routing '%s' (expected native, top_k:K or top_p:P[:MIN[:MAX]])", spec);
    return policy; /* not reached */
}

/** If argv[*i] is a routing option, parses it into `args`, advances *i and returns 1. */
static inline int ex_parse_routing_option(int argc, char **argv, int *i, ex_routing_args *args) {
    const char *v;
    if (ex_option(argc, argv, i, "--routing", &v)) {
        args->default_policy = ex_parse_policy(v);
        return 1;
    }
    if (ex_option(argc, argv, i, "--renormalize", &v)) {
        if (strcmp(v, "native") == 0) args->renormalize = DYNMOE_RENORMALIZE_NATIVE;
        else args->renormalize = (int32_t)ex_parse_int(v, "--renormalize", 0, 1);
        return 1;
    }
    if (ex_option(argc, argv, i, "--layer", &v)) {
        const char *eq = strchr(v, '=');
        char layer[32];
        if (!eq || eq == v || (size_t)(eq - v) >= sizeof layer) ex_usage_error("--layer '%s': expected L=SPEC", v);
        if (args->n_overrides == EX_MAX_LAYER_OVERRIDES) ex_usage_error("too many --layer options");
        memcpy(layer, v, (size_t)(eq - v));
        layer[eq - v] = '\0';
        args->override_layers[args->n_overrides] = (int32_t)ex_parse_int(layer, "--layer L", INT32_MIN, INT32_MAX);
        args->override_policies[args->n_overrides] = ex_parse_policy(eq + 1);
        args->n_overrides++;
        return 1;
    }
    if (ex_option(argc, argv, i, "--threads", &v)) {
        args->threads = (int32_t)ex_parse_int(v, "--threads", 0, 4096);
        return 1;
    }
    return 0;
}

/** The policy with --renormalize applied. */
static inline dynmoe_policy ex_apply_renormalize(const ex_routing_args *args, dynmoe_policy policy) {
    if (args->renormalize != EX_RENORMALIZE_UNSET) policy.renormalize = args->renormalize;
    return policy;
}

/** Creates the routing plan the options describe (exits on failure). */
static inline dynmoe_routing *ex_make_routing(const dynmoe_model *model, const ex_routing_args *args) {
    dynmoe_routing *routing = NULL;
    dynmoe_policy policy = ex_apply_renormalize(args, args->default_policy);
    int i;
    EX_TRY(dynmoe_routing_create(model, &policy, &routing));
    for (i = 0; i < args->n_overrides; ++i) {
        dynmoe_policy layer_policy = ex_apply_renormalize(args, args->override_policies[i]);
        dynmoe_status status = dynmoe_routing_set_layer(routing, args->override_layers[i], &layer_policy);
        if (status != DYNMOE_OK) {
            dynmoe_routing_free(routing);
            ex_die(status);
        }
    }
    return routing;
}

/** Writes a short description of a policy ("top_p:0.5 min 1 max 4 renormalize=1") into buf. */
static inline const char *ex_describe_policy(const dynmoe_policy *policy, char *buf, size_t size) {
    int n = 0;
    switch (policy->mode) {
    case DYNMOE_ROUTING_NATIVE: n = snprintf(buf, size, "native"); break;
    case DYNMOE_ROUTING_TOP_K: n = snprintf(buf, size, "top_k:%d", (int)policy->k); break;
    case DYNMOE_ROUTING_TOP_P:
        n = snprintf(buf, size, "top_p:%g", (double)policy->threshold);
        if (policy->min_experts > 0 && n >= 0 && (size_t)n < size)
            n += snprintf(buf + n, size - (size_t)n, " min=%d", (int)policy->min_experts);
        if (policy->max_experts > 0 && n >= 0 && (size_t)n < size)
            n += snprintf(buf + n, size - (size_t)n, " max=%d", (int)policy->max_experts);
        break;
    default: n = snprintf(buf, size, "mode %d", (int)policy->mode); break;
    }
    if (policy->renormalize != DYNMOE_RENORMALIZE_NATIVE && n >= 0 && (size_t)n < size)
        snprintf(buf + n, size - (size_t)n, " renormalize=%d", (int)policy->renormalize);
    return buf;
}

/** Prints the routing the options describe, one line per policy. */
static inline void ex_print_routing(FILE *out, const ex_routing_args *args) {
    char buf[128];
    dynmoe_policy policy = ex_apply_renormalize(args, args->default_policy);
    int i;
    fprintf(out, "routing: %s", ex_describe_policy(&policy, buf, sizeof buf));
    for (i = 0; i < args->n_overrides; ++i) {
        policy = ex_apply_renormalize(args, args->override_policies[i]);
        fprintf(out, "; layer %d: %s", (int)args->override_layers[i], ex_describe_policy(&policy, buf, sizeof buf));
    }
    fputc('\n', out);
}

/* ------------------------------------------------------------------------------------------ */
/* Models and tokens                                                                           */
/* ------------------------------------------------------------------------------------------ */

/** Loads a checkpoint directory with `threads` compute threads (exits on failure). */
static inline dynmoe_model *ex_load_model(const char *path, int32_t threads) {
    dynmoe_model *model = NULL;
    dynmoe_load_params params = dynmoe_load_params_default();
    params.n_threads = threads;
    EX_TRY(dynmoe_model_load(path, &params, &model));
    return model;
}

/** The indices of the model's MoE layers (caller frees); their number goes to *out_count. */
static inline int32_t *ex_moe_layers(const dynmoe_model *model, size_t *out_count) {
    size_t count = 0;
    int32_t *layers;
    EX_TRY(dynmoe_model_get_moe_layers(model, NULL, 0, &count));
    layers = (int32_t *)ex_calloc(count, sizeof *layers);
    EX_TRY(dynmoe_model_get_moe_layers(model, layers, count, &count));
    *out_count = count;
    return layers;
}

static inline const char *ex_dtype_name(int32_t dtype) {
    switch (dtype) {
    case DYNMOE_DTYPE_F32: return "F32";
    case DYNMOE_DTYPE_F16: return "F16";
    case DYNMOE_DTYPE_BF16: return "BF16";
    default: return "unknown";
    }
}

/** Formats a count as "950", "12.3K", "1.25M", "6.74B" into buf. */
static inline const char *ex_human_count(double v, char *buf, size_t size) {
    if (v >= 1e9) snprintf(buf, size, "%.2fB", v / 1e9);
    else if (v >= 1e6) snprintf(buf, size, "%.2fM", v / 1e6);
    else if (v >= 1e4) snprintf(buf, size, "%.1fK", v / 1e3);
    else snprintf(buf, size, "%.0f", v);
    return buf;
}

/** Prints what the model is: family, layers, MoE layers, experts, dtype, native routing, parameters. */
static inline void ex_print_model_info(FILE *out, const dynmoe_model *model, const dynmoe_model_info *info) {
    size_t n_moe = 0, i;
    int32_t *moe = ex_moe_layers(model, &n_moe);
    char a[32], b[32], c[32];
    fprintf(out, "model: %s (%s), dtype %s\n", info->family, info->architecture, ex_dtype_name(info->dtype));
    fprintf(out, "  layers %d, hidden %d, vocab %d, heads %d/%d kv, head_dim %d, max positions %d\n",
            (int)info->num_layers, (int)info->hidden_size, (int)info->vocab_size, (int)info->num_attention_heads,
            (int)info->num_key_value_heads, (int)info->head_dim, (int)info->max_position_embeddings);
    fprintf(out, "  MoE layers %d [", (int)info->num_moe_layers);
    for (i = 0; i < n_moe; ++i) fprintf(out, "%s%d", i ? " " : "", (int)moe[i]);
    fprintf(out, "], %d experts each%s\n", (int)info->num_experts,
            info->has_shared_expert ? " + a shared expert" : "");
    if (info->native_mode == DYNMOE_ROUTING_TOP_P)
        fprintf(out, "  native routing: top_p %g, renormalize %d\n", (double)info->native_top_p,
                (int)info->native_renormalize);
    else
        fprintf(out, "  native routing: top_k %d, renormalize %d\n", (int)info->native_top_k,
                (int)info->native_renormalize);
    fprintf(out, "  parameters: %s total, %s per expert, %s always active\n",
            ex_human_count((double)info->total_parameters, a, sizeof a),
            ex_human_count((double)info->parameters_per_expert, b, sizeof b),
            ex_human_count((double)info->always_active_parameters, c, sizeof c));
    free(moe);
}

/**
 * Copies the next field of a comma-separated list *s into buf and advances *s past it; returns 0
 * at the end of the list. An empty or too long field is a usage error naming `list`.
 */
static inline int ex_next_field(const char **s, char *buf, size_t size, const char *list) {
    const char *comma;
    size_t len;
    if (**s == '\0') return 0;
    comma = strchr(*s, ',');
    len = comma ? (size_t)(comma - *s) : strlen(*s);
    if (len == 0 || len >= size) ex_usage_error("bad list '%s'", list);
    memcpy(buf, *s, len);
    buf[len] = '\0';
    *s += len;
    if (**s == ',') {
        ++*s;
        if (**s == '\0') ex_usage_error("bad list '%s'", list);
    }
    return 1;
}

/**
 * Parses token ids from argv[first..argc), each argument an id or a comma-separated list of ids.
 * Returns a new array (caller frees) and its length in *out_count; NULL with 0 if there are none.
 * Ids are not checked against the vocabulary: the library reports ids out of range.
 */
static inline int32_t *ex_parse_tokens(int argc, char **argv, int first, size_t *out_count) {
    size_t cap = 0, n = 0;
    int32_t *tokens = NULL;
    int i;
    for (i = first; i < argc; ++i) cap += strlen(argv[i]) / 2 + 1; /* upper bound on ids */
    *out_count = 0;
    if (cap == 0) return NULL;
    tokens = (int32_t *)ex_calloc(cap, sizeof *tokens);
    for (i = first; i < argc; ++i) {
        char buf[32];
        const char *s = argv[i];
        while (ex_next_field(&s, buf, sizeof buf, argv[i]))
            tokens[n++] = (int32_t)ex_parse_int(buf, "token id", INT32_MIN, INT32_MAX);
    }
    *out_count = n;
    return tokens;
}

/** Fills `tokens` with deterministic pseudo-random ids in [0, vocab) (a 32-bit LCG from `seed`). */
static inline void ex_pseudo_random_tokens(int32_t *tokens, size_t count, int32_t vocab, uint32_t seed) {
    uint32_t state = seed * 2654435761u + 12345u;
    size_t i;
    for (i = 0; i < count; ++i) {
        state = state * 1664525u + 1013904223u;
        tokens[i] = (int32_t)((state >> 8) % (uint32_t)(vocab > 0 ? vocab : 1));
    }
}

/**
 * The token ids in argv[first..argc) (see ex_parse_tokens), or if there are none a short fixed
 * prompt reduced modulo the vocabulary. Caller frees; the length goes to *out_count.
 */
static inline int32_t *ex_tokens_or_default(int argc, char **argv, int first, int32_t vocab, size_t *out_count) {
    static const int32_t fixed[] = {1, 450, 4996, 17354, 1701, 432, 29871, 13};
    size_t n = 0, i;
    int32_t *tokens = ex_parse_tokens(argc, argv, first, &n);
    if (n == 0) {
        n = sizeof fixed / sizeof fixed[0];
        tokens = (int32_t *)ex_calloc(n, sizeof *tokens);
        for (i = 0; i < n; ++i) tokens[i] = fixed[i] % (vocab > 0 ? vocab : 1);
    }
    if (n > INT32_MAX) ex_usage_error("too many tokens");
    *out_count = n;
    return tokens;
}

/** Input of a forward: explicit TOKEN arguments, or `batch` x `length` pseudo-random ids. */
typedef struct ex_input_args {
    long long length;
    long long batch;
    uint32_t seed;
} ex_input_args;

#define EX_INPUT_HELP                                                                              \
    "  --tokens N           pseudo-random tokens per sequence when no TOKEN is given (default 64)\n" \
    "  --batch B            sequences when no TOKEN is given (default 1)\n"                       \
    "  --seed S             seed of the pseudo-random tokens (default 1)\n"

static inline void ex_input_args_init(ex_input_args *args) {
    args->length = 64;
    args->batch = 1;
    args->seed = 1;
}

/** If argv[*i] is --tokens, --batch or --seed, parses it into `args`, advances *i and returns 1. */
static inline int ex_parse_input_option(int argc, char **argv, int *i, ex_input_args *args) {
    const char *v;
    if (ex_option(argc, argv, i, "--tokens", &v)) args->length = ex_parse_int(v, "--tokens", 1, 1 << 20);
    else if (ex_option(argc, argv, i, "--batch", &v)) args->batch = ex_parse_int(v, "--batch", 1, 1 << 16);
    else if (ex_option(argc, argv, i, "--seed", &v)) args->seed = (uint32_t)ex_parse_int(v, "--seed", 0, UINT32_MAX);
    else return 0;
    return 1;
}

/**
 * The input tokens (caller frees): the ids in argv[first..argc) as one sequence (setting
 * args->batch to 1 and args->length to their number), or else args->batch x args->length
 * pseudo-random ids in [0, vocab).
 */
static inline int32_t *ex_make_input(ex_input_args *args, int argc, char **argv, int first, int32_t vocab) {
    size_t n = 0;
    int32_t *tokens = ex_parse_tokens(argc, argv, first, &n);
    if (n > 0) {
        if (n > INT32_MAX) ex_usage_error("too many tokens");
        args->batch = 1;
        args->length = (long long)n;
        return tokens;
    }
    n = (size_t)(args->batch * args->length);
    tokens = (int32_t *)ex_calloc(n, sizeof *tokens);
    ex_pseudo_random_tokens(tokens, n, vocab, args->seed);
    return tokens;
}

/** Mean experts per token of decoder `layer` in a statistics snapshot (exits on failure). */
static inline double ex_layer_mean_k(const dynmoe_stats *stats, int32_t layer) {
    dynmoe_layer_stats ls;
    EX_TRY(dynmoe_stats_get_layer(stats, layer, &ls));
    return ls.mean_experts_per_token;
}

#endif /* DYNMOE_EXAMPLES_COMMON_H */
