/*
 * Attention inner loops (see include/ckernels.h): scores of one query row eight keys at a time,
 * and four query rows at once (scores and weighted sums) so each key and value is loaded once
 * for four rows.
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
 * stays in 8 registers; each of the 8 keys accumulates in its own register. The keys are split
 * into four equal parts read side by side, two keys of each per step: at decode the keys come
 * from memory, and four streams keep more reads in flight than one (one query row over 1,024
 * f32 keys of 64 from memory, one Zen 3 core: 16.0-19.0 -> 12.1-12.5 us). Each score is the
 * same sum as with the keys in order; only the order the keys are visited in changes.
 */
#define ATTENTION_SCORES(NAME, LOAD, ELEMENT_BYTES)                                                          \
    static ptrdiff_t NAME(const float *q, const char *keys, ptrdiff_t stride, ptrdiff_t count, ptrdiff_t dim, \
                          float scale, float *out) {                                                         \
        const ptrdiff_t part = count / 8 * 2; /* keys per part */                                            \
        for (ptrdiff_t j = 0; j < part; j += 2) {                                                            \
            __m256 acc[8];                                                                                   \
            float sums[8];                                                                                   \
            for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();                                        \
            for (ptrdiff_t d = 0; d < dim; d += 64) {                                                        \
                __m256 qv[8];                                                                                \
                for (int i = 0; i < 8; ++i) qv[i] = _mm256_loadu_ps(q + d + 8 * i);                          \
                for (int k = 0; k < 8; ++k) {                                                                \
                    const ptrdiff_t row = (k >> 1) * part + j + (k & 1);                                     \
                    const char *key = keys + (row * stride + d) * (ELEMENT_BYTES);                           \
                    for (int i = 0; i < 8; ++i)                                                              \
                        acc[k] = _mm256_fmadd_ps(qv[i], LOAD(key + 8 * i * (ELEMENT_BYTES)), acc[k]);        \
                }                                                                                            \
            }                                                                                                \
            store_sums(acc, scale, sums);                                                                    \
            for (int k = 0; k < 8; ++k) out[(k >> 1) * part + j + (k & 1)] = sums[k];                        \
        }                                                                                                    \
        return 4 * part;                                                                                     \
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

/*
 * Four query rows x two keys per step: 8 accumulators, 6 loads per 8 FMAs (one row at a time
 * needs a load per FMA). Each (row, key) sum is reduced by the same hadd tree as above, in the
 * same order, so the scores equal the one-row kernel's bit for bit where both apply.
 * A decode step finds its KV rows in memory, not in cache (the weights streamed since evicted
 * them), and reads them as short streams: keys are prefetched 8 rows ahead and, when `values`
 * is given, each value row is loaded (one word per cache line) as its key is scored, so the
 * weighted sum that follows finds the values in cache. Loads, not prefetches: with keys and
 * values both missing, the miss buffers are full and the core drops prefetches; the weighted sum
 * then took 4.3-5.0 us after prefetching against 1.4-1.7 us after loading (4 rows x 230 f32
 * keys of 64, one Zen 3 core, KV from memory; scores + weighted sum 10.1-12.0 -> 8.0-11.3 us, at
 * 1,024 keys 55.5 -> 35.3 us). Prefetching keys 4 to 32 rows ahead made no difference.
 */
enum { SCORES4_KEY_PREFETCH = 8 };
#define ATTENTION_SCORES4(NAME, LOAD, ELEMENT_BYTES)                                                          \
    static ptrdiff_t NAME(const float *const q[4], const char *keys, const char *values, ptrdiff_t stride,    \
                          ptrdiff_t count, ptrdiff_t dim, float scale, float *const out[4]) {                  \
        const __m256 vscale = _mm256_set1_ps(scale);                                                           \
        __m128i touched = _mm_setzero_si128();                                                                 \
        ptrdiff_t j = 0;                                                                                       \
        for (; j + 2 <= count; j += 2) {                                                                       \
            const char *k0 = keys + j * stride * (ELEMENT_BYTES), *k1 = k0 + stride * (ELEMENT_BYTES);         \
            for (ptrdiff_t b = 0; b < 2 * stride * (ELEMENT_BYTES); b += 64) {                                  \
                __builtin_prefetch(k0 + SCORES4_KEY_PREFETCH * stride * (ELEMENT_BYTES) + b, 0, 3);            \
                if (values)                                                                                    \
                    touched = _mm_or_si128(touched, _mm_loadu_si32(values + j * stride * (ELEMENT_BYTES) + b));          \
            }                                                                                                  \
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;                                 \
            __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;                                                 \
            for (ptrdiff_t d = 0; d < dim; d += 8) {                                                           \
                __m256 x0 = LOAD(k0 + d * (ELEMENT_BYTES)), x1 = LOAD(k1 + d * (ELEMENT_BYTES)), v;            \
                v = _mm256_loadu_ps(q[0] + d); a00 = _mm256_fmadd_ps(v, x0, a00); a01 = _mm256_fmadd_ps(v, x1, a01); \
                v = _mm256_loadu_ps(q[1] + d); a10 = _mm256_fmadd_ps(v, x0, a10); a11 = _mm256_fmadd_ps(v, x1, a11); \
                v = _mm256_loadu_ps(q[2] + d); a20 = _mm256_fmadd_ps(v, x0, a20); a21 = _mm256_fmadd_ps(v, x1, a21); \
                v = _mm256_loadu_ps(q[3] + d); a30 = _mm256_fmadd_ps(v, x0, a30); a31 = _mm256_fmadd_ps(v, x1, a31); \
            }                                                                                                  \
            /* [r0k0 r0k1 r1k0 r1k1 | r2k0 r2k1 r3k0 r3k1] once the 128-bit halves are added */              \
            __m256 h01 = _mm256_hadd_ps(_mm256_hadd_ps(a00, a01), _mm256_hadd_ps(a10, a11));                   \
            __m256 h23 = _mm256_hadd_ps(_mm256_hadd_ps(a20, a21), _mm256_hadd_ps(a30, a31));                   \
            __m256 s = _mm256_mul_ps(_mm256_add_ps(_mm256_permute2f128_ps(h01, h23, 0x20),                     \
                                                   _mm256_permute2f128_ps(h01, h23, 0x31)), vscale);           \
            __m128 low = _mm256_castps256_ps128(s), high = _mm256_extractf128_ps(s, 1);                        \
            _mm_storel_pi((__m64 *)(out[0] + j), low);                                                         \
            _mm_storeh_pi((__m64 *)(out[1] + j), low);                                                         \
            _mm_storel_pi((__m64 *)(out[2] + j), high);                                                        \
            _mm_storeh_pi((__m64 *)(out[3] + j), high);                                                        \
        }                                                                                                      \
        __asm__ volatile("" : : "x"(touched)); /* keeps the value loads: they are there for the cache fills */ \
        return j;                                                                                              \
    }

ATTENTION_SCORES4(scores4_f32, load_f32, 4)
ATTENTION_SCORES4(scores4_f16, load_f16, 2)
ATTENTION_SCORES4(scores4_bf16, load_bf16, 2)

ptrdiff_t ckernels_attention_scores4(const float *const q[4], const void *keys, const void *values, int key_type,
                                     ptrdiff_t stride, ptrdiff_t count, ptrdiff_t dim, float scale,
                                     float *const out[4]) {
    const char *k = (const char *)keys, *v = (const char *)values;
    if (dim <= 0 || dim % 8 != 0) return 0;
    switch (key_type) {
    case CKERNELS_KV_F32: return scores4_f32(q, k, v, stride, count, dim, scale, out);
    case CKERNELS_KV_F16: return scores4_f16(q, k, v, stride, count, dim, scale, out);
    case CKERNELS_KV_BF16: return scores4_bf16(q, k, v, stride, count, dim, scale, out);
    default: return 0;
    }
}

/*
 * Weighted sums of four rows over the same values, 16 columns x 4 rows per pass (8 accumulators;
 * 2 value loads and 4 weight broadcasts per 8 FMAs). The values are taken in blocks of 64 rows
 * (16 KiB of 64-wide f32 values: L1) and every column pass runs over a block before the next,
 * the running sums parked in `acc` between blocks. Each column sums its rows in order j = 0, 1,
 * ... and is scaled at the end, as the one-row Swift loop (Attention.weightedSum) does.
 */
enum { WEIGHTED_SUM_BLOCK = 64, WEIGHTED_SUM_MAX_DIM = 256 };

#define ATTENTION_WEIGHTED_SUM4(NAME, LOAD, ELEMENT_BYTES)                                                    \
    static void NAME(const float *const w[4], ptrdiff_t count, const char *values, ptrdiff_t stride,          \
                     ptrdiff_t dim, const float inverse[4], float *const out[4]) {                             \
        float acc[4][WEIGHTED_SUM_MAX_DIM] __attribute__((aligned(32)));                                       \
        for (int r = 0; r < 4; ++r)                                                                            \
            for (ptrdiff_t c = 0; c < dim; ++c) acc[r][c] = 0;                                                 \
        for (ptrdiff_t j0 = 0; j0 < count; j0 += WEIGHTED_SUM_BLOCK) {                                         \
            ptrdiff_t j1 = j0 + WEIGHTED_SUM_BLOCK < count ? j0 + WEIGHTED_SUM_BLOCK : count;                  \
            ptrdiff_t c = 0;                                                                                   \
            for (; c + 16 <= dim; c += 16) {                                                                   \
                __m256 a00 = _mm256_load_ps(&acc[0][c]), a01 = _mm256_load_ps(&acc[0][c + 8]);                \
                __m256 a10 = _mm256_load_ps(&acc[1][c]), a11 = _mm256_load_ps(&acc[1][c + 8]);                \
                __m256 a20 = _mm256_load_ps(&acc[2][c]), a21 = _mm256_load_ps(&acc[2][c + 8]);                \
                __m256 a30 = _mm256_load_ps(&acc[3][c]), a31 = _mm256_load_ps(&acc[3][c + 8]);                \
                for (ptrdiff_t j = j0; j < j1; ++j) {                                                          \
                    const char *v = values + (j * stride + c) * (ELEMENT_BYTES);                               \
                    __m256 v0 = LOAD(v), v1 = LOAD(v + 8 * (ELEMENT_BYTES)), p;                                \
                    p = _mm256_broadcast_ss(w[0] + j); a00 = _mm256_fmadd_ps(p, v0, a00); a01 = _mm256_fmadd_ps(p, v1, a01); \
                    p = _mm256_broadcast_ss(w[1] + j); a10 = _mm256_fmadd_ps(p, v0, a10); a11 = _mm256_fmadd_ps(p, v1, a11); \
                    p = _mm256_broadcast_ss(w[2] + j); a20 = _mm256_fmadd_ps(p, v0, a20); a21 = _mm256_fmadd_ps(p, v1, a21); \
                    p = _mm256_broadcast_ss(w[3] + j); a30 = _mm256_fmadd_ps(p, v0, a30); a31 = _mm256_fmadd_ps(p, v1, a31); \
                }                                                                                              \
                _mm256_store_ps(&acc[0][c], a00); _mm256_store_ps(&acc[0][c + 8], a01);                        \
                _mm256_store_ps(&acc[1][c], a10); _mm256_store_ps(&acc[1][c + 8], a11);                        \
                _mm256_store_ps(&acc[2][c], a20); _mm256_store_ps(&acc[2][c + 8], a21);                        \
                _mm256_store_ps(&acc[3][c], a30); _mm256_store_ps(&acc[3][c + 8], a31);                        \
            }                                                                                                  \
            if (c < dim) { /* dim % 16 == 8: the last 8 columns */                                             \
                __m256 a0 = _mm256_load_ps(&acc[0][c]), a1 = _mm256_load_ps(&acc[1][c]);                       \
                __m256 a2 = _mm256_load_ps(&acc[2][c]), a3 = _mm256_load_ps(&acc[3][c]);                       \
                for (ptrdiff_t j = j0; j < j1; ++j) {                                                          \
                    __m256 v0 = LOAD(values + (j * stride + c) * (ELEMENT_BYTES));                             \
                    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w[0] + j), v0, a0);                               \
                    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w[1] + j), v0, a1);                               \
                    a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(w[2] + j), v0, a2);                               \
                    a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(w[3] + j), v0, a3);                               \
                }                                                                                              \
                _mm256_store_ps(&acc[0][c], a0); _mm256_store_ps(&acc[1][c], a1);                              \
                _mm256_store_ps(&acc[2][c], a2); _mm256_store_ps(&acc[3][c], a3);                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < 4; ++r) {                                                                          \
            __m256 s = _mm256_set1_ps(inverse[r]);                                                             \
            for (ptrdiff_t c = 0; c < dim; c += 8)                                                             \
                _mm256_storeu_ps(out[r] + c, _mm256_mul_ps(_mm256_load_ps(&acc[r][c]), s));                    \
        }                                                                                                      \
    }

