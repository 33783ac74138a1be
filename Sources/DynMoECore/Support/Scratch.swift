/// A growable scratch array of trivial elements, reused across forward calls so the hot path
/// does not allocate once it has seen its largest batch.
///
/// The memory is aligned to a cache line: the kernels' 64-byte loads of activation rows kept
/// here would otherwise straddle two lines each (malloc returns large blocks 16 bytes past a
/// line), which held the prefill tile at ~118 GFLOP/s on 1024 x 1024 products of 128 tokens
/// against ~155 with aligned rows (`bench/gemm_ab.sh`, bench/NOTES.md).
package final class Scratch<Element: BitwiseCopyable> {
    private(set) var pointer: UnsafeMutablePointer<Element>
    private(set) var capacity: Int

    /// Bytes of alignment of every buffer: one cache line.
    private static var alignment: Int { 64 }

    init() {
        capacity = 0
        pointer = Scratch.allocate(1)
    }

    deinit { UnsafeMutableRawPointer(pointer).deallocate() }

    private static func allocate(_ count: Int) -> UnsafeMutablePointer<Element> {
        UnsafeMutableRawPointer.allocate(byteCount: count * MemoryLayout<Element>.stride, alignment: alignment)
            .bindMemory(to: Element.self, capacity: count)
    }

    /// At least `count` elements; contents are unspecified after growing.
    @inline(__always)
    func reserve(_ count: Int) -> UnsafeMutablePointer<Element> {
        if count > capacity {
            UnsafeMutableRawPointer(pointer).deallocate()
            capacity = max(count, capacity + capacity / 2)
            pointer = Scratch.allocate(capacity)
        }
        return pointer
    }
}
