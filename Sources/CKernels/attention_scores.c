/*
 * Attention scores, eight keys at a time (see include/ckernels.h).
 */
#include "ckernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

ptrdiff_t ckernels_attention_scores(const float *q, const float *keys, ptrdiff_t stride, ptrdiff_t count,
                                    ptrdiff_t dim, float scale, float *out) {
    if (dim <= 0 || dim % 64 != 0) return 0;
    ptrdiff_t j = 0;
    for (; j + 8 <= count; j += 8) {
        __m256 acc[8];
        for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
        for (ptrdiff_t d = 0; d < dim; d += 64) {
            __m256 qv[8];
            for (int i = 0; i < 8; ++i) qv[i] = _mm256_loadu_ps(q + d + 8 * i);
            for (int k = 0; k < 8; ++k) {
                const float *key = keys + (j + k) * stride + d;
                for (int i = 0; i < 8; ++i) acc[k] = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(key + 8 * i), acc[k]);
            }
        }
        /* Sums of acc[0..7] into one vector: three levels of pairwise horizontal adds leave, in
         * each 128-bit half, partial sums of the 8 keys; adding the halves finishes them. */
        __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
        __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
        __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
        /* h0123 = [k0 k1 k2 k3 | k0 k1 k2 k3] partial (low / high lanes), likewise h4567. */
        __m256 low = _mm256_permute2f128_ps(h0123, h4567, 0x20), high = _mm256_permute2f128_ps(h0123, h4567, 0x31);
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_add_ps(low, high), _mm256_set1_ps(scale)));
    }
    return j;
}

#else

ptrdiff_t ckernels_attention_scores(const float *q, const float *keys, ptrdiff_t stride, ptrdiff_t count,
                                    ptrdiff_t dim, float scale, float *out) {
    (void)q; (void)keys; (void)stride; (void)count; (void)dim; (void)scale; (void)out;
    return 0;
}

#endif
