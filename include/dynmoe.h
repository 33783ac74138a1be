/*
 * dynmoe.h — C API of libdynmoe, a Mixture-of-Experts inference engine with dynamic routing.
 *
 * dynmoe runs Hugging Face MoE checkpoints (the Dynamic-MoE paper's MoEForCausalLM, Mixtral,
 * Qwen2-MoE, Qwen3-MoE, OLMoE) on the CPU and lets the caller choose, per call and per layer,
 * how many experts each token uses: the family's native rule, a fixed top-k, or top-p ("dynamic")
 * routing (arXiv 2403.07652). Experts that no token chose are not computed, and every routing
 * decision can be observed: traces, a per-layer observer callback, accumulated statistics.
 *
 * Conventions
 *  - Every function that can fail returns a dynmoe_status; DYNMOE_OK is 0. On failure,
 *    dynmoe_last_error() returns a message naming the file, tensor, field or argument at fault.
 *    Failed calls leave their objects unchanged.
 *  - Objects are opaque handles created by *_create / *_load / *_get_* and released by the
 *    matching *_free. Passing NULL to a *_free function does nothing.
 *  - Output arrays are owned by the caller and passed with their capacity in elements; a
 *    capacity that is too small gives DYNMOE_ERR_BUFFER_TOO_SMALL and writes nothing. Getters
 *    that report a count (`out_count`, `out_length`) take a NULL array with capacity 0 as a
 *    size query; the sizes of the others follow from dynmoe_model_get_info,
 *    dynmoe_trace_get_shape or the layer's num_experts.
 *  - Tensors are row-major. "B" is the batch (sequences), "T" the tokens per sequence, "V" the
 *    vocabulary size, "H" the hidden size, "E" the experts of a layer.
 *
 * Thread safety
 *  - A model may be used from any number of threads at once: forwards, sessions, statistics.
 *  - A session, routing, trace or stats object must be used by one thread at a time; a session
 *    detects concurrent use and fails with DYNMOE_ERR_BUSY instead of corrupting its cache.
 *  - Free an object only when no other thread is using it.
 *  - Callbacks (routing observer, token callback, load progress) run on the calling thread,
 *    inside the call. They may read the session or model they belong to (position, capacity,
 *    statistics, timing, info) and use other objects freely; evaluating, generating, rewinding
 *    or changing the routing of the session whose call is running fails with DYNMOE_ERR_BUSY.
 *
 * This header is the library's manual. The implementation is checked against every declaration
 * here by the Swift compiler (`@c @implementation`), and the library exports exactly these
 * functions.
 */
#ifndef DYNMOE_H
#define DYNMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Version and errors                                                                          */
/* ------------------------------------------------------------------------------------------ */

#define DYNMOE_VERSION_MAJOR 0
#define DYNMOE_VERSION_MINOR 5
#define DYNMOE_VERSION_PATCH 0

/** The library's version as "MAJOR.MINOR.PATCH". Never NULL; static storage. */
const char *dynmoe_version(void);

/**
 * What the library runs on this machine, as one line of space-separated key=value pairs, e.g.
 * "version=0.5.0 build=avx2,fma,f16c prefill=avx512 decode=avx512 cpus=2":
 *  - version: as dynmoe_version();
 *  - build:   the instruction sets the kernels were compiled for (DYNMOE_TARGET_CPU at build
 *             time), comma-separated; "baseline" when none of avx2, fma, f16c;
 *  - prefill: the bf16 matrix kernel for several tokens on this CPU: "avx512" (chosen at run
 *             time when the CPU runs AVX-512 F + BW; 2 or more tokens), "avx2" (4 or more), or
 *             "swift" (a build without AVX2);
 *  - decode:  the bf16 kernel for one token: "avx512" (chosen at run time like prefill's),
 *             "avx2" (8-lane AVX2 + FMA) or "simd8" (portable build); f16 and f32 weights, and
 *             bf16 products of 2-3 tokens without AVX-512, use the 8-lane kernel;
 *  - cpus:    online CPUs, the thread count a model gets with dynmoe_load_params.n_threads = 0.
 * The environment variable DYNMOE_MAX_ISA=avx2, set before the library first runs a kernel, keeps
 * the AVX-512 kernels off (prefill=avx2 decode=avx2 on such a CPU): to compare kernels, or to get
 * the results of a CPU without AVX-512 bit for bit; other values change nothing.
 * Later versions may add keys; read it by key. Never NULL; static storage, computed on the first
 * call (thread-safe). Record it next to performance figures: it tells machines apart.
 */
