/*
 * fma_peak.c — the core's f32 FMA peak, so prefill GFLOP/s can be read as a fraction of it: ten
 * independent chains of FMAs (enough to hide the FMA latency on two pipes), 8 lanes wide (AVX2)
 * and, when the CPU runs AVX-512 F, 16 lanes wide. The peak is the faster of the two: the
 * prefill kernel uses AVX-512 where the CPU has it (Sources/CKernels/gemm_bf16.c).
 *   cc -O2 -mavx2 -mfma bench/fma_peak.c -o build/bin/fma_peak && build/bin/fma_peak
 * (bench/run.py builds and runs it and prints prefill GFLOP/s as a share of the peak.)
 */
#define _POSIX_C_SOURCE 199309L
#include <cpuid.h>
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

enum { ITERATIONS = 200000000, CHAINS = 10 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* GFLOP/s of CHAINS chains of one FMA type; the empty asm keeps the chains in registers and alive. */
#define FMA_CHAINS(VEC, SET1, FMADD, STORE, LANES, CHECK)                                           \
    do {                                                                                          \
        VEC a0 = SET1(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0; \
        const VEC m = SET1(0.9999999f), c = SET1(1e-7f);                                          \
        float out[LANES];                                                                         \
        double t = now();                                                                         \
        for (long i = 0; i < ITERATIONS; i++) {                                                   \
            a0 = FMADD(a0, m, c); a1 = FMADD(a1, m, c); a2 = FMADD(a2, m, c); a3 = FMADD(a3, m, c); \
            a4 = FMADD(a4, m, c); a5 = FMADD(a5, m, c); a6 = FMADD(a6, m, c); a7 = FMADD(a7, m, c); \
            a8 = FMADD(a8, m, c); a9 = FMADD(a9, m, c);                                           \
            __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), \
                             "+v"(a7), "+v"(a8), "+v"(a9));                                       \
        }                                                                                         \
        double seconds = now() - t;                                                               \
        STORE(out, a0);                                                                           \
        *(CHECK) = out[0];                                                                        \
        return (double)ITERATIONS * CHAINS * LANES * 2 / seconds / 1e9;                           \
    } while (0)

static double avx2_gflops(float *check) { FMA_CHAINS(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps, 8, check); }

__attribute__((target("avx512f"))) static double avx512_gflops(float *check) {
    FMA_CHAINS(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps, 16, check);
}

/* AVX-512 F on the CPU, with the OS saving the opmask and ZMM registers (XCR0 bits 1-2, 5-7). */
static int cpu_runs_avx512(void) {
    unsigned a, b, c, d, low, high;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return 0;
    __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    (void)high;
    return (low & 0xE6) == 0xE6 && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & bit_AVX512F);
}

int main(void) {
    float check_avx2 = 0, check_avx512 = 0;
    double avx2 = avx2_gflops(&check_avx2), avx512 = cpu_runs_avx512() ? avx512_gflops(&check_avx512) : 0;
    printf("{\"fma_peak_gflops_per_core\": %.1f, \"avx2_gflops\": %.1f, \"avx512_gflops\": %.1f, \"check\": %g}\n",
           avx512 > avx2 ? avx512 : avx2, avx2, avx512, check_avx2 + check_avx512);
    return 0;
}
