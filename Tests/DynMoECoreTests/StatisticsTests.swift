import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import DynMoECore

@Suite("Statistics")
struct StatisticsTests {
    func forward(_ model: Model, _ fixture: Fixture, _ plan: RoutingPlan = .native, trace: Bool = false,
                 observer: ((RoutingObservation) -> Void)? = nil) throws -> ForwardResult {
        try fixture.inputIds.withUnsafeBufferPointer { ids in
            try model.forward(tokens: ids.baseAddress!, batch: fixture.batch, length: fixture.length, routing: plan,
                              recordTrace: trace, observer: observer.map { ObserverClosure($0) }, logits: nil)
        }
    }

    @Test func accumulationOverTwoCallsIsTheSumAndResetZeroes() throws {
        let fixture = try Fixture("dynamic-moe-tiny")
        let model = try Model(directory: fixture.modelDirectory)
        let a = try forward(model, fixture).counters
        let b = try forward(model, fixture, RoutingPlan(.topK(k: 2))).counters
        let total = model.statistics.snapshot()
        for layer in fixture.moeLayers {
            var expected = a[layer]!
            expected.add(b[layer]!)
            #expect(total[layer]! == expected)
            #expect(total[layer]!.tokens == Int64(2 * fixture.batch * fixture.length))
        }
        model.statistics.reset()
        for layer in fixture.moeLayers {
            #expect(model.statistics.snapshot()[layer]!.tokens == 0)
            #expect(model.statistics.snapshot()[layer]!.expertTokenCounts.allSatisfy { $0 == 0 })
        }
    }

    @Test func activatedParametersMatchAHandCount() throws {
        // qwen2moe-tiny: hidden 32, 4 heads / 2 KV heads (head_dim 8), vocab 72, 6 experts of width 24,
        // shared expert of width 40, dense layer 1 of width 64, tied embeddings, native top-2.
        let fixture = try Fixture("qwen2moe-tiny")
        let model = try Model(directory: fixture.modelDirectory)
        let h = 32, kv = 16, v = 72
        let attention = h * h + kv * h + kv * h + h * h + (h + kv + kv)   // q, k, v, o + qkv biases
        let norms = 2 * h
        let expert = 3 * h * 24
        let shared = 3 * h * 40 + h                                       // + shared_expert_gate
        let router = 6 * h
        let dense = 3 * h * 64
        let moeLayer = attention + norms + router + shared
        let denseLayer = attention + norms + dense
        let total = v * h + h + 2 * (moeLayer + 6 * expert) + denseLayer  // embeddings tied with the LM head
        #expect(model.totalParameters == total)
        let snapshot = StatisticsSnapshot(model: model, counters: try forward(model, fixture).counters)
        let perToken = h + v * h + 2 * (moeLayer + 2 * expert) + denseLayer
        #expect(snapshot.activatedParametersPerToken == Double(perToken))
        #expect(abs(snapshot.activatedParameterFraction - Double(perToken) / Double(total)) < 1e-12)
    }

    @Test func observerSeesExactlyTheTraceSelections() throws {
        let fixture = try Fixture("olmoe-tiny")
        let model = try Model(directory: fixture.modelDirectory)
        var seen: [Int: [UInt8]] = [:]
        let result = try forward(model, fixture, RoutingPlan(.topP(threshold: 0.5)), trace: true) { o in
            var mask = [UInt8](repeating: 0, count: o.tokens * o.numExperts)
            for t in 0..<o.tokens { for j in 0..<Int(o.counts[t]) { mask[t * o.numExperts + Int(o.experts[t * o.stride + j])] = 1 } }
            seen[o.layer] = mask
        }
        #expect(Set(seen.keys) == Set(fixture.moeLayers))
        for layer in fixture.moeLayers { #expect(seen[layer]! == result.trace!.selected[layer]!) }
    }

    @Test func concurrentForwardsGiveTheSerialTotals() throws {
        let fixture = try Fixture("mixtral-tiny")
        let model = try Model(directory: fixture.modelDirectory)
        let serial = try forward(model, fixture).counters
        model.statistics.reset()
        let threads = 4, callsPerThread = 5
        final class Box: @unchecked Sendable { var failures = 0; let model: Model; let fixture: Fixture
            init(_ m: Model, _ f: Fixture) { model = m; fixture = f } }
        let box = Box(model, fixture)
        var ids: [pthread_t] = []
        for _ in 0..<threads {
            var tid = pthread_t()
            let arg = Unmanaged.passRetained(box).toOpaque()
            pthread_create(&tid, nil, { raw in
                let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
                for _ in 0..<5 {
                    do {
                        _ = try box.fixture.inputIds.withUnsafeBufferPointer { ids in
                            try box.model.forward(tokens: ids.baseAddress!, batch: box.fixture.batch, length: box.fixture.length, logits: nil)
                        }
                    } catch { box.failures += 1 }
                }
                return nil
            }, arg)
            ids.append(tid)
        }
        for t in ids { pthread_join(t, nil) }
        #expect(box.failures == 0)
        let total = model.statistics.snapshot()
        for layer in fixture.moeLayers {
            var expected = LayerRoutingCounters(numExperts: serial[layer]!.numExperts)
            for _ in 0..<(threads * callsPerThread) { expected.add(serial[layer]!) }
            #expect(total[layer]!.expertTokenCounts == expected.expertTokenCounts)
            #expect(total[layer]!.expertsPerTokenHistogram == expected.expertsPerTokenHistogram)
        }
    }

    @Test func snapshotJSONRoundTripsWithItsSchema() throws {
        let fixture = try Fixture("qwen3moe-tiny-bf16")
        let model = try Model(directory: fixture.modelDirectory)
        let counters = try forward(model, fixture).counters
        let snapshot = StatisticsSnapshot(model: model, counters: counters)
        let json = try JSONParser.parse(snapshot.json())
        #expect(json["schema"]?.stringValue == "dynmoe.stats")
        #expect(json["version"]?.intValue == 1)
        #expect(json["summary"]?["tokens"]?.intValue == Int64(fixture.batch * fixture.length))
        let layers = try #require(json["layers"]?.arrayValue)
        #expect(layers.count == model.numLayers)
        for layer in fixture.moeLayers {
            let l = layers[layer]
            #expect(l["expert_token_counts"]?.arrayValue?.map { $0.intValue! } == counters[layer]!.expertTokenCounts)
            #expect(l["experts_per_token_histogram"]?.arrayValue?.map { $0.intValue! } == counters[layer]!.expertsPerTokenHistogram)
            #expect(l["mean_experts_per_token"]?.doubleValue == counters[layer]!.meanExpertsPerToken)
        }
    }
}
