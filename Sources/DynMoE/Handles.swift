import DynMoECore

/// Every live handle given to C, with its object. Looking handles up here turns a freed, foreign
/// or mistyped pointer into an error instead of a crash. A handle is not the object's address
/// but a number the registry never hands out twice (spaced like 16-byte-aligned pointers), so
/// a freed handle stays invalid even after another object is created at the same address: a
/// double free, or a stale handle used after its object is gone, is always an error, never
/// another object's free or lookup.
final class HandleRegistry: Sendable {
    static let shared = HandleRegistry()
    private struct Table {
        var live: [UInt: AnyObject] = [:]
        var lastNumber: UInt = 0
    }
    private let table = Locked(Table())

    /// Handles start above the first 64 KiB, which no C caller confuses with a small integer.
    private static let firstHandle: UInt = 0x10000

    func register<T: AnyObject>(_ object: T) -> OpaquePointer {
        let key = table.withLock { t in
            t.lastNumber += 1
            let key = HandleRegistry.firstHandle + t.lastNumber << 4
            t.live[key] = object
            return key
        }
        return OpaquePointer(bitPattern: key)!
    }

    func lookup<T: AnyObject>(_ handle: OpaquePointer?, as type: T.Type, _ name: StaticString) throws(DynMoEError) -> T {
        guard let handle else { throw .invalidArgument("\(name) is NULL") }
        let key = UInt(bitPattern: UnsafeRawPointer(handle))
        guard let object = table.withLock({ $0.live[key] }) as? T else {
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

    /// Forgets a handle of type T (anything else, or NULL, is left alone). The object is released
    /// outside the lock: a model's last release joins its worker threads.
    func release<T: AnyObject>(_ handle: OpaquePointer?, as type: T.Type) {
        guard let handle else { return }
        let key = UInt(bitPattern: UnsafeRawPointer(handle))
        _ = table.withLock { t -> AnyObject? in
            guard t.live[key] is T else { return nil }
            return t.live.removeValue(forKey: key)
        }
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
