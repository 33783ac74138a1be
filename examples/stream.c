/*
 * stream.c — token-by-token generation with a session and its routing statistics.
 *
 * Creates a decoding session (KV cache) on a checkpoint with the chosen routing, generates a
 * continuation of a prompt with dynmoe_session_generate — greedy by default, or sampled with
 * --temperature/--seed — and prints each new token id as the library's callback delivers it.
 * Generation stops at the model's EOS token (unless --ignore-eos), a --stop token, or after
 * --max-new tokens. At the end it prints the session's routing statistics over the prompt and
 * the generated tokens: mean experts per token, activated parameters per token, and the mean
 * experts per token of every MoE layer; then where the forward time went (dynmoe_session_get_timing):
 * attention, MoE blocks, LM head and the rest.
 *
 * Usage:
 *   stream [options] MODEL_DIR [TOKEN ...]
 *   stream Tests/Fixtures/mixtral-tiny/model 55 74 38 --max-new 8 --routing top_p:0.5
 * Without TOKENs the prompt is a short fixed sequence reduced modulo the vocabulary.
 * On failure it prints "error: <DYNMOE_STATUS_NAME>: <message>" and exits with status 1.
 */
#include "common.h"

#define MAX_STOP_TOKENS 64

static void usage(FILE *out) {
    fputs("usage: stream [options] MODEL_DIR [TOKEN ...]\n"
          "Generates a continuation of the prompt TOKENs and prints each token as it arrives.\n"
          "options:\n" EX_ROUTING_HELP
          "  --max-new N          tokens to generate (default 16)\n"
          "  --temperature T      0 = greedy (default); otherwise sample from softmax(logits / T)\n"
          "  --seed S             seed of the sampler (default 0)\n"
          "  --sample-top-k K     sample among the K most likely tokens only (default 0 = all)\n"
          "  --sample-top-p P     sample from the smallest set of tokens with probability > P (default 1)\n"
          "  --stop ID            stop at token ID (repeatable; the model's EOS is added unless --ignore-eos)\n"
          "  --ignore-eos         do not stop at the model's EOS token\n"
          "  --capacity N         positions of the session's KV cache (default 0 = the model's maximum)\n"
          "  --kv-dtype T         how the KV cache stores keys and values: f32 (default), f16 or bf16\n"
          "  --help               show this help\n",
          out);
}

