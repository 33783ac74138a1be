/*
 * read_probe.h — the memory read-bandwidth probe shared by bandwidth.c (the standalone tool) and
 * bench.c (which probes right next to every decode pass). Header-only so each program stays one
 * compile: cc -O3 -march=native -pthread.
 *
 * A probe sums a buffer much larger than the caches: each of T threads (pthreads) reads its
 * contiguous 1/T of the buffer with 256-bit loads (AVX2, four independent accumulators), in one
 * of the read patterns below. The wall time from the common start to the last thread's end gives
 * bytes / second (GB = 1e9 bytes). One stream alone does not reach what a core can read: on the
 * Zen 3 this was written on, one core reads ~18 GB/s from one stream and ~25 GB/s from four, and
 * which pattern is fastest differs between machines and runs, so callers take the best of all.
 */
#ifndef DYNMOE_BENCH_READ_PROBE_H
#define DYNMOE_BENCH_READ_PROBE_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static double read_probe_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The buffer is read in chunks of 1 MiB, the size of one expert matrix of the benchmark model. */
enum { READ_PROBE_CHUNK_WORDS = (1 << 20) / sizeof(uint64_t) };

/*
 * Each pattern sums n words, every 1 MiB chunk read as `streams` equal parts side by side,
 * `step` bytes of each part per step (one 256-bit load per 32 bytes), with or without a software
 * prefetch 1 KiB ahead at every step. "4 streams, 32 B + prefetch" is the access pattern of
 * dynmoe's decode kernel.
 */