const char *dynmoe_system_info(void);

/** Result of a call: DYNMOE_OK or one of the DYNMOE_ERR_* codes. */
typedef int32_t dynmoe_status;

enum {
    DYNMOE_OK = 0,
    /** An argument is NULL, out of range or inconsistent (token id, routing parameter, size). */
    DYNMOE_ERR_INVALID_ARGUMENT = 1,
    /** A file or directory could not be opened, read or mapped. */
    DYNMOE_ERR_IO = 2,
    /** A checkpoint file is malformed: bad JSON, bad safetensors header, missing or misshapen tensor. */
    DYNMOE_ERR_FORMAT = 3,
    /** Valid input that dynmoe does not handle: model family, dtype, RoPE scaling type. */
    DYNMOE_ERR_UNSUPPORTED = 4,
    /** An output buffer's capacity is smaller than what the call must write. */
    DYNMOE_ERR_BUFFER_TOO_SMALL = 5,
    /** Memory for the request (KV cache, trace) could not be allocated or would be absurdly large. */
    DYNMOE_ERR_OUT_OF_MEMORY = 6,
    /** A session has no room for the tokens: rewind it or create it with a larger capacity. */
    DYNMOE_ERR_CONTEXT_FULL = 7,
    /** The session is being used by another thread. */
    DYNMOE_ERR_BUSY = 8,
    /** The requested data was not recorded (e.g. a trace layer without routing). */
    DYNMOE_ERR_NOT_AVAILABLE = 9,
    /** A bug in dynmoe; the message says where. */
    DYNMOE_ERR_INTERNAL = 10
};

/** The code's name, e.g. "DYNMOE_ERR_FORMAT"; "DYNMOE_ERR_UNKNOWN" for other values. Static storage. */
const char *dynmoe_status_name(dynmoe_status status);

/**
 * The message of the last call that failed on this thread, or "" if none has. Never NULL. Valid
 * until the next dynmoe call that fails on this thread.
 */
const char *dynmoe_last_error(void);

/** Forgets this thread's last error message. */
void dynmoe_clear_error(void);

/* ------------------------------------------------------------------------------------------ */
/* Models                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/** A loaded checkpoint. Immutable and shareable across threads. */
typedef struct dynmoe_model dynmoe_model;

/** Called during loading with progress in [0, 1]. */
typedef void (*dynmoe_progress_callback)(float progress, void *user_data);

/** Options for dynmoe_model_load. Get defaults from dynmoe_load_params_default(). */
typedef struct dynmoe_load_params {
    /** Threads for compute kernels, counting the caller; 0 = every online CPU (default); at most
     *  256 (larger values count as 256). All of them start at load and stay until
     *  dynmoe_model_free, which joins them. More threads than free cores costs little: a
     *  worker the OS has not scheduled is not waited for, its share of the work is taken over. */
    int32_t n_threads;
    /** Nonzero: ask the OS to read all weights into memory at load instead of on first use. */
    int32_t prefetch;
    /** Optional progress callback and its user data. */
    dynmoe_progress_callback progress_callback;
    void *progress_user_data;
    /**
     * Nonzero: pin the weights in memory (mlock) so the OS cannot evict them; decode then never
     * waits for evicted experts to be read back (about 10 % faster decode where the OS reclaims
     * idle pages proactively). Needs a locked-memory limit (ulimit -l) above the checkpoint's size
     * or CAP_IPC_LOCK; otherwise the load fails with DYNMOE_ERR_OUT_OF_MEMORY. Default 0.
     */
    int32_t lock_memory;
} dynmoe_load_params;

/** Default load parameters. */
dynmoe_load_params dynmoe_load_params_default(void);

