import CKernels

/// Keys and values of every layer for `sequences` sequences of up to `capacity` positions, laid
/// out [layer][sequence][KV head][position][headDim]: the attention loop for one KV head reads its
/// keys and values as two sequential streams (with [position][kvDim] rows it read 256 of every
/// 1024 bytes, latency-bound: a quarter of a decode step at 1k positions).
///
/// Elements are f32 (exact), or f16 / bf16 (half the memory and half the bytes attention reads;
/// each key and value rounded once, to nearest even, when it is stored).
package final class KVCache: @unchecked Sendable {
    package let layers: Int
    package let sequences: Int
    package let capacity: Int
    package let kvHeads: Int
    package let headDim: Int
    /// How keys and values are stored: `.f32`, `.f16` or `.bf16`.
    package let element: DType
    private let keys: UnsafeMutableRawPointer
    private let values: UnsafeMutableRawPointer

    /// Element types a KV cache can store.
    package static let elementTypes: [DType] = [.f32, .f16, .bf16]

    /// Throws unless `element` is one of `elementTypes`.
    package static func check(element: DType) throws(DynMoEError) {
        guard elementTypes.contains(element) else {
            throw .invalidArgument("KV cache elements must be F32, F16 or BF16, got \(element.rawValue)")
        }
    }

    /// Bytes of keys and values, or nil if the product overflows.
    package static func byteCount(layers: Int, sequences: Int, capacity: Int, kvDim: Int, element: DType = .f32) -> Int? {
        var total = 2 * element.byteSize
        for factor in [layers, sequences, capacity, kvDim] {
            let (product, overflow) = total.multipliedReportingOverflow(by: factor)
            if overflow { return nil }
            total = product
        }
        return total
    }

    package init(layers: Int, sequences: Int, capacity: Int, kvHeads: Int, headDim: Int,
                 element: DType = .f32) throws(DynMoEError) {
        try KVCache.check(element: element)
        self.layers = layers
        self.sequences = sequences
        self.capacity = capacity
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.element = element
        let (kvDim, overflow) = kvHeads.multipliedReportingOverflow(by: headDim)
        guard !overflow else { throw .init(.outOfMemory, "a KV cache of \(kvHeads) heads x \(headDim) is too large") }
        guard let bytes = KVCache.byteCount(layers: layers, sequences: sequences, capacity: capacity, kvDim: kvDim,
                                            element: element) else {
            throw .init(.outOfMemory, "a KV cache of \(layers) layers x \(sequences) sequences x \(capacity) positions x \(kvDim) is too large")
        }
        let k = Allocation.bytes(bytes / 2), v = Allocation.bytes(bytes / 2)
        guard let k, let v else {
            Allocation.release(k)
            Allocation.release(v)
            throw .init(.outOfMemory, "cannot allocate a KV cache of \(bytes) bytes")
        }
        keys = k
        values = v
    }

    deinit {
        Allocation.release(keys)
        Allocation.release(values)
    }

    /// Elements of one KV head's rows: [capacity][headDim], each `element.byteSize` bytes.
    @inline(__always)
    package func keys(layer: Int, sequence: Int, head: Int) -> UnsafeMutableRawPointer {
        keys + (((layer * sequences + sequence) * kvHeads + head) * capacity) * headDim * element.byteSize
    }

    /// Values of one KV head: [capacity][headDim].
    @inline(__always)
    package func values(layer: Int, sequence: Int, head: Int) -> UnsafeMutableRawPointer {
        values + (((layer * sequences + sequence) * kvHeads + head) * capacity) * headDim * element.byteSize
    }

    /// Stores `headDim` floats as the row of `position` in a head's keys or values.
    @inline(__always)
    package func store(_ row: UnsafePointer<Float>, into head: UnsafeMutableRawPointer, position: Int) {
        let dst = head + position * headDim * element.byteSize
        switch element {
        case .f16:
            var c = 0
            while c + 8 <= headDim {
                ckernels_f32x8_to_f16(UnsafeRawPointer(row + c).loadUnaligned(as: SIMD8<Float>.self), dst + 2 * c)
                c += 8
            }
            while c < headDim { dst.storeBytes(of: Float16(row[c]), toByteOffset: 2 * c, as: Float16.self); c += 1 }
        case .bf16:
            for c in 0..<headDim { dst.storeBytes(of: BFloat16Rounding.bits(row[c]), toByteOffset: 2 * c, as: UInt16.self) }
        default:
            dst.copyMemory(from: row, byteCount: headDim * MemoryLayout<Float>.size)
        }
    }
}

/// f32 to bf16 bits, rounding to nearest even (what torch's `.to(torch.bfloat16)` does); NaN
/// stays NaN.
package enum BFloat16Rounding {
    @inline(__always)
    package static func bits(_ x: Float) -> UInt16 {
        let b = x.bitPattern
        if x.isNaN { return UInt16(truncatingIfNeeded: b >> 16) | 0x0040 }
        let rounded = b &+ 0x7FFF &+ ((b >> 16) & 1)
        return UInt16(truncatingIfNeeded: rounded >> 16)
    }
}

/// Zeroed allocation that reports failure instead of trapping, for sizes that come from callers.
/// calloc hands large requests zero pages from the OS, so a big cache costs memory only as it
/// fills. Release with `Allocation.release`.
package enum Allocation {
    package static func bytes(_ count: Int) -> UnsafeMutableRawPointer? {
        guard count >= 0, count < Int.max / 2 else { return nil }
        return calloc(max(1, count), 1)
    }

    package static func release(_ p: UnsafeMutableRawPointer?) {
        free(p)
    }

    /// Physical memory of the machine in bytes (0 if unknown).
    package static var physicalMemory: Int {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        return pages > 0 && size > 0 ? pages * size : 0
    }
}

#if canImport(Glibc)
import Glibc
#endif
