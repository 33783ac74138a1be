import CKernels
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
        // Eight partial sums of squares: one running sum is a chain of dependent adds, and the
        // norms are serial work between a decode step's parallel regions (swiftc -Ounchecked,
        // one Zen 3 core: 1.04 -> 0.24 us for 1024 values, 0.083 -> 0.044 for a 64-wide head).
        var partial = SIMD8<Float>()
        var i = 0
        while i + 8 <= n {
            let v = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
            partial.addProduct(v, v)
            i += 8
        }
        var ss = partial.sum()
        while i < n { ss += x[i] * x[i]; i += 1 }
        let scale = 1 / (ss / Float(n) + eps).squareRoot()
        for i in 0..<n { out[i] = weight[i] * (x[i] * scale) }
    }

    /// x * sigmoid(x) for 8 lanes, through the vector exp.
    @inline(__always)
    static func silu(_ x: SIMD8<Float>) -> SIMD8<Float> { x / (1 + exp(-x)) }

    @inline(__always)
    package static func sigmoid(_ x: Float) -> Float { 1 / (1 + expf(-x)) }

    /// In-place numerically stable softmax; returns the entropy of the result in nats.
    ///
    /// The entropy -sum p log p comes from the logits: with z = x - max, e = exp(z) and S = sum e,
    /// log p = z - log S, so it is log S - sum(e z) / S — one log per call instead of one per
    /// probability (64 logs were a third of a decode step's expert selection and statistics).
    package static func softmax(_ x: UnsafeMutablePointer<Float>, _ n: Int) -> Double {
        var m = -Float.infinity
        for i in 0..<n { m = max(m, x[i]) }
        var sum: Float = 0
        var weightedLogits: Double = 0
        for i in 0..<n {
            let z = x[i] - m
            let e = expf(z)
            x[i] = e
            sum += e
            if e > 0 { weightedLogits += Double(e) * Double(z) }
        }
        let inv = 1 / sum
        for i in 0..<n { x[i] *= inv }
        let entropy = log(Double(sum)) - weightedLogits / Double(sum)
        return entropy.isFinite ? max(0, entropy) : 0
    }

    /// gate[i] = silu(gate[i]) * up[i]
    package static func swiglu(_ gate: UnsafeMutablePointer<Float>, _ up: UnsafePointer<Float>, _ n: Int) {
        var i = 0
        while i + 8 <= n {
            let g = UnsafeRawPointer(gate + i).loadUnaligned(as: SIMD8<Float>.self)
            let u = UnsafeRawPointer(up + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(gate + i).storeBytes(of: silu(g) * u, as: SIMD8<Float>.self)
            i += 8
        }
        if i < n {
            var g = SIMD8<Float>(), u = SIMD8<Float>()
            for j in i..<n { g[j - i] = gate[j]; u[j - i] = up[j] }
            let r = silu(g) * u
            for j in i..<n { gate[j] = r[j - i] }
        }
    }

    /// e^x for 8 lanes, within 2 ulp of expf over the whole float range (Cephes' expf: reduce
    /// by n ln 2 in two parts, degree-6 polynomial, scale by 2^n through the exponent bits).
    /// Attention and SwiGLU evaluate e^x millions of times per prefill; glibc's scalar expf was
    /// their largest cost. The router keeps expf, so its probabilities, and with them every
    /// expert selection, do not depend on this approximation.
    @inline(__always)
    package static func exp(_ x: SIMD8<Float>) -> SIMD8<Float> {
        let upper = SIMD8<Float>(repeating: 88.37626), lower = SIMD8<Float>(repeating: -87.33654)
        // (`clamped` would call the generic pointwiseMin/Max out of line: 1.6 % of prefill.)
        var c = x
        c.replace(with: lower, where: x .< lower)
        c.replace(with: upper, where: x .> upper)
        // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits, which
        // gives n both as a float and (below) as the exponent bits, without a float-to-int
        // conversion (generic and slow for SIMD in Swift).
        let magic = SIMD8<Float>(repeating: 0x1.8p23)
        let shifted = c * 1.442695041 + magic
        let n = shifted - magic
        var r = c
        r.addProduct(n, SIMD8(repeating: -0.693359375))
        r.addProduct(n, SIMD8(repeating: 2.12194440e-4))
        var p = SIMD8<Float>(repeating: 1.9875691500e-4)
        p = p * r + 1.3981999507e-3
        p = p * r + 8.3334519073e-3
        p = p * r + 4.1665795894e-2
        p = p * r + 1.6666665459e-1
        p = p * r + 5.0000001201e-1
        let y = p * (r * r) + r + 1
        let exponent = unsafeBitCast(shifted, to: SIMD8<Int32>.self) &- 0x4B40_0000 &+ 127
        let scale = unsafeBitCast(exponent &<< 23, to: SIMD8<Float>.self)
        var result = y * scale
        // Beyond the clamps the true value is 0 (including -inf) or overflows to +inf.
        result.replace(with: 0, where: x .< lower)
        result.replace(with: Float.infinity, where: x .> upper)
        result.replace(with: x, where: x .!= x)  // NaN stays NaN
        return result
    }

    /// s[i] = e^(s[i] - max) over `n` scores; returns their sum (attention's softmax numerator).
    /// The tail under 8 goes through the same vector exp, padded with e^-inf = 0. One call site
    /// keeps `exp` inlined (with two the compiler left it out of line, behind a call that spilled
    /// every vector), and the running maximum is one vmaxps (Swift's SIMD select compiled to eight
    /// dependent scalar blends): 236 -> 165-188 ns for 150 scores (kernel micro-benchmark).
    package static func expShiftedSum(_ s: UnsafeMutablePointer<Float>, _ n: Int) -> Float {
        var i = 0
        var maxVector = SIMD8<Float>(repeating: -.infinity)
        while i + 8 <= n {
            maxVector = ckernels_max_f32x8(UnsafeRawPointer(s + i).loadUnaligned(as: SIMD8<Float>.self), maxVector)
            i += 8
        }
        var m = maxVector.max()
        while i < n { m = max(m, s[i]); i += 1 }
        var sumVector = SIMD8<Float>()
        i = 0
        while i < n {
            let full = i + 8 <= n
            var v = SIMD8<Float>(repeating: -.infinity)
            if full {
                v = UnsafeRawPointer(s + i).loadUnaligned(as: SIMD8<Float>.self)
            } else {
                for j in i..<n { v[j - i] = s[j] }
            }
            let e = exp(v - m)
            if full {
                UnsafeMutableRawPointer(s + i).storeBytes(of: e, as: SIMD8<Float>.self)
            } else {
                for j in i..<n { s[j] = e[j - i] }
            }
            sumVector += e
            i += 8
        }
        return sumVector.sum()
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
