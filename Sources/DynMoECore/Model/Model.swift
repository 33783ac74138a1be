/// Options for loading a model.
package struct LoadOptions: Sendable {
    /// Worker threads for kernels, including the calling thread; 0 = all online cores.
    package var threads: Int = 0
    /// Ask the kernel to read the weights ahead at load time.
    package var prefetch: Bool = false
    /// Pin the weights in memory (mlock).
    package var lockMemory: Bool = false
    /// Called with a fraction in [0, 1] as layers are loaded.
    package var progress: (@Sendable (Float) -> Void)? = nil

    package init() {}
}

/// A loaded checkpoint: configuration plus weights viewed in place from the memory-mapped files.
/// Immutable after load, so any number of sessions and threads can share it; the only mutable
/// parts (statistics, thread pool) synchronise themselves.
package final class Model: @unchecked Sendable {
    package let config: ModelConfig
    package let checkpoint: Checkpoint
    package let embedding: WeightMatrix
    package let finalNorm: [Float]
    package let lmHead: WeightMatrix
    package let layers: [LayerWeights]
    package let weightDType: DType
    /// The rotary position embedding's frequencies, computed once.
    package let rope: RotaryEmbedding
    package let pool: ThreadPool
    /// Routing statistics over every forward run on this model since load or the last reset.
    package let statistics: RoutingStatistics

    package init(directory: String, options: LoadOptions = LoadOptions()) throws(DynMoEError) {
        guard options.threads >= 0 else { throw .invalidArgument("threads must be >= 0, got \(options.threads)") }
        let checkpoint = try Checkpoint(directory: directory)
        self.checkpoint = checkpoint
        let config = try ModelConfig(json: checkpoint.config, source: checkpoint.directory + "/" + Checkpoint.configName)
        self.config = config
        let names = TensorNames(family: config.family)
        let h = config.hiddenSize

        embedding = WeightMatrix(try checkpoint.tensor("model.embed_tokens.weight", shape: [config.vocabSize, h]))
        finalNorm = floatVector(try checkpoint.tensor("model.norm.weight", shape: [h]))
        if checkpoint.contains("lm_head.weight") || !config.tieWordEmbeddings {
            lmHead = WeightMatrix(try checkpoint.tensor("lm_head.weight", shape: [config.vocabSize, h]))
        } else {
            lmHead = embedding
        }

        var layers: [LayerWeights] = []
        for i in 0..<config.numLayers {
            layers.append(try Model.loadLayer(i, config: config, names: names, checkpoint: checkpoint))
            options.progress?(Float(i + 1) / Float(config.numLayers))
        }
        self.layers = layers

        let unexpected = checkpoint.unusedTensorNames.filter { !names.isIgnorable($0) }
        if let first = unexpected.first {
            throw .format("\(checkpoint.directory): unexpected tensor \"\(first)\"\(unexpected.count > 1 ? " and \(unexpected.count - 1) more" : "") not used by \(config.family.architecture)")
        }
        let dtypes = Set(checkpoint.files.flatMap { $0.tensors.values.map(\.dtype) })
        weightDType = dtypes.count == 1 ? dtypes.first! : (dtypes.contains(.bf16) ? .bf16 : embedding.dtype)

        if options.prefetch { checkpoint.files.forEach { $0.file.adviseWillNeed() } }
        if options.lockMemory { for f in checkpoint.files { try f.file.lock() } }
        rope = RotaryEmbedding(headDim: config.headDim, theta: config.ropeTheta)
        pool = ThreadPool(threads: options.threads)
        statistics = RoutingStatistics(layers: layers.map { $0.feedForward.moe?.numExperts ?? 0 })
    }

    private static func loadLayer(_ i: Int, config: ModelConfig, names: TensorNames, checkpoint: Checkpoint) throws(DynMoEError) -> LayerWeights {
        let h = config.hiddenSize
        let p = "model.layers.\(i)."
        func matrix(_ name: String, _ rows: Int, _ cols: Int) throws(DynMoEError) -> WeightMatrix {
            WeightMatrix(try checkpoint.tensor(p + name, shape: [rows, cols]))
        }
        func vector(_ name: String, _ n: Int) throws(DynMoEError) -> [Float] {
            floatVector(try checkpoint.tensor(p + name, shape: [n]))
        }
        func swiglu(_ prefix: String, _ width: Int) throws(DynMoEError) -> SwiGLUWeights {
            SwiGLUWeights(gate: try matrix(prefix + names.gate, width, h),
                          up: try matrix(prefix + names.up, width, h),
                          down: try matrix(prefix + names.down, h, width))
        }

        var attention = AttentionWeights(
            q: try matrix("self_attn.q_proj.weight", config.qDim, h),
            k: try matrix("self_attn.k_proj.weight", config.kvDim, h),
            v: try matrix("self_attn.v_proj.weight", config.kvDim, h),
            o: try matrix("self_attn.o_proj.weight", h, config.qDim))
        if config.attentionBias {
            attention.qBias = try vector("self_attn.q_proj.bias", config.qDim)
            attention.kBias = try vector("self_attn.k_proj.bias", config.kvDim)
            attention.vBias = try vector("self_attn.v_proj.bias", config.kvDim)
        }
        switch config.qkNorm {
        case .none: break
        case .perHead:
            attention.qNorm = try vector("self_attn.q_norm.weight", config.headDim)
            attention.kNorm = try vector("self_attn.k_norm.weight", config.headDim)
        case .wholeProjection:
            attention.qNorm = try vector("self_attn.q_norm.weight", config.qDim)
            attention.kNorm = try vector("self_attn.k_norm.weight", config.kvDim)
        }

        // Routed experts as 3-D tensors (transformers >= 5, and checkpoints released since):
        // <block>.experts.gate_up_proj [E, 2I, H] (each expert's gate rows, then its up rows) and
        // <block>.experts.down_proj [E, H, I]; Mixtral's block is then "mlp", like the others.
        func fusedExperts(_ block: String) throws(DynMoEError) -> [SwiGLUWeights] {
            let e = config.numExperts, width = config.expertIntermediateSize
            let gateUp = try checkpoint.tensor(p + block + ".experts.gate_up_proj", shape: [e, 2 * width, h])
            let down = try checkpoint.tensor(p + block + ".experts.down_proj", shape: [e, h, width])
            let gateUpBytes = width * h * gateUp.dtype.byteSize, downBytes = h * width * down.dtype.byteSize
            return (0..<e).map { x in
                let gu = gateUp.data + 2 * x * gateUpBytes
                return SwiGLUWeights(gate: WeightMatrix(data: gu, dtype: gateUp.dtype, rows: width, cols: h),
                                     up: WeightMatrix(data: gu + gateUpBytes, dtype: gateUp.dtype, rows: width, cols: h),
                                     down: WeightMatrix(data: down.data + x * downBytes, dtype: down.dtype, rows: h, cols: width))
            }
        }

        let feedForward: FeedForwardWeights
        if config.isMoE[i] {
            let fusedBlock = [names.moeBlock, "mlp"].first { checkpoint.contains(p + $0 + ".experts.gate_up_proj") }
            let block = fusedBlock ?? names.moeBlock
            // The router's [E, H] shape is checked against the file before E sizes anything.
            let router = try matrix("\(block).\(names.router).weight", config.numExperts, h)
            var experts: [SwiGLUWeights] = []
            if let fusedBlock {
                experts = try fusedExperts(fusedBlock)
            } else {
                experts.reserveCapacity(config.numExperts)
                for e in 0..<config.numExperts {
                    experts.append(try swiglu("\(block).experts.\(e).", config.expertIntermediateSize))
                }
            }
            var moe = MoEWeights(router: router, experts: experts)
            if config.family == .qwen2Moe && config.sharedExpertIntermediateSize > 0 {
                moe.sharedExpert = try swiglu("mlp.shared_expert.", config.sharedExpertIntermediateSize)
                moe.sharedExpertGate = try matrix("mlp.shared_expert_gate.weight", 1, h)
            }
            feedForward = .moe(moe)
        } else {
            feedForward = .dense(try swiglu(names.denseMLP, config.intermediateSize))
        }
        // Products that share one input share its dtype-specific layout (MatMul.prepare), so
        // their weights must share a dtype.
        func requireOneDType(_ matrices: [WeightMatrix], _ what: String) throws(DynMoEError) {
            if let first = matrices.first, matrices.contains(where: { $0.dtype != first.dtype }) {
                throw .unsupported("\(checkpoint.directory): layer \(i) mixes weight dtypes within \(what)")
            }
        }
        try requireOneDType([attention.q, attention.k, attention.v], "q/k/v projections")
        switch feedForward {
        case .dense(let mlp): try requireOneDType([mlp.gate, mlp.up], "the MLP's gate/up projections")
        case .moe(let moe):
            try requireOneDType(moe.experts.flatMap { [$0.gate, $0.up, $0.down] }, "routed experts")
            if let shared = moe.sharedExpert, let gate = moe.sharedExpertGate {
                try requireOneDType([shared.gate, shared.up, gate], "the shared expert's input projections")
            }
        }
        return LayerWeights(inputNorm: try vector(names.inputNorm + ".weight", h),
                            postAttentionNorm: try vector(names.postAttentionNorm + ".weight", h),
                            attention: attention, feedForward: feedForward)
    }

    // MARK: - Derived facts

    package var numLayers: Int { config.numLayers }
    package var vocabSize: Int { config.vocabSize }
    package var hiddenSize: Int { config.hiddenSize }

    package var totalParameters: Int {
        embedding.elementCount + finalNorm.count + (lmHead.data == embedding.data ? 0 : lmHead.elementCount)
            + layers.reduce(0) { $0 + $1.totalParameters }
    }

    /// Parameters a token reads whatever the routing: everything but the routed experts and the
    /// embedding table (a token reads one row of it).
    package var alwaysActiveParameters: Int {
        finalNorm.count + lmHead.elementCount + layers.reduce(0) { $0 + $1.alwaysActiveParameters }
    }
}

/// Tensor names of one family's checkpoint layout.
struct TensorNames {
    let family: Family

    var inputNorm: String { family == .paper ? "input_norm" : "input_layernorm" }
    var postAttentionNorm: String { family == .paper ? "post_attention_norm" : "post_attention_layernorm" }
    var moeBlock: String { family == .mixtral ? "block_sparse_moe" : "mlp" }
    var router: String { family == .paper ? "router" : "gate" }
    var gate: String { family == .mixtral ? "w1.weight" : "gate_proj.weight" }
    var up: String { family == .mixtral ? "w3.weight" : "up_proj.weight" }
    var down: String { family == .mixtral ? "w2.weight" : "down_proj.weight" }
    var denseMLP: String { family == .paper ? "mlp.mlp." : "mlp." }

    /// Buffers some exporters save that carry no weights (RoPE frequencies are recomputed).
    func isIgnorable(_ name: String) -> Bool { name.hasSuffix("rotary_emb.inv_freq") }
}
