#ifndef CKERNELS_H
#define CKERNELS_H
/*
 * Internal to libdynmoe: the ckernels_ prefix keeps these out of the exported dynmoe_* API (the
 * version script exports dynmoe_*), and the function below has hidden visibility.
 *
 * What Swift cannot express or reach at the speed the hardware allows, measured on one Zen 3
 * core (and, for the AVX-512 kernels, one Intel Xeon core); everything else stays in
 * Swift (Sources/DynMoECore/Kernels). Built with the same CPU as the Swift code
 * (DYNMOE_TARGET_CPU); a build without AVX2/FMA/F16C gets portable fallbacks. Only the bf16
 * prefill and decode kernels also carry code for a wider CPU than the build's (AVX-512), chosen
 * at run time.
 */
#include <stddef.h>
#include <stdint.h>

/*
 * Swift has no prefetch instruction. Inlined into the decode kernel, this hint keeps weight
 * reads in flight beyond what the out-of-order window covers: 17-18 vs 13.5-14.8 GB/s streaming
 * bf16 rows on one Zen 3 core (prefetch distance 1 KiB).
 */
static inline void ckernels_prefetch(const void *address) { __builtin_prefetch(address, 0, 3); }

/* Eight floats, imported into Swift as SIMD8<Float>. */
typedef float ckernels_float8 __attribute__((ext_vector_type(8)));

/*
 * Widens 8 consecutive IEEE halves (f16 weights) with the F16C instruction. Swift's own SIMD
 * conversion and integer bit tricks compile to out-of-line generic code here: 0.3 GB/s against
 * 20+ GB/s for bf16 (kernel-bench ... f16). Without F16C (a build for a CPU that lacks it), a
 * scalar conversion.
 */
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
static inline ckernels_float8 ckernels_f16x8_to_f32(const void *halves) {
#if defined(__F16C__)
    return (ckernels_float8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)halves));
#else
    const unsigned char *b = (const unsigned char *)halves;
    ckernels_float8 out;
    for (int i = 0; i < 8; ++i) {
        _Float16 h;
        __builtin_memcpy(&h, b + 2 * i, 2);
        out[i] = (float)h;
    }
    return out;
#endif
}

/*
 * Spin-wait hint (x86 PAUSE) for the thread pool's busy waits: a waiting thread neither floods
 * the memory system with loads nor enters the kernel (sched_yield cost ~5 % of 2-thread decode
 * time in perf); no-op elsewhere.
 */
static inline void ckernels_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/*
 * 64-bit atomics on plain memory, for per-thread words the caller lays out on cache lines of
 * their own (MatMul's decode lanes); Swift's Atomic needs a fixed home for each value instead.
 */