ATTENTION_WEIGHTED_SUM4(weighted_sum4_f32, load_f32, 4)
ATTENTION_WEIGHTED_SUM4(weighted_sum4_f16, load_f16, 2)
ATTENTION_WEIGHTED_SUM4(weighted_sum4_bf16, load_bf16, 2)

int ckernels_attention_weighted_sum4(const float *const w[4], ptrdiff_t count, const void *values, int value_type,
                                     ptrdiff_t stride, ptrdiff_t dim, const float inverse[4], float *const out[4]) {
    if (dim <= 0 || dim % 8 != 0 || dim > WEIGHTED_SUM_MAX_DIM) return 0;
    switch (value_type) {
    case CKERNELS_KV_F32: weighted_sum4_f32(w, count, (const char *)values, stride, dim, inverse, out); return 1;
    case CKERNELS_KV_F16: weighted_sum4_f16(w, count, (const char *)values, stride, dim, inverse, out); return 1;
    case CKERNELS_KV_BF16: weighted_sum4_bf16(w, count, (const char *)values, stride, dim, inverse, out); return 1;
    default: return 0;
    }
}

/*
 * Weighted sum of one row (a decode step of a model without grouped-query attention): the values
 * are split into four equal parts read side by side, each summed in order into its own 64-column
 * accumulators, and the four partial sums added at the end ((p0 + p1) + (p2 + p3)). One row over
 * 1,024 f32 values of 64 from memory, one Zen 3 core: 13.9-15.1 us in one stream, 11.8-11.9 in
 * four (two: 13.2-13.8).
 */
