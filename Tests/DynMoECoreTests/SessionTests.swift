#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import DynMoECore

/// Incremental decoding must reproduce the full forward: prefill a prefix, then decode token by
/// token, and compare every position's logits with one forward over the whole sequence.
@Suite("Sessions")
struct SessionTests {
    static let routings: [RoutingPolicy] = [.native, .topP(threshold: 0.5)]

    @Test(arguments: fixtureNames, [0, 1])
    func prefillThenDecodeMatchesFullForward(fixtureName: String, routingIndex: Int) throws {
        let fixture = try Fixture(fixtureName)
        let model = try Model(directory: fixture.modelDirectory)
        let plan = RoutingPlan(Self.routings[routingIndex])
        let (b, t, v) = (fixture.batch, fixture.length, model.vocabSize)
        var full = [Float](repeating: 0, count: b * t * v)
        _ = try fixture.inputIds.withUnsafeBufferPointer { ids in
            try full.withUnsafeMutableBufferPointer { l in
                try model.forward(tokens: ids.baseAddress!, batch: b, length: t, routing: plan, logits: l.baseAddress!)
            }
        }
        var options = SessionOptions()
        options.sequences = b
        options.capacity = t
        options.routing = plan
        let session = try Session(model: model, options: options)
        let incremental = try prefillHalfThenDecode(session, fixture)
        #expect(session.position == t)
        let cmp = compare(incremental, full)
        #expect(cmp.relL2 <= fixture.relL2Tolerance && cmp.maxAbs <= fixture.maxAbsTolerance, "rel L2 \(cmp.relL2), max abs \(cmp.maxAbs)")
    }

    @Test func rewindThenDecodeReproducesLogits() throws {
        let fixture = try Fixture("qwen3moe-tiny-bf16")
        let model = try Model(directory: fixture.modelDirectory)
        var options = SessionOptions()
        options.sequences = fixture.batch
        let session = try Session(model: model, options: options)
        let t = fixture.length, v = model.vocabSize
        func evalColumn(_ p: Int) throws -> [Float] {
            let ids = (0..<fixture.batch).map { fixture.inputIds[$0 * t + p] }
            var logits = [Float](repeating: 0, count: fixture.batch * v)
            _ = try ids.withUnsafeBufferPointer { i in
                try logits.withUnsafeMutableBufferPointer { try session.evaluate(tokens: i.baseAddress!, length: 1, logits: $0.baseAddress!, logitRows: .last) }
            }
            return logits
        }
        var first: [[Float]] = []
        for p in 0..<8 { first.append(try evalColumn(p)) }
        try session.rewind(to: 5)
        #expect(session.position == 5)
        for p in 5..<8 { #expect(try evalColumn(p) == first[p]) }
        #expect(throws: DynMoEError.self) { try session.rewind(to: 9) }
    }

    /// A session reuses its routing counters and a per-call plan's resolution from call to call
    /// (so decode steps allocate nothing); each call must still report its own counters under
    /// its own plan, and a result kept from an earlier call must not change.
    @Test func eachCallCountsItsOwnRoutingUnderItsOwnPlan() throws {
        let fixture = try Fixture("qwen3moe-tiny-bf16")
        let model = try Model(directory: fixture.modelDirectory)
        let session = try Session(model: model)
        let moeLayer = try #require(model.config.moeLayers.first)
        let plans = [RoutingPlan(.topK(k: 1)), RoutingPlan(.topK(k: 3)), nil, RoutingPlan(.topK(k: 1)),
                     RoutingPlan(.topK(k: 2), layers: [moeLayer: .topK(k: 4)])]
        var kept: [ForwardResult] = []
        for (step, plan) in plans.enumerated() {
            let ids: [Int32] = [Int32(step + 1), Int32(step + 2)]
            let length = step == 0 ? 2 : 1
            let result = try ids.withUnsafeBufferPointer {
                try session.evaluate(tokens: $0.baseAddress!, length: length, routing: plan, logits: nil, logitRows: .last)
            }
            for l in model.config.moeLayers {
                let counters = try #require(result.counters[l])
                guard case .topK(let nativeK, _) = model.config.nativeRouting else { Issue.record("top-k family expected"); return }
                var k = nativeK
                if case .topK(let n, _) = (plan ?? RoutingPlan(.native)).policy(forLayer: l) { k = n }
                #expect(counters.tokens == Int64(length), "step \(step), layer \(l)")
                #expect(counters.activations == Int64(k * length), "step \(step), layer \(l)")
                #expect(counters.expertsPerTokenHistogram[k] == Int64(length), "step \(step), layer \(l)")
            }
            kept.append(result)
        }
        // The first call's counters, read after four more calls reused the session's counters.
        for l in model.config.moeLayers {
            #expect(kept[0].counters[l]?.tokens == 2)
            #expect(kept[0].counters[l]?.activations == 2)
        }
    }

    /// A KV cache of f16 or bf16 changes each key and value by at most half a unit in the last
    /// place, so the logits stay within a few units of roundoff of the reference (relative L2 at
    /// most 10 u: 4.9e-3 for f16, 3.9e-2 for bf16), prefill and token-by-token decode alike.
    @Test(arguments: fixtureNames, [DType.f16, .bf16])
    func reducedPrecisionKVCacheStaysCloseToReference(fixtureName: String, element: DType) throws {
        let fixture = try Fixture(fixtureName)
        let model = try Model(directory: fixture.modelDirectory)
        var options = SessionOptions()
        options.sequences = fixture.batch
        options.capacity = fixture.length
        options.kvDType = element
        let session = try Session(model: model, options: options)
        #expect(session.cache.element == element)
        let logits = try prefillHalfThenDecode(session, fixture)
        let cmp = compare(logits, fixture.floats("\(fixture.runs[0].name).logits")!)
        #expect(cmp.relL2 <= 10 * unitRoundoff(element), "\(fixtureName) \(element): rel L2 \(cmp.relL2), max abs \(cmp.maxAbs)")
    }

    /// Under a memory budget, a half-precision cache holds twice the positions; other element
    /// types are refused.
    @Test func kvCacheElementTypeSetsCapacityUnderABudget() throws {
        let model = try Model(directory: try Fixture("olmoe-tiny").modelDirectory)
        let cfg = model.config
        let budget = 1000 * 2 * cfg.numLayers * cfg.kvDim * 4 + 123  // 1000 positions of f32
        var capacities: [DType: Int] = [:]
        for element in KVCache.elementTypes {
            var options = SessionOptions()
            options.memoryBudget = budget
            options.capacity = 0
            options.kvDType = element
            capacities[element] = try Session(model: model, options: options).capacity
        }
        #expect(capacities[.f32] == min(1000, cfg.maxPositions))
        #expect(capacities[.f16] == min(2000, cfg.maxPositions))
        #expect(capacities[.bf16] == min(2000, cfg.maxPositions))
        var options = SessionOptions()
        options.kvDType = .i32
        let error = #expect(throws: DynMoEError.self) { _ = try Session(model: model, options: options) }
        #expect(error?.kind == .invalidArgument)
        #expect(error?.message.contains("F16") == true)
    }

    @Test func contextFullIsAnErrorAndLeavesTheSessionUsable() throws {
        let model = try Model(directory: try Fixture("mixtral-tiny").modelDirectory)
        var options = SessionOptions()
        options.capacity = 4
        let session = try Session(model: model, options: options)
        let ids: [Int32] = [1, 2, 3, 4, 5]
        let error = #expect(throws: DynMoEError.self) {
            _ = try ids.withUnsafeBufferPointer { try session.evaluate(tokens: $0.baseAddress!, length: 5, logits: nil, logitRows: .last) }
        }
        #expect(error?.kind == .contextFull)
        #expect(session.position == 0)
        _ = try ids.withUnsafeBufferPointer { try session.evaluate(tokens: $0.baseAddress!, length: 4, logits: nil, logitRows: .last) }
        #expect(session.position == 4)
    }

