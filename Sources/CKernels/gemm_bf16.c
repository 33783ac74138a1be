/*
 * Prefill matrix product for bf16 weights (see include/ckernels.h).
 *
 * Each 16-column weight block of a row is widened in two halves of 8: the even columns are the
 * low halves of the 8 UInt32 lanes (shift left by 16), and the odd columns are the low halves of
 * the lanes loaded 2 bytes further on (the same shift). Two loads instead of one keep only the
 * widened half live, so 12 accumulators + 2 weight vectors + 1 activation vector fit in the 16
 * AVX2 registers. The shifted load reads 2 bytes past the block, so the last full block of a row
 * uses a mask instead (the row may end the file mapping).
 */
#include "ckernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

enum { BLOCK = 16, TILE_TOKENS = 6, TOKEN_BLOCK = 48, ROW_BLOCK_BYTES = 128 << 10 /* a quarter of L2: this block and the next one prefetched */ };

#define INLINE static inline __attribute__((always_inline))

INLINE __m256 even_half(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)p), 16));
}
INLINE __m256 odd_half_shifted(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(p + 1)), 16));
}
INLINE __m256 odd_half_masked(const uint16_t *p) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xFFFF0000u)));
}
INLINE float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
INLINE float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* One half (8 columns) of a block for `tokens` x `rows` accumulators; x is at the half's start. */
#define TILE_HALF(V0, V1)                                                                    \
    for (int t = 0; t < tokens; ++t) {                                                       \
        __m256 xv = _mm256_loadu_ps(x + t * ldx + xo);                                       \
        acc[t][0] = _mm256_fmadd_ps(V0, xv, acc[t][0]);                                      \
        if (rows == 2) acc[t][1] = _mm256_fmadd_ps(V1, xv, acc[t][1]);                        \
    }

