import CKernels

/// y[m, n] = sum_k x[m, k] * W[n, k] for weights in F32, BF16 or F16, accumulating in f32.
///
/// The inner loop works on blocks of 16 columns. A bf16 weight block is loaded as 8 UInt32
/// lanes, each holding an (even, odd) pair of elements, and widened with one shift and one mask
/// — no shuffles. The activations are pre-arranged to match ("paired" layout: within each
/// 16-column block, the 8 even columns then the 8 odd ones), once per call, so the weights —
/// the bytes decode is bound by — stream through with no extra work. On CPUs with AVX-512 the
/// blocks are 32 columns wide (16 even, then 16 odd: one 64-byte load of weights, one shift and
/// one mask for 32 of them) and every bf16 product goes to the C kernels, which read that layout.
/// f16 blocks are widened in order by F16C (CKernels), f32 ones loaded as they are; their
/// activations stay as given.
package enum MatMul {
    /// Columns per SIMD block of the Swift kernels.
    static let block = 16

    /// Columns per block of the bf16 paired layout: 32 where the AVX-512 kernels run (every
    /// bf16 product then goes to them), else 16. Fixed per process, since one prepared input
    /// feeds products of any number of rows (an MoE layer's experts get 1, 2, ... tokens each).
    static let pairedBlock = ckernels_avx512_kernels() != 0 ? 32 : 16

    /// From this many activation rows on, bf16 products use the register-tiled C kernel
    /// (CKernels/gemm_bf16.c); fewer rows stream the weights (`fourStreams`). With AVX-512 the
    /// Swift kernels never see bf16 (see `pairedBlock`): one row goes to the AVX-512 decode
    /// kernel, two or more to the tiled one.
    static let prefillMinimumRows = pairedBlock == 32 ? 2 : 4

    /// Floats of scratch `multiply` needs for `m` activation rows of width `k`.
    package static func scratchCount(m: Int, k: Int) -> Int { m * k }

    /// Computes y = x W^T over all rows of `w`, spread over `pool`.
    /// - x: [m, w.cols] row-major with row stride `ldx`; y: [m, w.rows] with row stride `ldy`.
    /// - scratch: at least `scratchCount(m:k:)` floats, used for the paired activation layout.
    /// - regionScratch: as for `run`.
    package static func multiply(x: UnsafePointer<Float>, ldx: Int, m: Int, w: WeightMatrix,
                                 y: UnsafeMutablePointer<Float>, ldy: Int,
                                 scratch: UnsafeMutablePointer<Float>, pool: ThreadPool?,
                                 regionScratch: Scratch<UInt8>? = nil) {
        let prepared = prepare(x: x, ldx: ldx, m: m, k: w.cols, dtype: w.dtype, scratch: scratch)
        run(MatMulJob(x: prepared.pointer, ldx: prepared.stride, m: m, w: w, y: y, ldy: ldy), pool: pool,
            scratch: regionScratch)
    }

    /// Arranges activations for `w.dtype` (paired layout for bf16 weights, as given for f16 and
    /// f32). `pairedBlock`: 32 or 16 columns per block (tests prepare for each kernel).
    package static func prepare(x: UnsafePointer<Float>, ldx: Int, m: Int, k: Int, dtype: DType,
                                scratch: UnsafeMutablePointer<Float>,
                                pairedBlock: Int = MatMul.pairedBlock) -> (pointer: UnsafePointer<Float>, stride: Int) {
        if dtype != .bf16 { return (x, ldx) }
        for i in 0..<m {
            let src = UnsafeRawPointer(x + i * ldx), dst = UnsafeMutableRawPointer(scratch + i * k)
            var b = 0
            while pairedBlock == 32 && b + 32 <= k {
                let v = src.loadUnaligned(fromByteOffset: 4 * b, as: SIMD32<Float>.self)
                dst.storeBytes(of: v.evenHalf, toByteOffset: 4 * b, as: SIMD16<Float>.self)
                dst.storeBytes(of: v.oddHalf, toByteOffset: 4 * (b + 16), as: SIMD16<Float>.self)
                b += 32
            }
            while b + block <= k {
                let v = src.loadUnaligned(fromByteOffset: 4 * b, as: SIMD16<Float>.self)
                dst.storeBytes(of: v.evenHalf, toByteOffset: 4 * b, as: SIMD8<Float>.self)
                dst.storeBytes(of: v.oddHalf, toByteOffset: 4 * (b + block / 2), as: SIMD8<Float>.self)
                b += block
            }
            while b < k { scratch[i * k + b] = x[i * ldx + b]; b += 1 }
        }
        return (UnsafePointer(scratch), k)
    }

    /// Computes the given output rows for all m activation rows (single-threaded).
    package static func multiplyRows(_ x: UnsafePointer<Float>, ldx: Int, m: Int, w: WeightMatrix, rows: Range<Int>,
                                     y: UnsafeMutablePointer<Float>, ldy: Int) {
        switch w.dtype {
        case .bf16:
            if m >= prefillMinimumRows && ckernels_gemm_bf16(x, ldx, m, w.data.assumingMemoryBound(to: UInt16.self), w.cols,
                                                           rows.lowerBound, rows.upperBound, y, ldy) != 0 { return }
            Kernel<BF16Pairs>.run(x, ldx, m, w, rows, y, ldy)
        case .f16: Kernel<F16Blocks>.run(x, ldx, m, w, rows, y, ldy)
        case .f32: Kernel<F32Blocks>.run(x, ldx, m, w, rows, y, ldy)
        default: fatalError("weight dtype \(w.dtype) is rejected at load")
        }
    }
}