/**
 * Loads a Hugging Face checkpoint directory: config.json plus model.safetensors, or
 * model.safetensors.index.json and its shards. Weights (F32, F16 or BF16) are memory-mapped and
 * used in place, so memory use stays close to the files' size. Quantized checkpoints and other
 * weight types give DYNMOE_ERR_UNSUPPORTED.
 *
 * Because the files stay mapped, they must not be truncated or rewritten in place while the
 * model is loaded: the next read of a vanished page raises SIGBUS in the host process (the OS,
 * not the library, decides this). Replace a checkpoint by writing new files and renaming them
 * over the old ones (the mapping keeps the old contents), or free the model first.
 *
 * @param path       the checkpoint directory
 * @param params     options, or NULL for the defaults
 * @param out_model  receives the model on success, NULL on failure
 */
dynmoe_status dynmoe_model_load(const char *path, const dynmoe_load_params *params, dynmoe_model **out_model);

/** Releases a model. Sessions created from it keep it alive until they are freed. NULL is a no-op. */
void dynmoe_model_free(dynmoe_model *model);

/** Element types: of weights (dynmoe_model_info.dtype) and of a KV cache (dynmoe_session_params.kv_dtype). */
enum {
    DYNMOE_DTYPE_F32 = 0,
    DYNMOE_DTYPE_F16 = 1,
    DYNMOE_DTYPE_BF16 = 2
};

/** Routing modes (see dynmoe_policy). */
enum {
    /** The checkpoint's own rule: top-k for Mixtral, Qwen and OLMoE, top-p for the paper's model. */
    DYNMOE_ROUTING_NATIVE = 0,
    /** The k most probable experts. */
    DYNMOE_ROUTING_TOP_K = 1,
    /** Dynamic routing: the fewest experts whose probabilities sum to more than a threshold. */
    DYNMOE_ROUTING_TOP_P = 2
};

/** Value of dynmoe_policy.renormalize meaning "as the checkpoint's native routing does". */
#define DYNMOE_RENORMALIZE_NATIVE (-1)

/** What a model is. Filled by dynmoe_model_get_info. */
typedef struct dynmoe_model_info {
    /** Family: "dynamic_moe", "mixtral", "qwen2_moe", "qwen3_moe" or "olmoe". NUL-terminated. */
    char family[32];
    /** Hugging Face architecture name, e.g. "MixtralForCausalLM". NUL-terminated. */
    char architecture[64];
    int32_t num_layers;
    /** Layers with routed experts; their indices come from dynmoe_model_get_moe_layers. */
    int32_t num_moe_layers;
    /** Routed experts in each MoE layer. */
    int32_t num_experts;
    int32_t hidden_size;
    int32_t vocab_size;
    int32_t num_attention_heads;
    int32_t num_key_value_heads;
    int32_t head_dim;
    int32_t max_position_embeddings;
    /** DYNMOE_DTYPE_* of the weights (the most common one if the checkpoint mixes them). */
    int32_t dtype;
    /** The native rule: DYNMOE_ROUTING_TOP_K with native_top_k, or DYNMOE_ROUTING_TOP_P with native_top_p. */
    int32_t native_mode;
    int32_t native_top_k;
    float native_top_p;
    /** 1 if the native rule divides the chosen experts' weights by their sum, else 0. */
    int32_t native_renormalize;
    /** Nonzero if MoE layers also have an always-active shared expert (Qwen2-MoE). */
    int32_t has_shared_expert;
    /** Special tokens from config.json (the first eos id if it lists several); -1 if absent or
     *  outside [0, vocab_size). */
    int32_t bos_token_id;
    int32_t eos_token_id;
    /** All parameters, counting tied embeddings once. */
    int64_t total_parameters;
    /** Parameters of one routed expert (gate, up and down projections). */
    int64_t parameters_per_expert;
    /**
     * Parameters every token uses whatever the routing: attention, norms, dense MLPs, routers,
     * shared experts and the LM head. The embedding table is not counted (a token reads one row).
     * Activated parameters per token = this + parameters_per_expert x experts used.
     */
    int64_t always_active_parameters;
} dynmoe_model_info;

/** Fills `out_info`. */
dynmoe_status dynmoe_model_get_info(const dynmoe_model *model, dynmoe_model_info *out_info);

