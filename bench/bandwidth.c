/*
 * bandwidth.c — measures the machine's memory read bandwidth, the ceiling of a
 * memory-bandwidth-bound decoder.
 *
 * A buffer much larger than the caches (1 GiB by default) is filled once, then summed: each of
 * T threads (pthreads) reads its contiguous 1/T of the buffer with 256-bit loads (AVX2, four
 * independent accumulators) and the wall time from the common start to the last thread's end
 * gives bytes / second. The best of several runs is reported for each thread count, as JSON on
 * stdout:
 *
 *   {"buffer_bytes": ..., "runs": 7, "results": [{"threads": 1, "gbps": 14.2, "all_gbps": [...]}, ...]}
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
    pthread_barrier_t *barrier;
    uint64_t result;
} job;

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t sum_words(const uint64_t *p, size_t n) {
    size_t i = 0;
    uint64_t s = 0;
#ifdef __AVX2__
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 4)));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 8)));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 12)));
    }
    {
        uint64_t lanes[4];
        __m256i t = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
        _mm256_storeu_si256((__m256i *)lanes, t);
        s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    }
#else
    {
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (; i + 4 <= n; i += 4) {
            s0 += p[i];
            s1 += p[i + 1];
            s2 += p[i + 2];
            s3 += p[i + 3];
        }
        s = s0 + s1 + s2 + s3;
    }
#endif
    for (; i < n; ++i) s += p[i];
    return s;
}

static void *worker(void *arg) {
    job *j = (job *)arg;
    pthread_barrier_wait(j->barrier);
    j->result = sum_words(j->data, j->count);
    return NULL;
}

/* One timed pass with `threads` threads; returns GB/s. */
static double measure(const uint64_t *buf, size_t words, int threads, uint64_t *checksum) {
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
    int runs = 7, n_threads = 0, threads[16], a, r, k;
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
    if (size_mib < 1 || runs < 1 || n_threads == 0) {
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
        double best = 0;
        double all[256];
        measure(buf, words, threads[k], &checksum); /* warm-up */
        for (r = 0; r < runs && r < 256; ++r) {
            all[r] = measure(buf, words, threads[k], &checksum);
            if (all[r] > best) best = all[r];
        }
        printf("%s{\"threads\": %d, \"gbps\": %.3f, \"all_gbps\": [", k ? ", " : "", threads[k], best);
        for (r = 0; r < runs && r < 256; ++r) printf("%s%.3f", r ? ", " : "", all[r]);
        printf("]}");
    }
    printf("], \"checksum\": %llu}\n", (unsigned long long)checksum);
    free(buf);
    return 0;
}
