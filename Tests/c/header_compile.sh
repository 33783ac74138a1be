#!/usr/bin/env bash
# header_compile.sh — include/dynmoe.h compiles cleanly as C99, C11 and C++17.
#
# Compiles a small translation unit that includes dynmoe.h (twice, to exercise the include
# guard) and uses its types, enums, macros and function declarations, with
#   gcc   -std=c99 / -std=c11     clang   -std=c99 / -std=c11
#   g++   -std=c++17              clang++ -std=c++17
# all with -Wall -Wextra -Werror -pedantic (C also with -Wstrict-prototypes). The C++ unit also
# checks that the declarations have C linkage. A compiler that is not installed is skipped with
# a message (install clang with: apt-get install -y clang).
#
# Usage: Tests/c/header_compile.sh
# Prints one OK/FAIL/SKIP line per combination and "N passed, M failed" last; exits 1 on failure.
set -u

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PASSED=0
FAILED=0
SKIPPED=0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

cat >"$TMP/tu.c" <<'EOF'
#include <dynmoe.h>
#include <dynmoe.h> /* the include guard makes a second inclusion harmless */

/* Every declaration is usable: take the address of a few functions, fill the structs. */
typedef dynmoe_status (*load_fn)(const char *, const dynmoe_load_params *, dynmoe_model **);
typedef dynmoe_status (*forward_fn)(dynmoe_model *, const int32_t *, int32_t, int32_t,
                                    const dynmoe_forward_params *, float *, size_t, dynmoe_trace **);

static int32_t on_token(const int32_t *tokens, int32_t n, int32_t step, void *user) {
    (void)tokens; (void)n; (void)step; (void)user;
    return 0;
}

static void on_event(const dynmoe_routing_event *event, void *user) {
    (void)event; (void)user;
}

int header_compile_check(void);
int header_compile_check(void) {
    load_fn load = dynmoe_model_load;
    forward_fn forward = dynmoe_forward;
    dynmoe_token_callback cb = on_token;
    dynmoe_routing_observer obs = on_event;
    dynmoe_model_info info;
    dynmoe_policy policy = dynmoe_policy_top_p(0.5f);
    dynmoe_forward_params fp = dynmoe_forward_params_default();
    dynmoe_session_params sp = dynmoe_session_params_default();
    dynmoe_sampling_params sa = dynmoe_sampling_params_default();
    dynmoe_stats_summary summary;
    dynmoe_layer_stats layer;
    dynmoe_status st = DYNMOE_OK;
    int version = DYNMOE_VERSION_MAJOR * 10000 + DYNMOE_VERSION_MINOR * 100 + DYNMOE_VERSION_PATCH;
    fp.observer = obs;
    fp.logits_mode = DYNMOE_LOGITS_LAST;
    policy.renormalize = DYNMOE_RENORMALIZE_NATIVE;
    policy.mode = DYNMOE_ROUTING_TOP_K;
    sp.routing = 0;
    sp.n_sequences = 2;
    summary.tokens = 0;
    layer.layer = 0;
    info.dtype = DYNMOE_DTYPE_BF16;
    st = st == DYNMOE_ERR_INTERNAL ? DYNMOE_ERR_NOT_AVAILABLE : st;
    return (int)(sizeof info + sizeof summary + sizeof layer) + version + (load != 0) + (forward != 0) +
           (cb != 0) + (int)sa.top_k + (int)st + (int)policy.k + (int)fp.record_trace + info.dtype + (int)sp.n_sequences;
}
EOF
cp "$TMP/tu.c" "$TMP/tu.cpp"
cat >>"$TMP/tu.cpp" <<'EOF'

// The API has C linkage: a C++ pointer to an extern "C" function type binds to it.
extern "C" typedef const char *c_version_fn(void);
int header_compile_cpp_check();
int header_compile_cpp_check() {
    c_version_fn *version = &dynmoe_version;
    return version()[0] == '0';
}
EOF

FLAGS="-Wall -Wextra -Werror -pedantic -I$ROOT/include"

try() { # compiler std file extra-flags...
    local cc=$1 std=$2 file=$3
    shift 3
    if ! command -v "$cc" >/dev/null 2>&1; then
        echo "SKIP $cc $std: $cc is not installed"
        SKIPPED=$((SKIPPED + 1))
        return
    fi
    # shellcheck disable=SC2086
    if "$cc" -std="$std" $FLAGS "$@" -c "$file" -o "$TMP/out.o" >"$TMP/log" 2>&1; then
        echo "OK   $cc -std=$std ($("$cc" --version 2>/dev/null | head -n 1))"
        PASSED=$((PASSED + 1))
    else
        echo "FAIL $cc -std=$std:"
        sed 's/^/       /' "$TMP/log"
        FAILED=$((FAILED + 1))
    fi
}

try gcc c99 "$TMP/tu.c" -Wstrict-prototypes
try gcc c11 "$TMP/tu.c" -Wstrict-prototypes
try clang c99 "$TMP/tu.c" -Wstrict-prototypes
try clang c11 "$TMP/tu.c" -Wstrict-prototypes
try g++ c++17 "$TMP/tu.cpp"
try clang++ c++17 "$TMP/tu.cpp"

if [ "$SKIPPED" -gt 0 ]; then
    echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
else
    echo "$PASSED passed, $FAILED failed"
fi
if [ "$FAILED" -eq 0 ]; then exit 0; else exit 1; fi