/**
 * Writes the indices of the MoE layers, ascending, into `out_layers` (capacity `capacity`) and
 * their number into `*out_count` (which may be NULL). With out_layers NULL and capacity 0 it only
 * reports the count.
 */
dynmoe_status dynmoe_model_get_moe_layers(const dynmoe_model *model, int32_t *out_layers, size_t capacity,
                                          size_t *out_count);

/* ------------------------------------------------------------------------------------------ */
/* Routing                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/**
 * How one MoE layer picks experts. Make one with dynmoe_policy_native/_top_k/_top_p and adjust
 * the fields.
 *
 * Top-p: the router's softmax probabilities are sorted in descending order and the shortest
 * prefix whose cumulative sum is strictly greater than `threshold` is kept (all experts if none
 * is); its length is then clamped to [min_experts, max_experts]. The kept experts' outputs are
 * weighted by their probabilities, divided by the sum of those when renormalising.
 */
typedef struct dynmoe_policy {
    /** DYNMOE_ROUTING_*. */
    int32_t mode;
    /** TOP_K: experts per token, in [1, E]. */
    int32_t k;
    /** TOP_P: the threshold p, in (0, 1]. */
    float threshold;
    /** TOP_P: at least this many experts; 0 means 1. */
    int32_t min_experts;
    /** TOP_P: at most this many experts; 0 means E. */
    int32_t max_experts;
    /** 1 renormalise, 0 raw probabilities, DYNMOE_RENORMALIZE_NATIVE as the checkpoint does. */
    int32_t renormalize;
} dynmoe_policy;

/** The checkpoint's native routing. */
dynmoe_policy dynmoe_policy_native(void);
/** Top-k with the native weighting rule. */
dynmoe_policy dynmoe_policy_top_k(int32_t k);
/** Top-p with no clamps and the native weighting rule. */
dynmoe_policy dynmoe_policy_top_p(float threshold);

/** A routing plan for a model: a default policy for all MoE layers plus per-layer overrides. */
typedef struct dynmoe_routing dynmoe_routing;

/**
 * Creates a routing plan for `model`, checking `default_policy` (NULL = native) against it.
 * A plan may be used with any number of calls and sessions of that model.
 */
dynmoe_status dynmoe_routing_create(const dynmoe_model *model, const dynmoe_policy *default_policy,
                                    dynmoe_routing **out_routing);

/**
 * Sets the policy of one MoE layer (NULL removes the override). Fails, leaving the plan as it
 * was, if `layer` is not an MoE layer or the policy is invalid for it.
 */
dynmoe_status dynmoe_routing_set_layer(dynmoe_routing *routing, int32_t layer, const dynmoe_policy *policy);

/** Releases a routing plan. NULL is a no-op. */
void dynmoe_routing_free(dynmoe_routing *routing);

/* ------------------------------------------------------------------------------------------ */
/* Forward                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/** One MoE layer's routing decisions for the tokens of a call, as seen by an observer. */
typedef struct dynmoe_routing_event {
    /** Decoder layer index. */
    int32_t layer;
    /** Tokens in this call (B x T, row-major over [B, T]). */
    int32_t num_tokens;
    int32_t num_experts;
    /** Row length of `experts` and `weights`. */
    int32_t stride;
    /** [num_tokens][stride]: chosen experts of each token, by descending probability; the first counts[t] are valid. */
    const int32_t *experts;
    /** [num_tokens][stride]: the weight applied to each chosen expert's output. */
    const float *weights;
    /** [num_tokens]: experts chosen per token. */
    const int32_t *counts;
    /** [num_tokens][num_experts]: router softmax probabilities. */
    const float *probabilities;
} dynmoe_routing_event;

/** Called once per MoE layer per call, on the calling thread; the event is valid only during the call. */
typedef void (*dynmoe_routing_observer)(const dynmoe_routing_event *event, void *user_data);

/** Which logits a call writes. */
enum {
    /** dynmoe_forward: every position [B, T, V]; session eval: the last position [B, V]. */
    DYNMOE_LOGITS_DEFAULT = 0,
    /** Every position: [B, T, V]. */
    DYNMOE_LOGITS_ALL = 1,
    /** The last position of each sequence: [B, V]. */
    DYNMOE_LOGITS_LAST = 2
};