typealias Vec = SIMD8<Float>

/// Widens 16 consecutive weights into two f32 vectors in the order `prepare` arranged x.
protocol WeightBlockLoader {
    static var elementBytes: Int { get }
    static func load16(_ p: UnsafeRawPointer) -> (Vec, Vec)
    static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float
}

enum F32Blocks: WeightBlockLoader {
    static var elementBytes: Int { 4 }
    @inline(__always) static func load16(_ p: UnsafeRawPointer) -> (Vec, Vec) {
        (p.loadUnaligned(as: Vec.self), p.loadUnaligned(fromByteOffset: 32, as: Vec.self))
    }
    @inline(__always) static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        p.loadUnaligned(fromByteOffset: 4 * i, as: Float.self)
    }
}

enum BF16Pairs: WeightBlockLoader {
    static var elementBytes: Int { 2 }
    @inline(__always) static func load16(_ p: UnsafeRawPointer) -> (Vec, Vec) {
        let u = p.loadUnaligned(as: SIMD8<UInt32>.self)
        return (unsafeBitCast(u &<< 16, to: Vec.self), unsafeBitCast(u & SIMD8(repeating: 0xFFFF_0000), to: Vec.self))
    }
    @inline(__always) static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(bitPattern: UInt32(p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) << 16)
    }
}

/// f16 weights in natural order (activations are not paired for them): F16C widens 8 at a time.
enum F16Blocks: WeightBlockLoader {
    static var elementBytes: Int { 2 }
    @inline(__always) static func load16(_ p: UnsafeRawPointer) -> (Vec, Vec) {
        (ckernels_f16x8_to_f32(p), ckernels_f16x8_to_f32(p + 16))
    }
    @inline(__always) static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(p.loadUnaligned(fromByteOffset: 2 * i, as: Float16.self))
    }
}

/// How far ahead of the current weight block the decode kernel prefetches, in bytes. Measured on
/// bf16 rows of 1024 (one Zen 3 core): 0 B 13.5-14.8 GB/s, 512 B 15.6-16.8, 1 KiB 17.1-18.0,
/// 2 KiB 15.4-16.6, 4 KiB 13.4-14.4.
let streamPrefetchDistance = 1024

/// L1 data cache size the tile choice assumes (32 KiB on current x86 cores).
let l1Bytes = 32 << 10

