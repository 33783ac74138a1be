/*
 * dynmoe_run.c — run one forward pass of an MoE checkpoint and show what the router did.
 *
 * Loads a Hugging Face checkpoint directory, runs the token ids given on the command line (or a
 * short default sequence) through the model with the chosen routing, and prints:
 *  - the model's description (family, layers, MoE layers, experts, dtype, parameters);
 *  - the 5 most likely next tokens, with their logits, after the last position;
 *  - for every MoE layer, the experts (and weights) each token used, read from a trace with
 *    dynmoe_trace_get_token_experts, and the layer's mean experts per token;
 *  - the call's activated parameters per token.
 *
 * Usage:
 *   dynmoe_run [options] MODEL_DIR [TOKEN ...]
 *   dynmoe_run Tests/Fixtures/mixtral-tiny/model 5 17 42 --routing top_p:0.5 --layer 1=top_k:1
 * TOKEN arguments may also be comma-separated lists ("5,17,42"). Options: see --help.
 * On failure it prints "error: <DYNMOE_STATUS_NAME>: <message>" and exits with status 1.
 */
#include "common.h"

static void usage(FILE *out) {
    fputs("usage: dynmoe_run [options] MODEL_DIR [TOKEN ...]\n"
          "Runs TOKENs (ids, or comma-separated lists of ids; default: a short fixed sequence\n"
          "reduced modulo the vocabulary) through the checkpoint in MODEL_DIR and prints the top-5\n"
          "next tokens and the experts every token used in every MoE layer.\n"
          "options:\n" EX_ROUTING_HELP "  --help               show this help\n",
          out);
}

/* Indices of the `n` largest values of `v` (length `len`), largest first. */
static void top_n(const float *v, int32_t len, int32_t *out, int n) {
    int i, j;
    int32_t t;
    for (i = 0; i < n; ++i) out[i] = -1;
    for (t = 0; t < len; ++t) {
        for (i = 0; i < n; ++i)
            if (out[i] < 0 || v[t] > v[out[i]]) break;
        if (i == n) continue;
        for (j = n - 1; j > i; --j) out[j] = out[j - 1];
        out[i] = t;
    }
}

int main(int argc, char **argv) {
    ex_routing_args rargs;
    int i;
    char **positional = (char **)ex_calloc((size_t)argc, sizeof *positional);
    int n_positional = 0;
    dynmoe_model *model;
    dynmoe_model_info info;
    dynmoe_routing *routing;
    dynmoe_forward_params fp;
    dynmoe_trace *trace = NULL;
    dynmoe_stats *stats = NULL;
    dynmoe_stats_summary summary;
    int32_t *tokens;
    size_t n_tokens = 0, n_moe = 0, m;
    int32_t *moe_layers;
    float *logits;
    int32_t best[5];
    int32_t *experts;
    float *weights;
    char a[32], b[32];

    ex_routing_args_init(&rargs);
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (ex_parse_routing_option(argc, argv, &i, &rargs)) continue;
        if (argv[i][0] == '-' && argv[i][1] == '-') ex_usage_error("unknown option '%s'", argv[i]);
        positional[n_positional++] = argv[i];
    }
    if (n_positional < 1) ex_usage_error("missing MODEL_DIR");

    model = ex_load_model(positional[0], rargs.threads);
    EX_TRY(dynmoe_model_get_info(model, &info));
    ex_print_model_info(stdout, model, &info);
    printf("library: %s\n", dynmoe_system_info());

    tokens = ex_tokens_or_default(n_positional, positional, 1, info.vocab_size, &n_tokens);
    printf("tokens (%zu):", n_tokens);
    for (m = 0; m < n_tokens; ++m) printf(" %d", (int)tokens[m]);
    printf("\n");

    routing = ex_make_routing(model, &rargs);
    ex_print_routing(stdout, &rargs);

    fp = dynmoe_forward_params_default();
    fp.routing = routing;
    fp.record_trace = 1;
    fp.logits_mode = DYNMOE_LOGITS_LAST;
    logits = (float *)ex_calloc((size_t)info.vocab_size, sizeof *logits);
    EX_TRY(dynmoe_forward(model, tokens, 1, (int32_t)n_tokens, &fp, logits, (size_t)info.vocab_size, &trace));

    top_n(logits, info.vocab_size, best, info.vocab_size < 5 ? info.vocab_size : 5);
    printf("\ntop-5 next tokens after position %zu:\n", n_tokens - 1);
    for (i = 0; i < 5 && i < info.vocab_size; ++i) printf("  %6d  logit %9.4f\n", (int)best[i], (double)logits[best[i]]);

    moe_layers = ex_moe_layers(model, &n_moe);
    experts = (int32_t *)ex_calloc((size_t)info.num_experts, sizeof *experts);
    weights = (float *)ex_calloc((size_t)info.num_experts, sizeof *weights);
    for (m = 0; m < n_moe; ++m) {
        int32_t layer = moe_layers[m];
        size_t total = 0, t;
        printf("\nMoE layer %d: experts used per token (expert:weight)\n", (int)layer);
        for (t = 0; t < n_tokens; ++t) {
            size_t count = 0, e;
            EX_TRY(dynmoe_trace_get_token_experts(trace, layer, 0, (int32_t)t, experts, weights,
                                                  (size_t)info.num_experts, &count));
            total += count;
            printf("  pos %3zu token %6d  k=%zu:", t, (int)tokens[t], count);
            for (e = 0; e < count; ++e) printf(" %d:%.3f", (int)experts[e], (double)weights[e]);
            printf("\n");
        }
        printf("  mean experts/token %.3f\n", (double)total / (double)n_tokens);
    }

    EX_TRY(dynmoe_trace_get_stats(trace, &stats));
    EX_TRY(dynmoe_stats_get_summary(stats, &summary));
    printf("\nmean experts/token over MoE layers %.3f; activated parameters/token %s (%.1f%% of %s)\n",
           summary.mean_experts_per_token, ex_human_count(summary.activated_parameters_per_token, a, sizeof a),
           100.0 * summary.activated_parameter_fraction,
           ex_human_count((double)summary.total_parameters, b, sizeof b));

    dynmoe_stats_free(stats);
    dynmoe_trace_free(trace);
    dynmoe_routing_free(routing);
    dynmoe_model_free(model);
    free(weights);
    free(experts);
    free(moe_layers);
    free(logits);
    free(tokens);
    free(positional);
    return 0;
}
