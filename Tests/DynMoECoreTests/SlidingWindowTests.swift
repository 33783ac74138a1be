import Testing
@testable import DynMoECore

/// Sliding-window attention against Hugging Face transformers: the mixtral-tiny fixture's
/// checkpoint with `sliding_window` 4 (its 12-token prompts are three windows long), logits made
/// by Tests/References/make_sliding_window.py (which first checks that its setup reproduces the
/// fixture's own references). Checked over the whole prompt at once and token by token through a
/// session, where the window slides over the KV cache.
@Suite("Sliding-window attention")
struct SlidingWindowTests {
    struct Reference {
        let window: Int
        let inputIds: [Int32]
        let batch: Int
        let length: Int
        let logits: [Float]
        let relL2: Double
        let maxAbs: Double

        init() throws {
            let json = try Checkpoint.parseJSONFile(fixturesDirectory + "/../References/mixtral-sliding-window.json")
            window = Int(json["config_overrides"]!["sliding_window"]!.intValue!)
            let ids = json["input_ids"]!.arrayValue!
            batch = ids.count
            length = ids[0].arrayValue!.count
            inputIds = ids.flatMap { $0.arrayValue!.map { Int32($0.intValue!) } }
            logits = json["logits"]!.arrayValue!.map { Float($0.doubleValue!) }
            relL2 = json["tolerance"]!["logits_rel_l2"]!.doubleValue!
            maxAbs = json["tolerance"]!["logits_max_abs"]!.doubleValue!
        }
    }

    static func model(window: Int) throws -> (Model, ScratchCheckpoint) {
        let scratch = try ScratchCheckpoint(copying: "mixtral-tiny")
        try scratch.editJSON { config in config["sliding_window"] = .int(Int64(window)) }
        let model = try Model(directory: scratch.path)
        #expect(model.config.slidingWindow == window)
        return (model, scratch)
    }

    @Test func wholePromptMatchesTransformers() throws {
        let reference = try Reference()
        let (model, scratch) = try Self.model(window: reference.window)
        _ = scratch
        var logits = [Float](repeating: .nan, count: reference.logits.count)
        _ = try reference.inputIds.withUnsafeBufferPointer { ids in
            try logits.withUnsafeMutableBufferPointer { l in
                try model.forward(tokens: ids.baseAddress!, batch: reference.batch, length: reference.length,
                                  routing: RoutingPlan(.native), logits: l.baseAddress!)
            }
        }
        let cmp = compare(logits, reference.logits)
        #expect(cmp.relL2 <= reference.relL2 && cmp.maxAbs <= reference.maxAbs, "rel L2 \(cmp.relL2), max abs \(cmp.maxAbs)")
    }

    /// Token by token through a session, with each KV-cache element type (the window's first
    /// position is an offset into rows of that type); F16 and BF16 within 10 units of roundoff.
    @Test(arguments: KVCache.elementTypes)
    func tokenByTokenMatchesTransformers(element: DType) throws {
        let reference = try Reference()
        let (model, scratch) = try Self.model(window: reference.window)
        _ = scratch
        let b = reference.batch, t = reference.length, v = model.vocabSize
        var options = SessionOptions()
        options.sequences = b
        options.kvDType = element
        let session = try Session(model: model, options: options)
        var incremental = [Float](repeating: .nan, count: b * t * v)
        for p in 0..<t {
            let column = (0..<b).map { reference.inputIds[$0 * t + p] }
            var step = [Float](repeating: .nan, count: b * v)
            _ = try column.withUnsafeBufferPointer { ids in
                try step.withUnsafeMutableBufferPointer { l in
                    try session.evaluate(tokens: ids.baseAddress!, length: 1, logits: l.baseAddress!, logitRows: .last)
                }
            }
            for s in 0..<b { for i in 0..<v { incremental[(s * t + p) * v + i] = step[s * v + i] } }
        }
        let cmp = compare(incremental, reference.logits)
        switch element {
        case .f32:
            #expect(cmp.relL2 <= reference.relL2 && cmp.maxAbs <= reference.maxAbs, "rel L2 \(cmp.relL2), max abs \(cmp.maxAbs)")
        default:
            #expect(cmp.relL2 <= 10 * unitRoundoff(element), "\(element): rel L2 \(cmp.relL2)")
        }
    }
}
