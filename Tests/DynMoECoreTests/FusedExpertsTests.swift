import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import DynMoECore

/// Checkpoints written by transformers >= 5 store each MoE layer's routed experts as two 3-D
/// tensors: `mlp.experts.gate_up_proj` [E, 2I, H] (expert e's gate rows, then its up rows) and
/// `mlp.experts.down_proj` [E, H, I]; Mixtral's block is renamed from `block_sparse_moe` to
/// `mlp`. Each fixture checkpoint is rewritten that way here (same weights, new layout) and must
/// reproduce the fixture's reference outputs exactly as the original layout does.
@Suite("Fused expert tensors")
struct FusedExpertsTests {
    static let families = ["mixtral-tiny", "olmoe-tiny", "qwen2moe-tiny", "qwen3moe-tiny-bf16"]

    /// Per-expert names of one fixture family: block, gate, up, down.
    static func names(_ fixture: String) -> (block: String, gate: String, up: String, down: String) {
        fixture == "mixtral-tiny" ? ("block_sparse_moe", "w1", "w3", "w2") : ("mlp", "gate_proj", "up_proj", "down_proj")
    }

    /// The fixture's tensors with every MoE layer's experts fused, in transformers 5 naming.
    static func fused(_ fixture: String, numExperts: Int, moeLayers: [Int]) throws -> [RawTensor] {
        let n = names(fixture)
        var byName: [String: RawTensor] = [:]
        for t in try fixtureTensors(fixture) { byName[t.name] = t }
        for l in moeLayers {
            let old = "model.layers.\(l).\(n.block)", new = "model.layers.\(l).mlp"
            func take(_ e: Int, _ part: String) throws -> RawTensor {
                let tensor = byName.removeValue(forKey: "\(old).experts.\(e).\(part).weight")
                return try #require(tensor, "\(old).experts.\(e).\(part).weight")
            }
            var gateUp: [UInt8] = [], down: [UInt8] = []
            var shape: (width: Int, hidden: Int, dtype: String) = (0, 0, "")
            for e in 0..<numExperts {
                let gate = try take(e, n.gate), up = try take(e, n.up), d = try take(e, n.down)
                shape = (gate.shape[0], gate.shape[1], gate.dtype)
                gateUp += gate.data + up.data
                down += d.data
            }
            byName["\(new).experts.gate_up_proj"] = RawTensor(name: "\(new).experts.gate_up_proj", dtype: shape.dtype,
                                                               shape: [numExperts, 2 * shape.width, shape.hidden], data: gateUp)
            byName["\(new).experts.down_proj"] = RawTensor(name: "\(new).experts.down_proj", dtype: shape.dtype,
                                                            shape: [numExperts, shape.hidden, shape.width], data: down)
            let removed = byName.removeValue(forKey: "\(old).gate.weight")
            var router = try #require(removed)
            router.name = "\(new).gate.weight"
            byName[router.name] = router
        }
        return byName.keys.sorted().map { byName[$0]! }
    }

    @Test(arguments: families)
    func fusedLayoutReproducesTheReference(fixtureName: String) throws {
        let fixture = try Fixture(fixtureName)
        let original = try Model(directory: fixture.modelDirectory)
        let tensors = try Self.fused(fixtureName, numExperts: original.config.numExperts, moeLayers: fixture.moeLayers)
        #expect(!tensors.contains { $0.name.contains(".experts.0.") }, "every per-expert tensor was fused")
        let scratch = try rewrittenFixture(fixtureName, tensors: tensors)
        let model = try Model(directory: scratch.path)
        #expect(model.totalParameters == original.totalParameters)
        #expect(model.alwaysActiveParameters == original.alwaysActiveParameters)

        try expectReproducesReference(model, fixture)
    }

    @Test func wrongFusedShapeIsAClearError() throws {
        let fixture = try Fixture("qwen3moe-tiny-bf16")
        let original = try Model(directory: fixture.modelDirectory)
        var tensors = try Self.fused(fixture.name, numExperts: original.config.numExperts, moeLayers: fixture.moeLayers)
        let i = try #require(tensors.firstIndex { $0.name.hasSuffix("experts.down_proj") })
        // Transposed [E, I, H] instead of [E, H, I]: same size, wrong layout.
        tensors[i].shape = [tensors[i].shape[0], tensors[i].shape[2], tensors[i].shape[1]]
        let scratch = try rewrittenFixture(fixture.name, tensors: tensors)
        expectError(.format, naming: ["experts.down_proj", "expected"]) { try scratch.load() }
    }

    @Test func perExpertTensorsBesideFusedOnesAreRejected() throws {
        let fixture = try Fixture("qwen3moe-tiny-bf16")
        let original = try Model(directory: fixture.modelDirectory)
        var tensors = try Self.fused(fixture.name, numExperts: original.config.numExperts, moeLayers: fixture.moeLayers)
        let extra = try fixtureTensors(fixture.name).first { $0.name.hasSuffix("experts.0.gate_proj.weight") }
        tensors.append(try #require(extra))
        let scratch = try rewrittenFixture(fixture.name, tensors: tensors)
        expectError(.format, naming: ["unexpected tensor", "experts.0.gate_proj"]) { try scratch.load() }
    }
}
