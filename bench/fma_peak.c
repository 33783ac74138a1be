/*
 * fma_peak.c — the core's f32 FMA peak: ten independent chains of 8-lane AVX2 FMAs (enough to
 * hide the FMA latency on two pipes), so prefill GFLOP/s can be read as a fraction of it.
 *   cc -O2 -mavx2 -mfma bench/fma_peak.c -o build/bin/fma_peak && build/bin/fma_peak
 */
#define _POSIX_C_SOURCE 199309L
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    __m256 a0 = _mm256_set1_ps(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;
    const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
    const long n = 300000000;
    float out[8];
    double t = now(), seconds;
    long i;
    for (i = 0; i < n; i++) {
        a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c); a2 = _mm256_fmadd_ps(a2, m, c);
        a3 = _mm256_fmadd_ps(a3, m, c); a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
        a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c); a8 = _mm256_fmadd_ps(a8, m, c);
        a9 = _mm256_fmadd_ps(a9, m, c);
        /* keep the chains in registers and alive */
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7), "+x"(a8),
                         "+x"(a9));
    }
    seconds = now() - t;
    _mm256_storeu_ps(out, _mm256_add_ps(a0, a9));
    printf("{\"fma_peak_gflops_per_core\": %.1f, \"check\": %g}\n", n * 10.0 * 16 / seconds / 1e9, out[0]);
    return 0;
}
