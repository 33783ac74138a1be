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
    /// How the KV cache stores keys and values: `.f32` (exact), `.f16` or `.bf16` (half the
    /// memory; each key and value rounded once when stored).
    package var kvDType: DType = .f32

    package init() {}
}

/// A decoding context over a shared model: its own KV cache, position, default routing,
/// statistics and scratch memory. One thread at a time may use a session (concurrent use is
/// refused with `.busy`); different sessions on one model may run on different threads at once.
package final class Session: @unchecked Sendable {
    package let model: Model
    package let cache: KVCache
    package let statistics: RoutingStatistics
    /// Where this session's forward time went since creation or `resetStatistics()`.
    private let timingTotals = Locked(ForwardTiming())
    package private(set) var position = 0
    package private(set) var defaultRouting: RoutingPlan
    private var resolvedDefault: [ResolvedRouting?]
    /// The plan last passed to a call and its resolution: a caller that passes the same plan
    /// with every decode step has it checked and resolved once, not per step.
    private var lastCallRouting: (plan: RoutingPlan, resolved: [ResolvedRouting?])? = nil
    private let workspace = Workspace()
    private let inUse = Atomic<Bool>(false)
    /// Logits of the last position of each sequence from the latest call, [sequences, V]; what a
    /// generation that starts without a prompt continues from. Empty when not available.
    private var lastLogits: [Float] = []

    package init(model: Model, options: SessionOptions = SessionOptions()) throws(DynMoEError) {
        let cfg = model.config
        guard options.sequences >= 1, options.sequences <= Session.maxSequences else {
            throw .invalidArgument("session: sequences must be in [1, \(Session.maxSequences)], got \(options.sequences)")
        }
        guard options.capacity >= 0, options.memoryBudget >= 0 else {
            throw .invalidArgument("session: capacity and memory budget must not be negative")
        }
        // Positions past the trained range would run (RoPE extends), but dynmoe_forward refuses
        // them and so does a session: nothing the model was trained for lies there.
        guard options.capacity <= cfg.maxPositions else {
            throw .invalidArgument("session: capacity \(options.capacity) exceeds the model's max_position_embeddings (\(cfg.maxPositions))")
        }
        try KVCache.check(element: options.kvDType)  // before its size enters the budget arithmetic
        var capacity = options.capacity > 0 ? options.capacity : cfg.maxPositions
        guard let perPosition = KVCache.byteCount(layers: cfg.numLayers, sequences: options.sequences, capacity: 1,
                                                  kvDim: cfg.kvDim, element: options.kvDType) else {
            throw .init(.outOfMemory, "session: one position of KV cache for \(options.sequences) sequences is too large")
        }
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
        let limit = Allocation.physicalMemory > 0 ? Allocation.physicalMemory : Session.maxCacheBytes
        guard !overflow, total <= limit else {
            throw .init(.outOfMemory, "session: a KV cache of \(capacity) positions x \(options.sequences) sequences needs \(overflow ? "more than \(Int.max)" : String(total)) bytes, more than this machine's \(limit) bytes of memory; set a smaller capacity or a memory budget")
        }
        self.model = model
        cache = try KVCache(layers: cfg.numLayers, sequences: options.sequences, capacity: capacity,
                            kvHeads: cfg.numKVHeads, headDim: cfg.headDim, element: options.kvDType)
        defaultRouting = options.routing
        resolvedDefault = try options.routing.resolve(for: cfg)
        statistics = RoutingStatistics(layers: model.layers.map { $0.feedForward.moe?.numExperts ?? 0 })
    }

    /// Sequences one call may decode in lockstep (a session's, or dynmoe_forward's batch).
    package static let maxSequences = 4096

    /// A KV cache larger than this is refused rather than attempted.
    package static let maxCacheBytes = 1 << 40

    /// Time spent in this session's forward passes (`evaluate` and `generate`) since creation or
    /// the last `resetStatistics()`; safe to read while another thread evaluates.
    package var timing: ForwardTiming { timingTotals.withLock { $0 } }

    /// Zeroes the session's routing statistics and timing.
    package func resetStatistics() {
        statistics.reset()
        timingTotals.withLock { $0 = ForwardTiming() }
    }

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
                          observer: (any RoutingObserver)? = nil,
                          logits: UnsafeMutablePointer<Float>?, logitRows: LogitRows) throws(DynMoEError) -> ForwardResult {
        try exclusive { () throws(DynMoEError) in
            try evaluateLocked(tokens: tokens, length: length, routing: routing, recordTrace: recordTrace,
                               observer: observer, logits: logits, logitRows: logitRows)
        }
    }

    private func evaluateLocked(tokens: UnsafePointer<Int32>, length: Int, routing: RoutingPlan?, recordTrace: Bool = false,
                                observer: (any RoutingObserver)?,
                                logits: UnsafeMutablePointer<Float>?, logitRows: LogitRows) throws(DynMoEError) -> ForwardResult {
        let resolved = try routing.map { (plan) throws(DynMoEError) in try resolve(plan) } ?? resolvedDefault
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
        timingTotals.withLock { $0.add(result.timing) }
        keepLastLogits(logits, rows: logitRows, length: length)
        return result
    }

    private func resolve(_ plan: RoutingPlan) throws(DynMoEError) -> [ResolvedRouting?] {
        if let last = lastCallRouting, last.plan == plan { return last.resolved }
        let resolved = try plan.resolve(for: model.config)
        lastCallRouting = (plan, resolved)
        return resolved
    }

    private func keepLastLogits(_ logits: UnsafeMutablePointer<Float>?, rows: LogitRows, length: Int) {
        guard let logits else { lastLogits = []; return }
        let v = model.vocabSize, b = cache.sequences
        if lastLogits.count != b * v { lastLogits = Array(repeating: 0, count: b * v) }
        for s in 0..<b {
            let src = rows == .last ? logits + s * v : logits + (s * length + length - 1) * v
            for i in 0..<v { lastLogits[s * v + i] = src[i] }
        }
    }

    /// Generates up to `maxNewTokens` tokens per sequence after `prompt` (evaluated first; empty
    /// to continue from the last call's logits). Every sampled token is evaluated, so the cache
    /// ends holding the whole continuation when there is room for it. `onStep` gets each step's
    /// tokens and returns false to stop. Returns [sequences][steps].
    package func generate(prompt: UnsafePointer<Int32>?, promptLength: Int, maxNewTokens: Int, sampling: SamplingOptions,
                          stopTokens: Set<Int32>, routing: RoutingPlan?, observer: (any RoutingObserver)?,
                          onStep: ([Int32], Int) -> Bool) throws(DynMoEError) -> [[Int32]] {
        try exclusive { () throws(DynMoEError) in
            try generateLocked(prompt: prompt, promptLength: promptLength, maxNewTokens: maxNewTokens, sampling: sampling,
                               stopTokens: stopTokens, routing: routing, observer: observer, onStep: onStep)
        }
    }

    private func generateLocked(prompt: UnsafePointer<Int32>?, promptLength: Int, maxNewTokens: Int, sampling: SamplingOptions,
                                stopTokens: Set<Int32>, routing: RoutingPlan?, observer: (any RoutingObserver)?,
                                onStep: ([Int32], Int) -> Bool) throws(DynMoEError) -> [[Int32]] {
        try sampling.validate()
        guard maxNewTokens >= 0 else { throw .invalidArgument("generate: max_new_tokens \(maxNewTokens) must be >= 0") }
        guard promptLength >= 0 else { throw .invalidArgument("generate: prompt length \(promptLength) must be >= 0") }
        guard promptLength == 0 || prompt != nil else { throw .invalidArgument("generate: prompt is NULL") }
        let b = cache.sequences, v = model.vocabSize
        let needed = position + promptLength + max(0, maxNewTokens - 1)
        guard needed <= capacity else {
            throw .init(.contextFull, "generate: \(position) cached + \(promptLength) prompt + \(maxNewTokens) new tokens need \(needed) positions (the last new token is not evaluated), more than the capacity of \(capacity)")
        }
        var logits = [Float](repeating: 0, count: b * v)
        if promptLength > 0 {
            _ = try logits.withUnsafeMutableBufferPointer { (l) throws(DynMoEError) in
                try evaluateLocked(tokens: prompt!, length: promptLength, routing: routing, observer: observer,
                             logits: l.baseAddress!, logitRows: .last)
            }
        } else {
            guard lastLogits.count == b * v else {
                throw .init(.notAvailable, "generate: no logits to continue from; evaluate a prompt first")
            }
            logits = lastLogits
        }
        var sampler = Sampler(sampling)
        var produced = Array(repeating: [Int32](), count: b)
        for s in 0..<b { produced[s].reserveCapacity(maxNewTokens) }
        var stoppedWith: [Int32?] = Array(repeating: nil, count: b)
        var tokens = [Int32](repeating: 0, count: b)
        var step = 0
        while step < maxNewTokens {
            for s in 0..<b {
                if let stop = stoppedWith[s] { tokens[s] = stop; continue }
                let t = logits.withUnsafeBufferPointer { Int32(sampler.sample($0.baseAddress! + s * v, v)) }
                tokens[s] = t
                if stopTokens.contains(t) { stoppedWith[s] = t }
            }
            for s in 0..<b { produced[s].append(tokens[s]) }
            step += 1
            let proceed = onStep(tokens, step - 1)
            guard position < capacity else { lastLogits = []; break }
            _ = try logits.withUnsafeMutableBufferPointer { (l) throws(DynMoEError) in
                try tokens.withUnsafeBufferPointer { (t) throws(DynMoEError) in
                    try evaluateLocked(tokens: t.baseAddress!, length: 1, routing: routing, observer: observer,
                                 logits: l.baseAddress!, logitRows: .last)
                }
            }
            if !proceed || stoppedWith.allSatisfy({ $0 != nil }) { break }
        }
        return produced
    }

    /// Forgets positions from `newPosition` on; the next call continues from there.
    package func rewind(to newPosition: Int) throws(DynMoEError) {
        try exclusive { () throws(DynMoEError) in
            guard newPosition >= 0, newPosition <= position else {
                throw .invalidArgument("rewind: position \(newPosition) is outside [0, \(position)]")
            }
            if newPosition != position { lastLogits = [] }
            position = newPosition
        }
    }

    private func exclusive<R>(_ body: () throws(DynMoEError) -> R) throws(DynMoEError) -> R {
        guard inUse.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else {
            throw .init(.busy, "session is in use: by another thread (use one session per thread), or by the call whose callback made this one (a callback may read a session, not evaluate, generate, rewind or change its routing)")
        }
        defer { inUse.store(false, ordering: .releasing) }
        return try body()
    }
}

