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
package struct Sampler {
    let options: SamplingOptions
    private var state: (UInt64, UInt64, UInt64, UInt64)

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
        if options.temperature == 0 { return Sampler.argmax(logits, n) }
        var candidates = (0..<n).map { (index: $0, logit: logits[$0]) }
        candidates.sort { $0.logit > $1.logit || ($0.logit == $1.logit && $0.index < $1.index) }
        if options.topK > 0 && options.topK < n { candidates.removeLast(n - options.topK) }
        let maxLogit = Double(candidates[0].logit)
        var probs = candidates.map { exp((Double($0.logit) - maxLogit) / Double(options.temperature)) }
        var total = probs.reduce(0, +)
        if options.topP < 1 {
            var cumulative = 0.0
            var keep = probs.count
            for i in probs.indices {
                cumulative += probs[i] / total
                if cumulative > Double(options.topP) { keep = i + 1; break }
            }
            probs.removeLast(probs.count - keep)
            total = probs.reduce(0, +)
        }
        var r = nextUniform() * total
        for i in probs.indices {
            r -= probs[i]
            if r < 0 { return candidates[i].index }
        }
        return candidates[probs.count - 1].index
    }
}
