/// Accumulated routing counters of a model or a session, safe to update from concurrent forwards
/// and to read while they run. Each forward merges its counters under one short lock.
package final class RoutingStatistics: Sendable {
    private let state: Locked<[LayerRoutingCounters?]>

    /// `layers[i]` is the number of experts of layer i, 0 for a layer without routing.
    package init(layers: [Int]) {
        state = Locked(layers.map { $0 > 0 ? LayerRoutingCounters(numExperts: $0) : nil })
    }

    package func add(_ counters: [LayerRoutingCounters?]) {
        state.withLock { layers in
            for i in layers.indices {
                if let c = counters[i] { layers[i]?.add(c) }
            }
        }
    }

    package func snapshot() -> [LayerRoutingCounters?] { state.withLock { $0 } }

    package func reset() {
        state.withLock { layers in
            for i in layers.indices {
                if let n = layers[i]?.numExperts { layers[i] = LayerRoutingCounters(numExperts: n) }
            }
        }
    }
}
