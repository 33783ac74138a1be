/*
 * routing_sweep.c — the Dynamic-MoE trade-off: compute used vs. the top-p threshold.
 *
 * Runs the same token batch through a checkpoint once per top-p threshold (dynamic routing,
 * arXiv 2403.07652) and tabulates, for each threshold, the mean experts per token over the MoE
 * layers, the activated parameters per token, the activated fraction of all parameters, and the
 * mean experts per token of every MoE layer. Figures come from the model's accumulated
 * statistics (dynmoe_model_reset_stats before each threshold, dynmoe_model_get_stats after).
 * The human-readable table starts with a "native" row: the checkpoint's own routing.
 *
 * Usage:
 *   routing_sweep [options] MODEL_DIR [TOKEN ...]
 *   routing_sweep Tests/Fixtures/olmoe-tiny/model --thresholds 0.3,0.5,0.7 --csv
 * Without TOKENs the input is --batch sequences of --tokens deterministic pseudo-random ids.
 * With --csv it prints one header row
 *   threshold,mean_experts_per_token,activated_parameters_per_token,activated_fraction,layer<i>_mean...
 * (one layer<i>_mean column per MoE layer i) and one row per threshold.
 * On failure it prints "error: <DYNMOE_STATUS_NAME>: <message>" and exits with status 1.
 */
#include "common.h"

#define MAX_THRESHOLDS 1024

static void usage(FILE *out) {
    fputs("usage: routing_sweep [options] MODEL_DIR [TOKEN ...]\n"
          "Sweeps the top-p routing threshold over every MoE layer and prints experts/token and\n"
          "activated parameters per threshold.\n"
          "options:\n"
          "  --thresholds a,b,c   thresholds to try, each in (0, 1] (default 0.1,0.2,...,0.9)\n"
          "  --min-experts N      top-p lower clamp (default 0 = 1)\n"
          "  --max-experts N      top-p upper clamp (default 0 = all experts)\n"
          EX_INPUT_HELP
          "  --csv                machine-readable output: a header row, then one row per threshold\n"
          "  --renormalize 0|1|native, --layer L=SPEC (fixed override, not swept), --threads N:\n"
          "                       as in dynmoe_run\n"
          "  --help               show this help\n",
          out);
}

/* Runs one forward with `routing` (NULL = native) and returns the model's statistics of it. */
static dynmoe_stats *run_once(dynmoe_model *model, const dynmoe_routing *routing, const int32_t *tokens,
                              int32_t batch, int32_t length) {
    dynmoe_forward_params fp = dynmoe_forward_params_default();
    dynmoe_stats *stats = NULL;
    fp.routing = routing;
    EX_TRY(dynmoe_model_reset_stats(model));
    EX_TRY(dynmoe_forward(model, tokens, batch, length, &fp, NULL, 0, NULL));
    EX_TRY(dynmoe_model_get_stats(model, &stats));
    return stats;
}

static void print_row(int csv, const char *label, const dynmoe_stats *stats, const int32_t *moe_layers,
                      size_t n_moe) {
    dynmoe_stats_summary s;
    size_t m;
    char buf[32];
    EX_TRY(dynmoe_stats_get_summary(stats, &s));
    if (csv) {
        printf("%s,%.6f,%.1f,%.6f", label, s.mean_experts_per_token, s.activated_parameters_per_token,
               s.activated_parameter_fraction);
        for (m = 0; m < n_moe; ++m) printf(",%.6f", ex_layer_mean_k(stats, moe_layers[m]));
    } else {
        printf("%9s  %13.3f  %15s  %7.2f%% ", label, s.mean_experts_per_token,
               ex_human_count(s.activated_parameters_per_token, buf, sizeof buf),
               100.0 * s.activated_parameter_fraction);
        for (m = 0; m < n_moe; ++m) printf(" %6.2f", ex_layer_mean_k(stats, moe_layers[m]));
    }
    printf("\n");
}

