/// Self-attention projections of one decoder layer.
package struct AttentionWeights: Sendable {
    package var q, k, v, o: WeightMatrix
    package var qBias, kBias, vBias: [Float]?
    package var qNorm, kNorm: [Float]?

    package var parameterCount: Int {
        q.elementCount + k.elementCount + v.elementCount + o.elementCount
            + (qBias?.count ?? 0) + (kBias?.count ?? 0) + (vBias?.count ?? 0)
            + (qNorm?.count ?? 0) + (kNorm?.count ?? 0)
    }
}

/// A SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for routed experts, shared experts
/// and dense MLP layers alike.
package struct SwiGLUWeights: Sendable {
    package var gate, up, down: WeightMatrix

    package var intermediateSize: Int { gate.rows }
    package var parameterCount: Int { gate.elementCount + up.elementCount + down.elementCount }
    package var byteCount: Int { gate.byteCount + up.byteCount + down.byteCount }
}

/// A routed MoE block: router, experts, and (Qwen2-MoE) an always-on shared expert scaled by
/// sigmoid(shared_expert_gate(x)).
package struct MoEWeights: Sendable {
    package var router: WeightMatrix
    package var experts: [SwiGLUWeights]
    package var sharedExpert: SwiGLUWeights?
    package var sharedExpertGate: WeightMatrix?

    package var numExperts: Int { experts.count }
    package var parametersPerExpert: Int { experts.first?.parameterCount ?? 0 }
    /// Parameters every token touches regardless of routing.
    package var alwaysActiveParameters: Int {
        router.elementCount + (sharedExpert?.parameterCount ?? 0) + (sharedExpertGate?.elementCount ?? 0)
    }
}

package enum FeedForwardWeights: Sendable {
    case dense(SwiGLUWeights)
    case moe(MoEWeights)

    package var moe: MoEWeights? {
        if case .moe(let m) = self { return m }
        return nil
    }
}

/// One decoder layer: pre-norm attention, pre-norm feed-forward, both residual.
package struct LayerWeights: Sendable {
    package var inputNorm: [Float]
    package var postAttentionNorm: [Float]
    package var attention: AttentionWeights
    package var feedForward: FeedForwardWeights

    /// Parameters read for every token (attention, norms, dense MLP or router + shared expert).
    package var alwaysActiveParameters: Int {
        let ffn: Int
        switch feedForward {
        case .dense(let d): ffn = d.parameterCount
        case .moe(let m): ffn = m.alwaysActiveParameters
        }
        return inputNorm.count + postAttentionNorm.count + attention.parameterCount + ffn
    }

    package var totalParameters: Int {
        alwaysActiveParameters + (feedForward.moe.map { $0.parametersPerExpert * $0.numExperts } ?? 0)
    }
}
