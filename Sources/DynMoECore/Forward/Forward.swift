/// Which rows of logits a forward writes.
package enum LogitRows: Sendable {
    /// Every position: [B, T, V].
    case all
    /// The last position of each sequence: [B, V] (what decoding needs).
    case last
}

/// One forward call over a batch of B sequences advancing in lockstep by T tokens.
package struct ForwardRequest {
    package var tokens: UnsafePointer<Int32>
    package var batch: Int
    package var length: Int
    /// Position of the first token (the KV cache holds positions 0..<startPosition).
    package var startPosition: Int = 0
    package var routing: [ResolvedRouting?]
    package var recordTrace: Bool = false
    package var observer: (any RoutingObserver)? = nil
    package var logits: UnsafeMutablePointer<Float>? = nil
    package var logitRows: LogitRows = .all

    package init(tokens: UnsafePointer<Int32>, batch: Int, length: Int, routing: [ResolvedRouting?]) {
        self.tokens = tokens
        self.batch = batch
        self.length = length
        self.routing = routing
    }
}

/// What a forward produced besides logits: this call's routing counters, where its time went
/// and, on request, its trace.
package struct ForwardResult {
    package var counters: [LayerRoutingCounters?]
    package var timing: ForwardTiming
    package var trace: ForwardTrace?
}

