/*
 * bandwidth.c — measures the machine's memory read bandwidth, the ceiling of a
 * memory-bandwidth-bound decoder.
 *
 * A buffer much larger than the caches (1 GiB by default) is filled once, then summed by T
 * threads in each of the read patterns of read_probe.h (1, 2 or 4 streams side by side, with and
 * without software prefetch). For each thread count the best over all patterns and runs is the
 * reported bandwidth, as JSON on stdout:
 *
 *   {"buffer_bytes": ..., "runs": 5, "results": [{"threads": 1, "gbps": 24.2,
 *     "pattern": "2 streams, 128 B", "patterns": [{"pattern": ..., "all_gbps": [...]}, ...]}, ...]}
 *
 * GB are 1e9 bytes. Build: cc -O3 -march=native -pthread bench/bandwidth.c -o build/bin/bandwidth
 * Usage:  bandwidth [--size-mib N] [--threads 1,2] [--runs N]
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "read_probe.h"

int main(int argc, char **argv) {
    size_t size_mib = 1024, words;
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
    buf = read_probe_buffer(words);
    if (!buf) {
        fprintf(stderr, "error: cannot allocate %zu MiB\n", size_mib);
        return 1;
    }

    printf("{\"buffer_bytes\": %zu, \"runs\": %d, \"results\": [", words * sizeof(uint64_t), runs);
    for (k = 0; k < n_threads; ++k) {
        double best = 0, all[READ_PROBE_PATTERNS][64];
        int best_pattern = 0, pi;
        for (pi = 0; pi < READ_PROBE_PATTERNS; ++pi) {
            read_probe_measure(buf, words, threads[k], pi, &checksum); /* warm-up */
            for (r = 0; r < runs; ++r) {
                all[pi][r] = read_probe_measure(buf, words, threads[k], pi, &checksum);
                if (all[pi][r] > best) {
                    best = all[pi][r];
                    best_pattern = pi;
                }
            }
        }
        printf("%s{\"threads\": %d, \"gbps\": %.3f, \"pattern\": \"%s\", \"patterns\": [", k ? ", " : "",
               threads[k], best, read_probe_patterns[best_pattern].name);
        for (pi = 0; pi < READ_PROBE_PATTERNS; ++pi) {
            printf("%s{\"pattern\": \"%s\", \"all_gbps\": [", pi ? ", " : "", read_probe_patterns[pi].name);
            for (r = 0; r < runs; ++r) printf("%s%.3f", r ? ", " : "", all[pi][r]);
            printf("]}");
        }
        printf("]}");
    }
    printf("], \"checksum\": %llu}\n", (unsigned long long)checksum);
    free(buf);
    return 0;
}
