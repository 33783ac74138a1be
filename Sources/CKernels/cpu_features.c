/*
 * What the CPU adds at run time to what the build was compiled for (see include/ckernels.h).
 */
#include "ckernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <cpuid.h>
#include <stdlib.h>
#include <string.h>

/* DYNMOE_MAX_ISA=avx2 keeps the AVX-512 kernels off: to compare kernels on one machine, or to get
 * what a CPU without AVX-512 computes, bit for bit. Any other value changes nothing. */
static int capped_below_avx512(void) {
    const char *cap = getenv("DYNMOE_MAX_ISA");
    return cap != NULL && strcmp(cap, "avx2") == 0;
}

/* Whether the CPU runs AVX-512 F + BW and the OS saves its registers (XCR0: SSE, AVX, opmask and
 * both halves of the upper ZMM state). */
static int cpu_runs_avx512(void) {
    unsigned a, b, c, d, xcr0_low, xcr0_high;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    (void)xcr0_high;
    if ((xcr0_low & 0xE6) != 0xE6) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b & bit_AVX512F) && (b & bit_AVX512BW);
}

int ckernels_avx512_kernels(void) {
    static int runs = -1; /* every thread computes the same answer, so a race is harmless */
    int known = __atomic_load_n(&runs, __ATOMIC_RELAXED);
    if (known < 0) {
        known = !capped_below_avx512() && cpu_runs_avx512();
        __atomic_store_n(&runs, known, __ATOMIC_RELAXED);
    }
    return known;
}

#else

int ckernels_avx512_kernels(void) { return 0; }

#endif
