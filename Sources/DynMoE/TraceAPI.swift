import CDynMoE
import DynMoECore

func lookupTrace(_ handle: OpaquePointer?) throws(DynMoEError) -> TraceHandle {
    try HandleRegistry.shared.lookup(handle, as: TraceHandle.self, "trace")
}

/// The recorded trace, or an error if the call recorded none.
func recordedTrace(_ handle: OpaquePointer?) throws(DynMoEError) -> ForwardTrace {
    guard let trace = try lookupTrace(handle).trace else { throw .init(.notAvailable, "this call recorded no trace") }
    return trace
}

func checkLayer(_ layer: Int32, _ count: Int) throws(DynMoEError) -> Int {
    guard layer >= 0, Int(layer) < count else { throw .invalidArgument("layer \(layer) is outside [0, \(count))") }
    return Int(layer)
}

/// Routing data of an MoE layer, or an error naming the layer.
func moeLayerData<T>(_ data: T?, layer: Int) throws(DynMoEError) -> T {
    guard let d = data else { throw .init(.notAvailable, "layer \(layer) is not an MoE layer: it has no routing data") }
    return d
}

/// Copies `source` into a caller buffer of `capacity` elements.
func copyOut<T>(_ source: [T], to out: UnsafeMutablePointer<T>?, capacity: Int, _ what: String) throws(DynMoEError) {
    let out = try required(out, "out")
    try checkCapacity(capacity, needed: source.count, what)
    source.withUnsafeBufferPointer { out.update(from: $0.baseAddress!, count: source.count) }
}

@c @implementation
public func dynmoe_trace_get_shape(_ trace: OpaquePointer?, _ outBatch: UnsafeMutablePointer<Int32>?,
                                   _ outLength: UnsafeMutablePointer<Int32>?, _ outNumLayers: UnsafeMutablePointer<Int32>?,
                                   _ outHiddenSize: UnsafeMutablePointer<Int32>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let t = try recordedTrace(trace)
        outBatch?.pointee = Int32(t.batch)
        outLength?.pointee = Int32(t.length)
        outNumLayers?.pointee = Int32(t.numLayers)
        outHiddenSize?.pointee = Int32(t.hiddenSize)
    }
}

@c @implementation
public func dynmoe_trace_get_hidden(_ trace: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<Float>?, _ capacity: Int) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let t = try recordedTrace(trace)
        let l = try checkLayer(layer, t.numLayers)
        try copyOut(t.hidden[l], to: out, capacity: capacity, "hidden states of layer \(l)")
    }
}

/// Copies one MoE layer's [B, T, E] routing array of a trace into a caller buffer.
func copyRoutingArray<T>(_ trace: OpaquePointer?, _ layer: Int32, _ field: KeyPath<ForwardTrace, [[T]?]>,
                         _ out: UnsafeMutablePointer<T>?, _ capacity: Int, _ what: String) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let t = try recordedTrace(trace)
        let l = try checkLayer(layer, t.numLayers)
        try copyOut(try moeLayerData(t[keyPath: field][l], layer: l), to: out, capacity: capacity, "\(what) of layer \(l)")
    }
}

@c @implementation
public func dynmoe_trace_get_router_probs(_ trace: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<Float>?, _ capacity: Int) -> dynmoe_status {
    copyRoutingArray(trace, layer, \.routerProbs, out, capacity, "router probabilities")
}

@c @implementation
public func dynmoe_trace_get_selected(_ trace: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<UInt8>?, _ capacity: Int) -> dynmoe_status {
    copyRoutingArray(trace, layer, \.selected, out, capacity, "selection mask")
}

@c @implementation
public func dynmoe_trace_get_weights(_ trace: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<Float>?, _ capacity: Int) -> dynmoe_status {
    copyRoutingArray(trace, layer, \.weights, out, capacity, "weights")
}

@c @implementation
public func dynmoe_trace_get_token_experts(_ trace: OpaquePointer?, _ layer: Int32, _ batchIndex: Int32, _ position: Int32,
                                           _ outExperts: UnsafeMutablePointer<Int32>?, _ outWeights: UnsafeMutablePointer<Float>?,
                                           _ capacity: Int, _ outCount: UnsafeMutablePointer<Int>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let t = try recordedTrace(trace)
        let l = try checkLayer(layer, t.numLayers)
        guard batchIndex >= 0, Int(batchIndex) < t.batch else { throw .invalidArgument("batch_index \(batchIndex) is outside [0, \(t.batch))") }
        guard position >= 0, Int(position) < t.length else { throw .invalidArgument("position \(position) is outside [0, \(t.length))") }
        let chosen = try moeLayerData(t.chosenExperts(layer: l, token: Int(batchIndex) * t.length + Int(position)), layer: l)
        outCount?.pointee = chosen.count
        if outExperts != nil || outWeights != nil { try checkCapacity(capacity, needed: chosen.count, "token experts") }
        for (i, c) in chosen.enumerated() {
            outExperts?[i] = Int32(c.expert)
            outWeights?[i] = c.weight
        }
    }
}

@c @implementation
public func dynmoe_trace_free(_ trace: OpaquePointer?) {
    HandleRegistry.shared.release(trace, as: TraceHandle.self)
}
