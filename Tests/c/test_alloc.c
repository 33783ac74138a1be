/*
 * test_alloc.c — a decode step allocates no heap memory.
 *
 * This program defines malloc, calloc, realloc, free, posix_memalign, aligned_alloc and memalign
 * itself (forwarding to glibc's __libc_* entry points), so every allocation libdynmoe.so makes —
 * from Swift arrays, closures boxed by the runtime, anything — lands here and is counted while
 * `g_counting` is set, on every thread (the pool's workers included).
 *
 * For every fixture in Tests/Fixtures and 1 and 2 threads it prefills a prompt, warms up with a
 * few decode steps (scratch memory grows to its working size then), and counts the allocations
 * of further decode steps through dynmoe_session_eval: native, top-k and top-p routing as the
 * session's default, the same plans passed per call, a per-layer plan, one and two sequences,
 * and an observer. Each must allocate nothing. dynmoe_session_generate is checked per step,
 * greedy and sampled (temperature, top-k, top-p): a call of 12 steps must allocate no more than
 * a call of 4.
 *
 * With a second argument, a checkpoint with many experts (make test-c writes the benchmark's
 * tiny Qwen3-MoE for it), it also decodes 16 sequences at once over its 64 experts per layer.
 *
 * Usage:  test_alloc PATH/TO/Tests/Fixtures [CHECKPOINT_WITH_MANY_EXPERTS]
 * Prints every failed check, then "N passed, M failed"; exits 1 on failure.
 */
#define _GNU_SOURCE

#include <dynmoe.h>

#include <errno.h>
#include <execinfo.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Counting allocator                                                                          */
/* ------------------------------------------------------------------------------------------ */

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *pointer, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);
extern void __libc_free(void *pointer);

static atomic_int g_counting;
static atomic_long g_allocations;
/* With DYNMOE_ALLOC_BACKTRACE set, each counted allocation prints its call stack to stderr
 * (resolve the addresses with addr2line -f -C -e build/lib/libdynmoe.so.0). */
static int g_print_backtraces;

static void count_one(void) {
    if (atomic_load_explicit(&g_counting, memory_order_relaxed)) {
        atomic_fetch_add_explicit(&g_allocations, 1, memory_order_relaxed);
        if (g_print_backtraces) {
            void *frames[24];
            int n = backtrace(frames, 24);
            fputs("-- counted allocation:\n", stderr);
            backtrace_symbols_fd(frames, n, 2);  /* writes directly, allocates nothing */
        }
    }
}

void *malloc(size_t size) { count_one(); return __libc_malloc(size); }
void *calloc(size_t count, size_t size) { count_one(); return __libc_calloc(count, size); }
void *realloc(void *pointer, size_t size) { count_one(); return __libc_realloc(pointer, size); }
void free(void *pointer) { __libc_free(pointer); }
void *memalign(size_t alignment, size_t size) { count_one(); return __libc_memalign(alignment, size); }
void *aligned_alloc(size_t alignment, size_t size) { count_one(); return __libc_memalign(alignment, size); }

int posix_memalign(void **out, size_t alignment, size_t size) {
    count_one();
    if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0) return EINVAL;
    void *p = __libc_memalign(alignment, size);
    if (p == NULL) return ENOMEM;
    *out = p;
    return 0;
}

static void start_counting(void) {
    atomic_store(&g_allocations, 0);
    atomic_store(&g_counting, 1);
}

static long stop_counting(void) {
    atomic_store(&g_counting, 0);
    return atomic_load(&g_allocations);
}

/* ------------------------------------------------------------------------------------------ */
/* Checks                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static int g_passed, g_failed;

static void check(int ok, const char *what, const char *fixture, int threads, long detail) {
    if (ok) {
        g_passed++;
        return;
    }
    g_failed++;
    printf("FAIL %s [%s, %d thread%s]: %ld\n", what, fixture, threads, threads == 1 ? "" : "s", detail);
}

static int ok_status(dynmoe_status status, const char *what) {
    if (status == DYNMOE_OK) return 1;
    printf("FAIL %s: %s: %s\n", what, dynmoe_status_name(status), dynmoe_last_error());
    g_failed++;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Decode steps                                                                                */
/* ------------------------------------------------------------------------------------------ */

enum { PROMPT = 5, WARM_UP = 3, MEASURED = 8, CAPACITY = 64, MAX_SEQUENCES = 16 };

typedef struct {
    dynmoe_model *model;
    int32_t vocab;
    float *logits;
} fixture_state;

static void count_experts(const dynmoe_routing_event *event, void *user_data) {
    long *total = user_data;
    for (int32_t t = 0; t < event->num_tokens; t++) *total += event->counts[t];
}

/*
 * Prefills a session of `sequences` sequences, runs WARM_UP decode steps, then MEASURED more
 * while counting; returns the allocations counted (-1 on an API failure). `default_routing`
 * becomes the session's default, `call_routing` is passed to every call (either may be NULL).
 */