int main(int argc, char **argv) {
    ex_routing_args rargs;
    double thresholds[MAX_THRESHOLDS];
    int n_thresholds = 0;
    int32_t min_experts = 0, max_experts = 0;
    ex_input_args input;
    int csv = 0;
    char **positional = (char **)ex_calloc((size_t)argc, sizeof *positional);
    int n_positional = 0;
    int i;
    const char *v;
    dynmoe_model *model;
    dynmoe_model_info info;
    int32_t *tokens, *moe_layers;
    size_t n_moe = 0, m;
    dynmoe_stats *stats;
    char label[32], buf[32];

    ex_routing_args_init(&rargs);
    ex_input_args_init(&input);
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strncmp(argv[i], "--routing", 9) == 0)
            ex_usage_error("routing_sweep sweeps top_p itself; use --thresholds, --min-experts, --max-experts");
        if (ex_parse_routing_option(argc, argv, &i, &rargs) || ex_parse_input_option(argc, argv, &i, &input)) continue;
        if (ex_option(argc, argv, &i, "--thresholds", &v)) {
            const char *s = v;
            n_thresholds = 0;
            while (ex_next_field(&s, buf, sizeof buf, v)) {
                if (n_thresholds == MAX_THRESHOLDS) ex_usage_error("too many thresholds");
                thresholds[n_thresholds++] = ex_parse_real(buf, "threshold");
            }
            if (n_thresholds == 0) ex_usage_error("--thresholds needs at least one value");
        } else if (ex_option(argc, argv, &i, "--min-experts", &v)) {
            min_experts = (int32_t)ex_parse_int(v, "--min-experts", 0, INT32_MAX);
        } else if (ex_option(argc, argv, &i, "--max-experts", &v)) {
            max_experts = (int32_t)ex_parse_int(v, "--max-experts", 0, INT32_MAX);
        } else if (strcmp(argv[i], "--csv") == 0) {
            csv = 1;
        } else if (argv[i][0] == '-' && argv[i][1] == '-') {
            ex_usage_error("unknown option '%s'", argv[i]);
        } else {
            positional[n_positional++] = argv[i];
        }
    }
    if (n_positional < 1) ex_usage_error("missing MODEL_DIR");
    if (n_thresholds == 0)
        for (n_thresholds = 0; n_thresholds < 9; ++n_thresholds) thresholds[n_thresholds] = (n_thresholds + 1) / 10.0;

    model = ex_load_model(positional[0], rargs.threads);
    EX_TRY(dynmoe_model_get_info(model, &info));
    moe_layers = ex_moe_layers(model, &n_moe);

    tokens = ex_make_input(&input, n_positional, positional, 1, info.vocab_size);

    if (csv) {
        printf("threshold,mean_experts_per_token,activated_parameters_per_token,activated_fraction");
        for (m = 0; m < n_moe; ++m) printf(",layer%d_mean", (int)moe_layers[m]);
        printf("\n");
    } else {
        printf("model: %s, %d MoE layers x %d experts, %s parameters (%s per expert)\n", info.family,
               (int)info.num_moe_layers, (int)info.num_experts,
               ex_human_count((double)info.total_parameters, buf, sizeof buf),
               ex_human_count((double)info.parameters_per_expert, label, sizeof label));
        printf("input: %lld x %lld tokens\n\n", input.batch, input.length);
        printf("%9s  %13s  %15s  %8s  mean experts/token of MoE layer\n", "threshold", "experts/token",
               "activated/token", "fraction");
        printf("%9s  %13s  %15s  %8s ", "", "", "", "");
        for (m = 0; m < n_moe; ++m) {
            snprintf(label, sizeof label, "L%d", (int)moe_layers[m]);
            printf(" %6s", label);
        }
        printf("\n");
        stats = run_once(model, NULL, tokens, (int32_t)input.batch, (int32_t)input.length);
        print_row(0, "native", stats, moe_layers, n_moe);
        dynmoe_stats_free(stats);
    }

    for (i = 0; i < n_thresholds; ++i) {
        dynmoe_routing *routing;
        rargs.default_policy = dynmoe_policy_top_p((float)thresholds[i]);
        rargs.default_policy.min_experts = min_experts;
        rargs.default_policy.max_experts = max_experts;
        routing = ex_make_routing(model, &rargs);
        stats = run_once(model, routing, tokens, (int32_t)input.batch, (int32_t)input.length);
        snprintf(label, sizeof label, "%g", thresholds[i]);
        print_row(csv, label, stats, moe_layers, n_moe);
        dynmoe_stats_free(stats);
        dynmoe_routing_free(routing);
    }

    dynmoe_model_free(model);
    free(tokens);
    free(moe_layers);
    free(positional);
    return 0;
}
