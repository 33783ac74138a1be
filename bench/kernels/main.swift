// Kernel micro-benchmark: the matrix product alone, on a bf16 weight matrix in anonymous memory,
// so kernel changes can be measured without the rest of the forward pass.
//   swift run -c release kernel-bench [rows] [cols] [m] [threads] [repeats] [bf16|f16] [jobs=N]
// jobs=N runs N different matrices of that shape per repeat as one batch (`MatMul.run`), the way a
// decode step runs its experts' gate and up projections.
#if canImport(Glibc)
import Glibc
#endif
import DynMoECore


let args = CommandLine.arguments.dropFirst().compactMap { Int($0) }
let jobCount = CommandLine.arguments.compactMap { $0.hasPrefix("jobs=") ? Int($0.dropFirst(5)) : nil }.last ?? 1
let dtype: DType = CommandLine.arguments.contains("f16") ? .f16 : .bf16
let rows = args.count > 0 ? args[0] : 32000
let cols = args.count > 1 ? args[1] : 1024
let m = args.count > 2 ? args[2] : 1
let threads = args.count > 3 ? args[3] : 1
let repeats = args.count > 4 ? args[4] : 20

// Several copies so a decode-sized matrix does not sit in the L3 cache between repeats.
let copies = max(jobCount, (256 << 20) / (rows * cols * 2))
let weights = UnsafeMutablePointer<UInt16>.allocate(capacity: copies * rows * cols)
var seed: UInt32 = 1
for i in 0..<(copies * rows * cols) {
    seed = seed &* 1_664_525 &+ 1_013_904_223
    weights[i] = UInt16(truncatingIfNeeded: (seed >> 16) & 0x3FFF) | 0x3C00  // small positive values (bf16 or f16)
}
let x = UnsafeMutablePointer<Float>.allocate(capacity: m * cols)
for i in 0..<(m * cols) { x[i] = Float(i % 7) * 0.01 }
let y = UnsafeMutablePointer<Float>.allocate(capacity: jobCount * m * rows)
let scratch = UnsafeMutablePointer<Float>.allocate(capacity: m * cols)
let pool = ThreadPool(threads: threads)

var best = Double.infinity, total = 0.0
for r in 0..<repeats {
    let first = (r * jobCount) % (copies - jobCount + 1)
    let jobs = (0..<jobCount).map { j in
        MatMulJob(x: x, ldx: cols, m: m,
                  w: WeightMatrix(data: UnsafeRawPointer(weights + (first + j) * rows * cols), dtype: dtype, rows: rows, cols: cols),
                  y: y + j * m * rows, ldy: rows)
    }
    let t0 = MonotonicClock.now()
    if jobCount == 1 {
        MatMul.multiply(x: x, ldx: cols, m: m, w: jobs[0].w, y: y, ldy: rows, scratch: scratch, pool: pool)
    } else {
        MatMul.run(jobs, pool: pool)  // activations used as given: the layout does not change the timing
    }
    let t = MonotonicClock.now() - t0
    best = min(best, t)
    total += t
}
let bytes = Double(jobCount * rows * cols * 2)
let flops = 2.0 * Double(jobCount * rows * cols * m)
let mean = total / Double(max(1, repeats))
func figure(_ v: Double) -> String { String(Int((v * 10).rounded())).dropLast() + "." + String(Int((v * 10).rounded())).suffix(1) }
print("\(dtype.rawValue) \(jobCount) x rows \(rows) cols \(cols) m \(m) threads \(threads): best \(Int(best * 1e6)) us, \(figure(bytes / best / 1e9)) GB/s weights, \(figure(flops / best / 1e9)) GFLOP/s; mean \(Int(mean * 1e6)) us, \(figure(bytes / mean / 1e9)) GB/s, \(figure(flops / mean / 1e9)) GFLOP/s")
