/*
 * bandwidth.c — measures the machine's memory read bandwidth, the ceiling of a
 * memory-bandwidth-bound decoder.
 *
 * A buffer much larger than the caches (1 GiB by default) is filled once, then summed: each of
 * T threads (pthreads) reads its contiguous 1/T of the buffer with 256-bit loads (AVX2, four
 * independent accumulators), as S equal parts read side by side (S concurrent sequential
 * streams; the patterns are listed at READ_PATTERN below). One stream alone does not reach what a
 * core can read: on the Zen 3 this was written on, one core reads ~18 GB/s from one stream and
 * ~25 GB/s from four. The wall time from the common start to the last thread's end gives
 * bytes / second. For each thread count the best over all patterns and runs is the reported
 * bandwidth, as JSON on stdout:
 *
 *   {"buffer_bytes": ..., "runs": 5, "results": [{"threads": 1, "gbps": 24.2,
 *     "pattern": "2 streams, 128 B", "patterns": [{"pattern": ..., "all_gbps": [...]}, ...]}, ...]}
 *
 * GB are 1e9 bytes. Build: cc -O3 -march=native -pthread bench/bandwidth.c -o build/bin/bandwidth
 * Usage:  bandwidth [--size-mib N] [--threads 1,2] [--runs N]
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef struct {
    const uint64_t *data;
    size_t count; /* uint64 words */
    int pattern;
    pthread_barrier_t *barrier;
    uint64_t result;
} job;

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The buffer is read in chunks of 1 MiB, the size of one expert matrix of the benchmark model. */
enum { CHUNK_WORDS = (1 << 20) / sizeof(uint64_t) };

/*
 * The read patterns tried, each a sum over n words, every 1 MiB chunk read as `streams` equal
 * parts side by side,
 * `step` bytes of each part per step (one 256-bit load per 32 bytes), with or without a software
 * prefetch 1 KiB ahead at every step. Which is fastest differs between machines (and runs), so
 * all are measured; "4 streams, 32 B + prefetch" is the access pattern of dynmoe's decode kernel.
 */
#ifdef __AVX2__
#define READ_PATTERN(NAME, STREAMS, STEP, PREFETCH)                                                    \
    static uint64_t NAME(const uint64_t *p, size_t n) {                                               \
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),     \
                          _mm256_setzero_si256()};                                                     \
        uint64_t lanes[4], s;                                                                          \
        size_t chunk, i, j, end = n - n % CHUNK_WORDS;                                                 \
        int k, l;                                                                                      \
        for (chunk = 0; chunk < end; chunk += CHUNK_WORDS) {                                           \
            for (i = 0; i < CHUNK_WORDS / STREAMS; i += STEP / 8) {                                    \
                for (k = 0; k < STREAMS; ++k) {                                                        \
                    const uint64_t *q = p + chunk + (size_t)k * (CHUNK_WORDS / STREAMS) + i;           \
                    if (PREFETCH) __builtin_prefetch((const char *)q + 1024, 0, 3);                    \
                    for (l = 0; l < STEP / 32; ++l)                                                    \
                        acc[l & 3] = _mm256_add_epi64(acc[l & 3], _mm256_load_si256((const __m256i *)(q + 4 * l))); \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]),      \
                                                               _mm256_add_epi64(acc[2], acc[3])));     \
        s = lanes[0] + lanes[1] + lanes[2] + lanes[3];                                                 \
        for (j = end; j < n; ++j) s += p[j];                                                           \
        return s;                                                                                      \
    }
#else
#define READ_PATTERN(NAME, STREAMS, STEP, PREFETCH)                                                    \
    static uint64_t NAME(const uint64_t *p, size_t n) {                                               \
        size_t chunk, i, j, end = n - n % CHUNK_WORDS;                                                 \
        uint64_t s = 0;                                                                                \
        int k;                                                                                         \
        for (chunk = 0; chunk < end; chunk += CHUNK_WORDS)                                             \
            for (i = 0; i < CHUNK_WORDS / STREAMS; i += STEP / 8)                                      \
                for (k = 0; k < STREAMS; ++k)                                                          \
                    for (j = 0; j < STEP / 8; ++j) s += p[chunk + (size_t)k * (CHUNK_WORDS / STREAMS) + i + j]; \
        for (j = end; j < n; ++j) s += p[j];                                                           \
        return s;                                                                                      \
    }
#endif

READ_PATTERN(read_1_64_prefetched, 1, 64, 1)
READ_PATTERN(read_1_128, 1, 128, 0)
READ_PATTERN(read_2_64_prefetched, 2, 64, 1)
READ_PATTERN(read_2_128, 2, 128, 0)
READ_PATTERN(read_4_32_prefetched, 4, 32, 1)
READ_PATTERN(read_4_64_prefetched, 4, 64, 1)
READ_PATTERN(read_4_128, 4, 128, 0)

