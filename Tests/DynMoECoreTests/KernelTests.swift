import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import DynMoECore
import CKernels

/// Every matrix-product path (decode stream, 4x2 and 2x4 tiles, the C prefill tiles of 1-6
/// tokens x 1-2 rows, the masked last block and scalar tails) against a plain double-precision
/// reference, for each weight dtype.
@Suite("Kernels")
struct KernelTests {
    static let shapes: [(m: Int, rows: Int, k: Int)] = [
        (1, 5, 16), (1, 9, 47), (1, 6, 1024), (1, 67, 1040), (2, 4, 33), (3, 7, 1031), (4, 6, 64), (5, 9, 100),
        (16, 10, 1024), (17, 13, 2055), (40, 3, 24),
        (6, 7, 32), (7, 5, 16), (8, 1, 17), (9, 2, 15), (11, 9, 48), (12, 4, 8), (13, 3, 1040),
    ]

    func encode(_ v: Float, _ dtype: DType) -> [UInt8] {
        switch dtype {
        case .f32: return withUnsafeBytes(of: v.bitPattern.littleEndian) { Array($0) }
        case .bf16: return withUnsafeBytes(of: UInt16(v.bitPattern >> 16).littleEndian) { Array($0) }
        default: return withUnsafeBytes(of: Float16(v).bitPattern.littleEndian) { Array($0) }
        }
    }

    func decoded(_ v: Float, _ dtype: DType) -> Double {
        switch dtype {
        case .f32: return Double(v)
        case .bf16: return Double(Float(bitPattern: v.bitPattern & 0xFFFF_0000))
        default: return Double(Float(Float16(v)))
        }
    }

    @Test(arguments: [DType.f32, .bf16, .f16])
    func matmulMatchesReference(dtype: DType) {
        var state: UInt32 = 12345
        func random() -> Float {
            state = state &* 1_664_525 &+ 1_013_904_223
            return Float(Int32(bitPattern: state) >> 8) / Float(1 << 23)
        }
        for (m, rows, k) in Self.shapes {
            let weights = (0..<(rows * k)).map { _ in random() }
            // Include f16 subnormals and larger magnitudes in the f16 case.
            let bytes = weights.enumerated().flatMap { i, v in encode(i % 97 == 0 ? v * 1e-6 : v * 4, dtype) }
            let x = (0..<(m * k)).map { _ in random() }
            var y = [Float](repeating: .nan, count: m * rows)
            var scratch = [Float](repeating: 0, count: MatMul.scratchCount(m: m, k: k))
            bytes.withUnsafeBytes { raw in
                let w = WeightMatrix(data: raw.baseAddress!, dtype: dtype, rows: rows, cols: k)
                x.withUnsafeBufferPointer { xp in
                    y.withUnsafeMutableBufferPointer { yp in
                        scratch.withUnsafeMutableBufferPointer { sp in
                            MatMul.multiply(x: xp.baseAddress!, ldx: k, m: m, w: w, y: yp.baseAddress!, ldy: rows,
                                            scratch: sp.baseAddress!, pool: ThreadPool(threads: 2))
                        }
                    }
                }
            }
            var worst = 0.0
            // Float summation error bound: k * 2^-24 * sum |x w| (a misplaced element is far above it).
            let (reference, magnitude) = referenceProduct(weights: weights, x: x, m: m, rows: rows, k: k, dtype: dtype)
            for i in 0..<(m * rows) {
                worst = max(worst, Self.boundRatio(y[i], reference[i], bound: Double(k) * 0x1p-24 * magnitude[i]))
            }
            #expect(worst <= 1, "m \(m) rows \(rows) k \(k) \(dtype): error is \(worst) x the rounding bound")
        }
    }

    /// |got - reference| / bound; infinite for a NaN (an output never written stays NaN, and
    /// max(worst, .nan) would quietly keep worst).
    static func boundRatio(_ got: Float, _ reference: Double, bound: Double) -> Double {
        let ratio = abs(Double(got) - reference) / bound
        return ratio.isNaN ? .infinity : ratio
    }

