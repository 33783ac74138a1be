#if canImport(Glibc)
import Glibc
#endif

/// Token sampling settings (not expert routing).
package struct SamplingOptions: Sendable {
    /// 0 = greedy.
    package var temperature: Float = 0
    /// 0 = no top-k cut.
    package var topK: Int = 0
    /// 1 = no nucleus cut.
    package var topP: Float = 1
    package var seed: UInt64 = 0

    package init() {}

    package func validate() throws(DynMoEError) {
        guard temperature.isFinite, temperature >= 0 else { throw .invalidArgument("sampling: temperature \(temperature) must be finite and >= 0") }
        guard topK >= 0 else { throw .invalidArgument("sampling: top_k \(topK) must be >= 0") }
        guard topP.isFinite, topP > 0, topP <= 1 else { throw .invalidArgument("sampling: top_p \(topP) must be in (0, 1]") }
    }
}

/// Picks the next token from logits. Deterministic for a given seed (xoshiro256** generator).
///
/// Tokens rank by logit, then by index on ties. Temperature sampling draws token i with
/// probability proportional to exp((logit_i - max) / temperature) among the candidates: the
/// top_k best when top_k is set, then, when top_p < 1, the shortest prefix of them (by rank)
/// whose share of the candidates' probability is greater than top_p. Nothing is sorted that
/// need not be: the top k come from a heap of k, and the nucleus from a quickselect that finds
/// its last rank in linear time; the draw walks the kept tokens in whatever order that leaves
/// (index order when nothing is cut). A full sort of a 32,000-token vocabulary for every token
/// took ~4.5 ms, half a decode step of the benchmark model. Buffers are kept between tokens, so
/// sampling allocates nothing once they have grown.
package struct Sampler {
    let options: SamplingOptions
    private var state: (UInt64, UInt64, UInt64, UInt64)
    /// Candidate token ids.
    private var candidates: [Int32] = []
    /// Unnormalised probability of each token (valid for the candidates).
    private var weights: [Float] = []

    package init(_ options: SamplingOptions) {
        self.options = options
        var s = options.seed
        func splitmix(_ x: inout UInt64) -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        state = (splitmix(&s), splitmix(&s), splitmix(&s), splitmix(&s))
    }

    private mutating func nextUniform() -> Double {
        func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }
        let result = rotl(state.1 &* 5, 7) &* 9
        let t = state.1 << 17
        state.2 ^= state.0
        state.3 ^= state.1
        state.1 ^= state.2
        state.0 ^= state.3
        state.2 ^= t
        state.3 = rotl(state.3, 45)
        return Double(result >> 11) * 0x1p-53
    }

    /// Index of the largest logit, the first one on ties (as argmax in the references).
    package static func argmax(_ logits: UnsafePointer<Float>, _ n: Int) -> Int {
        var best = 0
        for i in 1..<max(1, n) where logits[i] > logits[best] { best = i }
        return best
    }

    package mutating func sample(_ logits: UnsafePointer<Float>, _ n: Int) -> Int {
        if options.temperature == 0 || options.topK == 1 || n <= 1 { return Sampler.argmax(logits, n) }
        if weights.count < n { weights = [Float](repeating: 0, count: n) }
        if candidates.count < n { candidates = [Int32](repeating: 0, count: n) }
        let maxLogit = logits[Sampler.argmax(logits, n)]
        let inverseTemperature = 1 / options.temperature
        let topK = options.topK > 0 && options.topK < n ? options.topK : 0, topP = options.topP
        let uniform = nextUniform()
        return weights.withUnsafeMutableBufferPointer { w in
            candidates.withUnsafeMutableBufferPointer { c in
                let w = w.baseAddress!, c = c.baseAddress!
                func weigh(_ t: Int32) -> Double {
                    w[Int(t)] = expf((logits[Int(t)] - maxLogit) * inverseTemperature)
                    return Double(w[Int(t)])
                }
                var count = n, total = 0.0
                if topK > 0 {
                    Sampler.rankTop(topK, logits, n, into: c)
                    count = topK
                    for i in 0..<count { total += weigh(c[i]) }
                } else {
                    // Every token weighs in: one pass of the vector exp (within 2 ulp of expf)
                    // instead of an expf call per token of the vocabulary.
                    for t in 0..<n {
                        c[t] = Int32(t)
                        w[t] = (logits[t] - maxLogit) * inverseTemperature
                    }
                    _ = Elementwise.expShiftedSum(w, n)
                    for t in 0..<n { total += Double(w[t]) }
                }
                if topP < 1 {
                    let target = Double(topP) * total
                    (count, total) = topK > 0 ? Sampler.rankedNucleus(c, count, w, target: target)
                                              : Sampler.nucleus(c, count, w, logits, target: target)
                }
                var u = uniform * total
                for i in 0..<count {
                    u -= Double(w[Int(c[i])])
                    if u < 0 { return Int(c[i]) }
                }
                return Int(c[count - 1])  // rounding left the draw past the last weight
            }
        }
    }

    /// The shortest prefix of `ranked[0..<count]` (best first) whose weight exceeds `target`:
    /// its length and weight (all of them if rounding keeps the sum from getting there).
    static func rankedNucleus(_ ranked: UnsafeMutablePointer<Int32>, _ count: Int, _ w: UnsafePointer<Float>,
                              target: Double) -> (count: Int, weight: Double) {
        var cumulative = 0.0
        for i in 0..<count {
            cumulative += Double(w[Int(ranked[i])])
            if cumulative > target { return (i + 1, cumulative) }
        }
        return (count, cumulative)
    }

    /// The nucleus of the unordered candidates `c[0..<count]`: reorders them so that the kept
    /// tokens come first and returns their number and weight. A quickselect on rank: each round
    /// splits the undecided range around a pivot and keeps the side where the cumulative weight
    /// (in rank order) crosses `target`; expected linear time.
    static func nucleus(_ c: UnsafeMutablePointer<Int32>, _ count: Int, _ w: UnsafePointer<Float>,
                        _ logits: UnsafePointer<Float>, target: Double) -> (count: Int, weight: Double) {
        func better(_ a: Int32, _ b: Int32) -> Bool { ranksAbove(a, b, logits) }
        func swap(_ i: Int, _ j: Int) { exchange(c, i, j) }
        // c[0..<lo] are kept and weigh `above`; c[hi..<count] are cut; c[lo..<hi] undecided.
        var lo = 0, hi = count, above = 0.0
        while hi - lo > 1 {
            // Median of three as the pivot, moved to the front of the range.
            let mid = lo + (hi - lo) / 2
            if better(c[mid], c[lo]) { swap(mid, lo) }
            if better(c[hi - 1], c[lo]) { swap(hi - 1, lo) }
            if better(c[hi - 1], c[mid]) { swap(hi - 1, mid) }
            swap(lo, mid)  // the median of the three
            let pivot = c[lo]
            var split = lo + 1, betterWeight = 0.0
            for i in (lo + 1)..<hi where better(c[i], pivot) {
                betterWeight += Double(w[Int(c[i])])
                swap(i, split)
                split += 1
            }
            swap(lo, split - 1)  // pivot between the better and the worse: c[split - 1]
            let withPivot = above + betterWeight + Double(w[Int(pivot)])
            if above + betterWeight > target {
                hi = split - 1
            } else if withPivot > target {
                return (split, withPivot)
            } else {
                above = withPivot
                lo = split
            }
        }
        if lo < hi { return (lo + 1, above + Double(w[Int(c[lo])])) }
        return (lo == count ? count : max(lo, 1), above)
    }

    /// Writes the m best tokens (by logit, then lower index), best first, to `out[0..<m]`: a heap
    /// of the m best seen so far with the worst on top, then sorted in place.
    static func rankTop(_ m: Int, _ logits: UnsafePointer<Float>, _ n: Int, into out: UnsafeMutablePointer<Int32>) {
        func better(_ a: Int32, _ b: Int32) -> Bool { ranksAbove(a, b, logits) }
        func swap(_ i: Int, _ j: Int) { exchange(out, i, j) }
        func siftDown(_ start: Int, _ count: Int) {
            var i = start
            while true {
                let left = 2 * i + 1
                if left >= count { return }
                var worst = left
                if left + 1 < count && better(out[worst], out[left + 1]) { worst = left + 1 }
                if !better(out[i], out[worst]) { return }
                swap(i, worst)
                i = worst
            }
        }
        for t in 0..<m { out[t] = Int32(t) }
        for i in stride(from: m / 2 - 1, through: 0, by: -1) { siftDown(i, m) }
        for t in m..<n where better(Int32(t), out[0]) {
            out[0] = Int32(t)
            siftDown(0, m)
        }
        // Moving the worst to the back, m - 1 times, leaves the heap sorted best first.
        for end in stride(from: m - 1, to: 0, by: -1) {
            swap(0, end)
            siftDown(0, end)
        }
    }

    /// The rank order: token a before token b when its logit is larger, or equal with a lower index.
    @inline(__always)
    static func ranksAbove(_ a: Int32, _ b: Int32, _ logits: UnsafePointer<Float>) -> Bool {
        let la = logits[Int(a)], lb = logits[Int(b)]
        return la > lb || (la == lb && a < b)
    }

    @inline(__always)
    static func exchange(_ p: UnsafeMutablePointer<Int32>, _ i: Int, _ j: Int) {
        let t = p[i]; p[i] = p[j]; p[j] = t
    }
}
