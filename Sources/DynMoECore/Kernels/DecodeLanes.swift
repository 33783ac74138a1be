import CKernels

/// How a decode-shaped region (one activation row per product) is shared out over threads.
///
/// Each product's rows are cut into four equal lanes, read side by side by the kernel (four
/// streams, as `Kernel.run` reads a product on one thread); a step is one row of each lane. The
/// region's steps, product after product, are split into one contiguous range per thread. A
/// thread works through its range from the front, so its four streams run unbroken to the end
/// of each product, and a thread that runs out takes the back half of another's remaining range,
/// so threads still finish together.
///
/// Why not work items (what prefill uses): an item of 64-512 rows starts four new streams and
/// the last item leaves one thread waiting. Splitting the LM head into 32 back-to-back regions
/// of 1,024 rows took it from 1.46 to 1.75 ms on 2 threads, ~9 us per region, and a decode step
/// has ~100 regions; in the same steps the layers' regions streamed at ~83 % of the LM head's
/// rate. Against items, on 2 threads (an instrumented build switching every two decode steps,
/// 8 passes of 64 steps each, benchmark model; step time lanes / items): native 0.967-0.998,
/// top-k 2 0.944-0.999, top-k 4 0.972-0.973, top-p 0.4 0.950-0.976; the paper's layout native
/// 0.966, top-p 0.4 0.938 (the same harness with identical arms: 1.003-1.012). Lanes running on across products (four streams in four different
/// matrices, each with its own activation row) made the 8-16-product expert regions of a native
/// step 5-15 % slower and were dropped; a lane stays within its product.
enum DecodeLanes {
    static let lanes = 4

    /// Steps a thread takes from its own range at a time (one atomic operation each): at most
    /// this many, and a quarter of what is left, so a thread that runs out finds something to take.
    static let batch = 32

    /// Weight bytes below which a region keeps work items: a decode step's router (128 KiB, 64
    /// rows) ran slower in lanes, its few steps claimed and stolen back and forth.
    static let minimumBytes = 256 << 10

    /// Whether `run` takes these jobs: one activation row each, `minimumBytes` in all, and fewer
    /// than 2^32 rows (a thread's range packs two step counts into one 64-bit word).
    static func accepts(_ jobs: UnsafeBufferPointer<MatMulJob>) -> Bool {
        jobs.allSatisfy { $0.m == 1 } && jobs.reduce(0) { $0 + $1.w.byteCount } >= minimumBytes
            && jobs.reduce(0) { $0 + $1.w.rows } < 1 << 32
    }

    /// Runs every row of every job on `pool` (requires `accepts(jobs)`); see `MatMul.run` for
    /// `scratch`.
    static func run(_ jobs: UnsafeBufferPointer<MatMulJob>, pool: ThreadPool, scratch: Scratch<UInt8>?) {
        // Scratch for the region: one range word per thread, each on its own cache line
        // ((front << 32) | end, in steps), then where each job's steps start (jobs.count + 1).
        let stride = 64 / MemoryLayout<UInt64>.size
        let wordBytes = pool.threadCount * 64
        withRegionScratch(byteCount: wordBytes + (jobs.count + 1) * MemoryLayout<Int>.size, in: scratch) { scratch in
            let stepStarts = (scratch + wordBytes).bindMemory(to: Int.self, capacity: jobs.count + 1)
            stepStarts[0] = 0
            for (i, j) in jobs.enumerated() { stepStarts[i + 1] = stepStarts[i] + (j.w.rows + lanes - 1) / lanes }
            let steps = stepStarts[jobs.count]
            if steps == 0 { return }
            let threads = min(pool.threadCount, steps)
            let words = scratch.bindMemory(to: UInt64.self, capacity: threads * stride)
            for t in 0..<threads {
                words[t * stride] = UInt64(t * steps / threads) << 32 | UInt64((t + 1) * steps / threads)
            }
            let ranges = RangeWords(base: words, stride: stride, count: threads)
            pool.parallelFor(threads, Schedule(jobs: jobs, stepStarts: UnsafePointer(stepStarts), ranges: ranges))
        }
    }

    /// The threads' step ranges, claimed and split with compare-and-swap.
    struct RangeWords {
        let base: UnsafeMutablePointer<UInt64>
        let stride: Int
        let count: Int

