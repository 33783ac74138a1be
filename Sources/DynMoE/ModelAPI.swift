import CDynMoE
import DynMoECore

@c @implementation
public func dynmoe_load_params_default() -> dynmoe_load_params {
    dynmoe_load_params(n_threads: 0, prefetch: 0, progress_callback: nil, progress_user_data: nil, lock_memory: 0)
}

/// Carries the C callback and its user data into the loader's progress closure.
private struct ProgressCallback: @unchecked Sendable {
    let function: @convention(c) (Float, UnsafeMutableRawPointer?) -> Void
    let userData: UnsafeMutableRawPointer?
}

@c @implementation
public func dynmoe_model_load(_ path: UnsafePointer<CChar>?, _ params: UnsafePointer<dynmoe_load_params>?,
                              _ outModel: UnsafeMutablePointer<OpaquePointer?>?) -> dynmoe_status {
    outModel?.pointee = nil
    return api { () throws(DynMoEError) in
        let path = String(cString: try required(path, "path"))
        let out = try required(outModel, "out_model")
        let p = params?.pointee ?? dynmoe_load_params_default()
        var options = LoadOptions()
        guard p.n_threads >= 0 else { throw .invalidArgument("n_threads must be >= 0, got \(p.n_threads)") }
        options.threads = Int(p.n_threads)
        options.prefetch = p.prefetch != 0
        options.lockMemory = p.lock_memory != 0
        if let f = p.progress_callback {
            let callback = ProgressCallback(function: f, userData: p.progress_user_data)
            options.progress = { callback.function($0, callback.userData) }
        }
        let model = try Model(directory: path, options: options)
        out.pointee = HandleRegistry.shared.register(model)
    }
}

@c @implementation
public func dynmoe_model_free(_ model: OpaquePointer?) {
    HandleRegistry.shared.release(model, as: Model.self)
}

func lookupModel(_ handle: OpaquePointer?) throws(DynMoEError) -> Model {
    try HandleRegistry.shared.lookup(handle, as: Model.self, "model")
}

/// Copies `text` into a fixed-size C char array field, truncating and always NUL-terminating.
func copyCString<T>(_ text: String, into field: inout T) {
    withUnsafeMutableBytes(of: &field) { raw in
        let bytes = Array(text.utf8.prefix(raw.count - 1))
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
}

func dtypeCode(_ dtype: DType) -> Int32 {
    switch dtype {
    case .f16: return Int32(DYNMOE_DTYPE_F16)
    case .bf16: return Int32(DYNMOE_DTYPE_BF16)
    default: return Int32(DYNMOE_DTYPE_F32)
    }
}

@c @implementation
public func dynmoe_model_get_info(_ model: OpaquePointer?, _ outInfo: UnsafeMutablePointer<dynmoe_model_info>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let model = try lookupModel(model)
        let out = try required(outInfo, "out_info")
        let c = model.config
        var info = dynmoe_model_info()
        copyCString(c.family.rawValue, into: &info.family)
        copyCString(c.family.architecture, into: &info.architecture)
        info.num_layers = Int32(c.numLayers)
        info.num_moe_layers = Int32(c.moeLayers.count)
        info.num_experts = Int32(c.numExperts)
        info.hidden_size = Int32(c.hiddenSize)
        info.vocab_size = Int32(c.vocabSize)
        info.num_attention_heads = Int32(c.numHeads)
        info.num_key_value_heads = Int32(c.numKVHeads)
        info.head_dim = Int32(c.headDim)
        info.max_position_embeddings = Int32(clamping: c.maxPositions)
        info.dtype = dtypeCode(model.weightDType)
        switch c.nativeRouting {
        case .topK(let k, _):
            info.native_mode = Int32(DYNMOE_ROUTING_TOP_K)
            info.native_top_k = Int32(k)
        case .topP(let p, _):
            info.native_mode = Int32(DYNMOE_ROUTING_TOP_P)
            info.native_top_p = p
        }
        info.native_renormalize = c.nativeRouting.renormalize ? 1 : 0
        info.has_shared_expert = model.layers.contains { $0.feedForward.moe?.sharedExpert != nil } ? 1 : 0
        info.bos_token_id = Int32(clamping: c.bosTokenId ?? -1)
        info.eos_token_id = Int32(clamping: c.eosTokenIds.first ?? -1)
        info.total_parameters = Int64(model.totalParameters)
        info.parameters_per_expert = Int64(model.layers.lazy.compactMap { $0.feedForward.moe?.parametersPerExpert }.first ?? 0)
        info.always_active_parameters = Int64(model.alwaysActiveParameters)
        out.pointee = info
    }
}

@c @implementation
public func dynmoe_model_get_moe_layers(_ model: OpaquePointer?, _ outLayers: UnsafeMutablePointer<Int32>?, _ capacity: Int,
                                        _ outCount: UnsafeMutablePointer<Int>?) -> dynmoe_status {
    api { () throws(DynMoEError) in
        let layers = try lookupModel(model).config.moeLayers
        outCount?.pointee = layers.count
        if outLayers == nil && capacity == 0 { return }
        let out = try required(outLayers, "out_layers")
        try checkCapacity(capacity, needed: layers.count, "dynmoe_model_get_moe_layers")
        for (i, l) in layers.enumerated() { out[i] = Int32(l) }
    }
}
