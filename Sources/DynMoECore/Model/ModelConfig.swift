/// The checkpoint families dynmoe understands, detected from `architectures` / `model_type`.
package enum Family: String, Sendable, CaseIterable {
    case paper = "dynamic_moe"
    case mixtral
    case qwen2Moe = "qwen2_moe"
    case qwen3Moe = "qwen3_moe"
    case olmoe

    package var architecture: String {
        switch self {
        case .paper: return "MoEForCausalLM"
        case .mixtral: return "MixtralForCausalLM"
        case .qwen2Moe: return "Qwen2MoeForCausalLM"
        case .qwen3Moe: return "Qwen3MoeForCausalLM"
        case .olmoe: return "OlmoeForCausalLM"
        }
    }

    static var supportedList: String { allCases.map(\.architecture).joined(separator: ", ") }
}

/// How q/k are normalised before RoPE.
package enum QKNorm: Sendable {
    case none
    /// RMSNorm over each head's `head_dim` (Qwen3-MoE).
    case perHead
    /// RMSNorm over the whole projection (OLMoE).
    case wholeProjection
}

/// The family's own routing rule: what `native` means for a checkpoint.
package enum NativeRouting: Sendable, Equatable {
    case topK(k: Int, renormalize: Bool)
    case topP(threshold: Float, renormalize: Bool)

    package var renormalize: Bool {
        switch self {
        case .topK(_, let r), .topP(_, let r): return r
        }
    }
}

