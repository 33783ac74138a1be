/*
 * Attention scores, eight keys at a time (see include/ckernels.h).
 */
#include "ckernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

/* Eight consecutive key elements of each storage type, widened to f32 (the header's helpers). */
static inline __m256 load_f32(const void *p) { return _mm256_loadu_ps((const float *)p); }
static inline __m256 load_f16(const void *p) { return (__m256)ckernels_f16x8_to_f32(p); }
static inline __m256 load_bf16(const void *p) { return (__m256)ckernels_bf16x8_to_f32(p); }

/*
 * One function per key type (the load inlined into the inner loop). The query's 64-column block
 * stays in 8 registers; each of the 8 keys accumulates in its own register.
 */
#define ATTENTION_SCORES(NAME, LOAD, ELEMENT_BYTES)                                                          \
    static ptrdiff_t NAME(const float *q, const char *keys, ptrdiff_t stride, ptrdiff_t count, ptrdiff_t dim, \
                          float scale, float *out) {                                                         \
        ptrdiff_t j = 0;                                                                                     \
        for (; j + 8 <= count; j += 8) {                                                                     \
            __m256 acc[8];                                                                                   \
            for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();                                        \
            for (ptrdiff_t d = 0; d < dim; d += 64) {                                                        \
                __m256 qv[8];                                                                                \
                for (int i = 0; i < 8; ++i) qv[i] = _mm256_loadu_ps(q + d + 8 * i);                          \
                for (int k = 0; k < 8; ++k) {                                                                \
                    const char *key = keys + ((j + k) * stride + d) * (ELEMENT_BYTES);                       \
                    for (int i = 0; i < 8; ++i)                                                              \
                        acc[k] = _mm256_fmadd_ps(qv[i], LOAD(key + 8 * i * (ELEMENT_BYTES)), acc[k]);        \
                }                                                                                            \
            }                                                                                                \
            store_sums(acc, scale, out + j);                                                                 \
        }                                                                                                    \
        return j;                                                                                            \
    }

/* Sums of acc[0..7] into one vector: three levels of pairwise horizontal adds leave, in each
 * 128-bit half, partial sums of the 8 keys; adding the halves finishes them. */
static inline void store_sums(const __m256 acc[8], float scale, float *out) {
    __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
    __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
    __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    /* h0123 = [k0 k1 k2 k3 | k0 k1 k2 k3] partial (low / high lanes), likewise h4567. */
    __m256 low = _mm256_permute2f128_ps(h0123, h4567, 0x20), high = _mm256_permute2f128_ps(h0123, h4567, 0x31);
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_add_ps(low, high), _mm256_set1_ps(scale)));
}

ATTENTION_SCORES(scores_f32, load_f32, 4)
ATTENTION_SCORES(scores_f16, load_f16, 2)
ATTENTION_SCORES(scores_bf16, load_bf16, 2)

ptrdiff_t ckernels_attention_scores(const float *q, const void *keys, int key_type, ptrdiff_t stride, ptrdiff_t count,
                                    ptrdiff_t dim, float scale, float *out) {
    if (dim <= 0 || dim % 64 != 0) return 0;
    switch (key_type) {
    case CKERNELS_KV_F32: return scores_f32(q, (const char *)keys, stride, count, dim, scale, out);
    case CKERNELS_KV_F16: return scores_f16(q, (const char *)keys, stride, count, dim, scale, out);
    case CKERNELS_KV_BF16: return scores_bf16(q, (const char *)keys, stride, count, dim, scale, out);
    default: return 0;
    }
}

#else

ptrdiff_t ckernels_attention_scores(const float *q, const void *keys, int key_type, ptrdiff_t stride, ptrdiff_t count,
                                    ptrdiff_t dim, float scale, float *out) {
    (void)q; (void)keys; (void)key_type; (void)stride; (void)count; (void)dim; (void)scale; (void)out;
    return 0;
}

#endif
