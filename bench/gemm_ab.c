/*
 * gemm_ab: variants of the bf16 prefill kernel (Sources/CKernels/gemm_bf16.c) against each other
 * in one process, on cold or hot weights. Built and run by bench/gemm_ab.sh, which compiles each
 * variant file with its exported names renamed (ckernels_gemm_bf16* -> vN_gemm*) and writes
 * gemm_ab_variants.h, the list of them.
 *
 * Why one process: on the project VM the same binary moved 30-50 % between runs, so variants
 * measured in separate runs of a driver were "even" where, run in turns in one process, one
 * was 20-40 % faster every round (bench/NOTES.md, "The few-token tile for up to 16 tokens").
 *
 * Usage: gemm_ab M ROWS K [ROUNDS [MIB]]
 *   M tokens (activation rows), ROWS x K bf16 weight matrices filling MIB MiB (default 1024: each
 *   read once per pass, from memory; a size that fits in L2, e.g. 1, keeps them hot). Each round
 *   runs every variant over all matrices, one matrix per kernel call, the order rotating from
 *   round to round (default 8 rounds). First checks every variant's output against variant 0's,
 *   bit for bit, on the first matrix.
 * Prints one line per variant: mean and best GFLOP/s over the rounds.
 *
 * Memory as in the library: activations and outputs start on a cache line (its Scratch
 * buffers; unaligned 64-byte loads of activation rows cost ~25 %), weights 16 bytes past one
 * (malloc's large blocks), as misaligned as tensors in a safetensors file usually are (the
 * data starts 8 bytes past a multiple of 8, so 8-56 bytes past a line).
 */
#define _ISOC11_SOURCE
#define _POSIX_C_SOURCE 200809L
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*gemm_fn)(const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k, ptrdiff_t row_begin,
                       ptrdiff_t row_end, float *y, ptrdiff_t ldy);
#include "gemm_ab_variants.h" /* VARIANTS, variant_names[], variant_fns[] */

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static long parse(const char *s, const char *what, long lo, long hi) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "gemm_ab: %s must be an integer in [%ld, %ld], got '%s'\n", what, lo, hi, s);
        exit(1);
    }
    return v;
}

int main(int argc, char **argv) {
    long m, rows, k, rounds = 8, mib = 1024;
    size_t per, count, i;
    uint16_t *w;
    float *x, *y, *reference;
    double sum[VARIANTS] = {0}, best[VARIANTS] = {0};
    int v, r;
    if (argc < 4 || argc > 6) {
        fprintf(stderr, "usage: gemm_ab M ROWS K [ROUNDS [MIB]]\n");
        return 1;
    }
    m = parse(argv[1], "M", 1, 4096);
    rows = parse(argv[2], "ROWS", 1, 1 << 20);
    k = parse(argv[3], "K", 1, 1 << 20);
    if (argc > 4) rounds = parse(argv[4], "ROUNDS", 1, 100000);
    if (argc > 5) mib = parse(argv[5], "MIB", 1, 1 << 20);
    per = (size_t)rows * (size_t)k;
    count = ((size_t)mib << 20) / (per * 2);
    if (count == 0) count = 1;
    w = (uint16_t *)malloc(count * per * 2);
    x = (float *)aligned_alloc(64, (sizeof(float) * (size_t)(m * k) + 63) / 64 * 64);
    y = (float *)aligned_alloc(64, (sizeof(float) * (size_t)(m * rows) + 63) / 64 * 64);
    reference = (float *)malloc(sizeof(float) * (size_t)(m * rows));
    if (!w || !x || !y || !reference) {
        fprintf(stderr, "gemm_ab: out of memory\n");
        return 1;
    }
    srand(1);
    /* bf16 words of floats in [-1, 1): sign, exponent 117-126, random mantissa */
    for (i = 0; i < count * per; ++i)
        w[i] = (uint16_t)((rand() & 1) << 15 | (117 + rand() % 10) << 7 | (rand() & 0x7F));
    for (i = 0; i < (size_t)(m * k); ++i) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;

    for (v = 0; v < VARIANTS; ++v) {
        long differ = 0;
        memset(y, 0, sizeof(float) * (size_t)(m * rows));
        if (!variant_fns[v](x, k, m, w, k, 0, rows, v ? y : reference, rows)) {
            fprintf(stderr, "gemm_ab: %s has no kernel for this build or CPU\n", variant_names[v]);
            return 1;
        }
        if (v == 0) continue;
        for (i = 0; i < (size_t)(m * rows); ++i) differ += memcmp(&y[i], &reference[i], sizeof(float)) != 0;
        printf("%s: %s (%ld of %ld outputs differ from %s)\n", variant_names[v], differ ? "other bits" : "same bits",
               differ, m * rows, variant_names[0]);
    }
    for (r = 0; r < rounds; ++r) {
        int s;
        for (s = 0; s < VARIANTS; ++s) {
            double t, gflops;
            v = (s + r) % VARIANTS;
            t = now_seconds();
            for (i = 0; i < count; ++i) variant_fns[v](x, k, m, w + i * per, k, 0, rows, y, rows);
            t = now_seconds() - t;
            gflops = 2.0 * (double)m * (double)per * (double)count / t * 1e-9;
            sum[v] += gflops;
            if (gflops > best[v]) best[v] = gflops;
        }
    }
    printf("m %ld, %ld x %ld bf16, %zu matrices (%.0f MiB), %ld rounds:\n", m, rows, k, count,
           (double)(count * per * 2) / 1048576.0, rounds);
    for (v = 0; v < VARIANTS; ++v)
        printf("%s: mean %.1f best %.1f GFLOP/s\n", variant_names[v], sum[v] / (double)rounds, best[v]);
    free(w);
    free(x);
    free(y);
    free(reference);
    return 0;
}
