import CDynMoE
import DynMoECore

@c @implementation
public func dynmoe_forward_params_default() -> dynmoe_forward_params {
    dynmoe_forward_params(routing: nil, record_trace: 0, logits_mode: Int32(DYNMOE_LOGITS_DEFAULT), observer: nil,
                          observer_user_data: nil)
}

/// A forward call's options translated from C.
struct CallOptions {
    var routing: RoutingPlan?
    var recordTrace: Bool
    var logitRows: LogitRows
    var observer: (any RoutingObserver)?

    init(_ params: UnsafePointer<dynmoe_forward_params>?, model: Model, defaultRows: LogitRows) throws(DynMoEError) {
        let p = params?.pointee ?? dynmoe_forward_params_default()
        routing = try routingPlan(UnsafeRawPointer(p.routing), for: model)
        recordTrace = p.record_trace != 0
        switch Int(p.logits_mode) {
        case Int(DYNMOE_LOGITS_DEFAULT): logitRows = defaultRows
        case Int(DYNMOE_LOGITS_ALL): logitRows = .all
        case Int(DYNMOE_LOGITS_LAST): logitRows = .last
        default: throw .invalidArgument("logits_mode \(p.logits_mode) is not a DYNMOE_LOGITS_* value")
        }
        observer = p.observer.map { CRoutingObserver(callback: $0, userData: p.observer_user_data) }
    }
}

/// A C routing observer: the function and its user data, two words, so it travels in the
/// `any RoutingObserver` without a heap box.
struct CRoutingObserver: RoutingObserver {
    let callback: dynmoe_routing_observer
    let userData: UnsafeMutableRawPointer?

    func observe(_ o: RoutingObservation) {
        var event = dynmoe_routing_event(layer: Int32(o.layer), num_tokens: Int32(o.tokens), num_experts: Int32(o.numExperts),
                                         stride: Int32(o.stride), experts: o.experts, weights: o.weights,
                                         counts: o.counts, probabilities: o.probabilities)
        callback(&event, userData)
    }
}

extension CallOptions {
    /// Checks the output arguments of a forward-like call over [batch, length] tokens: a trace
    /// pointer when a trace is recorded, and a logits buffer (optional) large enough for the rows
    /// this call writes.
    func checkOutputs(batch: Int, length: Int, vocabSize: Int, logits: UnsafeMutablePointer<Float>?,
                      logitsCapacity: Int, outTrace: UnsafeMutablePointer<OpaquePointer?>?) throws(DynMoEError) {
        if recordTrace { _ = try required(outTrace, "out_trace (record_trace is set)") }
        guard logits != nil || logitsCapacity != 0 else { return }
        _ = try required(logits, "logits")
        let rows = logitRows == .all ? batch * length : batch
        let (needed, overflow) = rows.multipliedReportingOverflow(by: vocabSize)
        try checkCapacity(logitsCapacity, needed: overflow ? Int.max : needed, "logits")
    }
}

/// Validates the shared arguments of forward-like calls and returns the element count of tokens.
func checkTokens(_ tokens: UnsafePointer<Int32>?, batch: Int32, length: Int32) throws(DynMoEError) -> UnsafePointer<Int32> {
    let tokens = try required(tokens, "tokens")
    guard batch >= 1, length >= 1 else { throw .invalidArgument("batch (\(batch)) and length (\(length)) must be at least 1") }
    return tokens
}

/// Hands a trace handle to C when one was asked for.
func deliverTrace(_ outTrace: UnsafeMutablePointer<OpaquePointer?>?, model: Model, result: ForwardResult, requested: Bool) {
    guard requested, let outTrace else { return }
    outTrace.pointee = HandleRegistry.shared.register(TraceHandle(model: model, trace: result.trace, counters: result.counters))
}

@c @implementation
public func dynmoe_forward(_ model: OpaquePointer?, _ tokens: UnsafePointer<Int32>?, _ batch: Int32, _ length: Int32,
                           _ params: UnsafePointer<dynmoe_forward_params>?, _ logits: UnsafeMutablePointer<Float>?,
                           _ logitsCapacity: Int, _ outTrace: UnsafeMutablePointer<OpaquePointer?>?) -> dynmoe_status {
    outTrace?.pointee = nil
    return api { () throws(DynMoEError) in
        let model = try lookupModel(model)
        let tokens = try checkTokens(tokens, batch: batch, length: length)
        try model.checkForwardShape(batch: Int(batch), length: Int(length))
        let options = try CallOptions(params, model: model, defaultRows: .all)
        try options.checkOutputs(batch: Int(batch), length: Int(length), vocabSize: model.vocabSize, logits: logits,
                                 logitsCapacity: logitsCapacity, outTrace: outTrace)
        let result = try model.forward(tokens: tokens, batch: Int(batch), length: Int(length),
                                       routing: options.routing ?? .native, recordTrace: options.recordTrace,
                                       observer: options.observer, logits: logits, logitRows: options.logitRows)
        deliverTrace(outTrace, model: model, result: result, requested: options.recordTrace)
    }
}