/// Everything the forward pass needs from `config.json`, validated and with family defaults
/// filled in. Field names follow the Hugging Face configs they come from.
package struct ModelConfig: Sendable {
    package var family: Family
    package var hiddenSize: Int
    package var numLayers: Int
    package var numHeads: Int
    package var numKVHeads: Int
    package var headDim: Int
    package var vocabSize: Int
    package var maxPositions: Int
    package var rmsNormEps: Float
    package var ropeTheta: Double
    /// Dense MLP width (non-MoE layers).
    package var intermediateSize: Int
    /// Routed expert width.
    package var expertIntermediateSize: Int
    package var numExperts: Int
    package var nativeRouting: NativeRouting
    package var sharedExpertIntermediateSize: Int
    package var attentionBias: Bool
    package var qkNorm: QKNorm
    package var clipQKV: Float?
    /// The sliding-window width, for the layers `slidingLayers` marks (all of them, except in
    /// Qwen2-MoE, whose `layer_types` or else `max_window_layers` rule picks them).
    package var slidingWindow: Int?
    package var slidingLayers: [Bool]
    package var tieWordEmbeddings: Bool
    /// `isMoE[i]` tells whether decoder layer i has a routed MoE block.
    package var isMoE: [Bool]
    package var bosTokenId: Int?
    package var eosTokenIds: [Int]

    package var moeLayers: [Int] { isMoE.indices.filter { isMoE[$0] } }
    /// The attention window of decoder layer `l`, if it has one.
    package func window(layer l: Int) -> Int? { slidingLayers[l] ? slidingWindow : nil }
    package var qDim: Int { numHeads * headDim }
    package var kvDim: Int { numKVHeads * headDim }

    package init(json: JSONValue, source: String) throws(DynMoEError) {
        let reader = ConfigReader(json: json, source: source)
        let architectures = json["architectures"]?.arrayValue?.compactMap(\.stringValue) ?? []
        let modelType = json["model_type"]?.stringValue
        // The first architecture in the list that dynmoe knows, as transformers takes the first.
        let byArch = architectures.lazy.compactMap { name in Family.allCases.first { $0.architecture == name } }.first
        let byType = Family.allCases.first { $0 != .paper && $0.rawValue == modelType }
        // model_type only decides when architectures is absent: a checkpoint that names an
        // architecture dynmoe does not know is unsupported, whatever its model_type says.
        guard let family = architectures.isEmpty ? byType : byArch else {
            let what = architectures.isEmpty ? "model_type \"\(modelType ?? "?")\"" : "architectures \(architectures)"
            throw .unsupported("\(source): unsupported model (\(what)); supported: \(Family.supportedList)")
        }
        self.family = family
        // A quantized checkpoint stores packed integer tensors under other names (qweight,
        // scales, ...); saying so beats reporting the first float weight as missing.
        if let quantization = json["quantization_config"], !quantization.isNull {
            let method = quantization["quant_method"]?.stringValue.map { " (quant_method \"\($0)\")" } ?? ""
            throw .unsupported("\(source): quantized checkpoints\(method) are not supported; weights must be F32, F16 or BF16")
        }

        hiddenSize = try reader.positiveInt("hidden_size")
        numLayers = try reader.positiveInt("num_hidden_layers", max: ConfigReader.maxCount)
        numHeads = try reader.positiveInt("num_attention_heads", max: ConfigReader.maxCount)
        numKVHeads = try reader.positiveInt("num_key_value_heads", default: numHeads, max: ConfigReader.maxCount)
        vocabSize = try reader.positiveInt("vocab_size")
        maxPositions = try reader.positiveInt("max_position_embeddings", default: 4096)
        // Defaults for absent fields are the transformers config classes' own.
        let familyEps = family == .mixtral || family == .olmoe ? 1e-5 : 1e-6
        rmsNormEps = Float(try reader.positiveDouble("rms_norm_eps", default: familyEps))
        if let act = json["hidden_act"], !act.isNull, act.stringValue != "silu", act.stringValue != "swish" {
            throw .unsupported("\(source): hidden_act \(act.jsonText) is not supported (only \"silu\")")
        }
        headDim = try reader.positiveInt("head_dim", default: hiddenSize / numHeads, max: ConfigReader.maxCount)
        if reader.isAbsentOrNull("head_dim") {
            guard hiddenSize % numHeads == 0 else {
                throw .format("\(source): num_attention_heads (\(numHeads)) does not divide hidden_size (\(hiddenSize))")
            }
        }
        guard numHeads % numKVHeads == 0 else {
            throw .format("\(source): num_key_value_heads (\(numKVHeads)) does not divide num_attention_heads (\(numHeads))")
        }
        guard headDim % 2 == 0 else { throw .format("\(source): head_dim \(headDim) must be even for rotary embeddings") }

        // rope_theta lives at the top level in older configs and in rope_parameters in newer ones;
        // as in transformers 5, rope_parameters' value wins when both are there.
        var theta: Double? = nil
        for key in ["rope_parameters", "rope_scaling"] {
            guard let rope = json[key], !rope.isNull else { continue }
            guard let members = rope.objectMembers else { throw .format("\(source): field \"\(key)\" is not an object") }
            let typeValue = rope["rope_type"] ?? rope["type"]
            guard let type = (typeValue ?? .string("default")).stringValue else {
                throw .format("\(source): \(key).rope_type must be a string, got \(typeValue!.jsonText)")
            }
            guard type == "default" else {
                throw .unsupported("\(source): \(key).rope_type \"\(type)\" is not supported (only \"default\")")
            }
            // Scaling settings without a type (a "factor" alone) mean some scaling was intended;
            // transformers refuses them too, rather than running plain RoPE.
            if typeValue == nil, let extra = members.first(where: { $0.key != "rope_theta" }) {
                throw .unsupported("\(source): \(key) sets \"\(extra.key)\" but no rope_type; only default RoPE is supported")
            }
            if theta == nil, let t = rope["rope_theta"], !t.isNull {
                guard let value = t.doubleValue, value.isFinite else {
                    throw .format("\(source): \(key).rope_theta must be a number, got \(t.jsonText)")
                }
                theta = value
            }
        }
        if theta == nil { theta = try reader.optionalDouble("rope_theta") }
        ropeTheta = theta ?? (family == .mixtral ? 1e6 : 10000)
        guard ropeTheta > 0 else { throw .format("\(source): rope_theta must be positive") }
        tieWordEmbeddings = try reader.bool("tie_word_embeddings", default: false)
        // Special ids outside the vocabulary (some configs carry a tokenizer's larger id space)
        // could never be produced or fed; they count as absent rather than failing the load.
        let inVocabulary = 0..<vocabSize
        bosTokenId = try reader.optionalInt("bos_token_id").flatMap { inVocabulary.contains($0) ? $0 : nil }
        let eos: [Int]
        if let list = json["eos_token_id"]?.arrayValue {
            eos = list.compactMap { $0.intValue }.map { Int($0) }
        } else {
            eos = (try reader.optionalInt("eos_token_id")).map { [$0] } ?? []
        }
        eosTokenIds = eos.filter { inVocabulary.contains($0) }

        intermediateSize = try reader.positiveInt("intermediate_size")
        sharedExpertIntermediateSize = 0
        attentionBias = false
        qkNorm = .none
        clipQKV = nil
        slidingWindow = nil
        slidingLayers = Array(repeating: true, count: numLayers)

        switch family {
        case .paper:
            numExperts = try reader.positiveInt("num_experts", max: ConfigReader.maxCount)
            expertIntermediateSize = intermediateSize
            let frequency = try reader.positiveInt("expert_frequency", default: 1)
            isMoE = (0..<numLayers).map { $0 % frequency == 0 }
            let p = try reader.positiveDouble("top_p_threshold")
            guard p <= 1 else { throw .format("\(source): top_p_threshold \(p) must be in (0, 1]") }
            nativeRouting = .topP(threshold: Float(p), renormalize: false)
        case .mixtral:
            numExperts = try reader.positiveInt("num_local_experts", max: ConfigReader.maxCount)
            expertIntermediateSize = intermediateSize
            isMoE = Array(repeating: true, count: numLayers)
            nativeRouting = .topK(k: try reader.positiveInt("num_experts_per_tok"), renormalize: true)
            if let w = try reader.optionalInt("sliding_window"), w > 0 { slidingWindow = w }
        case .qwen2Moe, .qwen3Moe:
            numExperts = try reader.positiveInt(reader.isAbsentOrNull("num_experts") ? "num_local_experts" : "num_experts",
                                                max: ConfigReader.maxCount)
            expertIntermediateSize = try reader.positiveInt("moe_intermediate_size")
            let step = try reader.positiveInt("decoder_sparse_step", default: 1)
            let mlpOnly = Set(try reader.intList("mlp_only_layers"))
            isMoE = (0..<numLayers).map { !mlpOnly.contains($0) && ($0 + 1) % step == 0 }
            nativeRouting = .topK(k: try reader.positiveInt("num_experts_per_tok"),
                                  renormalize: try reader.bool("norm_topk_prob", default: false))
            if family == .qwen2Moe {
                sharedExpertIntermediateSize = try reader.nonNegativeInt("shared_expert_intermediate_size", default: 0)
                attentionBias = try reader.bool("qkv_bias", default: true)
            } else {
                attentionBias = try reader.bool("attention_bias", default: false)
                qkNorm = .perHead
            }
            if try reader.bool("use_sliding_window", default: false), let w = try reader.optionalInt("sliding_window"), w > 0 {
                slidingWindow = w
                if family == .qwen2Moe {
                    // Without layer_types (read below), transformers' Qwen2MoeConfig windows the
                    // even layers below max_window_layers.
                    let below = try reader.nonNegativeInt("max_window_layers", default: 28)
                    slidingLayers = (0..<numLayers).map { $0 % 2 == 0 && $0 < below }
                }
            }
        case .olmoe:
            numExperts = try reader.positiveInt("num_experts", max: ConfigReader.maxCount)
            expertIntermediateSize = intermediateSize
            isMoE = Array(repeating: true, count: numLayers)
            nativeRouting = .topK(k: try reader.positiveInt("num_experts_per_tok"),
                                  renormalize: try reader.bool("norm_topk_prob", default: false))
            attentionBias = try reader.bool("attention_bias", default: false)
            qkNorm = .wholeProjection
            if let c = try reader.optionalDouble("clip_qkv") {
                guard c > 0 else { throw .format("\(source): clip_qkv must be positive") }
                clipQKV = Float(c)
            }
        }
        // Qwen2-MoE reads layer_types (transformers 5); the other families' code ignores it.
        if family == .qwen2Moe, let types = json["layer_types"], !types.isNull {
            guard let list = types.arrayValue, list.count == numLayers else {
                throw .format("\(source): layer_types must be a list of \(numLayers) strings, one per layer")
            }
            for (l, value) in list.enumerated() {
                switch value.stringValue {
                case "full_attention": slidingLayers[l] = false
                case "sliding_attention": slidingLayers[l] = true
                default:
                    throw .unsupported("\(source): layer_types[\(l)] \(value.jsonText) is not supported (only \"full_attention\" and \"sliding_attention\")")
                }
            }
        }
        if case .topK(let k, _) = nativeRouting, k > numExperts {
            throw .format("\(source): num_experts_per_tok (\(k)) exceeds the number of experts (\(numExperts))")
        }
    }
}

