#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization
import CKernels

/// A persistent pool of worker threads for data-parallel kernels.
///
/// Decode runs about a hundred parallel regions per token, so waking threads through the kernel
/// for each would cost more than the work: workers spin briefly on a generation counter before
/// sleeping on a condition variable. When two sessions call into the same model at once, only
/// one owns the pool; the other runs its region on its own thread (`tryAcquire` fails), which is
/// correct and keeps both threads busy on a 2-core machine.
///
/// The workers share a `PoolState`, not the pool: the pool's owner (a model) releasing it is what
/// stops and joins them, which a worker holding the pool itself would prevent.
package final class ThreadPool: @unchecked Sendable {
    /// Threads taking part in a region, counting the caller.
    package let threadCount: Int
    private let state: PoolState
    private var threads: [pthread_t] = []

    /// Busy-wait iterations (each one PAUSE, tens of cycles) before a waiting thread yields the
    /// CPU: about a millisecond, longer than the gaps between a decode step's regions.
    static let spinsBeforeYield = 30_000

    /// The most threads a pool runs, counting the caller.
    package static let maxThreads = 256

    package init(threads requested: Int) {
        threadCount = requested > 0 ? min(requested, ThreadPool.maxThreads) : KernelChoice.onlineCPUs
        state = PoolState()
        for _ in 1..<threadCount {
            let retained = Unmanaged.passRetained(state)
            var thread = pthread_t()
            let rc = pthread_create(&thread, nil, { arg in
                Unmanaged<PoolState>.fromOpaque(arg!).takeRetainedValue().workerLoop()
                return nil
            }, retained.toOpaque())
            if rc == 0 { threads.append(thread) } else { retained.release() }
        }
    }

    deinit {
        state.stop()
        for t in threads { pthread_join(t, nil) }
    }

    /// Reads how many of this pool's worker threads are running, also after the pool is gone
    /// (for tests: releasing a pool must stop and join its threads).
    package func runningWorkersProbe() -> () -> Int {
        let state = self.state
        return { state.runningWorkers.load(ordering: .sequentiallyConsistent) }
    }

    /// Runs `work.run(i)` for every i in 0..<count, spread over the pool; returns when all are
    /// done. Items are handed out dynamically, so uneven items (experts with different token
    /// counts) balance themselves, and a worker the OS has not scheduled (more threads than free
    /// cores) is not waited for: the caller takes its items. The workers reach `work` through a
    /// pointer to it, held in the pool for the region's duration, and copy it before they start:
    /// a region allocates nothing (a closure stored for the workers would need a heap box per
    /// region, ~100 per decode step), and no worker reads the caller's stack while the caller
    /// writes it.
    package func parallelFor<W: ParallelWork>(_ count: Int, _ work: W) {
        if count <= 0 { return }
        if count == 1 || threads.isEmpty || !state.owned.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged {
            for i in 0..<count { work.run(i) }
            return
        }
        withUnsafePointer(to: work) { state.runRegion($0, count: count) }
        state.owned.store(false, ordering: .releasing)
    }
}

/// What the caller and the workers of a pool share.
private final class PoolState: @unchecked Sendable {
    let generation = Atomic<Int>(0)
    /// The last region whose items are all handed out: a worker arriving later stays out of it.
    let closedGeneration = Atomic<Int>(0)
    let nextIndex = Atomic<Int>(0)
    /// Workers inside the current region.
    let active = Atomic<Int>(0)
    let owned = Atomic<Bool>(false)
    let sleepers = Atomic<Int>(0)
    let stopping = Atomic<Bool>(false)
    let runningWorkers = Atomic<Int>(0)
    var taskCount = 0
    var task: (any RegionTask)? = nil
    var mutex = pthread_mutex_t()
    var wakeup = pthread_cond_t()

