# dynmoe — build, test, install.
#
#   make demo      build the library and examples, run the demo on the tiny checkpoint in the repo
#   make test      every test: Swift (fixtures, validation), header/ABI checks, C tests, Python tests,
#                  quick fuzz run, sanitizers, the portable (no AVX2) build
#   make fuzz-long 10 000 fuzz cases
#   make lib       build/lib/libdynmoe.so (+ .so.0) and check the header against the exports
#   make examples  build/bin/* C examples
#   make install PREFIX=/usr/local
#   make bench     performance benchmark (writes a ~3.4 GB random checkpoint under bench/out)

PREFIX     ?= /usr/local
CC         ?= cc
CFLAGS     ?= -O2 -std=c99 -Wall -Wextra -Werror -pedantic
BUILD      := build
SWIFT_OUT  := .build/release
LIBDIR     := $(abspath $(BUILD)/lib)
DEMO_MODEL := Tests/Fixtures/dynamic-moe-tiny/model
PYTHON     ?= python3
EXAMPLES   := dynmoe_run routing_sweep expert_table stream
SOURCES := $(shell find Sources -name '*.swift' -o -name '*.c' -o -name '*.h') Package.swift include/dynmoe.h include/dynmoe.map

.PHONY: all lib examples demo test test-swift test-abi test-c test-install test-python test-fuzz fuzz-long test-sanitize test-portable install uninstall bench clean

all: lib examples

lib: $(BUILD)/lib/libdynmoe.so

$(BUILD)/lib/libdynmoe.so: $(SOURCES)
	swift build -c release --product dynmoe
	mkdir -p $(BUILD)/lib $(BUILD)/include
	# copy then rename: overwriting a library in place crashes programs that have it mapped
	cp $(SWIFT_OUT)/libdynmoe.so $(BUILD)/lib/.libdynmoe.so.0.tmp
	mv -f $(BUILD)/lib/.libdynmoe.so.0.tmp $(BUILD)/lib/libdynmoe.so.0
	ln -sf libdynmoe.so.0 $(BUILD)/lib/libdynmoe.so
	cp include/dynmoe.h $(BUILD)/include/

$(BUILD)/bin/%: examples/%.c examples/common.h include/dynmoe.h $(BUILD)/lib/libdynmoe.so
	@mkdir -p $(BUILD)/bin
	$(CC) $(CFLAGS) -Iinclude -o $@ $< -L$(LIBDIR) -ldynmoe -Wl,-rpath,$(LIBDIR) -lpthread -lm

examples: $(addprefix $(BUILD)/bin/,$(EXAMPLES))

demo: examples
	$(BUILD)/bin/dynmoe_run $(DEMO_MODEL) --routing top_p:0.4 5,17,33,64,2,81,9,40
	$(BUILD)/bin/routing_sweep $(DEMO_MODEL) --thresholds 0.2,0.4,0.6,0.8,0.95

test: test-swift test-abi test-c test-install test-python test-fuzz test-sanitize test-portable

# Again with the AVX-512 kernels kept off, so that an AVX-512 machine also runs every test on the
# kernels a CPU without AVX-512 uses (on such a CPU the two runs are the same).
test-swift:
	swift test
	DYNMOE_MAX_ISA=avx2 swift test --skip-build

# The header is the contract: every exported function must be an @c @implementation of a
# declaration in include/dynmoe.h. Any other @c function would appear in the compiler-generated
# header, so that header must declare no functions; and the library must export exactly the
# header's functions (checked by Tests/c/check_exports.sh).
test-abi: lib
	swift build -c release --product dynmoe --scratch-path .build/abi-check -Xswiftc -emit-clang-header-path -Xswiftc $(abspath $(BUILD))/generated-dynmoe.h
	@if grep -E '^SWIFT_EXTERN ' $(BUILD)/generated-dynmoe.h; then \
		echo "error: the functions above are exported from Swift without a declaration in include/dynmoe.h"; exit 1; \
	else echo "ok: no Swift export outside include/dynmoe.h"; fi
	bash Tests/c/check_exports.sh
	bash Tests/c/header_compile.sh

$(BUILD)/bin/test_capi: Tests/c/test_capi.c include/dynmoe.h $(BUILD)/lib/libdynmoe.so
	@mkdir -p $(BUILD)/bin
	$(CC) $(CFLAGS) -Iinclude -o $@ $< -L$(LIBDIR) -ldynmoe -Wl,-rpath,$(LIBDIR) -lpthread -lm

# test_alloc defines malloc and friends itself to count the library's allocations (C11 for
# <stdatomic.h>); it is not run under the sanitizers or valgrind, which replace malloc too.
$(BUILD)/bin/test_alloc: Tests/c/test_alloc.c include/dynmoe.h $(BUILD)/lib/libdynmoe.so
	@mkdir -p $(BUILD)/bin
	$(CC) -O2 -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude -o $@ $< -L$(LIBDIR) -ldynmoe -Wl,-rpath,$(LIBDIR) -lpthread

