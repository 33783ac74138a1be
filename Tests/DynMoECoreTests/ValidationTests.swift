#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Testing
@testable import DynMoECore

// Every validation rule of the loader and of the API-level arguments, one test each: a checkpoint
// (a scratch copy of a fixture under /tmp, mutated) or a call that breaks exactly that rule must
// fail with the right ErrorKind and a message naming the culprit (file path, tensor name, field
// name or argument). Plus unit tests of the routing rule itself (ExpertSelection.select).

// MARK: - Scratch files

/// Small file-system helpers on Glibc (the package does not use Foundation).
enum Files {
    static func read(_ path: String) throws -> [UInt8] {
        try MappedFile.readText(path, limit: 1 << 30)
    }

    static func write(_ path: String, _ bytes: [UInt8]) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw DynMoEError.io("test helper: cannot create \(path)") }
        defer { close(fd) }
        var done = 0
        try bytes.withUnsafeBytes { raw in
            while done < raw.count {
                let n = Glibc.write(fd, raw.baseAddress! + done, raw.count - done)
                guard n > 0 else { throw DynMoEError.io("test helper: cannot write \(path)") }
                done += n
            }
        }
    }

    static func write(_ path: String, text: String) throws { try write(path, Array(text.utf8)) }

    static func list(_ dir: String) -> [String] {
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var names: [String] = []
        while let entry = readdir(d) {
            let name = withUnsafePointer(to: &entry.pointee.d_name) {
                String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self))
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    static func removeTree(_ path: String) {
        if isDirectory(path) {
            for name in list(path) { removeTree(path + "/" + name) }
            rmdir(path)
        } else {
            unlink(path)
        }
    }

    static func makeTemporaryDirectory() -> String {
        var template = Array("/tmp/dynmoe-validation-XXXXXX".utf8CString)
        let result = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(result != nil, "mkdtemp failed")
        return String(cString: result!)
    }
}

/// One tensor of a safetensors file, with its raw bytes.
struct RawTensor {
    var name: String
    var dtype: String
    var shape: [Int]
    var data: [UInt8]

    /// Every tensor of a safetensors file, in file order, with a copy of its bytes.
    static func all(in path: String) throws -> [RawTensor] {
        let f = try SafeTensorsFile(path: path)
        return f.orderedNames.map { n in
            let v = f.tensors[n]!
            return RawTensor(name: n, dtype: v.dtype.rawValue, shape: v.shape,
                             data: Array(UnsafeRawBufferPointer(start: v.data, count: v.byteCount)))
        }
    }
}

/// A scratch copy of a fixture checkpoint (or an empty directory) under /tmp, deleted with the object.
final class ScratchCheckpoint {
    let path: String

    init(copying fixtureName: String? = "mixtral-tiny") throws {
        path = Files.makeTemporaryDirectory()
        if let fixtureName {
            let source = "\(fixturesDirectory)/\(fixtureName)/model"
            for name in Files.list(source) { try Files.write(path + "/" + name, try Files.read(source + "/" + name)) }
        }
    }

    deinit { Files.removeTree(path) }

    func file(_ name: String) -> String { path + "/" + name }

    func remove(_ name: String) { unlink(file(name)) }

    func load() throws { _ = try Model(directory: path) }

    // config.json / index.json

    func json(_ name: String) throws -> JSONValue { try Checkpoint.parseJSONFile(file(name), limit: Checkpoint.maxIndexBytes) }

    /// Rewrites a JSON file (config.json by default) after `edit` changed its top-level members.
    func editJSON(_ name: String = "config.json", _ edit: (inout JSONObject) -> Void) throws {
        var object = JSONObject(try json(name))
        edit(&object)
        try Files.write(file(name), text: renderJSON(object.value))
    }

    // safetensors

    func tensors(_ name: String = "model.safetensors") throws -> [RawTensor] { try RawTensor.all(in: file(name)) }

    /// Writes a well-formed safetensors file: the tensors laid out contiguously in order.
    func writeTensors(_ tensors: [RawTensor], to name: String = "model.safetensors") throws {
        var entries: [(key: String, value: JSONValue)] = [("__metadata__", .object([("format", .string("pt"))]))]
        var data: [UInt8] = []
        for t in tensors {
            entries.append((t.name, .object([("dtype", .string(t.dtype)),
                                             ("shape", .array(t.shape.map { .int(Int64($0)) })),
                                             ("data_offsets", .array([.int(Int64(data.count)), .int(Int64(data.count + t.data.count))]))])))
            data += t.data
        }
        try writeRawSafeTensors(header: renderJSON(.object(entries)), data: data, to: name)
    }

    /// Writes a safetensors file from a header text and data section as given; `declaredLength`
    /// overrides the 8-byte header length.
    func writeRawSafeTensors(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil,
                             to name: String = "model.safetensors") throws {
        let text = Array(header.utf8)
        let length = declaredLength ?? UInt64(text.count)
        var bytes = (0..<8).map { UInt8(truncatingIfNeeded: length >> (8 * UInt64($0))) }
        bytes += text
        bytes += data
        try Files.write(file(name), bytes)
    }

    /// Rewrites model.safetensors after `edit` changed its tensor list.
    func editTensors(_ name: String = "model.safetensors", _ edit: (inout [RawTensor]) -> Void) throws {
        var list = try tensors(name)
        edit(&list)
        try writeTensors(list, to: name)
    }
}

/// Ordered, editable top-level members of a JSON object.
struct JSONObject {
    var members: [(key: String, value: JSONValue)]

    init(_ value: JSONValue) { members = value.objectMembers ?? [] }

    var value: JSONValue { .object(members) }

    subscript(key: String) -> JSONValue? {
        get { members.first { $0.key == key }?.value }
        set {
            if let i = members.firstIndex(where: { $0.key == key }) {
                if let newValue { members[i].value = newValue } else { members.remove(at: i) }
            } else if let newValue {
                members.append((key, newValue))
            }
        }
    }
}

func renderJSON(_ value: JSONValue) -> String {
    switch value {
    case .null: return "null"
    case .bool(let b): return b ? "true" : "false"
    case .int(let i): return String(i)
    case .double(let d):
        if d.isNaN { return "NaN" }
        if d.isInfinite { return d > 0 ? "Infinity" : "-Infinity" }
        return "\(d)"
    case .string(let s): return JSONWriter.quote(s)
    case .array(let a): return "[" + a.map(renderJSON).joined(separator: ",") + "]"
    case .object(let m): return "{" + m.map { JSONWriter.quote($0.key) + ":" + renderJSON($0.value) }.joined(separator: ",") + "}"
    }
}

func floatBytes(_ values: [Float]) -> [UInt8] {
    values.flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: v.bitPattern >> (8 * UInt32($0))) } }
}

// MARK: - Expectations

