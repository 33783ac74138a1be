#!/usr/bin/env bash
# check_exports.sh — checks the ABI surface of the built shared library.
#
#  1. libdynmoe.so exports only dynmoe_* symbols: every global or weak defined dynamic symbol
#     (`nm -D --defined-only`, upper-case type) is dynmoe_*, except the version node that the
#     linker version script (include/dynmoe.map) defines, which must be a version definition of
#     the library (readelf -V). Local-binding entries in .dynsym (lower-case type) are not
#     exported and are only counted.
#  2. The exported functions are exactly the functions declared in include/dynmoe.h (parsed
#     from the comment-free header with grep: every `dynmoe_xxx(`).
#  3. readelf -d shows SONAME libdynmoe.so.0, and libdynmoe.so.0 exists next to the library.
#  4. ldd shows only system C/C++ runtime dependencies (libc, libm, libstdc++, libgcc_s,
#     libpthread, libdl, ld-linux, vdso): no libswift*, libFoundation*, libicu*, nothing "not found".
#
# Usage: Tests/c/check_exports.sh [path/to/libdynmoe.so]   (default: build/lib/libdynmoe.so)
# Prints one OK/FAIL line per check and "N passed, M failed" last; exits 1 on any failure.
set -u

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LIB=${1:-$ROOT/build/lib/libdynmoe.so}
HEADER=$ROOT/include/dynmoe.h
PASSED=0
FAILED=0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

ok() { echo "OK   $*"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $*"; FAILED=$((FAILED + 1)); }
finish() {
    echo "$PASSED passed, $FAILED failed"
    if [ "$FAILED" -eq 0 ]; then exit 0; else exit 1; fi
}

for tool in nm readelf ldd; do
    command -v "$tool" >/dev/null 2>&1 || { fail "$tool is not installed"; finish; }
done
if [ ! -f "$LIB" ]; then
    fail "library $LIB does not exist (build it with: make lib)"
    finish
fi

# --- 1. only dynmoe_* symbols are exported -------------------------------------------------
if ! nm -D --defined-only "$LIB" >"$TMP/nm" 2>"$TMP/nm.err"; then
    fail "nm -D --defined-only $LIB: $(cat "$TMP/nm.err")"
    finish
fi
# columns: value type name[@[@]version]; version nodes defined by the library
readelf -V -W "$LIB" 2>/dev/null | awk '/Version definition section/{d=1; next} /Version (needs|symbols) section/{d=0} d && /Name:/{for (i=1;i<=NF;i++) if ($i=="Name:") print $(i+1)}' \
    | sort -u >"$TMP/versions"
awk '$2 ~ /^[A-Z]$/ || $2 ~ /^[uvw]$/ {name=$3; sub(/@.*/, "", name); print $2, name}' "$TMP/nm" >"$TMP/global"
awk '$2 ~ /^[a-z]$/ && $2 !~ /^[uvw]$/' "$TMP/nm" | wc -l | tr -d ' ' >"$TMP/nlocal"
: >"$TMP/bad"
while read -r type name; do
    case "$name" in
        dynmoe_*) ;;
        *)
            if [ "$type" = A ] && grep -qx "$name" "$TMP/versions"; then
                echo "     ($name is the library's symbol version node, from include/dynmoe.map)"
            else
                echo "$type $name" >>"$TMP/bad"
            fi
            ;;
    esac
done <"$TMP/global"
if [ -s "$TMP/bad" ]; then
    fail "symbols other than dynmoe_* are exported ($(wc -l <"$TMP/bad") of them):"
    sed 's/^/       /' "$TMP/bad" | head -40
else
    ok "only dynmoe_* symbols are exported ($(grep -c ' dynmoe_' "$TMP/global") symbols; $(cat "$TMP/nlocal") local-binding .dynsym entries are not exported)"
fi
if awk '$2 ~ /^dynmoe_/ && $1 != "T"' "$TMP/global" | grep -q .; then
    fail "dynmoe_* symbols that are not functions are exported:"
    awk '$2 ~ /^dynmoe_/ && $1 != "T" {print "       " $0}' "$TMP/global"
