/// A 2-D weight [rows, cols] in the checkpoint's own dtype, used in place from the memory map.
/// `rows` is the output dimension (PyTorch's Linear layout), `cols` the input dimension.
package struct WeightMatrix: @unchecked Sendable, BitwiseCopyable {
    package var data: UnsafeRawPointer
    package var dtype: DType
    package var rows: Int
    package var cols: Int

    package init(data: UnsafeRawPointer, dtype: DType, rows: Int, cols: Int) {
        self.data = data
        self.dtype = dtype
        self.rows = rows
        self.cols = cols
    }

    package init(_ view: TensorView) {
        data = view.data
        dtype = view.dtype
        rows = view.shape[0]
        cols = view.shape.count > 1 ? view.shape[1] : 1
    }

    package var elementCount: Int { rows * cols }
    package var byteCount: Int { rows * cols * dtype.byteSize }

    /// Writes row `r` as Float into `out` (embedding lookup).
    package func copyRow(_ r: Int, to out: UnsafeMutablePointer<Float>) {
        let base = data.advanced(by: r * cols * dtype.byteSize)
        switch dtype {
        case .f32: out.update(from: base.assumingMemoryBound(to: Float.self), count: cols)
        case .bf16:
            for c in 0..<cols { out[c] = Float(bitPattern: UInt32(base.loadUnaligned(fromByteOffset: 2 * c, as: UInt16.self)) << 16) }
        case .f16:
            for c in 0..<cols { out[c] = Float(base.loadUnaligned(fromByteOffset: 2 * c, as: Float16.self)) }
        default: fatalError("weight dtype \(dtype) is rejected at load")
        }
    }
}

/// A 1-D weight (norm scale, bias) is tiny: widened to Float once at load.
package func floatVector(_ view: TensorView) -> [Float] { view.floats() }
