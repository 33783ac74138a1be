import Testing
@testable import DynMoECore

/// Every matrix-product path (decode stream, 4x2 and 2x4 tiles, scalar tails) against a plain
/// double-precision reference, for each weight dtype.
@Suite("Kernels")
struct KernelTests {
    static let shapes: [(m: Int, rows: Int, k: Int)] = [
        (1, 5, 16), (1, 9, 47), (2, 4, 33), (3, 7, 1031), (4, 6, 64), (5, 9, 100),
        (16, 10, 1024), (17, 13, 2055), (40, 3, 24),
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
                worst = max(worst, abs(Double(y[i]) - reference[i]) / (Double(k) * 0x1p-24 * magnitude[i]))
            }
            #expect(worst <= 1, "m \(m) rows \(rows) k \(k) \(dtype): error is \(worst) x the rounding bound")
        }
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
}
