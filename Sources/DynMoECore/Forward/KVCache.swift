/// Keys and values of every layer for `sequences` sequences of up to `capacity` positions,
/// f32, laid out [layer][sequence][position][kvDim] so one sequence's keys for a layer are
/// contiguous for the attention loop.
package final class KVCache: @unchecked Sendable {
    package let layers: Int
    package let sequences: Int
    package let capacity: Int
    package let kvDim: Int
    private let keys: UnsafeMutablePointer<Float>
    private let values: UnsafeMutablePointer<Float>

    package static func byteCount(layers: Int, sequences: Int, capacity: Int, kvDim: Int) -> Int {
        2 * layers * sequences * capacity * kvDim * MemoryLayout<Float>.size
    }

    package init(layers: Int, sequences: Int, capacity: Int, kvDim: Int) throws(DynMoEError) {
        self.layers = layers
        self.sequences = sequences
        self.capacity = capacity
        self.kvDim = kvDim
        let count = layers * sequences * capacity * kvDim
        guard let k = Allocation.floats(count), let v = Allocation.floats(count) else {
            throw .init(.outOfMemory, "cannot allocate a KV cache of \(KVCache.byteCount(layers: layers, sequences: sequences, capacity: capacity, kvDim: kvDim)) bytes")
        }
        keys = k
        values = v
    }

    deinit {
        Allocation.release(keys)
        Allocation.release(values)
    }

    @inline(__always)
    package func keys(layer: Int, sequence: Int) -> UnsafeMutablePointer<Float> {
        keys + ((layer * sequences + sequence) * capacity) * kvDim
    }

    @inline(__always)
    package func values(layer: Int, sequence: Int) -> UnsafeMutablePointer<Float> {
        values + ((layer * sequences + sequence) * capacity) * kvDim
    }
}

/// 64-byte aligned, zeroed allocation that reports failure instead of trapping, for sizes that
/// come from callers. Release with `Allocation.release`.
package enum Allocation {
    package static func floats(_ count: Int) -> UnsafeMutablePointer<Float>? {
        guard count >= 0, count < Int.max / 8 else { return nil }
        let bytes = max(1, count) * MemoryLayout<Float>.size
        var raw: UnsafeMutableRawPointer? = nil
        guard posix_memalign(&raw, 64, bytes) == 0, let raw else { return nil }
        memset(raw, 0, bytes)
        return raw.bindMemory(to: Float.self, capacity: max(1, count))
    }

    package static func release(_ p: UnsafeMutablePointer<Float>?) {
        free(p)
    }
}

#if canImport(Glibc)
import Glibc
#endif