#define ATTENTION_WEIGHTED_SUM(NAME, LOAD, ELEMENT_BYTES)                                                     \
    static void NAME(const float *w, ptrdiff_t count, const char *values, ptrdiff_t stride, ptrdiff_t dim,    \
                     float inverse, float *out) {                                                              \
        const ptrdiff_t part = count / 4;                                                                      \
        for (ptrdiff_t c = 0; c < dim; c += 64) {                                                              \
            __m256 acc[4][8];                                                                                  \
            for (int p = 0; p < 4; ++p)                                                                        \
                for (int i = 0; i < 8; ++i) acc[p][i] = _mm256_setzero_ps();                                   \
            for (ptrdiff_t j = 0; j < part; ++j)                                                               \
                for (int p = 0; p < 4; ++p) {                                                                  \
                    const ptrdiff_t row = p * part + j;                                                        \
                    const __m256 weight = _mm256_broadcast_ss(w + row);                                        \
                    const char *v = values + (row * stride + c) * (ELEMENT_BYTES);                             \
                    for (int i = 0; i < 8; ++i)                                                                \
                        acc[p][i] = _mm256_fmadd_ps(weight, LOAD(v + 8 * i * (ELEMENT_BYTES)), acc[p][i]);     \
                }                                                                                              \
            for (ptrdiff_t row = 4 * part; row < count; ++row) { /* count % 4 rows: the last part's tail */    \
                const __m256 weight = _mm256_broadcast_ss(w + row);                                            \
                const char *v = values + (row * stride + c) * (ELEMENT_BYTES);                                 \
                for (int i = 0; i < 8; ++i)                                                                    \
                    acc[3][i] = _mm256_fmadd_ps(weight, LOAD(v + 8 * i * (ELEMENT_BYTES)), acc[3][i]);         \
            }                                                                                                  \
            for (int i = 0; i < 8; ++i) {                                                                      \
                __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0][i], acc[1][i]), _mm256_add_ps(acc[2][i], acc[3][i])); \
                _mm256_storeu_ps(out + c + 8 * i, _mm256_mul_ps(sum, _mm256_set1_ps(inverse)));                \
            }                                                                                                  \
        }                                                                                                      \
    }