/// The transformer forward pass, read top to bottom: embed, then per layer pre-norm attention and
/// pre-norm feed-forward (dense or routed MoE), each added to the residual stream; final norm and
/// LM head. Tokens of all sequences run through each matrix product together.
package struct ForwardPass {
    let model: Model
    let cache: KVCache
    let ws: Workspace

    package init(model: Model, cache: KVCache, workspace: Workspace) {
        self.model = model
        self.cache = cache
        self.ws = workspace
    }

    package func run(_ request: ForwardRequest) throws(DynMoEError) -> ForwardResult {
        let start = MonotonicClock.now()
        let cfg = model.config
        let B = request.batch, T = request.length, N = B * T, H = cfg.hiddenSize
        guard B >= 1, T >= 1 else { throw .invalidArgument("forward: batch (\(B)) and length (\(T)) must be at least 1") }
        guard B <= cache.sequences else {
            throw .invalidArgument("forward: batch \(B) exceeds the \(cache.sequences) sequences this context holds")
        }
        guard request.startPosition + T <= cache.capacity else {
            throw .init(.contextFull, "context full: \(request.startPosition) + \(T) tokens exceed the capacity of \(cache.capacity) positions")
        }
        guard request.routing.count == cfg.numLayers else { throw .invalidArgument("forward: routing has the wrong number of layers") }
        let needed = ForwardPass.workingBytes(config: cfg, tokens: N, context: request.startPosition + T,
                                              routing: request.routing, trace: request.recordTrace)
        let available = Allocation.physicalMemory
        guard available == 0 || needed.map({ $0 <= available }) == true else {
            throw .init(.outOfMemory, "forward: \(B) x \(T) tokens need about \(needed.map(String.init) ?? "more than \(Int.max)") bytes of working memory\(request.recordTrace ? " and trace" : ""), more than this machine's \(available); split the batch")
        }
        for i in 0..<N {
            let t = request.tokens[i]
            guard t >= 0, Int(t) < cfg.vocabSize else {
                throw .invalidArgument("token id \(t) at index \(i) is outside the vocabulary [0, \(cfg.vocabSize))")
            }
        }

        let x = ws.x.reserve(N * H)
        for i in 0..<N { model.embedding.copyRow(Int(request.tokens[i]), to: x + i * H) }

        let trace = request.recordTrace
            ? ForwardTrace(batch: B, length: T, hiddenSize: H, numExperts: model.layers.map { $0.feedForward.moe?.numExperts ?? 0 })
            : nil
        if ws.routingCounters.count != cfg.numLayers { ws.routingCounters = Array(repeating: nil, count: cfg.numLayers) }
        let rope = model.rope
        let ropeTable = ws.rope.reserve(T * cfg.headDim)
        for t in 0..<T {
            rope.table(position: request.startPosition + t, cos: ropeTable + t * cfg.headDim,
                       sin: ropeTable + t * cfg.headDim + cfg.headDim / 2)
        }

        var timing = ForwardTiming()
        timing.passes = 1
        timing.tokens = N
        for (l, layer) in model.layers.enumerated() {
            let attentionStart = MonotonicClock.now()
            let normed = ws.normed.reserve(N * H)
            for i in 0..<N { Elementwise.rmsNorm(x + i * H, layer.inputNorm, H, eps: cfg.rmsNormEps, normed + i * H) }
            attention(layer: l, weights: layer.attention, normed: normed, request: request, rope: rope, ropeTable: ropeTable)
            let out = ws.blockOut.pointer
            let feedForwardStart = MonotonicClock.now()
            timing.attention += feedForwardStart - attentionStart
            Elementwise.add(x, out, N * H)

            for i in 0..<N { Elementwise.rmsNorm(x + i * H, layer.postAttentionNorm, H, eps: cfg.rmsNormEps, normed + i * H) }
            switch layer.feedForward {
            case .dense(let mlp):
                let out = ws.blockOut.reserve(N * H)
                denseMLP(mlp, input: normed, rows: N, out: out)
                timing.dense += MonotonicClock.now() - feedForwardStart
            case .moe(let moe):
                ws.routingCounters[l] = moeBlock(layer: l, moe: moe, input: normed, rows: N, routing: request.routing[l]!,
                                       trace: trace, observer: request.observer)
                timing.moe += MonotonicClock.now() - feedForwardStart
            }
            Elementwise.add(x, ws.blockOut.pointer, N * H)
            trace?.hidden[l] = Array(UnsafeBufferPointer(start: x, count: N * H))
        }

        let headStart = MonotonicClock.now()
        if let logits = request.logits {
            let rows = request.logitRows == .all ? N : B
            let normed = ws.normed.reserve(rows * H)
            for r in 0..<rows {
                let src = request.logitRows == .all ? r : r * T + (T - 1)
                Elementwise.rmsNorm(x + src * H, model.finalNorm, H, eps: cfg.rmsNormEps, normed + r * H)
            }
            let scratch = ws.prepared.reserve(MatMul.scratchCount(m: rows, k: H))
            MatMul.multiply(x: normed, ldx: H, m: rows, w: model.lmHead, y: logits, ldy: cfg.vocabSize,
                            scratch: scratch, pool: model.pool, regionScratch: ws.region)
        }
        let end = MonotonicClock.now()
        timing.head = end - headStart
        timing.total = end - start
        return ForwardResult(counters: ws.routingCounters, timing: timing, trace: trace)
    }

    /// Query positions of one call split into at most this many attention work items per KV head
    /// (prefill parallelism when there are few KV heads).
    static let attentionSlices = 4

    /// Bytes of scratch (and trace) a call over `tokens` positions needs, roughly and from above;
    /// nil if the count overflows. Checked before anything is allocated, so an absurd batch is an
    /// error instead of an allocation failure.
    static func workingBytes(config c: ModelConfig, tokens n: Int, context: Int, routing: [ResolvedRouting?],
                             trace: Bool) -> Int? {
        var perToken = 0
        for r in routing { if let r { perToken = max(perToken, r.maxExperts(numExperts: c.numExperts)) } }
        let inner = max(c.intermediateSize, c.expertIntermediateSize, c.sharedExpertIntermediateSize)
        let widest = max(c.hiddenSize, c.qDim, inner)
        var floats = 0
        /// floats += a * b; false on overflow. (A function, not a list of terms: no allocation per call.)
        func add(_ a: Int, _ b: Int) -> Bool {
            let (product, o1) = a.multipliedReportingOverflow(by: b)
            let (sum, o2) = floats.addingReportingOverflow(product)
            floats = sum
            return !o1 && !o2
        }
        guard add(n, 4 * c.hiddenSize + 2 * c.qDim + 2 * c.kvDim + 2 * widest + 3 * c.numExperts + 2 * inner),
              add(n * max(1, perToken), 2 * c.hiddenSize + 2 * inner),        // gathered rows, expert outputs
              add(max(c.numHeads, Attention.rowsPerStep * c.numKVHeads) * attentionSlices * (n / max(1, context) + 1), context),  // attention scores
              add(trace ? n : 0, c.numLayers * c.hiddenSize + 3 * c.numLayers * c.numExperts)
        else { return nil }
        let (bytes, overflow) = floats.multipliedReportingOverflow(by: MemoryLayout<Float>.size)
        return overflow ? nil : bytes
    }

    // MARK: - Attention

    /// Causal grouped-query attention; writes o_proj's output to `ws.blockOut` and appends this
    /// call's keys and values to the cache.
    private func attention(layer l: Int, weights a: AttentionWeights, normed: UnsafeMutablePointer<Float>,
                           request: ForwardRequest, rope: RotaryEmbedding, ropeTable: UnsafePointer<Float>) {
        let cfg = model.config
        let B = request.batch, T = request.length, N = B * T, H = cfg.hiddenSize
        let qDim = cfg.qDim, kvDim = cfg.kvDim, hd = cfg.headDim
        let q = ws.q.reserve(N * qDim), k = ws.k.reserve(N * kvDim), v = ws.v.reserve(N * kvDim)

        let prepared = MatMul.prepare(x: normed, ldx: H, m: N, k: H, dtype: a.q.dtype,
                                      scratch: ws.prepared.reserve(MatMul.scratchCount(m: N, k: H)))
        var projections = ws.jobList(capacity: 3)
        projections.append(MatMulJob(x: prepared.pointer, ldx: prepared.stride, m: N, w: a.q, y: q, ldy: qDim))
        projections.append(MatMulJob(x: prepared.pointer, ldx: prepared.stride, m: N, w: a.k, y: k, ldy: kvDim))
        projections.append(MatMulJob(x: prepared.pointer, ldx: prepared.stride, m: N, w: a.v, y: v, ldy: kvDim))
        MatMul.run(projections.jobs, pool: model.pool, scratch: ws.region)

        for i in 0..<N {
            let qi = q + i * qDim, ki = k + i * kvDim, vi = v + i * kvDim
            if let b = a.qBias { for j in 0..<qDim { qi[j] += b[j] } }
            if let b = a.kBias { for j in 0..<kvDim { ki[j] += b[j] } }
            if let b = a.vBias { for j in 0..<kvDim { vi[j] += b[j] } }
            switch cfg.qkNorm {
            case .none: break
            case .wholeProjection:
                Elementwise.rmsNorm(qi, a.qNorm!, qDim, eps: cfg.rmsNormEps, qi)
                Elementwise.rmsNorm(ki, a.kNorm!, kvDim, eps: cfg.rmsNormEps, ki)
            case .perHead:
                for h in 0..<cfg.numHeads { Elementwise.rmsNorm(qi + h * hd, a.qNorm!, hd, eps: cfg.rmsNormEps, qi + h * hd) }
                for h in 0..<cfg.numKVHeads { Elementwise.rmsNorm(ki + h * hd, a.kNorm!, hd, eps: cfg.rmsNormEps, ki + h * hd) }
            }
            if let c = cfg.clipQKV {
                for j in 0..<qDim { qi[j] = min(max(qi[j], -c), c) }
                for j in 0..<kvDim { ki[j] = min(max(ki[j], -c), c); vi[j] = min(max(vi[j], -c), c) }
            }
            let t = i % T
            let cosT = ropeTable + t * hd, sinT = cosT + hd / 2
            rope.apply(qi, heads: cfg.numHeads, cos: cosT, sin: sinT)
            rope.apply(ki, heads: cfg.numKVHeads, cos: cosT, sin: sinT)
            let b = i / T, pos = request.startPosition + t
            for h in 0..<cfg.numKVHeads {
                cache.store(ki + h * hd, into: cache.keys(layer: l, sequence: b, head: h), position: pos)
                cache.store(vi + h * hd, into: cache.values(layer: l, sequence: b, head: h), position: pos)
            }
        }

        let context = request.startPosition + T
        let out = ws.attention.reserve(N * qDim)
        let slices = min(T, ForwardPass.attentionSlices)
        // A decode step reserves score rows as long as the cache: sized by the context, they
        // would be reallocated every time the context outgrew them (a few hundred bytes per position).
        let scoreRows = B * cfg.numKVHeads * slices * Attention.rowsPerStep
        let scores = ws.scores.reserve(scoreRows * (T == 1 ? cache.capacity : context))
        let items = AttentionItems(cache: cache, layer: l, batchLength: T, startPosition: request.startPosition,
                                   kvHeads: cfg.numKVHeads, groupSize: cfg.numHeads / cfg.numKVHeads, headDim: hd,
                                   scale: 1 / Float(hd).squareRoot(),
                                   window: cfg.window(layer: l), slices: slices, q: q, out: out, qDim: qDim,
                                   scores: scores,
                                   context: context)
        model.pool.parallelFor(B * cfg.numKVHeads * slices, items)

        let blockOut = ws.blockOut.reserve(N * H)
        MatMul.multiply(x: out, ldx: qDim, m: N, w: a.o, y: blockOut, ldy: H,
                        scratch: ws.prepared.reserve(MatMul.scratchCount(m: N, k: qDim)), pool: model.pool,
                        regionScratch: ws.region)
    }

    // MARK: - Feed-forward

    private func denseMLP(_ mlp: SwiGLUWeights, input: UnsafePointer<Float>, rows n: Int, out: UnsafeMutablePointer<Float>) {
        let h = model.config.hiddenSize, inner = mlp.intermediateSize
        let gate = ws.gate.reserve(n * inner), up = ws.up.reserve(n * inner)
        let prepared = MatMul.prepare(x: input, ldx: h, m: n, k: h, dtype: mlp.gate.dtype,
                                      scratch: ws.prepared.reserve(MatMul.scratchCount(m: n, k: h)))
        var jobs = ws.jobList(capacity: 2)
        jobs.append(MatMulJob(x: prepared.pointer, ldx: prepared.stride, m: n, w: mlp.gate, y: gate, ldy: inner))
        jobs.append(MatMulJob(x: prepared.pointer, ldx: prepared.stride, m: n, w: mlp.up, y: up, ldy: inner))
        MatMul.run(jobs.jobs, pool: model.pool, scratch: ws.region)
        Elementwise.swiglu(gate, up, n * inner)
        MatMul.multiply(x: gate, ldx: inner, m: n, w: mlp.down, y: out, ldy: h,
                        scratch: ws.preparedInner.reserve(MatMul.scratchCount(m: n, k: inner)), pool: model.pool,
                        regionScratch: ws.region)
    }

    /// Routes every token, groups tokens by expert, runs each chosen expert once over its group
    /// (experts no token chose cost nothing) and sums the weighted outputs into `ws.blockOut`.
    private func moeBlock(layer l: Int, moe: MoEWeights, input: UnsafeMutablePointer<Float>, rows n: Int,
                          routing: ResolvedRouting, trace: ForwardTrace?,
                          observer: (any RoutingObserver)?) -> LayerRoutingCounters {
        let h = model.config.hiddenSize, e = moe.numExperts, inner = moe.experts[0].intermediateSize
        let pool = model.pool

        // The input in the experts' activation layout, made once: the router and the shared
        // expert use it directly (when their dtype matches), and tokens are gathered from it.
        let dtype = moe.experts[0].gate.dtype
        let prepared = MatMul.prepare(x: input, ldx: h, m: n, k: h, dtype: dtype,
                                      scratch: ws.prepared.reserve(MatMul.scratchCount(m: n, k: h)))
        func preparedInput(for other: DType) -> (pointer: UnsafePointer<Float>, stride: Int) {
            other == dtype ? prepared : MatMul.prepare(x: input, ldx: h, m: n, k: h, dtype: other,
                                                       scratch: ws.preparedInner.reserve(MatMul.scratchCount(m: n, k: h)))
        }

        // 1. Router probabilities.
        let probs = ws.routerProbs.reserve(n * e)
        let routerInput = preparedInput(for: moe.router.dtype)
        MatMul.run(MatMulJob(x: routerInput.pointer, ldx: routerInput.stride, m: n, w: moe.router, y: probs, ldy: e),
                   pool: pool, scratch: ws.region)

        // 2. Softmax and selection per token.
        let chosen = ws.chosenExperts.reserve(n * e), chosenW = ws.chosenWeights.reserve(n * e)
        let counts = ws.chosenCounts.reserve(n), order = ws.order.reserve(e)
        var counters = ws.takeRoutingCounters(layer: l, numExperts: e)
        for t in 0..<n {
            let entropy = Elementwise.softmax(probs + t * e, e)
            let c = ExpertSelection.select(probs: probs + t * e, numExperts: e, routing: routing, order: order,
                                           experts: chosen + t * e, weights: chosenW + t * e)
            counts[t] = Int32(c)
            counters.record(probs: probs + t * e, experts: chosen + t * e, weights: chosenW + t * e, count: c,
                            entropy: entropy)
        }
        if let trace { recordTrace(trace, layer: l, probs: probs, chosen: chosen, weights: chosenW, counts: counts, n: n, e: e) }
        observer?.observe(RoutingObservation(layer: l, tokens: n, numExperts: e, experts: chosen, weights: chosenW,
                                     counts: counts, stride: e, probabilities: probs))

        // 3. Group (token, expert) assignments by expert (a counting sort keeps tokens in order)
        //    and gather the tokens of each expert that has several into one contiguous block of
        //    prepared rows. An expert with one token (every expert of a decode step) reads that
        //    token's row where it is: no copy, and the other thread reads one row instead of one
        //    copy per expert (2-thread native decode: grouping 90 -> 7 us per step).
        let offsets = ws.expertOffsets.reserve(e + 1)
        for i in 0...e { offsets[i] = 0 }
        for t in 0..<n { for j in 0..<Int(counts[t]) { offsets[Int(chosen[t * e + j]) + 1] += 1 } }
        for i in 0..<e { offsets[i + 1] += offsets[i] }
        let assignments = offsets[e]
        let aToken = ws.assignmentToken.reserve(max(1, assignments)), aWeight = ws.assignmentWeight.reserve(max(1, assignments))
        let gathered = ws.gathered.reserve(max(1, assignments) * h)
        do {
            let fill = ws.order.reserve(e)  // reuse as per-expert fill cursor
            for i in 0..<e { fill[i] = Int32(offsets[i]) }
            for t in 0..<n {
                for j in 0..<Int(counts[t]) {
                    let ex = Int(chosen[t * e + j])
                    let a = Int(fill[ex])
                    fill[ex] += 1
                    aToken[a] = Int32(t)
                    aWeight[a] = chosenW[t * e + j]
                    if offsets[ex + 1] - offsets[ex] > 1 {
                        (gathered + a * h).update(from: prepared.pointer + t * prepared.stride, count: h)
                    }
                }
            }
        }

        // 4. Gate and up projections of every used expert (and the shared expert) in one region.
        let gate = ws.gate.reserve(max(1, assignments) * inner), up = ws.up.reserve(max(1, assignments) * inner)
        var jobs = ws.jobList(capacity: 2 * e + 3)
        for ex in 0..<e where offsets[ex + 1] > offsets[ex] {
            let off = offsets[ex], m = offsets[ex + 1] - off
            let xe = m == 1 ? prepared.pointer + Int(aToken[off]) * prepared.stride : UnsafePointer(gathered + off * h)
            jobs.append(MatMulJob(x: xe, ldx: h, m: m, w: moe.experts[ex].gate, y: gate + off * inner, ldy: inner))
            jobs.append(MatMulJob(x: xe, ldx: h, m: m, w: moe.experts[ex].up, y: up + off * inner, ldy: inner))
        }
        var sharedInner = 0
        if let shared = moe.sharedExpert, let sharedGateW = moe.sharedExpertGate {
            sharedInner = shared.intermediateSize
            let sg = ws.sharedGate.reserve(n * sharedInner), su = ws.sharedUp.reserve(n * sharedInner)
            let scale = ws.sharedScale.reserve(n)
            let px = preparedInput(for: shared.gate.dtype)
            jobs.append(MatMulJob(x: px.pointer, ldx: px.stride, m: n, w: shared.gate, y: sg, ldy: sharedInner))
            jobs.append(MatMulJob(x: px.pointer, ldx: px.stride, m: n, w: shared.up, y: su, ldy: sharedInner))
            jobs.append(MatMulJob(x: px.pointer, ldx: px.stride, m: n, w: sharedGateW, y: scale, ldy: 1))
        }
        MatMul.run(jobs.jobs, pool: pool, scratch: ws.region)
        Elementwise.swiglu(gate, up, assignments * inner)
        if sharedInner > 0 { Elementwise.swiglu(ws.sharedGate.pointer, ws.sharedUp.pointer, n * sharedInner) }

        // 5. Down projections.
        let expertOut = ws.expertOut.reserve(max(1, assignments) * h)
        let preparedInner = MatMul.prepare(x: gate, ldx: inner, m: assignments, k: inner, dtype: dtype,
                                           scratch: ws.preparedInner.reserve(MatMul.scratchCount(m: assignments, k: inner)))
        jobs = ws.jobList(capacity: e + 1)
        for ex in 0..<e where offsets[ex + 1] > offsets[ex] {
            let off = offsets[ex], m = offsets[ex + 1] - off
            jobs.append(MatMulJob(x: preparedInner.pointer + off * preparedInner.stride, ldx: preparedInner.stride, m: m,
                                  w: moe.experts[ex].down, y: expertOut + off * h, ldy: h))
        }
        if let shared = moe.sharedExpert {
            let sp = MatMul.prepare(x: ws.sharedGate.pointer, ldx: sharedInner, m: n, k: sharedInner, dtype: shared.down.dtype,
                                    scratch: ws.prepared.reserve(MatMul.scratchCount(m: n, k: sharedInner)))
            jobs.append(MatMulJob(x: sp.pointer, ldx: sp.stride, m: n, w: shared.down, y: ws.sharedOut.reserve(n * h), ldy: h))
        }
        MatMul.run(jobs.jobs, pool: pool, scratch: ws.region)

        // 6. Weighted sum back into token order.
        let out = ws.blockOut.reserve(n * h)
        for i in 0..<(n * h) { out[i] = 0 }
        for a in 0..<assignments {
            let dst = out + Int(aToken[a]) * h, src = expertOut + a * h, w = aWeight[a]
            for c in 0..<h { dst[c] += w * src[c] }
        }
        if sharedInner > 0 {
            let so = ws.sharedOut.pointer, scale = ws.sharedScale.pointer
            for t in 0..<n {
                let g = Elementwise.sigmoid(scale[t])
                for c in 0..<h { out[t * h + c] += g * so[t * h + c] }
            }
        }
        return counters
    }

    private func recordTrace(_ trace: ForwardTrace, layer l: Int, probs: UnsafePointer<Float>, chosen: UnsafePointer<Int32>,
                             weights: UnsafePointer<Float>, counts: UnsafePointer<Int32>, n: Int, e: Int) {
        trace.routerProbs[l] = Array(UnsafeBufferPointer(start: probs, count: n * e))
        var mask = [UInt8](repeating: 0, count: n * e)
        var dense = [Float](repeating: 0, count: n * e)
        for t in 0..<n {
            for j in 0..<Int(counts[t]) {
                let ex = Int(chosen[t * e + j])
                mask[t * e + ex] = 1
                dense[t * e + ex] = weights[t * e + j]
            }
        }
        trace.selected[l] = mask
        trace.weights[l] = dense
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// The attention region of one layer: item (sequence, KV head, slice of the query positions)
/// attends the slice's query rows — every (position, query head of the group) — over that
/// sequence's cached keys and values, four rows at a time: the heads sharing the KV head, and
/// neighbouring positions, read each key and value from memory once for four rows instead of
/// once per row.
private struct AttentionItems: ParallelWork {
    let cache: KVCache
    let layer: Int
    /// Tokens per sequence in this call, and the position of the first.
    let batchLength: Int
    let startPosition: Int
    let kvHeads: Int
    let groupSize: Int
    let headDim: Int
    /// 1 / sqrt(headDim).
    let scale: Float
    let window: Int?
    let slices: Int
    let q: UnsafePointer<Float>
    let out: UnsafeMutablePointer<Float>
    let qDim: Int
    /// Attention.rowsPerStep score rows of `context` floats per item.
    let scores: UnsafeMutablePointer<Float>
    let context: Int

    func run(_ item: Int) {
        let T = batchLength, hd = headDim, step = Attention.rowsPerStep
        let slice = item % slices, kvh = (item / slices) % kvHeads, b = item / (slices * kvHeads)
        let keys = cache.keys(layer: layer, sequence: b, head: kvh)
        let values = cache.values(layer: layer, sequence: b, head: kvh)
        let s = scores + item * step * context
        let positions = (slice * T / slices)..<((slice + 1) * T / slices)
        let rowCount = positions.count * groupSize
        withUnsafeTemporaryAllocation(of: AttentionRow.self, capacity: step) { rows in
            var r = 0
            while r < rowCount {
                let n = min(step, rowCount - r)
                for i in 0..<n {
                    let t = positions.lowerBound + (r + i) / groupSize, g = (r + i) % groupSize
                    let pos = startPosition + t
                    let offset = (b * T + t) * qDim + (kvh * groupSize + g) * hd
                    rows.initializeElement(at: i, to: AttentionRow(query: q + offset, out: out + offset,
                                                                   first: window.map { max(0, pos - $0 + 1) } ?? 0,
                                                                   end: pos + 1))
                }
                Attention.attend(rows: UnsafeBufferPointer(rebasing: rows[0..<n]), keys: keys, values: values,
                                 element: cache.element, headDim: hd, scale: scale, scores: s)
                r += n
            }
        }
    }
}
