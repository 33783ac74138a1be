#if canImport(Glibc)
import Glibc
#endif
import CDynMoE
import DynMoECore

// Status codes, the thread-local last-error message, and the argument checks every entry point
// shares. Every exported function runs its body through `api`, so a thrown DynMoEError becomes
// a status code plus a message and nothing escapes into C.

/// Runs an API body; on error records the message for `dynmoe_last_error` and returns its code.
@inline(__always)
func api(_ body: () throws(DynMoEError) -> Void) -> dynmoe_status {
    do {
        try body()
        return dynmoe_status(DYNMOE_OK)
    } catch {
        LastError.set(error.message)
        return error.kind.rawValue
    }
}

/// The per-thread message of the last failed call, kept as a malloc'ed C string.
enum LastError {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { free($0) }
        return key
    }()

    static func set(_ message: String) {
        let old = pthread_getspecific(key)
        pthread_setspecific(key, strdup(message))
        free(old)
    }

    static func clear() {
        let old = pthread_getspecific(key)
        pthread_setspecific(key, nil)
        free(old)
    }

    static var current: UnsafePointer<CChar> {
        if let p = pthread_getspecific(key) { return UnsafePointer(p.assumingMemoryBound(to: CChar.self)) }
        return cString("")
    }
}

/// A NUL-terminated string with static storage.
@inline(__always)
func cString(_ s: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
}

/// A required pointer argument, or an invalid-argument error naming it.
@inline(__always)
func required<T>(_ pointer: T?, _ name: StaticString) throws(DynMoEError) -> T {
    guard let pointer else { throw .invalidArgument("\(name) is NULL") }
    return pointer
}

/// Checks a caller's buffer capacity (in elements) against what a call must write. A C
/// `size_t` of 2^63 or more arrives as a negative Int: no buffer is that small, so it passes.
@inline(__always)
func checkCapacity(_ capacity: Int, needed: Int, _ what: String) throws(DynMoEError) {
    guard capacity < 0 || capacity >= needed else {
        throw .init(.bufferTooSmall, "\(what): capacity \(capacity) is smaller than the \(needed) elements needed")
    }
}

extension DynMoEError {
    static func kindName(_ status: dynmoe_status) -> StaticString {
        switch status {
        case 0: return "DYNMOE_OK"
        case 1: return "DYNMOE_ERR_INVALID_ARGUMENT"
        case 2: return "DYNMOE_ERR_IO"
        case 3: return "DYNMOE_ERR_FORMAT"
        case 4: return "DYNMOE_ERR_UNSUPPORTED"
        case 5: return "DYNMOE_ERR_BUFFER_TOO_SMALL"
        case 6: return "DYNMOE_ERR_OUT_OF_MEMORY"
        case 7: return "DYNMOE_ERR_CONTEXT_FULL"
        case 8: return "DYNMOE_ERR_BUSY"
        case 9: return "DYNMOE_ERR_NOT_AVAILABLE"
        case 10: return "DYNMOE_ERR_INTERNAL"
        default: return "DYNMOE_ERR_UNKNOWN"
        }
    }
}

/// Must agree with DYNMOE_VERSION_* in dynmoe.h, dynmoe.pc.in and the Python binding (make test checks).
let libraryVersion: StaticString = "0.5.0"

@c @implementation
public func dynmoe_version() -> UnsafePointer<CChar>! { cString(libraryVersion) }

/// Computed once (a global's initializer runs once, thread-safely) and never freed.
nonisolated(unsafe) private let systemInfoLine: UnsafeMutablePointer<CChar>? =
    strdup("version=\(libraryVersion) \(KernelChoice.summary)")

@c @implementation
public func dynmoe_system_info() -> UnsafePointer<CChar>! {
    UnsafePointer(systemInfoLine) ?? cString("version=unknown")  // strdup failed: out of memory at the first call
}

@c @implementation
public func dynmoe_status_name(_ status: dynmoe_status) -> UnsafePointer<CChar>! { cString(DynMoEError.kindName(status)) }

@c @implementation
public func dynmoe_last_error() -> UnsafePointer<CChar>! { LastError.current }

@c @implementation
public func dynmoe_clear_error() { LastError.clear() }