/// Kernels sized for 16 vector registers. Few activation rows (decode, bound by memory): the rows
/// are split into four equal parts read side by side, so four sequential streams are in flight at
/// once, each with its own software prefetch; one Zen 3 core then reads 21-23 GB/s (mean over
/// repeats) where one stream at a time gives 15-16, two streams 19-20 and eight 17 (bf16,
/// 512 x 1024 and 32000 x 1024). Adjacent rows side by side are slower (11-13: they are one
/// stream at twice the stride). From 4 rows on, the C tile is faster even for batched decode
/// (m = 4: 40-46 vs 36-44 GFLOP/s). Four or more rows with f32 and f16 weights (bf16 goes to
/// CKernels): register tiles of 4 tokens x 2 weight rows when the activations fit in L1, else
/// 2 x 4, which halves activation reads (single thread, 16 tokens: 58 vs 46 GFLOP/s at K = 1024;
/// 4 x 2 wins 55 vs 43-52 at K = 512).
enum Kernel<L: WeightBlockLoader> {
    static func run(_ x: UnsafePointer<Float>, _ ldx: Int, _ m: Int, _ w: WeightMatrix, _ rows: Range<Int>,
                    _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        let k = w.cols
        let rowBytes = k * L.elementBytes
        var n = rows.lowerBound
        if m >= 4 && m * k * MemoryLayout<Float>.size <= l1Bytes {
            // The activations fit in L1: 4 x 2 tiles widen each weight block once per 4 tokens.
            while n + 2 <= rows.upperBound {
                let wp = w.data + n * rowBytes
                var i = 0
                while i + 4 <= m {
                    tile4x2(x + i * ldx, ldx, wp, rowBytes, k, y + i * ldy + n, ldy)
                    i += 4
                }
                while i < m {
                    y[i * ldy + n] = dot(x + i * ldx, wp, k)
                    y[i * ldy + n + 1] = dot(x + i * ldx, wp + rowBytes, k)
                    i += 1
                }
                n += 2
            }
        } else if m >= 4 {
            // The activations stream from L2: 2 x 4 tiles read them half as often.
            while n + 4 <= rows.upperBound {
                let wp = w.data + n * rowBytes
                var i = 0
                while i + 2 <= m {
                    tile2x4(x + i * ldx, ldx, wp, rowBytes, k, y + i * ldy + n, ldy)
                    i += 2
                }
                while i < m {
                    for r in 0..<4 { y[i * ldy + n + r] = dot(x + i * ldx, wp + r * rowBytes, k) }
                    i += 1
                }
                n += 4
            }
        } else {
            // Decode: the rows split into four equal parts read side by side, four sequential
            // streams at once.
            let part = rows.count / 4
            fourStreams(x, ldx, m, w.data + n * rowBytes, rowBytes: rowBytes, k: k, apart: part, steps: part, y + n, ldy)
            n += 4 * part
            if m == 1 && avx512Rows(x, w.data + n * rowBytes, k: k, streams: 1, apart: 0, steps: rows.upperBound - n, y + n) {
                return
            }
        }
        while n < rows.upperBound {
            let wp = w.data + n * rowBytes
            for i in 0..<m { y[i * ldy + n] = dot(x + i * ldx, wp, k) }
            n += 1
        }
    }

    @inline(__always)
    static func loadX(_ x: UnsafePointer<Float>, _ b: Int) -> (Vec, Vec) {
        let r = UnsafeRawPointer(x + b)
        return (r.loadUnaligned(as: Vec.self), r.loadUnaligned(fromByteOffset: 32, as: Vec.self))
    }

    @inline(__always)
    static func dot(_ x: UnsafePointer<Float>, _ w: UnsafeRawPointer, _ k: Int) -> Float {
        var acc = Vec()
        var b = 0
        while b + MatMul.block <= k {
            let (e, o) = L.load16(w + b * L.elementBytes)
            let (xe, xo) = loadX(x, b)
            acc.addProduct(e, xe)
            acc.addProduct(o, xo)
            b += MatMul.block
        }
        var s = acc.sum()
        while b < k { s += x[b] * L.scalar(w, b); b += 1 }
        return s
    }

