/// Element types a safetensors file may declare. Model weights must be F32, F16 or BF16; the
/// others are parsed so that reference files (I64 token ids, U8 masks) can be read too.
package enum DType: String, Sendable, CaseIterable, BitwiseCopyable {
    case f64 = "F64", f32 = "F32", f16 = "F16", bf16 = "BF16"
    case i64 = "I64", i32 = "I32", i16 = "I16", i8 = "I8"
    case u64 = "U64", u32 = "U32", u16 = "U16", u8 = "U8", bool = "BOOL"

    package var byteSize: Int {
        switch self {
        case .f64, .i64, .u64: return 8
        case .f32, .i32, .u32: return 4
        case .f16, .bf16, .i16, .u16: return 2
        case .i8, .u8, .bool: return 1
        }
    }

    package var isWeightType: Bool { self == .f32 || self == .f16 || self == .bf16 }
}

/// One tensor inside a mapped safetensors file.
package struct TensorView: @unchecked Sendable {
    package var name: String
    package var dtype: DType
    package var shape: [Int]
    package var data: UnsafeRawPointer
    package var byteCount: Int
    package var file: String

    package var elementCount: Int { shape.reduce(1, *) }

    /// Copies the tensor out as Float, whatever its floating dtype.
    package func floats() -> [Float] {
        let n = elementCount
        var out = [Float](repeating: 0, count: n)
        switch dtype {
        case .f32: for i in 0..<n { out[i] = data.loadUnaligned(fromByteOffset: 4 * i, as: Float.self) }
        case .f16: for i in 0..<n { out[i] = Float(data.loadUnaligned(fromByteOffset: 2 * i, as: Float16.self)) }
        case .bf16:
            for i in 0..<n {
                out[i] = Float(bitPattern: UInt32(data.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) << 16)
            }
        case .f64: for i in 0..<n { out[i] = Float(data.loadUnaligned(fromByteOffset: 8 * i, as: Double.self)) }
        default: break
        }
        return out
    }

    /// Copies an integer tensor out as Int64.
    package func integers() -> [Int64] {
        let n = elementCount
        var out = [Int64](repeating: 0, count: n)
        for i in 0..<n {
            switch dtype {
            case .i64: out[i] = data.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)
            case .u64: out[i] = Int64(bitPattern: data.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
            case .i32: out[i] = Int64(data.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))
            case .u32: out[i] = Int64(data.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))
            case .i16: out[i] = Int64(data.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self))
            case .u16: out[i] = Int64(data.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
            case .i8: out[i] = Int64(data.load(fromByteOffset: i, as: Int8.self))
            case .u8, .bool: out[i] = Int64(data.load(fromByteOffset: i, as: UInt8.self))
            default: break
            }
        }
        return out
    }
}