    @Test func greedyThroughSessionMatchesReference() throws {
        for name in fixtureNames {
            let fixture = try Fixture(name)
            let model = try Model(directory: fixture.modelDirectory)
            for run in fixture.runs {
                guard let steps = run.greedySteps else { continue }
                var options = SessionOptions()
                options.sequences = fixture.batch
                options.routing = RoutingPlan(run.policy)
                let session = try Session(model: model, options: options)
                let produced = try fixture.inputIds.withUnsafeBufferPointer { ids in
                    try session.generate(prompt: ids.baseAddress!, promptLength: fixture.length, maxNewTokens: steps,
                                         sampling: SamplingOptions(), stopTokens: [], routing: nil, observer: nil) { _, _ in true }
                }
                #expect(produced.flatMap { $0.map(Int64.init) } == fixture.integers("\(run.name).greedy")!, "\(name) \(run.name)")
            }
        }
    }

    @Test func samplingWithASeedIsReproducible() throws {
        let fixture = try Fixture("olmoe-tiny")
        let model = try Model(directory: fixture.modelDirectory)
        func sample(seed: UInt64) throws -> [[Int32]] {
            let session = try Session(model: model)
            var sampling = SamplingOptions()
            sampling.temperature = 1.0
            sampling.topK = 20
            sampling.topP = 0.95
            sampling.seed = seed
            let prompt = Array(fixture.inputIds.prefix(fixture.length))
            return try prompt.withUnsafeBufferPointer { p in
                try session.generate(prompt: p.baseAddress!, promptLength: prompt.count, maxNewTokens: 12, sampling: sampling,
                                     stopTokens: [], routing: nil, observer: nil) { _, _ in true }
            }
        }
        #expect(try sample(seed: 7) == sample(seed: 7))
        let distinct = Set(try (1...4).map { try sample(seed: $0) })
        #expect(distinct.count > 1)
    }