/** Per-call options. Get defaults from dynmoe_forward_params_default(). */
typedef struct dynmoe_forward_params {
    /** Routing plan; NULL = native routing (for a session: its default routing). */
    const dynmoe_routing *routing;
    /** Nonzero: record a trace (hidden states, router probabilities, selections, weights). */
    int32_t record_trace;
    /** DYNMOE_LOGITS_*. */
    int32_t logits_mode;
    /** Optional observer, called per MoE layer with this call's routing decisions. */
    dynmoe_routing_observer observer;
    void *observer_user_data;
} dynmoe_forward_params;

/** Default per-call options: native routing, no trace, default logits, no observer. */
dynmoe_forward_params dynmoe_forward_params_default(void);

/** What a call recorded: per-layer hidden states and routing data, plus its statistics. */
typedef struct dynmoe_trace dynmoe_trace;

/**
 * Runs the model over `batch` sequences of `length` tokens each, from position 0, without keeping
 * any state (use a session for incremental decoding). `batch` is at most 4096 and `length` at
 * most max_position_embeddings (else DYNMOE_ERR_INVALID_ARGUMENT).
 *
 * @param tokens           [batch, length] token ids in [0, V)
 * @param params           options, or NULL for the defaults
 * @param logits           receives [batch, length, V] (or [batch, V] with DYNMOE_LOGITS_LAST);
 *                         may be NULL when logits_capacity is 0 (only routing/trace wanted)
 * @param logits_capacity  floats available at `logits`
 * @param out_trace        receives a trace when params->record_trace is set (else set to NULL);
 *                         may be NULL when no trace is requested
 */
dynmoe_status dynmoe_forward(dynmoe_model *model, const int32_t *tokens, int32_t batch, int32_t length,
                             const dynmoe_forward_params *params, float *logits, size_t logits_capacity,
                             dynmoe_trace **out_trace);

/** Shape of a trace: batch, tokens per sequence, decoder layers, hidden size. Any out pointer may be NULL. */
dynmoe_status dynmoe_trace_get_shape(const dynmoe_trace *trace, int32_t *out_batch, int32_t *out_length,
                                     int32_t *out_num_layers, int32_t *out_hidden_size);

/** Output hidden state of decoder `layer` (before the final norm): [B, T, H] floats. */
dynmoe_status dynmoe_trace_get_hidden(const dynmoe_trace *trace, int32_t layer, float *out, size_t capacity);

/** Router softmax probabilities of MoE `layer`: [B, T, E] floats. */
dynmoe_status dynmoe_trace_get_router_probs(const dynmoe_trace *trace, int32_t layer, float *out, size_t capacity);

/** Selection mask of MoE `layer`: [B, T, E] bytes, 1 where the expert ran for the token. */
dynmoe_status dynmoe_trace_get_selected(const dynmoe_trace *trace, int32_t layer, uint8_t *out, size_t capacity);

/** Weights of MoE `layer`: [B, T, E] floats, the scale of each expert's output (0 if not chosen). */
dynmoe_status dynmoe_trace_get_weights(const dynmoe_trace *trace, int32_t layer, float *out, size_t capacity);

/**
 * The experts one token used in MoE `layer`, by descending weight, and their weights (either
 * array may be NULL; with both NULL only the count is asked for). The number chosen goes to
 * `*out_count` in every case; when it is more than `capacity`, the call returns
 * DYNMOE_ERR_BUFFER_TOO_SMALL and writes no expert or weight (the rule for all caller buffers).
 */
dynmoe_status dynmoe_trace_get_token_experts(const dynmoe_trace *trace, int32_t layer, int32_t batch_index,
                                             int32_t position, int32_t *out_experts, float *out_weights,
                                             size_t capacity, size_t *out_count);

/** Releases a trace. NULL is a no-op. */
void dynmoe_trace_free(dynmoe_trace *trace);

/* ------------------------------------------------------------------------------------------ */
/* Statistics                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/** An immutable snapshot of routing statistics. */
typedef struct dynmoe_stats dynmoe_stats;

