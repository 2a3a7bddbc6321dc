//! [`GgufWriter`]: small GGUF v3 files (F32, F16 and Q8_0 tensors) for tests and tools.

use super::*;

/// Builds GGUF v3 files: metadata plus F32, F16 or Q8_0 tensors quantised from `f32`
/// data (and raw blocks of any known type). Meant for tests and tools that need small
/// model files; everything is kept in memory.
#[derive(Debug, Default, Clone)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Debug, Clone)]
pub(super) struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

impl GgufWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a metadata entry (replacing an earlier one with the same key). Entries are
    /// written in the order first added. Setting [`ALIGNMENT_KEY`] to a `U32` power of
    /// two changes the alignment the file is written with.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Adds a tensor from `f32` values in row-major order, stored as `ggml_type`, which
    /// must be F32, F16 (rounded to nearest) or Q8_0 (quantised as ggml does; the last
    /// dimension must then be a multiple of 32). `shape_row_major` has 1 to 4 entries.
    pub fn add_tensor_f32(
        &mut self,
        name: impl Into<String>,
        shape_row_major: &[usize],
        data: &[f32],
        ggml_type: GgmlType,
    ) -> Result<(), GgufError> {
        let name = name.into();
        let ggml_type = ggml_type.canonical();
        if !matches!(ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0) {
            return Err(writer_error(format!(
                "tensor '{name}': add_tensor_f32 stores F32, F16 or Q8_0, not {ggml_type}"
            )));
        }
        let dims = self.check_tensor(&name, shape_row_major, ggml_type)?;
        let n: u64 = dims.iter().product();
        if data.len() as u64 != n {
            return Err(writer_error(format!(
                "tensor '{name}': shape {shape_row_major:?} has {n} elements but {} values were given",
                data.len()
            )));
        }
        let mut bytes = Vec::new();
        match ggml_type {
            GgmlType::F32 => bytes.extend(data.iter().flat_map(|v| v.to_le_bytes())),
            GgmlType::F16 => {
                bytes.extend(data.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()))
            }
            _ => quantize_q8_0(data, &mut bytes),
        }
        self.tensors.push(PendingTensor {
            name,
            dims,
            ggml_type,
            data: bytes,
        });
        Ok(())
    }

    /// Adds a tensor from its raw encoded bytes, for any type whose block layout is
    /// known; `bytes` must be exactly the size the shape needs.
    pub fn add_tensor_raw(
        &mut self,
        name: impl Into<String>,
        shape_row_major: &[usize],
        ggml_type: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<(), GgufError> {
        let name = name.into();
        let ggml_type = ggml_type.canonical();
        let dims = self.check_tensor(&name, shape_row_major, ggml_type)?;
        let info = TensorInfo {
            name,
            dims,
            ggml_type,
            offset: 0,
        };
        let n_bytes = info
            .n_bytes()
            .map_err(|e| writer_error(format!("tensor '{}': {e}", info.name)))?;
        if bytes.len() as u64 != n_bytes {
            return Err(writer_error(format!(
                "tensor '{}': shape {shape_row_major:?} of {ggml_type} needs {n_bytes} bytes, got {}",
                info.name,
                bytes.len()
            )));
        }
        self.tensors.push(PendingTensor {
            name: info.name,
            dims: info.dims,
            ggml_type,
            data: bytes,
        });
        Ok(())
    }

    /// Validates a new tensor's name and shape; returns its GGUF dimensions.
    fn check_tensor(
        &self,
        name: &str,
        shape_row_major: &[usize],
        ggml_type: GgmlType,
    ) -> Result<Vec<u64>, GgufError> {
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(writer_error(format!("duplicate tensor name '{name}'")));
        }
        if shape_row_major.is_empty() || shape_row_major.len() > MAX_DIMS {
            return Err(writer_error(format!(
                "tensor '{name}': shape {shape_row_major:?} must have 1 to {MAX_DIMS} dimensions"
            )));
        }
        let dims: Vec<u64> = shape_row_major.iter().rev().map(|&d| d as u64).collect();
        if dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .is_none()
        {
            return Err(writer_error(format!(
                "tensor '{name}': shape {shape_row_major:?} overflows"
            )));
        }
        let block = ggml_type.block_size().unwrap_or(1) as u64;
        if dims.first().is_some_and(|&d| !d.is_multiple_of(block)) {
            return Err(writer_error(format!(
                "tensor '{name}': last dimension of {shape_row_major:?} is not a multiple of the {ggml_type} block size {block}"
            )));
        }
        Ok(dims)
    }

    /// The complete file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let alignment = match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some((_, MetaValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, other)) => {
                return Err(writer_error(format!(
                    "{ALIGNMENT_KEY} must be a u32 power of two, got {other:?}"
                )));
            }
        };
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&GGUF_WRITE_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, key, value, 0)?;
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
        }
        pad_to(&mut out, alignment);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad_to(&mut out, alignment);
        }
        Ok(out)
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

pub(super) fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let len = (out.len() as u64).next_multiple_of(alignment) as usize;
    out.resize(len, 0);
}

pub(super) fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub(super) fn write_value(
    out: &mut Vec<u8>,
    key: &str,
    value: &MetaValue,
    depth: usize,
) -> Result<(), GgufError> {
    match value {
        MetaValue::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::Array(items) => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(writer_error(format!(
                    "metadata '{key}': arrays nested more than {MAX_ARRAY_DEPTH} deep"
                )));
            }
            let elem = items.first().map_or(VT_U8, MetaValue::type_id);
            if let Some(odd) = items.iter().find(|v| v.type_id() != elem) {
                return Err(writer_error(format!(
                    "metadata '{key}': array mixes {} and {} elements",
                    value_type_name(elem),
                    odd.type_name()
                )));
            }
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, key, item, depth + 1)?;
            }
        }
    }
    Ok(())
}
