/// All scratch memory one forward pass needs. Owned by a session (or a one-shot forward), never
/// shared between threads.
package final class Workspace {
    let x = Scratch<Float>()            // residual stream [N, H]
    let normed = Scratch<Float>()       // normalised input of the current sub-block [N, H]
    let q = Scratch<Float>()            // [N, qDim]
    let k = Scratch<Float>()            // [N, kvDim]
    let v = Scratch<Float>()            // [N, kvDim]
    let attention = Scratch<Float>()    // attention output before o_proj [N, qDim]
    let blockOut = Scratch<Float>()     // output of a sub-block before the residual add [N, H]
    let prepared = Scratch<Float>()     // activations in MatMul's paired layout
    let preparedInner = Scratch<Float>()
    let scores = Scratch<Float>()       // attention scores, one row per (sequence, head)
    let rope = Scratch<Float>()         // cos/sin tables per position
    // MoE
    let routerProbs = Scratch<Float>()  // [N, E]
    let chosenExperts = Scratch<Int32>() // [N, E] per token, first count[t] valid
    let chosenWeights = Scratch<Float>()
    let chosenCounts = Scratch<Int32>() // [N]
    let order = Scratch<Int32>()        // [E]
    let expertOffsets = Scratch<Int>()  // [E + 1]
    let assignmentToken = Scratch<Int32>() // [A] token row of each (token, expert) assignment
    let assignmentWeight = Scratch<Float>() // [A]
    let gathered = Scratch<Float>()     // [A, H]
    let gate = Scratch<Float>()         // [A, I]
    let up = Scratch<Float>()           // [A, I]
    let expertOut = Scratch<Float>()    // [A, H]
    let sharedGate = Scratch<Float>()
    let sharedUp = Scratch<Float>()
    let sharedOut = Scratch<Float>()
    let sharedScale = Scratch<Float>()  // [N]
    let jobs = Scratch<MatMulJob>()     // the products of one parallel region
    let region = Scratch<UInt8>()       // schedules and item lists the pool's workers read
    /// This call's routing counters per layer (nil for layers without routing): kept between
    /// calls so their arrays are reused, not allocated per MoE layer per call.
    var routingCounters: [LayerRoutingCounters?] = []

    package init() {}

    /// An empty list of products, with room for `capacity`, in `jobs`.
    func jobList(capacity: Int) -> JobList { JobList(base: jobs.reserve(capacity), capacity: capacity) }

    /// Layer l's counters, zeroed, for `numExperts` experts; hand them back with
    /// `routingCounters[l] = ...` when the layer is done.
    func takeRoutingCounters(layer l: Int, numExperts: Int) -> LayerRoutingCounters {
        guard var counters = routingCounters[l].take(), counters.numExperts == numExperts else {
            return LayerRoutingCounters(numExperts: numExperts)
        }
        counters.reset()
        return counters
    }
}

/// Matrix products listed for one `MatMul.run` region, in workspace memory.
struct JobList {
    private let base: UnsafeMutablePointer<MatMulJob>
    private let capacity: Int
    private(set) var count = 0

    init(base: UnsafeMutablePointer<MatMulJob>, capacity: Int) {
        self.base = base
        self.capacity = capacity
    }

    mutating func append(_ job: MatMulJob) {
        precondition(count < capacity, "JobList: more products than the room reserved")
        base[count] = job
        count += 1
    }

    var jobs: UnsafeBufferPointer<MatMulJob> { UnsafeBufferPointer(start: base, count: count) }
}
