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
        let count: Int
        switch routing.rule {
        case .topK(let k):
            count = min(k, numExperts)
            sortDescending(probs, numExperts, order, keeping: count)
        case .topP(let threshold, let lo, let hi):
            // Shortest prefix whose cumulative sum is strictly greater than the threshold;
            // every expert if rounding keeps the sum from ever passing it. The first
            // `likelyPrefix` (at least `lo`) places are sorted first, the whole order only when
            // the prefix runs past them, so the clamped count always falls in sorted places.
            let sorted = min(max(likelyPrefix, lo), numExperts)
            sortDescending(probs, numExperts, order, keeping: sorted)
            var cumulative: Float = 0
            var n = numExperts
            for i in 0..<numExperts {
                if i == sorted { sortDescending(probs, numExperts, order, keeping: numExperts) }
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

    /// Places sorted before top-p looks further: most tokens need fewer experts than this.
    static let likelyPrefix = 8

    /// The first `keep` places of the indices by descending probability (equal probabilities keep
    /// the lower index first) into order[0..<keep]: an insertion sort that drops what falls
    /// beyond `keep`, so most probabilities cost one comparison with the last kept one (a full
    /// sort of 64 router probabilities was most of the selection's time, which every decode step
    /// spends between its parallel regions). E is at most a few hundred.
    @inline(__always)
    static func sortDescending(_ probs: UnsafePointer<Float>, _ n: Int, _ order: UnsafeMutablePointer<Int32>,
                               keeping keep: Int) {
        guard keep > 0 else { return }
        var kept = 0
        for i in 0..<n {
            let p = probs[i]
            if kept == keep && !(probs[Int(order[keep - 1])] < p) { continue }
            var j = kept == keep ? keep - 1 : kept
            while j > 0 && probs[Int(order[j - 1])] < p {
                order[j] = order[j - 1]
                j -= 1
            }
            order[j] = Int32(i)
            kept = min(kept + 1, keep)
        }
    }
}
