#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import DynMoECore

/// The token sampler against its definition: tokens rank by logit (lower index first on ties);
/// temperature sampling draws from softmax(logits / T) over the top k, then over the shortest
/// ranked prefix holding more than top_p of their probability. Expected sets and probabilities
/// are computed here by brute force (a full sort), independently of the sampler's partial one.
@Suite("Sampler")
struct SamplerTests {
    /// Deterministic pseudo-random logits.
    static func logits(_ n: Int, seed: UInt64, spread: Float) -> [Float] {
        var x = seed
        return (0..<n).map { _ in
            x = x &* 6364136223846793005 &+ 1442695040888963407
            return (Float(x >> 40) / Float(1 << 24) - 0.5) * spread
        }
    }

    /// The kept tokens and their probabilities by definition.
    static func expected(_ logits: [Float], temperature: Float, topK: Int, topP: Float) -> [Int: Double] {
        var order = Array(logits.indices)
        order.sort { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
        if topK > 0 && topK < order.count { order = Array(order.prefix(topK)) }
        let top = Double(logits[order[0]])
        var weights = order.map { exp((Double(logits[$0]) - top) / Double(temperature)) }
        if topP < 1 {
            let total = weights.reduce(0, +)
            var cumulative = 0.0
            for (i, w) in weights.enumerated() {
                cumulative += w
                if cumulative > Double(topP) * total { weights = Array(weights.prefix(i + 1)); break }
            }
        }
        let total = weights.reduce(0, +)
        var out: [Int: Double] = [:]
        for (i, w) in weights.enumerated() { out[order[i]] = w / total }
        return out
    }

    static func draw(_ logits: [Float], _ options: SamplingOptions, times: Int) -> [Int: Int] {
        var sampler = Sampler(options)
        var counts: [Int: Int] = [:]
        logits.withUnsafeBufferPointer { l in
            for _ in 0..<times { counts[sampler.sample(l.baseAddress!, l.count), default: 0] += 1 }
        }
        return counts
    }

    static func options(temperature: Float, topK: Int = 0, topP: Float = 1, seed: UInt64 = 7) -> SamplingOptions {
        var o = SamplingOptions()
        o.temperature = temperature
        o.topK = topK
        o.topP = topP
        o.seed = seed
        return o
    }

    @Test(arguments: [(0, Float(1)), (3, 1), (0, 0.5), (4, 0.6), (0, 0.95)])
    func drawsFollowTheDefinitionOnASmallVocabulary(topK: Int, topP: Float) {
        let logits: [Float] = [2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 1.0, -0.5]
        let want = Self.expected(logits, temperature: 0.7, topK: topK, topP: topP)
        let times = 40_000
        let got = Self.draw(logits, Self.options(temperature: 0.7, topK: topK, topP: topP), times: times)
        #expect(Set(got.keys).isSubset(of: Set(want.keys)), "drew \(got.keys.sorted()), allowed \(want.keys.sorted())")
        for (token, p) in want {
            let f = Double(got[token] ?? 0) / Double(times)
            #expect(abs(f - p) < 0.01, "token \(token): frequency \(f), probability \(p)")
        }
    }

    /// A nucleus far wider than the first 64 ranks (flat logits over 3,000 tokens), and a
    /// narrow one among them: the draws stay inside exactly the expected set.
    @Test(arguments: [Float(0.9), 0.3, 0.02])
    func nucleusOfALargeVocabularyIsExact(topP: Float) {
        let logits = Self.logits(3_000, seed: 3, spread: 6)
        let want = Self.expected(logits, temperature: 1, topK: 0, topP: topP)
        let times = 2_000
        let got = Self.draw(logits, Self.options(temperature: 1, topP: topP), times: times)
        #expect(Set(got.keys).isSubset(of: Set(want.keys)), "\(want.count) tokens in the nucleus")
        if want.count <= 30 { #expect(Set(got.keys) == Set(want.keys), "nucleus \(want.keys.sorted()), drawn \(got.keys.sorted())") }
        let best = want.max { $0.value < $1.value }!
        let f = Double(got[best.key] ?? 0) / Double(times)
        #expect(abs(f - best.value) < 4 * (best.value / Double(times)).squareRoot() + 1e-3, "best token \(f) vs \(best.value)")
    }

    @Test func topKKeepsTheKBestWithTiesToTheLowerIndex() {
        let equal = [Float](repeating: 0.25, count: 50)
        let got = Self.draw(equal, Self.options(temperature: 1, topK: 3), times: 3_000)
        #expect(Set(got.keys) == [0, 1, 2])
        let logits = Self.logits(2_000, seed: 11, spread: 4)
        let want = Self.expected(logits, temperature: 2, topK: 40, topP: 1)
        let drawn = Self.draw(logits, Self.options(temperature: 2, topK: 40), times: 4_000)
        #expect(Set(drawn.keys).isSubset(of: Set(want.keys)))
        #expect(drawn.count > 30, "only \(drawn.count) of the 40 candidates drawn")
    }

    @Test func greedyAndTopOneAreTheFirstArgmax() {
        let logits: [Float] = [1, 5, 2, 5, -3]
        #expect(Self.draw(logits, Self.options(temperature: 0), times: 10) == [1: 10])
        #expect(Self.draw(logits, Self.options(temperature: 3, topK: 1), times: 10) == [1: 10])
    }

    @Test func theSameSeedGivesTheSameTokensAndAnotherSeedOthers() {
        let logits = Self.logits(1_000, seed: 5, spread: 3)
        func run(_ seed: UInt64) -> [Int] {
            var sampler = Sampler(Self.options(temperature: 1, topP: 0.9, seed: seed))
            return logits.withUnsafeBufferPointer { l in (0..<50).map { _ in sampler.sample(l.baseAddress!, l.count) } }
        }
        #expect(run(1) == run(1))
        #expect(run(1) != run(2))
    }

    @Test(arguments: [1, 2, 63, 64, 65, 1_000])
    func rankTopOrdersTheBestFirst(m: Int) {
        var logits = Self.logits(1_000, seed: 9, spread: 2)
        for i in stride(from: 0, to: 1_000, by: 97) { logits[i] = 0.5 }  // ties
        var want = Array(logits.indices)
        want.sort { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
        var out = [Int32](repeating: -1, count: m)
        logits.withUnsafeBufferPointer { l in
            out.withUnsafeMutableBufferPointer { Sampler.rankTop(m, l.baseAddress!, l.count, into: $0.baseAddress!) }
        }
        #expect(out.map(Int.init) == Array(want.prefix(m)))
    }
}
