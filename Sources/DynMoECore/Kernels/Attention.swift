import CKernels

/// One query row of attention: a query head at one position, the cache positions it attends to
/// (`first..<end`: causal, and a sliding window if the model has one) and where its output goes.
package struct AttentionRow {
    package var query: UnsafePointer<Float>
    package var out: UnsafeMutablePointer<Float>
    package var first: Int
    package var end: Int

    package init(query: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, first: Int, end: Int) {
        self.query = query; self.out = out; self.first = first; self.end = end
    }
}

/// The two inner loops of attention for one KV head: scores against the cached keys, then the
/// softmax-weighted sum of the cached values. Keys and values are stored as f32, f16 or bf16
/// (`KVCache.element`) and widened in registers.
package enum Attention {
    typealias V = SIMD8<Float>

    /// Rows computed together by `attend`: each key and value is loaded once for all of them.
    package static let rowsPerStep = 4

    /// Attention of 1...`rowsPerStep` query rows that read the same KV head (`keys`/`values`:
    /// that head's cache rows from position 0, `headDim` elements apart). `scores` has room for
    /// `rowsPerStep` x (largest `end` - smallest `first`) floats.
    ///
    /// Four rows (a grouped-query group's heads, or consecutive positions of a prompt) go through
    /// the four-row C kernels over the union of their key ranges; each row's softmax covers only
    /// its own range and the weights outside it are zero, so every row gets what it would get
    /// alone (up to the order of the score sums for keys the one-row path leaves to Swift). Fewer
    /// rows, or head widths the kernels do not take, go row by row (the one-row C kernels read
    /// keys and values as four streams each: a decode step of a model without grouped-query
    /// attention has one row per KV head, and its cache rows come from memory).
    package static func attend(rows: UnsafeBufferPointer<AttentionRow>, keys: UnsafeRawPointer, values: UnsafeRawPointer,
                               element: DType, headDim: Int, scale: Float, scores: UnsafeMutablePointer<Float>) {
        switch element {
        case .f16: attend(F16Rows.self, rows, keys, values, headDim, scale, scores)
        case .bf16: attend(BF16Rows.self, rows, keys, values, headDim, scale, scores)
        default: attend(F32Rows.self, rows, keys, values, headDim, scale, scores)
        }
    }

    static func attend<R: KVRows>(_: R.Type, _ rows: UnsafeBufferPointer<AttentionRow>, _ keys: UnsafeRawPointer,
                                  _ values: UnsafeRawPointer, _ dim: Int, _ scale: Float,
                                  _ scores: UnsafeMutablePointer<Float>) {
        let rowBytes = dim * R.bytes
        guard rows.count == rowsPerStep else {
            for row in rows {
                let n = row.end - row.first
                rowScores(R.self, row.query, keys + row.first * rowBytes, n, dim, scale, scores)
                let inverse = 1 / Elementwise.expShiftedSum(scores, n)
                let rowValues = values + row.first * rowBytes
                if ckernels_attention_weighted_sum(scores, n, rowValues, R.kernelType, dim, dim, inverse, row.out) == 0 {
                    weightedSum(R.self, scores, n, rowValues, dim, inverse, row.out)
                }
            }
            return
        }
        withUnsafeTemporaryAllocation(of: UnsafePointer<Float>?.self, capacity: rowsPerStep) { queries in
            withUnsafeTemporaryAllocation(of: UnsafeMutablePointer<Float>?.self, capacity: rowsPerStep) { scoreRows in
                withUnsafeTemporaryAllocation(of: UnsafeMutablePointer<Float>?.self, capacity: rowsPerStep) { outs in
                    withUnsafeTemporaryAllocation(of: Float.self, capacity: rowsPerStep) { inverses in
                        attendFour(R.self, rows, keys, values, dim, scale, scores, queries.baseAddress!,
                                   scoreRows.baseAddress!, outs.baseAddress!, inverses.baseAddress!)
                    }
                }
            }
        }
    }

    /// `attend` for exactly four rows; the last four arguments are room for the C kernels'
    /// per-row pointer and scale arrays.
    static func attendFour<R: KVRows>(_: R.Type, _ rows: UnsafeBufferPointer<AttentionRow>, _ keys: UnsafeRawPointer,
                                      _ values: UnsafeRawPointer, _ dim: Int, _ scale: Float,
                                      _ scores: UnsafeMutablePointer<Float>,
                                      _ queries: UnsafeMutablePointer<UnsafePointer<Float>?>,
                                      _ scoreRows: UnsafeMutablePointer<UnsafeMutablePointer<Float>?>,
                                      _ outs: UnsafeMutablePointer<UnsafeMutablePointer<Float>?>,
                                      _ inverses: UnsafeMutablePointer<Float>) {
        let rowBytes = dim * R.bytes
        var first = rows[0].first, end = rows[0].end
        for row in rows { first = min(first, row.first); end = max(end, row.end) }
        let span = end - first
        for r in 0..<rowsPerStep {
            queries[r] = rows[r].query
            scoreRows[r] = scores + r * span
            outs[r] = rows[r].out
        }
        let done = ckernels_attention_scores4(queries, keys + first * rowBytes, values + first * rowBytes, R.kernelType,
                                              dim, span, dim, scale, scoreRows)
        if done < span {
            for r in 0..<rowsPerStep {
                rowScores(R.self, rows[r].query, keys + (first + done) * rowBytes, span - done, dim, scale,
                          scores + r * span + done)
            }
        }
        for r in 0..<rowsPerStep {
            let w = scores + r * span, lower = rows[r].first - first, upper = rows[r].end - first
            inverses[r] = 1 / Elementwise.expShiftedSum(w + lower, upper - lower)
            for j in 0..<lower { w[j] = 0 }
            for j in upper..<span { w[j] = 0 }
        }
        let summed = scoreRows.withMemoryRebound(to: UnsafePointer<Float>?.self, capacity: rowsPerStep) { weights in
            ckernels_attention_weighted_sum4(weights, span, values + first * rowBytes, R.kernelType, dim, dim, inverses, outs)
        }
        if summed != 0 { return }
        for r in 0..<rowsPerStep {
            weightedSum(R.self, scores + r * span, span, values + first * rowBytes, dim, inverses[r], rows[r].out)
        }
    }

    /// out[j] = scale * q . k_j for `count` keys (`dim` elements apart): eight keys at a time
    /// through CKernels, what it leaves (a tail under 8 keys, or widths not a multiple of 64)
    /// key by key.
    static func rowScores<R: KVRows>(_: R.Type, _ q: UnsafePointer<Float>, _ keys: UnsafeRawPointer, _ count: Int,
                                     _ dim: Int, _ scale: Float, _ out: UnsafeMutablePointer<Float>) {
        let done = ckernels_attention_scores(q, keys, R.kernelType, dim, count, dim, scale, out)
        for j in done..<count { out[j] = dot(R.self, q, keys + j * dim * R.bytes, dim) * scale }
    }

    @inline(__always)
    static func dot<R: KVRows>(_: R.Type, _ q: UnsafePointer<Float>, _ k: UnsafeRawPointer, _ n: Int) -> Float {
        var acc = V()
        var c = 0
        while c + 8 <= n {
            acc.addProduct(load(q + c), R.load8(k + c * R.bytes))
            c += 8
        }
        var s = acc.sum()
        while c < n { s += q[c] * R.scalar(k, c); c += 1 }
        return s
    }

    @inline(__always) static func load(_ p: UnsafePointer<Float>) -> V { UnsafeRawPointer(p).loadUnaligned(as: V.self) }
    @inline(__always) static func store(_ v: V, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self)
    }

    /// out[c] = inverse * sum_j w[j] * values[j * dim + c], one row at a time: 64 columns per
    /// pass over the values (8 accumulators, one sequential stream), then 8, then single columns.
    /// The four-row kernel's order; one row goes here when the C kernel does not take it.
    static func weightedSum<R: KVRows>(_: R.Type, _ w: UnsafePointer<Float>, _ n: Int, _ values: UnsafeRawPointer,
                                       _ dim: Int, _ inverse: Float, _ out: UnsafeMutablePointer<Float>) {
        let rowBytes = dim * R.bytes
        var c = 0
        while c + 64 <= dim {
            var a0 = V(), a1 = V(), a2 = V(), a3 = V(), a4 = V(), a5 = V(), a6 = V(), a7 = V()
            for j in 0..<n {
                let p = V(repeating: w[j]), r = values + j * rowBytes + c * R.bytes
                a0.addProduct(p, R.load8(r)); a1.addProduct(p, R.load8(r + 8 * R.bytes))
                a2.addProduct(p, R.load8(r + 16 * R.bytes)); a3.addProduct(p, R.load8(r + 24 * R.bytes))
                a4.addProduct(p, R.load8(r + 32 * R.bytes)); a5.addProduct(p, R.load8(r + 40 * R.bytes))
                a6.addProduct(p, R.load8(r + 48 * R.bytes)); a7.addProduct(p, R.load8(r + 56 * R.bytes))
            }
            store(a0 * inverse, out + c); store(a1 * inverse, out + c + 8)
            store(a2 * inverse, out + c + 16); store(a3 * inverse, out + c + 24)
            store(a4 * inverse, out + c + 32); store(a5 * inverse, out + c + 40)
            store(a6 * inverse, out + c + 48); store(a7 * inverse, out + c + 56)
            c += 64
        }
        while c + 8 <= dim {
            var a = V()
            for j in 0..<n { a.addProduct(V(repeating: w[j]), R.load8(values + j * rowBytes + c * R.bytes)) }
            store(a * inverse, out + c)
            c += 8
        }
        while c < dim {
            var a: Float = 0
            for j in 0..<n { a += w[j] * R.scalar(values + j * rowBytes, c) }
            out[c] = a * inverse
            c += 1
        }
    }
}

