import DynMoECore

/// Every live handle given to C, with its type. Looking handles up here turns a freed, foreign or
/// mistyped pointer into an error instead of a crash, and makes double frees harmless.
final class HandleRegistry: Sendable {
    static let shared = HandleRegistry()
    private let live = Locked<[UInt: ObjectIdentifier]>([:])

    func register<T: AnyObject>(_ object: T) -> OpaquePointer {
        let pointer = Unmanaged.passRetained(object).toOpaque()
        live.withLock { $0[UInt(bitPattern: pointer)] = ObjectIdentifier(T.self) }
        return OpaquePointer(pointer)
    }

    func lookup<T: AnyObject>(_ handle: OpaquePointer?, as type: T.Type, _ name: StaticString) throws(DynMoEError) -> T {
        guard let handle else { throw .invalidArgument("\(name) is NULL") }
        let key = UInt(bitPattern: UnsafeRawPointer(handle))
        // Retain under the lock so a concurrent free cannot release the object in between.
        nonisolated(unsafe) var object: T? = nil
        live.withLock { map in
            if map[key] == ObjectIdentifier(T.self) {
                object = Unmanaged<T>.fromOpaque(UnsafeRawPointer(handle)).takeUnretainedValue()
            }
        }
        guard let object else {
            throw .invalidArgument("\(name) is not a live \(HandleRegistry.cTypeName(T.self)) (freed, or another object)")
        }
        return object
    }

    /// The C name of a handle type, as users know it: `TraceHandle` is `dynmoe_trace`.
    static func cTypeName<T>(_ type: T.Type) -> String {
        var name = String(describing: type)
        if name.hasSuffix("Handle") { name.removeLast("Handle".count) }
        return "dynmoe_" + name.lowercased()
    }

    func release<T: AnyObject>(_ handle: OpaquePointer?, as type: T.Type) {
        guard let handle else { return }
        let key = UInt(bitPattern: UnsafeRawPointer(handle))
        let known = live.withLock { map in
            guard map[key] == ObjectIdentifier(T.self) else { return false }
            map[key] = nil
            return true
        }
        if known { Unmanaged<T>.fromOpaque(UnsafeRawPointer(handle)).release() }
    }
}

/// A routing plan bound to the model it was validated against.
final class RoutingHandle {
    let model: Model
    var plan: RoutingPlan
    init(model: Model, plan: RoutingPlan) { self.model = model; self.plan = plan }
}

/// What one call recorded: its counters and, on request, the trace.
final class TraceHandle {
    let model: Model
    let trace: ForwardTrace?
    let counters: [LayerRoutingCounters?]
    init(model: Model, trace: ForwardTrace?, counters: [LayerRoutingCounters?]) {
        self.model = model; self.trace = trace; self.counters = counters
    }
}

/// An immutable statistics snapshot.
final class StatsHandle {
    let snapshot: StatisticsSnapshot
    init(_ snapshot: StatisticsSnapshot) { self.snapshot = snapshot }
}