/* tokens (1..6) x rows (1..2) outputs, every column; constant arguments after inlining. */
INLINE void tile(const int tokens, const int rows, const float *x, ptrdiff_t ldx, const uint16_t *w0,
                 const uint16_t *w1, ptrdiff_t k, float *y, ptrdiff_t ldy) {
    __m256 acc[TILE_TOKENS][2];
    for (int t = 0; t < tokens; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    ptrdiff_t b = 0, xo;
    /* One 16-column block at b: even half, then odd half loaded by ODD_HALF. */
#define TILE_BLOCK(ODD_HALF)                                                      \
    do {                                                                          \
        __m256 v0 = even_half(w0 + b), v1 = rows == 2 ? even_half(w1 + b) : v0;  \
        xo = b;                                                                   \
        TILE_HALF(v0, v1)                                                         \
        v0 = ODD_HALF(w0 + b);                                                    \
        v1 = rows == 2 ? ODD_HALF(w1 + b) : v0;                                   \
        xo = b + BLOCK / 2;                                                       \
        TILE_HALF(v0, v1)                                                         \
    } while (0)
    for (; b + BLOCK < k; b += BLOCK) TILE_BLOCK(odd_half_shifted);
    if (b + BLOCK <= k) {
        TILE_BLOCK(odd_half_masked); /* the row's last block: nothing may be read past it */
        b += BLOCK;
    }
#undef TILE_BLOCK
    for (int t = 0; t < tokens; ++t) {
        for (int r = 0; r < rows; ++r) {
            const uint16_t *wr = r == 0 ? w0 : w1;
            float s = horizontal_sum(acc[t][r]);
            for (ptrdiff_t c = b; c < k; ++c) s += x[t * ldx + c] * bf16_to_float(wr[c]);
            y[t * ldy + r] = s;
        }
    }
}

/* Software prefetch of the next row block into L2, spread evenly over the current block's tiles
 * so the weights stream from memory while the tiles compute (the first token group over a block
 * would otherwise wait for memory: 1.3x slower at m = 16 with weights coming from DRAM). */
typedef struct {
    const char *next;
    const char *end;
    ptrdiff_t bytes_per_tile;
} prefetcher;

INLINE void prefetch_step(prefetcher *p) {
    const char *stop = p->next + p->bytes_per_tile;
    if (stop > p->end) stop = p->end;
    for (; p->next < stop; p->next += 64) _mm_prefetch(p->next, _MM_HINT_T1);
}

/* All row pairs of [begin, end) for one group of `tokens` tokens. */
INLINE void token_group(const int tokens, const float *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t k,
                        ptrdiff_t begin, ptrdiff_t end, float *y, ptrdiff_t ldy, prefetcher *p) {
    ptrdiff_t n = begin;
    for (; n + 2 <= end; n += 2) {
        prefetch_step(p);
        tile(tokens, 2, x, ldx, w + n * k, w + (n + 1) * k, k, y + n, ldy);
    }
    if (n < end) tile(tokens, 1, x, ldx, w + n * k, w + n * k, k, y + n, ldy);
}

/* Up to TOKEN_BLOCK tokens: row blocks, each passed over by every group of 6 tokens. */
static void token_block(const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k,
                        ptrdiff_t row_begin, ptrdiff_t row_end, float *y, ptrdiff_t ldy) {
    /* Rows in blocks that stay in L2 while every token group passes over them. */
    ptrdiff_t block_rows = ROW_BLOCK_BYTES / (2 * (k > 0 ? k : 1));
    if (block_rows < 2) block_rows = 2;
    ptrdiff_t groups = (m + TILE_TOKENS - 1) / TILE_TOKENS;
    for (ptrdiff_t begin = row_begin; begin < row_end; begin += block_rows) {
        ptrdiff_t end = begin + block_rows < row_end ? begin + block_rows : row_end;
        ptrdiff_t next_end = end + block_rows < row_end ? end + block_rows : row_end;
        ptrdiff_t next_bytes = (next_end - end) * k * 2, tiles = groups * ((end - begin + 1) / 2);
        prefetcher p = { (const char *)(w + end * k), (const char *)(w + next_end * k),
                         ((next_bytes + tiles - 1) / tiles + 63) & ~(ptrdiff_t)63 };
        ptrdiff_t i = 0;
        for (; i + TILE_TOKENS <= m; i += TILE_TOKENS)
            token_group(TILE_TOKENS, x + i * ldx, ldx, w, k, begin, end, y + i * ldy, ldy, &p);
        switch (m - i) {
        case 5: token_group(5, x + i * ldx, ldx, w, k, begin, end, y + i * ldy, ldy, &p); break;
        case 4: token_group(4, x + i * ldx, ldx, w, k, begin, end, y + i * ldy, ldy, &p); break;
        case 3: token_group(3, x + i * ldx, ldx, w, k, begin, end, y + i * ldy, ldy, &p); break;
        case 2: token_group(2, x + i * ldx, ldx, w, k, begin, end, y + i * ldy, ldy, &p); break;
        case 1: token_group(1, x + i * ldx, ldx, w, k, begin, end, y + i * ldy, ldy, &p); break;
        default: break;
        }
    }
}

int ckernels_gemm_bf16(const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k,
                     ptrdiff_t row_begin, ptrdiff_t row_end, float *y, ptrdiff_t ldy) {
    /* Blocks of tokens whose activations stay in L2 next to two row blocks. */
    for (ptrdiff_t i = 0; i < m; i += TOKEN_BLOCK) {
        ptrdiff_t count = m - i < TOKEN_BLOCK ? m - i : TOKEN_BLOCK;
        token_block(x + i * ldx, ldx, count, w, k, row_begin, row_end, y + i * ldy, ldy);
    }
    return 1;
}

#else

int ckernels_gemm_bf16(const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k,
                     ptrdiff_t row_begin, ptrdiff_t row_end, float *y, ptrdiff_t ldy) {
    (void)x; (void)ldx; (void)m; (void)w; (void)k; (void)row_begin; (void)row_end; (void)y; (void)ldy;
    return 0;
}

#endif