static long decode_allocations(fixture_state *f, int32_t sequences, const dynmoe_routing *default_routing,
                               const dynmoe_routing *call_routing, int observe) {
    dynmoe_session_params sp = dynmoe_session_params_default();
    sp.n_sequences = sequences;
    sp.capacity = CAPACITY;
    sp.routing = default_routing;
    dynmoe_session *session = NULL;
    if (!ok_status(dynmoe_session_create(f->model, &sp, &session), "session_create")) return -1;

    dynmoe_forward_params fp = dynmoe_forward_params_default();
    fp.routing = call_routing;
    long experts = 0;
    if (observe) {
        fp.observer = count_experts;
        fp.observer_user_data = &experts;
    }
    int32_t tokens[MAX_SEQUENCES * PROMPT];
    for (int i = 0; i < MAX_SEQUENCES * PROMPT; i++) tokens[i] = (int32_t)((7 * i + 3) % f->vocab);
    size_t capacity = (size_t)sequences * (size_t)f->vocab;
    long counted = -1;
    if (!ok_status(dynmoe_session_eval(session, tokens, PROMPT, &fp, f->logits, capacity, NULL), "prefill")) goto done;
    for (int step = 0; step < WARM_UP + MEASURED; step++) {
        if (step == WARM_UP) start_counting();
        int32_t next[MAX_SEQUENCES];
        for (int b = 0; b < MAX_SEQUENCES; b++) next[b] = (int32_t)((step * 11 + 13 * b + 1) % f->vocab);
        dynmoe_status status = dynmoe_session_eval(session, next, 1, &fp, f->logits, capacity, NULL);
        if (status != DYNMOE_OK) {
            stop_counting();
            ok_status(status, "decode step");
            goto done;
        }
    }
    counted = stop_counting();
    if (observe && experts == 0) {
        printf("FAIL observer saw no routing decisions\n");
        g_failed++;
    }
done:
    dynmoe_session_free(session);
    return counted;
}

/* Allocations of one dynmoe_session_generate call of `steps` steps after a prompt; greedy, or
 * sampled at temperature 0.8 with top_k (0 = off) and top_p. */
static long generate_allocations(fixture_state *f, int32_t steps, int sampled, int32_t top_k, float top_p) {
    dynmoe_session_params sp = dynmoe_session_params_default();
    sp.capacity = CAPACITY;
    dynmoe_session *session = NULL;
    if (!ok_status(dynmoe_session_create(f->model, &sp, &session), "session_create")) return -1;
    int32_t prompt[PROMPT], out[32];
    for (int i = 0; i < PROMPT; i++) prompt[i] = (int32_t)((3 * i + 1) % f->vocab);
    dynmoe_sampling_params sampling = dynmoe_sampling_params_default();
    if (sampled) {
        sampling.temperature = 0.8f;
        sampling.top_k = top_k;
        sampling.top_p = top_p;
        sampling.seed = 5;
    }
    long counted = -1;
    /* The first call grows the scratch memory; the counted one continues from its logits. */
    if (ok_status(dynmoe_session_generate(session, prompt, PROMPT, 4, &sampling, NULL, 0, NULL, NULL, NULL, out, 32, NULL),
                  "generate (warm-up)")) {
        start_counting();
        dynmoe_status status = dynmoe_session_generate(session, NULL, 0, steps, &sampling, NULL, 0, NULL, NULL, NULL,
                                                       out, 32, NULL);
        counted = stop_counting();
        if (!ok_status(status, "generate")) counted = -1;
    }
    dynmoe_session_free(session);
    return counted;
}

/* Loads a checkpoint on `threads` threads with room for MAX_SEQUENCES rows of logits; 0 on failure. */
static int open_checkpoint(const char *path, int threads, fixture_state *f) {
    dynmoe_load_params lp = dynmoe_load_params_default();
    lp.n_threads = threads;
    *f = (fixture_state){0};
    if (!ok_status(dynmoe_model_load(path, &lp, &f->model), path)) return 0;
    dynmoe_model_info info;
    if (!ok_status(dynmoe_model_get_info(f->model, &info), "model_get_info")) {
        dynmoe_model_free(f->model);
        return 0;
    }
    f->vocab = info.vocab_size;
    f->logits = malloc(MAX_SEQUENCES * (size_t)f->vocab * sizeof(float));
    return 1;
}

static void close_checkpoint(fixture_state *f) {
    free(f->logits);
    dynmoe_model_free(f->model);
}

