/// What a forward records on request: per layer, the hidden state it outputs, and for MoE
/// layers the router probabilities, the selection mask and the weights, all [B, T, ·] row-major.
package final class ForwardTrace: @unchecked Sendable {
    package let batch: Int
    package let length: Int
    package let hiddenSize: Int
    package let numExperts: [Int]
    package var hidden: [[Float]]
    package var routerProbs: [[Float]?]
    package var selected: [[UInt8]?]
    package var weights: [[Float]?]

    package init(batch: Int, length: Int, hiddenSize: Int, numExperts: [Int]) {
        self.batch = batch
        self.length = length
        self.hiddenSize = hiddenSize
        self.numExperts = numExperts
        hidden = Array(repeating: [], count: numExperts.count)
        routerProbs = Array(repeating: nil, count: numExperts.count)
        selected = Array(repeating: nil, count: numExperts.count)
        weights = Array(repeating: nil, count: numExperts.count)
    }

    package var tokens: Int { batch * length }
    package var numLayers: Int { numExperts.count }

    /// The experts chosen for one token of an MoE layer, by descending weight, with their weights.
    package func chosenExperts(layer: Int, token: Int) -> [(expert: Int, weight: Float)]? {
        guard let sel = selected[layer], let w = weights[layer] else { return nil }
        let e = numExperts[layer]
        var out: [(expert: Int, weight: Float)] = []
        for i in 0..<e where sel[token * e + i] != 0 { out.append((i, w[token * e + i])) }
        return out.sorted { $0.weight > $1.weight || ($0.weight == $1.weight && $0.expert < $1.expert) }
    }
}

/// Receives each MoE layer's routing decisions while a forward runs, on the calling thread.
/// A protocol rather than a closure so that an observer of a few words (the C API's function
/// pointer and user data) is passed without a heap-allocated closure context per call.
package protocol RoutingObserver {
    func observe(_ observation: RoutingObservation)
}

/// An observer that calls a closure.
package struct ObserverClosure: RoutingObserver {
    let body: (RoutingObservation) -> Void
    package init(_ body: @escaping (RoutingObservation) -> Void) { self.body = body }
    package func observe(_ observation: RoutingObservation) { body(observation) }
}

/// One MoE layer's routing decisions for a forward's batch, as handed to an observer while the
/// forward runs. Valid only during the callback.
package struct RoutingObservation {
    package var layer: Int
    package var tokens: Int
    package var numExperts: Int
    /// Per token `stride` slots, the first `counts[t]` used: chosen experts by descending prob.
    package var experts: UnsafePointer<Int32>
    package var weights: UnsafePointer<Float>
    package var counts: UnsafePointer<Int32>
    package var stride: Int
    /// Router probabilities [tokens, numExperts].
    package var probabilities: UnsafePointer<Float>
}
