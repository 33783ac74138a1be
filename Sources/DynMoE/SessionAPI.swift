import CDynMoE
import DynMoECore

@c @implementation
public func dynmoe_session_params_default() -> dynmoe_session_params {
    dynmoe_session_params(n_sequences: 1, capacity: 0, memory_budget_bytes: 0, routing: nil,
                          kv_dtype: Int32(DYNMOE_DTYPE_F32))
}

/// The KV-cache element type a `dynmoe_dtype` value names.
func kvElementType(_ value: Int32) throws(DynMoEError) -> DType {
    switch value {
    case Int32(DYNMOE_DTYPE_F32): return .f32
    case Int32(DYNMOE_DTYPE_F16): return .f16
    case Int32(DYNMOE_DTYPE_BF16): return .bf16
    default:
        throw .invalidArgument("kv_dtype must be DYNMOE_DTYPE_F32 (0), DYNMOE_DTYPE_F16 (1) or DYNMOE_DTYPE_BF16 (2), got \(value)")
    }
}

func lookupSession(_ handle: OpaquePointer?) throws(DynMoEError) -> Session {
    try HandleRegistry.shared.lookup(handle, as: Session.self, "session")
}

@c @implementation
public func dynmoe_session_create(_ model: OpaquePointer?, _ params: UnsafePointer<dynmoe_session_params>?,
                                  _ outSession: UnsafeMutablePointer<OpaquePointer?>?) -> dynmoe_status {
    outSession?.pointee = nil
    return api { () throws(DynMoEError) in
        let model = try lookupModel(model)
        let out = try required(outSession, "out_session")
        let p = params?.pointee ?? dynmoe_session_params_default()
        var options = SessionOptions()
        options.sequences = Int(p.n_sequences)
        guard p.capacity >= 0 else { throw .invalidArgument("capacity must be >= 0, got \(p.capacity)") }
        guard p.memory_budget_bytes >= 0 else { throw .invalidArgument("memory_budget_bytes must be >= 0") }
        options.capacity = Int(p.capacity)
        options.memoryBudget = Int(p.memory_budget_bytes)
        options.routing = try routingPlan(UnsafeRawPointer(p.routing), for: model) ?? .native
        options.kvDType = try kvElementType(p.kv_dtype)
        out.pointee = HandleRegistry.shared.register(try Session(model: model, options: options))
    }
}

@c @implementation
public func dynmoe_session_free(_ session: OpaquePointer?) {
    HandleRegistry.shared.release(session, as: Session.self)
}

@c @implementation
public func dynmoe_session_eval(_ session: OpaquePointer?, _ tokens: UnsafePointer<Int32>?, _ length: Int32,
                                _ params: UnsafePointer<dynmoe_forward_params>?, _ logits: UnsafeMutablePointer<Float>?,
                                _ logitsCapacity: Int, _ outTrace: UnsafeMutablePointer<OpaquePointer?>?) -> dynmoe_status {
    outTrace?.pointee = nil
    return api { () throws(DynMoEError) in
        let session = try lookupSession(session)
        let tokens = try checkTokens(tokens, batch: Int32(session.sequences), length: length)
        let options = try CallOptions(params, model: session.model, defaultRows: .last)
        try options.checkOutputs(batch: session.sequences, length: Int(length), vocabSize: session.model.vocabSize,
                                 logits: logits, logitsCapacity: logitsCapacity, outTrace: outTrace)
        let result = try session.evaluate(tokens: tokens, length: Int(length), routing: options.routing,
                                          recordTrace: options.recordTrace, observer: options.observer,
                                          logits: logits, logitRows: options.logitRows)
        deliverTrace(outTrace, model: session.model, result: result, requested: options.recordTrace)
    }
}

@c @implementation
public func dynmoe_session_get_position(_ session: OpaquePointer?, _ outPosition: UnsafeMutablePointer<Int32>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let s = try lookupSession(session)
        try required(outPosition, "out_position").pointee = Int32(s.position)
    }
}

@c @implementation
public func dynmoe_session_get_capacity(_ session: OpaquePointer?, _ outCapacity: UnsafeMutablePointer<Int32>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let s = try lookupSession(session)
        try required(outCapacity, "out_capacity").pointee = Int32(clamping: s.capacity)
    }
}

