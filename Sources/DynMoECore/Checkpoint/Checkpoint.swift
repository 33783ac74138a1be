/// A Hugging Face checkpoint directory: `config.json` plus either `model.safetensors` or
/// `model.safetensors.index.json` with its shards. Tensors are looked up by name across shards;
/// the loader marks what it uses so that unexpected tensors can be reported.
package final class Checkpoint: @unchecked Sendable {
    package let directory: String
    package let config: JSONValue
    package let files: [SafeTensorsFile]
    private var index: [String: TensorView] = [:]
    private var used: Set<String> = []

    package static let configName = "config.json"
    package static let singleFileName = "model.safetensors"
    package static let indexName = "model.safetensors.index.json"

    package init(directory: String) throws(DynMoEError) {
        var dir = directory
        while dir.count > 1 && dir.hasSuffix("/") { dir.removeLast() }
        self.directory = dir
        let configPath = dir + "/" + Checkpoint.configName
        guard try MappedFile.exists(dir) else { throw .io("checkpoint directory \(dir) does not exist") }
        guard MappedFile.isDirectory(dir) else {
            throw .io("\(dir) is not a directory; a checkpoint is a directory holding \(Checkpoint.configName) and safetensors files")
        }
        guard try MappedFile.exists(configPath) else { throw .io("\(configPath) is missing") }
        config = try Checkpoint.parseJSONFile(configPath, limit: Checkpoint.maxConfigBytes)
        guard config.objectMembers != nil else { throw .format("\(configPath): top level is not a JSON object") }

        let indexPath = dir + "/" + Checkpoint.indexName
        let singlePath = dir + "/" + Checkpoint.singleFileName
        // Like transformers, a single model.safetensors wins over an index next to it.
        if try MappedFile.exists(singlePath) {
            let f = try SafeTensorsFile(path: singlePath)
            files = [f]
            index = f.tensors
        } else if try MappedFile.exists(indexPath) {
            let indexJSON = try Checkpoint.parseJSONFile(indexPath, limit: Checkpoint.maxIndexBytes)
            guard let weightMap = indexJSON["weight_map"]?.objectMembers else {
                throw .format("\(indexPath): no \"weight_map\" object")
            }
            var shardNames: [String] = [], seen: Set<String> = []
            var expected: [(tensor: String, shard: String)] = []
            for (tensor, shardValue) in weightMap {
                guard var shard = shardValue.stringValue else { throw .format("\(indexPath): shard for \"\(tensor)\" is not a string") }
                if shard.hasPrefix("./") { shard.removeFirst(2) }
                guard !shard.contains("/"), !shard.isEmpty else {
                    throw .format("\(indexPath): shard name \"\(shard)\" for \"\(tensor)\" must be a file name inside the directory")
                }
                if seen.insert(shard).inserted { shardNames.append(shard) }
                expected.append((tensor, shard))
            }
            var files: [SafeTensorsFile] = []
            var byShard: [String: SafeTensorsFile] = [:]
            for shard in shardNames {
                let path = dir + "/" + shard
                guard try MappedFile.exists(path) else { throw .io("\(path) is missing (listed in \(Checkpoint.indexName))") }
                let f = try SafeTensorsFile(path: path)
                files.append(f)
                byShard[shard] = f
            }
            for (tensor, shard) in expected {
                guard let view = byShard[shard]!.tensor(tensor) else {
                    throw .format("\(dir)/\(shard): tensor \"\(tensor)\" listed in \(Checkpoint.indexName) is not in that shard")
                }
                index[tensor] = view
            }
            let listed = index
            for file in files {
                if let stray = file.orderedNames.first(where: { listed[$0]?.data != file.tensors[$0]!.data }) {
                    throw .format("\(file.path): tensor \"\(stray)\" is not listed for this shard in \(Checkpoint.indexName)")
                }
            }
            self.files = files
        } else {
            throw .io("\(dir) has neither \(Checkpoint.singleFileName) nor \(Checkpoint.indexName)")
        }
    }

    /// Size limits for the JSON files: parsing takes ~17 times a file's size in memory. Real
    /// configs are a few KiB and real indexes a few MiB (tens of thousands of tensors).
    package static let maxConfigBytes = 4 << 20
    package static let maxIndexBytes = 64 << 20

    static func parseJSONFile(_ path: String, limit: Int) throws(DynMoEError) -> JSONValue {
        let bytes = try MappedFile.readText(path, limit: limit)
        do {
            return try bytes.withUnsafeBufferPointer { buf throws(JSONParseError) in try JSONParser.parse(buf) }
        } catch {
            throw .format("\(path): invalid JSON: \(error)")
        }
    }

    package var tensorNames: [String] { Array(index.keys) }

    package func contains(_ name: String) -> Bool { index[name] != nil }

    /// Looks a tensor up, checks its shape and marks it used.
    package func tensor(_ name: String, shape: [Int]) throws(DynMoEError) -> TensorView {
        guard let view = index[name] else { throw .format("\(directory): tensor \"\(name)\" is missing") }
        guard view.shape == shape else {
            throw .format("\(view.file): tensor \"\(name)\" has shape \(view.shape), expected \(shape)")
        }
        guard view.dtype.isWeightType else {
            throw .unsupported("\(view.file): tensor \"\(name)\" has dtype \(view.dtype.rawValue); weights must be F32, F16 or BF16")
        }
        used.insert(name)
        return view
    }

    package func markUsed(_ name: String) { used.insert(name) }

    /// Names present in the checkpoint that the loader never asked for.
    package var unusedTensorNames: [String] { index.keys.filter { !used.contains($0) }.sorted() }
}