/// A parsed and fully validated safetensors file.
///
/// Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data section.
/// Every rule the format implies is checked before any tensor is handed out: offsets inside the
/// data section, byte length = dtype size x shape product, no overlaps, no gaps, no duplicates.
package final class SafeTensorsFile: @unchecked Sendable {
    /// Headers beyond this are refused: real ones are a few MB at most, and the length field
    /// comes from an untrusted file.
    package static let maxHeaderBytes = 100 << 20

    /// Valid safetensors dtypes dynmoe does not compute with (valid input, so "unsupported").
    static let knownUnsupportedDTypes: Set<String> = ["F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"]

    package let path: String
    package let file: MappedFile
    package let tensors: [String: TensorView]
    package let orderedNames: [String]
    package let metadata: [(key: String, value: String)]

    package init(path: String) throws(DynMoEError) {
        self.path = path
        file = try MappedFile(path: path)
        let bytes = file.bytes
        guard bytes.count >= 8 else {
            throw .format("\(path): file is \(bytes.count) bytes, too short for a safetensors header length")
        }
        let headerLength = bytes.loadUnaligned(as: UInt64.self).littleEndian
        guard headerLength <= UInt64(SafeTensorsFile.maxHeaderBytes) else {
            throw .format("\(path): header length \(headerLength) exceeds the \(SafeTensorsFile.maxHeaderBytes)-byte limit")
        }
        guard headerLength <= UInt64(bytes.count - 8) else {
            throw .format("\(path): header length \(headerLength) runs past the end of the \(bytes.count)-byte file")
        }
        let dataStart = 8 + Int(headerLength)
        let header: JSONValue
        do {
            header = try JSONParser.parse(UnsafeBufferPointer(rebasing: bytes.bindMemory(to: UInt8.self)[8..<dataStart]))
        } catch {
            throw .format("\(path): invalid JSON header: \(error)")
        }
        guard let members = header.objectMembers else { throw .format("\(path): header is not a JSON object") }

        var tensors: [String: TensorView] = [:]
        var names: [String] = []
        var metadata: [(key: String, value: String)] = []
        var ranges: [(begin: Int, end: Int, name: String)] = []
        let dataSize = bytes.count - dataStart
        for (name, entry) in members {
            if name == "__metadata__" {
                if entry.isNull { continue }  // the reference reader treats null as absent
                guard let meta = entry.objectMembers else { throw .format("\(path): __metadata__ is not an object") }
                for (k, v) in meta {
                    guard let s = v.stringValue else { throw .format("\(path): __metadata__ value for \"\(k)\" is not a string") }
                    metadata.append((k, s))
                }
                continue
            }
            guard entry.objectMembers != nil else { throw .format("\(path): tensor \"\(name)\" entry is not an object") }
            guard let dtypeName = entry["dtype"]?.stringValue else { throw .format("\(path): tensor \"\(name)\" has no dtype") }
            guard let dtype = DType(rawValue: dtypeName) else {
                if SafeTensorsFile.knownUnsupportedDTypes.contains(dtypeName) {
                    throw .unsupported("\(path): tensor \"\(name)\" has dtype \(dtypeName), which dynmoe does not support; weights must be F32, F16 or BF16")
                }
                throw .format("\(path): tensor \"\(name)\" has unknown dtype \"\(dtypeName)\"")
            }
            guard let shapeValues = entry["shape"]?.arrayValue else { throw .format("\(path): tensor \"\(name)\" has no shape array") }
            var shape: [Int] = []
            var elements = 1
            for d in shapeValues {
                guard let v = d.integerLiteralValue, v >= 0, v < Int64(1) << 40 else {
                    throw .format("\(path): tensor \"\(name)\" has an invalid dimension \(d.jsonText)")
                }
                shape.append(Int(v))
                let (product, overflow) = elements.multipliedReportingOverflow(by: Int(v))
                guard !overflow, product < 1 << 50 else { throw .format("\(path): tensor \"\(name)\" shape \(shape) is too large") }
                elements = product
            }
            guard let offsets = entry["data_offsets"]?.arrayValue, offsets.count == 2,
                  let begin = offsets[0].integerLiteralValue, let end = offsets[1].integerLiteralValue else {
                throw .format("\(path): tensor \"\(name)\" needs data_offsets [begin, end] (two integers)")
            }
            guard begin >= 0, begin <= end, end <= Int64(dataSize) else {
                throw .format("\(path): tensor \"\(name)\" data_offsets [\(begin), \(end)] fall outside the \(dataSize)-byte data section")
            }
            let expected = elements * dtype.byteSize
            guard end - begin == Int64(expected) else {
                throw .format("\(path): tensor \"\(name)\" is \(dtype.rawValue) \(shape) = \(expected) bytes but data_offsets span \(end - begin)")
            }
            ranges.append((Int(begin), Int(end), name))
            tensors[name] = TensorView(name: name, dtype: dtype, shape: shape,
                                       data: file.base!.advanced(by: dataStart + Int(begin)),
                                       byteCount: expected, file: path)
            names.append(name)
        }
        // The format requires the data section to be exactly tiled by the tensors: overlapping
        // tensors would alias each other's weights, gaps hide trailing garbage.
        ranges.sort { ($0.begin, $0.end) < ($1.begin, $1.end) }
        var cursor = 0
        for r in ranges where r.end > r.begin {
            if r.begin < cursor { throw .format("\(path): tensor \"\(r.name)\" overlaps the previous tensor's data") }
            if r.begin > cursor { throw .format("\(path): gap of \(r.begin - cursor) bytes before tensor \"\(r.name)\"") }
            cursor = r.end
        }
        guard cursor == dataSize else {
            throw .format("\(path): data section is \(dataSize) bytes but tensors cover \(cursor)")
        }
        self.tensors = tensors
        self.orderedNames = names
        self.metadata = metadata
    }

    package func tensor(_ name: String) -> TensorView? { tensors[name] }
}