    /// `steps` steps of four streams read side by side: step j dots weight rows j, j + apart,
    /// j + 2 apart and j + 3 apart (counted from `w`) with each of the m activation rows, into
    /// the same places of y (counted from `y`, row i of the activations at y + i * ldy).
    /// bf16 weights with one activation row go to the AVX-512 C kernel where the CPU runs it
    /// (`ckernels_decode_bf16`: a cache line per stream and step; decode steps 1-2 % faster on
    /// an Intel Xeon, bench/NOTES.md), everything else to `swiftFourStreams`.
    @inline(__always)
    static func fourStreams(_ x: UnsafePointer<Float>, _ ldx: Int, _ m: Int, _ w: UnsafeRawPointer, rowBytes: Int,
                            k: Int, apart: Int, steps: Int, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        if m == 1 && avx512Rows(x, w, k: k, streams: 4, apart: apart, steps: steps, y) { return }
        swiftFourStreams(x, ldx, m, w, rowBytes: rowBytes, k: k, apart: apart, steps: steps, y, ldy)
    }

    /// Rows j + s * apart (counted from `w`) for j < steps and s < streams (1-4), dotted with one
    /// activation row into the same places of y, by the AVX-512 kernel: bf16 weights on a CPU that
    /// runs it. False (y untouched) otherwise. Every row of a bf16 product with one activation row
    /// goes through here where it runs at all, so a row's sum is the same whichever schedule
    /// (one thread, or `DecodeLanes`) computed it.
    @inline(__always)
    static func avx512Rows(_ x: UnsafePointer<Float>, _ w: UnsafeRawPointer, k: Int, streams: Int, apart: Int, steps: Int,
                           _ y: UnsafeMutablePointer<Float>) -> Bool {
        L.self == BF16Pairs.self && steps > 0
            && ckernels_decode_bf16(x, w.assumingMemoryBound(to: UInt16.self), k, Int32(streams), apart, steps, y) != 0
    }

    /// `fourStreams` in Swift, 8 lanes wide: for every CPU and dtype (the AVX-512 kernel covers
    /// bf16 with one activation row).
    @inline(__always)
    static func swiftFourStreams(_ x: UnsafePointer<Float>, _ ldx: Int, _ m: Int, _ w: UnsafeRawPointer, rowBytes: Int,
                                 k: Int, apart: Int, steps: Int, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        let w1 = w + apart * rowBytes, w2 = w1 + apart * rowBytes, w3 = w2 + apart * rowBytes
        for j in 0..<steps {
            let off = j * rowBytes
            for i in 0..<m {
                let (a, b, c, d) = dotStream4(x + i * ldx, w + off, w1 + off, w2 + off, w3 + off, k)
                let yi = y + i * ldy + j
                yi[0] = a; yi[apart] = b; yi[2 * apart] = c; yi[3 * apart] = d
            }
        }
    }

