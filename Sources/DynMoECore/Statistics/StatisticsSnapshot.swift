/// Routing counters joined with the model's parameter counts: everything the statistics API
/// reports, derived on demand from exact counts.
package struct StatisticsSnapshot: Sendable {
    package struct Layer: Sendable {
        package var index: Int
        package var counters: LayerRoutingCounters?
        /// Parameters of one routed expert (0 for a layer without routing).
        package var parametersPerExpert: Int
        /// Parameters of this layer every token uses.
        package var alwaysActiveParameters: Int

        package var isMoE: Bool { counters != nil }

        /// This layer's parameters per token given the experts actually run.
        package var activatedParametersPerToken: Double {
            Double(alwaysActiveParameters) + (counters?.meanExpertsPerToken ?? 0) * Double(parametersPerExpert)
        }

        /// Busiest and idlest expert (lowest index on ties), nil without tokens.
        package var busiestExpert: Int? { extremeExpert(>) }
        package var idlestExpert: Int? { extremeExpert(<) }

        /// The first expert whose count beats every other's under `better`.
        private func extremeExpert(_ better: (Int64, Int64) -> Bool) -> Int? {
            guard let c = counters, c.tokens > 0 else { return nil }
            var best = 0
            for e in c.expertTokenCounts.indices where better(c.expertTokenCounts[e], c.expertTokenCounts[best]) { best = e }
            return best
        }
    }

    package var family: Family
    package var layers: [Layer]
    package var totalParameters: Int
    /// Parameters outside the decoder layers every token uses (final norm, LM head).
    package var outerParameters: Int

    package init(model: Model, counters: [LayerRoutingCounters?]) {
        family = model.config.family
        totalParameters = model.totalParameters
        outerParameters = model.finalNorm.count + model.lmHead.elementCount
        layers = model.layers.enumerated().map { i, layer in
            Layer(index: i, counters: counters[i], parametersPerExpert: layer.feedForward.moe?.parametersPerExpert ?? 0,
                  alwaysActiveParameters: layer.alwaysActiveParameters)
        }
    }

    package var moeLayers: [Layer] { layers.filter(\.isMoE) }

    /// Token positions processed (every MoE layer sees each token once).
    package var tokens: Int64 { moeLayers.first?.counters?.tokens ?? 0 }

    /// Mean over MoE layers of each layer's mean experts per token.
    package var meanExpertsPerToken: Double {
        let moe = moeLayers
        guard !moe.isEmpty else { return 0 }
        return moe.reduce(0.0) { $0 + $1.counters!.meanExpertsPerToken } / Double(moe.count)
    }

    package var activatedParametersPerToken: Double {
        Double(outerParameters) + layers.reduce(0.0) { $0 + $1.activatedParametersPerToken }
    }

    package var activatedParameterFraction: Double {
        totalParameters > 0 ? activatedParametersPerToken / Double(totalParameters) : 0
    }

    /// Schema "dynmoe.stats", version 1 (documented in the README).
    package func json() -> String {
        var out = "{\"schema\":\"dynmoe.stats\",\"version\":1"
        out += ",\"family\":\(JSONWriter.quote(family.rawValue))"
        out += ",\"summary\":{\"tokens\":\(tokens)"
        out += ",\"num_layers\":\(layers.count),\"num_moe_layers\":\(moeLayers.count)"
        out += ",\"mean_experts_per_token\":\(JSONWriter.number(meanExpertsPerToken))"
        out += ",\"activated_parameters_per_token\":\(JSONWriter.number(activatedParametersPerToken))"
        out += ",\"activated_parameter_fraction\":\(JSONWriter.number(activatedParameterFraction))"
        out += ",\"total_parameters\":\(totalParameters)}"
        out += ",\"layers\":["
        for (i, layer) in layers.enumerated() {
            if i > 0 { out += "," }
            out += "{\"layer\":\(layer.index),\"is_moe\":\(layer.isMoE)"
            out += ",\"activated_parameters_per_token\":\(JSONWriter.number(layer.activatedParametersPerToken))"
            if let c = layer.counters {
                func list<T>(_ a: [T], _ f: (T) -> String) -> String { "[" + a.map(f).joined(separator: ",") + "]" }
                out += ",\"num_experts\":\(c.numExperts),\"tokens\":\(c.tokens)"
                out += ",\"parameters_per_expert\":\(layer.parametersPerExpert)"
                out += ",\"expert_token_counts\":\(list(c.expertTokenCounts) { String($0) })"
                out += ",\"expert_weight_sums\":\(list(c.expertWeightSums) { JSONWriter.number($0) })"
                out += ",\"experts_per_token_histogram\":\(list(c.expertsPerTokenHistogram) { String($0) })"
                out += ",\"mean_experts_per_token\":\(JSONWriter.number(c.meanExpertsPerToken))"
                out += ",\"mean_router_entropy\":\(JSONWriter.number(c.meanRouterEntropy))"
                out += ",\"mean_kept_mass\":\(JSONWriter.number(c.meanKeptMass))"
                out += ",\"load_max_over_mean\":\(JSONWriter.number(c.loadMaxOverMean))"
                out += ",\"load_coefficient_of_variation\":\(JSONWriter.number(c.loadCoefficientOfVariation))"
                out += ",\"busiest_expert\":\(layer.busiestExpert.map(String.init) ?? "null")"
                out += ",\"idlest_expert\":\(layer.idlestExpert.map(String.init) ?? "null")"
            }
            out += "}"
        }
        return out + "]}"
    }
}
