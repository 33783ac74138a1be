import CKernels

/// The two inner loops of attention for one KV head and the query heads that share it (grouped-
/// query attention): scores against every cached key, then the softmax-weighted sum of the
/// cached values. Each key and value row is read once for the whole group. Keys and values are
/// stored as f32, f16 or bf16 (`KVCache.element`) and widened in registers.
package enum Attention {
    typealias V = SIMD8<Float>

    /// out[g * outStride + j] = scale * q_g . k_j for the `heads` query heads q_g (consecutive,
    /// `headDim` apart) and `count` keys k_j (`stride` elements of type `element` apart).
    /// Eight keys at a time per head through CKernels (the group's other heads find those keys
    /// in L1); what it leaves (a tail under 8 keys, or widths not a multiple of 64) key by key.
    package static func groupScores(q: UnsafePointer<Float>, heads: Int, headDim: Int, keys: UnsafeRawPointer,
                                    element: DType, stride: Int, count: Int, scale: Float,
                                    out: UnsafeMutablePointer<Float>, outStride: Int) {
        let keyType = kernelType(element), bytes = element.byteSize
        var done = 0
        var block = 0
        while block < count {
            let n = min(scoreBlock, count - block)
            var blockDone = n
            for g in 0..<heads {
                blockDone = ckernels_attention_scores(q + g * headDim, keys + block * stride * bytes, keyType, stride, n,
                                                      headDim, scale, out + g * outStride + block)
            }
            done = block + blockDone
            if blockDone < n { break }
            block += n
        }
        if done == count { return }
        switch element {
        case .f16: remainingScores(F16Rows.self, q, heads, headDim, keys, stride, done, count, scale, out, outStride)
        case .bf16: remainingScores(BF16Rows.self, q, heads, headDim, keys, stride, done, count, scale, out, outStride)
        default: remainingScores(F32Rows.self, q, heads, headDim, keys, stride, done, count, scale, out, outStride)
        }
    }

    /// Keys scored for every head of the group before moving on (64 KiB of 64-wide keys: L1/L2).
    static let scoreBlock = 256

    static func kernelType(_ element: DType) -> Int32 {
        switch element {
        case .f16: return Int32(CKERNELS_KV_F16)
        case .bf16: return Int32(CKERNELS_KV_BF16)
        default: return Int32(CKERNELS_KV_F32)
        }
    }

    static func remainingScores<R: KVRows>(_: R.Type, _ q: UnsafePointer<Float>, _ heads: Int, _ dim: Int,
                                           _ keys: UnsafeRawPointer, _ stride: Int, _ first: Int, _ count: Int,
                                           _ scale: Float, _ out: UnsafeMutablePointer<Float>, _ outStride: Int) {
        for j in first..<count {
            let k = keys + j * stride * R.bytes
            for g in 0..<heads { out[g * outStride + j] = dot(R.self, q + g * dim, k, dim) * scale }
        }
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

    /// Turns each head's scores into softmax weights and writes
    /// out[g * headDim + c] = sum_j p_g[j] * v_j[c]. Each head accumulates up to 64 columns in
    /// registers over all values, reading them as one sequential stream (the KV cache keeps a
    /// head's values contiguous); the group's other heads find them in L2. An axpy per value row
    /// into `out` chains every row through a store and reload, and 16 columns x 4 heads per
    /// pass read the values with a stride: both measured slower.
    package static func groupWeightedSum(weights: UnsafeMutablePointer<Float>, weightStride: Int, heads: Int, count: Int,
                                         values: UnsafeRawPointer, element: DType, stride: Int, headDim: Int,
                                         out: UnsafeMutablePointer<Float>) {
        switch element {
        case .f16: groupWeightedSum(F16Rows.self, weights, weightStride, heads, count, values, stride, headDim, out)
        case .bf16: groupWeightedSum(BF16Rows.self, weights, weightStride, heads, count, values, stride, headDim, out)
        default: groupWeightedSum(F32Rows.self, weights, weightStride, heads, count, values, stride, headDim, out)
        }
    }

    static func groupWeightedSum<R: KVRows>(_: R.Type, _ weights: UnsafeMutablePointer<Float>, _ weightStride: Int,
                                            _ heads: Int, _ count: Int, _ values: UnsafeRawPointer, _ stride: Int,
                                            _ headDim: Int, _ out: UnsafeMutablePointer<Float>) {
        for g in 0..<heads {
            let w = weights + g * weightStride
            let inverse = 1 / Elementwise.expShiftedSum(w, count)
            weightedSum(R.self, w, count, values, stride, headDim, inverse, out + g * headDim)
        }
    }

    @inline(__always) static func load(_ p: UnsafePointer<Float>) -> V { UnsafeRawPointer(p).loadUnaligned(as: V.self) }
    @inline(__always) static func store(_ v: V, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self)
    }

    /// out[c] = inverse * sum_j w[j] * values[j * stride + c]: 64 columns per pass (8
    /// accumulators), then 8, then single columns.
    static func weightedSum<R: KVRows>(_: R.Type, _ w: UnsafePointer<Float>, _ n: Int, _ values: UnsafeRawPointer,
                                       _ stride: Int, _ dim: Int, _ inverse: Float, _ out: UnsafeMutablePointer<Float>) {
        let rowBytes = stride * R.bytes
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
    /// Elements 0..<8 at `p`.
    static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float>
    /// Element `i` of the row at `p`.
    static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float
}

enum F32Rows: KVRows {
    static var bytes: Int { 4 }
    @inline(__always) static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float> { p.loadUnaligned(as: SIMD8<Float>.self) }
    @inline(__always) static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        p.loadUnaligned(fromByteOffset: 4 * i, as: Float.self)
    }
}

enum F16Rows: KVRows {
    static var bytes: Int { 2 }
    @inline(__always) static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float> { ckernels_f16x8_to_f32(p) }
    @inline(__always) static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(p.loadUnaligned(fromByteOffset: 2 * i, as: Float16.self))
    }
}

enum BF16Rows: KVRows {
    static var bytes: Int { 2 }
    @inline(__always) static func load8(_ p: UnsafeRawPointer) -> SIMD8<Float> { ckernels_bf16x8_to_f32(p) }
    @inline(__always) static func scalar(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(bitPattern: UInt32(p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) << 16)
    }
}