@c @implementation
public func dynmoe_session_rewind(_ session: OpaquePointer?, _ position: Int32) -> dynmoe_status {
    api { () throws(DynMoEError) in try lookupSession(session).rewind(to: Int(position)) }
}

@c @implementation
public func dynmoe_session_set_routing(_ session: OpaquePointer?, _ routing: OpaquePointer?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let s = try lookupSession(session)
        try s.setDefaultRouting(try routingPlan(UnsafeRawPointer(routing), for: s.model) ?? .native)
    }
}

@c @implementation
public func dynmoe_session_get_stats(_ session: OpaquePointer?, _ outStats: UnsafeMutablePointer<OpaquePointer?>?) -> dynmoe_status {
    deliverStats(outStats) { () throws(DynMoEError) in
        let s = try lookupSession(session)
        return StatisticsSnapshot(model: s.model, counters: s.statistics.snapshot())
    }
}

@c @implementation
public func dynmoe_session_reset_stats(_ session: OpaquePointer?) -> dynmoe_status {
    api { () throws(DynMoEError) in try lookupSession(session).resetStatistics() }
}

@c @implementation
public func dynmoe_session_get_timing(_ session: OpaquePointer?, _ outTiming: UnsafeMutablePointer<dynmoe_timing>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let out = try required(outTiming, "out_timing")
        let t = try lookupSession(session).timing
        out.pointee = dynmoe_timing(passes: Int64(t.passes), tokens: Int64(t.tokens), total_seconds: t.total,
                                          attention_seconds: t.attention, moe_seconds: t.moe, dense_seconds: t.dense,
                                          head_seconds: t.head, other_seconds: t.other)
    }
}

@c @implementation
public func dynmoe_sampling_params_default() -> dynmoe_sampling_params {
    dynmoe_sampling_params(temperature: 0, top_k: 0, top_p: 1, seed: 0)
}

@c @implementation
public func dynmoe_session_generate(_ session: OpaquePointer?, _ prompt: UnsafePointer<Int32>?, _ promptLength: Int32,
                                    _ maxNewTokens: Int32, _ sampling: UnsafePointer<dynmoe_sampling_params>?,
                                    _ stopTokens: UnsafePointer<Int32>?, _ nStopTokens: Int,
                                    _ params: UnsafePointer<dynmoe_forward_params>?, _ callback: dynmoe_token_callback?,
                                    _ callbackUserData: UnsafeMutableRawPointer?, _ outTokens: UnsafeMutablePointer<Int32>?,
                                    _ outCapacity: Int, _ outSteps: UnsafeMutablePointer<Int32>?) -> dynmoe_status {
    outSteps?.pointee = 0
    return api { () throws(DynMoEError) in
        let s = try lookupSession(session)
        let options = try CallOptions(params, model: s.model, defaultRows: .last)
        guard !options.recordTrace else { throw .invalidArgument("generate does not record traces; use dynmoe_session_eval") }
        guard maxNewTokens >= 0 else { throw .invalidArgument("max_new_tokens must be >= 0, got \(maxNewTokens)") }
        let out = try required(outTokens, "out_tokens")
        try checkCapacity(outCapacity, needed: s.sequences * Int(maxNewTokens), "out_tokens")
        guard nStopTokens == 0 || stopTokens != nil else { throw .invalidArgument("stop_tokens is NULL but n_stop_tokens is \(nStopTokens)") }
        let stops = Set((0..<nStopTokens).map { stopTokens![$0] })
        let c = sampling?.pointee ?? dynmoe_sampling_params_default()
        var sampler = SamplingOptions()
        sampler.temperature = c.temperature
        sampler.topK = Int(c.top_k)
        sampler.topP = c.top_p
        sampler.seed = c.seed
        let maxNew = Int(maxNewTokens), sequences = s.sequences
        let produced = try s.generate(prompt: prompt, promptLength: Int(promptLength), maxNewTokens: maxNew,
                                      sampling: sampler, stopTokens: stops, routing: options.routing,
                                      observer: options.observer) { tokens, step in
            for b in 0..<sequences { out[b * maxNew + step] = tokens[b] }
            outSteps?.pointee = Int32(step + 1)
            guard let callback else { return true }
            return tokens.withUnsafeBufferPointer { callback($0.baseAddress, Int32(sequences), Int32(step), callbackUserData) == 0 }
        }
        outSteps?.pointee = Int32(produced.first?.count ?? 0)
    }
}
