/*
 * sampling.c — what token sampling costs in dynmoe_session_generate: tokens per second of
 * greedy, temperature and temperature + top-p generation, one after the other, repeated.
 *
 * Build:  cc -O2 -std=c99 -Iinclude bench/sampling.c -o build/bin/sampling -Lbuild/lib -ldynmoe \
 *            -Wl,-rpath,$PWD/build/lib
 * Run:    build/bin/sampling bench/out/qwen3moe-1.7b [THREADS [TOP_K_ROUTING [REPEATS]]]
 *         (defaults 2 threads, top-k 1 routing so that the forward is short and sampling shows,
 *          4 repeats; each line is one generate call of 64 tokens after an 8-token prompt)
 */
#define _POSIX_C_SOURCE 200809L

#include <dynmoe.h>

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int fail(const char *what) {
    fprintf(stderr, "sampling: %s: %s\n", what, dynmoe_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CHECKPOINT [THREADS [TOP_K_ROUTING [REPEATS]]]\n", argv[0]);
        return 2;
    }
    dynmoe_load_params lp = dynmoe_load_params_default();
    lp.n_threads = argc > 2 ? atoi(argv[2]) : 2;
    int32_t k = argc > 3 ? atoi(argv[3]) : 1;
    int repeats = argc > 4 ? atoi(argv[4]) : 4;
    dynmoe_model *model = NULL;
    if (dynmoe_model_load(argv[1], &lp, &model) != DYNMOE_OK) return fail("load");
    dynmoe_policy policy = dynmoe_policy_top_k(k);
    dynmoe_routing *routing = NULL;
    if (dynmoe_routing_create(model, &policy, &routing) != DYNMOE_OK) return fail("routing");
    dynmoe_session_params sp = dynmoe_session_params_default();
    sp.capacity = 256;
    sp.routing = routing;

    const char *names[3] = {"greedy", "temperature 0.8", "temperature 0.8, top-p 0.9"};
    for (int rep = 0; rep < repeats; rep++) {
        for (int mode = 0; mode < 3; mode++) {
            dynmoe_session *session = NULL;
            if (dynmoe_session_create(model, &sp, &session) != DYNMOE_OK) return fail("session");
            int32_t prompt[8] = {1, 2, 3, 4, 5, 6, 7, 8}, out[64];
            dynmoe_sampling_params sampling = dynmoe_sampling_params_default();
            if (mode >= 1) {
                sampling.temperature = 0.8f;
                sampling.seed = 42;
            }
            if (mode == 2) sampling.top_p = 0.9f;
            /* The prompt and two tokens first, so the timed call is decode steps only. */
            if (dynmoe_session_generate(session, prompt, 8, 2, &sampling, NULL, 0, NULL, NULL, NULL, out, 64, NULL))
                return fail("generate");
            double start = now();
            if (dynmoe_session_generate(session, NULL, 0, 64, &sampling, NULL, 0, NULL, NULL, NULL, out, 64, NULL))
                return fail("generate");
            printf("%-28s %7.2f tok/s\n", names[mode], 64 / (now() - start));
            dynmoe_session_free(session);
        }
    }
    dynmoe_routing_free(routing);
    dynmoe_model_free(model);
    return 0;
}
