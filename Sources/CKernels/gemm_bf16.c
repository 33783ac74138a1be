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

/* The prefetcher for the rows [end, next_end) while `tiles` tiles compute the current block. */
INLINE prefetcher next_block_prefetcher(const uint16_t *w, ptrdiff_t k, ptrdiff_t end, ptrdiff_t next_end,
                                        ptrdiff_t tiles) {
    ptrdiff_t next_bytes = (next_end - end) * k * 2;
    prefetcher p = { (const char *)(w + end * k), (const char *)(w + next_end * k),
                     ((next_bytes + tiles - 1) / tiles + 63) & ~(ptrdiff_t)63 };
    return p;
}

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
        prefetcher p = next_block_prefetcher(w, k, end, next_end, groups * ((end - begin + 1) / 2));
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

/* AVX-512 (F + BW), compiled into every AVX2 build and chosen at run time when the CPU has it:
 * 16 lanes per FMA and 32 registers.
 * x comes in the 32-column paired layout (MatMul.prepare on AVX-512 CPUs: per 32 columns the 16
 * even ones, then the 16 odd ones), so a 64-byte load of 32 weights is widened by one shift (the
 * even columns: low halves of the 32-bit lanes) and one mask (the odd columns: high halves). A
 * first version kept the AVX2 kernel's 16-column layout and widened each 16 weights with one
 * word permutation (vpermw): 112-116 against 125-145 GFLOP/s for this tile on hot weights (a C
 * microbenchmark of the 8 x 2 tile, 512 x 1024, 8 tokens; bench/NOTES.md). */
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw"))), apply_to = function)

/* 8 x 2 measured best of 6x4, 8x3, 8x2, 10x2, 12x2 and 4x4 (with the permutation widening;
 * 120-125 against 113-116 GFLOP/s at k = 1024, m = 16 and 128); 8 x 3 again with the shift
 * widening, whose fewer live registers let it fit: no better. */
enum { Z_TILE_TOKENS = 8, Z_TILE_ROWS = 2, Z_BLOCK = 32 };
/* The few-token tile: 4 tokens x 4 streams, for groups of up to 16 tokens. */
enum { Z_STREAM_TOKENS = 4, Z_STREAMS = 4, Z_STREAM_MAX_TOKENS = 16, Z_MAX_ROWS = 4 };

/* acc[t][r] += v[r] * (the 16 floats at x + t * ldx, or the low 8 when `half`) */
INLINE void z_accumulate(const int tokens, const int rows, __m512 acc[][Z_MAX_ROWS], const __m512 *v, const float *x,
                         ptrdiff_t ldx, const int half) {
    for (int t = 0; t < tokens; ++t) {
        __m512 xv = half ? _mm512_maskz_loadu_ps(0x00FF, x + t * ldx) : _mm512_loadu_ps(x + t * ldx);
        for (int r = 0; r < rows; ++r) acc[t][r] = _mm512_fmadd_ps(v[r], xv, acc[t][r]);
    }
}

/* The even and odd columns of the weight words in u[r] times the matching halves of x: a 32-column
 * block (x + 16 holds the odd columns), or with `half` a last 16-column block in the 16-column
 * paired layout (the low 8 lanes; x + 8 holds its odd columns). */
INLINE void z_block(const int tokens, const int rows, __m512 acc[][Z_MAX_ROWS], const __m512i *u, const float *x,
                    ptrdiff_t ldx, const int half) {
    const __m512i high_halves = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 v[Z_MAX_ROWS];
    for (int r = 0; r < rows; ++r) v[r] = _mm512_castsi512_ps(_mm512_slli_epi32(u[r], 16));
    z_accumulate(tokens, rows, acc, v, x, ldx, half);
    for (int r = 0; r < rows; ++r) v[r] = _mm512_castsi512_ps(_mm512_and_si512(u[r], high_halves));
    z_accumulate(tokens, rows, acc, v, x + (half ? 8 : 16), ldx, half);
}