/// Loads of KV-cache rows (natural element order) widened to f32.
protocol KVRows {
    static var bytes: Int { get }
    static var element: DType { get }
    /// The storage type as CKernels names it (CKERNELS_KV_*).
    static var kernelType: Int32 { get }
    /// Elements 0..<8 at `p`.
    static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float>
    /// Element `i` of the row at `p`.
    static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float
}

enum F32Rows: KVRows {
    static var bytes: Int { 4 }
    static var element: DType { .f32 }
    static var kernelType: Int32 { Int32(CKERNELS_KV_F32) }
    @inline(__always) static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float> { p.loadUnaligned(as: SIMD8<Float>.self) }
    @inline(__always) static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        p.loadUnaligned(fromByteOffset: 4 * i, as: Float.self)
    }
}

enum F16Rows: KVRows {
    static var bytes: Int { 2 }
    static var element: DType { .f16 }
    static var kernelType: Int32 { Int32(CKERNELS_KV_F16) }
    @inline(__always) static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float> { ckernels_f16x8_to_f32(p) }
    @inline(__always) static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(p.loadUnaligned(fromByteOffset: 2 * i, as: Float16.self))
    }
}

enum BF16Rows: KVRows {
    static var bytes: Int { 2 }
    static var element: DType { .bf16 }
    static var kernelType: Int32 { Int32(CKERNELS_KV_BF16) }
    @inline(__always) static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float> { ckernels_bf16x8_to_f32(p) }
    @inline(__always) static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(bitPattern: UInt32(p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) << 16)
    }
}
