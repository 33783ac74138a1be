#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where forward passes' wall time went, in seconds, summed over passes: what the routing
/// statistics cannot show, namely what the experts actually cost. Each part spans a sub-block
/// from its norm to its output: `attention` (q/k/v, attention over the KV cache, output
/// projection), `moe` (router, selection, routing observers, chosen and shared experts, the
/// weighted sum), `dense` (dense MLP layers), `head` (final norm and LM head). What no part holds
/// (argument checks, embedding lookup, residual adds, trace recording) is `other`.
package struct ForwardTiming: Sendable, Equatable {
    package var passes = 0
    package var tokens = 0
    package var total = 0.0
    package var attention = 0.0
    package var moe = 0.0
    package var dense = 0.0
    package var head = 0.0

    package init() {}

    package var other: Double { max(0, total - attention - moe - dense - head) }

    package mutating func add(_ pass: ForwardTiming) {
        passes += pass.passes
        tokens += pass.tokens
        total += pass.total
        attention += pass.attention
        moe += pass.moe
        dense += pass.dense
        head += pass.head
    }
}

/// Seconds on the monotonic clock. A vDSO call of a few tens of nanoseconds; a pass reads it
/// three times per layer, far below a microsecond per token.
package enum MonotonicClock {
    package static func now() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
    }
}