    /// Four weight rows from four places in memory, each its own prefetched stream, dotted
    /// with one activation row.
    @inline(__always)
    static func dotStream4(_ x: UnsafePointer<Float>, _ w0: UnsafeRawPointer, _ w1: UnsafeRawPointer,
                           _ w2: UnsafeRawPointer, _ w3: UnsafeRawPointer, _ k: Int) -> (Float, Float, Float, Float) {
        var a0 = Vec(), a1 = Vec(), a2 = Vec(), a3 = Vec()
        var b = 0
        while b + MatMul.block <= k {
            let off = b * L.elementBytes
            ckernels_prefetch(w0 + off + streamPrefetchDistance)
            ckernels_prefetch(w1 + off + streamPrefetchDistance)
            ckernels_prefetch(w2 + off + streamPrefetchDistance)
            ckernels_prefetch(w3 + off + streamPrefetchDistance)
            let (xe, xo) = loadX(x, b)
            var (e, o) = L.load16(w0 + off)
            a0.addProduct(e, xe); a0.addProduct(o, xo)
            (e, o) = L.load16(w1 + off)
            a1.addProduct(e, xe); a1.addProduct(o, xo)
            (e, o) = L.load16(w2 + off)
            a2.addProduct(e, xe); a2.addProduct(o, xo)
            (e, o) = L.load16(w3 + off)
            a3.addProduct(e, xe); a3.addProduct(o, xo)
            b += MatMul.block
        }
        var s0 = a0.sum(), s1 = a1.sum(), s2 = a2.sum(), s3 = a3.sum()
        while b < k {
            s0 += x[b] * L.scalar(w0, b); s1 += x[b] * L.scalar(w1, b)
            s2 += x[b] * L.scalar(w2, b); s3 += x[b] * L.scalar(w3, b)
            b += 1
        }
        return (s0, s1, s2, s3)
    }

    /// 2 activation rows x 4 weight rows: each weight block is widened once and used for both
    /// rows; activations are read half as often as with 4 x 2 (they come from L2 in prefill).
    @inline(__always)
    static func tile2x4(_ x: UnsafePointer<Float>, _ ldx: Int, _ w: UnsafeRawPointer, _ rowBytes: Int, _ k: Int,
                        _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        var c00 = Vec(), c01 = Vec(), c02 = Vec(), c03 = Vec()
        var c10 = Vec(), c11 = Vec(), c12 = Vec(), c13 = Vec()
        let w1 = w + rowBytes, w2 = w + 2 * rowBytes, w3 = w + 3 * rowBytes
        let x1 = x + ldx
        var b = 0
        while b + MatMul.block <= k {
            let off = b * L.elementBytes
            let (xe0, xo0) = loadX(x, b)
            let (xe1, xo1) = loadX(x1, b)
            var (e, o) = L.load16(w + off)
            c00.addProduct(e, xe0); c10.addProduct(e, xe1); c00.addProduct(o, xo0); c10.addProduct(o, xo1)
            (e, o) = L.load16(w1 + off)
            c01.addProduct(e, xe0); c11.addProduct(e, xe1); c01.addProduct(o, xo0); c11.addProduct(o, xo1)
            (e, o) = L.load16(w2 + off)
            c02.addProduct(e, xe0); c12.addProduct(e, xe1); c02.addProduct(o, xo0); c12.addProduct(o, xo1)
            (e, o) = L.load16(w3 + off)
            c03.addProduct(e, xe0); c13.addProduct(e, xe1); c03.addProduct(o, xo0); c13.addProduct(o, xo1)
            b += MatMul.block
        }
        var s00 = c00.sum(), s01 = c01.sum(), s02 = c02.sum(), s03 = c03.sum()
        var s10 = c10.sum(), s11 = c11.sum(), s12 = c12.sum(), s13 = c13.sum()
        while b < k {
            let a = x[b], c = x1[b]
            let v0 = L.scalar(w, b), v1 = L.scalar(w1, b), v2 = L.scalar(w2, b), v3 = L.scalar(w3, b)
            s00 += a * v0; s01 += a * v1; s02 += a * v2; s03 += a * v3
            s10 += c * v0; s11 += c * v1; s12 += c * v2; s13 += c * v3
            b += 1
        }
        y[0] = s00; y[1] = s01; y[2] = s02; y[3] = s03
        y[ldy] = s10; y[ldy + 1] = s11; y[ldy + 2] = s12; y[ldy + 3] = s13
    }

