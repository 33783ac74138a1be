import Testing
@testable import DynMoECore

/// Where the reference fixtures live (a copy of ../shared/fixtures, README included).
let fixturesDirectory: String = {
    var path = #filePath
    for _ in 0..<2 { path = String(path[..<path.lastIndex(of: "/")!]) }
    return path + "/Fixtures"
}()

let fixtureNames = ["dynamic-moe-tiny", "mixtral-tiny", "olmoe-tiny", "qwen2moe-tiny", "qwen3moe-tiny-bf16"]

/// One fixture: its checkpoint, reference.json and reference.safetensors.
struct Fixture {
    let name: String
    let json: JSONValue
    let reference: SafeTensorsFile
    let inputIds: [Int32]
    let batch: Int
    let length: Int

    var modelDirectory: String { "\(fixturesDirectory)/\(name)/model" }

    init(_ name: String) throws {
        self.name = name
        json = try Checkpoint.parseJSONFile("\(fixturesDirectory)/\(name)/reference.json", limit: Checkpoint.maxIndexBytes)
        reference = try SafeTensorsFile(path: "\(fixturesDirectory)/\(name)/reference.safetensors")
        let ids = json["input_ids"]!.arrayValue!
        batch = ids.count
        length = ids[0].arrayValue!.count
        inputIds = ids.flatMap { $0.arrayValue!.map { Int32($0.intValue!) } }
    }

    var runs: [Run] { json["runs"]!.arrayValue!.map { Run(json: $0) } }
    var moeLayers: [Int] { json["moe_layers"]!.arrayValue!.map { Int($0.intValue!) } }
    var relL2Tolerance: Double { json["tolerance"]!["logits_rel_l2"]!.doubleValue! }
    var maxAbsTolerance: Double { json["tolerance"]!["logits_max_abs"]!.doubleValue! }

    func floats(_ tensor: String) -> [Float]? { reference.tensor(tensor)?.floats() }
    func integers(_ tensor: String) -> [Int64]? { reference.tensor(tensor)?.integers() }
}

struct Run {
    let json: JSONValue
    var name: String { json["name"]!.stringValue! }
    var greedySteps: Int? { json["greedy_steps"]?.intValue.map { Int($0) } }

    /// The run's routing as an engine policy.
    var policy: RoutingPolicy {
        let r = json["routing"]!
        func optInt(_ k: String) -> Int? { r[k].flatMap { $0.intValue }.map { Int($0) } }
        func optBool(_ k: String) -> Bool? { r[k]?.boolValue }
        switch r["mode"]!.stringValue! {
        case "native": return .native
        case "top_k": return .topK(k: optInt("k")!, renormalize: optBool("renormalize"))
        case "top_p": return .topP(threshold: Float(r["threshold"]!.doubleValue!), minExperts: optInt("min_experts"),
                                   maxExperts: optInt("max_experts"), renormalize: optBool("renormalize"))
        default: fatalError("unknown routing mode in fixture")
        }
    }

    var stats: JSONValue { json["stats"]! }
}

struct Comparison {
    var relL2: Double
    var maxAbs: Double
}

func compare(_ actual: [Float], _ expected: [Float]) -> Comparison {
    precondition(actual.count == expected.count)
    var diff = 0.0, norm = 0.0, maxAbs = 0.0
    for i in actual.indices {
        let d = Double(actual[i]) - Double(expected[i])
        diff += d * d
        norm += Double(expected[i]) * Double(expected[i])
        maxAbs = max(maxAbs, abs(d))
    }
    return Comparison(relL2: (diff / max(norm, 1e-30)).squareRoot(), maxAbs: maxAbs)
}

/// Every (fixture, run) pair, for parameterised tests.
let allRuns: [(String, String)] = fixtureNames.flatMap { name in
    (try? Fixture(name))!.runs.map { (name, $0.name) }
}