    init() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&wakeup, nil)
    }

    deinit {
        pthread_cond_destroy(&wakeup)
        pthread_mutex_destroy(&mutex)
    }

    func stop() {
        stopping.store(true, ordering: .sequentiallyConsistent)
        pthread_mutex_lock(&mutex)
        generation.add(1, ordering: .sequentiallyConsistent)
        pthread_cond_broadcast(&wakeup)
        pthread_mutex_unlock(&mutex)
    }

    func runRegion<W: ParallelWork>(_ work: UnsafePointer<W>, count: Int) {
        task = WorkReference(work: work)
        taskCount = count
        nextIndex.store(0, ordering: .relaxed)
        // Publishing the generation releases task/taskCount to the workers.
        let region = generation.add(1, ordering: .sequentiallyConsistent).newValue
        if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
            pthread_mutex_lock(&mutex)
            pthread_cond_broadcast(&wakeup)
            pthread_mutex_unlock(&mutex)
        }
        runItems(work.pointee, count)
        // Every item is taken. Close the region, then wait only for the workers that entered it
        // (a worker enters by counting itself active, then checking the region is still open;
        // with both sides sequentially consistent, either the worker sees it closed or this
        // thread sees it active).
        closedGeneration.store(region, ordering: .sequentiallyConsistent)
        var spins = 0
        while active.load(ordering: .sequentiallyConsistent) > 0 {
            spins += 1
            if spins < ThreadPool.spinsBeforeYield { ckernels_cpu_relax() } else { sched_yield() }
        }
        task = nil
    }

    func runItems<W: ParallelWork>(_ work: W, _ count: Int) {
        while true {
            let i = nextIndex.add(1, ordering: .relaxed).oldValue
            if i >= count { return }
            work.run(i)
        }
    }

    func workerLoop() {
        runningWorkers.add(1, ordering: .sequentiallyConsistent)
        defer { runningWorkers.subtract(1, ordering: .sequentiallyConsistent) }
        // Generation 0 is the pool's initial state; a region published before this thread got
        // here must still be seen, so do not read the current value.
        var seen = 0
        while true {
            var spins = 0
            var current = generation.load(ordering: .acquiring)
            while current == seen {
                spins += 1
                if spins < ThreadPool.spinsBeforeYield {
                    ckernels_cpu_relax()  // the next region usually starts within microseconds
                } else if spins < 2 * ThreadPool.spinsBeforeYield {
                    sched_yield()
                } else {
                    pthread_mutex_lock(&mutex)
                    sleepers.add(1, ordering: .sequentiallyConsistent)
                    while generation.load(ordering: .sequentiallyConsistent) == seen {
                        pthread_cond_wait(&wakeup, &mutex)
                    }
                    sleepers.subtract(1, ordering: .sequentiallyConsistent)
                    pthread_mutex_unlock(&mutex)
                    spins = 0
                }
                current = generation.load(ordering: .acquiring)
            }
            seen = current
            if stopping.load(ordering: .acquiring) { return }
            active.add(1, ordering: .sequentiallyConsistent)
            if closedGeneration.load(ordering: .sequentiallyConsistent) < current, let task {
                task.runItems(on: self, count: taskCount)
            }
            active.subtract(1, ordering: .sequentiallyConsistent)
        }
    }
}

/// The items of one parallel region: `run(i)` does item i. Implementations are small structs of
/// pointers and sizes, built on the caller's stack.
package protocol ParallelWork {
    func run(_ item: Int)
}

/// What the workers hold during a region.
private protocol RegionTask {
    func runItems(on pool: PoolState, count: Int)
}

/// A pointer to the caller's work, which lives until `parallelFor` returns. One word, so it fits
/// an existential's inline buffer (no heap box).
private struct WorkReference<W: ParallelWork>: RegionTask {
    let work: UnsafePointer<W>

    func runItems(on pool: PoolState, count: Int) {
        let copy = work.pointee  // the work lives in the caller's frame, next to lines it writes
        pool.runItems(copy, count)
    }
}

/// Runs `body` with `byteCount` bytes of scratch that share no cache line with anything else: in
/// `scratch` when given (a session's workspace), else on the stack up to 960 bytes and on the
/// heap beyond. For data a region's workers read (schedules, claimed ranges): on the caller's
/// stack without padding they would share lines with the frames the caller pushes and writes
/// while the region runs.
func withRegionScratch<R>(byteCount: Int, in scratch: Scratch<UInt8>?, _ body: (UnsafeMutableRawPointer) -> R) -> R {
    let line = 64, bytes = (byteCount + line - 1) / line * line + line
    if let scratch { return body(UnsafeMutableRawPointer(scratch.reserve(bytes)).alignedUp(toMultipleOf: line)) }
    // Aligned by hand: the stack allocation falls back to the heap for alignments above 16.
    return withUnsafeTemporaryAllocation(byteCount: bytes, alignment: 16) {
        body($0.baseAddress!.alignedUp(toMultipleOf: line))
    }
}

