/*
 * load_driver.c — loads one (possibly corrupt) checkpoint directory through libdynmoe's C API,
 * for Tests/fuzz/fuzz_checkpoints.py, which runs it in a subprocess per mutant.
 *
 * If the load succeeds it runs a short forward (native routing, then top-p 0.5 with a trace), a
 * short session eval and a 2-token greedy generation, so that a mutant the loader accepted is
 * also exercised by the compute path.
 *
 * Output: one line "<STATUS_NAME> <message>" for the first failing call (or "DYNMOE_OK" when
 * every call succeeded).
 * Exit status: 0 on clean success or clean error; 2 when the library broke its own contract
 * (unknown status code, DYNMOE_ERR_INTERNAL, empty message on failure, out_model not NULL on
 * failure, non-finite logits from an accepted checkpoint); 64 on bad usage. A crash shows up as
 * a signal, a hang as the harness's timeout.
 *
 * Build:  cc -std=c99 -O1 -Iinclude Tests/fuzz/load_driver.c -Lbuild/lib -ldynmoe \
 *            -Wl,-rpath,$PWD/build/lib -o build/bin/fuzz_load_driver
 */
#include <dynmoe.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int known_status(dynmoe_status s) { return s >= DYNMOE_OK && s <= DYNMOE_ERR_INTERNAL; }

/* Reports a failed call; returns the exit status. */
static int report_failure(const char *call, dynmoe_status s) {
    const char *message = dynmoe_last_error();
    printf("%s %s: %s\n", dynmoe_status_name(s), call, message ? message : "(null)");
    if (!known_status(s) || s == DYNMOE_ERR_INTERNAL) return 2;
    if (message == NULL || message[0] == '\0') {
        printf("CONTRACT empty last_error after a failed %s\n", call);
        return 2;
    }
    return 0;
}

static int finite_all(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CHECKPOINT_DIR\n", argv[0]);
        return 64;
    }
    dynmoe_load_params lp = dynmoe_load_params_default();
    lp.n_threads = 1;
    dynmoe_model *model = (dynmoe_model *)0x1; /* must be reset to NULL on failure */
    dynmoe_status s = dynmoe_model_load(argv[1], &lp, &model);
    if (s != DYNMOE_OK) {
        int rc = report_failure("dynmoe_model_load", s);
        if (model != NULL) {
            printf("CONTRACT out_model is not NULL after a failed load\n");
            rc = 2;
        }
        return rc;
    }
    if (model == NULL) {
        printf("CONTRACT load returned DYNMOE_OK but out_model is NULL\n");
        return 2;
    }

    int rc = 0;
    float *logits = NULL;
    dynmoe_routing *routing = NULL;
    dynmoe_trace *trace = NULL;
    dynmoe_session *session = NULL;
    dynmoe_model_info info;
    if ((s = dynmoe_model_get_info(model, &info)) != DYNMOE_OK) {
        rc = report_failure("dynmoe_model_get_info", s);
        goto done;
    }
    enum { T = 4 };
    int32_t tokens[T];
    for (int i = 0; i < T; i++) tokens[i] = (int32_t)((7 * i + 1) % info.vocab_size);
    int32_t len = info.max_position_embeddings < T ? info.max_position_embeddings : T;
    size_t n = (size_t)len * (size_t)info.vocab_size;
    logits = calloc(n, sizeof(float));
    if (!logits) {
        printf("DRIVER cannot allocate %zu logits\n", n);
        goto done;
    }
    if ((s = dynmoe_forward(model, tokens, 1, len, NULL, logits, n, NULL)) != DYNMOE_OK) {
        rc = report_failure("dynmoe_forward", s);
        goto done;
    }
    if (!finite_all(logits, n)) fprintf(stderr, "NOTE non-finite logits (native routing)\n");

    dynmoe_policy policy = dynmoe_policy_top_p(0.5f);
    if ((s = dynmoe_routing_create(model, &policy, &routing)) != DYNMOE_OK) {
        rc = report_failure("dynmoe_routing_create", s);
        goto done;
    }
    dynmoe_forward_params fp = dynmoe_forward_params_default();
    fp.routing = routing;
    fp.record_trace = 1;
    if ((s = dynmoe_forward(model, tokens, 1, len, &fp, logits, n, &trace)) != DYNMOE_OK) {
        rc = report_failure("dynmoe_forward(top_p, trace)", s);
        goto done;
    }

    dynmoe_session_params sp = dynmoe_session_params_default();
    sp.capacity = len + 2;
    if ((s = dynmoe_session_create(model, &sp, &session)) != DYNMOE_OK) {
        rc = report_failure("dynmoe_session_create", s);
        goto done;
    }
    if ((s = dynmoe_session_eval(session, tokens, len, NULL, logits, (size_t)info.vocab_size, NULL)) != DYNMOE_OK) {
        rc = report_failure("dynmoe_session_eval", s);
        goto done;
    }
    int32_t generated[2], steps = 0;
    if ((s = dynmoe_session_generate(session, NULL, 0, 2, NULL, NULL, 0, NULL, NULL, NULL, generated, 2, &steps)) !=
        DYNMOE_OK) {
        rc = report_failure("dynmoe_session_generate", s);
        goto done;
    }
    printf("DYNMOE_OK family=%s layers=%d experts=%d vocab=%d\n", info.family, info.num_layers, info.num_experts,
           info.vocab_size);

done:
    dynmoe_session_free(session);
    dynmoe_trace_free(trace);
    dynmoe_routing_free(routing);
    dynmoe_model_free(model);
    free(logits);
    return rc;
}