extension Model {
    /// The limits of a one-shot forward's shape, checked before anything else about the call.
    package func checkForwardShape(batch: Int, length: Int) throws(DynMoEError) {
        guard batch >= 1, length >= 1 else { throw .invalidArgument("forward: batch (\(batch)) and length (\(length)) must be at least 1") }
        guard batch <= Session.maxSequences else {
            throw .invalidArgument("forward: batch \(batch) exceeds the limit of \(Session.maxSequences) sequences per call")
        }
        guard length <= config.maxPositions else {
            throw .invalidArgument("forward: length \(length) exceeds max_position_embeddings (\(config.maxPositions))")
        }
    }

    /// One-shot forward over [batch, length] tokens from position 0 (no state kept).
    package func forward(tokens: UnsafePointer<Int32>, batch: Int, length: Int, routing: RoutingPlan = .native,
                         recordTrace: Bool = false, observer: (any RoutingObserver)? = nil,
                         logits: UnsafeMutablePointer<Float>?, logitRows: LogitRows = .all) throws(DynMoEError) -> ForwardResult {
        try checkForwardShape(batch: batch, length: length)
        var options = SessionOptions()
        options.sequences = batch
        options.capacity = length
        options.routing = routing
        let session = try Session(model: self, options: options)
        return try session.evaluate(tokens: tokens, length: length, recordTrace: recordTrace, observer: observer,
                                    logits: logits, logitRows: logitRows)
    }
}