    func referenceProduct(weights: [Float], x: [Float], m: Int, rows: Int, k: Int, dtype: DType) -> ([Double], [Double]) {
        var out = [Double](repeating: 0, count: m * rows)
        var magnitude = [Double](repeating: 0, count: m * rows)
        for i in 0..<m {
            for r in 0..<rows {
                var s = 0.0, a = 0.0
                for c in 0..<k {
                    let index = r * k + c
                    let v = index % 97 == 0 ? weights[index] * 1e-6 : weights[index] * 4
                    let term = Double(x[i * k + c]) * decoded(v, dtype)
                    s += term
                    a += abs(term)
                }
                out[i * rows + r] = s
                magnitude[i * rows + r] = a
            }
        }
        return (out, magnitude)
    }

    /// The prefill kernel is chosen at run time: AVX-512 where the CPU has it (and the kernel
    /// says so exactly when /proc/cpuinfo lists avx512f and avx512bw, unless DYNMOE_MAX_ISA=avx2),
    /// else AVX2. Each kernel this
    /// machine runs must meet the rounding bound on every tile shape (1-8 tokens x 1-2 rows,
    /// columns with and without a tail; for 8 tokens or fewer the four-stream tiles over one or
    /// several row blocks with rows left over), over whole matrices and over row ranges of them.
    @Test func eachPrefillKernelMatchesReference() throws {
        let flags = Self.cpuFlags()
        #expect(flags.contains("sse2"), "cannot read the CPU flags from /proc/cpuinfo")
        // The C kernels exist in a build for AVX2 + FMA (the portable build hands back to Swift).
        let avx2 = Set(KernelChoice.buildFeatures).isSuperset(of: ["avx2", "fma"])
        let expected = !avx2 ? CKERNELS_GEMM_NONE : Self.avx512Kernels(flags) ? CKERNELS_GEMM_AVX512 : CKERNELS_GEMM_AVX2
        #expect(ckernels_gemm_bf16_best() == Int32(expected))
        let kernels = [CKERNELS_GEMM_AVX2, CKERNELS_GEMM_AVX512].map { Int32($0) }.filter { $0 <= ckernels_gemm_bf16_best() }
        var state: UInt32 = 4242
        func random() -> Float {
            state = state &* 1_664_525 &+ 1_013_904_223
            return Float(Int32(bitPattern: state) >> 8) / Float(1 << 23)
        }
        for (m, rows, k) in Self.shapes + [(24, 7, 512), (57, 33, 1024), (8, 2, 16), (9, 3, 31), (6, 150, 1024), (8, 131, 1040), (4, 67, 48), (14, 70, 1040), (10, 150, 1024)] {
            let weights = (0..<(rows * k)).map { _ in random() }
            let bytes = weights.enumerated().flatMap { i, v in encode(i % 97 == 0 ? v * 1e-6 : v * 4, .bf16) }
            let x = (0..<(m * k)).map { _ in random() }
            var scratch = [Float](repeating: 0, count: MatMul.scratchCount(m: m, k: k))
            let (reference, magnitude) = referenceProduct(weights: weights, x: x, m: m, rows: rows, k: k, dtype: .bf16)
            for kernel in kernels {
                // Each kernel reads its own paired layout.
                let pairedBlock = kernel == Int32(CKERNELS_GEMM_AVX512) ? 32 : 16
                // Whole matrix, then the rows split in two ranges as two threads would take them.
                for split in [rows, rows / 2] {
                    var y = [Float](repeating: .nan, count: m * rows)
                    bytes.withUnsafeBytes { raw in
                        x.withUnsafeBufferPointer { xp in
                            scratch.withUnsafeMutableBufferPointer { sp in
                                let prepared = MatMul.prepare(x: xp.baseAddress!, ldx: k, m: m, k: k, dtype: .bf16,
                                                              scratch: sp.baseAddress!, pairedBlock: pairedBlock)
                                let w = raw.baseAddress!.assumingMemoryBound(to: UInt16.self)
                                y.withUnsafeMutableBufferPointer { yp in
                                    for range in [0..<split, split..<rows] where !range.isEmpty {
                                        let done = ckernels_gemm_bf16_with(kernel, prepared.pointer, prepared.stride, m, w, k,
                                                                           range.lowerBound, range.upperBound, yp.baseAddress!, rows)
                                        #expect(done == 1)
                                    }
                                }
                            }
                        }
                    }
                    var worst = 0.0
                    for i in 0..<(m * rows) {
                        worst = max(worst, Self.boundRatio(y[i], reference[i], bound: Double(k) * 0x1p-24 * magnitude[i]))
                    }
                    #expect(worst <= 1, "kernel \(kernel) m \(m) rows \(rows) k \(k) split \(split): error is \(worst) x the rounding bound")
                }
            }
        }
    }

