import CDynMoE
import DynMoECore

func deliverStats(_ out: UnsafeMutablePointer<OpaquePointer?>?, _ snapshot: () throws(DynMoEError) -> StatisticsSnapshot) -> dynmoe_status {
    out?.pointee = nil
    return api { () throws(DynMoEError) in
        let out = try required(out, "out_stats")
        out.pointee = HandleRegistry.shared.register(StatsHandle(try snapshot()))
    }
}

@c @implementation
public func dynmoe_model_get_stats(_ model: OpaquePointer?, _ outStats: UnsafeMutablePointer<OpaquePointer?>?) -> dynmoe_status {
    deliverStats(outStats) { () throws(DynMoEError) in
        let model = try lookupModel(model)
        return StatisticsSnapshot(model: model, counters: model.statistics.snapshot())
    }
}

@c @implementation
public func dynmoe_model_reset_stats(_ model: OpaquePointer?) -> dynmoe_status {
    api { () throws(DynMoEError) in try lookupModel(model).statistics.reset() }
}

@c @implementation
public func dynmoe_trace_get_stats(_ trace: OpaquePointer?, _ outStats: UnsafeMutablePointer<OpaquePointer?>?) -> dynmoe_status {
    deliverStats(outStats) { () throws(DynMoEError) in
        let t = try lookupTrace(trace)
        return StatisticsSnapshot(model: t.model, counters: t.counters)
    }
}

func lookupStats(_ handle: OpaquePointer?) throws(DynMoEError) -> StatisticsSnapshot {
    try HandleRegistry.shared.lookup(handle, as: StatsHandle.self, "stats").snapshot
}

/// Counters of an MoE layer of a snapshot, or an error naming the layer.
func layerCounters(_ stats: OpaquePointer?, _ layer: Int32) throws(DynMoEError) -> LayerRoutingCounters {
    let s = try lookupStats(stats)
    let l = try checkLayer(layer, s.layers.count)
    return try moeLayerData(s.layers[l].counters, layer: l)
}

@c @implementation
public func dynmoe_stats_get_summary(_ stats: OpaquePointer?, _ outSummary: UnsafeMutablePointer<dynmoe_stats_summary>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let s = try lookupStats(stats)
        let out = try required(outSummary, "out_summary")
        out.pointee = dynmoe_stats_summary(tokens: s.tokens, mean_experts_per_token: s.meanExpertsPerToken,
                                           activated_parameters_per_token: s.activatedParametersPerToken,
                                           activated_parameter_fraction: s.activatedParameterFraction,
                                           total_parameters: Int64(s.totalParameters), num_layers: Int32(s.layers.count),
                                           num_moe_layers: Int32(s.moeLayers.count))
    }
}

@c @implementation
public func dynmoe_stats_get_layer(_ stats: OpaquePointer?, _ layer: Int32, _ outLayer: UnsafeMutablePointer<dynmoe_layer_stats>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let s = try lookupStats(stats)
        let l = try checkLayer(layer, s.layers.count)
        let out = try required(outLayer, "out_layer")
        let info = s.layers[l]
        var r = dynmoe_layer_stats()
        r.layer = Int32(l)
        r.is_moe = info.isMoE ? 1 : 0
        r.busiest_expert = -1
        r.idlest_expert = -1
        r.activated_parameters_per_token = info.activatedParametersPerToken
        if let c = info.counters {
            r.num_experts = Int32(c.numExperts)
            r.tokens = c.tokens
            r.mean_experts_per_token = c.meanExpertsPerToken
            r.mean_router_entropy = c.meanRouterEntropy
            r.mean_kept_mass = c.meanKeptMass
            r.load_max_over_mean = c.loadMaxOverMean
            r.load_coefficient_of_variation = c.loadCoefficientOfVariation
            r.busiest_expert = Int32(info.busiestExpert ?? -1)
            r.idlest_expert = Int32(info.idlestExpert ?? -1)
        }
        out.pointee = r
    }
}

@c @implementation
public func dynmoe_stats_get_expert_counts(_ stats: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<Int64>?, _ capacity: Int) -> dynmoe_status {
    api { () throws(DynMoEError) in
        try copyOut(try layerCounters(stats, layer).expertTokenCounts, to: out, capacity: capacity, "expert counts")
    }
}

@c @implementation
public func dynmoe_stats_get_expert_weight_sums(_ stats: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<Double>?, _ capacity: Int) -> dynmoe_status {
    api { () throws(DynMoEError) in
        try copyOut(try layerCounters(stats, layer).expertWeightSums, to: out, capacity: capacity, "expert weight sums")
    }
}

@c @implementation
public func dynmoe_stats_get_histogram(_ stats: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<Int64>?, _ capacity: Int) -> dynmoe_status {
    api { () throws(DynMoEError) in
        try copyOut(try layerCounters(stats, layer).expertsPerTokenHistogram, to: out, capacity: capacity, "experts-per-token histogram")
    }
}

@c @implementation
public func dynmoe_stats_to_json(_ stats: OpaquePointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ capacity: Int,
                                 _ outLength: UnsafeMutablePointer<Int>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let json = Array(try lookupStats(stats).json().utf8)
        outLength?.pointee = json.count
        if buffer == nil && capacity == 0 { return }
        let out = try required(buffer, "buffer")
        try checkCapacity(capacity, needed: json.count + 1, "JSON buffer (bytes, including the NUL)")
        json.withUnsafeBytes { UnsafeMutableRawPointer(out).copyMemory(from: $0.baseAddress!, byteCount: json.count) }
        out[json.count] = 0
    }
}

@c @implementation
public func dynmoe_stats_free(_ stats: OpaquePointer?) {
    HandleRegistry.shared.release(stats, as: StatsHandle.self)
}