/// Typed access to config.json fields with errors that name the field.
private struct ConfigReader {
    let json: JSONValue
    let source: String

    /// Bound on counts (layers, heads, experts, head_dim): far above any real model, low enough
    /// that per-layer tables and products of sizes cannot exhaust memory or overflow.
    static let maxCount = 1 << 16

    func isAbsentOrNull(_ key: String) -> Bool { json[key] == nil || json[key]!.isNull }

    func optionalInt(_ key: String) throws(DynMoEError) -> Int? {
        guard let v = json[key], !v.isNull else { return nil }
        guard let i = v.intValue else { throw .format("\(source): field \"\(key)\" must be an integer, got \(v.jsonText)") }
        // Past 2^40 no field is meaningful, and keeping values this small rules out overflow in the
        // callers' arithmetic before their own, tighter limits are checked.
        guard abs(i) < Int64(1) << 40 else { throw .format("\(source): field \"\(key)\" = \(v.jsonText) is out of range") }
        return Int(i)
    }

    /// A required (or defaulted) positive integer no larger than `max` (Int32.max by default, the
    /// range of the C API's int32 fields).
    func positiveInt(_ key: String, default def: Int? = nil, max limit: Int = Int(Int32.max)) throws(DynMoEError) -> Int {
        guard let i = try optionalInt(key) else {
            if let def { return def }
            throw .format("\(source): required field \"\(key)\" is missing")
        }
        guard i > 0 else { throw .format("\(source): field \"\(key)\" must be positive, got \(i)") }
        guard i <= limit else { throw .format("\(source): field \"\(key)\" = \(i) exceeds the limit of \(limit)") }
        return i
    }