        private func word(_ t: Int) -> UnsafeMutablePointer<UInt64> { base + t * stride }
        private static func unpack(_ v: UInt64) -> (front: Int, end: Int) { (Int(v >> 32), Int(v & 0xFFFF_FFFF)) }
        private static func pack(_ front: Int, _ end: Int) -> UInt64 { UInt64(front) << 32 | UInt64(end) }

        /// Takes steps from the front of thread t's own range, at most up to `limit`.
        func claim(_ t: Int, limit: (Int) -> Int) -> Range<Int>? {
            while true {
                let v = ckernels_atomic_load64(word(t))
                let (front, end) = RangeWords.unpack(v)
                if front >= end { return nil }
                let next = min(limit(front), front + max(1, min(DecodeLanes.batch, (end - front) / 4)))
                if ckernels_atomic_cas64(word(t), v, RangeWords.pack(next, end)) != 0 { return front..<next }
            }
        }

        /// Moves the back half of the largest other range (at least two steps) into thread t's
        /// range, which must be empty; false when there is nothing worth taking.
        func steal(into t: Int) -> Bool {
            while true {
                var victim = -1, largest = 1
                for u in 0..<count where u != t {
                    let (front, end) = RangeWords.unpack(ckernels_atomic_load64(word(u)))
                    if end - front > largest { victim = u; largest = end - front }
                }
                if victim < 0 { return false }
                let v = ckernels_atomic_load64(word(victim))
                let (front, end) = RangeWords.unpack(v)
                if end - front < 2 { continue }
                let middle = front + (end - front) / 2
                if ckernels_atomic_cas64(word(victim), v, RangeWords.pack(front, middle)) != 0 {
                    // Nobody else writes an empty range's word: there is nothing to take from it.
                    ckernels_atomic_store64(word(t), RangeWords.pack(middle, end))
                    return true
                }
            }
        }
    }

    /// Which product a step belongs to, and the products' kernels: item t is thread t's range.
    struct Schedule: ParallelWork {
        let jobs: UnsafeBufferPointer<MatMulJob>
        /// jobs.count + 1 entries: the first step of each job, then the total.
        let stepStarts: UnsafePointer<Int>
        let ranges: RangeWords

        func run(_ t: Int) {
            var j = 0
            repeat {
                // A claim stops at the end of a product, so each claim has one weight matrix.
                while let claimed = ranges.claim(t, limit: { front in
                    j = front < stepStarts[j] ? 0 : j
                    while stepStarts[j + 1] <= front { j += 1 }
                    return stepStarts[j + 1]
                }) {
                    let job = jobs[j]
                    let steps = (claimed.lowerBound - stepStarts[j])..<(claimed.upperBound - stepStarts[j])
                    switch job.w.dtype {
                    case .bf16: Kernel<BF16Pairs>.lanes(job, steps: steps)
                    case .f16: Kernel<F16Blocks>.lanes(job, steps: steps)
                    case .f32: Kernel<F32Blocks>.lanes(job, steps: steps)
                    default: fatalError("weight dtype \(job.w.dtype) is rejected at load")
                    }
                }
            } while ranges.steal(into: t)
        }
    }
}

extension Kernel {
    /// Steps `steps` of one product's four lanes (lane q holds rows q * laneRows ..< (q + 1) *
    /// laneRows), for one activation row.
    static func lanes(_ job: MatMulJob, steps: Range<Int>) {
        let k = job.w.cols, rowBytes = k * L.elementBytes, rows = job.w.rows
        let laneRows = (rows + DecodeLanes.lanes - 1) / DecodeLanes.lanes
        // Steps in which all four lanes have a row; the last lane is short when rows % 4 != 0.
        let full = steps.clamped(to: 0..<max(0, rows - 3 * laneRows))
        fourStreams(job.x, job.ldx, 1, job.w.data + full.lowerBound * rowBytes, rowBytes: rowBytes, k: k,
                    apart: laneRows, steps: full.count, job.y + full.lowerBound, job.ldy)
        var s = full.isEmpty ? steps.lowerBound : full.upperBound
        while s < steps.upperBound {
            // The rows s, s + laneRows, ... that exist: fewer than four.
            let present = (rows - s + laneRows - 1) / laneRows
            if avx512Rows(job.x, job.w.data + s * rowBytes, k: k, streams: present, apart: laneRows, steps: 1, job.y + s) {
                s += 1
                continue
            }
            var r = s
            while r < rows {
                job.y[r] = dot(job.x, job.w.data + r * rowBytes, k)
                r += laneRows
            }
            s += 1
        }
    }
}
