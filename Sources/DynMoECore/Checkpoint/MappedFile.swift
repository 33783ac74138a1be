#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A read-only memory map of a whole file. Weights are used straight from the map, so a bf16
/// checkpoint costs its file size in (shared, evictable) page cache and nothing more.
package final class MappedFile: @unchecked Sendable {
    package let path: String
    package let size: Int
    package let base: UnsafeRawPointer?

    package init(path: String) throws(DynMoEError) {
        self.path = path
        // O_NONBLOCK: opening a FIFO planted in place of a checkpoint file must not block; the
        // regular-file check below then refuses it.
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { throw .io("cannot open \(path): \(MappedFile.errnoText())") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .io("cannot stat \(path): \(MappedFile.errnoText())") }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw .io("\(path) is not a regular file") }
        size = Int(st.st_size)
        if size == 0 {
            base = nil
            return
        }
        let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let p, p != MAP_FAILED else { throw .io("cannot map \(path): \(MappedFile.errnoText())") }
        base = UnsafeRawPointer(p)
    }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), size) }
    }

    package var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: size) }

    /// Pins the mapping in memory (reading it in), so the OS cannot evict weights that decode
    /// will need again; proactive reclaim of "cold" experts otherwise costs refaults per token.
    package func lock() throws(DynMoEError) {
        guard let base else { return }
        guard mlock(base, size) == 0 else {
            throw .init(.outOfMemory, "cannot lock \(path) (\(size) bytes) in memory: \(MappedFile.errnoText()); raise the locked-memory limit (ulimit -l) or load without lock_memory")
        }
    }

    /// Asks the kernel to read the mapping ahead (used when the caller wants weights resident).
    package func adviseWillNeed() {
        if let base { madvise(UnsafeMutableRawPointer(mutating: base), size, MADV_WILLNEED) }
    }

    static func errnoText() -> String {
        guard let s = strerror(errno) else { return "errno \(errno)" }
        return String(cString: s)
    }

    /// Reads a small text file (config.json, index.json) completely, refusing one larger than
    /// `limit` bytes before copying anything: parsing JSON takes many times the file's size.
    package static func readText(_ path: String, limit: Int) throws(DynMoEError) -> [UInt8] {
        let file = try MappedFile(path: path)
        guard file.size <= limit else {
            throw .format("\(path) is \(file.size) bytes, more than the \(limit)-byte limit for this file")
        }
        return Array(file.bytes)
    }

    /// Whether something is at `path`. Only "nothing there" answers false; any other failure (a
    /// symbolic-link loop, no permission) is reported as itself rather than as a missing file.
    package static func exists(_ path: String) throws(DynMoEError) -> Bool {
        var st = stat()
        if stat(path, &st) == 0 { return true }
        if errno == ENOENT { return false }
        throw .io("cannot stat \(path): \(errnoText())")
    }

    package static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }
}