static void check_fixture(const char *root, const char *name, int threads) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s/model", root, name);
    fixture_state f;
    if (!open_checkpoint(path, threads, &f)) return;

    dynmoe_policy native = dynmoe_policy_native(), top_k = dynmoe_policy_top_k(2), top_p = dynmoe_policy_top_p(0.4f);
    dynmoe_routing *plans[3] = {NULL, NULL, NULL};
    const dynmoe_policy *policies[3] = {&native, &top_k, &top_p};
    const char *names[3] = {"native", "top-k 2", "top-p 0.4"};
    for (int i = 0; i < 3; i++) {
        if (!ok_status(dynmoe_routing_create(f.model, policies[i], &plans[i]), "routing_create")) goto free_plans;
    }
    dynmoe_routing *mixed = NULL;
    if (!ok_status(dynmoe_routing_create(f.model, &top_p, &mixed), "routing_create")) goto free_plans;
    int32_t moe_layers[64];
    size_t n_moe = 0;
    if (!ok_status(dynmoe_model_get_moe_layers(f.model, moe_layers, 64, &n_moe), "get_moe_layers")) goto free_mixed;
    if (n_moe > 0 && !ok_status(dynmoe_routing_set_layer(mixed, moe_layers[0], &top_k), "routing_set_layer")) goto free_mixed;

    char what[128];
    for (int i = 0; i < 3; i++) {
        snprintf(what, sizeof what, "decode allocations, %s as the session default", names[i]);
        long n = decode_allocations(&f, 1, plans[i], NULL, 0);
        check(n == 0, what, name, threads, n);
        snprintf(what, sizeof what, "decode allocations, %s passed per call", names[i]);
        n = decode_allocations(&f, 1, NULL, plans[i], 0);
        check(n == 0, what, name, threads, n);
    }
    long n = decode_allocations(&f, 1, mixed, NULL, 0);
    check(n == 0, "decode allocations, per-layer plan", name, threads, n);
    n = decode_allocations(&f, 2, plans[2], NULL, 0);
    check(n == 0, "decode allocations, two sequences", name, threads, n);
    n = decode_allocations(&f, 1, NULL, NULL, 1);
    check(n == 0, "decode allocations, with an observer", name, threads, n);

    const char *samplings[4] = {"greedy", "temperature", "temperature + top-k", "temperature + top-p"};
    const int32_t top_ks[4] = {0, 0, 3, 0};
    const float top_ps[4] = {1.0f, 1.0f, 1.0f, 0.7f};
    for (int i = 0; i < 4; i++) {
        long short_run = generate_allocations(&f, 4, i > 0, top_ks[i], top_ps[i]);
        long long_run = generate_allocations(&f, 12, i > 0, top_ks[i], top_ps[i]);
        snprintf(what, sizeof what, "generate (%s): allocations of 12 steps over 4 steps", samplings[i]);
        check(short_run >= 0 && long_run >= 0 && long_run <= short_run, what, name, threads, long_run - short_run);
    }

free_mixed:
    dynmoe_routing_free(mixed);
free_plans:
    for (int i = 0; i < 3; i++) dynmoe_routing_free(plans[i]);
    close_checkpoint(&f);
}

/*
 * A checkpoint with many experts (the benchmark's tiny Qwen3-MoE: 64 per layer): a batch of
 * sequences spreads over most of them, so one region holds ~130 products and more work items
 * than fit the stack; the session's workspace must hold its schedule.
 */
static void check_many_experts(const char *path, int threads) {
    fixture_state f;
    if (!open_checkpoint(path, threads, &f)) return;
    long n = decode_allocations(&f, MAX_SEQUENCES, NULL, NULL, 0);
    check(n == 0, "decode allocations, 16 sequences over 64 experts", path, threads, n);
    n = decode_allocations(&f, 1, NULL, NULL, 0);
    check(n == 0, "decode allocations, one sequence over 64 experts", path, threads, n);
    close_checkpoint(&f);
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: %s PATH/TO/Tests/Fixtures [CHECKPOINT_WITH_MANY_EXPERTS]\n", argv[0]);
        return 2;
    }
    g_print_backtraces = getenv("DYNMOE_ALLOC_BACKTRACE") != NULL;
    if (g_print_backtraces) {
        void *frame[1];
        backtrace(frame, 1);  /* loads the unwinder now, not while counting */
    }
    /* The counter itself must work, or every check below would pass vacuously. */
    start_counting();
    void *volatile probe = malloc(24);
    long seen = stop_counting();
    free(probe);
    check(seen == 1, "the counting allocator counts a malloc", "-", 1, seen);

    const char *fixtures[] = {"dynamic-moe-tiny", "mixtral-tiny", "olmoe-tiny", "qwen2moe-tiny", "qwen3moe-tiny-bf16"};
    for (size_t i = 0; i < sizeof fixtures / sizeof fixtures[0]; i++) {
        for (int threads = 1; threads <= 2; threads++) check_fixture(argv[1], fixtures[i], threads);
    }
    if (argc == 3) {
        for (int threads = 1; threads <= 2; threads++) check_many_experts(argv[2], threads);
    }
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
