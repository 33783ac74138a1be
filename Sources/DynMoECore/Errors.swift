/// What went wrong, as a category the C ABI maps one-to-one onto its status codes.
package enum ErrorKind: Int32, Sendable {
    case invalidArgument = 1
    case io = 2
    case format = 3
    case unsupported = 4
    case bufferTooSmall = 5
    case outOfMemory = 6
    case contextFull = 7
    case busy = 8
    case notAvailable = 9
    case internalError = 10
}

/// The single error type of the engine: a kind plus a message that names the culprit
/// (file, tensor, field or argument), so callers never have to guess.
package struct DynMoEError: Error, CustomStringConvertible, Sendable {
    package var kind: ErrorKind
    package var message: String

    package init(_ kind: ErrorKind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    package var description: String { message }

    package static func invalidArgument(_ message: String) -> DynMoEError { .init(.invalidArgument, message) }
    package static func format(_ message: String) -> DynMoEError { .init(.format, message) }
    package static func unsupported(_ message: String) -> DynMoEError { .init(.unsupported, message) }
    package static func io(_ message: String) -> DynMoEError { .init(.io, message) }
}
