import CKernels

/// The two inner loops of attention for one KV head and the query heads that share it (grouped-
/// query attention): scores against every cached key, then the softmax-weighted sum of the
/// cached values. Each key and value row is read once for the whole group.
package enum Attention {
    typealias V = SIMD8<Float>

    /// out[g * outStride + j] = scale * q_g . k_j for the `heads` query heads q_g (consecutive,
    /// `headDim` apart) and `count` keys k_j (`stride` apart).
    /// Eight keys at a time per head through CKernels (the group's other heads find those keys
    /// in L1); what it leaves (a tail under 8 keys, or widths not a multiple of 64) key by key.
    package static func groupScores(q: UnsafePointer<Float>, heads: Int, headDim: Int, keys: UnsafePointer<Float>,
                                    stride: Int, count: Int, scale: Float, out: UnsafeMutablePointer<Float>, outStride: Int) {
        var done = 0
        var block = 0
        while block < count {
            let n = min(scoreBlock, count - block)
            var blockDone = n
            for g in 0..<heads {
                blockDone = ckernels_attention_scores(q + g * headDim, keys + block * stride, stride, n, headDim, scale,
                                                      out + g * outStride + block)
            }
            done = block + blockDone
            if blockDone < n { break }
            block += n
        }
        for j in done..<count {
            let k = keys + j * stride
            for g in 0..<heads { out[g * outStride + j] = Elementwise.dot(q + g * headDim, k, headDim) * scale }
        }
    }

    /// Keys scored for every head of the group before moving on (64 KiB of 64-wide keys: L1/L2).
    static let scoreBlock = 256

    /// Turns each head's scores into softmax weights and writes
    /// out[g * headDim + c] = sum_j p_g[j] * v_j[c]. Each head accumulates up to 64 columns in
    /// registers over all values, reading them as one sequential stream (the KV cache keeps a
    /// head's values contiguous); the group's other heads find them in L2. An axpy per value row
    /// into `out` chains every row through a store and reload, and 16 columns x 4 heads per
    /// pass read the values with a stride: both measured slower.
    package static func groupWeightedSum(weights: UnsafeMutablePointer<Float>, weightStride: Int, heads: Int, count: Int,
                                         values: UnsafePointer<Float>, stride: Int, headDim: Int,
                                         out: UnsafeMutablePointer<Float>) {
        for g in 0..<heads {
            let w = weights + g * weightStride
            let inverse = 1 / Elementwise.expShiftedSum(w, count)
            weightedSum(w, count, values, stride, headDim, inverse, out + g * headDim)
        }
    }

    @inline(__always) static func load(_ p: UnsafePointer<Float>) -> V { UnsafeRawPointer(p).loadUnaligned(as: V.self) }
    @inline(__always) static func store(_ v: V, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self)
    }

    /// out[c] = inverse * sum_j w[j] * values[j * stride + c]: 64 columns per pass (8
    /// accumulators), then 8, then single columns.
    static func weightedSum(_ w: UnsafePointer<Float>, _ n: Int, _ values: UnsafePointer<Float>, _ stride: Int,
                            _ dim: Int, _ inverse: Float, _ out: UnsafeMutablePointer<Float>) {
        var c = 0
        while c + 64 <= dim {
            var a0 = V(), a1 = V(), a2 = V(), a3 = V(), a4 = V(), a5 = V(), a6 = V(), a7 = V()
            for j in 0..<n {
                let p = V(repeating: w[j]), r = values + j * stride + c
                a0.addProduct(p, load(r)); a1.addProduct(p, load(r + 8))
                a2.addProduct(p, load(r + 16)); a3.addProduct(p, load(r + 24))
                a4.addProduct(p, load(r + 32)); a5.addProduct(p, load(r + 40))
                a6.addProduct(p, load(r + 48)); a7.addProduct(p, load(r + 56))
            }
            store(a0 * inverse, out + c); store(a1 * inverse, out + c + 8)
            store(a2 * inverse, out + c + 16); store(a3 * inverse, out + c + 24)
            store(a4 * inverse, out + c + 32); store(a5 * inverse, out + c + 40)
            store(a6 * inverse, out + c + 48); store(a7 * inverse, out + c + 56)
            c += 64
        }
        while c + 8 <= dim {
            var a = V()
            for j in 0..<n { a.addProduct(V(repeating: w[j]), load(values + j * stride + c)) }
            store(a * inverse, out + c)
            c += 8
        }
        while c < dim {
            var a: Float = 0
            for j in 0..<n { a += w[j] * values[j * stride + c] }
            out[c] = a * inverse
            c += 1
        }
    }
}