/** Whole-model figures of a snapshot. */
typedef struct dynmoe_stats_summary {
    /** Token positions processed (B x T summed over calls). */
    int64_t tokens;
    /** Mean over MoE layers of each layer's mean experts per token. */
    double mean_experts_per_token;
    /** always_active_parameters + experts actually run x parameters_per_expert, per token. */
    double activated_parameters_per_token;
    /** activated_parameters_per_token / total_parameters. */
    double activated_parameter_fraction;
    int64_t total_parameters;
    int32_t num_layers;
    int32_t num_moe_layers;
} dynmoe_stats_summary;

/** Figures of one layer of a snapshot. For a layer without routing only `layer`, `is_moe` and
 *  `activated_parameters_per_token` are set (busiest/idlest are -1). */
typedef struct dynmoe_layer_stats {
    int32_t layer;
    int32_t is_moe;
    int32_t num_experts;
    /** Tokens routed through this layer. */
    int64_t tokens;
    double mean_experts_per_token;
    /** Mean entropy of the router distribution, in nats. */
    double mean_router_entropy;
    /** Mean probability mass of the chosen experts. */
    double mean_kept_mass;
    /** Busiest expert's token count over the mean count (1 = balanced). */
    double load_max_over_mean;
    /** Standard deviation of the experts' token counts over their mean. */
    double load_coefficient_of_variation;
    /** Busiest and idlest expert (lowest index on ties), -1 if no tokens. */
    int32_t busiest_expert;
    int32_t idlest_expert;
    /** This layer's parameters per token: its always-active ones plus mean experts x parameters per expert. */
    double activated_parameters_per_token;
} dynmoe_layer_stats;

/** Snapshot of the statistics accumulated over every call on `model` since load or the last reset. */
dynmoe_status dynmoe_model_get_stats(const dynmoe_model *model, dynmoe_stats **out_stats);

/** Zeroes the model's accumulated statistics (sessions keep their own). */
dynmoe_status dynmoe_model_reset_stats(dynmoe_model *model);

/** Statistics of the single call that produced `trace`. */
dynmoe_status dynmoe_trace_get_stats(const dynmoe_trace *trace, dynmoe_stats **out_stats);

/** The whole-model figures of a statistics snapshot (see dynmoe_stats_summary). */
dynmoe_status dynmoe_stats_get_summary(const dynmoe_stats *stats, dynmoe_stats_summary *out_summary);

/** Figures of decoder `layer` (any layer; see is_moe). */
dynmoe_status dynmoe_stats_get_layer(const dynmoe_stats *stats, int32_t layer, dynmoe_layer_stats *out_layer);

/** Tokens routed to each expert of MoE `layer`: E values. */
dynmoe_status dynmoe_stats_get_expert_counts(const dynmoe_stats *stats, int32_t layer, int64_t *out, size_t capacity);

/** Sum of the routing weights each expert of MoE `layer` received: E values. */
dynmoe_status dynmoe_stats_get_expert_weight_sums(const dynmoe_stats *stats, int32_t layer, double *out,
                                                  size_t capacity);

/** Experts-per-token histogram of MoE `layer`: E + 1 values, entry n = tokens that used n experts. */
dynmoe_status dynmoe_stats_get_histogram(const dynmoe_stats *stats, int32_t layer, int64_t *out, size_t capacity);

/**
 * The snapshot as JSON (schema "dynmoe.stats", version 1; see README). Writes at most `capacity`
 * bytes including the terminating NUL and the JSON's length (without NUL) to `*out_length`. Call
 * with buffer NULL and capacity 0 to learn the length; a smaller buffer gives
 * DYNMOE_ERR_BUFFER_TOO_SMALL with `*out_length` set.
 */
dynmoe_status dynmoe_stats_to_json(const dynmoe_stats *stats, char *buffer, size_t capacity, size_t *out_length);

/** Releases a snapshot. NULL is a no-op. */
void dynmoe_stats_free(dynmoe_stats *stats);

/* ------------------------------------------------------------------------------------------ */
/* Sessions: incremental decoding with a KV cache                                              */
/* ------------------------------------------------------------------------------------------ */

/** A decoding context: a KV cache for n_sequences sequences advancing in lockstep, a position,
 *  a default routing plan and its own statistics. Many sessions can share one model. */
typedef struct dynmoe_session dynmoe_session;