# The benchmark's tiny checkpoint (64 experts per layer; numpy writes it in about a second).
MANY_EXPERTS := $(BUILD)/qwen3moe-tiny-64-experts

test-c: $(BUILD)/bin/test_capi $(BUILD)/bin/test_alloc examples
	$(BUILD)/bin/test_capi Tests/Fixtures
	$(PYTHON) bench/make_checkpoint.py --preset qwen3moe --tiny --quiet --out $(MANY_EXPERTS) > /dev/null
	$(BUILD)/bin/test_alloc Tests/Fixtures $(MANY_EXPERTS)

# Install into a scratch prefix, build an example against it with pkg-config alone, and run it.
INSTALL_TEST := $(abspath $(BUILD))/install-test
test-install: lib
	rm -rf $(INSTALL_TEST)
	$(MAKE) --no-print-directory install PREFIX=$(INSTALL_TEST)
	$(CC) $(CFLAGS) -o $(BUILD)/bin/dynmoe_run_installed examples/dynmoe_run.c \
		$$(PKG_CONFIG_PATH=$(INSTALL_TEST)/lib/pkgconfig pkg-config --cflags --libs dynmoe) -Wl,-rpath,$(INSTALL_TEST)/lib -lm
	ldd $(BUILD)/bin/dynmoe_run_installed | grep -q '$(INSTALL_TEST)/lib/libdynmoe.so.0'
	@out=$$($(BUILD)/bin/dynmoe_run_installed $(DEMO_MODEL) --routing top_k:2) || exit 1; \
	  pc=$$(PKG_CONFIG_PATH=$(INSTALL_TEST)/lib/pkgconfig pkg-config --modversion dynmoe); \
	  lib=$$(echo "$$out" | sed -n 's/^library: version=\([^ ]*\).*/\1/p'); \
	  test "$$pc" = "$$lib" || { echo "dynmoe.pc says version $$pc, the library $$lib"; exit 1; }
	@echo "ok: installed library, header and dynmoe.pc (same version as the library) build and run an example"

test-python: lib
	$(PYTHON) -m pytest -q Tests/python

# Corrupt checkpoints and random API call sequences, each in a subprocess; 0 crashes, 0 hangs.
test-fuzz: lib
	$(PYTHON) Tests/fuzz/fuzz_checkpoints.py --cases 1000 --seed 1

# The long fuzz run (not part of `make test`).
fuzz-long: lib
	$(PYTHON) Tests/fuzz/fuzz_checkpoints.py --cases 10000 --seed 1

# The Swift suite under AddressSanitizer and ThreadSanitizer (separate build trees so the normal
# build stays cached), and the C API test under valgrind's memcheck against the release library.
test-sanitize: $(BUILD)/bin/test_capi
	LSAN_OPTIONS=suppressions=$(abspath Tests/sanitizers/lsan.supp) swift test --sanitize=address --scratch-path .build/asan
	swift test --sanitize=thread --scratch-path .build/tsan
	valgrind --error-exitcode=9 --quiet $(BUILD)/bin/test_capi Tests/Fixtures

# A build for baseline x86-64 (no AVX2, FMA or F16C: the C kernels' portable fallbacks and the
# Swift paths they hand back to) against the kernel, fixture and session tests.
test-portable:
	DYNMOE_TARGET_CPU=x86-64 swift test -c release --scratch-path .build/portable --filter "KernelTests|FixtureTests|SessionTests"

install: lib
	install -d $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 755 $(BUILD)/lib/libdynmoe.so.0 $(DESTDIR)$(PREFIX)/lib/
	ln -sf libdynmoe.so.0 $(DESTDIR)$(PREFIX)/lib/libdynmoe.so
	install -m 644 include/dynmoe.h $(DESTDIR)$(PREFIX)/include/
	sed -e 's|@PREFIX@|$(PREFIX)|' dynmoe.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/dynmoe.pc

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/lib/libdynmoe.so $(DESTDIR)$(PREFIX)/lib/libdynmoe.so.0 \
	      $(DESTDIR)$(PREFIX)/include/dynmoe.h $(DESTDIR)$(PREFIX)/lib/pkgconfig/dynmoe.pc

bench: lib
	$(PYTHON) bench/run.py

# What token sampling costs in generate (bench/sampling.c; run it on the benchmark checkpoint).
$(BUILD)/bin/sampling: bench/sampling.c include/dynmoe.h $(BUILD)/lib/libdynmoe.so
	@mkdir -p $(BUILD)/bin
	$(CC) $(CFLAGS) -Iinclude -o $@ $< -L$(LIBDIR) -ldynmoe -Wl,-rpath,$(LIBDIR)

clean:
	rm -rf $(BUILD) .build
