#!/bin/sh
# Variants of the bf16 prefill kernel against each other in one process (see bench/gemm_ab.c).
#
#   bench/gemm_ab.sh VARIANT.c [VARIANT.c ...] -- M ROWS K [ROUNDS [MIB]]
#
# Each VARIANT.c is a copy of Sources/CKernels/gemm_bf16.c (edited, or the file itself as the
# baseline); its exported names are renamed per variant, v0 the first. Example, the kernel against
# an edited copy at 16 tokens on cold 512 x 1024 matrices:
#   cp Sources/CKernels/gemm_bf16.c /tmp/edit.c   # ... edit /tmp/edit.c ...
#   bench/gemm_ab.sh Sources/CKernels/gemm_bf16.c /tmp/edit.c -- 16 512 1024 8
# The C kernels need clang (ckernels.h uses clang attributes): $CLANG, else the Swift toolchain's.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
clang=${CLANG:-}
if [ -z "$clang" ]; then
    for c in /opt/swift/usr/bin/clang "$(command -v swift 2>/dev/null | sed 's|/swift$|/clang|')" clang; do
        if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then clang=$c; break; fi
    done
fi
[ -n "$clang" ] || { echo "gemm_ab.sh: no clang found (set CLANG)" >&2; exit 1; }
out=$root/build/gemm_ab
rm -rf "$out"
mkdir -p "$out"
n=0
names=""
fns=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    [ -f "$1" ] || { echo "gemm_ab.sh: no such file: $1" >&2; exit 1; }
    sed "s/ckernels_gemm_bf16/v${n}_gemm/g" "$1" > "$out/v$n.c"
    echo "int v${n}_gemm(const float *, ptrdiff_t, ptrdiff_t, const uint16_t *, ptrdiff_t, ptrdiff_t, ptrdiff_t, float *, ptrdiff_t);" >> "$out/gemm_ab_variants.h"
    names="$names \"v$n ($(basename "$1"))\","
    fns="$fns v${n}_gemm,"
    n=$((n + 1))
    shift
done
[ $# -gt 0 ] && shift  # the --
[ "$n" -ge 1 ] || { echo "usage: gemm_ab.sh VARIANT.c [VARIANT.c ...] -- M ROWS K [ROUNDS [MIB]]" >&2; exit 1; }
{
    echo "enum { VARIANTS = $n };"
    echo "static const char *const variant_names[VARIANTS] = {$names };"
    echo "static const gemm_fn variant_fns[VARIANTS] = {$fns };"
} >> "$out/gemm_ab_variants.h"
"$clang" -O3 -march="${DYNMOE_TARGET_CPU:-haswell}" -std=c11 -I "$root/Sources/CKernels/include" -I "$out" \
    "$root/bench/gemm_ab.c" "$out"/v*.c "$root/Sources/CKernels/cpu_features.c" -o "$out/gemm_ab"
exec "$out/gemm_ab" "$@"
