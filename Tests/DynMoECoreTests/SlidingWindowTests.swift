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
            let json = try Checkpoint.parseJSONFile(fixturesDirectory + "/../References/mixtral-sliding-window.json", limit: Checkpoint.maxIndexBytes)
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
        let logits = try wholePromptLogits(model, reference.inputIds, batch: reference.batch, length: reference.length)
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
        let incremental = try tokenByTokenLogits(model, reference.inputIds, batch: reference.batch, length: reference.length,
                                                 kvDType: element)
        let cmp = compare(incremental, reference.logits)
        switch element {
        case .f32:
            #expect(cmp.relL2 <= reference.relL2 && cmp.maxAbs <= reference.maxAbs, "rel L2 \(cmp.relL2), max abs \(cmp.maxAbs)")
        default:
            #expect(cmp.relL2 <= 10 * unitRoundoff(element), "\(element): rel L2 \(cmp.relL2)")
        }
    }
}

/// Which layers a Qwen2-MoE config windows, against transformers 5.23
/// (Tests/References/make_qwen2moe_sliding_window.py): without `layer_types`, the even layers
/// below `max_window_layers`; with it, the layers it marks "sliding_attention". Checked over whole
/// prompts and token by token through a session.
@Suite("Qwen2-MoE sliding-window layers")
struct Qwen2SlidingWindowTests {
    struct Variant {
        let name: String
        let overrides: [(key: String, value: JSONValue)]
        let logits: [Float]
    }

    static let reference = Result { try Checkpoint.parseJSONFile(fixturesDirectory + "/../References/qwen2moe-sliding-window.json",
                                                              limit: Checkpoint.maxIndexBytes) }

    static func variants() throws -> [Variant] {
        let json = try reference.get()
        return json["variants"]!.objectMembers!.map { name, v in
            Variant(name: name, overrides: v["config_overrides"]!.objectMembers!,
                    logits: v["logits"]!.arrayValue!.map { Float($0.doubleValue!) })
        }
    }

    @Test(arguments: ["rule", "layer_types"])
    func windowedLayersMatchTransformers(variant name: String) throws {
        let json = try Self.reference.get()
        let variant = try #require(try Self.variants().first { $0.name == name })
        let ids = json["input_ids"]!.arrayValue!
        let batch = ids.count, length = ids[0].arrayValue!.count
        let tokens = ids.flatMap { $0.arrayValue!.map { Int32($0.intValue!) } }
        let relL2 = json["tolerance"]!["logits_rel_l2"]!.doubleValue!, maxAbs = json["tolerance"]!["logits_max_abs"]!.doubleValue!

        let scratch = try ScratchCheckpoint(copying: "qwen2moe-tiny")
        try scratch.editJSON { config in
            for (key, value) in variant.overrides { config[key] = value.isNull ? nil : value }
        }
        let model = try Model(directory: scratch.path)
        let cmp = compare(try wholePromptLogits(model, tokens, batch: batch, length: length), variant.logits)
        #expect(cmp.relL2 <= relL2 && cmp.maxAbs <= maxAbs, "\(name), whole prompt: rel L2 \(cmp.relL2), max abs \(cmp.maxAbs)")

        let stepwise = compare(try tokenByTokenLogits(model, tokens, batch: batch, length: length), variant.logits)
        #expect(stepwise.relL2 <= relL2 && stepwise.maxAbs <= maxAbs, "\(name), token by token: rel L2 \(stepwise.relL2)")
    }
}

/// Logits of [batch, length] tokens by one forward over the whole prompts: [batch, length, vocab].
func wholePromptLogits(_ model: Model, _ tokens: [Int32], batch: Int, length: Int) throws -> [Float] {
    var logits = [Float](repeating: .nan, count: batch * length * model.vocabSize)
    _ = try tokens.withUnsafeBufferPointer { t in
        try logits.withUnsafeMutableBufferPointer { l in
            try model.forward(tokens: t.baseAddress!, batch: batch, length: length, routing: RoutingPlan(.native),
                              logits: l.baseAddress!)
        }
    }
    return logits
}

/// The same logits one position at a time through a session (the KV cache stored as `kvDType`).
func tokenByTokenLogits(_ model: Model, _ tokens: [Int32], batch: Int, length: Int, kvDType: DType = .f32) throws -> [Float] {
    var options = SessionOptions()
    options.sequences = batch
    options.kvDType = kvDType
    let session = try Session(model: model, options: options)
    let v = model.vocabSize
    var logits = [Float](repeating: .nan, count: batch * length * v)
    for p in 0..<length {
        let column = (0..<batch).map { tokens[$0 * length + p] }
        var step = [Float](repeating: .nan, count: batch * v)
        _ = try column.withUnsafeBufferPointer { c in
            try step.withUnsafeMutableBufferPointer { l in
                try session.evaluate(tokens: c.baseAddress!, length: 1, logits: l.baseAddress!, logitRows: .last)
            }
        }
        for s in 0..<batch { for i in 0..<v { logits[(s * length + p) * v + i] = step[s * v + i] } }
    }
    return logits
}