/* sums[n] = the sum of v[n]'s 16 lanes for n < count (<= 16), by one tree over 16 vectors: 46
 * shuffles, adds and a permutation for the 16 accumulators of a 4 x 4 or 8 x 2 tile, and one store,
 * where a tree per weight row (up to 8 vectors, 23 operations) took 92 and 46 and a store per row
 * (hot weights 1-4 % faster). Every vector's lanes are added in the same order as by the tree per
 * row, so the sums are the same bit for bit: lanes 8 apart, then 4, 2 and 1 apart. */
INLINE void z_sum_lanes(const int count, const __m512 *v, float *sums) {
    __m512 u[16], pair[8], quad[4], half[2];
    for (int n = 0; n < 16; ++n) u[n] = n < count ? v[n] : _mm512_setzero_ps();
    /* 256-bit halves: the 8-lane partial sums of vectors 2i and 2i + 1 */
    for (int i = 0; i < 8; ++i)
        pair[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x44),
                                _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xEE));
    /* 128-bit quarter q: the 4-lane partial sums of vector 4i + q */
    for (int i = 0; i < 4; ++i)
        quad[i] = _mm512_add_ps(_mm512_shuffle_f32x4(pair[2 * i], pair[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(pair[2 * i], pair[2 * i + 1], 0xDD));
    /* quarter q: lanes 0-1 hold vector 8i + q's 2-lane partial sum, lanes 2-3 vector 8i + 4 + q's */
    for (int i = 0; i < 2; ++i)
        half[i] = _mm512_add_ps(_mm512_shuffle_ps(quad[2 * i], quad[2 * i + 1], 0x44),
                                _mm512_shuffle_ps(quad[2 * i], quad[2 * i + 1], 0xEE));
    /* lane 4q + e: the sum of vector 4e + q; put back in order */
    __m512 total = _mm512_add_ps(_mm512_shuffle_ps(half[0], half[1], 0x88), _mm512_shuffle_ps(half[0], half[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(sums, _mm512_permutexvar_ps(order, total));
}

/* y[t * ldy + r * row_step] for t < tokens, r < rows (tokens x rows <= 16): the lanes of acc[t][r]
 * summed, plus the columns past the last full block (x and w in natural order there); w's rows
 * row_step * k apart. */
INLINE void z_store_sums(const int tokens, const int rows, __m512 acc[][Z_MAX_ROWS], const float *x, ptrdiff_t ldx,
                         const uint16_t *w, ptrdiff_t k, ptrdiff_t tail, ptrdiff_t row_step, float *y, ptrdiff_t ldy) {
    __m512 v[16];
    float sums[16];
    for (int t = 0; t < tokens; ++t)
        for (int r = 0; r < rows; ++r) v[t * rows + r] = acc[t][r];
    z_sum_lanes(tokens * rows, v, sums);
    for (int t = 0; t < tokens; ++t)
        for (int r = 0; r < rows; ++r) {
            const uint16_t *wr = w + r * row_step * k;
            float s = sums[t * rows + r];
            for (ptrdiff_t c = tail; c < k; ++c) s += x[t * ldx + c] * bf16_to_float(wr[c]);
            y[t * ldy + r * row_step] = s;
        }
}

/* tokens (1..8) x rows (1..4) outputs, every column; the rows row_step rows apart from w on.
 * Constant arguments after inlining. Two uses:
 * - the 8 x 2 tile: adjacent rows (row_step 1), the next row block prefetched by the caller;
 * - few tokens (16 or fewer: a prompt spread over many experts) leave too little arithmetic per
 *   weight byte to hide memory behind it, so, like the decode kernel, 4 rows a quarter of the
 *   row block apart are read as 4 sequential streams, each prefetched 1 KiB ahead (`streams`).
 *   Cold weights, 512 x 1024, one core: 4 tokens 6.3-7.1 -> 10.0-10.3 GB/s, 8 tokens (two
 *   tiles over the same rows) 5.1-6.9 -> 6.7-8.5; 9-16 tokens (up to four tiles over the same
 *   rows, the later ones reading them from L1) 48-64 -> 66-79 GFLOP/s with the variants
 *   alternating in one process; above 16 even. */
INLINE void z_tile(const int tokens, const int rows, const int streams, const float *x, ptrdiff_t ldx,
                   const uint16_t *w, ptrdiff_t k, ptrdiff_t row_step, float *y, ptrdiff_t ldy) {
    __m512 acc[Z_TILE_TOKENS][Z_MAX_ROWS];
    __m512i u[Z_MAX_ROWS];
    for (int t = 0; t < tokens; ++t)
        for (int r = 0; r < rows; ++r) acc[t][r] = _mm512_setzero_ps();
    ptrdiff_t b = 0;
    for (; b + Z_BLOCK <= k; b += Z_BLOCK) { /* one cache line of each row */
        if (streams)
            for (int r = 0; r < rows; ++r) _mm_prefetch((const char *)(w + r * row_step * k + b) + 1024, _MM_HINT_T0);
        for (int r = 0; r < rows; ++r) u[r] = _mm512_loadu_si512((const void *)(w + r * row_step * k + b));
        z_block(tokens, rows, acc, u, x + b, ldx, 0);
    }
    if (b + BLOCK <= k) {
        for (int r = 0; r < rows; ++r) u[r] = _mm512_maskz_loadu_epi16(0xFFFF, w + r * row_step * k + b);
        z_block(tokens, rows, acc, u, x + b, ldx, 1);
        b += BLOCK;
    }
    z_store_sums(tokens, rows, acc, x, ldx, w, k, b, row_step, y, ldy);
}

/* The streams' tile: tokens (1..4) x rows j, j + apart, j + 2 apart, j + 3 apart (w at row j). */
INLINE void z_tile_streams(const int tokens, const float *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t k,
                           ptrdiff_t apart, float *y, ptrdiff_t ldy) {
    z_tile(tokens, Z_STREAMS, 1, x, ldx, w, k, apart, y, ldy);
}

/* Rows [begin, begin + 4 * apart) for m <= Z_STREAM_MAX_TOKENS tokens: for each j < apart, the 4
 * streams' rows for every group of up to 4 tokens (the later groups find the rows in L1). */
INLINE void z_streams_block(const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k,
                            ptrdiff_t begin, ptrdiff_t apart, float *y, ptrdiff_t ldy) {
    for (ptrdiff_t j = 0; j < apart; ++j) {
        const uint16_t *wj = w + (begin + j) * k;
        float *yj = y + begin + j;
        ptrdiff_t g = 0;
        for (; g + Z_STREAM_TOKENS <= m; g += Z_STREAM_TOKENS)
            z_tile_streams(Z_STREAM_TOKENS, x + g * ldx, ldx, wj, k, apart, yj + g * ldy, ldy);
        switch (m - g) {
        case 3: z_tile_streams(3, x + g * ldx, ldx, wj, k, apart, yj + g * ldy, ldy); break;
        case 2: z_tile_streams(2, x + g * ldx, ldx, wj, k, apart, yj + g * ldy, ldy); break;
        case 1: z_tile_streams(1, x + g * ldx, ldx, wj, k, apart, yj + g * ldy, ldy); break;
        default: break;
        }
    }
}

INLINE void z_token_group(const int tokens, const float *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t k,
                          ptrdiff_t begin, ptrdiff_t end, float *y, ptrdiff_t ldy, prefetcher *p) {
    ptrdiff_t n = begin;
    for (; n + Z_TILE_ROWS <= end; n += Z_TILE_ROWS) {
        prefetch_step(p);
        z_tile(tokens, Z_TILE_ROWS, 0, x, ldx, w + n * k, k, 1, y + n, ldy);
    }
    if (n < end) z_tile(tokens, 1, 0, x, ldx, w + n * k, k, 1, y + n, ldy);
}

static void z_token_block(const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k,
                          ptrdiff_t row_begin, ptrdiff_t row_end, float *y, ptrdiff_t ldy) {
    ptrdiff_t block_rows = ROW_BLOCK_BYTES / (2 * (k > 0 ? k : 1));
    if (block_rows < Z_TILE_ROWS) block_rows = Z_TILE_ROWS;
    ptrdiff_t groups = (m + Z_TILE_TOKENS - 1) / Z_TILE_TOKENS;
    for (ptrdiff_t block = row_begin; block < row_end; block += block_rows) {
        ptrdiff_t begin = block, end = block + block_rows < row_end ? block + block_rows : row_end;
        if (m <= Z_STREAM_MAX_TOKENS && end - begin >= Z_STREAMS) {
            /* each stream prefetches its own rows; the rows left over (fewer than 4) go through
             * the 8 x 2 tiles below */
            ptrdiff_t apart = (end - begin) / Z_STREAMS;
            z_streams_block(x, ldx, m, w, k, begin, apart, y, ldy);
            begin += Z_STREAMS * apart;
            if (begin == end) continue;
        }
        ptrdiff_t next_end = end + block_rows < row_end ? end + block_rows : row_end;
        prefetcher p = next_block_prefetcher(w, k, end, next_end, groups * ((end - begin + Z_TILE_ROWS - 1) / Z_TILE_ROWS));
        ptrdiff_t i = 0;
        for (; i + Z_TILE_TOKENS <= m; i += Z_TILE_TOKENS)
            z_token_group(Z_TILE_TOKENS, x + i * ldx, ldx, w, k, begin, end, y + i * ldy, ldy, &p);
        const float *xi = x + i * ldx;
        float *yi = y + i * ldy;
        switch (m - i) {
        case 7: z_token_group(7, xi, ldx, w, k, begin, end, yi, ldy, &p); break;
        case 6: z_token_group(6, xi, ldx, w, k, begin, end, yi, ldy, &p); break;
        case 5: z_token_group(5, xi, ldx, w, k, begin, end, yi, ldy, &p); break;
        case 4: z_token_group(4, xi, ldx, w, k, begin, end, yi, ldy, &p); break;
        case 3: z_token_group(3, xi, ldx, w, k, begin, end, yi, ldy, &p); break;
        case 2: z_token_group(2, xi, ldx, w, k, begin, end, yi, ldy, &p); break;
        case 1: z_token_group(1, xi, ldx, w, k, begin, end, yi, ldy, &p); break;
        default: break;
        }
    }
}

#pragma clang attribute pop

int ckernels_gemm_bf16_best(void) { return ckernels_avx512_kernels() ? CKERNELS_GEMM_AVX512 : CKERNELS_GEMM_AVX2; }

int ckernels_gemm_bf16_with(int kernel, const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k,
                            ptrdiff_t row_begin, ptrdiff_t row_end, float *y, ptrdiff_t ldy) {
    if (kernel != CKERNELS_GEMM_AVX2 && !(kernel == CKERNELS_GEMM_AVX512 && ckernels_gemm_bf16_best() == kernel)) return 0;
    /* Blocks of tokens whose activations stay in L2 next to two row blocks. */
    for (ptrdiff_t i = 0; i < m; i += TOKEN_BLOCK) {
        ptrdiff_t count = m - i < TOKEN_BLOCK ? m - i : TOKEN_BLOCK;
        if (kernel == CKERNELS_GEMM_AVX512)
            z_token_block(x + i * ldx, ldx, count, w, k, row_begin, row_end, y + i * ldy, ldy);
        else
            token_block(x + i * ldx, ldx, count, w, k, row_begin, row_end, y + i * ldy, ldy);
    }
    return 1;
}

#else

int ckernels_gemm_bf16_best(void) { return CKERNELS_GEMM_NONE; }

int ckernels_gemm_bf16_with(int kernel, const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k,
                            ptrdiff_t row_begin, ptrdiff_t row_end, float *y, ptrdiff_t ldy) {
    (void)kernel; (void)x; (void)ldx; (void)m; (void)w; (void)k; (void)row_begin; (void)row_end; (void)y; (void)ldy;
    return 0;
}

#endif

int ckernels_gemm_bf16(const float *x, ptrdiff_t ldx, ptrdiff_t m, const uint16_t *w, ptrdiff_t k,
                       ptrdiff_t row_begin, ptrdiff_t row_end, float *y, ptrdiff_t ldy) {
    return ckernels_gemm_bf16_with(ckernels_gemm_bf16_best(), x, ldx, m, w, k, row_begin, row_end, y, ldy);
}
