/// Keys and values of every layer for `sequences` sequences of up to `capacity` positions,
/// f32, laid out [layer][sequence][KV head][position][headDim]: the attention loop for one KV
/// head reads its keys and values as two sequential streams (with [position][kvDim] rows it
/// read 256 of every 1024 bytes, latency-bound: a quarter of a decode step at 1k positions).
package final class KVCache: @unchecked Sendable {
    package let layers: Int
    package let sequences: Int
    package let capacity: Int
    package let kvHeads: Int
    package let headDim: Int
    private let keys: UnsafeMutablePointer<Float>
    private let values: UnsafeMutablePointer<Float>

    /// Bytes of keys and values, or nil if the product overflows.
    package static func byteCount(layers: Int, sequences: Int, capacity: Int, kvDim: Int) -> Int? {
        var total = 2 * MemoryLayout<Float>.size
        for factor in [layers, sequences, capacity, kvDim] {
            let (product, overflow) = total.multipliedReportingOverflow(by: factor)
            if overflow { return nil }
            total = product
        }
        return total
    }

    package init(layers: Int, sequences: Int, capacity: Int, kvHeads: Int, headDim: Int) throws(DynMoEError) {
        self.layers = layers
        self.sequences = sequences
        self.capacity = capacity
        self.kvHeads = kvHeads
        self.headDim = headDim
        let (kvDim, overflow) = kvHeads.multipliedReportingOverflow(by: headDim)
        guard !overflow else { throw .init(.outOfMemory, "a KV cache of \(kvHeads) heads x \(headDim) is too large") }
        guard let bytes = KVCache.byteCount(layers: layers, sequences: sequences, capacity: capacity, kvDim: kvDim) else {
            throw .init(.outOfMemory, "a KV cache of \(layers) layers x \(sequences) sequences x \(capacity) positions x \(kvDim) is too large")
        }
        let count = bytes / (2 * MemoryLayout<Float>.size)
        guard let k = Allocation.floats(count), let v = Allocation.floats(count) else {
            throw .init(.outOfMemory, "cannot allocate a KV cache of \(bytes) bytes")
        }
        keys = k
        values = v
    }

    deinit {
        Allocation.release(keys)
        Allocation.release(values)
    }

    /// Keys of one KV head: [capacity][headDim].
    @inline(__always)
    package func keys(layer: Int, sequence: Int, head: Int) -> UnsafeMutablePointer<Float> {
        keys + (((layer * sequences + sequence) * kvHeads + head) * capacity) * headDim
    }

    /// Values of one KV head: [capacity][headDim].
    @inline(__always)
    package func values(layer: Int, sequence: Int, head: Int) -> UnsafeMutablePointer<Float> {
        values + (((layer * sequences + sequence) * kvHeads + head) * capacity) * headDim
    }
}

/// Zeroed allocation that reports failure instead of trapping, for sizes that come from callers.
/// calloc hands large requests zero pages from the OS, so a big cache costs memory only as it
/// fills. Release with `Allocation.release`.
package enum Allocation {
    package static func floats(_ count: Int) -> UnsafeMutablePointer<Float>? {
        guard count >= 0, count < Int.max / 8 else { return nil }
        guard let raw = calloc(max(1, count), MemoryLayout<Float>.size) else { return nil }
        return raw.bindMemory(to: Float.self, capacity: max(1, count))
    }

    /// Physical memory of the machine in bytes (0 if unknown).
    package static var physicalMemory: Int {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        return pages > 0 && size > 0 ? pages * size : 0
    }

    package static func release(_ p: UnsafeMutablePointer<Float>?) {
        free(p)
    }
}

#if canImport(Glibc)
import Glibc
#endif
