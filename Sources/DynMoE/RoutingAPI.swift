import CDynMoE
import DynMoECore

@c @implementation
public func dynmoe_policy_native() -> dynmoe_policy {
    dynmoe_policy(mode: Int32(DYNMOE_ROUTING_NATIVE), k: 0, threshold: 0, min_experts: 0, max_experts: 0,
                  renormalize: DYNMOE_RENORMALIZE_NATIVE)
}

@c @implementation
public func dynmoe_policy_top_k(_ k: Int32) -> dynmoe_policy {
    var p = dynmoe_policy_native()
    p.mode = Int32(DYNMOE_ROUTING_TOP_K)
    p.k = k
    return p
}

@c @implementation
public func dynmoe_policy_top_p(_ threshold: Float) -> dynmoe_policy {
    var p = dynmoe_policy_native()
    p.mode = Int32(DYNMOE_ROUTING_TOP_P)
    p.threshold = threshold
    return p
}

/// Translates a C policy, rejecting fields that make no sense for its mode.
func routingPolicy(_ p: dynmoe_policy) throws(DynMoEError) -> RoutingPolicy {
    let renormalize: Bool?
    switch p.renormalize {
    case DYNMOE_RENORMALIZE_NATIVE: renormalize = nil
    case 0: renormalize = false
    case 1: renormalize = true
    default: throw .invalidArgument("policy.renormalize must be -1, 0 or 1, got \(p.renormalize)")
    }
    switch Int(p.mode) {
    case Int(DYNMOE_ROUTING_NATIVE):
        return .native
    case Int(DYNMOE_ROUTING_TOP_K):
        return .topK(k: Int(p.k), renormalize: renormalize)
    case Int(DYNMOE_ROUTING_TOP_P):
        guard p.min_experts >= 0, p.max_experts >= 0 else {
            throw .invalidArgument("policy.min_experts and max_experts must be >= 0 (0 = no clamp)")
        }
        return .topP(threshold: p.threshold, minExperts: p.min_experts > 0 ? Int(p.min_experts) : nil,
                     maxExperts: p.max_experts > 0 ? Int(p.max_experts) : nil, renormalize: renormalize)
    default:
        throw .invalidArgument("policy.mode \(p.mode) is not a DYNMOE_ROUTING_* value")
    }
}

@c @implementation
public func dynmoe_routing_create(_ model: OpaquePointer?, _ defaultPolicy: UnsafePointer<dynmoe_policy>?,
                                  _ outRouting: UnsafeMutablePointer<OpaquePointer?>?) -> dynmoe_status {
    outRouting?.pointee = nil
    return api { () throws(DynMoEError) in
        let model = try lookupModel(model)
        let out = try required(outRouting, "out_routing")
        let policy = try defaultPolicy.map { (p) throws(DynMoEError) in try routingPolicy(p.pointee) } ?? .native
        let plan = RoutingPlan(policy)
        _ = try plan.resolve(for: model.config)
        out.pointee = HandleRegistry.shared.register(RoutingHandle(model: model, plan: plan))
    }
}

@c @implementation
public func dynmoe_routing_set_layer(_ routing: OpaquePointer?, _ layer: Int32, _ policy: UnsafePointer<dynmoe_policy>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let handle = try HandleRegistry.shared.lookup(routing, as: RoutingHandle.self, "routing")
        try RoutingPlan.checkRoutedLayer(Int(layer), in: handle.model.config)
        var plan = handle.plan
        if let policy {
            plan.layerPolicies[Int(layer)] = try routingPolicy(policy.pointee)
        } else {
            plan.layerPolicies[Int(layer)] = nil
        }
        _ = try plan.resolve(for: handle.model.config)
        handle.plan = plan
    }
}

@c @implementation
public func dynmoe_routing_free(_ routing: OpaquePointer?) {
    HandleRegistry.shared.release(routing, as: RoutingHandle.self)
}

/// The plan of an optional routing handle, checked to belong to `model`.
func routingPlan(_ handle: UnsafeRawPointer?, for model: Model) throws(DynMoEError) -> RoutingPlan? {
    guard let handle else { return nil }
    let routing = try HandleRegistry.shared.lookup(OpaquePointer(handle), as: RoutingHandle.self, "routing")
    guard routing.model === model else { throw .invalidArgument("routing was created for a different model") }
    return routing.plan
}