    @inline(__always)
    static func tile4x2(_ x: UnsafePointer<Float>, _ ldx: Int, _ w: UnsafeRawPointer, _ rowBytes: Int, _ k: Int,
                        _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        var c00 = Vec(), c01 = Vec(), c10 = Vec(), c11 = Vec()
        var c20 = Vec(), c21 = Vec(), c30 = Vec(), c31 = Vec()
        let w1 = w + rowBytes
        let x0 = x, x1 = x + ldx, x2 = x + 2 * ldx, x3 = x + 3 * ldx
        var b = 0
        while b + MatMul.block <= k {
            let off = b * L.elementBytes
            let (e0, o0) = L.load16(w + off)
            let (e1, o1) = L.load16(w1 + off)
            var (xe, xo) = loadX(x0, b)
            c00.addProduct(e0, xe); c00.addProduct(o0, xo); c01.addProduct(e1, xe); c01.addProduct(o1, xo)
            (xe, xo) = loadX(x1, b)
            c10.addProduct(e0, xe); c10.addProduct(o0, xo); c11.addProduct(e1, xe); c11.addProduct(o1, xo)
            (xe, xo) = loadX(x2, b)
            c20.addProduct(e0, xe); c20.addProduct(o0, xo); c21.addProduct(e1, xe); c21.addProduct(o1, xo)
            (xe, xo) = loadX(x3, b)
            c30.addProduct(e0, xe); c30.addProduct(o0, xo); c31.addProduct(e1, xe); c31.addProduct(o1, xo)
            b += MatMul.block
        }
        var s00 = c00.sum(), s01 = c01.sum(), s10 = c10.sum(), s11 = c11.sum()
        var s20 = c20.sum(), s21 = c21.sum(), s30 = c30.sum(), s31 = c31.sum()
        while b < k {
            let w0v = L.scalar(w, b), w1v = L.scalar(w1, b)
            s00 += x0[b] * w0v; s01 += x0[b] * w1v
            s10 += x1[b] * w0v; s11 += x1[b] * w1v
            s20 += x2[b] * w0v; s21 += x2[b] * w1v
            s30 += x3[b] * w0v; s31 += x3[b] * w1v
            b += 1
        }
        y[0] = s00; y[1] = s01
        y[ldy] = s10; y[ldy + 1] = s11
        y[2 * ldy] = s20; y[2 * ldy + 1] = s21
        y[3 * ldy] = s30; y[3 * ldy + 1] = s31
    }
}

/// One matrix product of a batch of products run as a single parallel region: a decode step's
/// q/k/v projections, or every selected expert's gate and up projections, cost one dispatch.
package struct MatMulJob: BitwiseCopyable {
    /// Activations already arranged by `MatMul.prepare` for `w.dtype`.
    package var x: UnsafePointer<Float>
    package var ldx: Int
    package var m: Int
    package var w: WeightMatrix
    package var y: UnsafeMutablePointer<Float>
    package var ldy: Int

    package init(x: UnsafePointer<Float>, ldx: Int, m: Int, w: WeightMatrix, y: UnsafeMutablePointer<Float>, ldy: Int) {
        self.x = x; self.ldx = ldx; self.m = m; self.w = w; self.y = y; self.ldy = ldy
    }
}

extension MatMul {
    /// Multiply-adds below which a work item is not split further (64 rows of a 1024-wide decode
    /// product: four streams of 32 KiB).
    static let minimumItemWork = 64 << 10

    /// A region smaller than `minimumItemWork` per thread is still shared out evenly down to
    /// items of this size (a decode step's router, 64 rows of 1024: two items of 32 rows instead
    /// of one thread reading it while the other waits).
    static let smallestItemWork = 16 << 10