    func nonNegativeInt(_ key: String, default def: Int) throws(DynMoEError) -> Int {
        guard let i = try optionalInt(key) else { return def }
        guard i >= 0 else { throw .format("\(source): field \"\(key)\" must not be negative, got \(i)") }
        return i
    }

    func optionalDouble(_ key: String) throws(DynMoEError) -> Double? {
        guard let v = json[key], !v.isNull else { return nil }
        guard let d = v.doubleValue, d.isFinite else { throw .format("\(source): field \"\(key)\" must be a number, got \(v.jsonText)") }
        return d
    }

    func positiveDouble(_ key: String, default def: Double? = nil) throws(DynMoEError) -> Double {
        guard let d = try optionalDouble(key) else {
            if let def { return def }
            throw .format("\(source): required field \"\(key)\" is missing")
        }
        guard d > 0 else { throw .format("\(source): field \"\(key)\" must be positive, got \(d)") }
        return d
    }

    func bool(_ key: String, default def: Bool) throws(DynMoEError) -> Bool {
        guard let v = json[key], !v.isNull else { return def }
        guard let b = v.boolValue else { throw .format("\(source): field \"\(key)\" must be true or false, got \(v.jsonText)") }
        return b
    }

    func intList(_ key: String) throws(DynMoEError) -> [Int] {
        guard let v = json[key], !v.isNull else { return [] }
        guard let a = v.arrayValue else { throw .format("\(source): field \"\(key)\" must be a list of integers") }
        var out: [Int] = []
        for e in a {
            guard let i = e.intValue else { throw .format("\(source): field \"\(key)\" must be a list of integers") }
            out.append(Int(i))
        }
        return out
    }
}
