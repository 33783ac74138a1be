/*
 * bench.c — prefill and decode throughput of libdynmoe on one checkpoint, through the C API.
 *
 * For one thread count and one or more routing policies it measures:
 *  - load:    wall time of dynmoe_model_load, and resident memory (VmRSS, split into anonymous
 *             and file-backed pages, and the peak VmHWM from /proc/self/status) before and after;
 *  - prefill: dynmoe_session_eval of a PROMPT-token prompt (pseudo-random ids) from position 0,
 *             best of RUNS runs (the session is rewound to 0 between runs); tokens/s, and
 *             GFLOP/s = the matrix products' FLOPs / time: 2 x (activated parameters per token
 *             - the LM head's) x prompt tokens + 2 x the LM head's parameters (the call asks for
 *             the last position's logits only, so the head runs once; before 0.5.0 it was
 *             counted for every prompt token); attention scores are not counted. Also, from the
 *             best run's timing (dynmoe_session_get_timing), the attention part alone: the
 *             q/k/v/o projections of every prompt token, the large products of a prefill, plus
 *             the scores and weighted sums, over the attention sub-blocks' time
 *             ("attention_gflops");
 *  - decode:  after the prompt and WARMUP untimed steps, DECODE calls of dynmoe_session_eval with
 *             one token each (pseudo-random ids, or the greedy argmax with --greedy), each call
 *             producing the next-token logits; tokens/s = DECODE / total time (best of
 *             DECODE_RUNS passes, each rewound to the end of the prompt), plus the median step;
 *  - timing:  where the best decode pass's time went (dynmoe_session_get_timing, reset with the
 *             statistics before the timed steps): attention, MoE blocks, LM head, rest;
 *  - routing: the session statistics of the timed decode steps (reset before them):
 *             mean experts per token and activated parameters per token; from these the weight
 *             bytes read per token (activated parameters x bytes per weight of info.dtype), the
 *             effective bandwidth (bytes/token x tokens/s) and, given the machine's read
 *             bandwidth, the bandwidth floor: floor tokens/s = bandwidth / bytes per token, and
 *             the share of it reached, measured / floor.
 *  - bandwidth: with --probe-mib N (at most half of the machine's memory), the read bandwidth is
 *             probed (read_probe.h: best of every read pattern over an N MiB buffer, with the same
 *             thread count) right before the first decode pass and right after every pass, by a
 *             child process forked before the model loads (so its buffer never counts in this
 *             process's memory figures). Each pass is compared with the better of the probes on
 *             either side of it, and the reported share of the floor is the median over the
 *             passes: the machine's bandwidth drifts by 20-30 % over minutes on a VM, and a probe
 *             seconds away from the pass it judges sees the same phase. Without probes,
 *             --bandwidth GBPS gives a fixed figure.
 *             With --sustained-ms MS as well, each probe is followed by a sustained read: the
 *             probe's winning pattern read over and over by a team of threads kept between reads,
 *             for MS milliseconds of read time, total bytes over total time. The best of short
 *             reads is what the memory gives at its best moments; on a VM whose bandwidth moves
 *             within a tenth of a second, a stream averages less over a one-second pass, and the
 *             sustained read measures that average. Each pass is also compared with the better
 *             sustained read next to it ("pct_of_sustained_floor"). Probing between single
 *             decode steps instead was tried and dropped: the probes slowed the steps they
 *             separated.
 *
 *  - alternate: with --alternate NAME (for measuring a change too small for whole-run A/B on a
 *             noisy machine), the environment variable NAME is "1" during half of the decode
 *             steps and "0" during the others (both arms make the same setenv call), for a
 *             scratch build of the library whose forward pass reads it (getenv at the start of
 *             each forward) to switch between two variants of the code under test. Timed steps
 *             go in pairs, the arm changes every pair and each pass starts with the other arm
 *             than the one before, and only the second step of a pair counts (the first may
 *             still carry the other arm's cache state), so both arms see the same phases of the
 *             machine. Reports the mean counted step per arm and their ratio ("1" / "0"); NAME
 *             is unset afterwards. Identical arms gave 0.986-1.025 (ten runs of 8 x 64 steps on
 *             the project machine): repeat a measurement 3+ times.
 *             Prefill runs alternate too (--runs must then be even): one untimed prefill first
 *             (the first one after a load can take seconds while the checkpoint's pages come
 *             back), then the timed runs with NAME "0", "1", "1", "0", "0", "1", ... (each four
 *             runs balanced, so a steady drift of the machine cancels); reports each arm's
 *             median and best prefill and the ratio of the medians ("1" / "0").
 *
 * One JSON object per routing is printed on stdout (one line each); progress goes to stderr.
 *
 * Build: cc -O2 -march=native -std=c99 -pthread -Iinclude bench/bench.c -Lbuild/lib -ldynmoe \
 *           -Wl,-rpath,$PWD/build/lib -lm -o build/bin/bench
 * Usage: bench MODEL_DIR [--threads N] [--routing SPEC[,SPEC...]]... [--prompt N] [--decode N]
 *              [--warmup N] [--runs N] [--decode-runs N] [--bandwidth GBPS | --probe-mib N [--sustained-ms MS]]
 *              [--prefetch] [--mlock] [--greedy] [--kv-dtype f32|f16|bf16] [--alternate NAME]
 *        SPEC = native | top_k:K | top_p:P[:MIN[:MAX]]
 */
