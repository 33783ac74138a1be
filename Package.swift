// swift-tools-version:6.0
import PackageDescription

// Kernels use 8-lane f32 SIMD (AVX2 + FMA, every x86-64 CPU since 2013).
// Override with DYNMOE_TARGET_CPU (e.g. znver4, or "" for the
// compiler's default).
let targetCPU = Context.environment["DYNMOE_TARGET_CPU"] ?? "haswell"
let cpuFlags: [String] = targetCPU.isEmpty ? [] : ["-target-cpu", targetCPU]
// The C kernels get the same CPU (clang spells it -march); without AVX2 + FMA they compile to
// stubs and the Swift kernels run instead.
// DWARF 4 debug info: valgrind 3.19 (Debian 12), which `make test` runs the C API test under,
// cannot read the DWARF 5 forms clang emits by default and aborts.
let cOptimize: [CSetting] = [.unsafeFlags(["-O3", "-gdwarf-4"] + (targetCPU.isEmpty ? [] : ["-march=\(targetCPU)"]))]
let optimize: [SwiftSetting] = [.unsafeFlags(["-Ounchecked", "-wmo"] + cpuFlags, .when(configuration: .release)),
                                .unsafeFlags(cpuFlags, .when(configuration: .debug))]

let package = Package(
    name: "dynmoe",
    products: [
        .library(name: "dynmoe", type: .dynamic, targets: ["DynMoE"]),
    ],
    targets: [
        // The public C header, imported so that every exported function is checked against its
        // declaration by the compiler (`@c @implementation`).
        .systemLibrary(name: "CDynMoE", path: "include"),
        // checkpoint reading -> model -> kernels -> forward -> routing -> statistics -> session
        // What Swift cannot express at full speed: the decode prefetch hint, the prefill register
        // tile for bf16 weights and the attention inner loops.
        .target(name: "CKernels", cSettings: cOptimize),
        .target(name: "DynMoECore", dependencies: ["CKernels"], swiftSettings: optimize),
        // The C ABI: thin wrappers that validate arguments, call the core and map errors to status codes.
        .target(name: "DynMoE", dependencies: ["DynMoECore", "CDynMoE"], swiftSettings: optimize,
                linkerSettings: [.unsafeFlags(["-static-stdlib",
                                               "-Xlinker", "-soname=libdynmoe.so.0",
                                               "-Xlinker", "--version-script=include/dynmoe.map"])]),
        // Kernel micro-benchmark (not part of the library): swift run -c release kernel-bench
        .executableTarget(name: "kernel-bench", dependencies: ["DynMoECore"], path: "bench/kernels", swiftSettings: optimize),
        .testTarget(name: "DynMoECoreTests", dependencies: ["DynMoECore"], path: "Tests/DynMoECoreTests",
                    swiftSettings: [.unsafeFlags(cpuFlags)]),
    ]
)
