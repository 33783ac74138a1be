import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import DynMoECore

/// The definition of correct: every fixture run reproduces the reference implementations'
/// logits (within tolerance), hidden states, router probabilities, exact selections, weights,
/// statistics and greedy tokens.
@Suite("Reference fixtures")
struct FixtureTests {
    @Test(arguments: allRuns)
    func forwardMatchesReference(fixtureName: String, runName: String) throws {
        let fixture = try Fixture(fixtureName)
        let run = fixture.runs.first { $0.name == runName }!
        let model = try Model(directory: fixture.modelDirectory)
        #expect(model.config.moeLayers == fixture.moeLayers)
        let h = model.hiddenSize
        let (logits, result) = try traceForward(model, fixture, run)
        let trace = try #require(result.trace)

        let logitCmp = compare(logits, fixture.floats("\(run.name).logits")!)
        #expect(logitCmp.relL2 <= fixture.relL2Tolerance, "logits rel L2 \(logitCmp.relL2)")
        #expect(logitCmp.maxAbs <= fixture.maxAbsTolerance, "logits max abs \(logitCmp.maxAbs)")

        for layer in 0..<model.numLayers {
            let hidden = compare(trace.hidden[layer], fixture.floats("\(run.name).hidden.\(layer)")!)
            #expect(hidden.relL2 <= 1e-4 && trace.hidden[layer].count == fixture.batch * fixture.length * h,
                    "layer \(layer) hidden rel L2 \(hidden.relL2)")
        }
        for layer in fixture.moeLayers {
            let probs = compare(trace.routerProbs[layer]!, fixture.floats("\(run.name).router_probs.\(layer)")!)
            #expect(probs.maxAbs <= 1e-4, "layer \(layer) router probs max abs \(probs.maxAbs)")
            let expectedMask = fixture.integers("\(run.name).selected.\(layer)")!.map { UInt8($0) }
            #expect(trace.selected[layer]! == expectedMask, "layer \(layer) selections differ")
            let weights = compare(trace.weights[layer]!, fixture.floats("\(run.name).weights.\(layer)")!)
            #expect(weights.maxAbs <= 1e-4, "layer \(layer) weights max abs \(weights.maxAbs)")
        }

        // Statistics computed from this forward's counters.
        let stats = run.stats
        for layer in fixture.moeLayers {
            let expected = stats["per_layer"]!["\(layer)"]!
            let counters = try #require(result.counters[layer])
            #expect(counters.expertTokenCounts == expected["expert_token_counts"]!.arrayValue!.map { $0.intValue! })
            #expect(counters.expertsPerTokenHistogram == expected["experts_per_token_histogram"]!.arrayValue!.map { $0.intValue! })
            #expect(abs(counters.meanExpertsPerToken - expected["mean_experts_per_token"]!.doubleValue!) < 1e-6)
            // The fixtures hold no entropy; the router probabilities (checked above) define it.
            let e = counters.numExperts, probs = trace.routerProbs[layer]!.map(Double.init)
            let tokens = probs.count / e
            let entropy = (0..<tokens).map { t in
                -probs[t * e..<(t + 1) * e].reduce(0) { $1 > 0 ? $0 + $1 * log($1) : $0 }
            }.reduce(0, +) / Double(tokens)
            #expect(abs(counters.meanRouterEntropy - entropy) <= 1e-5, "layer \(layer) entropy \(counters.meanRouterEntropy) vs \(entropy)")
        }
        let layerCounters = fixture.moeLayers.map { result.counters[$0]! }
        let overall = layerCounters.map(\.meanExpertsPerToken).reduce(0, +) / Double(layerCounters.count)
        #expect(abs(overall - stats["mean_experts_per_token"]!.doubleValue!) < 1e-9)
    }

    @Test(arguments: allRuns.filter { name, run in (try? Fixture(name))!.runs.first { $0.name == run }!.greedySteps != nil })
    func greedyMatchesReference(fixtureName: String, runName: String) throws {
        let fixture = try Fixture(fixtureName)
        let run = fixture.runs.first { $0.name == runName }!
        let model = try Model(directory: fixture.modelDirectory)
        let steps = run.greedySteps!
        let sequences = try greedyByRepeatedForward(model: model, ids: fixture.inputIds, batch: fixture.batch,
                                                    steps: steps, routing: RoutingPlan(run.policy))
        let expected = fixture.integers("\(run.name).greedy")!
        let produced = sequences.flatMap { $0.suffix(steps).map { Int64($0) } }
        #expect(produced == expected)
    }
}

@Suite("Load options")
struct LoadOptionTests {
    @Test func lockedAndPrefetchedWeightsGiveTheSameLogits() throws {
        let fixture = try Fixture("olmoe-tiny")
        var options = LoadOptions()
        options.lockMemory = true
        options.prefetch = true
        options.threads = 1
        var progress: [Float] = []
        nonisolated(unsafe) var seen = [Float]()
        options.progress = { seen.append($0) }
        let model = try Model(directory: fixture.modelDirectory, options: options)
        progress = seen
        #expect(progress.last == 1 && progress.count == model.numLayers)
        var logits = [Float](repeating: 0, count: fixture.batch * fixture.length * model.vocabSize)
        _ = try fixture.inputIds.withUnsafeBufferPointer { t in
            try logits.withUnsafeMutableBufferPointer { l in
                try model.forward(tokens: t.baseAddress!, batch: fixture.batch, length: fixture.length, logits: l.baseAddress!)
            }
        }
        let cmp = compare(logits, fixture.floats("native.logits")!)
        #expect(cmp.relL2 <= fixture.relL2Tolerance && cmp.maxAbs <= fixture.maxAbsTolerance)
    }
}

@Suite("Working memory")
struct WorkingMemoryTests {
    /// A call whose scratch would exceed physical memory is refused before anything is allocated
    /// or any token is read.
    @Test func aCallTooLargeForMemoryIsAnErrorNotACrash() throws {
        let model = try Model(directory: try Fixture("mixtral-tiny").modelDirectory)
        let routing = try RoutingPlan.native.resolve(for: model.config)
        let perToken = ForwardPass.workingBytes(config: model.config, tokens: 1000, context: 1000, routing: routing, trace: false)! / 1000
        let length = 2 * Allocation.physicalMemory / perToken
        // The KV cache for that many positions is only reserved (calloc), never touched.
        let cache = try KVCache(layers: model.numLayers, sequences: 1, capacity: length,
                                kvHeads: model.config.numKVHeads, headDim: model.config.headDim)
        let tokens: [Int32] = [1, 2, 3]
        let error = #expect(throws: DynMoEError.self) {
            _ = try tokens.withUnsafeBufferPointer { t in
                try ForwardPass(model: model, cache: cache, workspace: Workspace())
                    .run(ForwardRequest(tokens: t.baseAddress!, batch: 1, length: length, routing: routing))
            }
        }
        #expect(error?.kind == .outOfMemory)
        #expect(error?.message.contains("split the batch") == true)
    }
}