static inline uint64_t ckernels_atomic_load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void ckernels_atomic_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int ckernels_atomic_cas64(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* The instruction sets this build compiled the kernels for (DYNMOE_TARGET_CPU), as bits. */
enum { CKERNELS_BUILD_AVX2 = 1, CKERNELS_BUILD_FMA = 2, CKERNELS_BUILD_F16C = 4 };
static inline int ckernels_build_features(void) {
    int features = 0;
#if defined(__AVX2__)
    features |= CKERNELS_BUILD_AVX2;
#endif
#if defined(__FMA__)
    features |= CKERNELS_BUILD_FMA;
#endif
#if defined(__F16C__)
    features |= CKERNELS_BUILD_F16C;
#endif
    return features;
}

/* How a KV cache stores keys and values (SessionOptions.kvDType). */
enum { CKERNELS_KV_F32 = 0, CKERNELS_KV_F16 = 1, CKERNELS_KV_BF16 = 2 };

/*
 * Attention scores of one query head: out[j] = scale * q . key_j for j < count, key_j being the
 * `dim` elements at keys + j * stride elements, stored as key_type (CKERNELS_KV_*), for head
 * widths that are a multiple of 64. Eight keys at a time, two from each quarter of the keys (four
 * streams from memory): the query's 64-column blocks stay in 8 registers, each key accumulates in
 * one register, and the 8 sums are reduced together by a horizontal-add tree (a separate
 * reduction per key cost as much as the dot).
 * Returns the number of keys done (count rounded down to 8; 0 when dim is not a multiple of 64
 * or the build has no AVX2 + FMA + F16C); the caller does the rest.
 */
__attribute__((visibility("hidden"))) ptrdiff_t ckernels_attention_scores(const float *q, const void *keys, int key_type,
                                                                         ptrdiff_t stride, ptrdiff_t count, ptrdiff_t dim,
                                                                         float scale, float *out);

/*
 * Scores of four query rows against the same keys: out[r][j] = scale * q[r] . key_j for j <
 * count (keys as for ckernels_attention_scores), for head widths that are a multiple of 8. Two
 * keys x four rows per step, so each key is loaded once for the four rows (the four query heads
 * of a grouped-query group, or four positions of one head in a prompt): 1.3-1.4x the one-row
 * kernel's FLOP/s over 1-2 K keys of width 64 on one Zen 3 core; each score is summed in the
 * one-row kernel's order.
 * `values` (may be NULL): the value rows of the same positions, brought into cache while the keys
 * are scored, for the weighted sum that follows.
 * Returns the number of keys done (count rounded down to 2; 0 when dim is not a multiple of 8
 * or the build has no AVX2 + FMA + F16C); the caller does the rest.
 */
__attribute__((visibility("hidden"))) ptrdiff_t ckernels_attention_scores4(const float *const q[4], const void *keys,
                                                                          const void *values, int key_type,
                                                                          ptrdiff_t stride,
                                                                          ptrdiff_t count, ptrdiff_t dim, float scale,
                                                                          float *const out[4]);

/*
 * Softmax-weighted sums of four rows over the same values: out[r][c] = inverse[r] *
 * sum_{j < count} w[r][j] * value_j[c], value_j being `dim` elements at values + j * stride
 * elements, stored as value_type (CKERNELS_KV_*). Each value is loaded once for the four rows:
 * 1.4-1.8x the one-row Swift loop's FLOP/s over 1-2 K values of width 64, summed in its order
 * (j = 0, 1, ...).
 * Returns 1 when done, 0 when dim is not a multiple of 8 or exceeds 256 or the build has no
 * AVX2 + FMA + F16C (the caller then sums row by row).
 */
__attribute__((visibility("hidden"))) int ckernels_attention_weighted_sum4(const float *const w[4], ptrdiff_t count,
                                                                          const void *values, int value_type,
                                                                          ptrdiff_t stride, ptrdiff_t dim,
                                                                          const float inverse[4], float *const out[4]);

/*
 * Softmax-weighted sum of one row: out[c] = inverse * sum_{j < count} w[j] * value_j[c] (values
 * as for ckernels_attention_weighted_sum4), the values read as four streams (each quarter summed
 * on its own, the four partial sums added at the end).
 * Returns 1 when done, 0 when dim is not a multiple of 64 or the build has no AVX2 + FMA + F16C.
 */
__attribute__((visibility("hidden"))) int ckernels_attention_weighted_sum(const float *w, ptrdiff_t count,
                                                                         const void *values, int value_type,
                                                                         ptrdiff_t stride, ptrdiff_t dim, float inverse,
                                                                         float *out);

/*
 * Lane-wise maximum of two 8-float vectors, b where either is NaN (vmaxps); the running maximum
 * of attention scores. Swift's SIMD select compiled to eight dependent scalar blends there.
 */
static inline ckernels_float8 ckernels_max_f32x8(ckernels_float8 a, ckernels_float8 b) {
#if defined(__AVX2__)
    return (ckernels_float8)_mm256_max_ps((__m256)a, (__m256)b);
#else
    ckernels_float8 out;
    for (int i = 0; i < 8; ++i) out[i] = a[i] > b[i] ? a[i] : b[i];
    return out;
#endif
}

/*
 * Widens 8 consecutive bf16 values (natural order, as a KV cache stores them) to f32: zero-extend
 * each to 32 bits and shift it into the high half. Swift's SIMD widening compiles to generic
 * out-of-line code (see ckernels_f16x8_to_f32).
 */
static inline ckernels_float8 ckernels_bf16x8_to_f32(const void *values) {
#if defined(__AVX2__)
    return (ckernels_float8)_mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)values)), 16));
#else
    const unsigned char *b = (const unsigned char *)values;
    ckernels_float8 out;
    for (int i = 0; i < 8; ++i) {
        uint16_t h;
        uint32_t bits;
        float f;
        __builtin_memcpy(&h, b + 2 * i, 2);
        bits = (uint32_t)h << 16;
        __builtin_memcpy(&f, &bits, 4);
        out[i] = f;
    }
    return out;
#endif
}

/*
 * Narrows 8 floats to IEEE halves, rounding to nearest even (F16C), for an f16 KV cache; without
 * F16C a scalar conversion.
 */