    /// The bf16 decode kernel (one activation row) is chosen at run time like the prefill one:
    /// AVX-512 exactly when /proc/cpuinfo lists avx512f and avx512bw in an AVX2 + FMA build, and
    /// then the activations come in 32-column blocks. It (1-4 streams) and the Swift kernel (4
    /// streams) must meet the rounding bound on row lengths with and without 32-, 16- and
    /// 1-column tails, and write only the rows they were given.
    @Test func eachDecodeKernelMatchesReference() {
        let flags = Self.cpuFlags()
        #expect(flags.contains("sse2"), "cannot read the CPU flags from /proc/cpuinfo")
        let avx2 = Set(KernelChoice.buildFeatures).isSuperset(of: ["avx2", "fma"])
        let avx512 = avx2 && Self.avx512Kernels(flags)
        #expect((ckernels_avx512_kernels() != 0) == avx512)
        #expect(KernelChoice.decode == (avx512 ? "avx512" : avx2 ? "avx2" : "simd8"))
        #expect(MatMul.pairedBlock == (avx512 ? 32 : 16))
        var state: UInt32 = 9191
        func random() -> Float {
            state = state &* 1_664_525 &+ 1_013_904_223
            return Float(Int32(bitPattern: state) >> 8) / Float(1 << 23)
        }
        let layouts = [(streams: 4, apart: 5, steps: 5), (4, 3, 2), (3, 4, 1), (2, 7, 3), (1, 0, 6), (1, 1, 4)]
        for k in [8, 16, 17, 31, 32, 47, 48, 64, 1024, 1031, 1040] {
            for (streams, apart, steps) in layouts {
                let rows = steps + (streams - 1) * apart
                let given = Set((0..<steps).flatMap { j in (0..<streams).map { j + $0 * apart } })
                let weights = (0..<(rows * k)).map { _ in random() }
                let bytes = weights.enumerated().flatMap { i, v in encode(i % 97 == 0 ? v * 1e-6 : v * 4, .bf16) }
                let x = (0..<k).map { _ in random() }
                let (reference, magnitude) = referenceProduct(weights: weights, x: x, m: 1, rows: rows, k: k, dtype: .bf16)
                var scratch = [Float](repeating: 0, count: MatMul.scratchCount(m: 1, k: k))
                for kernel in ["swift", "avx512"] where kernel == "swift" ? streams == 4 : avx512 {
                    var y = [Float](repeating: .nan, count: rows)
                    bytes.withUnsafeBytes { raw in
                        x.withUnsafeBufferPointer { xp in
                            scratch.withUnsafeMutableBufferPointer { sp in
                                let prepared = MatMul.prepare(x: xp.baseAddress!, ldx: k, m: 1, k: k, dtype: .bf16,
                                                              scratch: sp.baseAddress!, pairedBlock: kernel == "swift" ? 16 : 32)
                                y.withUnsafeMutableBufferPointer { yp in
                                    if kernel == "swift" {
                                        Kernel<BF16Pairs>.swiftFourStreams(prepared.pointer, k, 1, raw.baseAddress!, rowBytes: 2 * k,
                                                                           k: k, apart: apart, steps: steps, yp.baseAddress!, rows)
                                    } else {
                                        let done = ckernels_decode_bf16(prepared.pointer, raw.baseAddress!.assumingMemoryBound(to: UInt16.self),
                                                                        k, Int32(streams), apart, steps, yp.baseAddress!)
                                        #expect(done == 1)
                                    }
                                }
                            }
                        }
                    }
                    var worst = 0.0
                    for r in given { worst = max(worst, Self.boundRatio(y[r], reference[r], bound: Double(k) * 0x1p-24 * magnitude[r])) }
                    #expect(worst <= 1, "\(kernel) k \(k) streams \(streams) apart \(apart) steps \(steps): error is \(worst) x the rounding bound")
                    #expect((0..<rows).allSatisfy { given.contains($0) || y[$0].isNaN }, "\(kernel) wrote rows it was not given")
                }
            }
        }
        // Out-of-range stream counts are refused, not run.
        var y: Float = .nan
        let one: [UInt16] = Array(repeating: 0x3F80, count: 16), x = [Float](repeating: 1, count: 16)
        #expect(ckernels_decode_bf16(x, one, 16, 0, 0, 1, &y) == 0 && ckernels_decode_bf16(x, one, 16, 5, 0, 1, &y) == 0)
        #expect(y.isNaN)
    }