/** Options for dynmoe_session_create. Get defaults from dynmoe_session_params_default(). */
typedef struct dynmoe_session_params {
    /** Sequences per call (the batch B), 1 to 4096; default 1. */
    int32_t n_sequences;
    /** Positions the cache holds, at most max_position_embeddings (a larger value gives
     *  DYNMOE_ERR_INVALID_ARGUMENT); 0 = max_position_embeddings, capped by the budget. */
    int32_t capacity;
    /** Maximum KV-cache bytes; 0 = no limit beyond the capacity. */
    int64_t memory_budget_bytes;
    /** Default routing (copied); NULL = native. */
    const dynmoe_routing *routing;
    /** How the KV cache stores keys and values (a DYNMOE_DTYPE_* value): DYNMOE_DTYPE_F32 (default,
     *  exact), DYNMOE_DTYPE_F16 or DYNMOE_DTYPE_BF16 (half the memory, so twice the positions
     *  under a memory budget, and half the bytes attention reads; each key and value is rounded
     *  to nearest even once, when stored). F16 keeps 11 significant bits but overflows beyond
     *  65504; BF16 keeps f32's range with 8 bits. Other values: DYNMOE_ERR_INVALID_ARGUMENT. */
    int32_t kv_dtype;
} dynmoe_session_params;

/** Default session options. */
dynmoe_session_params dynmoe_session_params_default(void);

/**
 * Creates a session on `model` with `params` (NULL for the defaults). The KV cache is allocated
 * here, for `capacity` positions of every sequence (DYNMOE_ERR_OUT_OF_MEMORY when it cannot be).
 * The session keeps the model alive: freeing the model first is allowed, its memory goes with
 * the last session.
 */
dynmoe_status dynmoe_session_create(dynmoe_model *model, const dynmoe_session_params *params,
                                    dynmoe_session **out_session);

/** Releases a session. NULL is a no-op. */
void dynmoe_session_free(dynmoe_session *session);

/**
 * Appends `length` tokens to each sequence (prefill when length > 1, decode when 1) and returns
 * logits: by default the last position's, [n_sequences, V].
 *
 * @param tokens           [n_sequences, length] token ids
 * @param params           options (routing overrides the session default for this call only), or NULL
 * @param logits           receives the logits; may be NULL when logits_capacity is 0 (then a
 *                         later dynmoe_session_generate with prompt_length 0 has nothing to
 *                         continue from)
 * @param logits_capacity  floats available at `logits`
 * @param out_trace        as for dynmoe_forward
 */
dynmoe_status dynmoe_session_eval(dynmoe_session *session, const int32_t *tokens, int32_t length,
                                  const dynmoe_forward_params *params, float *logits, size_t logits_capacity,
                                  dynmoe_trace **out_trace);

/** Number of positions in the cache (tokens evaluated since creation or the last rewind). */
dynmoe_status dynmoe_session_get_position(const dynmoe_session *session, int32_t *out_position);

/** Positions the cache can hold. */
dynmoe_status dynmoe_session_get_capacity(const dynmoe_session *session, int32_t *out_capacity);

/** Truncates the cache to `position` tokens (0 empties it); later evals continue from there. */
dynmoe_status dynmoe_session_rewind(dynmoe_session *session, int32_t position);

/** Replaces the session's default routing (copied; NULL = native). The cache is kept. */
dynmoe_status dynmoe_session_set_routing(dynmoe_session *session, const dynmoe_routing *routing);

/** Snapshot of the statistics of this session's calls since creation or its last reset. */
dynmoe_status dynmoe_session_get_stats(const dynmoe_session *session, dynmoe_stats **out_stats);

/** Zeroes this session's statistics and its timing (dynmoe_session_get_timing). */
dynmoe_status dynmoe_session_reset_stats(dynmoe_session *session);

/**
 * Where a session's forward time went: wall-clock seconds summed over its forward passes
 * (dynmoe_session_eval calls and the steps of dynmoe_session_generate) since creation or the last
 * dynmoe_session_reset_stats. Each part runs from its sub-block's norm to its output, summed over
 * layers; with several threads it is the time the calling thread waited for the part, not CPU
 * time. The MoE part against the experts per token (dynmoe_stats_summary) shows what skipping
 * experts saves.
 */