static inline void ckernels_f32x8_to_f16(ckernels_float8 values, void *halves) {
#if defined(__F16C__)
    _mm_storeu_si128((__m128i *)halves, _mm256_cvtps_ph((__m256)values, _MM_FROUND_TO_NEAREST_INT));
#else
    unsigned char *b = (unsigned char *)halves;
    for (int i = 0; i < 8; ++i) {
        _Float16 h = (_Float16)values[i];
        __builtin_memcpy(b + 2 * i, &h, 2);
    }
#endif
}

/*
 * Prefill matrix product for bf16 weights: for every token i < m and weight row n in
 * [row_begin, row_end), y[i * ldy + n] = sum_c x[i * ldx + c] * w[n * k + c].
 *
 * x is in the paired layout MatMul.prepare makes for the kernel in use: per 16 columns the 8 even
 * ones, then the 8 odd ones, for the AVX2 kernel; per 32 columns the 16 even, then the 16 odd ones
 * (a last 16-column block as for AVX2) for the AVX-512 kernel; columns past the last block in
 * order. Register tiles of 6 tokens x 2 weight rows (12 accumulators); the Swift compiler spills
 * the same tile (44 vs 85-90 GFLOP/s at m = 16, K = 1024 on one core), hence C.
 *
 * Returns 1 when it computed y, 0 when this build has no AVX2+FMA kernel (the caller then uses
 * its Swift kernel).
 */
__attribute__((visibility("hidden"))) int ckernels_gemm_bf16(const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k,
                     ptrdiff_t row_begin, ptrdiff_t row_end, float *y, ptrdiff_t ldy);

/* The prefill kernels: AVX2 + FMA (6 tokens x 2 rows of 8 lanes) in every AVX2 build, and AVX-512
 * F + BW (8 tokens x 2 rows of 16 lanes) in the same build, used when the CPU runs it. */
enum { CKERNELS_GEMM_NONE = 0, CKERNELS_GEMM_AVX2 = 1, CKERNELS_GEMM_AVX512 = 2 };

/* The kernel ckernels_gemm_bf16 uses on this CPU (checked once): CKERNELS_GEMM_*. */
__attribute__((visibility("hidden"))) int ckernels_gemm_bf16_best(void);

/* ckernels_gemm_bf16 with the given kernel (x in that kernel's layout); returns 0 (y untouched)
 * when this build or CPU cannot run it. For tests and benchmarks that compare the kernels. */
__attribute__((visibility("hidden"))) int ckernels_gemm_bf16_with(int kernel, const float *x, ptrdiff_t ldx, ptrdiff_t m,
                                                                 const uint16_t *w, ptrdiff_t k, ptrdiff_t row_begin,
                                                                 ptrdiff_t row_end, float *y, ptrdiff_t ldy);

/*
 * Whether this build carries the AVX-512 kernels (it is an AVX2 + FMA build: they are compiled
 * into it with a target attribute), the CPU runs AVX-512 F + BW with the OS saving its registers
 * (CPUID + XCR0), and the environment does not cap the kernels at AVX2 (DYNMOE_MAX_ISA=avx2);
 * checked once. Both the prefill and the decode kernel switch on it.
 */
__attribute__((visibility("hidden"))) int ckernels_avx512_kernels(void);

/*
 * Decode product for bf16 weights and one activation row, the AVX-512 counterpart of the Swift
 * kernel's four streams (Kernel.fourStreams): for j < steps and s < streams (1-4),
 * y[j + s * apart] = sum_c x[c] * w[(j + s * apart) * k + c], x in the 32-column paired layout
 * (MatMul.prepare on a CPU where ckernels_avx512_kernels() is 1). Each step reads one 64-byte
 * cache line of each row (the Swift kernel, 8 lanes wide, reads half a line) and prefetches the
 * line 1 KiB ahead; a row's columns past its last 32 go in 16-column blocks and singly. A row's
 * sum does not depend on streams, apart or steps, so the rows a schedule leaves over (streams
 * 1-3) come out as they would in a 4-stream step.
 * Returns 1 when done, 0 (y untouched) when ckernels_avx512_kernels() is 0 or streams is not 1-4.
 */
__attribute__((visibility("hidden"))) int ckernels_decode_bf16(const float *x, const uint16_t *w, ptrdiff_t k,
                                                              int streams, ptrdiff_t apart, ptrdiff_t steps, float *y);

#endif