    /// Runs all jobs, split into row ranges that the pool's threads take in turn.
    ///
    /// Decode-shaped regions (one activation row per product, at least
    /// `DecodeLanes.minimumBytes`) go to `DecodeLanes`, which keeps each thread's streams long.
    /// Everything else is cut into work items that shrink as the region goes on (a guided
    /// schedule: each item is a third of the work still to hand out per thread, but at least
    /// `minimumItemWork`, or an even share of a smaller region down to `smallestItemWork`), so
    /// threads finish together instead of one waiting for the other's last big item. On 2
    /// threads, decode of the benchmark model (perf, four runs each) spent 6.9-8.2 % of thread
    /// time waiting with equal items of 1/16 of a region and 3.0-5.4 % with shrinking ones;
    /// prefill did not change.
    ///
    /// The schedule the threads share (lanes' step table, or the item list) goes to `scratch`
    /// when given, so that a session's regions allocate nothing however many products they hold;
    /// without it, to the stack (up to 960 bytes: a few dozen items) or the heap.
    package static func run(_ jobs: UnsafeBufferPointer<MatMulJob>, pool: ThreadPool?, scratch: Scratch<UInt8>? = nil) {
        let threads = pool?.threadCount ?? 1
        if let pool, threads > 1, DecodeLanes.accepts(jobs) {
            DecodeLanes.run(jobs, pool: pool, scratch: scratch)
            return
        }
        if threads <= 1 || jobs.isEmpty {
            for j in jobs { multiplyRows(j.x, ldx: j.ldx, m: j.m, w: j.w, rows: 0..<j.w.rows, y: j.y, ldy: j.ldy) }
            return
        }
        // The items are counted first, then listed in a buffer of that size.
        var count = 0
        forEachItem(jobs, threads: threads) { _, _ in count += 1 }
        withRegionScratch(byteCount: count * MemoryLayout<MatMulItem>.stride, in: scratch) { scratch in
            let items = scratch.bindMemory(to: MatMulItem.self, capacity: count)
            var i = 0
            forEachItem(jobs, threads: threads) { job, rows in
                items[i] = MatMulItem(job: Int32(job), start: Int32(rows.lowerBound), end: Int32(rows.upperBound))
                i += 1
            }
            pool!.parallelFor(count, MatMulItems(jobs: jobs, items: UnsafeBufferPointer(start: items, count: count)))
        }
    }

    /// Runs one product as a region (see the buffer form).
    package static func run(_ job: MatMulJob, pool: ThreadPool?, scratch: Scratch<UInt8>? = nil) {
        withUnsafePointer(to: job) { run(UnsafeBufferPointer(start: $0, count: 1), pool: pool, scratch: scratch) }
    }

    /// Runs all jobs (see the buffer form); for callers that hold their jobs in an array.
    package static func run(_ jobs: [MatMulJob], pool: ThreadPool?) {
        jobs.withUnsafeBufferPointer { run($0, pool: pool) }
    }

    /// The guided schedule: calls `body(job, rows)` for each work item, in order.
    private static func forEachItem(_ jobs: UnsafeBufferPointer<MatMulJob>, threads: Int, _ body: (Int, Range<Int>) -> Void) {
        var remaining = jobs.reduce(0) { $0 + $1.w.rows * $1.w.cols * max(1, $1.m) }
        let minimum = max(smallestItemWork, min(minimumItemWork, remaining / threads))
        for (index, j) in jobs.enumerated() {
            let perRow = j.w.cols * max(1, j.m)
            var r = 0
            while r < j.w.rows {
                let work = max(minimum, remaining / (3 * threads))
                let size = (max(4, work / max(1, perRow)) + 3) & ~3  // whole groups of four for the decode streams
                let end = min(r + size, j.w.rows)
                body(index, r..<end)
                remaining -= (end - r) * perRow
                r = end
            }
        }
    }
}

/// Rows start..<end of product `job`: one work item of `MatMul.run`, 12 bytes (every matrix
/// dimension comes from a config value, which is at most Int32.max).
struct MatMulItem {
    let job: Int32
    let start: Int32
    let end: Int32
}

/// A region of `MatMul.run`: item i computes its rows of its product.
struct MatMulItems: ParallelWork {
    let jobs: UnsafeBufferPointer<MatMulJob>
    let items: UnsafeBufferPointer<MatMulItem>

    func run(_ i: Int) {
        let item = items[i], j = jobs[Int(item.job)]
        MatMul.multiplyRows(j.x, ldx: j.ldx, m: j.m, w: j.w, rows: Int(item.start)..<Int(item.end), y: j.y, ldy: j.ldy)
    }
}
