/// The routing rule itself, on one token's router probabilities.
package enum ExpertSelection {
    /// Picks experts for one token.
    /// - probs: softmax of the router logits, `numExperts` values.
    /// - order: scratch of `numExperts` Int32s.
    /// - experts / weights: receive the chosen experts in descending probability order and the
    ///   weight each one's output is scaled by.
    /// - Returns: how many experts were chosen.
    @discardableResult
    package static func select(probs: UnsafePointer<Float>, numExperts: Int, routing: ResolvedRouting,
                               order: UnsafeMutablePointer<Int32>,
                               experts: UnsafeMutablePointer<Int32>, weights: UnsafeMutablePointer<Float>) -> Int {
        sortDescending(probs, numExperts, order)
        let count: Int
        switch routing.rule {
        case .topK(let k):
            count = min(k, numExperts)
        case .topP(let threshold, let lo, let hi):
            // Shortest prefix whose cumulative sum is strictly greater than the threshold;
            // every expert if rounding keeps the sum from ever passing it.
            var cumulative: Float = 0
            var n = numExperts
            for i in 0..<numExperts {
                cumulative += probs[Int(order[i])]
                if cumulative > threshold { n = i + 1; break }
            }
            count = min(max(n, lo), hi)
        }
        var sum: Float = 0
        for i in 0..<count {
            experts[i] = order[i]
            weights[i] = probs[Int(order[i])]
            sum += weights[i]
        }
        if routing.renormalize && sum > 0 {
            for i in 0..<count { weights[i] /= sum }
        }
        return count
    }

    /// Indices by descending probability; equal probabilities keep the lower index first.
    /// Insertion sort: E is at most a few hundred and usually a few dozen.
    @inline(__always)
    static func sortDescending(_ probs: UnsafePointer<Float>, _ n: Int, _ order: UnsafeMutablePointer<Int32>) {
        for i in 0..<n {
            let p = probs[i]
            var j = i
            while j > 0 && probs[Int(order[j - 1])] < p {
                order[j] = order[j - 1]
                j -= 1
            }
            order[j] = Int32(i)
        }
    }
}