/// Runs `body`, which must throw a DynMoEError of `kind` whose message contains every string of
/// `culprits`. Returns the error for further checks.
@discardableResult
func expectError(_ kind: ErrorKind, naming culprits: [String], sourceLocation: SourceLocation = #_sourceLocation,
                 _ body: () throws -> Void) -> DynMoEError? {
    do {
        try body()
        Issue.record("expected a .\(kind) error naming \(culprits), but the call succeeded", sourceLocation: sourceLocation)
        return nil
    } catch let error as DynMoEError {
        #expect(error.kind == kind, "kind .\(error.kind), expected .\(kind); message: \(error.message)",
                sourceLocation: sourceLocation)
        for culprit in culprits {
            #expect(error.message.contains(culprit), "message does not name \(culprit): \(error.message)",
                    sourceLocation: sourceLocation)
        }
        return error
    } catch {
        Issue.record("expected a DynMoEError, got \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

// MARK: - Calls

func runForward(_ model: Model, _ tokens: [Int32], batch: Int, length: Int, routing: RoutingPlan = .native) throws {
    let tokens = tokens.isEmpty ? [0] : tokens
    var logits = [Float](repeating: 0, count: max(1, batch * length) * model.vocabSize)
    _ = try tokens.withUnsafeBufferPointer { t in
        try logits.withUnsafeMutableBufferPointer { l in
            try model.forward(tokens: t.baseAddress!, batch: batch, length: length, routing: routing, logits: l.baseAddress!)
        }
    }
}

func runEvaluate(_ session: Session, _ tokens: [Int32], length: Int) throws {
    let tokens = tokens.isEmpty ? [0] : tokens
    var logits = [Float](repeating: 0, count: session.sequences * session.model.vocabSize)
    _ = try tokens.withUnsafeBufferPointer { t in
        try logits.withUnsafeMutableBufferPointer { l in
            try session.evaluate(tokens: t.baseAddress!, length: length, logits: l.baseAddress!, logitRows: .last)
        }
    }
}

func makeSession(_ model: Model, sequences: Int = 1, capacity: Int = 0, budget: Int = 0) throws -> Session {
    var options = SessionOptions()
    options.sequences = sequences
    options.capacity = capacity
    options.memoryBudget = budget
    return try Session(model: model, options: options)
}

let mixtralDirectory = "\(fixturesDirectory)/mixtral-tiny/model"

// MARK: - Checkpoint files

@Suite("Validation: checkpoint files")
struct CheckpointFileValidationTests {
    @Test func missingDirectoryIsAnIOErrorNamingIt() throws {
        let scratch = try ScratchCheckpoint(copying: nil)
        let missing = scratch.path + "/no-such-checkpoint"
        expectError(.io, naming: [missing]) { _ = try Model(directory: missing) }
    }

    @Test func missingConfigIsAnIOErrorNamingIt() throws {
        let scratch = try ScratchCheckpoint()
        scratch.remove("config.json")
        expectError(.io, naming: [scratch.file("config.json")]) { try scratch.load() }
    }

    @Test func noSafetensorsFileIsAnIOErrorNamingTheDirectory() throws {
        let scratch = try ScratchCheckpoint()
        scratch.remove("model.safetensors")
        expectError(.io, naming: [scratch.path, "model.safetensors"]) { try scratch.load() }
    }

    @Test func configWithInvalidJSONIsAFormatError() throws {
        let scratch = try ScratchCheckpoint()
        try Files.write(scratch.file("config.json"), text: "{ \"hidden_size\": 32, ")
        expectError(.format, naming: [scratch.file("config.json")]) { try scratch.load() }
    }

    @Test func configThatIsNotAnObjectIsAFormatError() throws {
        let scratch = try ScratchCheckpoint()
        try Files.write(scratch.file("config.json"), text: "[32, 2]")
        expectError(.format, naming: [scratch.file("config.json")]) { try scratch.load() }
    }

    @Test func indexPointingAtAMissingShardIsAnIOErrorNamingTheShard() throws {
        let scratch = try ScratchCheckpoint(copying: "olmoe-tiny")
        scratch.remove("model-00003-of-00006.safetensors")
        expectError(.io, naming: [scratch.file("model-00003-of-00006.safetensors")]) { try scratch.load() }
    }

    @Test func indexNamingATensorMissingFromItsShardIsAFormatError() throws {
        let scratch = try ScratchCheckpoint(copying: "olmoe-tiny")
        try scratch.editJSON("model.safetensors.index.json") { index in
            var map = JSONObject(index["weight_map"]!)
            map["model.layers.0.bogus.weight"] = .string("model-00001-of-00006.safetensors")
            index["weight_map"] = map.value
        }
        expectError(.format, naming: ["model.layers.0.bogus.weight", "model-00001-of-00006.safetensors"]) { try scratch.load() }
    }

    @Test func indexPointingATensorAtTheWrongShardIsAFormatError() throws {
        let scratch = try ScratchCheckpoint(copying: "olmoe-tiny")
        let wrongShard = "model-00006-of-00006.safetensors"
        let map = try scratch.json("model.safetensors.index.json")["weight_map"]!.objectMembers!
        let tensor = try #require(map.first { $0.value.stringValue != wrongShard }).key
        try scratch.editJSON("model.safetensors.index.json") { index in
            var map = JSONObject(index["weight_map"]!)
            map[tensor] = .string(wrongShard)
            index["weight_map"] = map.value
        }
        expectError(.format, naming: [tensor, wrongShard]) { try scratch.load() }
    }

    @Test func indexShardNamesMayStartWithDotSlash() throws {
        let scratch = try ScratchCheckpoint(copying: "olmoe-tiny")
        try scratch.editJSON("model.safetensors.index.json") { index in
            var map = JSONObject(index["weight_map"]!)
            map.members = map.members.map { ($0.key, .string("./" + $0.value.stringValue!)) }
            index["weight_map"] = map.value
        }
        try scratch.load()
    }

    @Test func singleFileWinsOverAnIndexBesideIt() throws {
        // As in transformers: model.safetensors is loaded, a stale index next to it is not read.
        let scratch = try ScratchCheckpoint()
        try Files.write(scratch.file("model.safetensors.index.json"), text: #"{"weight_map": {"x": "missing.safetensors"}}"#)
        try scratch.load()
    }

    @Test func nullMetadataCountsAsAbsent() throws {
        // The reference reader treats "__metadata__": null as no metadata. Same header length
        // (padded with spaces), so every offset stays valid.
        let scratch = try ScratchCheckpoint()
        let bytes = try Files.read(scratch.file("model.safetensors"))
        let length = Int(bytes[0..<8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        let header = String(decoding: bytes[8..<(8 + length)], as: UTF8.self)
        let metadata = #""__metadata__":{"format":"pt"}"#, null = #""__metadata__":null"#
        #expect(header.contains(metadata))
        var edited = Array(header.replacing(metadata, with: null).utf8)
        edited += [UInt8](repeating: 0x20, count: length - edited.count)
        try Files.write(scratch.file("model.safetensors"), Array(bytes[0..<8]) + edited + bytes[(8 + length)...])
        try scratch.load()
    }

    @Test func unchangedRewriteLoads() throws {
        // Control: the helpers' round trip (safetensors re-laid out, config re-rendered) is loadable,
        // so the failures below come from the one rule each test breaks.
        let scratch = try ScratchCheckpoint()
        try scratch.editTensors { _ in }
        try scratch.editJSON { _ in }
        try scratch.load()
    }

    @Test func pathThatIsAFileIsAnIOErrorSayingItIsNotADirectory() throws {
        let scratch = try ScratchCheckpoint()
        let file = scratch.file("config.json")
        let error = expectError(.io, naming: [file, "not a directory"]) { _ = try Model(directory: file) }
        #expect(error.map { !$0.message.contains("config.json/config.json") } ?? false)
    }

    @Test func symbolicLinkLoopIsReportedAsItselfNotAsMissing() throws {
        let scratch = try ScratchCheckpoint()
        scratch.remove("model.safetensors")
        #expect(symlink("model.safetensors", scratch.file("model.safetensors")) == 0)
        expectError(.io, naming: [scratch.file("model.safetensors"), "cannot stat"]) { try scratch.load() }
    }

    @Test
    func namedPipeIsRefusedWithoutBlocking() throws {
        let scratch = try ScratchCheckpoint()
        scratch.remove("model.safetensors")
        #expect(mkfifo(scratch.file("model.safetensors"), 0o644) == 0)
        expectError(.io, naming: [scratch.file("model.safetensors")]) { try scratch.load() }
    }
}

// MARK: - Safetensors structure

@Suite("Validation: safetensors structure")
struct SafeTensorsValidationTests {
    /// A mixtral copy whose model.safetensors is replaced by `header` + `data`.
    func scratch(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) throws -> ScratchCheckpoint {
        let s = try ScratchCheckpoint()
        try s.writeRawSafeTensors(header: header, data: data, declaredLength: declaredLength)
        return s
    }

    func entry(_ name: String, _ dtype: String, _ shape: [Int], _ begin: Int, _ end: Int) -> String {
        "\"\(name)\":{\"dtype\":\"\(dtype)\",\"shape\":\(shape),\"data_offsets\":[\(begin),\(end)]}"
    }

    @Test func fileShorterThan8Bytes() throws {
        for size in [0, 1, 7] {
            let s = try ScratchCheckpoint()
            try Files.write(s.file("model.safetensors"), [UInt8](repeating: 0, count: size))
            expectError(.format, naming: [s.file("model.safetensors")]) { try s.load() }
        }
    }

    @Test func headerLengthBeyondTheFile() throws {
        let s = try scratch(header: "{}", declaredLength: 1000)
        expectError(.format, naming: [s.file("model.safetensors"), "1000"]) { try s.load() }
    }

    @Test func absurdHeaderLengthIsRefusedBeforeReading() throws {
        for length in [UInt64(SafeTensorsFile.maxHeaderBytes) + 1, 200 << 20, UInt64.max] {
            let s = try scratch(header: "{}", declaredLength: length)
            expectError(.format, naming: [s.file("model.safetensors"), "\(length)"]) { try s.load() }
        }
    }

    @Test func invalidJSONHeader() throws {
        let s = try scratch(header: "{\"a\": {\"dtype\": ")
        expectError(.format, naming: [s.file("model.safetensors")]) { try s.load() }
    }

    @Test func headerNotAnObject() throws {
        let s = try scratch(header: "[1, 2, 3]")
        expectError(.format, naming: [s.file("model.safetensors"), "object"]) { try s.load() }
    }

    @Test func unknownDType() throws {
        let s = try scratch(header: "{" + entry("a", "Q9_Z", [2], 0, 2) + "}", data: [0, 0])
        expectError(.format, naming: [s.file("model.safetensors"), "\"a\"", "Q9_Z"]) { try s.load() }
    }

    @Test func validSafetensorsDTypeThatDynmoeDoesNotHandleIsUnsupported() throws {
        // F8_E4M3 / F8_E5M2 are valid safetensors dtypes, i.e. valid input dynmoe does not handle,
        // which dynmoe.h documents as DYNMOE_ERR_UNSUPPORTED (not a malformed file).
        for dtype in ["F8_E4M3", "F8_E5M2"] {
            let s = try scratch(header: "{" + entry("a", dtype, [2], 0, 2) + "}", data: [0, 0])
            expectError(.unsupported, naming: [s.file("model.safetensors"), "\"a\"", dtype]) { try s.load() }
        }
    }

    @Test func dataOffsetsOutOfRange() throws {
        let s = try scratch(header: "{" + entry("a", "F32", [4], 0, 16) + "}", data: [UInt8](repeating: 0, count: 8))
        expectError(.format, naming: [s.file("model.safetensors"), "\"a\""]) { try s.load() }
    }

    @Test func dataOffsetsEndBeforeBegin() throws {
        let s = try scratch(header: "{" + entry("a", "F32", [2], 8, 0) + "}", data: [UInt8](repeating: 0, count: 8))
        expectError(.format, naming: [s.file("model.safetensors"), "\"a\""]) { try s.load() }
    }

    @Test func negativeDimension() throws {
        let s = try scratch(header: "{" + entry("a", "F32", [-2], 0, 8) + "}", data: [UInt8](repeating: 0, count: 8))
        expectError(.format, naming: [s.file("model.safetensors"), "\"a\""]) { try s.load() }
    }

    @Test func overlappingTensors() throws {
        let s = try scratch(header: "{" + entry("a", "F32", [2], 0, 8) + "," + entry("b", "F32", [2], 4, 12) + "}",
                            data: [UInt8](repeating: 0, count: 12))
        let error = expectError(.format, naming: [s.file("model.safetensors"), "overlap"]) { try s.load() }
        if let m = error?.message { #expect(m.contains("\"a\"") || m.contains("\"b\""), "names neither tensor: \(m)") }
    }

    @Test func gapBetweenTensors() throws {
        let s = try scratch(header: "{" + entry("a", "F32", [2], 0, 8) + "," + entry("b", "F32", [2], 12, 20) + "}",
                            data: [UInt8](repeating: 0, count: 20))
        let error = expectError(.format, naming: [s.file("model.safetensors"), "gap"]) { try s.load() }
        if let m = error?.message { #expect(m.contains("\"a\"") || m.contains("\"b\""), "names neither tensor: \(m)") }
    }

    @Test func trailingBytesNotCoveredByAnyTensor() throws {
        let s = try scratch(header: "{" + entry("a", "F32", [2], 0, 8) + "}", data: [UInt8](repeating: 0, count: 12))
        expectError(.format, naming: [s.file("model.safetensors"), "12"]) { try s.load() }
    }

    @Test func headerOrderDifferentFromDataOrderIsValid() throws {
        // Misordered entries are fine as long as the data section is exactly tiled.
        let s = try scratch(header: "{" + entry("b", "F32", [2], 8, 16) + "," + entry("a", "F32", [2], 0, 8) + "}",
                            data: floatBytes([1, 2, 3, 4]))
        let file = try SafeTensorsFile(path: s.file("model.safetensors"))
        #expect(file.tensor("a")!.floats() == [1, 2])
        #expect(file.tensor("b")!.floats() == [3, 4])
    }

    @Test func byteLengthDifferentFromDTypeTimesShape() throws {
        let s = try scratch(header: "{" + entry("a", "F32", [3], 0, 8) + "}", data: [UInt8](repeating: 0, count: 8))
        expectError(.format, naming: [s.file("model.safetensors"), "\"a\""]) { try s.load() }
    }

    @Test func nonIntegerDimensionOrOffset() throws {
        // The format's shapes and offsets are integers; `2.0` is not one, even if it is integral.
        let shape = try scratch(header: "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}",
                                data: [UInt8](repeating: 0, count: 8))
        expectError(.format, naming: [shape.file("model.safetensors"), "\"a\"", "dimension"]) { try shape.load() }
        let offsets = try scratch(header: "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.0]}}",
                                  data: [UInt8](repeating: 0, count: 8))
        expectError(.format, naming: [offsets.file("model.safetensors"), "\"a\"", "data_offsets"]) { try offsets.load() }
    }

    @Test func duplicateTensorNames() throws {
        let s = try scratch(header: "{" + entry("a", "F32", [2], 0, 8) + "," + entry("a", "F32", [2], 8, 16) + "}",
                            data: [UInt8](repeating: 0, count: 16))
        expectError(.format, naming: [s.file("model.safetensors"), "\"a\""]) { try s.load() }
    }
}

// MARK: - config.json

@Suite("Validation: config.json")
struct ConfigValidationTests {
    func scratch(_ fixture: String = "mixtral-tiny", _ edit: (inout JSONObject) -> Void) throws -> ScratchCheckpoint {
        let s = try ScratchCheckpoint(copying: fixture)
        try s.editJSON("config.json", edit)
        return s
    }

    @Test(arguments: ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                      "num_local_experts", "num_experts_per_tok"])
    func missingRequiredField(field: String) throws {
        let s = try scratch { $0[field] = nil }
        expectError(.format, naming: [s.file("config.json"), field]) { try s.load() }
    }

    @Test(arguments: [("hidden_size", Int64(0)), ("num_hidden_layers", -1), ("num_attention_heads", 0), ("vocab_size", -5),
                      ("intermediate_size", 0), ("num_local_experts", 0), ("num_experts_per_tok", 0),
                      ("num_key_value_heads", -2), ("max_position_embeddings", 0)])
    func nonPositiveSize(field: String, value: Int64) throws {
        let s = try scratch { $0[field] = .int(value) }
        expectError(.format, naming: [s.file("config.json"), field, "\(value)"]) { try s.load() }
    }

    @Test(arguments: [("hidden_size", JSONValue.string("32")), ("hidden_size", .double(32.5)), ("num_hidden_layers", .bool(true)),
                      ("vocab_size", .array([.int(80)])), ("num_experts_per_tok", .object([])), ("rms_norm_eps", .string("1e-5")),
                      ("tie_word_embeddings", .int(1)), ("hidden_size", .double(.nan))])
    func wrongType(field: String, value: JSONValue) throws {
        let s = try scratch { $0[field] = value }
        expectError(.format, naming: [s.file("config.json"), field]) { try s.load() }
    }

    /// Special ids outside [0, vocab_size) count as absent (the load succeeds); ids inside are kept.
    @Test func specialTokenIdsOutsideTheVocabularyCountAsAbsent() throws {
        let inside = try scratch { $0["bos_token_id"] = .int(1); $0["eos_token_id"] = .array([.int(5000), .int(2)]) }
        let kept = try Model(directory: inside.path).config
        #expect(kept.bosTokenId == 1 && kept.eosTokenIds == [2])
        let outside = try scratch { $0["bos_token_id"] = .int(-3); $0["eos_token_id"] = .int(99_999) }
        let dropped = try Model(directory: outside.path).config
        #expect(dropped.bosTokenId == nil && dropped.eosTokenIds.isEmpty)
    }

    @Test func headsNotDividingHidden() throws {
        // mixtral-tiny has head_dim: null, so head_dim = hidden_size / num_attention_heads must be exact.
        let s = try scratch { $0["num_attention_heads"] = .int(5); $0["num_key_value_heads"] = .int(5) }
        expectError(.format, naming: [s.file("config.json"), "num_attention_heads", "hidden_size"]) { try s.load() }
    }

    @Test func kvHeadsNotDividingHeads() throws {
        let s = try scratch { $0["num_key_value_heads"] = .int(3) }
        expectError(.format, naming: [s.file("config.json"), "num_key_value_heads", "num_attention_heads"]) { try s.load() }
    }

    @Test func topKGreaterThanExperts() throws {
        let s = try scratch { $0["num_experts_per_tok"] = .int(9) }
        expectError(.format, naming: [s.file("config.json"), "num_experts_per_tok", "9"]) { try s.load() }
    }

    @Test func topPThresholdAboveOne() throws {
        let s = try scratch("dynamic-moe-tiny") { $0["top_p_threshold"] = .double(1.5) }
        expectError(.format, naming: [s.file("config.json"), "top_p_threshold"]) { try s.load() }
    }

    @Test func unsupportedFamilyListsTheSupportedArchitectures() throws {
        let s = try scratch {
            $0["architectures"] = .array([.string("GPT2LMHeadModel")])
            $0["model_type"] = .string("gpt2")
        }
        expectError(.unsupported, naming: [s.file("config.json"), "GPT2LMHeadModel"] + Family.allCases.map(\.architecture)) {
            try s.load()
        }
    }

    @Test func unsupportedArchitectureIsNotOverriddenByModelType() throws {
        // With architectures ["GPT2LMHeadModel"] and the fixture's model_type "mixtral" left in
        // place, the checkpoint must not load as Mixtral: `architectures` is what Hugging Face
        // instantiates; model_type is only consulted when architectures is absent or empty.
        let s = try scratch { $0["architectures"] = .array([.string("GPT2LMHeadModel")]) }
        expectError(.unsupported, naming: [s.file("config.json"), "GPT2LMHeadModel", "MixtralForCausalLM"]) { try s.load() }
    }

    @Test(arguments: ["rope_parameters", "rope_scaling"])
    func unsupportedRopeType(key: String) throws {
        let s = try scratch {
            $0[key] = .object([("rope_type", .string("yarn")), ("factor", .double(4)), ("rope_theta", .double(10000))])
        }
        expectError(.unsupported, naming: [s.file("config.json"), "rope_type", "yarn"]) { try s.load() }
    }

    @Test func legacyRopeScalingTypeField() throws {
        let s = try scratch { $0["rope_scaling"] = .object([("type", .string("linear")), ("factor", .double(2))]) }
        expectError(.unsupported, naming: [s.file("config.json"), "linear"]) { try s.load() }
    }

    @Test(arguments: [("num_hidden_layers", Int64(1_000_000_000_000)), ("num_local_experts", Int64(1) << 35),
                      ("head_dim", Int64(1) << 39)])
    func absurdlyLargeSize(field: String, value: Int64) throws {
        let s = try scratch { $0[field] = .int(value) }
        expectError(.format, naming: [s.file("config.json"), field, "exceeds the limit"]) { try s.load() }
    }

    /// Past 2^40 a field is out of range, and the message must not call the integer a non-integer.
    @Test(arguments: ["hidden_size", "vocab_size", "num_local_experts"])
    func integerBeyondAnyMeaningfulSize(field: String) throws {
        let s = try scratch { $0[field] = .int(Int64(1) << 40) }
        let error = expectError(.format, naming: [s.file("config.json"), field, "1099511627776", "out of range"]) { try s.load() }
        #expect(error.map { !$0.message.contains("must be an integer") } ?? false)
    }

    /// Absent fields take the transformers config classes' defaults (5.23): loading with a field
    /// removed must equal loading with it set to that default.
    @Test(arguments: [("mixtral-tiny", "rms_norm_eps", JSONValue.double(1e-5)),
                      ("olmoe-tiny", "rms_norm_eps", .double(1e-5)),
                      ("qwen3moe-tiny-bf16", "rms_norm_eps", .double(1e-6)),
                      ("qwen3moe-tiny-bf16", "norm_topk_prob", .bool(false)),
                      ("qwen2moe-tiny", "norm_topk_prob", .bool(false)),
                      ("mixtral-tiny", "rope_theta", .double(1e6))])
    func absentFieldTakesTheTransformersDefault(fixture: String, field: String, value: JSONValue) throws {
        let absent = try scratch(fixture) {
            $0[field] = nil
            if field == "rope_theta" { $0["rope_parameters"] = nil }
        }
        let explicit = try scratch(fixture) {
            $0[field] = value
            if field == "rope_theta" { $0["rope_parameters"] = nil }
        }
        let a = try Model(directory: absent.path).config, e = try Model(directory: explicit.path).config
        #expect(a.rmsNormEps == e.rmsNormEps && a.ropeTheta == e.ropeTheta && a.nativeRouting == e.nativeRouting)
    }

    @Test func qwen2TiedEmbeddingsDefaultToUntied() throws {
        // qwen2moe-tiny ties its embeddings explicitly; without the field a Qwen2-MoE config is
        // untied in transformers, and then needs its own lm_head, which this checkpoint lacks.
        let s = try scratch("qwen2moe-tiny") { $0["tie_word_embeddings"] = nil }
        expectError(.format, naming: ["lm_head.weight", "missing"]) { try s.load() }
    }

    @Test func ropeParametersThetaWinsOverTheTopLevelOne() throws {
        let both = try scratch { $0["rope_theta"] = .double(500) }  // mixtral-tiny: rope_parameters.rope_theta 10000
        #expect(try Model(directory: both.path).config.ropeTheta == 10000)
        let topOnly = try scratch { $0["rope_theta"] = .double(500); $0["rope_parameters"] = nil }
        #expect(try Model(directory: topOnly.path).config.ropeTheta == 500)
    }

    @Test(arguments: ["rope_parameters", "rope_scaling"])
    func ropeScalingWithoutATypeIsUnsupported(key: String) throws {
        let s = try scratch { $0[key] = .object([("factor", .double(4))]) }
        expectError(.unsupported, naming: [s.file("config.json"), key, "factor", "rope_type"]) { try s.load() }
    }

    @Test(arguments: ["gelu", "relu", "gelu_pytorch_tanh"])
    func activationOtherThanSiLUIsUnsupported(act: String) throws {
        let s = try scratch { $0["hidden_act"] = .string(act) }
        expectError(.unsupported, naming: [s.file("config.json"), "hidden_act", act]) { try s.load() }
        let swish = try scratch { $0["hidden_act"] = .string("swish") }
        try swish.load()
    }

    @Test func firstSupportedArchitectureInTheListDecides() throws {
        let s = try scratch("qwen2moe-tiny") {
            $0["architectures"] = .array([.string("SomethingElse"), .string("Qwen2MoeForCausalLM"), .string("MixtralForCausalLM")])
        }
        #expect(try Model(directory: s.path).config.family == .qwen2Moe)
    }

    @Test func nullExpertCountFallsBackToItsAlias() throws {
        // qwen3moe-tiny-bf16 names its expert count num_local_experts (transformers' alias).
        let s = try scratch("qwen3moe-tiny-bf16") { $0["num_experts"] = .null }
        try s.load()
    }

    @Test func qwen2SlidingLayersFollowLayerTypesOrTheMaxWindowLayersRule() throws {
        let rule = try scratch("qwen2moe-tiny") {
            $0["use_sliding_window"] = .bool(true); $0["sliding_window"] = .int(4)
            $0["max_window_layers"] = .int(2); $0["layer_types"] = nil
        }
        let ruleConfig = try Model(directory: rule.path).config
        #expect((0..<3).map { ruleConfig.window(layer: $0) } == [4, nil, nil])
        let listed = try scratch("qwen2moe-tiny") {
            $0["use_sliding_window"] = .bool(true); $0["sliding_window"] = .int(4)
            $0["layer_types"] = .array([.string("full_attention"), .string("sliding_attention"), .string("sliding_attention")])
        }
        let listedConfig = try Model(directory: listed.path).config
        #expect((0..<3).map { listedConfig.window(layer: $0) } == [nil, 4, 4])
        let off = try scratch("qwen2moe-tiny") { $0["sliding_window"] = .int(4) }  // use_sliding_window false
        #expect(try Model(directory: off.path).config.slidingWindow == nil)
        let bad = try scratch("qwen2moe-tiny") {
            $0["use_sliding_window"] = .bool(true); $0["sliding_window"] = .int(4)
            $0["layer_types"] = .array([.string("full_attention"), .string("chunked_attention"), .string("full_attention")])
        }
        expectError(.unsupported, naming: [bad.file("config.json"), "layer_types[1]", "chunked_attention"]) { try bad.load() }
        let short = try scratch("qwen2moe-tiny") {
            $0["use_sliding_window"] = .bool(true); $0["sliding_window"] = .int(4)
            $0["layer_types"] = .array([.string("full_attention")])
        }
        expectError(.format, naming: [short.file("config.json"), "layer_types", "3"]) { try short.load() }
    }

    @Test func oversizedConfigIsRefusedBeforeParsing() throws {
        let s = try ScratchCheckpoint()
        let text = try Files.read(s.file("config.json"))
        let padding = [UInt8](repeating: 0x20, count: Checkpoint.maxConfigBytes)
        try Files.write(s.file("config.json"), Array(text.dropLast()) + padding + [UInt8(ascii: "}")])
        expectError(.format, naming: [s.file("config.json"), "limit"]) { try s.load() }
    }

    @Test(arguments: [JSONValue.object([("quant_method", .string("awq")), ("bits", .int(4))]), .object([])])
    func quantizedCheckpointIsUnsupported(quantization: JSONValue) throws {
        let s = try scratch("qwen2moe-tiny") { $0["quantization_config"] = quantization }
        let method = quantization["quant_method"]?.stringValue ?? "quantized"
        expectError(.unsupported, naming: [s.file("config.json"), method, "F32, F16 or BF16"]) { try s.load() }
    }
}

// MARK: - Tensors against the config

@Suite("Validation: tensors")
struct TensorValidationTests {
    @Test func requiredTensorMissing() throws {
        let s = try ScratchCheckpoint()
        let victim = "model.layers.1.self_attn.k_proj.weight"
        try s.editTensors { $0.removeAll { $0.name == victim } }
        expectError(.format, naming: [s.path, "\"\(victim)\"", "missing"]) { try s.load() }
    }

    @Test func unexpectedExtraTensor() throws {
        let s = try ScratchCheckpoint()
        let extra = "model.layers.0.mlp.extra.weight"
        try s.editTensors { $0.append(RawTensor(name: extra, dtype: "F32", shape: [4], data: floatBytes([1, 2, 3, 4]))) }
        expectError(.format, naming: [s.path, "\"\(extra)\""]) { try s.load() }
    }

    @Test func rotaryInverseFrequencyBuffersAreIgnored() throws {
        let s = try ScratchCheckpoint()
        try s.editTensors {
            $0.append(RawTensor(name: "model.layers.0.self_attn.rotary_emb.inv_freq", dtype: "F32", shape: [2], data: floatBytes([1, 2])))
        }
        try s.load()
    }

    @Test func tensorOfTheWrongShape() throws {
        let s = try ScratchCheckpoint()
        try s.editTensors { list in
            let i = list.firstIndex { $0.name == "model.norm.weight" }!
            list[i].shape = [16]
            list[i].data = Array(list[i].data.prefix(64))
        }
        expectError(.format, naming: [s.file("model.safetensors"), "\"model.norm.weight\"", "[16]", "[32]"]) { try s.load() }
    }

    @Test func transposedMatrix() throws {
        let s = try ScratchCheckpoint()
        let victim = "model.layers.0.block_sparse_moe.experts.3.w1.weight"  // [40, 32]
        try s.editTensors { list in
            let i = list.firstIndex { $0.name == victim }!
            list[i].shape = [32, 40]
        }
        expectError(.format, naming: [s.file("model.safetensors"), "\"\(victim)\"", "[32, 40]", "[40, 32]"]) { try s.load() }
    }

    @Test(arguments: ["I32", "F64", "I64", "U8", "BOOL", "I16"])
    func unsupportedWeightDType(dtype: String) throws {
        let s = try ScratchCheckpoint()
        let victim = "model.layers.0.self_attn.q_proj.weight"
        let size = DType(rawValue: dtype)!.byteSize
        try s.editTensors { list in
            let i = list.firstIndex { $0.name == victim }!
            list[i].dtype = dtype
            list[i].data = [UInt8](repeating: 0, count: list[i].shape.reduce(1, *) * size)
        }
        expectError(.unsupported, naming: [s.file("model.safetensors"), "\"\(victim)\"", dtype]) { try s.load() }
    }
}

// MARK: - API-level arguments

@Suite("Validation: API arguments")
struct APIValidationTests {
    @Test func tokenIdsOutsideTheVocabulary() throws {
        let model = try Model(directory: mixtralDirectory)
        let v = Int32(model.vocabSize)
        for bad in [Int32(-1), v, v + 5, Int32.max, Int32.min] {
            expectError(.invalidArgument, naming: ["token", "\(bad)"]) { try runForward(model, [1, 2, bad], batch: 1, length: 3) }
        }
        // In a session: refused, and the session does not move.
        let session = try makeSession(model, capacity: 8)
        expectError(.invalidArgument, naming: ["\(v)"]) { try runEvaluate(session, [1, v], length: 2) }
        #expect(session.position == 0)
    }

    @Test func emptyOrNegativeBatchAndLength() throws {
        let model = try Model(directory: mixtralDirectory)
        for (batch, length) in [(0, 1), (1, 0), (-1, 2), (2, -3), (0, 0)] {
            expectError(.invalidArgument, naming: ["batch", "length", "\(batch)", "\(length)"]) {
                try runForward(model, [1, 2, 3, 4, 5, 6], batch: batch, length: length)
            }
        }
        let session = try makeSession(model, capacity: 8)
        for length in [0, -1] {
            expectError(.invalidArgument, naming: ["length", "\(length)"]) { try runEvaluate(session, [1], length: length) }
        }
        #expect(session.position == 0)
    }

    @Test func forwardBatchBeyondTheLimit() throws {
        let model = try Model(directory: mixtralDirectory)
        let error = expectError(.invalidArgument, naming: ["forward", "batch 4097", "4096"]) {
            try runForward(model, [Int32](repeating: 1, count: 4097), batch: 4097, length: 1)
        }
        #expect(error.map { !$0.message.contains("session") } ?? false)
    }

    /// A callback runs inside its session's call: reading the session works, re-entering it is
    /// refused as busy with a message that names the callback case (not only "another thread").
    @Test func reentryFromACallbackIsBusyAndSaysSo() throws {
        let model = try Model(directory: mixtralDirectory)
        let session = try makeSession(model, capacity: 8)
        var inner: DynMoEError? = nil
        var positionsSeen: [Int] = []
        let tokens: [Int32] = [1, 2]
        var logits = [Float](repeating: 0, count: model.vocabSize)
        _ = try tokens.withUnsafeBufferPointer { t in
            try logits.withUnsafeMutableBufferPointer { l in
                try session.evaluate(tokens: t.baseAddress!, length: 2, observer: ObserverClosure { _ in
                    positionsSeen.append(session.position)
                    do { try session.rewind(to: 0) } catch let error as DynMoEError { inner = error } catch {}
                }, logits: l.baseAddress!, logitRows: .last)
            }
        }
        #expect(inner?.kind == .busy)
        #expect(inner?.message.contains("callback") == true)
        #expect(!positionsSeen.isEmpty && positionsSeen.allSatisfy { $0 == 0 })
        #expect(session.position == 2)
    }

    @Test func forwardLongerThanMaxPositions() throws {
        let model = try Model(directory: mixtralDirectory)
        let n = model.config.maxPositions + 1
        expectError(.invalidArgument, naming: ["max_position_embeddings", "\(n)"]) {
            try runForward(model, [Int32](repeating: 1, count: n), batch: 1, length: n)
        }
    }

    static let badPolicies: [(RoutingPolicy, [String])] = [
        (.topP(threshold: 0), ["threshold", "0"]),
        (.topP(threshold: -0.25), ["threshold", "-0.25"]),
        (.topP(threshold: 1.5), ["threshold", "1.5"]),
        (.topP(threshold: .nan), ["threshold", "nan"]),
        (.topP(threshold: .infinity), ["threshold", "inf"]),
        (.topK(k: 0), ["k", "0"]),
        (.topK(k: -3), ["k", "-3"]),
        (.topK(k: 9), ["k", "9", "8"]),
        (.topP(threshold: 0.5, minExperts: 3, maxExperts: 2), ["min_experts", "max_experts", "3", "2"]),
        (.topP(threshold: 0.5, minExperts: 0), ["min_experts", "0"]),
        (.topP(threshold: 0.5, minExperts: 9), ["min_experts", "9"]),
        (.topP(threshold: 0.5, maxExperts: 0), ["max_experts", "0"]),
        (.topP(threshold: 0.5, maxExperts: 9), ["max_experts", "9"]),
    ]

    @Test(arguments: badPolicies.indices)
    func routingParametersOutOfRange(index: Int) throws {
        let (policy, culprits) = Self.badPolicies[index]
        let model = try Model(directory: mixtralDirectory)  // 8 experts
        expectError(.invalidArgument, naming: ["routing"] + culprits) { _ = try RoutingPlan(policy).resolve(for: model.config) }
        expectError(.invalidArgument, naming: culprits) { try runForward(model, [1, 2], batch: 1, length: 2, routing: RoutingPlan(policy)) }
        // The same policy as a per-layer override names the layer too.
        expectError(.invalidArgument, naming: ["layer 1"] + culprits) {
            _ = try RoutingPlan(.native, layers: [1: policy]).resolve(for: model.config)
        }
        // A session refuses it as its default routing and for a single call.
        var options = SessionOptions()
        options.capacity = 4
        options.routing = RoutingPlan(policy)
        expectError(.invalidArgument, naming: culprits) { _ = try Session(model: model, options: options) }
        let session = try makeSession(model, capacity: 4)
        expectError(.invalidArgument, naming: culprits) { try session.setDefaultRouting(RoutingPlan(policy)) }
        #expect(session.defaultRouting == .native)
    }

    @Test func boundaryPoliciesAreAccepted() throws {
        let model = try Model(directory: mixtralDirectory)
        for policy: RoutingPolicy in [.topK(k: 1), .topK(k: 8), .topP(threshold: 1), .topP(threshold: .leastNonzeroMagnitude),
                                      .topP(threshold: 0.5, minExperts: 8, maxExperts: 8), .topP(threshold: 0.5, minExperts: 1, maxExperts: 1)] {
            try runForward(model, [1, 2], batch: 1, length: 2, routing: RoutingPlan(policy))
        }
    }

    @Test func perLayerOverrideOnANonMoELayer() throws {
        for (fixture, layer) in [("qwen2moe-tiny", 1), ("dynamic-moe-tiny", 1), ("dynamic-moe-tiny", 3)] {
            let model = try Model(directory: "\(fixturesDirectory)/\(fixture)/model")
            let plan = RoutingPlan(.native, layers: [layer: .topK(k: 1)])
            expectError(.invalidArgument, naming: ["layer \(layer)", "MoE"]) { _ = try plan.resolve(for: model.config) }
            expectError(.invalidArgument, naming: ["layer \(layer)"]) { try runForward(model, [1, 2], batch: 1, length: 2, routing: plan) }
        }
    }

    @Test func perLayerOverrideOnALayerOutOfRange() throws {
        let model = try Model(directory: "\(fixturesDirectory)/qwen2moe-tiny/model")  // 3 layers
        for layer in [3, -1, 1000, Int.min] {
            let plan = RoutingPlan(.native, layers: [layer: .topK(k: 1)])
            expectError(.invalidArgument, naming: ["layer \(layer)", "3"]) { _ = try plan.resolve(for: model.config) }
        }
    }

    @Test func sessionContextFull() throws {
        let model = try Model(directory: mixtralDirectory)
        let session = try makeSession(model, capacity: 4)
        try runEvaluate(session, [1, 2, 3], length: 3)
        expectError(.contextFull, naming: ["4"]) { try runEvaluate(session, [4, 5], length: 2) }
        #expect(session.position == 3)
        try runEvaluate(session, [4], length: 1)
        #expect(session.position == 4)
        expectError(.contextFull, naming: ["4"]) { try runEvaluate(session, [5], length: 1) }
        // Generation that cannot fit is refused up front.
        try session.rewind(to: 2)
        // 2 cached + 10 new need 11 positions (the last new token is not evaluated).
        expectError(.contextFull, naming: ["11 positions", "capacity of 4"]) {
            _ = try session.generate(prompt: nil, promptLength: 0, maxNewTokens: 10, sampling: SamplingOptions(), stopTokens: [],
                                     routing: nil, observer: nil) { _, _ in true }
        }
        #expect(session.position == 2)
    }

    @Test func rewindBeyondThePosition() throws {
        let model = try Model(directory: mixtralDirectory)
        let session = try makeSession(model, capacity: 8)
        try runEvaluate(session, [1, 2, 3], length: 3)
        for target in [4, 100, -1, Int.min] {
            expectError(.invalidArgument, naming: ["rewind", "\(target)"]) { try session.rewind(to: target) }
            #expect(session.position == 3)
        }
        try session.rewind(to: 3)
        try session.rewind(to: 0)
        #expect(session.position == 0)
    }

    @Test func absurdSessionCapacityOrBudget() throws {
        let model = try Model(directory: mixtralDirectory)
        // Beyond the trained range: refused like a longer dynmoe_forward, whatever the memory.
        for capacity in [model.config.maxPositions + 1, 1 << 40, Int.max] {
            expectError(.invalidArgument, naming: ["capacity \(capacity)", "max_position_embeddings"]) {
                _ = try makeSession(model, capacity: capacity)
            }
        }
        #expect(try makeSession(model, capacity: model.config.maxPositions).capacity == model.config.maxPositions)
        // Within a huge trained range, a cache larger than physical memory is refused up front.
        let long = try ScratchCheckpoint()
        try long.editJSON { $0["max_position_embeddings"] = .int(Int64(Int32.max)) }
        let longModel = try Model(directory: long.path)
        expectError(.outOfMemory, naming: ["\(Int32.max) positions"]) { _ = try makeSession(longModel) }
        expectError(.outOfMemory, naming: ["4096"]) { _ = try makeSession(longModel, sequences: 4096, capacity: 1 << 30) }
        for sequences in [0, -1, 4097, Int.max, Int.min] {
            expectError(.invalidArgument, naming: ["sequences", "\(sequences)"]) { _ = try makeSession(model, sequences: sequences) }
        }
        expectError(.invalidArgument, naming: ["capacity"]) { _ = try makeSession(model, capacity: -1) }
        expectError(.invalidArgument, naming: ["budget"]) { _ = try makeSession(model, budget: -1) }
        expectError(.invalidArgument, naming: ["budget", "1"]) { _ = try makeSession(model, budget: 1) }
        expectError(.invalidArgument, naming: ["budget", "100"]) { _ = try makeSession(model, capacity: 100, budget: 1000) }
        // A huge budget alone is no problem: the capacity defaults to max_position_embeddings.
        let session = try makeSession(model, budget: Int.max)
        #expect(session.capacity == model.config.maxPositions)
        // A budget caps the default capacity.
        let perPosition = KVCache.byteCount(layers: model.numLayers, sequences: 1, capacity: 1, kvDim: model.config.kvDim)!
        #expect(try makeSession(model, budget: perPosition * 10 + 1).capacity == 10)
    }

    @Test func generateArguments() throws {
        let model = try Model(directory: mixtralDirectory)
        let session = try makeSession(model, capacity: 8)
        func generate(maxNew: Int = 2, promptLength: Int = 0, sampling: SamplingOptions = SamplingOptions()) throws {
            let prompt: [Int32] = [1, 2, 3]
            _ = try prompt.withUnsafeBufferPointer { p in
                try session.generate(prompt: p.baseAddress!, promptLength: promptLength, maxNewTokens: maxNew, sampling: sampling,
                                     stopTokens: [], routing: nil, observer: nil) { _, _ in true }
            }
        }
        expectError(.invalidArgument, naming: ["max_new_tokens", "-1"]) { try generate(maxNew: -1, promptLength: 1) }
        expectError(.invalidArgument, naming: ["prompt length", "-2"]) { try generate(promptLength: -2) }
        var bad = SamplingOptions()
        bad.temperature = .nan
        expectError(.invalidArgument, naming: ["temperature"]) { try generate(promptLength: 1, sampling: bad) }
        bad.temperature = .infinity
        expectError(.invalidArgument, naming: ["temperature", "finite"]) { try generate(promptLength: 1, sampling: bad) }
        bad = SamplingOptions()
        bad.topK = -1
        expectError(.invalidArgument, naming: ["top_k", "-1"]) { try generate(promptLength: 1, sampling: bad) }
        bad = SamplingOptions()
        bad.topP = 0
        expectError(.invalidArgument, naming: ["top_p"]) { try generate(promptLength: 1, sampling: bad) }
        // Nothing evaluated yet and no prompt: no logits to continue from.
        expectError(.notAvailable, naming: ["prompt"]) { try generate(promptLength: 0) }
        #expect(session.position == 0)
    }
}

// MARK: - The routing rule

@Suite("Validation: expert selection rule")
struct ExpertSelectionRuleTests {
    /// Runs ExpertSelection.select on one token's probabilities.
    func select(_ probs: [Float], _ rule: ResolvedRouting.Rule, renormalize: Bool = false) -> (experts: [Int32], weights: [Float]) {
        let e = probs.count
        var order = [Int32](repeating: -1, count: e)
        var experts = [Int32](repeating: -1, count: e)
        var weights = [Float](repeating: .nan, count: e)
        let n = probs.withUnsafeBufferPointer { p in
            order.withUnsafeMutableBufferPointer { o in
                experts.withUnsafeMutableBufferPointer { x in
                    weights.withUnsafeMutableBufferPointer { w in
                        ExpertSelection.select(probs: p.baseAddress!, numExperts: e,
                                               routing: ResolvedRouting(rule: rule, renormalize: renormalize),
                                               order: o.baseAddress!, experts: x.baseAddress!, weights: w.baseAddress!)
                    }
                }
            }
        }
        return (Array(experts[..<n]), Array(weights[..<n]))
    }

    /// Exactly representable in binary, so cumulative sums are exact: 0.5, 0.75, 0.875, 1.
    let dyadic: [Float] = [0.5, 0.25, 0.125, 0.125]

    func topP(_ p: Float, min lo: Int = 1, max hi: Int = 4) -> ResolvedRouting.Rule {
        .topP(threshold: p, minExperts: lo, maxExperts: hi)
    }

    @Test func cumulativeSumEqualToTheThresholdIsNotEnough() {
        // 0.5 + 0.25 = 0.75 is not > 0.75: a third expert is needed.
        #expect(select(dyadic, topP(0.75)).experts == [0, 1, 2])
        #expect(select(dyadic, topP(0.5)).experts == [0, 1])
        #expect(select(dyadic, topP(0.875)).experts == [0, 1, 2, 3])
        // Just below a cumulative sum, that prefix suffices.
        #expect(select(dyadic, topP(Float(0.75).nextDown)).experts == [0, 1])
        #expect(select(dyadic, topP(Float(0.5).nextDown)).experts == [0])
        #expect(select(dyadic, topP(.leastNonzeroMagnitude)).experts == [0])
    }

    @Test func minAndMaxClamps() {
        #expect(select(dyadic, topP(0.4)).experts == [0])
        #expect(select(dyadic, topP(0.4, min: 2)).experts == [0, 1])
        #expect(select(dyadic, topP(0.4, min: 4)).experts == [0, 1, 2, 3])
        #expect(select(dyadic, topP(0.9)).experts == [0, 1, 2, 3])
        #expect(select(dyadic, topP(0.9, max: 2)).experts == [0, 1])
        #expect(select(dyadic, topP(0.9, min: 1, max: 1)).experts == [0])
        #expect(select(dyadic, topP(0.75, min: 3, max: 3)).experts == [0, 1, 2])
    }

    @Test func kEqualToEveryExpertSelectsAll() {
        #expect(select(dyadic, .topK(4)).experts == [0, 1, 2, 3])
        #expect(select([0.1, 0.2, 0.3, 0.4], .topK(4)).experts == [3, 2, 1, 0])
        #expect(select(dyadic, .topK(1)).experts == [0])
    }

    @Test func thresholdOneNeverPassedSelectsAll() {
        // The sum reaches exactly 1, never more: every expert, even those with probability 0.
        #expect(select(dyadic, topP(1)).experts == [0, 1, 2, 3])
        #expect(select([0.5, 0.5, 0, 0], topP(1)).experts == [0, 1, 2, 3])
        // A float sum that rounds below 1 never passes either.
        let thirds: [Float] = [1.0 / 3, 1.0 / 3, 1.0 / 3]
        #expect(select(thirds, .topP(threshold: 1, minExperts: 1, maxExperts: 3)).experts == [0, 1, 2])
        // ...but the max clamp still applies.
        #expect(select(dyadic, topP(1, max: 3)).experts == [0, 1, 2])
    }

    @Test func renormalizeOnAndOff() {
        let raw = select(dyadic, .topK(2), renormalize: false)
        #expect(raw.experts == [0, 1])
        #expect(raw.weights == [0.5, 0.25])
        let normalized = select(dyadic, .topK(2), renormalize: true)
        #expect(normalized.experts == [0, 1])
        #expect(abs(normalized.weights[0] - 2.0 / 3) < 1e-7 && abs(normalized.weights[1] - 1.0 / 3) < 1e-7)
        #expect(abs(normalized.weights.reduce(0, +) - 1) < 1e-6)
        let p = select(dyadic, topP(0.75), renormalize: true)
        #expect(p.weights == [0.5 / 0.875, 0.25 / 0.875, 0.125 / 0.875])
        #expect(select(dyadic, topP(0.75), renormalize: false).weights == [0.5, 0.25, 0.125])
        // All-zero probabilities: renormalising must not divide by zero.
        let zeros = select([0, 0, 0], .topK(2), renormalize: true)
        #expect(zeros.experts == [0, 1])
        #expect(zeros.weights == [0, 0])
    }

    @Test func tiesKeepTheLowerIndexFirst() {
        #expect(select([0.25, 0.25, 0.25, 0.25], .topK(2)).experts == [0, 1])
        #expect(select([0.25, 0.25, 0.25, 0.25], .topK(4)).experts == [0, 1, 2, 3])
        #expect(select([0.1, 0.3, 0.3, 0.3], .topK(3)).experts == [1, 2, 3])
        #expect(select([0.2, 0.4, 0.4], .topK(3)).experts == [1, 2, 0])
        #expect(select([0.125, 0.125, 0.25, 0.5], topP(0.75)).experts == [3, 2, 0])
    }

    /// The rule on a full stable sort, written plainly: what `select` must reproduce exactly
    /// however much of the order it actually sorts.
    func reference(_ probs: [Float], _ rule: ResolvedRouting.Rule) -> [Int32] {
        let order = probs.indices.sorted { probs[$0] > probs[$1] || (probs[$0] == probs[$1] && $0 < $1) }
        switch rule {
        case .topK(let k):
            return order.prefix(k).map(Int32.init)
        case .topP(let threshold, let lo, let hi):
            var cumulative: Float = 0
            var n = order.count
            for (i, e) in order.enumerated() {
                cumulative += probs[e]
                if cumulative > threshold { n = i + 1; break }
            }
            return order.prefix(min(max(n, lo), hi)).map(Int32.init)
        }
    }

    @Test(arguments: [5, 20, 64, 200])
    func selectionMatchesAFullSortWithTies(experts e: Int) {
        var state = UInt32(e)
        func random() -> Float {  // in [-1, 1)
            state = state &* 1_664_525 &+ 1_013_904_223
            return Float(Int32(bitPattern: state) >> 8) / Float(1 << 23)
        }
        for trial in 0..<200 {
            // Softmax of logits rounded to a coarse grid, so many probabilities tie; every
            // fifth trial nearly uniform, so top-p needs more experts than are sorted first.
            let scale: Float = trial % 5 == 0 ? 0.05 : 3
            let logits = (0..<e).map { _ in (random() * scale * 4).rounded() / 4 }
            let top = logits.max()!
            let exps = logits.map { Float(exp(Double($0 - top))) }
            let z = exps.reduce(0, +)
            let probs = exps.map { $0 / z }
            var rules: [ResolvedRouting.Rule] = [.topK(1), .topK(min(8, e)), .topK(min(9, e)), .topK(e)]
            for threshold: Float in [0.2, 0.4, 0.6, 0.8, 0.95, 1] {
                rules.append(.topP(threshold: threshold, minExperts: 1, maxExperts: e))
                rules.append(.topP(threshold: threshold, minExperts: min(10, e), maxExperts: e))
                rules.append(.topP(threshold: threshold, minExperts: 1, maxExperts: min(3, e)))
            }
            for rule in rules {
                let got = select(probs, rule)
                #expect(got.experts == reference(probs, rule), "E \(e) trial \(trial) \(rule)")
                #expect(got.weights == got.experts.map { probs[Int($0)] })
            }
        }
    }

    @Test func nativeRoutingResolvesToTheFamilyRule() throws {
        let paper = try Model(directory: "\(fixturesDirectory)/dynamic-moe-tiny/model").config
        let resolved = try RoutingPlan.native.resolve(for: paper)
        #expect(resolved[0] == ResolvedRouting(rule: .topP(threshold: 0.4, minExperts: 1, maxExperts: 8), renormalize: false))
        #expect(resolved[1] == nil)
        let mixtral = try Model(directory: mixtralDirectory).config
        #expect(try RoutingPlan.native.resolve(for: mixtral)[0] == ResolvedRouting(rule: .topK(2), renormalize: true))
        #expect(try RoutingPlan(.topK(k: 3)).resolve(for: mixtral)[1] == ResolvedRouting(rule: .topK(3), renormalize: true))
        #expect(try RoutingPlan(.topK(k: 3, renormalize: false)).resolve(for: mixtral)[1] == ResolvedRouting(rule: .topK(3), renormalize: false))
    }
}
