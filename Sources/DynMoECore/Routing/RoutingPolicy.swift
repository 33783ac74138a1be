/// How an MoE layer picks experts for a token, as the caller asks for it.
/// `renormalize: nil` means "as the checkpoint's native routing does".
package enum RoutingPolicy: Equatable, Sendable {
    /// The family's own rule (top-k for Mixtral/Qwen/OLMoE, top-p for the paper's model).
    case native
    /// The k most probable experts.
    case topK(k: Int, renormalize: Bool? = nil)
    /// The shortest prefix of experts, by descending probability, whose cumulative probability is
    /// strictly greater than `threshold`, its length clamped to [minExperts ?? 1, maxExperts ?? E].
    case topP(threshold: Float, minExperts: Int? = nil, maxExperts: Int? = nil, renormalize: Bool? = nil)
}

/// A routing request for a whole model: one policy for every MoE layer, optionally overridden
/// per layer. Plans are plain values: build one per call, nothing is baked in at load.
package struct RoutingPlan: Equatable, Sendable {
    package var defaultPolicy: RoutingPolicy
    package var layerPolicies: [Int: RoutingPolicy]

    package init(_ defaultPolicy: RoutingPolicy = .native, layers: [Int: RoutingPolicy] = [:]) {
        self.defaultPolicy = defaultPolicy
        self.layerPolicies = layers
    }

    package static let native = RoutingPlan()

    package func policy(forLayer layer: Int) -> RoutingPolicy { layerPolicies[layer] ?? defaultPolicy }

    /// Throws unless `layer` is an MoE layer of the model.
    package static func checkRoutedLayer(_ layer: Int, in config: ModelConfig) throws(DynMoEError) {
        guard layer >= 0, layer < config.numLayers else {
            throw .invalidArgument("routing: layer \(layer) is out of range (the model has \(config.numLayers) layers)")
        }
        guard config.isMoE[layer] else {
            throw .invalidArgument("routing: layer \(layer) is not an MoE layer (MoE layers: \(config.moeLayers))")
        }
    }

    /// Checks the plan against a model and turns it into one concrete rule per layer
    /// (nil for layers without routed experts).
    package func resolve(for config: ModelConfig) throws(DynMoEError) -> [ResolvedRouting?] {
        for layer in layerPolicies.keys.sorted() { try RoutingPlan.checkRoutedLayer(layer, in: config) }
        var resolved: [ResolvedRouting?] = []
        for layer in 0..<config.numLayers {
            guard config.isMoE[layer] else { resolved.append(nil); continue }
            resolved.append(try ResolvedRouting(policy(forLayer: layer), numExperts: config.numExperts,
                                                native: config.nativeRouting, layer: layer))
        }
        return resolved
    }
}

/// A policy made concrete for one layer: the family defaults filled in, parameters checked.
package struct ResolvedRouting: Equatable, Sendable {
    package enum Rule: Equatable, Sendable {
        case topK(Int)
        case topP(threshold: Float, minExperts: Int, maxExperts: Int)
    }

    package var rule: Rule
    package var renormalize: Bool

    package init(rule: Rule, renormalize: Bool) {
        self.rule = rule
        self.renormalize = renormalize
    }

    package init(_ policy: RoutingPolicy, numExperts: Int, native: NativeRouting, layer: Int? = nil) throws(DynMoEError) {
        let whereText = layer.map { " (layer \($0))" } ?? ""
        func checkCount(_ name: String, _ v: Int) throws(DynMoEError) {
            guard v >= 1, v <= numExperts else {
                throw .invalidArgument("routing\(whereText): \(name) = \(v) is outside [1, \(numExperts)]")
            }
        }
        switch policy {
        case .native:
            switch native {
            case .topK(let k, let r): rule = .topK(k); renormalize = r
            case .topP(let p, let r): rule = .topP(threshold: p, minExperts: 1, maxExperts: numExperts); renormalize = r
            }
        case .topK(let k, let r):
            try checkCount("k", k)
            rule = .topK(k)
            renormalize = r ?? native.renormalize
        case .topP(let p, let lo, let hi, let r):
            guard p.isFinite, p > 0, p <= 1 else {
                throw .invalidArgument("routing\(whereText): top-p threshold \(p) is outside (0, 1]")
            }
            let minExperts = lo ?? 1, maxExperts = hi ?? numExperts
            try checkCount("min_experts", minExperts)
            try checkCount("max_experts", maxExperts)
            guard minExperts <= maxExperts else {
                throw .invalidArgument("routing\(whereText): min_experts \(minExperts) > max_experts \(maxExperts)")
            }
            rule = .topP(threshold: p, minExperts: minExperts, maxExperts: maxExperts)
            renormalize = r ?? native.renormalize
        }
    }

    /// The largest number of experts this rule can pick for one token.
    package func maxExperts(numExperts: Int) -> Int {
        switch rule {
        case .topK(let k): return k
        case .topP(_, _, let hi): return hi
        }
    }
}
