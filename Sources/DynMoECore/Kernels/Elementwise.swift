#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Small per-vector kernels of the transformer block. They are a few percent of the run time,
/// so they stay plain loops the compiler can vectorise.
package enum Elementwise {
    /// out = x / sqrt(mean(x^2) + eps) * weight (LLaMA RMSNorm; statistics in f32).
    @inline(__always)
    package static func rmsNorm(_ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, _ n: Int, eps: Float,
                                _ out: UnsafeMutablePointer<Float>) {
        var ss: Float = 0
        for i in 0..<n { ss += x[i] * x[i] }
        let scale = 1 / (ss / Float(n) + eps).squareRoot()
        for i in 0..<n { out[i] = weight[i] * (x[i] * scale) }
    }

    @inline(__always)
    package static func silu(_ x: Float) -> Float { x / (1 + expf(-x)) }

    @inline(__always)
    package static func sigmoid(_ x: Float) -> Float { 1 / (1 + expf(-x)) }

    /// In-place numerically stable softmax.
    package static func softmax(_ x: UnsafeMutablePointer<Float>, _ n: Int) {
        var m = -Float.infinity
        for i in 0..<n { m = max(m, x[i]) }
        var sum: Float = 0
        for i in 0..<n {
            let e = expf(x[i] - m)
            x[i] = e
            sum += e
        }
        let inv = 1 / sum
        for i in 0..<n { x[i] *= inv }
    }

    /// gate[i] = silu(gate[i]) * up[i]
    @inline(__always)
    package static func swiglu(_ gate: UnsafeMutablePointer<Float>, _ up: UnsafePointer<Float>, _ n: Int) {
        for i in 0..<n { gate[i] = silu(gate[i]) * up[i] }
    }

    /// Dot product of two f32 vectors (attention scores): SIMD with two accumulators, since the
    /// compiler may not reorder a float reduction on its own.
    @inline(__always)
    package static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var s0 = SIMD8<Float>(), s1 = SIMD8<Float>()
        var i = 0
        let ra = UnsafeRawPointer(a), rb = UnsafeRawPointer(b)
        while i + 16 <= n {
            s0.addProduct(ra.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self),
                          rb.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self))
            s1.addProduct(ra.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self),
                          rb.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self))
            i += 16
        }
        var s = (s0 + s1).sum()
        while i < n { s += a[i] * b[i]; i += 1 }
        return s
    }

    /// y += alpha * x
    @inline(__always)
    package static func axpy(_ alpha: Float, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n { y[i] += alpha * x[i] }
    }

    package static func add(_ x: UnsafeMutablePointer<Float>, _ y: UnsafePointer<Float>, _ n: Int) {
        for i in 0..<n { x[i] += y[i] }
    }
}

/// Rotary position embedding in the Hugging Face "rotate half" convention: element i of a head
/// pairs with element i + d/2, rotated by position * theta^(-2i/d).
package struct RotaryEmbedding: Sendable {
    package let headDim: Int
    package let inverseFrequencies: [Float]

    package init(headDim: Int, theta: Double) {
        self.headDim = headDim
        // Computed the way the reference does, in f32, so angles agree to the last bit in practice.
        inverseFrequencies = (0..<headDim / 2).map { i in
            Float(1.0 / Double(Float(pow(theta, Double(2 * i) / Double(headDim)))))
        }
    }

    /// Fills cos/sin tables [headDim / 2] for `position`.
    package func table(position: Int, cos cosOut: UnsafeMutablePointer<Float>, sin sinOut: UnsafeMutablePointer<Float>) {
        for i in 0..<headDim / 2 {
            let angle = Float(position) * inverseFrequencies[i]
            cosOut[i] = Float(Glibc.cos(Double(angle)))
            sinOut[i] = Float(Glibc.sin(Double(angle)))
        }
    }

    /// Rotates `heads` consecutive head vectors in place.
    @inline(__always)
    package func apply(_ v: UnsafeMutablePointer<Float>, heads: Int, cos: UnsafePointer<Float>, sin: UnsafePointer<Float>) {
        let half = headDim / 2
        for h in 0..<heads {
            let p = v + h * headDim
            for i in 0..<half {
                let a = p[i], b = p[i + half]
                p[i] = a * cos[i] - b * sin[i]
                p[i + half] = b * cos[i] + a * sin[i]
            }
        }
    }
}