ATTENTION_WEIGHTED_SUM(weighted_sum_f32, load_f32, 4)
ATTENTION_WEIGHTED_SUM(weighted_sum_f16, load_f16, 2)
ATTENTION_WEIGHTED_SUM(weighted_sum_bf16, load_bf16, 2)

int ckernels_attention_weighted_sum(const float *w, ptrdiff_t count, const void *values, int value_type,
                                    ptrdiff_t stride, ptrdiff_t dim, float inverse, float *out) {
    const char *v = (const char *)values;
    if (dim <= 0 || dim % 64 != 0) return 0;
    switch (value_type) {
    case CKERNELS_KV_F32: weighted_sum_f32(w, count, v, stride, dim, inverse, out); return 1;
    case CKERNELS_KV_F16: weighted_sum_f16(w, count, v, stride, dim, inverse, out); return 1;
    case CKERNELS_KV_BF16: weighted_sum_bf16(w, count, v, stride, dim, inverse, out); return 1;
    default: return 0;
    }
}

#else

ptrdiff_t ckernels_attention_scores(const float *q, const void *keys, int key_type, ptrdiff_t stride, ptrdiff_t count,
                                    ptrdiff_t dim, float scale, float *out) {
    (void)q; (void)keys; (void)key_type; (void)stride; (void)count; (void)dim; (void)scale; (void)out;
    return 0;
}

ptrdiff_t ckernels_attention_scores4(const float *const q[4], const void *keys, const void *values, int key_type,
                                     ptrdiff_t stride, ptrdiff_t count, ptrdiff_t dim, float scale,
                                     float *const out[4]) {
    (void)q; (void)keys; (void)values; (void)key_type; (void)stride; (void)count; (void)dim; (void)scale; (void)out;
    return 0;
}

int ckernels_attention_weighted_sum4(const float *const w[4], ptrdiff_t count, const void *values, int value_type,
                                     ptrdiff_t stride, ptrdiff_t dim, const float inverse[4], float *const out[4]) {
    (void)w; (void)count; (void)values; (void)value_type; (void)stride; (void)dim; (void)inverse; (void)out;
    return 0;
}

int ckernels_attention_weighted_sum(const float *w, ptrdiff_t count, const void *values, int value_type,
                                    ptrdiff_t stride, ptrdiff_t dim, float inverse, float *out) {
    (void)w; (void)count; (void)values; (void)value_type; (void)stride; (void)dim; (void)inverse; (void)out;
    return 0;
}

#endif
