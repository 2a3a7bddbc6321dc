//! The element types a GGUF tensor can hold, and the descriptor of one tensor (name,
//! dimensions, type, offset) with the size checks that keep a hostile file from
//! describing more bytes than it has.

use super::*;

/// A ggml tensor element type, as stored in a GGUF tensor descriptor.
///
/// The nine named variants are the types this module can dequantise; every other id
/// is kept as [`GgmlType::Other`] (its name and block layout are still known for the
/// types ggml defines, so its raw bytes can be located).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE binary32 (id 0).
    F32,
    /// IEEE binary16 (id 1).
    F16,
    /// bfloat16, the upper half of a binary32 (id 30).
    BF16,
    /// 32-element blocks: f16 scale and 4-bit values offset by 8 (id 2).
    Q4_0,
    /// 32-element blocks: f16 scale, f16 minimum and 4-bit values (id 3).
    Q4_1,
    /// 32-element blocks: f16 scale and signed 8-bit values (id 8).
    Q8_0,
    /// 256-element super-blocks of eight 32-element sub-blocks with 6-bit scales and
    /// minimums and 4-bit values (id 12).
    Q4_K,
    /// Like [`GgmlType::Q4_K`] with a fifth bit per value (id 13).
    Q5_K,
    /// 256-element super-blocks of sixteen 16-element sub-blocks with signed 8-bit
    /// scales and 6-bit values (id 14).
    Q6_K,
    /// Any other ggml type id.
    Other(u32),
}

/// (id, name, elements per block, bytes per block) for every type ggml defines.
pub(super) const GGML_TYPE_TABLE: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

pub(super) fn type_table_entry(id: u32) -> Option<&'static (u32, &'static str, usize, usize)> {
    GGML_TYPE_TABLE.iter().find(|entry| entry.0 == id)
}

impl GgmlType {
    /// The type for a ggml type id; ids other than the nine decodable types become
    /// [`GgmlType::Other`].
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            30 => Self::BF16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            other => Self::Other(other),
        }
    }

    /// The numeric ggml type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 30,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Other(id) => id,
        }
    }

    /// ggml's name for the type (`"Q4_K"`, `"IQ2_XS"`, ...), or `"unknown"` for an id
    /// ggml does not define.
    pub fn name(self) -> &'static str {
        type_table_entry(self.id()).map_or("unknown", |entry| entry.1)
    }

    /// Elements per block (1 for the float types), or `None` for an unknown id.
    pub fn block_size(self) -> Option<usize> {
        type_table_entry(self.id()).map(|entry| entry.2)
    }

    /// Bytes per block, or `None` for an unknown id.
    pub fn type_size(self) -> Option<usize> {
        type_table_entry(self.id()).map(|entry| entry.3)
    }

    /// Whether [`dequantize_bytes`] can decode this type.
    pub fn is_supported(self) -> bool {
        !matches!(Self::from_id(self.id()), Self::Other(_))
    }

    /// The same type in canonical form (`Other(8)` becomes `Q8_0`).
    pub(crate) fn canonical(self) -> Self {
        Self::from_id(self.id())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match type_table_entry(self.id()) {
            Some(entry) => f.write_str(entry.1),
            None => write!(f, "unknown type {}", self.id()),
        }
    }
}

/// One tensor descriptor from a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` varies fastest in memory.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the tensor's bytes from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in row-major order (the GGUF dimensions reversed), e.g. `[rows, cols]`
    /// for a matrix whose rows are contiguous.
    pub fn shape(&self) -> Vec<usize> {
        self.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }

    /// Number of elements (the product of the dimensions; 1 for no dimensions). Every
    /// descriptor read by [`GgufFile`] has been checked not to overflow; for one built
    /// by hand the product saturates at `u64::MAX`.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes the tensor's data occupies, from its element type's block layout.
    ///
    /// Fails with [`GgufError::UnsupportedType`] for a type id ggml does not define, and
    /// with [`GgufError::Invalid`] when the first dimension is not a whole number of
    /// blocks or the size overflows. (Errors from this method name no file.)
    pub fn n_bytes(&self) -> Result<u64, GgufError> {
        self.n_bytes_in(NO_FILE, 0)
    }

    pub(super) fn n_bytes_in(&self, file: &str, offset: u64) -> Result<u64, GgufError> {
        let (Some(block), Some(size)) = (self.ggml_type.block_size(), self.ggml_type.type_size())
        else {
            return Err(self.unsupported(file));
        };
        let (block, size) = (block as u64, size as u64);
        let ne0 = self.dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(block) {
            return Err(invalid(
                file,
                offset,
                format!(
                    "tensor '{}': first dimension {ne0} is not a multiple of the {} block size {block}",
                    self.name, self.ggml_type
                ),
            ));
        }
        let n = self
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| (n / block).checked_mul(size))
            .ok_or_else(|| {
                invalid(
                    file,
                    offset,
                    format!(
                        "tensor '{}': dimensions {:?} overflow its byte size",
                        self.name, self.dims
                    ),
                )
            })?;
        Ok(n)
    }

    pub(super) fn unsupported(&self, file: &str) -> GgufError {
        GgufError::UnsupportedType {
            file: file.to_owned(),
            tensor: self.name.clone(),
            type_id: self.ggml_type.id(),
            type_name: self.ggml_type.name(),
        }
    }
}
