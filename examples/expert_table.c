/*
 * expert_table.c — per-layer expert load and routing statistics of one forward pass.
 *
 * Runs a token batch through a checkpoint with the chosen routing, recording a trace, and prints
 * one row per decoder layer from the trace's statistics (dynmoe_trace_get_stats):
 *   layer, MoE or dense, mean experts per token (k), busiest and idlest expert with their token
 *   counts, load max/mean and coefficient of variation, mean router entropy (nats), mean kept
 *   probability mass, routed-expert parameters activated per token (k x parameters per expert),
 *   and the experts-per-token histogram in compact form ("1:8 2:16" = 8 tokens used 1 expert,
 *   16 used 2),
 * then the whole call's activated parameters per token. With --json FILE it also writes the
 * statistics as JSON (dynmoe_stats_to_json, schema "dynmoe.stats"; FILE "-" = stdout).
 *
 * Usage:
 *   expert_table [options] MODEL_DIR [TOKEN ...]
 *   expert_table Tests/Fixtures/qwen2moe-tiny/model --routing top_p:0.4 --json stats.json
 * Without TOKENs the input is --batch sequences of --tokens deterministic pseudo-random ids.
 * On failure it prints "error: <DYNMOE_STATUS_NAME>: <message>" and exits with status 1.
 */
#include "common.h"

static void usage(FILE *out) {
    fputs("usage: expert_table [options] MODEL_DIR [TOKEN ...]\n"
          "Runs one forward pass and prints per-layer expert load and routing statistics.\n"
          "options:\n" EX_ROUTING_HELP EX_INPUT_HELP
          "  --json FILE          also write the statistics as JSON to FILE (\"-\" = stdout)\n"
          "  --help               show this help\n",
          out);
}

/* Writes the snapshot's JSON to `path` ("-" = stdout), asking for its length first. */
static void write_json(const dynmoe_stats *stats, const char *path) {
    size_t length = 0;
    char *json;
    FILE *out;
    EX_TRY(dynmoe_stats_to_json(stats, NULL, 0, &length));
    json = (char *)ex_calloc(length + 1, 1);
    EX_TRY(dynmoe_stats_to_json(stats, json, length + 1, &length));
    out = strcmp(path, "-") == 0 ? stdout : fopen(path, "w");
    if (!out) {
        fprintf(stderr, "error: cannot open '%s' for writing: %s\n", path, strerror(errno));
        exit(1);
    }
    if (fwrite(json, 1, length, out) != length || fputc('\n', out) == EOF || (out != stdout && fclose(out) != 0)) {
        fprintf(stderr, "error: cannot write '%s': %s\n", path, strerror(errno));
        exit(1);
    }
    if (out != stdout) fprintf(stderr, "wrote statistics JSON (%zu bytes) to %s\n", length, path);
    free(json);
}