    @Test func concurrentUseOfOneSessionIsRefusedNotCorrupting() throws {
        let fixture = try Fixture("mixtral-tiny")
        let model = try Model(directory: fixture.modelDirectory)
        let session = try Session(model: model)
        let ids: [Int32] = [3, 4, 5]
        var sawBusy = false
        // Re-enter the session from inside its own observer: the same situation as a second thread.
        _ = try ids.withUnsafeBufferPointer { p in
            try session.evaluate(tokens: p.baseAddress!, length: 3, observer: ObserverClosure { _ in
                do { try session.rewind(to: 0) } catch { sawBusy = (error as? DynMoEError)?.kind == .busy }
            }, logits: nil, logitRows: .last)
        }
        #expect(sawBusy)
        #expect(session.position == 3)
    }
}

/// Sessions on one model decoding on different threads at once give what they give serially.
@Suite("Concurrent sessions")
struct ConcurrentSessionTests {
    final class Job: @unchecked Sendable {
        let model: Model
        let prompt: [Int32]
        let routing: RoutingPlan
        var tokens: [[Int32]] = []
        var failure: String?
        init(model: Model, prompt: [Int32], routing: RoutingPlan) { self.model = model; self.prompt = prompt; self.routing = routing }

        func run() {
            do {
                var options = SessionOptions()
                options.routing = routing
                let session = try Session(model: model, options: options)
                tokens = try prompt.withUnsafeBufferPointer { p in
                    try session.generate(prompt: p.baseAddress!, promptLength: prompt.count, maxNewTokens: 24,
                                         sampling: SamplingOptions(), stopTokens: [], routing: nil, observer: nil) { _, _ in true }
                }
            } catch { failure = "\(error)" }
        }
    }

    @Test func twoThreadsDecodingDifferentSessionsMatchSerialRuns() throws {
        let fixture = try Fixture("qwen3moe-tiny-bf16")
        let model = try Model(directory: fixture.modelDirectory)
        let prompts = [Array(fixture.inputIds.prefix(fixture.length)), Array(fixture.inputIds.suffix(fixture.length))]
        let routings = [RoutingPlan(.topP(threshold: 0.5)), RoutingPlan(.native)]
        let serial = zip(prompts, routings).map { Job(model: model, prompt: $0, routing: $1) }
        serial.forEach { $0.run() }
        let parallel = zip(prompts, routings).map { Job(model: model, prompt: $0, routing: $1) }
        var threads: [pthread_t] = []
        for job in parallel {
            var thread = pthread_t()
            pthread_create(&thread, nil, { raw in
                Unmanaged<Job>.fromOpaque(raw!).takeRetainedValue().run()
                return nil
            }, Unmanaged.passRetained(job).toOpaque())
            threads.append(thread)
        }
        threads.forEach { pthread_join($0, nil) }
        for (s, p) in zip(serial, parallel) {
            #expect(s.failure == nil && p.failure == nil)
            #expect(p.tokens == s.tokens && s.tokens[0].count == 24)
        }
    }
}

/// Logits [B, T, V] of the fixture's prompt through `session`: the first half of the positions
/// as one prefill call, then one position per call.
private func prefillHalfThenDecode(_ session: Session, _ fixture: Fixture) throws -> [Float] {
    let (b, t, v) = (fixture.batch, fixture.length, session.model.vocabSize)
    let prefix = t / 2
    var logits = [Float](repeating: .nan, count: b * t * v)
    var chunk = (0..<b).flatMap { s in fixture.inputIds[(s * t)..<(s * t + prefix)] }
    var out = [Float](repeating: 0, count: b * prefix * v)
    _ = try chunk.withUnsafeBufferPointer { ids in
        try out.withUnsafeMutableBufferPointer { l in
            try session.evaluate(tokens: ids.baseAddress!, length: prefix, logits: l.baseAddress!, logitRows: .all)
        }
    }
    for s in 0..<b { for p in 0..<prefix { for i in 0..<v { logits[(s * t + p) * v + i] = out[(s * prefix + p) * v + i] } } }
    for p in prefix..<t {
        chunk = (0..<b).map { s in fixture.inputIds[s * t + p] }
        var step = [Float](repeating: 0, count: b * v)
        _ = try chunk.withUnsafeBufferPointer { ids in
            try step.withUnsafeMutableBufferPointer { l in
                try session.evaluate(tokens: ids.baseAddress!, length: 1, logits: l.baseAddress!, logitRows: .last)
            }
        }
        for s in 0..<b { for i in 0..<v { logits[(s * t + p) * v + i] = step[s * v + i] } }
    }
    return logits
}