static const struct {
    const char *name;
    uint64_t (*read)(const uint64_t *, size_t);
} patterns[] = {
    {"1 stream, 64 B + prefetch", read_1_64_prefetched},   {"1 stream, 128 B", read_1_128},
    {"2 streams, 64 B + prefetch", read_2_64_prefetched},  {"2 streams, 128 B", read_2_128},
    {"4 streams, 32 B + prefetch", read_4_32_prefetched},  {"4 streams, 64 B + prefetch", read_4_64_prefetched},
    {"4 streams, 128 B", read_4_128},
};
enum { PATTERNS = sizeof patterns / sizeof patterns[0] };

static void *worker(void *arg) {
    job *j = (job *)arg;
    pthread_barrier_wait(j->barrier);
    j->result = patterns[j->pattern].read(j->data, j->count);
    return NULL;
}

/* One timed pass with `threads` threads; returns GB/s. */
static double measure(const uint64_t *buf, size_t words, int threads, int pattern, uint64_t *checksum) {
    pthread_t tid[64];
    job jobs[64];
    pthread_barrier_t barrier;
    size_t per = (words / (size_t)threads) & ~(size_t)15;
    double t0, t1;
    int t;
    pthread_barrier_init(&barrier, NULL, (unsigned)threads + 1);
    for (t = 0; t < threads; ++t) {
        jobs[t].data = buf + (size_t)t * per;
        jobs[t].count = t == threads - 1 ? words - (size_t)t * per : per;
        jobs[t].barrier = &barrier;
        jobs[t].pattern = pattern;
        jobs[t].result = 0;
        if (pthread_create(&tid[t], NULL, worker, &jobs[t]) != 0) {
            fprintf(stderr, "error: pthread_create failed\n");
            exit(1);
        }
    }
    t0 = now_seconds();
    pthread_barrier_wait(&barrier);
    for (t = 0; t < threads; ++t) pthread_join(tid[t], NULL);
    t1 = now_seconds();
    pthread_barrier_destroy(&barrier);
    for (t = 0; t < threads; ++t) *checksum += jobs[t].result;
    return (double)(words * sizeof(uint64_t)) / (t1 - t0) / 1e9;
}

int main(int argc, char **argv) {
    size_t size_mib = 1024, words, i;
    int runs = 5, n_threads = 0, threads[16], a, r, k;
    uint64_t *buf, checksum = 0;
    char spec[256] = "1,2";
    for (a = 1; a < argc; ++a) {
        if (strcmp(argv[a], "--size-mib") == 0 && a + 1 < argc) size_mib = (size_t)strtoul(argv[++a], NULL, 10);
        else if (strcmp(argv[a], "--runs") == 0 && a + 1 < argc) runs = atoi(argv[++a]);
        else if (strcmp(argv[a], "--threads") == 0 && a + 1 < argc) {
            strncpy(spec, argv[++a], sizeof spec - 1);
        } else {
            fprintf(stderr, "usage: bandwidth [--size-mib N] [--threads 1,2] [--runs N]\n");
            return 2;
        }
    }
    {
        char *tok = strtok(spec, ",");
        while (tok && n_threads < 16) {
            threads[n_threads] = atoi(tok);
            if (threads[n_threads] < 1 || threads[n_threads] > 64) {
                fprintf(stderr, "error: thread counts must be in [1, 64]\n");
                return 2;
            }
            ++n_threads;
            tok = strtok(NULL, ",");
        }
    }
    if (size_mib < 1 || runs < 1 || runs > 64 || n_threads == 0) {
        fprintf(stderr, "error: bad arguments\n");
        return 2;
    }
    words = size_mib * 1024 * 1024 / sizeof(uint64_t);
    if (posix_memalign((void **)&buf, 4096, words * sizeof(uint64_t)) != 0) {
        fprintf(stderr, "error: cannot allocate %zu MiB\n", size_mib);
        return 1;
    }
    for (i = 0; i < words; ++i) buf[i] = i * 0x9E3779B97F4A7C15ull;

    printf("{\"buffer_bytes\": %zu, \"runs\": %d, \"results\": [", words * sizeof(uint64_t), runs);
    for (k = 0; k < n_threads; ++k) {
        double best = 0, all[PATTERNS][64];
        int best_pattern = 0, pi;
        for (pi = 0; pi < PATTERNS; ++pi) {
            measure(buf, words, threads[k], pi, &checksum); /* warm-up */
            for (r = 0; r < runs; ++r) {
                all[pi][r] = measure(buf, words, threads[k], pi, &checksum);
                if (all[pi][r] > best) {
                    best = all[pi][r];
                    best_pattern = pi;
                }
            }
        }
        printf("%s{\"threads\": %d, \"gbps\": %.3f, \"pattern\": \"%s\", \"patterns\": [", k ? ", " : "",
               threads[k], best, patterns[best_pattern].name);
        for (pi = 0; pi < PATTERNS; ++pi) {
            printf("%s{\"pattern\": \"%s\", \"all_gbps\": [", pi ? ", " : "", patterns[pi].name);
            for (r = 0; r < runs; ++r) printf("%s%.3f", r ? ", " : "", all[pi][r]);
            printf("]}");
        }
        printf("]}");
    }
    printf("], \"checksum\": %llu}\n", (unsigned long long)checksum);
    free(buf);
    return 0;
}
