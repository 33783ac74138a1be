import Testing
@testable import DynMoECore

/// F16 weights end to end. The bf16 fixture's weights, written as f16, are the same numbers
/// (bf16's 8 significant bits fit f16's 11 wherever the exponent is in f16's range, which is all
/// but a couple of tiny values here), so the f16 checkpoint must reproduce the fixture's
/// references: this runs the f16 paths of every kernel (decode streams, prefill tiles, F16C
/// widening) against the oracle, not only against our own reference product.
@Suite("F16 checkpoints")
struct F16CheckpointTests {
    /// The values of a BF16 tensor.
    static func bf16Values(_ t: RawTensor) -> [Float] {
        stride(from: 0, to: t.data.count, by: 2).map { i in
            Float(bitPattern: (UInt32(t.data[i]) | UInt32(t.data[i + 1]) << 8) << 16)
        }
    }

    static func asF16(_ t: RawTensor) -> RawTensor {
        guard t.dtype == "BF16" else { return t }
        var out = t
        out.dtype = "F16"
        out.data = bf16Values(t).flatMap { value -> [UInt8] in
            let half = Float16(value).bitPattern
            return [UInt8(truncatingIfNeeded: half), UInt8(truncatingIfNeeded: half >> 8)]
        }
        return out
    }

    @Test func f16CopyOfTheBF16FixtureReproducesTheReference() throws {
        let fixture = try Fixture("qwen3moe-tiny-bf16")
        let original = try fixtureTensors(fixture.name)
        let tensors = original.map(Self.asF16)
        #expect(tensors.allSatisfy { $0.dtype == "F16" })
        // How many values f16 cannot hold exactly (tiny ones): a handful, far below tolerance.
        let inexact = original.flatMap(Self.bf16Values).filter { Float(Float16($0)) != $0 }.count
        #expect(inexact <= 4, "\(inexact) bf16 values are not exact in f16")

        let scratch = try rewrittenFixture(fixture.name, tensors: tensors)
        let model = try Model(directory: scratch.path)
        #expect(model.weightDType == .f16)
        try expectReproducesReference(model, fixture)
    }
}