#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dynmoe.h"
#include "read_probe.h"

#define MAX_ROUTINGS 32

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("bench: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

#define CHECK(call)                                                                                       \
    do {                                                                                                  \
        dynmoe_status st_ = (call);                                                                       \
        if (st_ != DYNMOE_OK) die("%s: %s: %s", #call, dynmoe_status_name(st_), dynmoe_last_error());    \
    } while (0)

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    long rss, hwm, anon, file; /* KiB, -1 if unknown */
} mem_info;

static mem_info read_mem(void) {
    mem_info m = {-1, -1, -1, -1};
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return m;
    while (fgets(line, sizeof line, f)) {
        long v;
        if (sscanf(line, "VmRSS: %ld", &v) == 1) m.rss = v;
        else if (sscanf(line, "VmHWM: %ld", &v) == 1) m.hwm = v;
        else if (sscanf(line, "RssAnon: %ld", &v) == 1) m.anon = v;
        else if (sscanf(line, "RssFile: %ld", &v) == 1) m.file = v;
    }
    fclose(f);
    return m;
}

static void print_mem(const char *key, mem_info m) {
    printf("\"%s\": {\"rss_kib\": %ld, \"hwm_kib\": %ld, \"anon_kib\": %ld, \"file_kib\": %ld}", key, m.rss, m.hwm,
           m.anon, m.file);
}

static void print_json_string(const char *s) {
    putchar('"');
    for (; *s; ++s) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static dynmoe_policy parse_policy(const char *spec) {
    char buf[128], *fields[4], *p;
    int n = 0;
    dynmoe_policy policy = dynmoe_policy_native();
    if (strlen(spec) >= sizeof buf) die("routing '%s' is too long", spec);
    strcpy(buf, spec);
    for (p = strtok(buf, ":"); p && n < 4; p = strtok(NULL, ":")) fields[n++] = p;
    if (n == 1 && strcmp(fields[0], "native") == 0) return dynmoe_policy_native();
    if (n == 2 && strcmp(fields[0], "top_k") == 0) return dynmoe_policy_top_k((int32_t)atoi(fields[1]));
    if (n >= 2 && strcmp(fields[0], "top_p") == 0) {
        policy = dynmoe_policy_top_p((float)atof(fields[1]));
        if (n >= 3) policy.min_experts = (int32_t)atoi(fields[2]);
        if (n >= 4) policy.max_experts = (int32_t)atoi(fields[3]);
        return policy;
    }
    die("unknown routing '%s' (expected native, top_k:K or top_p:P[:MIN[:MAX]])", spec);
    return policy;
}

static long parse_long(const char *s, const char *what, long lo, long hi) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) die("%s: '%s' is not an integer in [%ld, %ld]", what, s, lo, hi);
    return v;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int32_t argmax(const float *v, int32_t n) {
    int32_t i, best = 0;
    for (i = 1; i < n; ++i)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Deterministic pseudo-random token ids in [lo, vocab). */
static uint64_t rng_state = 0x243F6A8885A308D3ull;
static int32_t next_token(int32_t vocab) {
    int32_t lo = vocab > 16 ? 3 : 0;
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return lo + (int32_t)((rng_state >> 33) % (uint64_t)(vocab - lo));
}

static void stats_summary(dynmoe_session *session, dynmoe_stats_summary *out) {
    dynmoe_stats *stats = NULL;
    CHECK(dynmoe_session_get_stats(session, &stats));
    CHECK(dynmoe_stats_get_summary(stats, out));
    dynmoe_stats_free(stats);
}

static const char *dtype_name(int32_t dtype) {
    switch (dtype) {
    case DYNMOE_DTYPE_F32: return "f32";
    case DYNMOE_DTYPE_F16: return "f16";
    case DYNMOE_DTYPE_BF16: return "bf16";
    default: return "unknown";
    }
}

static int dtype_bytes(int32_t dtype) { return dtype == DYNMOE_DTYPE_F32 ? 4 : 2; }

/* FLOPs of a one-sequence prefill's matrix products: every activated parameter but the LM head's
 * once per prompt token, the LM head once (only the last position's logits are asked for). */
static double prefill_flops(const dynmoe_model_info *info, double activated_per_token, long tokens) {
    double head = (double)info->vocab_size * info->hidden_size;
    return 2.0 * ((activated_per_token - head) * (double)tokens + head);
}

/* FLOPs of the attention sub-blocks of a one-sequence prefill from position 0: the q, k, v and o
 * projections of every token, and each query's scores against the keys up to its position and
 * the weighted sum of their values (causal: t + 1 keys for token t). */
static double attention_flops(const dynmoe_model_info *info, long tokens) {
    double q = (double)info->num_attention_heads * info->head_dim, kv = (double)info->num_key_value_heads * info->head_dim;
    double projections = 2.0 * (double)tokens * info->hidden_size * (2 * q + 2 * kv);
    double keys = (double)tokens * (double)(tokens + 1) / 2;
    return (double)info->num_layers * (projections + 4.0 * q * keys);
}

/* The bandwidth prober: a child process with its own buffer, measuring when asked. */
typedef struct {
    pid_t pid;
    int request, reply; /* pipe ends: one byte asks for a probe, a double comes back */
} prober;

/* Rounds over all read patterns per probe (7 reads of the buffer each). */
enum { PROBE_ROUNDS = 2 };

/*
 * Requests. PROBE_BEST: the best of PROBE_ROUNDS reads of the buffer in every pattern (a few ms
 * each): the strict figure the floor uses. PROBE_SUSTAINED: the pattern that won the last
 * PROBE_BEST read over and over for `sustained_seconds`, total bytes over total time: what the
 * machine delivers on average over a window as long as a decode pass.
 */
enum { PROBE_BEST = 'p', PROBE_SUSTAINED = 's' };

static void prober_child(int request, int reply, size_t words, int threads, double sustained_seconds) {
    uint64_t checksum = 0, *buf = read_probe_buffer(words);
    double g = buf ? 0 : -1;
    read_probe_team team;
    read_probe_member members[READ_PROBE_MAX_THREADS];
    int best_pattern = 0;
    char c;
    if (write(reply, &g, sizeof g) != (ssize_t)sizeof g || !buf) _exit(1); /* 0 = ready, -1 = no memory */
    if (sustained_seconds > 0) read_probe_team_start(&team, members, buf, words, threads);
    while (read(request, &c, 1) == 1) {
        if (c == PROBE_SUSTAINED && sustained_seconds > 0) {
            double bytes = 0, seconds = 0;
            while (seconds < sustained_seconds) {
                double read_gbps = read_probe_team_measure(&team, best_pattern, &checksum);
                bytes += (double)(words * sizeof(uint64_t));
                seconds += (double)(words * sizeof(uint64_t)) / (read_gbps * 1e9);
            }
            g = bytes / seconds / 1e9;
        } else {
            g = read_probe_best(buf, words, threads, PROBE_ROUNDS, &best_pattern, &checksum);
        }
        if (write(reply, &g, sizeof g) != (ssize_t)sizeof g) break;
    }
    if (sustained_seconds > 0) read_probe_team_stop(&team);
    _exit(checksum == 42); /* uses the sums; the exit status is not read */
}

/* Forks the prober and waits until its buffer is filled (before the model loads, so the filling
 * does not overlap anything measured). */
static prober prober_start(size_t mib, int threads, double sustained_seconds) {
    int request[2], reply[2];
    double ready;
    prober p;
    if (pipe(request) != 0 || pipe(reply) != 0) die("pipe failed");
    signal(SIGPIPE, SIG_IGN); /* a prober that died makes write() fail (reported), not kill us */
    fflush(NULL);
    p.pid = fork();
    if (p.pid < 0) die("fork failed");
    if (p.pid == 0) {
        close(request[1]);
        close(reply[0]);
        prober_child(request[0], reply[1], mib * 1024 * 1024 / sizeof(uint64_t), threads, sustained_seconds);
    }
    close(request[0]);
    close(reply[1]);
    p.request = request[1];
    p.reply = reply[0];
    if (read(p.reply, &ready, sizeof ready) != (ssize_t)sizeof ready || ready != 0)
        die("the bandwidth probe could not allocate %zu MiB", mib);
    return p;
}

/* The machine's read bandwidth now, in GB/s, as `kind` (PROBE_BEST or PROBE_SUSTAINED) measures it. */
static double prober_measure(prober *p, char kind) {
    char c = kind;
    double g;
    if (write(p->request, &c, 1) != 1 || read(p->reply, &g, sizeof g) != (ssize_t)sizeof g)
        die("the bandwidth probe process stopped");
    return g;
}

static void prober_stop(prober *p) {
    close(p->request); /* the child sees end of file and exits */
    close(p->reply);
    waitpid(p->pid, NULL, 0);
}

static double median(double *v, long n) {
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* The value of --alternate's variable during timed prefill run r: 0 1 1 0 per four runs. */
static int prefill_arm(long r) { return (int)((r + r / 2) % 2); }

/* The median and the best of the prefill runs with the given arm; `scratch` holds runs / 2 doubles. */
static void prefill_arm_figures(const double *times, long runs, int arm, double *scratch, double *median_seconds,
                                double *best_seconds) {
    long r, n = 0;
    for (r = 0; r < runs; ++r)
        if (prefill_arm(r) == arm) scratch[n++] = times[r];
    *median_seconds = median(scratch, n); /* sorts scratch: its first is the best */
    *best_seconds = scratch[0];
}

/* Judges each decode pass against the better of the two bandwidth readings next to it (readings[d]
 * before pass d, readings[d + 1] after): pass_pct[d] is its share of the floor at that bandwidth,
 * for `bytes_per_pass` weight bytes. Returns the median share and puts the median bandwidth in
 * *median_gbps; `scratch` holds `passes` doubles. */
static double judge_passes(const double *readings, const double *pass_seconds, long passes, double bytes_per_pass,
                           double *pass_pct, double *scratch, double *median_gbps) {
    long d;
    for (d = 0; d < passes; ++d) {
        double gbps = readings[d] > readings[d + 1] ? readings[d] : readings[d + 1];
        pass_pct[d] = 100.0 * bytes_per_pass / pass_seconds[d] / (gbps * 1e9);
        scratch[d] = gbps;
    }
    *median_gbps = median(scratch, passes);
    memcpy(scratch, pass_pct, sizeof(double) * (size_t)passes);
    return median(scratch, passes);
}

int main(int argc, char **argv) {
    const char *model_dir = NULL;
    const char *routing_specs[MAX_ROUTINGS];
    int n_routings = 0, a, r, step, k;
    long threads = 0, prompt_len = 128, decode_len = 64, warmup = 4, runs = 3, decode_runs = 1;
    double bandwidth = 0;
    long probe_mib = 0, sustained_ms = 0;
    prober probe;
    int prefetch = 0, greedy = 0, lock_memory = 0;
    const char *alternate = NULL;
    int32_t kv_dtype = DYNMOE_DTYPE_F32;
    char *spec_copies[MAX_ROUTINGS];
    int n_copies = 0;

    dynmoe_load_params lp;
    dynmoe_model *model = NULL;
    dynmoe_model_info info;
    dynmoe_session_params sp;
    dynmoe_session *session = NULL;
    mem_info mem_before, mem_loaded;
    double t0, load_seconds;
    int32_t *prompt, *decode_tokens;
    float *logits;
    double *prefill_times, *prefill_scratch, *step_times, *best_steps, *pass_seconds, *probes, *pass_pct, *sorted;
    double *sustained, *pass_sustained_pct;
    char native_spec[64];

    for (a = 1; a < argc; ++a) {
        const char *arg = argv[a];
        const char *val = a + 1 < argc ? argv[a + 1] : NULL;
#define NEED_VALUE()                                                                                      \
    do {                                                                                                  \
        if (!val) die("%s needs a value", arg);                                                          \
        ++a;                                                                                              \
    } while (0)
        if (strcmp(arg, "--threads") == 0) { NEED_VALUE(); threads = parse_long(val, arg, 0, 1024); }
        else if (strcmp(arg, "--prompt") == 0) { NEED_VALUE(); prompt_len = parse_long(val, arg, 1, 1 << 20); }
        else if (strcmp(arg, "--decode") == 0) { NEED_VALUE(); decode_len = parse_long(val, arg, 1, 1 << 20); }
        else if (strcmp(arg, "--warmup") == 0) { NEED_VALUE(); warmup = parse_long(val, arg, 0, 1 << 20); }
        else if (strcmp(arg, "--runs") == 0) { NEED_VALUE(); runs = parse_long(val, arg, 1, 1000); }
        else if (strcmp(arg, "--decode-runs") == 0) { NEED_VALUE(); decode_runs = parse_long(val, arg, 1, 1000); }
        else if (strcmp(arg, "--bandwidth") == 0) { NEED_VALUE(); bandwidth = atof(val); }
        else if (strcmp(arg, "--probe-mib") == 0) { NEED_VALUE(); probe_mib = parse_long(val, arg, 0, 1 << 20); }
        else if (strcmp(arg, "--sustained-ms") == 0) { NEED_VALUE(); sustained_ms = parse_long(val, arg, 0, 600000); }
        else if (strcmp(arg, "--prefetch") == 0) prefetch = 1;
        else if (strcmp(arg, "--mlock") == 0) lock_memory = 1;
        else if (strcmp(arg, "--greedy") == 0) greedy = 1;
        else if (strcmp(arg, "--alternate") == 0) {
            NEED_VALUE();
            if (val[0] == '\0' || strchr(val, '=')) die("--alternate needs an environment variable name, got '%s'", val);
            alternate = val;
        }
        else if (strcmp(arg, "--kv-dtype") == 0) {
            NEED_VALUE();
            if (strcmp(val, "f32") == 0) kv_dtype = DYNMOE_DTYPE_F32;
            else if (strcmp(val, "f16") == 0) kv_dtype = DYNMOE_DTYPE_F16;
            else if (strcmp(val, "bf16") == 0) kv_dtype = DYNMOE_DTYPE_BF16;
            else die("--kv-dtype must be f32, f16 or bf16, got '%s'", val);
        }
        else if (strcmp(arg, "--routing") == 0) {
            char *copy, *p;
            NEED_VALUE();
            if (n_copies == MAX_ROUTINGS) die("too many --routing options");
            copy = (char *)malloc(strlen(val) + 1);
            if (!copy) die("out of memory");
            strcpy(copy, val);
            spec_copies[n_copies++] = copy;
            for (p = strtok(copy, ","); p; p = strtok(NULL, ",")) {
                if (n_routings == MAX_ROUTINGS) die("at most %d routings", MAX_ROUTINGS);
                routing_specs[n_routings++] = p;
            }
        } else if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            puts("usage: bench MODEL_DIR [--threads N] [--routing SPEC[,SPEC...]] [--prompt N] [--decode N]\n"
                 "             [--warmup N] [--runs N] [--decode-runs N] [--bandwidth GBPS | --probe-mib N [--sustained-ms MS]]\n"
                 "             [--prefetch] [--mlock] [--greedy] [--kv-dtype f32|f16|bf16] [--alternate NAME]\n"
                 "SPEC = native | top_k:K | top_p:P[:MIN[:MAX]]; see the comment at the top of bench/bench.c");
            return 0;
        } else if (arg[0] == '-') die("unknown option '%s' (see --help)", arg);
        else if (!model_dir) model_dir = arg;
        else die("unexpected argument '%s'", arg);
#undef NEED_VALUE
    }
    if (!model_dir) die("missing MODEL_DIR (see --help)");
    if (n_routings == 0) routing_specs[n_routings++] = "native";
    if (probe_mib > 0 && bandwidth > 0) die("--bandwidth and --probe-mib exclude each other");
    if (alternate && decode_len % 4 != 0)
        die("--alternate needs --decode to be a multiple of 4 (pairs of steps, as many on as off), got %ld", decode_len);
    if (alternate && runs % 2 != 0)
        die("--alternate needs --runs to be even (as many prefill runs on as off), got %ld", runs);
    if (probe_mib > 0 && (double)probe_mib * 1048576.0 > 0.5 * (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE))
        die("--probe-mib %ld is more than half of this machine's memory", probe_mib);
    if (sustained_ms > 0 && probe_mib == 0) die("--sustained-ms needs --probe-mib (it reads that buffer)");
    if (probe_mib > 0)
        probe = prober_start((size_t)probe_mib, threads > 0 ? (int)threads : (int)sysconf(_SC_NPROCESSORS_ONLN),
                             (double)sustained_ms / 1000.0);

    /* Load. */
    lp = dynmoe_load_params_default();
    lp.n_threads = (int32_t)threads;
    lp.prefetch = prefetch;
    lp.lock_memory = lock_memory;
    mem_before = read_mem();
    t0 = now_seconds();
    CHECK(dynmoe_model_load(model_dir, &lp, &model));
    load_seconds = now_seconds() - t0;
    mem_loaded = read_mem();
    CHECK(dynmoe_model_get_info(model, &info));
    if (info.native_mode == DYNMOE_ROUTING_TOP_P)
        snprintf(native_spec, sizeof native_spec, "top_p:%g", (double)info.native_top_p);
    else
        snprintf(native_spec, sizeof native_spec, "top_k:%d", (int)info.native_top_k);
    fprintf(stderr, "bench: loaded %s (%s, %.3f B parameters, %s) in %.3f s\n", model_dir, info.architecture,
            (double)info.total_parameters / 1e9, dtype_name(info.dtype), load_seconds);

    sp = dynmoe_session_params_default();
    sp.capacity = (int32_t)(prompt_len + warmup + decode_len);
    sp.kv_dtype = kv_dtype;
    CHECK(dynmoe_session_create(model, &sp, &session));

    prompt = (int32_t *)malloc(sizeof(int32_t) * (size_t)prompt_len);
    decode_tokens = (int32_t *)malloc(sizeof(int32_t) * (size_t)(warmup + decode_len));
    logits = (float *)malloc(sizeof(float) * (size_t)info.vocab_size);
    prefill_times = (double *)malloc(sizeof(double) * (size_t)runs);
    prefill_scratch = (double *)malloc(sizeof(double) * (size_t)runs);
    step_times = (double *)malloc(sizeof(double) * (size_t)decode_len);
    best_steps = (double *)malloc(sizeof(double) * (size_t)decode_len);
    pass_seconds = (double *)malloc(sizeof(double) * (size_t)decode_runs);
    pass_pct = (double *)malloc(sizeof(double) * (size_t)decode_runs);
    probes = (double *)malloc(sizeof(double) * (size_t)(decode_runs + 1));
    sorted = (double *)malloc(sizeof(double) * (size_t)(decode_runs + 1));
    sustained = (double *)malloc(sizeof(double) * (size_t)(decode_runs + 1));
    pass_sustained_pct = (double *)malloc(sizeof(double) * (size_t)decode_runs);
    if (!prompt || !decode_tokens || !logits || !prefill_times || !prefill_scratch || !step_times || !best_steps || !pass_seconds ||
        !pass_pct || !probes || !sorted || !sustained || !pass_sustained_pct)
        die("out of memory");
    for (k = 0; k < prompt_len; ++k) prompt[k] = next_token(info.vocab_size);
    for (k = 0; k < warmup + decode_len; ++k) decode_tokens[k] = next_token(info.vocab_size);

    for (k = 0; k < n_routings; ++k) {
        dynmoe_policy policy = parse_policy(routing_specs[k]);
        dynmoe_routing *routing = NULL;
        dynmoe_stats_summary prefill_summary, decode_summary;
        dynmoe_timing decode_timing, prefill_timing = {0}, run_timing;
        double best_prefill = 1e300, best_decode = 1e300, median_step, bytes_per_token, decode_tok_s;
        double prefill_tok_s, prefill_gflops, floor_tok_s, pct_of_floor = 0;
        double sustained_gbps = 0, pct_of_sustained_floor = 0;
        double arm_seconds[2] = {0, 0};
        long arm_steps[2] = {0, 0};
        double arm_prefill_median[2] = {0, 0}, arm_prefill_best[2] = {0, 0};
        mem_info mem_after;
        int d;

        CHECK(dynmoe_routing_create(model, &policy, &routing));
        CHECK(dynmoe_session_set_routing(session, routing));

        /* Prefill: best of `runs`, from position 0 each time (with --alternate, after an untimed
           one, the arms in the order 0 1 1 0 per four runs). */
        for (r = alternate ? -1 : 0; r < runs; ++r) {
            double t;
            int arm = r >= 0 ? prefill_arm(r) : 0;
            if (alternate && setenv(alternate, arm ? "1" : "0", 1) != 0)
                die("cannot set the environment variable '%s'", alternate);
            CHECK(dynmoe_session_rewind(session, 0));
            CHECK(dynmoe_session_reset_stats(session));
            t = now_seconds();
            CHECK(dynmoe_session_eval(session, prompt, (int32_t)prompt_len, NULL, logits, (size_t)info.vocab_size, NULL));
            t = now_seconds() - t;
            if (r < 0) continue;
            CHECK(dynmoe_session_get_timing(session, &run_timing));
            prefill_times[r] = t;
            if (t < best_prefill) {
                best_prefill = t;
                prefill_timing = run_timing;
            }
            if (r == 0) stats_summary(session, &prefill_summary);
        }
        if (alternate) {
            int arm;
            for (arm = 0; arm < 2; ++arm)
                prefill_arm_figures(prefill_times, runs, arm, prefill_scratch, &arm_prefill_median[arm],
                                    &arm_prefill_best[arm]);
        }
        fprintf(stderr, "bench: %s threads %ld: prefill %ld tokens best %.3f s (%.1f tok/s)\n", routing_specs[k],
                threads, prompt_len, best_prefill, (double)prompt_len / best_prefill);

        /* Decode: warm-up steps, then `decode_len` timed single-token evals; best of `decode_runs`,
           with a bandwidth probe before the first pass and after each. */
        if (probe_mib > 0) probes[0] = prober_measure(&probe, PROBE_BEST);
        if (sustained_ms > 0) sustained[0] = prober_measure(&probe, PROBE_SUSTAINED);
        for (d = 0; d < decode_runs; ++d) {
            double total = 0;
            int32_t next = greedy ? argmax(logits, info.vocab_size) : decode_tokens[0];
            CHECK(dynmoe_session_rewind(session, (int32_t)prompt_len));
            if (d > 0) { /* logits of the prompt's last position, for --greedy */
                CHECK(dynmoe_session_rewind(session, (int32_t)prompt_len - 1));
                CHECK(dynmoe_session_eval(session, prompt + prompt_len - 1, 1, NULL, logits, (size_t)info.vocab_size,
                                          NULL));
                next = greedy ? argmax(logits, info.vocab_size) : decode_tokens[0];
            }
            for (step = 0; step < warmup + decode_len; ++step) {
                double t;
                long timed = step - warmup;
                int arm = timed >= 0 ? (int)((timed / 2 + d) % 2) : 0; /* the value of NAME */
                if (step == warmup) CHECK(dynmoe_session_reset_stats(session));
                if (alternate && setenv(alternate, arm ? "1" : "0", 1) != 0)
                    die("cannot set the environment variable '%s'", alternate);
                t = now_seconds();
                CHECK(dynmoe_session_eval(session, &next, 1, NULL, logits, (size_t)info.vocab_size, NULL));
                t = now_seconds() - t;
                if (timed >= 0) {
                    step_times[timed] = t;
                    total += t;
                    if (timed % 2 == 1) {
                        arm_seconds[arm] += t;
                        arm_steps[arm] += 1;
                    }
                }
                next = greedy ? argmax(logits, info.vocab_size) : decode_tokens[step + 1 < warmup + decode_len ? step + 1 : 0];
            }
            pass_seconds[d] = total;
            if (probe_mib > 0) probes[d + 1] = prober_measure(&probe, PROBE_BEST);
            if (sustained_ms > 0) sustained[d + 1] = prober_measure(&probe, PROBE_SUSTAINED);
            if (total < best_decode) {
                best_decode = total;
                memcpy(best_steps, step_times, sizeof(double) * (size_t)decode_len);
                stats_summary(session, &decode_summary);
                CHECK(dynmoe_session_get_timing(session, &decode_timing));
            }
        }
        if (alternate) unsetenv(alternate);
        median_step = median(best_steps, decode_len);
        mem_after = read_mem();

        decode_tok_s = (double)decode_len / best_decode;
        bytes_per_token = decode_summary.activated_parameters_per_token * dtype_bytes(info.dtype);
        prefill_tok_s = (double)prompt_len / best_prefill;
        prefill_gflops = prefill_flops(&info, prefill_summary.activated_parameters_per_token, prompt_len) / best_prefill / 1e9;
        if (probe_mib > 0)
            pct_of_floor = judge_passes(probes, pass_seconds, decode_runs, bytes_per_token * (double)decode_len, pass_pct,
                                        sorted, &bandwidth);
        if (sustained_ms > 0)
            pct_of_sustained_floor = judge_passes(sustained, pass_seconds, decode_runs,
                                                  bytes_per_token * (double)decode_len, pass_sustained_pct, sorted,
                                                  &sustained_gbps);
        floor_tok_s = bandwidth > 0 ? bandwidth * 1e9 / bytes_per_token : 0;
        if (probe_mib == 0) pct_of_floor = floor_tok_s > 0 ? 100.0 * decode_tok_s / floor_tok_s : 0.0;
        fprintf(stderr, "bench: %s threads %ld: decode %ld tokens %.3f s (%.2f tok/s), %.2f experts/token\n",
                routing_specs[k], threads, decode_len, best_decode, decode_tok_s, decode_summary.mean_experts_per_token);

        printf("{\"dynmoe_version\": \"%s\", \"system_info\": \"%s\", \"model\": ", dynmoe_version(), dynmoe_system_info());
        print_json_string(model_dir);
        printf(", \"family\": ");
        print_json_string(info.family);
        printf(", \"architecture\": ");
        print_json_string(info.architecture);
        printf(", \"dtype\": \"%s\", \"bytes_per_weight\": %d", dtype_name(info.dtype), dtype_bytes(info.dtype));
        printf(", \"num_layers\": %d, \"num_moe_layers\": %d, \"num_experts\": %d, \"hidden_size\": %d, \"vocab_size\": %d",
               (int)info.num_layers, (int)info.num_moe_layers, (int)info.num_experts, (int)info.hidden_size,
               (int)info.vocab_size);
        printf(", \"num_attention_heads\": %d, \"num_key_value_heads\": %d, \"head_dim\": %d", (int)info.num_attention_heads,
               (int)info.num_key_value_heads, (int)info.head_dim);
        printf(", \"total_parameters\": %lld, \"parameters_per_expert\": %lld, \"always_active_parameters\": %lld",
               (long long)info.total_parameters, (long long)info.parameters_per_expert,
               (long long)info.always_active_parameters);
        printf(", \"native_routing\": \"%s\", \"routing\": ", native_spec);
        print_json_string(routing_specs[k]);
        printf(", \"threads\": %ld, \"prompt_tokens\": %ld, \"decode_tokens\": %ld, \"warmup_tokens\": %ld", threads,
               prompt_len, decode_len, warmup);
        printf(", \"prefill_runs\": %ld, \"decode_runs\": %ld, \"greedy\": %s, \"prefetch\": %s, \"mlock\": %s", runs,
               decode_runs, greedy ? "true" : "false", prefetch ? "true" : "false", lock_memory ? "true" : "false");
        printf(", \"kv_dtype\": \"%s\"", dtype_name(kv_dtype));
        printf(", \"load_seconds\": %.6f, ", load_seconds);
        print_mem("memory_before_load", mem_before);
        printf(", ");
        print_mem("memory_after_load", mem_loaded);
        printf(", ");
        print_mem("memory_after_run", mem_after);
        printf(", \"prefill\": {\"seconds\": %.6f, \"all_seconds\": [", best_prefill);
        for (r = 0; r < runs; ++r) printf("%s%.6f", r ? ", " : "", prefill_times[r]);
        printf("], \"tok_s\": %.4f, \"gflops\": %.4f, \"mean_experts_per_token\": %.6f, "
               "\"activated_parameters_per_token\": %.1f, \"attention_seconds\": %.6f, \"attention_gflops\": %.4f, "
               "\"moe_seconds\": %.6f, \"head_seconds\": %.6f}",
               prefill_tok_s, prefill_gflops, prefill_summary.mean_experts_per_token,
               prefill_summary.activated_parameters_per_token, prefill_timing.attention_seconds,
               attention_flops(&info, prompt_len) / prefill_timing.attention_seconds / 1e9, prefill_timing.moe_seconds,
               prefill_timing.head_seconds);
        printf(", \"decode\": {\"seconds\": %.6f, \"tok_s\": %.4f, \"median_step_seconds\": %.6f, "
               "\"tok_s_median\": %.4f, \"mean_experts_per_token\": %.6f, \"activated_parameters_per_token\": %.1f, "
               "\"bytes_per_token\": %.1f, \"gbps\": %.4f, \"bandwidth_gbps\": %.4f, \"floor_tok_s\": %.4f, "
               "\"pct_of_floor\": %.4f",
               best_decode, decode_tok_s, median_step, 1.0 / median_step, decode_summary.mean_experts_per_token,
               decode_summary.activated_parameters_per_token, bytes_per_token, bytes_per_token * decode_tok_s / 1e9,
               bandwidth, floor_tok_s, pct_of_floor);
        if (sustained_ms > 0)
            printf(", \"sustained_ms\": %ld, \"sustained_bandwidth_gbps\": %.4f, \"pct_of_sustained_floor\": %.4f",
                   sustained_ms, sustained_gbps, pct_of_sustained_floor);
        printf(", \"passes\": [");
        for (d = 0; d < decode_runs; ++d) {
            printf("%s{\"seconds\": %.6f, \"tok_s\": %.4f", d ? ", " : "", pass_seconds[d], decode_len / pass_seconds[d]);
            if (probe_mib > 0)
                printf(", \"bandwidth_probes_gbps\": [%.4f, %.4f], \"pct_of_floor\": %.4f", probes[d], probes[d + 1],
                       pass_pct[d]);
            if (sustained_ms > 0)
                printf(", \"sustained_probes_gbps\": [%.4f, %.4f], \"pct_of_sustained_floor\": %.4f", sustained[d],
                       sustained[d + 1], pass_sustained_pct[d]);
            printf("}");
        }
        printf("]");
        printf(", \"timing\": {\"passes\": %lld, \"total_seconds\": %.6f, \"attention_seconds\": %.6f, "
               "\"moe_seconds\": %.6f, \"dense_seconds\": %.6f, \"head_seconds\": %.6f, \"other_seconds\": %.6f}}",
               (long long)decode_timing.passes, decode_timing.total_seconds, decode_timing.attention_seconds,
               decode_timing.moe_seconds, decode_timing.dense_seconds, decode_timing.head_seconds,
               decode_timing.other_seconds);
        if (alternate) {
            double on = arm_seconds[1] / (double)arm_steps[1], off = arm_seconds[0] / (double)arm_steps[0];
            printf(", \"alternate\": {\"variable\": ");
            print_json_string(alternate);
            printf(", \"steps_per_arm\": %ld, \"on_step_seconds\": %.9g, \"off_step_seconds\": %.9g, \"ratio\": %.6f}",
                   arm_steps[1], on, off, on / off);
            fprintf(stderr, "bench: %s threads %ld: %s=1 / %s=0: %.3f / %.3f ms per step, ratio %.4f (%ld steps each)\n",
                    routing_specs[k], threads, alternate, alternate, on * 1e3, off * 1e3, on / off, arm_steps[1]);
            printf(", \"prefill_alternate\": {\"runs_per_arm\": %ld, \"on_median_seconds\": %.9g, "
                   "\"off_median_seconds\": %.9g, \"on_best_seconds\": %.9g, \"off_best_seconds\": %.9g, \"ratio\": %.6f}",
                   runs / 2, arm_prefill_median[1], arm_prefill_median[0], arm_prefill_best[1], arm_prefill_best[0],
                   arm_prefill_median[1] / arm_prefill_median[0]);
            fprintf(stderr, "bench: %s threads %ld: prefill %s=1 / %s=0: median %.1f / %.1f ms, best %.1f / %.1f ms, "
                    "ratio %.4f (%ld runs each)\n", routing_specs[k], threads, alternate, alternate,
                    arm_prefill_median[1] * 1e3, arm_prefill_median[0] * 1e3, arm_prefill_best[1] * 1e3,
                    arm_prefill_best[0] * 1e3, arm_prefill_median[1] / arm_prefill_median[0], runs / 2);
        }
        printf("}\n");
        fflush(stdout);
        dynmoe_routing_free(routing);
    }

    dynmoe_session_free(session);
    dynmoe_model_free(model);
    if (probe_mib > 0) prober_stop(&probe);
    free(prompt);
    free(decode_tokens);
    free(logits);
    free(prefill_times);
    free(prefill_scratch);
    free(step_times);
    free(best_steps);
    free(pass_seconds);
    free(pass_pct);
    free(probes);
    free(sorted);
    free(sustained);
    free(pass_sustained_pct);
    for (k = 0; k < n_copies; ++k) free(spec_copies[k]);
    return 0;
}