int main(int argc, char **argv) {
    ex_routing_args rargs;
    ex_input_args input;
    const char *json_path = NULL;
    char **positional = (char **)ex_calloc((size_t)argc, sizeof *positional);
    int n_positional = 0;
    int i;
    const char *v;
    dynmoe_model *model;
    dynmoe_model_info info;
    dynmoe_routing *routing;
    dynmoe_forward_params fp;
    dynmoe_trace *trace = NULL;
    dynmoe_stats *stats = NULL;
    dynmoe_stats_summary summary;
    int32_t *tokens, layer;
    int64_t *counts, *histogram;
    char buf[32], buf2[32];

    ex_routing_args_init(&rargs);
    ex_input_args_init(&input);
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (ex_parse_routing_option(argc, argv, &i, &rargs) || ex_parse_input_option(argc, argv, &i, &input)) continue;
        if (ex_option(argc, argv, &i, "--json", &v)) json_path = v;
        else if (argv[i][0] == '-' && argv[i][1] == '-') ex_usage_error("unknown option '%s'", argv[i]);
        else positional[n_positional++] = argv[i];
    }
    if (n_positional < 1) ex_usage_error("missing MODEL_DIR");

    model = ex_load_model(positional[0], rargs.threads);
    EX_TRY(dynmoe_model_get_info(model, &info));
    tokens = ex_make_input(&input, n_positional, positional, 1, info.vocab_size);
    routing = ex_make_routing(model, &rargs);

    printf("model: %s, %d layers, %d MoE layers x %d experts, %s per expert; input %lld x %lld tokens\n",
           info.family, (int)info.num_layers, (int)info.num_moe_layers, (int)info.num_experts,
           ex_human_count((double)info.parameters_per_expert, buf, sizeof buf), input.batch, input.length);
    ex_print_routing(stdout, &rargs);

    fp = dynmoe_forward_params_default();
    fp.routing = routing;
    fp.record_trace = 1;
    EX_TRY(dynmoe_forward(model, tokens, (int32_t)input.batch, (int32_t)input.length, &fp, NULL, 0, &trace));
    EX_TRY(dynmoe_trace_get_stats(trace, &stats));
    EX_TRY(dynmoe_stats_get_summary(stats, &summary));

    counts = (int64_t *)ex_calloc((size_t)info.num_experts, sizeof *counts);
    histogram = (int64_t *)ex_calloc((size_t)info.num_experts + 1, sizeof *histogram);
    printf("\n%5s %5s %6s %14s %14s %8s %6s %8s %6s %11s  %s\n", "layer", "moe", "mean_k", "busiest(n)",
           "idlest(n)", "max/mean", "CV", "entropy", "kept", "params/tok", "histogram k:tokens");
    for (layer = 0; layer < info.num_layers; ++layer) {
        dynmoe_layer_stats ls;
        int32_t e;
        char busiest[32], idlest[32];
        EX_TRY(dynmoe_stats_get_layer(stats, layer, &ls));
        if (!ls.is_moe) {
            printf("%5d %5s %6s %14s %14s %8s %6s %8s %6s %11s  %s\n", (int)layer, "dense", "-", "-", "-", "-", "-",
                   "-", "-", ex_human_count(ls.activated_parameters_per_token, buf, sizeof buf), "-");
            continue;
        }
        EX_TRY(dynmoe_stats_get_expert_counts(stats, layer, counts, (size_t)ls.num_experts));
        EX_TRY(dynmoe_stats_get_histogram(stats, layer, histogram, (size_t)ls.num_experts + 1));
        if (ls.busiest_expert >= 0) snprintf(busiest, sizeof busiest, "%d(%lld)", (int)ls.busiest_expert,
                                             (long long)counts[ls.busiest_expert]);
        else snprintf(busiest, sizeof busiest, "-");
        if (ls.idlest_expert >= 0) snprintf(idlest, sizeof idlest, "%d(%lld)", (int)ls.idlest_expert,
                                            (long long)counts[ls.idlest_expert]);
        else snprintf(idlest, sizeof idlest, "-");
        printf("%5d %5s %6.3f %14s %14s %8.3f %6.3f %8.4f %6.3f %11s ", (int)layer, "yes", ls.mean_experts_per_token,
               busiest, idlest, ls.load_max_over_mean, ls.load_coefficient_of_variation, ls.mean_router_entropy,
               ls.mean_kept_mass,
               ex_human_count(ls.activated_parameters_per_token, buf, sizeof buf));
        for (e = 0; e <= ls.num_experts; ++e)
            if (histogram[e] != 0) printf(" %d:%lld", (int)e, (long long)histogram[e]);
        printf("\n");
    }
    printf("\n%lld tokens; mean experts/token %.3f; activated parameters/token %s = %.2f%% of %s\n",
           (long long)summary.tokens, summary.mean_experts_per_token,
           ex_human_count(summary.activated_parameters_per_token, buf, sizeof buf),
           100.0 * summary.activated_parameter_fraction,
           ex_human_count((double)summary.total_parameters, buf2, sizeof buf2));

    if (json_path) write_json(stats, json_path);

    free(histogram);
    free(counts);
    dynmoe_stats_free(stats);
    dynmoe_trace_free(trace);
    dynmoe_routing_free(routing);
    dynmoe_model_free(model);
    free(tokens);
    free(positional);
    return 0;
}