/// Greedy continuation by repeated full forwards (the reference's way), for B sequences.
func greedyByRepeatedForward(model: Model, ids: [Int32], batch: Int, steps: Int, routing: RoutingPlan) throws -> [[Int32]] {
    var sequences = (0..<batch).map { b in Array(ids[(b * ids.count / batch)..<((b + 1) * ids.count / batch)]) }
    let v = model.vocabSize
    for _ in 0..<steps {
        let length = sequences[0].count
        let flat = sequences.flatMap { $0 }
        var logits = [Float](repeating: 0, count: batch * length * v)
        _ = try flat.withUnsafeBufferPointer { t in
            try logits.withUnsafeMutableBufferPointer { l in
                try model.forward(tokens: t.baseAddress!, batch: batch, length: length, routing: routing, logits: l.baseAddress!)
            }
        }
        for b in 0..<batch {
            let row = logits[((b * length + length - 1) * v)..<((b * length + length) * v)]
            sequences[b].append(Int32(row.indices.max { row[$0] < row[$1] || (row[$0] == row[$1] && $0 > $1) }! - row.startIndex))
        }
    }
    return sequences
}

/// Runs one fixture run's forward over `model` (the fixture's own checkpoint, or a rewritten
/// copy of it) with a trace: the logits [B, T, V] and the result.
func traceForward(_ model: Model, _ fixture: Fixture, _ run: Run) throws -> (logits: [Float], result: ForwardResult) {
    var logits = [Float](repeating: .nan, count: fixture.batch * fixture.length * model.vocabSize)
    let result = try fixture.inputIds.withUnsafeBufferPointer { t in
        try logits.withUnsafeMutableBufferPointer { l in
            try model.forward(tokens: t.baseAddress!, batch: fixture.batch, length: fixture.length,
                              routing: RoutingPlan(run.policy), recordTrace: true, logits: l.baseAddress!)
        }
    }
    return (logits, result)
}

/// Every tensor of a fixture checkpoint (single file or shards), with its raw bytes.
func fixtureTensors(_ fixture: String) throws -> [RawTensor] {
    let directory = "\(fixturesDirectory)/\(fixture)/model"
    return try Files.list(directory).filter { $0.hasSuffix(".safetensors") }.sorted().flatMap { name in
        try RawTensor.all(in: directory + "/" + name)
    }
}

/// A scratch checkpoint with the fixture's config.json and `tensors` in one model.safetensors.
func rewrittenFixture(_ fixture: String, tensors: [RawTensor]) throws -> ScratchCheckpoint {
    let scratch = try ScratchCheckpoint(copying: nil)
    try Files.write(scratch.file("config.json"), try Files.read("\(fixturesDirectory)/\(fixture)/model/config.json"))
    try scratch.writeTensors(tensors)
    return scratch
}

/// Every run of the fixture on `model` (a rewritten copy of the fixture's checkpoint): logits
/// within the fixture's tolerance and exactly the reference's expert selections.
func expectReproducesReference(_ model: Model, _ fixture: Fixture,
                               sourceLocation: SourceLocation = #_sourceLocation) throws {
    for run in fixture.runs {
        let (logits, result) = try traceForward(model, fixture, run)
        let trace = try #require(result.trace, sourceLocation: sourceLocation)
        let cmp = compare(logits, fixture.floats("\(run.name).logits")!)
        #expect(cmp.relL2 <= fixture.relL2Tolerance && cmp.maxAbs <= fixture.maxAbsTolerance,
                "\(fixture.name) \(run.name): logits rel L2 \(cmp.relL2), max abs \(cmp.maxAbs)",
                sourceLocation: sourceLocation)
        for layer in fixture.moeLayers {
            let expected = fixture.integers("\(run.name).selected.\(layer)")!.map { UInt8($0) }
            #expect(trace.selected[layer]! == expected, "\(fixture.name) \(run.name) layer \(layer): selections differ",
                    sourceLocation: sourceLocation)
        }
    }
}

/// Unit roundoff of a KV-cache element type: the largest relative error of storing one value.
func unitRoundoff(_ element: DType) -> Double {
    switch element {
    case .f16: return 0x1p-11
    case .bf16: return 0x1p-8
    default: return 0x1p-24
    }
}
