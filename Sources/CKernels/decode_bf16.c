/*
 * Decode product for bf16 weights on AVX-512 cores (see include/ckernels.h).
 *
 * Decode reads each weight once per token, so what counts is how fast the weights stream in, not
 * the arithmetic. Like the Swift kernel, it reads a product's rows as 4 streams a quarter of the
 * rows apart, each prefetched 1 KiB ahead; with 16-lane registers a step takes a whole cache line
 * of each stream. bench --alternate (decode steps switching between this and the Swift kernel,
 * Intel Xeon VM, 8 passes of 64 steps per run): step time 0.979-0.999 of the Swift kernel's in
 * all 17 runs (1 and 2 threads, native and top-k 2; identical arms give 0.986-1.025); prefetching
 * 512 B or 2 KiB ahead instead of 1 KiB: 1.001-1.015.
 *
 * Layout: x is in the 32-column paired layout of AVX-512 CPUs (per 32 columns the 16 even ones,
 * then the 16 odd ones; see MatMul.prepare), so a 64-byte load of 32 weights pairs with two
 * 16-float loads of x: the even columns are the low halves of its 32-bit lanes (shift left by 16),
 * the odd ones the high halves (mask).
 */
#include "ckernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw"))), apply_to = function)

enum { PREFETCH_BYTES = 1024 };

static inline __attribute__((always_inline)) float d_bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* acc_even += (even columns of u) * xe, acc_odd += (odd columns of u) * xo */
static inline __attribute__((always_inline)) void d_accumulate(__m512i u, __m512 xe, __m512 xo, __m512 *acc_even,
                                                               __m512 *acc_odd) {
    const __m512i high_halves = _mm512_set1_epi32((int)0xFFFF0000u);
    *acc_even = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), xe, *acc_even);
    *acc_odd = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(u, high_halves)), xo, *acc_odd);
}

/* streams (1..4, a constant after inlining) rows per step */
static inline __attribute__((always_inline)) void d_streams(const int streams, const float *x, const uint16_t *w, ptrdiff_t k,
                                                            ptrdiff_t apart, ptrdiff_t steps, float *y) {
    for (ptrdiff_t j = 0; j < steps; ++j) {
        const uint16_t *row[4];
        __m512 even[4], odd[4];
        for (int s = 0; s < streams; ++s) {
            row[s] = w + (j + s * apart) * k;
            even[s] = odd[s] = _mm512_setzero_ps();
        }
        ptrdiff_t c = 0;
        for (; c + 32 <= k; c += 32) {
            for (int s = 0; s < streams; ++s) _mm_prefetch((const char *)(row[s] + c) + PREFETCH_BYTES, _MM_HINT_T0);
            __m512 xe = _mm512_loadu_ps(x + c), xo = _mm512_loadu_ps(x + c + 16);
            for (int s = 0; s < streams; ++s)
                d_accumulate(_mm512_loadu_si512((const void *)(row[s] + c)), xe, xo, &even[s], &odd[s]);
        }
        if (c + 16 <= k) { /* a last 16-column block (16-column paired layout): the low 8 lanes */
            __m512 xe = _mm512_maskz_loadu_ps(0x00FF, x + c), xo = _mm512_maskz_loadu_ps(0x00FF, x + c + 8);
            for (int s = 0; s < streams; ++s)
                d_accumulate(_mm512_maskz_loadu_epi16(0xFFFF, row[s] + c), xe, xo, &even[s], &odd[s]);
            c += 16;
        }
        for (int s = 0; s < streams; ++s) {
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(even[s], odd[s]));
            for (ptrdiff_t t = c; t < k; ++t) sum += x[t] * d_bf16_to_float(row[s][t]); /* natural order past the blocks */
            y[j + s * apart] = sum;
        }
    }
}

static void d_rows(int streams, const float *x, const uint16_t *w, ptrdiff_t k, ptrdiff_t apart, ptrdiff_t steps,
                   float *y) {
    switch (streams) {
    case 4: d_streams(4, x, w, k, apart, steps, y); break;
    case 3: d_streams(3, x, w, k, apart, steps, y); break;
    case 2: d_streams(2, x, w, k, apart, steps, y); break;
    default: d_streams(1, x, w, k, apart, steps, y); break;
    }
}

#pragma clang attribute pop

int ckernels_decode_bf16(const float *x, const uint16_t *w, ptrdiff_t k, int streams, ptrdiff_t apart, ptrdiff_t steps,
                         float *y) {
    if (!ckernels_avx512_kernels() || streams < 1 || streams > 4) return 0;
    d_rows(streams, x, w, k, apart, steps, y);
    return 1;
}

#else

int ckernels_decode_bf16(const float *x, const uint16_t *w, ptrdiff_t k, int streams, ptrdiff_t apart, ptrdiff_t steps,
                         float *y) {
    (void)x; (void)w; (void)k; (void)streams; (void)apart; (void)steps; (void)y;
    return 0;
}

#endif