else
    ok "every exported dynmoe_* symbol is a function"
fi

# --- 2. exported functions == functions declared in the header ------------------------------
if command -v "${CC:-cc}" >/dev/null 2>&1; then
    "${CC:-cc}" -E -P -x c "$HEADER" >"$TMP/header.i" 2>"$TMP/cpp.err" || { fail "preprocessing $HEADER: $(cat "$TMP/cpp.err")"; finish; }
else # no C compiler: strip comments with perl
    perl -0pe 's{/\*.*?\*/}{}gs; s{//[^\n]*}{}g' "$HEADER" >"$TMP/header.i"
fi
grep -o 'dynmoe_[a-z0-9_]*[[:space:]]*(' "$TMP/header.i" | sed 's/[[:space:]]*($//' | sort -u >"$TMP/declared"
awk '$1 == "T" && $2 ~ /^dynmoe_/ {print $2}' "$TMP/global" | sort -u >"$TMP/exported"
if [ ! -s "$TMP/declared" ]; then
    fail "no function declarations found in $HEADER"
elif cmp -s "$TMP/declared" "$TMP/exported"; then
    ok "exported functions = functions declared in include/dynmoe.h ($(wc -l <"$TMP/declared"))"
else
    fail "exported functions differ from the header's declarations:"
    comm -23 "$TMP/declared" "$TMP/exported" | sed 's/^/       declared, not exported: /'
    comm -13 "$TMP/declared" "$TMP/exported" | sed 's/^/       exported, not declared: /'
fi

# --- 3. SONAME ---------------------------------------------------------------------------------
SONAME=$(readelf -d "$LIB" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')
if [ "$SONAME" = libdynmoe.so.0 ]; then
    ok "SONAME is libdynmoe.so.0"
else
    fail "SONAME is '${SONAME:-missing}', expected libdynmoe.so.0"
fi
if [ -e "$(dirname "$LIB")/libdynmoe.so.0" ]; then
    ok "$(basename "$LIB") has its SONAME file libdynmoe.so.0 beside it"
else
    fail "$(dirname "$LIB")/libdynmoe.so.0 does not exist"
fi

# --- 4. runtime dependencies -------------------------------------------------------------------
if ! ldd "$LIB" >"$TMP/ldd" 2>&1; then
    fail "ldd $LIB: $(cat "$TMP/ldd")"
    finish
fi
awk '{print $1}' "$TMP/ldd" | sed 's#.*/##' >"$TMP/deps"
ALLOWED='^(linux-vdso\.so\.[0-9]+|linux-gate\.so\.[0-9]+|libc\.so\.[0-9]+|libm\.so\.[0-9]+|libstdc\+\+\.so\.[0-9]+|libgcc_s\.so\.[0-9]+|libpthread\.so\.[0-9]+|libdl\.so\.[0-9]+|ld-linux[-a-z0-9_.]*\.so\.[0-9]+)$'
if grep -qi 'not found' "$TMP/ldd"; then
    fail "unresolved dependencies:"
    grep -i 'not found' "$TMP/ldd" | sed 's/^[[:space:]]*/       /'
else
    ok "every dependency resolves"
fi
if grep -Eiq '^(libswift|libFoundation|libicu|libdispatch|libBlocksRuntime)' "$TMP/deps"; then
    fail "depends on the Swift runtime or Foundation:"
    grep -Ei '^(libswift|libFoundation|libicu|libdispatch|libBlocksRuntime)' "$TMP/deps" | sed 's/^/       /'
else
    ok "no libswift*, libFoundation*, libicu*, libdispatch dependency"
fi
if grep -Evq "$ALLOWED" "$TMP/deps"; then
    fail "dependencies outside libc/libm/libstdc++/libgcc_s/libpthread/libdl/ld-linux/vdso:"
    grep -Ev "$ALLOWED" "$TMP/deps" | sed 's/^/       /'
else
    ok "only system runtime dependencies: $(tr '\n' ' ' <"$TMP/deps")"
fi

finish