/* dynmoe_token_callback: prints the new token of the (single) sequence as soon as it exists. */
static int32_t on_token(const int32_t *tokens, int32_t n_sequences, int32_t step, void *user_data) {
    (void)n_sequences;
    (void)step;
    (void)user_data;
    printf(" %d", (int)tokens[0]);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    ex_routing_args rargs;
    dynmoe_sampling_params sampling = dynmoe_sampling_params_default();
    int32_t max_new = 16, capacity = 0, steps = 0, kv_dtype = DYNMOE_DTYPE_F32;
    int32_t stop[MAX_STOP_TOKENS];
    size_t n_stop = 0;
    int ignore_eos = 0;
    char **positional = (char **)ex_calloc((size_t)argc, sizeof *positional);
    int n_positional = 0;
    int i;
    const char *v;
    dynmoe_model *model;
    dynmoe_model_info info;
    dynmoe_routing *routing;
    dynmoe_session_params sp;
    dynmoe_session *session = NULL;
    dynmoe_stats *stats = NULL;
    dynmoe_stats_summary summary;
    dynmoe_timing timing;
    int32_t *prompt, *generated, *moe_layers;
    size_t n_prompt = 0, n_moe = 0, m;
    char buf[32];

    ex_routing_args_init(&rargs);
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (ex_parse_routing_option(argc, argv, &i, &rargs)) continue;
        if (ex_option(argc, argv, &i, "--max-new", &v)) max_new = (int32_t)ex_parse_int(v, "--max-new", 1, 1 << 20);
        else if (ex_option(argc, argv, &i, "--temperature", &v)) sampling.temperature = (float)ex_parse_real(v, "--temperature");
        else if (ex_option(argc, argv, &i, "--seed", &v)) sampling.seed = (uint64_t)ex_parse_int(v, "--seed", 0, INT64_MAX);
        else if (ex_option(argc, argv, &i, "--sample-top-k", &v)) sampling.top_k = (int32_t)ex_parse_int(v, "--sample-top-k", 0, INT32_MAX);
        else if (ex_option(argc, argv, &i, "--sample-top-p", &v)) sampling.top_p = (float)ex_parse_real(v, "--sample-top-p");
        else if (ex_option(argc, argv, &i, "--capacity", &v)) capacity = (int32_t)ex_parse_int(v, "--capacity", 0, INT32_MAX);
        else if (ex_option(argc, argv, &i, "--kv-dtype", &v)) {
            if (strcmp(v, "f32") == 0) kv_dtype = DYNMOE_DTYPE_F32;
            else if (strcmp(v, "f16") == 0) kv_dtype = DYNMOE_DTYPE_F16;
            else if (strcmp(v, "bf16") == 0) kv_dtype = DYNMOE_DTYPE_BF16;
            else ex_usage_error("--kv-dtype must be f32, f16 or bf16, got '%s'", v);
        }
        else if (ex_option(argc, argv, &i, "--stop", &v)) {
            if (n_stop == MAX_STOP_TOKENS - 1) ex_usage_error("too many --stop tokens");
            stop[n_stop++] = (int32_t)ex_parse_int(v, "--stop", INT32_MIN, INT32_MAX);
        } else if (strcmp(argv[i], "--ignore-eos") == 0) ignore_eos = 1;
        else if (argv[i][0] == '-' && argv[i][1] == '-') ex_usage_error("unknown option '%s'", argv[i]);
        else positional[n_positional++] = argv[i];
    }
    if (n_positional < 1) ex_usage_error("missing MODEL_DIR");

    model = ex_load_model(positional[0], rargs.threads);
    EX_TRY(dynmoe_model_get_info(model, &info));
    if (!ignore_eos && info.eos_token_id >= 0 && info.eos_token_id < info.vocab_size) stop[n_stop++] = info.eos_token_id;
    prompt = ex_tokens_or_default(n_positional, positional, 1, info.vocab_size, &n_prompt);
    routing = ex_make_routing(model, &rargs);

    printf("model: %s, %d MoE layers x %d experts\n", info.family, (int)info.num_moe_layers, (int)info.num_experts);
    ex_print_routing(stdout, &rargs);
    if (sampling.temperature > 0)
        printf("sampling: temperature %g, top_k %d, top_p %g, seed %llu\n", (double)sampling.temperature,
               (int)sampling.top_k, (double)sampling.top_p, (unsigned long long)sampling.seed);
    else
        printf("sampling: greedy\n");

    sp = dynmoe_session_params_default();
    sp.capacity = capacity;
    sp.routing = routing;
    sp.kv_dtype = kv_dtype;
    EX_TRY(dynmoe_session_create(model, &sp, &session));

    printf("prompt:");
    for (m = 0; m < n_prompt; ++m) printf(" %d", (int)prompt[m]);
    printf("\ngenerated:");
    fflush(stdout);
    generated = (int32_t *)ex_calloc((size_t)max_new, sizeof *generated);
    EX_TRY(dynmoe_session_generate(session, prompt, (int32_t)n_prompt, max_new, &sampling, stop, n_stop, NULL,
                                   on_token, NULL, generated, (size_t)max_new, &steps));
    printf("\n%d tokens generated\n", (int)steps);

    EX_TRY(dynmoe_session_get_stats(session, &stats));
    EX_TRY(dynmoe_stats_get_summary(stats, &summary));
    printf("\nsession routing over %lld token positions (prompt + generated):\n", (long long)summary.tokens);
    printf("  mean experts/token %.3f, activated parameters/token %s (%.2f%% of all)\n",
           summary.mean_experts_per_token, ex_human_count(summary.activated_parameters_per_token, buf, sizeof buf),
           100.0 * summary.activated_parameter_fraction);
    moe_layers = ex_moe_layers(model, &n_moe);
    printf("  mean experts/token per MoE layer:");
    for (m = 0; m < n_moe; ++m) printf(" L%d=%.3f", (int)moe_layers[m], ex_layer_mean_k(stats, moe_layers[m]));
    printf("\n");

    EX_TRY(dynmoe_session_get_timing(session, &timing));
    printf("\ntime in %lld forward passes (%lld positions): %.3f ms\n", (long long)timing.passes,
           (long long)timing.tokens, 1e3 * timing.total_seconds);
    printf("  attention %.3f ms, MoE blocks %.3f ms, dense MLPs %.3f ms, LM head %.3f ms, other %.3f ms\n",
           1e3 * timing.attention_seconds, 1e3 * timing.moe_seconds, 1e3 * timing.dense_seconds,
           1e3 * timing.head_seconds, 1e3 * timing.other_seconds);

    free(moe_layers);
    free(generated);
    dynmoe_stats_free(stats);
    dynmoe_session_free(session);
    dynmoe_routing_free(routing);
    dynmoe_model_free(model);
    free(prompt);
    free(positional);
    return 0;
}
