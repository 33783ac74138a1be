import Synchronization

/// Options for a decoding session.
package struct SessionOptions: Sendable {
    /// Sequences decoded in lockstep (the batch size B of every call).
    package var sequences: Int = 1
    /// Positions the KV cache holds; 0 = the model's max_position_embeddings, capped by the budget.
    package var capacity: Int = 0
    /// Upper bound on the KV cache's bytes; 0 = no bound beyond `capacity`.
    package var memoryBudget: Int = 0
    /// Routing used by calls that do not pass their own.
    package var routing: RoutingPlan = .native

    package init() {}
}

/// A decoding context over a shared model: its own KV cache, position, default routing,
/// statistics and scratch memory. One thread at a time may use a session (concurrent use is
/// refused with `.busy`); different sessions on one model may run on different threads at once.
package final class Session: @unchecked Sendable {
    package let model: Model
    package let cache: KVCache
    package let statistics: RoutingStatistics
    package private(set) var position = 0
    package private(set) var defaultRouting: RoutingPlan
    private var resolvedDefault: [ResolvedRouting?]
    private let workspace = Workspace()
    private let inUse = Atomic<Bool>(false)

    package init(model: Model, options: SessionOptions = SessionOptions()) throws(DynMoEError) {
        let cfg = model.config
        guard options.sequences >= 1, options.sequences <= 4096 else {
            throw .invalidArgument("session: sequences must be in [1, 4096], got \(options.sequences)")
        }
        guard options.capacity >= 0, options.memoryBudget >= 0 else {
            throw .invalidArgument("session: capacity and memory budget must not be negative")
        }
        var capacity = options.capacity > 0 ? options.capacity : cfg.maxPositions
        let perPosition = KVCache.byteCount(layers: cfg.numLayers, sequences: options.sequences, capacity: 1, kvDim: cfg.kvDim)
        if options.memoryBudget > 0 {
            let fits = options.memoryBudget / perPosition
            if options.capacity > 0 && fits < options.capacity {
                throw .invalidArgument("session: \(options.capacity) positions need \(perPosition * options.capacity) bytes of KV cache, over the budget of \(options.memoryBudget)")
            }
            guard fits >= 1 else {
                throw .invalidArgument("session: memory budget \(options.memoryBudget) bytes is below one position (\(perPosition) bytes)")
            }
            capacity = min(capacity, fits)
        }
        let (total, overflow) = perPosition.multipliedReportingOverflow(by: capacity)
        guard !overflow, total <= Session.maxCacheBytes else {
            throw .init(.outOfMemory, "session: a KV cache of \(capacity) positions x \(options.sequences) sequences is too large; set a smaller capacity or a memory budget")
        }
        self.model = model
        cache = try KVCache(layers: cfg.numLayers, sequences: options.sequences, capacity: capacity, kvDim: cfg.kvDim)
        defaultRouting = options.routing
        resolvedDefault = try options.routing.resolve(for: cfg)
        statistics = RoutingStatistics(layers: model.layers.map { $0.feedForward.moe?.numExperts ?? 0 })
    }

    /// A KV cache larger than this is refused rather than attempted.
    package static let maxCacheBytes = 1 << 40

    package var capacity: Int { cache.capacity }
    package var sequences: Int { cache.sequences }

    package func setDefaultRouting(_ plan: RoutingPlan) throws(DynMoEError) {
        try exclusive { () throws(DynMoEError) in
            resolvedDefault = try plan.resolve(for: model.config)
            defaultRouting = plan
        }
    }

    /// Evaluates `length` tokens of each of the `sequences` sequences at the current position and
    /// advances it. `tokens` is [sequences, length] row-major.
    package func evaluate(tokens: UnsafePointer<Int32>, length: Int, routing: RoutingPlan? = nil, recordTrace: Bool = false,
                          observer: ((RoutingObservation) -> Void)? = nil,
                          logits: UnsafeMutablePointer<Float>?, logitRows: LogitRows) throws(DynMoEError) -> ForwardResult {
        try exclusive { () throws(DynMoEError) in
            let resolved = try routing.map { (plan) throws(DynMoEError) in try plan.resolve(for: model.config) } ?? resolvedDefault
            var request = ForwardRequest(tokens: tokens, batch: cache.sequences, length: length, routing: resolved)
            request.startPosition = position
            request.recordTrace = recordTrace
            request.observer = observer
            request.logits = logits
            request.logitRows = logitRows
            let result = try ForwardPass(model: model, cache: cache, workspace: workspace).run(request)
            position += length
            statistics.add(result.counters)
            model.statistics.add(result.counters)
            return result
        }
    }

    /// Forgets positions from `newPosition` on; the next call continues from there.
    package func rewind(to newPosition: Int) throws(DynMoEError) {
        try exclusive { () throws(DynMoEError) in
            guard newPosition >= 0, newPosition <= position else {
                throw .invalidArgument("rewind: position \(newPosition) is outside [0, \(position)]")
            }
            position = newPosition
        }
    }

    private func exclusive<R>(_ body: () throws(DynMoEError) -> R) throws(DynMoEError) -> R {
        guard inUse.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else {
            throw .init(.busy, "session is in use by another thread; use one session per thread")
        }
        defer { inUse.store(false, ordering: .releasing) }
        return try body()
    }
}

extension Model {
    /// One-shot forward over [batch, length] tokens from position 0 (no state kept).
    package func forward(tokens: UnsafePointer<Int32>, batch: Int, length: Int, routing: RoutingPlan = .native,
                         recordTrace: Bool = false, observer: ((RoutingObservation) -> Void)? = nil,
                         logits: UnsafeMutablePointer<Float>?) throws(DynMoEError) -> ForwardResult {
        guard batch >= 1, length >= 1 else { throw .invalidArgument("forward: batch (\(batch)) and length (\(length)) must be at least 1") }
        guard length <= config.maxPositions else {
            throw .invalidArgument("forward: length \(length) exceeds max_position_embeddings (\(config.maxPositions))")
        }
        var options = SessionOptions()
        options.sequences = batch
        options.capacity = length
        options.routing = routing
        let session = try Session(model: self, options: options)
        return try session.evaluate(tokens: tokens, length: length, recordTrace: recordTrace, observer: observer,
                                    logits: logits, logitRows: .all)
    }
}
