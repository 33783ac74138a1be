/// Raw routing counts of one MoE layer over some tokens. Counters add up exactly, so the
/// statistics of two forwards are the sum of each one's.
package struct LayerRoutingCounters: Equatable, Sendable {
    package var tokens: Int64 = 0
    /// Tokens routed to each expert.
    package var expertTokenCounts: [Int64]
    /// Sum of the routing weight each expert's output was scaled by.
    package var expertWeightSums: [Double]
    /// histogram[n] = tokens that activated n experts, n in 0...E.
    package var expertsPerTokenHistogram: [Int64]
    /// Sum over tokens of the router's entropy (nats).
    package var entropySum: Double = 0
    /// Sum over tokens of the probability mass of the chosen experts.
    package var keptMassSum: Double = 0

    package init(numExperts: Int) {
        expertTokenCounts = Array(repeating: 0, count: numExperts)
        expertWeightSums = Array(repeating: 0, count: numExperts)
        expertsPerTokenHistogram = Array(repeating: 0, count: numExperts + 1)
    }

    package var numExperts: Int { expertTokenCounts.count }

    /// Back to no tokens, keeping the arrays (no allocation when they are not shared).
    package mutating func reset() {
        tokens = 0
        entropySum = 0
        keptMassSum = 0
        for e in expertTokenCounts.indices {
            expertTokenCounts[e] = 0
            expertWeightSums[e] = 0
        }
        for n in expertsPerTokenHistogram.indices { expertsPerTokenHistogram[n] = 0 }
    }

    /// Records one token's decision; `entropy` is that of its router probabilities (what
    /// `Elementwise.softmax` returns).
    @inline(__always)
    package mutating func record(probs: UnsafePointer<Float>, experts: UnsafePointer<Int32>, weights: UnsafePointer<Float>,
                                 count: Int, entropy: Double) {
        tokens += 1
        expertsPerTokenHistogram[count] += 1
        var kept: Double = 0
        for i in 0..<count {
            let e = Int(experts[i])
            expertTokenCounts[e] += 1
            expertWeightSums[e] += Double(weights[i])
            kept += Double(probs[e])
        }
        keptMassSum += kept
        entropySum += entropy
    }

    package mutating func add(_ other: LayerRoutingCounters) {
        tokens += other.tokens
        for e in 0..<numExperts {
            expertTokenCounts[e] += other.expertTokenCounts[e]
            expertWeightSums[e] += other.expertWeightSums[e]
        }
        for n in 0..<expertsPerTokenHistogram.count { expertsPerTokenHistogram[n] += other.expertsPerTokenHistogram[n] }
        entropySum += other.entropySum
        keptMassSum += other.keptMassSum
    }

    /// Total expert activations (sum of the histogram weighted by n).
    package var activations: Int64 { expertTokenCounts.reduce(0, +) }

    package var meanExpertsPerToken: Double { tokens > 0 ? Double(activations) / Double(tokens) : 0 }
    package var meanRouterEntropy: Double { tokens > 0 ? entropySum / Double(tokens) : 0 }
    package var meanKeptMass: Double { tokens > 0 ? keptMassSum / Double(tokens) : 0 }

    /// Busiest expert's load over the mean load (1 = perfectly balanced).
    package var loadMaxOverMean: Double {
        let mean = Double(activations) / Double(max(1, numExperts))
        guard mean > 0 else { return 0 }
        return Double(expertTokenCounts.max() ?? 0) / mean
    }

    /// Coefficient of variation of the per-expert loads (population standard deviation / mean).
    package var loadCoefficientOfVariation: Double {
        let n = Double(max(1, numExperts))
        let mean = Double(activations) / n
        guard mean > 0 else { return 0 }
        let variance = expertTokenCounts.reduce(0.0) { $0 + (Double($1) - mean) * (Double($1) - mean) } / n
        return variance.squareRoot() / mean
    }
}