    /// Whether the AVX-512 kernels should run in an AVX2 build: the CPU has AVX-512 F + BW and
    /// DYNMOE_MAX_ISA does not cap the kernels at AVX2.
    static func avx512Kernels(_ flags: [String]) -> Bool {
        let capped = getenv("DYNMOE_MAX_ISA").map { String(cString: $0) == "avx2" } ?? false
        return !capped && flags.contains("avx512f") && flags.contains("avx512bw")
    }

    /// The first "flags" line of /proc/cpuinfo, split into words.
    static func cpuFlags() -> [String] {
        guard let file = fopen("/proc/cpuinfo", "r") else { return [] }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 16384)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if text.hasPrefix("flags") { return text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).map(String.init) }
        }
        return []
    }

    /// Decode regions on several threads go through `DecodeLanes` (per-thread step ranges, taken
    /// back and forth by stealing): every row of every product must come out exactly as one
    /// thread computes it, whatever the products' sizes (rows not divisible by four, products of
    /// one row, products smaller than a claim) and however the threads meet.
    @Test(arguments: [DType.bf16, .f16, .f32])
    func decodeLanesMatchOneThread(dtype: DType) {
        var state: UInt32 = 777
        func random(_ n: Int) -> Int {
            state = state &* 1_664_525 &+ 1_013_904_223
            return Int(state >> 8) % n
        }
        let rowChoices = [1, 2, 3, 4, 5, 7, 31, 64, 65, 130, 257, 512]
        let pools = [2, 3, 4].map { ThreadPool(threads: $0) }
        for round in 0..<24 {
            let k = [16, 47, 64, 256][round % 4]
            // One large product keeps the region above DecodeLanes.minimumBytes.
            var shapes = [(rows: DecodeLanes.minimumBytes / (k * dtype.byteSize) + random(9), cols: k)]
            for _ in 0..<random(12) { shapes.append((rowChoices[random(rowChoices.count)], k)) }
            shapes.swapAt(0, random(shapes.count))  // the large product anywhere in the region
            let weights = shapes.map { UnsafeMutableRawBufferPointer.allocate(byteCount: $0.rows * $0.cols * dtype.byteSize, alignment: 64) }
            let xs = shapes.map { UnsafeMutableBufferPointer<Float>.allocate(capacity: $0.cols) }
            defer { weights.forEach { $0.deallocate() }; xs.forEach { $0.deallocate() } }
            for w in weights { for b in 0..<w.count { w[b] = UInt8(truncatingIfNeeded: b * 131 + random(7)) & 0x3F } }
            for x in xs { for c in 0..<x.count { x[c] = Float(random(2001) - 1000) / 1000 } }
            func run(_ pool: ThreadPool?) -> [[Float]] {
                let outputs = shapes.map { UnsafeMutableBufferPointer<Float>.allocate(capacity: $0.rows) }
                defer { outputs.forEach { $0.deallocate() } }
                for y in outputs { y.initialize(repeating: .nan) }
                let jobs = (0..<shapes.count).map { i in
                    MatMulJob(x: UnsafePointer(xs[i].baseAddress!), ldx: shapes[i].cols, m: 1,
                              w: WeightMatrix(data: UnsafeRawPointer(weights[i].baseAddress!), dtype: dtype,
                                              rows: shapes[i].rows, cols: shapes[i].cols),
                              y: outputs[i].baseAddress!, ldy: shapes[i].rows)
                }
                let lanes = jobs.withUnsafeBufferPointer { DecodeLanes.accepts($0) }
                if pool != nil { #expect(lanes, "round \(round) should use the decode lanes") }
                MatMul.run(jobs, pool: pool)
                return outputs.map { Array($0) }
            }
            let expected = run(nil)
            for pool in pools {
                for _ in 0..<3 {
                    let got = run(pool)
                    for i in 0..<shapes.count {
                        let same = zip(got[i], expected[i]).allSatisfy { $0.bitPattern == $1.bitPattern }
                        #expect(same, "\(dtype) round \(round), \(pool.threadCount) threads: product \(i) of \(shapes.count) (\(shapes[i].rows) rows) differs")
                    }
                }
            }
        }
    }

    /// The prefill kernel reads each block's odd half 2 bytes further on; on the last row of a
    /// matrix that would cross the end of the data. A matrix ending right before an inaccessible
    /// page must still be multiplied (and correctly) — a crash here is the failure.
    @Test(arguments: [16, 32, 40])
    func lastRowEndingAtAnUnmappedPageIsReadSafely(k: Int) throws {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let base = try #require(mmap(nil, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        #expect(base != MAP_FAILED)
        defer { munmap(base, 2 * page) }
        #expect(mprotect(base + page, page, PROT_NONE) == 0)
        let rows = 3, m = 7
        let bytes = rows * k * 2
        let start = base + page - bytes
        let one: UInt16 = 0x3F80  // bf16 1.0
        for i in 0..<(rows * k) { start.storeBytes(of: one, toByteOffset: 2 * i, as: UInt16.self) }
        let w = WeightMatrix(data: UnsafeRawPointer(start), dtype: .bf16, rows: rows, cols: k)
        let x = [Float](repeating: 0.5, count: m * k)
        var y = [Float](repeating: .nan, count: m * rows)
        var scratch = [Float](repeating: 0, count: MatMul.scratchCount(m: m, k: k))
        x.withUnsafeBufferPointer { xp in
            y.withUnsafeMutableBufferPointer { yp in
                scratch.withUnsafeMutableBufferPointer { sp in
                    MatMul.multiply(x: xp.baseAddress!, ldx: k, m: m, w: w, y: yp.baseAddress!, ldy: rows,
                                    scratch: sp.baseAddress!, pool: nil)
                }
            }
        }
        #expect(y.allSatisfy { $0 == Float(k) * 0.5 })
    }

    /// The vector exp against glibc's expf: within 2 ulp over the range softmax and SiLU use,
    /// exact at the ends (0 below the range, inf above, NaN through).
    @Test func vectorExpMatchesExpf() {
        var worstUlp: Float = 0
        var x: Float = -87
        while x < 88 {
            let lanes = SIMD8<Float>((0..<8).map { x + Float($0) * 0.001 })
            let e = Elementwise.exp(lanes)
            for j in 0..<8 {
                let reference = expf(lanes[j])
                worstUlp = max(worstUlp, abs(e[j] - reference) / reference.ulp)
            }
            x += 0.0173
        }
        #expect(worstUlp <= 2, "worst error \(worstUlp) ulp")
        let ends = Elementwise.exp(SIMD8(-.infinity, -1000, -88, 0, 89, 1000, .infinity, .nan))
        #expect(ends[0] == 0 && ends[1] == 0 && ends[3] == 1 && ends[4] == .infinity && ends[5] == .infinity)
        #expect(ends[6] == .infinity && ends[7].isNaN && ends[2] >= 0 && ends[2] < 1e-37)
    }

    /// The router softmax returns the entropy of its result, from the logits (one log), equal to
    /// -sum p log p of double-precision probabilities: flat, peaked (probabilities that underflow),
    /// with -inf logits, and one expert.
    @Test func softmaxReturnsTheEntropyOfItsProbabilities() {
        var seed: UInt64 = 7
        func uniform() -> Double {
            seed = seed &* 6364136223846793005 &+ 1442695040888963407
            return Double(seed >> 11) / Double(1 << 53)
        }
        for n in [1, 2, 8, 60, 64, 200] {
            for spread in [0.01, 1.0, 8.0, 120.0] {
                var logits = (0..<n).map { _ in Float((uniform() - 0.5) * spread) }
                if n > 2 { logits[1] = -.infinity }
                let top = Double(logits.max()!)
                let exps = logits.map { Foundation_exp(Double($0) - top) }
                let total = exps.reduce(0, +)
                let expected = -exps.reduce(0) { $1 > 0 ? $0 + $1 / total * Foundation_log($1 / total) : $0 }
                var x = logits
                let entropy = x.withUnsafeMutableBufferPointer { Elementwise.softmax($0.baseAddress!, n) }
                #expect(abs(entropy - expected) <= 1e-6 * max(1, expected), "n \(n) spread \(spread): \(entropy) vs \(expected)")
                #expect(entropy >= 0)
                for j in 0..<n { #expect(abs(Double(x[j]) - exps[j] / total) <= 1e-6) }
            }
        }
    }

    /// Softmax numerators and SwiGLU through the vector exp, every tail length, against scalar math.
    @Test func expShiftedSumAndSwigluMatchScalarMath() {
        for n in 1...19 {
            var s = (0..<n).map { Float($0 * 7 % 11) * 0.37 - 1.5 }
            let maxScore = s.max()!
            let expected = s.map { Double(expf($0 - maxScore)) }
            let sum = s.withUnsafeMutableBufferPointer { Elementwise.expShiftedSum($0.baseAddress!, n) }
            #expect(abs(Double(sum) - expected.reduce(0, +)) <= 1e-5 * Double(n))
            for j in 0..<n { #expect(abs(Double(s[j]) - expected[j]) <= 1e-6) }

            var gate = (0..<n).map { Float($0) * 1.3 - 9 }
            let up = (0..<n).map { Float($0 % 5) - 2 }
            let reference = zip(gate, up).map { g, u in Double(g) / (1 + Foundation_exp(-Double(g))) * Double(u) }
            gate.withUnsafeMutableBufferPointer { Elementwise.swiglu($0.baseAddress!, up, n) }
            for j in 0..<n { #expect(abs(Double(gate[j]) - reference[j]) <= 1e-5 * max(1, abs(reference[j]))) }
        }
    }

    /// Attention of one to four query rows on one KV head (scores, softmax, weighted sum of
    /// values) against double-precision math, for each KV-cache element type: rows with the same
    /// key range (a grouped-query group), with causal ends one apart (prompt positions), and with
    /// sliding-window starts; head widths with and without the C kernels' blocks (8, 16, 24:
    /// four-row kernels; 64, 72, 128: also the one-row 64-column kernel; 264: wider than the
    /// four-row weighted sum takes); one to many positions. Keys and values are stored through
    /// `KVCache.store`; the reference uses the stored (rounded) values, so any widening error shows.
    @Test(arguments: KVCache.elementTypes)
    func attentionRowsMatchReference(element: DType) throws {
        var state: UInt32 = 99
        func random() -> Float {
            state = state &* 1_664_525 &+ 1_013_904_223
            return Float(Int32(bitPattern: state) >> 8) / Float(1 << 23)
        }
        for dim in [8, 16, 24, 64, 72, 128, 264] {
            for count in [1, 5, 33, 300] {
                let cache = try KVCache(layers: 1, sequences: 1, capacity: count, kvHeads: 1, headDim: dim, element: element)
                var keys = [Float](repeating: 0, count: count * dim), values = keys
                let keyRows = cache.keys(layer: 0, sequence: 0, head: 0), valueRows = cache.values(layer: 0, sequence: 0, head: 0)
                for j in 0..<count {
                    let k = (0..<dim).map { _ in random() * 4 }, v = (0..<dim).map { _ in random() }
                    cache.store(k, into: keyRows, position: j)
                    cache.store(v, into: valueRows, position: j)
                    for c in 0..<dim { keys[j * dim + c] = roundTrip(k[c], element); values[j * dim + c] = roundTrip(v[c], element) }
                }
                for rowCount in 1...Attention.rowsPerStep {
                    // (first, end) of each row: one shared range, causal ends, windowed starts.
                    let layouts: [[(Int, Int)]] = [
                        (0..<rowCount).map { _ in (0, count) },
                        (0..<rowCount).map { r in (0, max(1, count - (rowCount - 1 - r))) },
                        (0..<rowCount).map { r in let e = max(1, count - (rowCount - 1 - r)); return (max(0, e - 4 - r), e) },
                    ]
                    for ranges in layouts {
                        let q = (0..<(rowCount * dim)).map { _ in random() }
                        let scale: Float = 0.37
                        var scores = [Float](repeating: .nan, count: Attention.rowsPerStep * count)
                        var out = [Float](repeating: .nan, count: rowCount * dim)
                        q.withUnsafeBufferPointer { qp in
                            out.withUnsafeMutableBufferPointer { o in
                                let rows = ranges.enumerated().map { r, range in
                                    AttentionRow(query: qp.baseAddress! + r * dim, out: o.baseAddress! + r * dim,
                                                 first: range.0, end: range.1)
                                }
                                rows.withUnsafeBufferPointer { rowBuffer in
                                    scores.withUnsafeMutableBufferPointer { s in
                                        Attention.attend(rows: rowBuffer, keys: keyRows, values: valueRows, element: element,
                                                         headDim: dim, scale: scale, scores: s.baseAddress!)
                                    }
                                }
                            }
                        }
                        var worst = 0.0
                        for (r, (first, end)) in ranges.enumerated() {
                            let logits = (first..<end).map { j in
                                (0..<dim).reduce(0.0) { $0 + Double(q[r * dim + $1]) * Double(keys[j * dim + $1]) } * Double(scale)
                            }
                            let m = logits.max()!
                            let e = logits.map { Foundation_exp($0 - m) }
                            let z = e.reduce(0, +)
                            for c in 0..<dim {
                                let expected = (first..<end).reduce(0.0) { $0 + e[$1 - first] / z * Double(values[$1 * dim + c]) }
                                worst = max(worst, abs(Double(out[r * dim + c]) - expected))
                            }
                        }
                        #expect(worst < 2e-5, "\(element) rows \(ranges) dim \(dim) count \(count): error \(worst)")
                    }
                }
            }
        }
    }

    /// The KV cache rounds to nearest even when it narrows: f16 as Swift's Float16 conversion
    /// does, bf16 by hand (ties to even, NaN kept, overflow to infinity).
    @Test func kvCacheRoundsToNearestEven() throws {
        let samples: [Float] = [0, -0.0, 1, -2.5, 1.00390625, 1.01171875, 3.1415927, 65504, 70000, 1e-8, -1e30,
                                Float(bitPattern: 0x3F80_7FFF), Float(bitPattern: 0x7F7F_FFFF), .infinity, .nan]
        // bf16 bit patterns expected for each sample (1.00390625 and 1.01171875 are ties).
        let bf16: [UInt16] = [0x0000, 0x8000, 0x3F80, 0xC020, 0x3F80, 0x3F82, 0x4049, 0x4780, 0x4789, 0x322C, 0xF14A,
                              0x3F80, 0x7F80, 0x7F80, 0x7FC0]
        for element in [DType.f16, .bf16] {
            let cache = try KVCache(layers: 1, sequences: 1, capacity: 2, kvHeads: 1, headDim: samples.count + 1, element: element)
            let row = cache.keys(layer: 0, sequence: 0, head: 0)
            let padded = samples + [7]
            cache.store(padded, into: row, position: 1)
            for (i, x) in samples.enumerated() {
                let stored = row.load(fromByteOffset: 2 * (padded.count + i), as: UInt16.self)
                if element == .f16 {
                    #expect(stored == Float16(x).bitPattern || (x.isNaN && Float16(bitPattern: stored).isNaN), "f16 \(x)")
                } else {
                    #expect(stored == bf16[i], "bf16 \(x): \(String(stored, radix: 16))")
                }
            }
            #expect(row.load(fromByteOffset: 0, as: UInt16.self) == 0, "position 0 untouched")
        }
    }
}

/// What a KV cache of `element` gives back for `x`.
private func roundTrip(_ x: Float, _ element: DType) -> Float {
    switch element {
    case .f16: return Float(Float16(x))
    case .bf16: return Float(bitPattern: UInt32(BFloat16Rounding.bits(x)) << 16)
    default: return x
    }
}

private func Foundation_exp(_ x: Double) -> Double { Glibc.exp(x) }
private func Foundation_log(_ x: Double) -> Double { Glibc.log(x) }

/// The thread pool's own guarantees: every item of a region runs exactly once, whatever the
/// thread count (also far more threads than cores, where workers may never be scheduled during
/// a region and the caller must not wait for them), and releasing a pool stops and joins its
/// threads.
@Suite("Thread pool")
struct ThreadPoolTests {
    struct CountItems: ParallelWork {
        let counts: UnsafeMutablePointer<UInt64>
        func run(_ item: Int) {
            while true {
                let v = ckernels_atomic_load64(counts + item)
                if ckernels_atomic_cas64(counts + item, v, v + 1) != 0 { return }
            }
        }
    }

    @Test(arguments: [1, 2, 3, 16, 64])
    func everyItemRunsExactlyOnce(threads: Int) {
        let pool = ThreadPool(threads: threads)
        let counts = UnsafeMutablePointer<UInt64>.allocate(capacity: 257)
        defer { counts.deallocate() }
        for count in [1, 2, 7, 64, 257] {
            for _ in 0..<200 {
                counts.initialize(repeating: 0, count: count)
                pool.parallelFor(count, CountItems(counts: counts))
                #expect((0..<count).allSatisfy { counts[$0] == 1 }, "\(threads) threads, \(count) items")
            }
        }
    }

    @Test func releasingAPoolJoinsItsThreads() {
        for _ in 0..<10 {
            var pool: ThreadPool? = ThreadPool(threads: 4)
            let running = pool!.runningWorkersProbe()
            var waited = 0
            while running() < 3 && waited < 5_000 { usleep(1000); waited += 1 }
            #expect(running() == 3, "workers started")
            let counts = UnsafeMutablePointer<UInt64>.allocate(capacity: 8)
            counts.initialize(repeating: 0, count: 8)
            pool!.parallelFor(8, CountItems(counts: counts))
            counts.deallocate()
            pool = nil
            #expect(running() == 0, "workers still running after the pool was released")
        }
    }
}

/// Scratch buffers (the activation rows every kernel reads) start on a cache line, however they
/// grow: 64-byte loads of rows that straddle two lines made the prefill tile ~25 % slower.
@Suite("Scratch memory")
struct ScratchTests {
    @Test func buffersAreCacheLineAligned() {
        let floats = Scratch<Float>(), bytes = Scratch<UInt8>()
        for count in [1, 3, 1000, 4096, 1 << 18, (1 << 18) + 5, 1 << 20] {
            #expect(Int(bitPattern: floats.reserve(count)) % 64 == 0, "\(count) floats")
            #expect(Int(bitPattern: bytes.reserve(count)) % 64 == 0, "\(count) bytes")
        }
    }
}
