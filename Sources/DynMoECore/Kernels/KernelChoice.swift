#if canImport(Glibc)
import Glibc
#endif
import CKernels

/// Which kernels run on this machine: what the build was compiled for and what the CPU adds at
/// run time (the AVX-512 prefill and decode kernels). Reported through `dynmoe_system_info`, so figures
/// from different machines can be told apart.
package enum KernelChoice {
    /// Instruction sets the kernels were compiled for (`DYNMOE_TARGET_CPU`), e.g. ["avx2", "fma", "f16c"].
    package static var buildFeatures: [String] {
        let bits = ckernels_build_features()
        return [(CKERNELS_BUILD_AVX2, "avx2"), (CKERNELS_BUILD_FMA, "fma"), (CKERNELS_BUILD_F16C, "f16c")]
            .filter { bits & Int32($0.0) != 0 }.map(\.1)
    }

    /// The bf16 prefill kernel on this CPU: "avx512", "avx2", or "swift" (a build without AVX2 + FMA).
    package static var prefill: String {
        switch Int(ckernels_gemm_bf16_best()) {
        case Int(CKERNELS_GEMM_AVX512): return "avx512"
        case Int(CKERNELS_GEMM_AVX2): return "avx2"
        default: return "swift"
        }
    }

    /// The bf16 decode kernel (one token): "avx512" (C, chosen at run time like the prefill
    /// kernel), else Swift 8-lane SIMD in AVX2 + FMA instructions when the build has them
    /// ("avx2"), or portable ("simd8").
    package static var decode: String {
        if ckernels_avx512_kernels() != 0 { return "avx512" }
        let bits = ckernels_build_features()
        return bits & Int32(CKERNELS_BUILD_AVX2) != 0 && bits & Int32(CKERNELS_BUILD_FMA) != 0 ? "avx2" : "simd8"
    }

    /// Online CPUs, the thread count a session gets for `threads = 0`.
    package static var onlineCPUs: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// "build=avx2,fma,f16c prefill=avx512 decode=avx512 cpus=2": space-separated key=value pairs.
    package static var summary: String {
        let build = buildFeatures.isEmpty ? "baseline" : buildFeatures.joined(separator: ",")
        return "build=\(build) prefill=\(prefill) decode=\(decode) cpus=\(onlineCPUs)"
    }
}