#ifdef __AVX2__
#define READ_PROBE_PATTERN(NAME, STREAMS, STEP, PREFETCH)                                              \
    static uint64_t NAME(const uint64_t *p, size_t n) {                                               \
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),     \
                          _mm256_setzero_si256()};                                                     \
        uint64_t lanes[4], s;                                                                          \
        size_t chunk, i, j, end = n - n % READ_PROBE_CHUNK_WORDS;                                      \
        int k, l;                                                                                      \
        for (chunk = 0; chunk < end; chunk += READ_PROBE_CHUNK_WORDS) {                                \
            for (i = 0; i < READ_PROBE_CHUNK_WORDS / STREAMS; i += STEP / 8) {                         \
                for (k = 0; k < STREAMS; ++k) {                                                        \
                    const uint64_t *q = p + chunk + (size_t)k * (READ_PROBE_CHUNK_WORDS / STREAMS) + i; \
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
#define READ_PROBE_PATTERN(NAME, STREAMS, STEP, PREFETCH)                                              \
    static uint64_t NAME(const uint64_t *p, size_t n) {                                               \
        size_t chunk, i, j, end = n - n % READ_PROBE_CHUNK_WORDS;                                      \
        uint64_t s = 0;                                                                                \
        int k;                                                                                         \
        for (chunk = 0; chunk < end; chunk += READ_PROBE_CHUNK_WORDS)                                  \
            for (i = 0; i < READ_PROBE_CHUNK_WORDS / STREAMS; i += STEP / 8)                           \
                for (k = 0; k < STREAMS; ++k)                                                          \
                    for (j = 0; j < STEP / 8; ++j) s += p[chunk + (size_t)k * (READ_PROBE_CHUNK_WORDS / STREAMS) + i + j]; \
        for (j = end; j < n; ++j) s += p[j];                                                           \
        return s;                                                                                      \
    }
#endif

READ_PROBE_PATTERN(read_probe_1_64_prefetched, 1, 64, 1)
READ_PROBE_PATTERN(read_probe_1_128, 1, 128, 0)
READ_PROBE_PATTERN(read_probe_2_64_prefetched, 2, 64, 1)
READ_PROBE_PATTERN(read_probe_2_128, 2, 128, 0)
READ_PROBE_PATTERN(read_probe_4_32_prefetched, 4, 32, 1)
READ_PROBE_PATTERN(read_probe_4_64_prefetched, 4, 64, 1)
READ_PROBE_PATTERN(read_probe_4_128, 4, 128, 0)

static const struct {
    const char *name;
    uint64_t (*read)(const uint64_t *, size_t);
} read_probe_patterns[] = {
    {"1 stream, 64 B + prefetch", read_probe_1_64_prefetched},  {"1 stream, 128 B", read_probe_1_128},
    {"2 streams, 64 B + prefetch", read_probe_2_64_prefetched}, {"2 streams, 128 B", read_probe_2_128},
    {"4 streams, 32 B + prefetch", read_probe_4_32_prefetched}, {"4 streams, 64 B + prefetch", read_probe_4_64_prefetched},
    {"4 streams, 128 B", read_probe_4_128},
};
enum { READ_PROBE_PATTERNS = sizeof read_probe_patterns / sizeof read_probe_patterns[0] };

/* Most threads a probe runs. */
enum { READ_PROBE_MAX_THREADS = 64 };

typedef struct {
    const uint64_t *data;
    size_t count; /* uint64 words */
    int pattern;
    pthread_barrier_t *barrier;
    uint64_t result;
} read_probe_job;

static void *read_probe_worker(void *arg) {
    read_probe_job *j = (read_probe_job *)arg;
    pthread_barrier_wait(j->barrier);
    j->result = read_probe_patterns[j->pattern].read(j->data, j->count);
    return NULL;
}

/* Allocates a buffer of `words` words, page-aligned and filled (so every page is really there);
 * NULL if it cannot. */
static uint64_t *read_probe_buffer(size_t words) {
    uint64_t *buf = NULL;
    size_t i;
    if (posix_memalign((void **)&buf, 4096, words * sizeof(uint64_t)) != 0) return NULL;
    for (i = 0; i < words; ++i) buf[i] = i * 0x9E3779B97F4A7C15ull;
    return buf;
}

/* Thread t's part of a buffer of `words` words read by `threads` threads: contiguous, whole
 * 128-byte groups, the last thread taking the remainder; returns its first word, count in *count. */
static inline size_t read_probe_part(size_t words, int threads, int t, size_t *count) {
    size_t per = (words / (size_t)threads) & ~(size_t)15;
    *count = t == threads - 1 ? words - (size_t)t * per : per;
    return (size_t)t * per;
}

/* One timed read of the whole buffer by `threads` threads (1..READ_PROBE_MAX_THREADS) in
 * `pattern`; returns GB/s (exits if a thread cannot be started). The sums go to `checksum` so
 * the reads cannot be optimised away. */
static double read_probe_measure(const uint64_t *buf, size_t words, int threads, int pattern, uint64_t *checksum) {
    pthread_t tid[READ_PROBE_MAX_THREADS];
    read_probe_job jobs[READ_PROBE_MAX_THREADS];
    pthread_barrier_t barrier;
    double t0, t1;
    int t;
    pthread_barrier_init(&barrier, NULL, (unsigned)threads + 1);
    for (t = 0; t < threads; ++t) {
        jobs[t].data = buf + read_probe_part(words, threads, t, &jobs[t].count);
        jobs[t].barrier = &barrier;
        jobs[t].pattern = pattern;
        jobs[t].result = 0;
        if (pthread_create(&tid[t], NULL, read_probe_worker, &jobs[t]) != 0) {
            fprintf(stderr, "read_probe: pthread_create failed\n");
            exit(1);
        }
    }
    t0 = read_probe_now();
    pthread_barrier_wait(&barrier);
    for (t = 0; t < threads; ++t) pthread_join(tid[t], NULL);
    t1 = read_probe_now();
    pthread_barrier_destroy(&barrier);
    for (t = 0; t < threads; ++t) *checksum += jobs[t].result;
    return (double)(words * sizeof(uint64_t)) / (t1 - t0) / 1e9;
}

/*
 * A team of threads kept between probes, for probes short enough (a few milliseconds) that
 * starting threads would show in the figure. The caller is member 0. Each member clocks its own
 * read, after a spinning rendezvous so that no member starts while another is still waking up;
 * the bandwidth is the bytes over the span from the first start to the last end. Between probes
 * the members sleep in a barrier, so the team costs nothing while the benchmark runs.
 */
typedef struct {
    const uint64_t *buf;
    size_t words;
    int threads, pattern, quit, arrived;
    pthread_t tid[READ_PROBE_MAX_THREADS];
    pthread_barrier_t start, end;
    double begin[READ_PROBE_MAX_THREADS], finish[READ_PROBE_MAX_THREADS];
    uint64_t result[READ_PROBE_MAX_THREADS];
} read_probe_team;

typedef struct {
    read_probe_team *team;
    int member;
} read_probe_member;

static inline void read_probe_team_read(read_probe_team *team, int member) {
    size_t count, first = read_probe_part(team->words, team->threads, member, &count);
    __atomic_add_fetch(&team->arrived, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&team->arrived, __ATOMIC_ACQUIRE) < team->threads) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    team->begin[member] = read_probe_now();
    team->result[member] = read_probe_patterns[team->pattern].read(team->buf + first, count);
    team->finish[member] = read_probe_now();
}

static inline void *read_probe_team_worker(void *arg) {
    read_probe_member *m = (read_probe_member *)arg;
    for (;;) {
        pthread_barrier_wait(&m->team->start);
        if (m->team->quit) return NULL;
        read_probe_team_read(m->team, m->member);
        pthread_barrier_wait(&m->team->end);
    }
}

/* Starts `threads` - 1 members (1..READ_PROBE_MAX_THREADS) that will read the first `words` words
 * of `buf`; exits if a thread cannot be started. */
static inline void read_probe_team_start(read_probe_team *team, read_probe_member *members, const uint64_t *buf,
                                  size_t words, int threads) {
    int t;
    team->buf = buf;
    team->words = words;
    team->threads = threads;
    team->quit = 0;
    pthread_barrier_init(&team->start, NULL, (unsigned)threads);
    pthread_barrier_init(&team->end, NULL, (unsigned)threads);
    for (t = 1; t < threads; ++t) {
        members[t].team = team;
        members[t].member = t;
        if (pthread_create(&team->tid[t], NULL, read_probe_team_worker, &members[t]) != 0) {
            fprintf(stderr, "read_probe: pthread_create failed\n");
            exit(1);
        }
    }
}

/* One timed read of the team's buffer in `pattern`; returns GB/s. */
static inline double read_probe_team_measure(read_probe_team *team, int pattern, uint64_t *checksum) {
    double first, last;
    int t;
    team->pattern = pattern;
    team->arrived = 0;
    pthread_barrier_wait(&team->start);
    read_probe_team_read(team, 0);
    pthread_barrier_wait(&team->end);
    first = team->begin[0];
    last = team->finish[0];
    for (t = 0; t < team->threads; ++t) {
        if (team->begin[t] < first) first = team->begin[t];
        if (team->finish[t] > last) last = team->finish[t];
        *checksum += team->result[t];
    }
    return (double)(team->words * sizeof(uint64_t)) / (last - first) / 1e9;
}

static inline void read_probe_team_stop(read_probe_team *team) {
    int t;
    team->quit = 1;
    pthread_barrier_wait(&team->start);
    for (t = 1; t < team->threads; ++t) pthread_join(team->tid[t], NULL);
    pthread_barrier_destroy(&team->start);
    pthread_barrier_destroy(&team->end);
}

/* The best GB/s of `rounds` reads in every pattern; the winning pattern's index goes to
 * `best_pattern` when not NULL. */
static inline double read_probe_best(const uint64_t *buf, size_t words, int threads, int rounds, int *best_pattern,
                                     uint64_t *checksum) {
    double best = 0;
    int r, p;
    for (r = 0; r < rounds; ++r)
        for (p = 0; p < READ_PROBE_PATTERNS; ++p) {
            double g = read_probe_measure(buf, words, threads, p, checksum);
            if (g > best) {
                best = g;
                if (best_pattern) *best_pattern = p;
            }
        }
    return best;
}

#endif