typedef struct dynmoe_timing {
    /** Forward passes timed, and positions they evaluated (n_sequences x length per pass). */
    int64_t passes;
    int64_t tokens;
    /** Wall time inside those passes. */
    double total_seconds;
    /** Attention sub-blocks: q/k/v projections, attention over the KV cache, output projection. */
    double attention_seconds;
    /** MoE sub-blocks: router, expert selection, routing observer callbacks, the chosen experts,
     *  the shared expert (Qwen2-MoE) and the weighted sum of their outputs. */
    double moe_seconds;
    /** Dense MLP sub-blocks (layers without experts). */
    double dense_seconds;
    /** Final norm and LM head. */
    double head_seconds;
    /** The rest: argument checks, embedding lookup, residual adds, trace recording. */
    double other_seconds;
} dynmoe_timing;

/** Fills `out_timing` with the session's timing. Safe to call while another thread evaluates. */
dynmoe_status dynmoe_session_get_timing(const dynmoe_session *session, dynmoe_timing *out_timing);

/** Token sampling for generation (not to be confused with expert routing). */
typedef struct dynmoe_sampling_params {
    /** 0 = greedy (argmax); otherwise logits are divided by it before sampling. */
    float temperature;
    /** Keep only the k most likely tokens; 0 = all. */
    int32_t top_k;
    /** Keep the smallest set of tokens whose probability exceeds top_p; 1 = all. */
    float top_p;
    /** Seed of the sampler's random generator; the same seed gives the same tokens (with the same
     *  library version: a release may change how a draw maps to a token, never the distribution). */
    uint64_t seed;
} dynmoe_sampling_params;

/** Greedy sampling. */
dynmoe_sampling_params dynmoe_sampling_params_default(void);

/**
 * Called after each generated step with the new token of every sequence ([n_sequences]).
 * Return nonzero to stop generating.
 */
typedef int32_t (*dynmoe_token_callback)(const int32_t *tokens, int32_t n_sequences, int32_t step, void *user_data);

/**
 * Generates up to `max_new_tokens` tokens per sequence after `prompt` ([n_sequences,
 * prompt_length], evaluated first). With prompt_length 0 generation continues from the logits of
 * the session's previous eval or generate; a new session, or a rewind to an earlier position,
 * has none (DYNMOE_ERR_NOT_AVAILABLE).
 * Generation stops when every sequence has produced one of `stop_tokens`, when the callback
 * returns nonzero, or after max_new_tokens steps. After a sequence stops, its later slots repeat
 * its stop token while other sequences go on; the slots after the last step (`*out_steps`) are
 * not written.
 *
 * Every sampled token is evaluated into the cache (including the one handed to a callback that
 * stops generation), so a later call can continue the sequence; the cache needs room for
 * the current position + prompt_length + max_new_tokens - 1 positions (else
 * DYNMOE_ERR_CONTEXT_FULL before anything runs), and when it has exactly that much the last
 * sampled token is returned but not evaluated (the position then stays one short and no
 * continuation logits are kept).
 *
 * @param sampling         how tokens are chosen, or NULL for greedy (dynmoe_sampling_params_default)
 * @param params           routing and observer as for dynmoe_session_eval, or NULL; its
 *                         logits_mode is not used, and record_trace must be 0 (generate records
 *                         no trace: DYNMOE_ERR_INVALID_ARGUMENT)
 * @param out_tokens       receives [n_sequences, max_new_tokens] tokens (capacity in elements)
 * @param out_steps        receives the number of steps generated (may be NULL); 0 when the call
 *                         fails before its first step
 */
dynmoe_status dynmoe_session_generate(dynmoe_session *session, const int32_t *prompt, int32_t prompt_length,
                                      int32_t max_new_tokens, const dynmoe_sampling_params *sampling,
                                      const int32_t *stop_tokens, size_t n_stop_tokens,
                                      const dynmoe_forward_params *params, dynmoe_token_callback callback,
                                      void *callback_user_data, int32_t *out_tokens, size_t out_capacity,
                                      int32_t *out_steps);

#ifdef __cplusplus
}
#endif

#endif /* DYNMOE_H */
