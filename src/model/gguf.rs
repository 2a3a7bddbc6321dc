//! Reading GGUF model files and dequantising their tensors to `f32`.
//!
//! GGUF is the single-file container that llama.cpp uses for model weights: a small
//! header (magic `GGUF`, a version, tensor and metadata counts), a list of typed
//! key/value metadata entries (architecture hyper-parameters, the tokenizer vocabulary,
//! ...), a list of tensor descriptors (name, dimensions, ggml element type, offset), and
//! then an aligned data section holding the tensor bytes. This module reads versions 2
//! and 3 of the little-endian format as described by the GGUF specification
//! (`docs/gguf.md` in the ggml repository) and decodes the block-quantised element
//! types following the reference dequantisation routines of ggml (`ggml-quants.c`),
//! reproducing their arithmetic exactly, so the values are bit-identical to the
//! reference implementation: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K.
//! Tensors of any other type can still be listed and their raw bytes read; only
//! dequantising them fails with [`GgufError::UnsupportedType`].
//!
//! Files are memory-mapped, and every count, length, offset and size read from them is
//! checked against the bytes that actually remain before it is used, so a corrupt or
//! hostile file produces a [`GgufError`] naming the file, the byte offset and what was
//! expected, never a panic or an outsized allocation. [`GgufWriter`] produces small
//! GGUF v3 files (F32, F16 and Q8_0 tensors, quantised here) for tests and tools.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The GGUF version that [`GgufWriter`] produces.
pub const GGUF_WRITE_VERSION: u32 = 3;

/// Metadata key that overrides the data-section alignment (a `u32` power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// Alignment of the data section and of every tensor's offset when the file does not
/// set [`ALIGNMENT_KEY`].
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most dimensions a tensor may have (ggml's limit).
pub const MAX_DIMS: usize = 4;

/// Deepest nesting of metadata arrays accepted (arrays of arrays of ...).
const MAX_ARRAY_DEPTH: usize = 8;

/// Most metadata values (array elements included) one file may hold. Large vocabularies
/// need a few hundred thousand values per array; the cap bounds the memory a corrupt
/// array count can make the reader allocate (each value takes 32 bytes in memory while
/// it may take one byte in the file).
const MAX_METADATA_VALUES: usize = 1 << 23;

/// Upper bound on the capacity reserved up front for a list read from a file; longer
/// lists grow as their elements are actually read.
const MAX_PREALLOC: usize = 1 << 16;

/// Label used in errors that do not come from a particular file.
const NO_FILE: &str = "<no file>";

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Everything that can go wrong while reading, dequantising or writing GGUF data.
///
/// `file` is the path of the file (or the label given to [`GgufFile::from_bytes`]);
/// `offset` is the absolute byte offset in that file where the problem was found.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, mapped or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying operating-system error.
        source: std::io::Error,
    },
    /// The file ends before a field that should be there.
    #[error(
        "{file}: offset {offset}: truncated: {what} needs {needed} bytes but only {available} remain"
    )]
    Truncated {
        /// File path or label.
        file: String,
        /// Where the field starts.
        offset: u64,
        /// What was being read.
        what: String,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
    },
    /// The file does not start with `GGUF`.
    #[error("{file}: offset 0: bad magic \"{}\": not a GGUF file (expected \"GGUF\")", .found.escape_ascii())]
    BadMagic {
        /// File path or label.
        file: String,
        /// The first four bytes found instead.
        found: [u8; 4],
    },
    /// The GGUF version is not 2 or 3.
    #[error("{file}: offset 4: unsupported GGUF version {version} (this reader supports 2 and 3)")]
    UnsupportedVersion {
        /// File path or label.
        file: String,
        /// The version number found.
        version: u32,
    },
    /// The file is structurally wrong in some other way.
    #[error("{file}: offset {offset}: {message}")]
    Invalid {
        /// File path or label.
        file: String,
        /// Where the problem was found.
        offset: u64,
        /// What was expected and what was found.
        message: String,
    },
    /// A metadata key that was asked for is absent.
    #[error("{file}: metadata key '{key}' is missing")]
    MissingKey {
        /// File path or label.
        file: String,
        /// The key asked for.
        key: String,
    },
    /// A metadata value has a different type from the one asked for.
    #[error("{file}: metadata key '{key}' holds {found}, expected {expected}")]
    WrongType {
        /// File path or label.
        file: String,
        /// The key asked for.
        key: String,
        /// The type the caller asked for.
        expected: &'static str,
        /// A description of the value actually stored.
        found: String,
    },
    /// The tensor's ggml type cannot be dequantised (or, for an unknown type id, even
    /// sized) by this module.
    #[error(
        "{file}: tensor '{tensor}' has ggml type {type_name} (id {type_id}), which this reader cannot decode"
    )]
    UnsupportedType {
        /// File path or label.
        file: String,
        /// The tensor concerned.
        tensor: String,
        /// The numeric ggml type id.
        type_id: u32,
        /// The ggml name of the type (`"unknown"` for ids ggml does not define).
        type_name: &'static str,
    },
    /// No tensor of that name exists in the file.
    #[error("{file}: no tensor named '{name}'")]
    TensorNotFound {
        /// File path or label.
        file: String,
        /// The name asked for.
        name: String,
    },
    /// [`GgufWriter`] was given something it cannot encode.
    #[error("GGUF writer: {message}")]
    Writer {
        /// What was wrong.
        message: String,
    },
}

fn invalid(file: &str, offset: u64, message: impl Into<String>) -> GgufError {
    GgufError::Invalid {
        file: file.to_owned(),
        offset,
        message: message.into(),
    }
}

fn writer_error(message: impl Into<String>) -> GgufError {
    GgufError::Writer {
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------

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
const GGML_TYPE_TABLE: &[(u32, &str, usize, usize)] = &[
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

fn type_table_entry(id: u32) -> Option<&'static (u32, &'static str, usize, usize)> {
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
    fn canonical(self) -> Self {
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

// ---------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------

/// A typed GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 12.
    F64(f64),
    /// GGUF type 7 (one byte, 0 or 1).
    Bool(bool),
    /// GGUF type 8: a UTF-8 string. Invalid UTF-8 in a value (not in keys or tensor
    /// names, which must be valid) is replaced by U+FFFD rather than failing the file.
    String(String),
    /// GGUF type 9: a homogeneous array (possibly of arrays).
    Array(Vec<MetaValue>),
}

const VT_U8: u32 = 0;
const VT_I8: u32 = 1;
const VT_U16: u32 = 2;
const VT_I16: u32 = 3;
const VT_U32: u32 = 4;
const VT_I32: u32 = 5;
const VT_F32: u32 = 6;
const VT_BOOL: u32 = 7;
const VT_STRING: u32 = 8;
const VT_ARRAY: u32 = 9;
const VT_U64: u32 = 10;
const VT_I64: u32 = 11;
const VT_F64: u32 = 12;

/// Name of a GGUF value type id, for messages.
fn value_type_name(vt: u32) -> &'static str {
    match vt {
        VT_U8 => "u8",
        VT_I8 => "i8",
        VT_U16 => "u16",
        VT_I16 => "i16",
        VT_U32 => "u32",
        VT_I32 => "i32",
        VT_F32 => "f32",
        VT_BOOL => "bool",
        VT_STRING => "string",
        VT_ARRAY => "array",
        VT_U64 => "u64",
        VT_I64 => "i64",
        VT_F64 => "f64",
        _ => "unknown",
    }
}

/// Fewest bytes one value of GGUF value type `vt` occupies in a file.
fn min_encoded_size(vt: u32) -> Option<u64> {
    match vt {
        VT_U8 | VT_I8 | VT_BOOL => Some(1),
        VT_U16 | VT_I16 => Some(2),
        VT_U32 | VT_I32 | VT_F32 => Some(4),
        VT_U64 | VT_I64 | VT_F64 => Some(8),
        // A string is at least its u64 length; an array its u32 type and u64 count.
        VT_STRING => Some(8),
        VT_ARRAY => Some(12),
        _ => None,
    }
}

impl MetaValue {
    /// The GGUF value type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => VT_U8,
            Self::I8(_) => VT_I8,
            Self::U16(_) => VT_U16,
            Self::I16(_) => VT_I16,
            Self::U32(_) => VT_U32,
            Self::I32(_) => VT_I32,
            Self::U64(_) => VT_U64,
            Self::I64(_) => VT_I64,
            Self::F32(_) => VT_F32,
            Self::F64(_) => VT_F64,
            Self::Bool(_) => VT_BOOL,
            Self::String(_) => VT_STRING,
            Self::Array(_) => VT_ARRAY,
        }
    }

    /// Short name of the value's type: `"u32"`, `"string"`, `"array"`, ...
    pub fn type_name(&self) -> &'static str {
        value_type_name(self.type_id())
    }

    /// Type description for messages, naming an array's element type
    /// (`"array of string"`).
    pub fn describe(&self) -> String {
        match self {
            Self::Array(items) => match items.first() {
                Some(first) => format!("array of {}", first.describe()),
                None => "empty array".to_owned(),
            },
            other => other.type_name().to_owned(),
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a `u64`, if it is an integer of any width that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(u64::from(v)),
            Self::U16(v) => Some(u64::from(v)),
            Self::U32(v) => Some(u64::from(v)),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `i64`, if it is an integer of any width that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(v) => Some(i64::from(v)),
            Self::U16(v) => Some(i64::from(v)),
            Self::U32(v) => Some(i64::from(v)),
            Self::U64(v) => i64::try_from(v).ok(),
            Self::I8(v) => Some(i64::from(v)),
            Self::I16(v) => Some(i64::from(v)),
            Self::I32(v) => Some(i64::from(v)),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as an `f32`, if it is an `F32` or an `F64` (rounded).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            Self::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// The boolean, if this is a `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tensor descriptors
// ---------------------------------------------------------------------------------------

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

    fn n_bytes_in(&self, file: &str, offset: u64) -> Result<u64, GgufError> {
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

    fn unsupported(&self, file: &str) -> GgufError {
        GgufError::UnsupportedType {
            file: file.to_owned(),
            tensor: self.name.clone(),
            type_id: self.ggml_type.id(),
            type_name: self.ggml_type.name(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Byte cursor
// ---------------------------------------------------------------------------------------

/// A bounds-checked little-endian cursor over the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn truncated(&self, what: &str, needed: u64) -> GgufError {
        GgufError::Truncated {
            file: self.file.to_owned(),
            offset: self.offset(),
            what: what.to_owned(),
            needed,
            available: self.remaining(),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what, n));
        }
        let start = self.pos;
        let end = start + n as usize; // n <= remaining, so this is within the buffer
        let bytes = self
            .buf
            .get(start..end)
            .ok_or_else(|| self.truncated(what, n))?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Reads a u64 length or count and checks that `count * min_size` bytes remain.
    fn count(&mut self, what: &str, min_size: u64) -> Result<u64, GgufError> {
        let at = self.offset();
        let count = self.u64(what)?;
        let remaining = self.remaining();
        if count > remaining / min_size.max(1) {
            return Err(invalid(
                self.file,
                at,
                format!("{what} {count} exceeds what the remaining {remaining} bytes can hold"),
            ));
        }
        Ok(count)
    }

    /// A string that must be valid UTF-8 (keys and tensor names).
    fn strict_string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.offset();
        let len = self.count(&format!("{what} length"), 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| invalid(self.file, at, format!("{what} is not valid UTF-8: {e}")))
    }

    /// A string value; invalid UTF-8 is replaced rather than rejected.
    fn lossy_string(&mut self) -> Result<String, GgufError> {
        let len = self.count("string length", 1)?;
        let bytes = self.take(len, "string")?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

/// Reads metadata values, counting them against [`MAX_METADATA_VALUES`].
struct ValueReader<'c, 'a> {
    cur: &'c mut Cursor<'a>,
    values: usize,
}

impl ValueReader<'_, '_> {
    fn count_value(&mut self) -> Result<(), GgufError> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(invalid(
                self.cur.file,
                self.cur.offset(),
                format!("metadata holds more than {MAX_METADATA_VALUES} values"),
            ));
        }
        Ok(())
    }

    fn value(&mut self, vt: u32, depth: usize) -> Result<MetaValue, GgufError> {
        self.count_value()?;
        let cur = &mut *self.cur;
        let at = cur.offset();
        Ok(match vt {
            VT_U8 => MetaValue::U8(u8::from_le_bytes(cur.array("u8 value")?)),
            VT_I8 => MetaValue::I8(i8::from_le_bytes(cur.array("i8 value")?)),
            VT_U16 => MetaValue::U16(u16::from_le_bytes(cur.array("u16 value")?)),
            VT_I16 => MetaValue::I16(i16::from_le_bytes(cur.array("i16 value")?)),
            VT_U32 => MetaValue::U32(u32::from_le_bytes(cur.array("u32 value")?)),
            VT_I32 => MetaValue::I32(i32::from_le_bytes(cur.array("i32 value")?)),
            VT_U64 => MetaValue::U64(u64::from_le_bytes(cur.array("u64 value")?)),
            VT_I64 => MetaValue::I64(i64::from_le_bytes(cur.array("i64 value")?)),
            VT_F32 => MetaValue::F32(f32::from_le_bytes(cur.array("f32 value")?)),
            VT_F64 => MetaValue::F64(f64::from_le_bytes(cur.array("f64 value")?)),
            VT_BOOL => match cur.array::<1>("bool value")? {
                [0] => MetaValue::Bool(false),
                [1] => MetaValue::Bool(true),
                [b] => {
                    return Err(invalid(
                        cur.file,
                        at,
                        format!("bool value is {b}, expected 0 or 1"),
                    ));
                }
            },
            VT_STRING => MetaValue::String(cur.lossy_string()?),
            VT_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(invalid(
                        cur.file,
                        at,
                        format!("metadata arrays nested more than {MAX_ARRAY_DEPTH} deep"),
                    ));
                }
                let elem_at = cur.offset();
                let elem = cur.u32("array element type")?;
                let Some(min_size) = min_encoded_size(elem) else {
                    return Err(invalid(
                        cur.file,
                        elem_at,
                        format!("array element type {elem} is not a GGUF value type (0..=12)"),
                    ));
                };
                let count =
                    cur.count(&format!("{} array length", value_type_name(elem)), min_size)?;
                // `count` is bounded by the remaining bytes, so it fits in usize.
                let count = usize::try_from(count).unwrap_or(usize::MAX);
                let mut items = Vec::with_capacity(count.min(MAX_PREALLOC));
                for _ in 0..count {
                    items.push(self.value(elem, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            other => {
                return Err(invalid(
                    cur.file,
                    at.saturating_sub(4),
                    format!("metadata value type {other} is not a GGUF value type (0..=12)"),
                ));
            }
        })
    }
}

/// Everything [`GgufFile`] keeps from the header.
struct Header {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    /// Position of each tensor in `tensors`, by name.
    index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    /// Absolute byte range of each supported tensor's data (None for other types).
    ranges: Vec<Option<(usize, usize)>>,
}

fn parse_header(buf: &[u8], file: &str) -> Result<Header, GgufError> {
    let mut cur = Cursor { buf, pos: 0, file };
    let magic: [u8; 4] = cur.array("magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            file: file.to_owned(),
            found: magic,
        });
    }
    let version = cur.u32("version")?;
    if version & 0xFFFF == 0 && matches!(version.swap_bytes(), 1..=3) {
        return Err(invalid(
            file,
            4,
            format!(
                "version field reads {version:#x}: this is a big-endian GGUF file, which is not supported"
            ),
        ));
    }
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion {
            file: file.to_owned(),
            version,
        });
    }
    // Each tensor descriptor takes at least 8 (name length) + 4 (dim count)
    // + 4 (type) + 8 (offset) bytes; each metadata entry at least 8 (key length)
    // + 4 (value type) + 1 (smallest value).
    let n_tensors = cur.count("tensor count", 24)?;
    let n_kv = cur.count("metadata entry count", 13)?;

    let mut metadata = BTreeMap::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut values = ValueReader {
        cur: &mut cur,
        values: 0,
    };
    for _ in 0..n_kv {
        let key_at = values.cur.offset();
        let key = values.cur.strict_string("metadata key")?;
        let vt = values.cur.u32("metadata value type")?;
        let value_at = values.cur.offset();
        let value = values.value(vt, 0)?;
        if key == ALIGNMENT_KEY {
            alignment = match value {
                MetaValue::U32(a) if a.is_power_of_two() => u64::from(a),
                ref other => {
                    return Err(invalid(
                        file,
                        value_at,
                        format!(
                            "{ALIGNMENT_KEY} must be a u32 power of two, found {} {other:?}",
                            other.describe()
                        ),
                    ));
                }
            };
        }
        if metadata.contains_key(&key) {
            return Err(invalid(
                file,
                key_at,
                format!("duplicate metadata key '{key}'"),
            ));
        }
        metadata.insert(key, value);
    }

    let cap = usize::try_from(n_tensors)
        .unwrap_or(usize::MAX)
        .min(MAX_PREALLOC);
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(cap);
    let mut index: HashMap<String, usize> = HashMap::with_capacity(cap);
    let mut info_offsets = Vec::with_capacity(cap);
    for _ in 0..n_tensors {
        let info_at = cur.offset();
        let name = cur.strict_string("tensor name")?;
        let dims_at = cur.offset();
        let n_dims = cur.u32("tensor dimension count")?;
        if n_dims as usize > MAX_DIMS {
            return Err(invalid(
                file,
                dims_at,
                format!("tensor '{name}' has {n_dims} dimensions, at most {MAX_DIMS} are allowed"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(cur.u64("tensor dimension")?);
        }
        let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        if n_elements.is_none_or(|n| n > i64::MAX as u64) {
            return Err(invalid(
                file,
                dims_at,
                format!("tensor '{name}' dimensions {dims:?} have more than 2^63 elements"),
            ));
        }
        let ggml_type = GgmlType::from_id(cur.u32("tensor type")?);
        let offset_at = cur.offset();
        let offset = cur.u64("tensor data offset")?;
        if !offset.is_multiple_of(alignment) {
            return Err(invalid(
                file,
                offset_at,
                format!(
                    "tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}"
                ),
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
        info_offsets.push(info_at);
    }
    for (i, t) in tensors.iter().enumerate() {
        if index.insert(t.name.clone(), i).is_some() {
            let at = info_offsets.get(i).copied().unwrap_or(0);
            return Err(invalid(
                file,
                at,
                format!("duplicate tensor name '{}'", t.name),
            ));
        }
    }

    let end_of_infos = cur.offset();
    let data_offset = end_of_infos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| invalid(file, end_of_infos, "data section offset overflows"))?;
    let file_len = buf.len() as u64;
    let mut ranges = Vec::with_capacity(tensors.len());
    for (t, &info_at) in tensors.iter().zip(&info_offsets) {
        if !t.ggml_type.is_supported() {
            ranges.push(None);
            continue;
        }
        let n_bytes = t.n_bytes_in(file, info_at)?;
        ranges.push(Some(data_range(
            t,
            n_bytes,
            data_offset,
            file_len,
            file,
            info_at,
        )?));
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        index,
        alignment,
        data_offset,
        ranges,
    })
}

/// The absolute byte range of a tensor's data, checked to lie inside the file.
fn data_range(
    t: &TensorInfo,
    n_bytes: u64,
    data_offset: u64,
    file_len: u64,
    file: &str,
    at: u64,
) -> Result<(usize, usize), GgufError> {
    let start = data_offset.checked_add(t.offset);
    let end = start.and_then(|s| s.checked_add(n_bytes));
    match (start, end) {
        (Some(start), Some(end)) if end <= file_len => {
            // Both are at most the buffer length, which is a usize.
            Ok((start as usize, end as usize))
        }
        _ => Err(invalid(
            file,
            at,
            format!(
                "tensor '{}' ({} bytes at data offset {}, absolute {}) extends past the end of the {file_len}-byte file",
                t.name,
                n_bytes,
                t.offset,
                data_offset.saturating_add(t.offset)
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------

/// The bytes of a GGUF file: mapped, or owned.
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}

/// An opened GGUF file: its parsed header plus the bytes of its tensors.
///
/// All validation happens when the file is opened; afterwards, reading tensor bytes is
/// a slice into the mapping and [`GgufFile::dequantize`] decodes one tensor to `f32`.
pub struct GgufFile {
    label: String,
    storage: Storage,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    ranges: Vec<Option<(usize, usize)>>,
    index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("label", &self.label)
            .field("len", &self.storage.bytes().len())
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps a GGUF file and parses its header.
    ///
    /// The file should not be modified while it is open (the usual condition of
    /// memory-mapping: a concurrent writer could change the tensor bytes under the
    /// reader; the header has already been copied out and validated).
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let storage = if len == 0 {
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is only ever read, and through bounds-checked slices; the
            // documented requirement is that the file is not truncated or rewritten by
            // another process while it is mapped.
            Storage::Mapped(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        Self::from_storage(storage, path.display().to_string())
    }

    /// Parses a GGUF file held in memory; `label` stands for the path in errors.
    pub fn from_bytes(bytes: Vec<u8>, label: &str) -> Result<Self, GgufError> {
        Self::from_storage(Storage::Owned(bytes), label.to_owned())
    }

    fn from_storage(storage: Storage, label: String) -> Result<Self, GgufError> {
        let header = parse_header(storage.bytes(), &label)?;
        Ok(Self {
            label,
            storage,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            ranges: header.ranges,
            index: header.index,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    /// The path (or label) used in this file's errors.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and tensor offsets.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the data section, which [`TensorInfo::offset`] is relative to.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata entries, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            file: self.label.clone(),
            key: key.to_owned(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: String) -> GgufError {
        GgufError::WrongType {
            file: self.label.clone(),
            key: key.to_owned(),
            expected,
            found,
        }
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| self.wrong_type(key, "string", value.describe()))
    }

    /// A non-negative integer value of any width and signedness.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let value = self.require(key)?;
        value.as_u64().ok_or_else(|| {
            let found = match value.as_i64() {
                Some(v) => format!("{} {v} (negative)", value.type_name()),
                None => value.describe(),
            };
            self.wrong_type(key, "a non-negative integer", found)
        })
    }

    /// A non-negative integer value that fits in a `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.get_u64(key)?;
        u32::try_from(v).map_err(|_| {
            self.wrong_type(key, "an integer that fits in u32", format!("integer {v}"))
        })
    }

    /// A floating-point value (`F32`, or `F64` rounded to `f32`).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let value = self.require(key)?;
        value
            .as_f32()
            .ok_or_else(|| self.wrong_type(key, "f32 or f64", value.describe()))
    }

    /// A boolean value.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let value = self.require(key)?;
        value
            .as_bool()
            .ok_or_else(|| self.wrong_type(key, "bool", value.describe()))
    }

    /// An array value of any element type.
    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        let value = self.require(key)?;
        value
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "array", value.describe()))
    }

    /// An array of strings (an empty array is accepted).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let items = self
            .get_array(key)
            .map_err(|e| self.retype(e, "array of string"))?;
        items
            .iter()
            .map(|item| {
                item.as_str().ok_or_else(|| {
                    self.wrong_type(
                        key,
                        "array of string",
                        format!("array of {}", item.describe()),
                    )
                })
            })
            .collect()
    }

    /// An array of integers, each converted to `i64` (an empty array is accepted).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        let items = self
            .get_array(key)
            .map_err(|e| self.retype(e, "array of integers"))?;
        items
            .iter()
            .map(|item| {
                item.as_i64().ok_or_else(|| {
                    self.wrong_type(
                        key,
                        "array of integers",
                        format!("array of {}", item.describe()),
                    )
                })
            })
            .collect()
    }

    /// An array of floats (`F32`, or `F64` rounded), as `f32` (an empty array is accepted).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        let items = self
            .get_array(key)
            .map_err(|e| self.retype(e, "array of f32"))?;
        items
            .iter()
            .map(|item| {
                item.as_f32().ok_or_else(|| {
                    self.wrong_type(key, "array of f32", format!("array of {}", item.describe()))
                })
            })
            .collect()
    }

    /// Replaces the `expected` of a WrongType error from [`GgufFile::get_array`].
    fn retype(&self, err: GgufError, expected: &'static str) -> GgufError {
        match err {
            GgufError::WrongType { key, found, .. } => self.wrong_type(&key, expected, found),
            other => other,
        }
    }

    /// All tensor descriptors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The descriptor of the tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    fn lookup(&self, name: &str) -> Result<(usize, &TensorInfo), GgufError> {
        self.index
            .get(name)
            .and_then(|&i| self.tensors.get(i).map(|t| (i, t)))
            .ok_or_else(|| GgufError::TensorNotFound {
                file: self.label.clone(),
                name: name.to_owned(),
            })
    }

    /// The raw bytes of a tensor's data. Works for any type whose block layout is known,
    /// including those that cannot be dequantised here.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let (i, info) = self.lookup(name)?;
        let bytes = self.storage.bytes();
        let (start, end) = match self.ranges.get(i).copied().flatten() {
            Some(range) => range,
            None => {
                // A type this module does not decode: locate it now.
                let at = self.data_offset.saturating_add(info.offset);
                let n_bytes = info.n_bytes_in(&self.label, at)?;
                data_range(
                    info,
                    n_bytes,
                    self.data_offset,
                    bytes.len() as u64,
                    &self.label,
                    at,
                )?
            }
        };
        bytes.get(start..end).ok_or_else(|| {
            invalid(
                &self.label,
                start as u64,
                format!("tensor '{name}' lies outside the file"),
            )
        })
    }

    /// Dequantises a tensor to `n_elements` values in GGUF memory order, which is the
    /// row-major order of [`TensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let (_, info) = self.lookup(name)?;
        if !info.ggml_type.is_supported() {
            return Err(info.unsupported(&self.label));
        }
        let bytes = self.tensor_bytes(name)?;
        let at = self.data_offset.saturating_add(info.offset);
        let n = usize::try_from(info.n_elements()).map_err(|_| {
            invalid(
                &self.label,
                at,
                format!("tensor '{name}' has too many elements for this platform"),
            )
        })?;
        check_sizes(info.ggml_type, bytes.len(), n)
            .map_err(|m| invalid(&self.label, at, format!("tensor '{name}': {m}")))?;
        let mut out = vec![0f32; n];
        decode(info.ggml_type, bytes, &mut out);
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Dequantisation
// ---------------------------------------------------------------------------------------

/// Dequantises `n_elements` values of type `ggml_type` from `bytes`, which must hold
/// exactly the blocks for that many elements.
///
/// Fails with [`GgufError::UnsupportedType`] for types other than the nine decodable
/// ones and with [`GgufError::Invalid`] when the sizes do not agree (errors name no file).
pub fn dequantize_bytes(
    ggml_type: GgmlType,
    bytes: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, GgufError> {
    let ggml_type = ggml_type.canonical();
    if !ggml_type.is_supported() {
        return Err(GgufError::UnsupportedType {
            file: NO_FILE.to_owned(),
            tensor: "<bytes>".to_owned(),
            type_id: ggml_type.id(),
            type_name: ggml_type.name(),
        });
    }
    check_sizes(ggml_type, bytes.len(), n_elements).map_err(|m| invalid(NO_FILE, 0, m))?;
    let mut out = vec![0f32; n_elements];
    decode(ggml_type, bytes, &mut out);
    Ok(out)
}

/// Checks that `n_bytes` is exactly the size of `n_elements` values of a decodable type.
fn check_sizes(ggml_type: GgmlType, n_bytes: usize, n_elements: usize) -> Result<(), String> {
    let (Some(block), Some(size)) = (ggml_type.block_size(), ggml_type.type_size()) else {
        return Err(format!("type {ggml_type} has no known block layout"));
    };
    if !n_elements.is_multiple_of(block) {
        return Err(format!(
            "{n_elements} elements are not a whole number of {ggml_type} blocks of {block}"
        ));
    }
    let expected = (n_elements / block).checked_mul(size);
    if expected != Some(n_bytes) {
        return Err(format!(
            "{n_elements} {ggml_type} elements need {} bytes, got {n_bytes}",
            expected.map_or_else(|| "an overflowing number of".to_owned(), |e| e.to_string())
        ));
    }
    Ok(())
}

/// Decodes whole blocks of `bytes` into `out`; the sizes have been checked by
/// [`check_sizes`] (were they not, only the blocks present in both would be written).
fn decode(ggml_type: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ggml_type {
        GgmlType::F32 => blocks::<4, 1>(bytes, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => blocks::<2, 1>(bytes, out, |b, y| y[0] = f16::from_le_bytes(*b).to_f32()),
        GgmlType::BF16 => blocks::<2, 1>(bytes, out, |b, y| {
            // bfloat16 is the high half of a binary32: widen bit for bit (NaNs included).
            y[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16);
        }),
        GgmlType::Q4_0 => blocks::<18, 32>(bytes, out, dequant_q4_0),
        GgmlType::Q4_1 => blocks::<20, 32>(bytes, out, dequant_q4_1),
        GgmlType::Q8_0 => blocks::<34, 32>(bytes, out, dequant_q8_0),
        GgmlType::Q4_K => blocks::<144, 256>(bytes, out, dequant_q4_k),
        GgmlType::Q5_K => blocks::<176, 256>(bytes, out, dequant_q5_k),
        GgmlType::Q6_K => blocks::<210, 256>(bytes, out, dequant_q6_k),
        GgmlType::Other(_) => {}
    }
}

/// Applies `f` to each `B`-byte block and the `N` outputs it decodes to.
fn blocks<const B: usize, const N: usize>(
    bytes: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; B], &mut [f32; N]),
) {
    let (ins, _) = bytes.as_chunks::<B>();
    let (outs, _) = out.as_chunks_mut::<N>();
    for (b, y) in ins.iter().zip(outs.iter_mut()) {
        f(b, y);
    }
}

/// The little-endian f16 at byte `at` of a block, widened to f32.
#[inline(always)]
fn f16_at<const B: usize>(b: &[u8; B], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

// Layout: f16 scale d, then 16 bytes holding 32 four-bit values; byte j holds element j
// in its low nibble and element j + 16 in its high nibble. Value = (q - 8) * d.
fn dequant_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = (i32::from(q & 0x0F) - 8) as f32 * d;
        y[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

// Layout: f16 scale d, f16 minimum m, then 16 bytes of nibbles as in Q4_0.
// Value = q * d + m.
fn dequant_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = f32::from(q & 0x0F) * d + m;
        y[j + 16] = f32::from(q >> 4) * d + m;
    }
}

// Layout: f16 scale d, then 32 signed bytes. Value = q * d.
fn dequant_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = f32::from(b[2 + j] as i8) * d;
    }
}

/// Six-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K super-block, from
/// its 12 packed bytes: sub-blocks 0-3 keep theirs in the low six bits of bytes j and
/// j + 4; sub-blocks 4-7 combine a nibble of byte j + 4 with the top two bits of bytes
/// j - 4 (scale) and j (minimum).
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 0x3F, s[j + 4] & 0x3F)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn k_scales<const B: usize>(b: &[u8; B]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[4..16]);
    s
}

// Layout: f16 d, f16 dmin, 12 bytes of packed six-bit scales/minimums, 128 bytes of
// nibbles. Each 64-element group g uses 32 bytes: low nibbles are sub-block 2g, high
// nibbles sub-block 2g + 1. Value = (d * scale) * q - (dmin * min).
fn dequant_q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let s = k_scales(b);
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, &s);
        let (sc2, m2) = scale_min_k4(2 * g + 1, &s);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        for l in 0..32 {
            let q = b[16 + 32 * g + l];
            y[64 * g + l] = d1 * f32::from(q & 0x0F) - min1;
            y[64 * g + 32 + l] = d2 * f32::from(q >> 4) - min2;
        }
    }
}

// Layout: as Q4_K, with 32 bytes of fifth bits between the scales and the nibbles:
// bit i of high-bit byte l is the fifth bit of element l of sub-block i.
fn dequant_q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let s = k_scales(b);
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, &s);
        let (sc2, m2) = scale_min_k4(2 * g + 1, &s);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (bit1, bit2) = (1u8 << (2 * g), 2u8 << (2 * g));
        for l in 0..32 {
            let q = b[48 + 32 * g + l];
            let h = b[16 + l];
            let hi1 = if h & bit1 != 0 { 16 } else { 0 };
            let hi2 = if h & bit2 != 0 { 16 } else { 0 };
            y[64 * g + l] = d1 * f32::from((q & 0x0F) + hi1) - min1;
            y[64 * g + 32 + l] = d2 * f32::from((q >> 4) + hi2) - min2;
        }
    }
}

// Layout: 128 bytes of low nibbles, 64 bytes of two-bit high parts, 16 signed 8-bit
// scales (one per 16 elements), f16 d. Each 128-element half uses 64 low-nibble bytes,
// 32 high-part bytes and 8 scales; within it, element l + 32k (k = 0..4) takes its low
// nibble from byte l (k even) or l + 32 (k odd), low half for k < 2 and high half
// otherwise, and bits 2k..2k+2 of high byte l. Value = (d * scale) * (q - 32).
fn dequant_q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = 64 * half;
        let qh = 128 + 32 * half;
        let sc = 192 + 8 * half;
        let out = 128 * half;
        for l in 0..32 {
            let is = l / 16;
            let (lo_a, lo_b, h) = (b[ql + l], b[ql + l + 32], b[qh + l]);
            let q1 = i32::from((lo_a & 0x0F) | ((h & 3) << 4)) - 32;
            let q2 = i32::from((lo_b & 0x0F) | (((h >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((lo_a >> 4) | (((h >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((lo_b >> 4) | (((h >> 6) & 3) << 4)) - 32;
            let scale = |k: usize| f32::from(b[sc + is + k] as i8);
            y[out + l] = d * scale(0) * q1 as f32;
            y[out + l + 32] = d * scale(2) * q2 as f32;
            y[out + l + 64] = d * scale(4) * q3 as f32;
            y[out + l + 96] = d * scale(6) * q4 as f32;
        }
    }
}

/// Quantises `x` (a whole number of 32-element blocks) to Q8_0 the way ggml's reference
/// quantiser does: scale = max |x| / 127 stored as f16, values rounded half away from
/// zero after multiplying by the reciprocal of the (unrounded) scale.
fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    for block in x.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for &v in block {
            // Finite products lie within ±127 (after rounding). A block of subnormal
            // values can make the reciprocal infinite; such products become 0, as
            // they do in ggml on x86 and in the `gguf` Python package.
            let r = (v * id).round();
            out.push(if r.is_finite() { r as i8 as u8 } else { 0 });
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------

/// Builds GGUF v3 files: metadata plus F32, F16 or Q8_0 tensors quantised from `f32`
/// data (and raw blocks of any known type). Meant for tests and tools that need small
/// model files; everything is kept in memory.
#[derive(Debug, Default, Clone)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Debug, Clone)]
struct PendingTensor {
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

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let len = (out.len() as u64).next_multiple_of(alignment) as usize;
    out.resize(len, 0);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(
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

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- reference vectors -------------------------------------------------------------

    /// Reference vectors produced by `scripts/reference/gguf_quant_vectors.py` with the
    /// `gguf` Python package (see that script for the format).
    const QUANT_VECTORS: &[u8] = include_bytes!("../../tests/fixtures/gguf/quant_vectors.bin");

    struct Fixture<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    impl<'a> Fixture<'a> {
        fn take(&mut self, n: usize) -> &'a [u8] {
            let s = &self.bytes[self.pos..self.pos + n];
            self.pos += n;
            s
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take(4).try_into().expect("test fixture"))
        }
        fn f32s(&mut self, n: usize) -> Vec<f32> {
            self.take(4 * n)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("test fixture")))
                .collect()
        }
    }

    enum Vector {
        Dequant {
            ty: GgmlType,
            bytes: Vec<u8>,
            expected: Vec<f32>,
        },
        QuantQ8 {
            input: Vec<f32>,
            expected: Vec<u8>,
        },
    }

    fn vectors() -> Vec<Vector> {
        let mut f = Fixture {
            bytes: QUANT_VECTORS,
            pos: 0,
        };
        assert_eq!(f.take(4), b"GQV1");
        let n = f.u32();
        let mut out = Vec::new();
        for _ in 0..n {
            match f.u32() {
                0 => {
                    let ty = GgmlType::from_id(f.u32());
                    let n_el = f.u32() as usize;
                    let n_bytes = f.u32() as usize;
                    let bytes = f.take(n_bytes).to_vec();
                    let expected = f.f32s(n_el);
                    out.push(Vector::Dequant {
                        ty,
                        bytes,
                        expected,
                    });
                }
                1 => {
                    let n_el = f.u32() as usize;
                    let input = f.f32s(n_el);
                    let n_bytes = f.u32() as usize;
                    let expected = f.take(n_bytes).to_vec();
                    out.push(Vector::QuantQ8 { input, expected });
                }
                k => panic!("unknown fixture record kind {k}"),
            }
        }
        assert_eq!(f.pos, QUANT_VECTORS.len(), "trailing bytes in fixture");
        out
    }

    fn assert_bits_eq(ty: GgmlType, got: &[f32], expected: &[f32]) {
        assert_eq!(got.len(), expected.len(), "{ty}: length");
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "{ty}: element {i} (block {}): got {g:e}, expected {e:e}",
                i / ty.block_size().expect("test fixture")
            );
        }
    }

    #[test]
    fn dequantisation_matches_reference_bit_for_bit() {
        let mut seen = Vec::new();
        for v in vectors() {
            if let Vector::Dequant {
                ty,
                bytes,
                expected,
            } = v
            {
                let got = dequantize_bytes(ty, &bytes, expected.len()).expect("test fixture");
                assert_bits_eq(ty, &got, &expected);
                // Block by block gives the same values as the whole run.
                let (bs, ts) = (
                    ty.block_size().expect("test fixture"),
                    ty.type_size().expect("test fixture"),
                );
                for (i, block) in bytes.chunks(ts).enumerate() {
                    let one = dequantize_bytes(ty, block, bs).expect("test fixture");
                    assert_bits_eq(ty, &one, &expected[i * bs..(i + 1) * bs]);
                }
                seen.push(ty);
            }
        }
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            assert!(seen.contains(&ty), "fixture has no vectors for {ty}");
        }
    }

    #[test]
    fn q8_0_quantiser_matches_reference() {
        let mut checked = 0;
        for v in vectors() {
            if let Vector::QuantQ8 { input, expected } = v {
                let mut got = Vec::new();
                quantize_q8_0(&input, &mut got);
                assert_eq!(got, expected);
                checked += 1;
            }
        }
        assert!(checked > 0);
    }

    #[test]
    fn dequantisation_via_file_matches_reference() {
        // The same vectors, stored as tensors of a file and read back through GgufFile.
        let mut w = GgufWriter::new();
        let mut expect = Vec::new();
        for (i, v) in vectors().into_iter().enumerate() {
            if let Vector::Dequant {
                ty,
                bytes,
                expected,
            } = v
            {
                let name = format!("t{i}.{}", ty.name());
                w.add_tensor_raw(&name, &[expected.len()], ty, bytes)
                    .expect("test fixture");
                expect.push((name, ty, expected));
            }
        }
        let f = GgufFile::from_bytes(w.to_bytes().expect("test fixture"), "vectors.gguf")
            .expect("test fixture");
        for (name, ty, expected) in expect {
            assert_eq!(f.tensor_info(&name).expect("test fixture").ggml_type, ty);
            assert_bits_eq(ty, &f.dequantize(&name).expect("test fixture"), &expected);
        }
    }

    #[test]
    fn f16_nan_is_quieted_like_ggml() {
        // ggml widens f16 with hardware or an arithmetic trick that both quiet a
        // signalling NaN while keeping its payload; numpy keeps it signalling.
        let got =
            dequantize_bytes(GgmlType::F16, &0x7C01u16.to_le_bytes(), 1).expect("test fixture");
        assert_eq!(got[0].to_bits(), 0x7FC0_2000);
        let got =
            dequantize_bytes(GgmlType::F16, &0xFE00u16.to_le_bytes(), 1).expect("test fixture");
        assert_eq!(got[0].to_bits(), 0xFFC0_0000);
    }

    #[test]
    fn dequantize_bytes_checks_sizes_and_types() {
        assert!(matches!(
            dequantize_bytes(GgmlType::Q4_K, &[0; 143], 256),
            Err(GgufError::Invalid { .. })
        ));
        assert!(matches!(
            dequantize_bytes(GgmlType::Q8_0, &[0; 34], 31),
            Err(GgufError::Invalid { .. })
        ));
        assert!(matches!(
            dequantize_bytes(GgmlType::F32, &[0; 8], usize::MAX),
            Err(GgufError::Invalid { .. })
        ));
        let err = dequantize_bytes(GgmlType::from_id(6), &[0; 22], 32).unwrap_err();
        assert!(err.to_string().contains("Q5_0 (id 6)"), "{err}");
        assert_eq!(
            dequantize_bytes(GgmlType::Q6_K, &[], 0).expect("test fixture"),
            Vec::<f32>::new()
        );
        // A non-canonical spelling of a supported type still decodes.
        assert_eq!(
            dequantize_bytes(GgmlType::Other(0), &1.5f32.to_le_bytes(), 1).expect("test fixture"),
            vec![1.5]
        );
    }

    #[test]
    fn ggml_type_table() {
        for id in 0..64 {
            let t = GgmlType::from_id(id);
            assert_eq!(t.id(), id);
            assert_eq!(t.block_size().is_some(), t.type_size().is_some());
            assert_eq!(t.name() != "unknown", t.block_size().is_some());
        }
        assert_eq!(GgmlType::from_id(12), GgmlType::Q4_K);
        assert_eq!(GgmlType::Q6_K.type_size(), Some(210));
        assert_eq!(GgmlType::BF16.name(), "BF16");
        assert_eq!(GgmlType::from_id(23).name(), "IQ4_XS");
        assert_eq!(GgmlType::from_id(99).to_string(), "unknown type 99");
        assert!(!GgmlType::from_id(6).is_supported());
    }

    // ---- building and reading files ----------------------------------------------------

    fn sample_writer() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", MetaValue::String("llama".into()))
            .add_metadata("llama.block_count", MetaValue::U32(2))
            .add_metadata("llama.embedding_length", MetaValue::U64(64))
            .add_metadata("llama.rope.freq_base", MetaValue::F32(10000.0))
            .add_metadata("test.eps", MetaValue::F64(1e-5))
            .add_metadata("test.neg", MetaValue::I32(-3))
            .add_metadata("test.flag", MetaValue::Bool(true))
            .add_metadata(
                "tokenizer.ggml.tokens",
                MetaValue::Array(vec![
                    MetaValue::String("<s>".into()),
                    MetaValue::String("hé".into()),
                    MetaValue::String(String::new()),
                ]),
            )
            .add_metadata(
                "test.nested",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::I16(-1), MetaValue::I16(2)]),
                    MetaValue::Array(vec![]),
                ]),
            )
            .add_metadata(
                "test.scores",
                MetaValue::Array(vec![MetaValue::F32(0.5), MetaValue::F32(-1.0)]),
            );
        let data: Vec<f32> = (0..64 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
        w.add_tensor_f32("a.f32", &[3, 64], &data, GgmlType::F32)
            .expect("test fixture");
        w.add_tensor_f32("a.f16", &[64, 3], &data, GgmlType::F16)
            .expect("test fixture");
        w.add_tensor_f32("a.q8", &[6, 32], &data, GgmlType::Q8_0)
            .expect("test fixture");
        w.add_tensor_f32("a.vec", &[5], &data[..5], GgmlType::F32)
            .expect("test fixture");
        let raw = |n: usize, seed: u8| -> Vec<u8> {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        // Blocks with small finite scales: raw patterns with the f16 fields cleared high.
        let fix = |mut b: Vec<u8>, ts: usize, at: &[usize]| {
            for blk in b.chunks_mut(ts) {
                for &o in at {
                    blk[o + 1] &= 0x3B;
                }
            }
            b
        };
        w.add_tensor_raw(
            "q.q4_0",
            &[2, 32],
            GgmlType::Q4_0,
            fix(raw(36, 1), 18, &[0]),
        )
        .expect("test fixture");
        w.add_tensor_raw(
            "q.q4_1",
            &[32],
            GgmlType::Q4_1,
            fix(raw(20, 2), 20, &[0, 2]),
        )
        .expect("test fixture");
        w.add_tensor_raw(
            "q.q4_k",
            &[256],
            GgmlType::Q4_K,
            fix(raw(144, 3), 144, &[0, 2]),
        )
        .expect("test fixture");
        w.add_tensor_raw(
            "q.q5_k",
            &[256],
            GgmlType::Q5_K,
            fix(raw(176, 4), 176, &[0, 2]),
        )
        .expect("test fixture");
        w.add_tensor_raw(
            "q.q6_k",
            &[256],
            GgmlType::Q6_K,
            fix(raw(210, 5), 210, &[208]),
        )
        .expect("test fixture");
        w.add_tensor_raw("q.bf16", &[2, 2], GgmlType::BF16, raw(8, 6))
            .expect("test fixture");
        w.add_tensor_raw("q.q5_0", &[32], GgmlType::from_id(6), raw(22, 7))
            .expect("test fixture");
        w
    }

    fn sample_bytes() -> Vec<u8> {
        sample_writer().to_bytes().expect("test fixture")
    }

    #[test]
    fn reads_what_the_writer_wrote() {
        let f = GgufFile::from_bytes(sample_bytes(), "sample.gguf").expect("test fixture");
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.data_offset() % 32, 0);
        assert_eq!(
            f.get_str("general.architecture").expect("test fixture"),
            "llama"
        );
        assert_eq!(f.get_u64("llama.block_count").expect("test fixture"), 2);
        assert_eq!(
            f.get_u32("llama.embedding_length").expect("test fixture"),
            64
        );
        assert_eq!(
            f.get_f32("llama.rope.freq_base").expect("test fixture"),
            10000.0
        );
        assert_eq!(f.get_f32("test.eps").expect("test fixture"), 1e-5f64 as f32);
        assert!(f.get_bool("test.flag").expect("test fixture"));
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens")
                .expect("test fixture"),
            vec!["<s>", "hé", ""]
        );
        assert_eq!(
            f.get_f32_array("test.scores").expect("test fixture"),
            vec![0.5, -1.0]
        );
        assert_eq!(
            f.get_i64_array("test.nested").unwrap_err().to_string(),
            "sample.gguf: metadata key 'test.nested' holds array of array of i16, expected array of integers"
        );
        assert_eq!(
            f.get("test.nested"),
            Some(&MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::I16(-1), MetaValue::I16(2)]),
                MetaValue::Array(vec![]),
            ]))
        );
        assert_eq!(f.metadata().len(), 10);

        // Typed getter errors.
        let e = f.get_str("nope").unwrap_err();
        assert!(matches!(e, GgufError::MissingKey { .. }));
        assert_eq!(e.to_string(), "sample.gguf: metadata key 'nope' is missing");
        let e = f.get_u64("test.neg").unwrap_err();
        assert!(matches!(e, GgufError::WrongType { .. }), "{e}");
        assert!(e.to_string().contains("i32 -3 (negative)"), "{e}");
        assert!(matches!(
            f.get_str("llama.block_count"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            f.get_f32("llama.block_count"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            f.get_str_array("test.scores"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            f.get_str_array("general.architecture"),
            Err(GgufError::WrongType { .. })
        ));

        // Tensors.
        let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names[..4], ["a.f32", "a.f16", "a.q8", "a.vec"]);
        let t = f.tensor_info("a.f32").expect("test fixture");
        assert_eq!(t.dims, vec![64, 3]);
        assert_eq!(t.shape(), vec![3, 64]);
        assert_eq!(t.n_elements(), 192);
        assert_eq!(t.n_bytes().expect("test fixture"), 768);
        assert_eq!(
            f.tensor_info("a.q8")
                .expect("test fixture")
                .n_bytes()
                .expect("test fixture"),
            6 * 34
        );
        let data: Vec<f32> = (0..64 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
        assert_eq!(f.dequantize("a.f32").expect("test fixture"), data);
        assert_eq!(f.dequantize("a.vec").expect("test fixture"), data[..5]);
        let h = f.dequantize("a.f16").expect("test fixture");
        for (x, y) in data.iter().zip(&h) {
            assert_eq!(f16::from_f32(*x).to_f32(), *y);
        }
        let q = f.dequantize("a.q8").expect("test fixture");
        for (block, got) in data.chunks(32).zip(q.chunks(32)) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in block.iter().zip(got) {
                assert!((x - y).abs() <= amax / 127.0 * 0.6, "{x} vs {y}");
            }
        }
        for t in f.tensors() {
            if t.ggml_type.is_supported() {
                let v = f.dequantize(&t.name).expect("test fixture");
                assert_eq!(v.len() as u64, t.n_elements());
                assert!(v.iter().all(|x| x.is_finite()) || t.ggml_type == GgmlType::BF16);
            }
        }

        // Unsupported types: header and bytes work, dequantising fails with the name.
        assert_eq!(f.tensor_bytes("q.q5_0").expect("test fixture").len(), 22);
        let e = f.dequantize("q.q5_0").unwrap_err();
        assert!(
            matches!(e, GgufError::UnsupportedType { type_id: 6, .. }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "sample.gguf: tensor 'q.q5_0' has ggml type Q5_0 (id 6), which this reader cannot decode"
        );
        let e = f.dequantize("missing").unwrap_err();
        assert!(matches!(e, GgufError::TensorNotFound { .. }));
        assert!(matches!(
            f.tensor_bytes("missing"),
            Err(GgufError::TensorNotFound { .. })
        ));
    }

    #[test]
    fn open_maps_a_file_and_reports_io_errors() {
        let dir = tempfile::tempdir().expect("test fixture");
        let path = dir.path().join("m.gguf");
        sample_writer().write(&path).expect("test fixture");
        let f = GgufFile::open(&path).expect("test fixture");
        assert_eq!(f.label(), path.display().to_string());
        assert_eq!(f.tensors().len(), 11);
        assert_eq!(f.dequantize("a.vec").expect("test fixture").len(), 5);

        let missing = dir.path().join("nope.gguf");
        let e = GgufFile::open(&missing).unwrap_err();
        assert!(matches!(e, GgufError::Io { .. }));
        assert!(
            e.to_string().starts_with(&missing.display().to_string()),
            "{e}"
        );

        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").expect("test fixture");
        let e = GgufFile::open(&empty).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    }

    #[test]
    fn writer_rejects_bad_input() {
        let mut w = GgufWriter::new();
        assert!(
            w.add_tensor_f32("x", &[2, 3], &[0.0; 5], GgmlType::F32)
                .is_err()
        );
        assert!(
            w.add_tensor_f32("x", &[2, 31], &[0.0; 62], GgmlType::Q8_0)
                .is_err()
        );
        assert!(w.add_tensor_f32("x", &[], &[], GgmlType::F32).is_err());
        assert!(
            w.add_tensor_f32("x", &[1, 1, 1, 1, 1], &[0.0], GgmlType::F32)
                .is_err()
        );
        assert!(
            w.add_tensor_f32("x", &[32], &[0.0; 32], GgmlType::Q4_K)
                .is_err()
        );
        assert!(
            w.add_tensor_raw("x", &[256], GgmlType::Q4_K, vec![0; 143])
                .is_err()
        );
        assert!(
            w.add_tensor_raw("x", &[4], GgmlType::Other(5), vec![0; 4])
                .is_err()
        );
        w.add_tensor_f32("x", &[1], &[1.0], GgmlType::F32)
            .expect("test fixture");
        assert!(w.add_tensor_f32("x", &[1], &[1.0], GgmlType::F32).is_err());
        w.add_metadata(
            "mixed",
            MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]),
        );
        assert!(matches!(w.to_bytes(), Err(GgufError::Writer { .. })));
        w.add_metadata("mixed", MetaValue::U8(0));
        w.add_metadata(ALIGNMENT_KEY, MetaValue::U32(24));
        assert!(w.to_bytes().is_err());
        w.add_metadata(ALIGNMENT_KEY, MetaValue::U32(64));
        let f =
            GgufFile::from_bytes(w.to_bytes().expect("test fixture"), "a64").expect("test fixture");
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        assert_eq!(f.dequantize("x").expect("test fixture"), vec![1.0]);
    }

    // ---- malformed input ---------------------------------------------------------------

    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b
    }

    fn parse_err(bytes: Vec<u8>) -> GgufError {
        GgufFile::from_bytes(bytes, "bad.gguf").unwrap_err()
    }

    #[test]
    fn rejects_malformed_headers_with_located_errors() {
        let e = parse_err(b"GGML\x03\0\0\0".to_vec());
        assert!(matches!(e, GgufError::BadMagic { .. }));
        assert_eq!(
            e.to_string(),
            "bad.gguf: offset 0: bad magic \"GGML\": not a GGUF file (expected \"GGUF\")"
        );
        let e = parse_err(b"GG".to_vec());
        assert!(matches!(
            e,
            GgufError::Truncated {
                offset: 0,
                needed: 4,
                available: 2,
                ..
            }
        ));
        assert!(matches!(
            parse_err(header(1, 0, 0)),
            GgufError::UnsupportedVersion { version: 1, .. }
        ));
        assert!(matches!(
            parse_err(header(4, 0, 0)),
            GgufError::UnsupportedVersion { version: 4, .. }
        ));
        let e = parse_err(header(3u32.swap_bytes(), 0, 0));
        assert!(e.to_string().contains("big-endian"), "{e}");

        let e = parse_err(header(3, u32::MAX as u64, 0));
        assert_eq!(
            e.to_string(),
            "bad.gguf: offset 8: tensor count 4294967295 exceeds what the remaining 8 bytes can hold"
        );
        let e = parse_err(header(3, 0, u64::MAX));
        assert!(matches!(e, GgufError::Invalid { offset: 16, .. }), "{e}");

        // A metadata string longer than the file.
        let mut b = header(2, 0, 1);
        b.extend_from_slice(&1000u64.to_le_bytes());
        b.extend_from_slice(&[b'a'; 20]);
        let e = parse_err(b);
        assert!(matches!(e, GgufError::Invalid { offset: 24, .. }), "{e}");

        // Unknown value type, bad bool, huge array count, deep nesting.
        let kv = |vt: u32, payload: &[u8]| {
            let mut b = header(3, 0, 1);
            b.extend_from_slice(&1u64.to_le_bytes());
            b.push(b'k');
            b.extend_from_slice(&vt.to_le_bytes());
            b.extend_from_slice(payload);
            b
        };
        let e = parse_err(kv(13, &[0; 8]));
        assert!(e.to_string().contains("value type 13"), "{e}");
        let e = parse_err(kv(VT_BOOL, &[2]));
        assert!(e.to_string().contains("bool value is 2"), "{e}");
        let mut arr = VT_U32.to_le_bytes().to_vec();
        arr.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let e = parse_err(kv(VT_ARRAY, &arr));
        assert!(e.to_string().contains("exceeds what the remaining"), "{e}");
        let mut nested = Vec::new();
        for _ in 0..20 {
            nested.extend_from_slice(&VT_ARRAY.to_le_bytes());
            nested.extend_from_slice(&1u64.to_le_bytes());
        }
        let e = parse_err(kv(VT_ARRAY, &nested));
        assert!(e.to_string().contains("nested more than"), "{e}");
        let e = parse_err(kv(VT_U64, &[1, 2, 3]));
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    needed: 8,
                    available: 3,
                    ..
                }
            ),
            "{e}"
        );

        // Bad alignment values: not a u32, not a power of two, zero.
        for (vt, payload) in [
            (VT_U64, 32u64.to_le_bytes().to_vec()),
            (VT_U32, 24u32.to_le_bytes().to_vec()),
            (VT_U32, 0u32.to_le_bytes().to_vec()),
        ] {
            let mut b = header(3, 0, 1);
            write_string(&mut b, ALIGNMENT_KEY);
            b.extend_from_slice(&vt.to_le_bytes());
            b.extend_from_slice(&payload);
            let e = parse_err(b);
            assert!(matches!(e, GgufError::Invalid { offset: 53, .. }), "{e}");
            assert!(e.to_string().contains("power of two"), "{e}");
        }
        let mut b = header(3, 0, 1);
        write_string(&mut b, ALIGNMENT_KEY);
        b.extend_from_slice(&VT_U32.to_le_bytes());
        b.extend_from_slice(&64u32.to_le_bytes());
        assert_eq!(
            GgufFile::from_bytes(b, "a")
                .expect("test fixture")
                .alignment(),
            64
        );
    }

    /// Builds a file with one tensor descriptor whose fields are given directly.
    fn one_tensor(dims: &[u64], ty: u32, offset: u64, data_len: usize) -> Vec<u8> {
        let mut b = header(3, 1, 0);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b't');
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        pad_to(&mut b, 32);
        b.resize(b.len() + data_len, 0);
        b
    }

    #[test]
    fn rejects_bad_tensor_descriptors() {
        assert!(GgufFile::from_bytes(one_tensor(&[4, 2], 0, 0, 32), "ok").is_ok());
        // Past the end of the file.
        let e = parse_err(one_tensor(&[4, 2], 0, 0, 31));
        assert!(e.to_string().contains("extends past the end"), "{e}");
        let e = parse_err(one_tensor(&[4], 0, u64::MAX - 31, 16));
        assert!(e.to_string().contains("extends past the end"), "{e}");
        // Misaligned offset.
        let e = parse_err(one_tensor(&[4], 0, 4, 64));
        assert!(
            e.to_string().contains("not a multiple of the alignment"),
            "{e}"
        );
        // Too many dimensions, overflowing element count, partial blocks.
        let e = parse_err(one_tensor(&[1; 5], 0, 0, 4));
        assert!(e.to_string().contains("5 dimensions"), "{e}");
        let e = parse_err(one_tensor(&[u64::MAX, 2], 0, 0, 4));
        assert!(e.to_string().contains("more than 2^63"), "{e}");
        let e = parse_err(one_tensor(&[1 << 62], 0, 0, 4));
        assert!(e.to_string().contains("overflow"), "{e}");
        let e = parse_err(one_tensor(&[48], 8, 0, 64));
        assert!(
            e.to_string()
                .contains("not a multiple of the Q8_0 block size 32"),
            "{e}"
        );
        // Unknown type ids parse; only their bytes/dequantisation fail.
        let f = GgufFile::from_bytes(one_tensor(&[4], 1234, 0, 0), "odd").expect("test fixture");
        assert_eq!(f.tensors()[0].ggml_type, GgmlType::Other(1234));
        assert!(matches!(
            f.tensor_bytes("t"),
            Err(GgufError::UnsupportedType { .. })
        ));
        assert!(matches!(
            f.dequantize("t"),
            Err(GgufError::UnsupportedType { .. })
        ));
        // A known-but-undecodable type whose data lies past the end.
        let f = GgufFile::from_bytes(one_tensor(&[32], 6, 0, 10), "q5").expect("test fixture");
        assert!(matches!(
            f.tensor_bytes("t"),
            Err(GgufError::Invalid { .. })
        ));
        // Duplicate names.
        let mut b = header(3, 2, 0);
        for _ in 0..2 {
            b.extend_from_slice(&1u64.to_le_bytes());
            b.push(b't');
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&1u64.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
        }
        pad_to(&mut b, 32);
        b.resize(b.len() + 32, 0);
        let e = parse_err(b);
        assert!(e.to_string().contains("duplicate tensor name 't'"), "{e}");
        // Scalars (no dimensions) have one element.
        let f = GgufFile::from_bytes(one_tensor(&[], 0, 0, 4), "s").expect("test fixture");
        assert_eq!(f.dequantize("t").expect("test fixture"), vec![0.0]);
    }

    // ---- property tests ----------------------------------------------------------------

    /// Exercises every reading entry point; must never panic.
    fn read_everything(bytes: Vec<u8>) {
        if let Ok(f) = GgufFile::from_bytes(bytes, "fuzz.gguf") {
            let _ = f.get_str("general.architecture");
            let _ = f.get_u64("llama.block_count");
            let _ = f.get_f32("llama.rope.freq_base");
            let _ = f.get_str_array("tokenizer.ggml.tokens");
            let _ = f.get_i64_array("test.nested");
            let _ = f.get_f32_array("test.scores");
            let _ = format!("{f:?}");
            for t in f.tensors() {
                let _ = t.shape();
                let _ = t.n_bytes();
                let _ = f.tensor_bytes(&t.name);
                if let Ok(v) = f.dequantize(&t.name) {
                    assert_eq!(v.len() as u64, t.n_elements());
                }
            }
        }
    }

    /// Offsets of the counts and lengths in the sample file's header: the two global
    /// counts, then every u64 whose value is a plausible small length or count.
    fn length_fields(bytes: &[u8]) -> Vec<usize> {
        let end = GgufFile::from_bytes(bytes.to_vec(), "s")
            .expect("test fixture")
            .data_offset() as usize;
        (8..end.saturating_sub(8))
            .filter(|&i| {
                let v = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("test fixture"));
                i == 8 || i == 16 || (1..=4096).contains(&v)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn flipped_bytes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8)) {
            let mut bytes = sample_bytes();
            let len = bytes.len();
            for (at, mask) in flips {
                bytes[at.index(len)] ^= mask;
            }
            read_everything(bytes);
        }

        #[test]
        fn header_flips_never_panic(flips in prop::collection::vec((0usize..600, any::<u8>()), 1..6)) {
            // Concentrate on the header, where the structure lives.
            let mut bytes = sample_bytes();
            let len = bytes.len();
            for (at, v) in flips {
                bytes[at % len] = v;
            }
            read_everything(bytes);
        }

        #[test]
        fn truncation_never_panics(cut in any::<prop::sample::Index>()) {
            let mut bytes = sample_bytes();
            let data_offset = GgufFile::from_bytes(bytes.clone(), "s").expect("test fixture").data_offset();
            let n = cut.index(bytes.len());
            bytes.truncate(n);
            if (n as u64) < data_offset {
                prop_assert!(GgufFile::from_bytes(bytes.clone(), "cut.gguf").is_err());
            }
            read_everything(bytes);
        }

        #[test]
        fn huge_counts_never_panic(
            field in any::<prop::sample::Index>(),
            value in prop_oneof![
                Just(u64::MAX),
                Just(u64::MAX / 2),
                Just(u32::MAX as u64),
                Just(1u64 << 40),
                Just(1u64 << 32),
                (1u64..1 << 20),
                any::<u64>(),
            ],
        ) {
            let mut bytes = sample_bytes();
            let fields = length_fields(&bytes);
            let at = fields[field.index(fields.len())];
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            read_everything(bytes);
        }
    }

    fn meta_value(depth: u32) -> BoxedStrategy<MetaValue> {
        let leaf = prop_oneof![
            any::<u8>().prop_map(MetaValue::U8),
            any::<i8>().prop_map(MetaValue::I8),
            any::<u16>().prop_map(MetaValue::U16),
            any::<i16>().prop_map(MetaValue::I16),
            any::<u32>().prop_map(MetaValue::U32),
            any::<i32>().prop_map(MetaValue::I32),
            any::<u64>().prop_map(MetaValue::U64),
            any::<i64>().prop_map(MetaValue::I64),
            any::<u32>().prop_map(|b| MetaValue::F32(f32::from_bits(b))),
            any::<u64>().prop_map(|b| MetaValue::F64(f64::from_bits(b))),
            any::<bool>().prop_map(MetaValue::Bool),
            ".{0,12}".prop_map(MetaValue::String),
        ];
        if depth == 0 {
            return leaf.boxed();
        }
        prop_oneof![
            3 => leaf.clone(),
            1 => (leaf, 0usize..6).prop_map(|(v, n)| MetaValue::Array(vec![v; n])),
            1 => prop::collection::vec(meta_value(depth - 1), 0..3).prop_map(|items| {
                // Arrays are homogeneous: keep the elements of the first one's type.
                let t = items.first().map(MetaValue::type_id);
                MetaValue::Array(items.into_iter().filter(|v| Some(v.type_id()) == t).collect())
            }),
        ]
        .boxed()
    }

    /// Equality that compares floats by their bits (so NaNs round-trip too).
    fn same(a: &MetaValue, b: &MetaValue) -> bool {
        match (a, b) {
            (MetaValue::F32(x), MetaValue::F32(y)) => x.to_bits() == y.to_bits(),
            (MetaValue::F64(x), MetaValue::F64(y)) => x.to_bits() == y.to_bits(),
            (MetaValue::Array(x), MetaValue::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
            }
            _ => a == b,
        }
    }

    fn tensor_spec() -> impl Strategy<Value = (Vec<usize>, GgmlType, Vec<f32>)> {
        (
            prop::collection::vec(1usize..4, 0..3),
            prop_oneof![
                Just(GgmlType::F32),
                Just(GgmlType::F16),
                Just(GgmlType::Q8_0)
            ],
            1usize..3,
        )
            .prop_flat_map(|(outer, ty, inner_blocks)| {
                let mut shape = outer;
                shape.push(if ty == GgmlType::Q8_0 {
                    32 * inner_blocks
                } else {
                    inner_blocks * 3
                });
                let n: usize = shape.iter().product();
                let values = prop::collection::vec(-100f32..100f32, n);
                (Just(shape), Just(ty), values)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn writer_reader_round_trip(
            meta in prop::collection::btree_map("[a-z.]{1,16}", meta_value(2), 0..8),
            tensors in prop::collection::vec(tensor_spec(), 0..5),
            version2 in any::<bool>(),
        ) {
            let mut w = GgufWriter::new();
            for (k, v) in &meta {
                if k != ALIGNMENT_KEY {
                    w.add_metadata(k.clone(), v.clone());
                }
            }
            for (i, (shape, ty, data)) in tensors.iter().enumerate() {
                w.add_tensor_f32(format!("t{i}"), shape, data, *ty).expect("test fixture");
            }
            let mut bytes = w.to_bytes().expect("test fixture");
            if version2 {
                bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
            }
            let f = GgufFile::from_bytes(bytes, "rt.gguf").expect("test fixture");
            prop_assert_eq!(f.version(), if version2 { 2 } else { 3 });
            let expected_keys = meta.keys().filter(|k| *k != ALIGNMENT_KEY).count();
            prop_assert_eq!(f.metadata().len(), expected_keys);
            for (k, v) in &meta {
                if k != ALIGNMENT_KEY {
                    prop_assert!(same(f.get(k).expect("test fixture"), v), "{k}: {:?} vs {v:?}", f.get(k));
                }
            }
            prop_assert_eq!(f.tensors().len(), tensors.len());
            for (i, (shape, ty, data)) in tensors.iter().enumerate() {
                let name = format!("t{i}");
                let info = f.tensor_info(&name).expect("test fixture");
                prop_assert_eq!(&info.shape(), shape);
                prop_assert_eq!(info.ggml_type, *ty);
                prop_assert_eq!(info.offset % 32, 0);
                let got = f.dequantize(&name).expect("test fixture");
                prop_assert_eq!(got.len(), data.len());
                match ty {
                    GgmlType::F32 => prop_assert_eq!(&got, data),
                    GgmlType::F16 => {
                        for (x, y) in data.iter().zip(&got) {
                            prop_assert_eq!(f16::from_f32(*x).to_f32().to_bits(), y.to_bits());
                        }
                    }
                    _ => {
                        for (block, out) in data.chunks(32).zip(got.chunks(32)) {
                            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                            for (x, y) in block.iter().zip(out) {
                                prop_assert!((x - y).abs() <= amax / 127.0 * 0.6 + 1e-6);
                            }
                        }
                    }
                }
            }
        }
    }

    // ---- the real model ----------------------------------------------------------------

    fn model_path() -> std::path::PathBuf {
        let home = std::env::var_os("CAIRN_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| std::path::PathBuf::from(h).join(".cache").join("cairn"))
            })
            .unwrap_or_default();
        home.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    /// (sum of bits, sum of bits * (index % 257 + 1)), both wrapping, over f32 values:
    /// the same checksum the Python reference computes.
    fn checksum(v: &[f32]) -> (u64, u64) {
        v.iter().enumerate().fold((0u64, 0u64), |(a, b), (i, x)| {
            let bits = u64::from(x.to_bits());
            (
                a.wrapping_add(bits),
                b.wrapping_add(bits.wrapping_mul(i as u64 % 257 + 1)),
            )
        })
    }

    #[test]
    fn smollm2_q4_1_model() {
        let path = model_path();
        if !path.exists() {
            eprintln!(
                "note: {} not found; skipping the real-model GGUF test",
                path.display()
            );
            return;
        }
        let f = GgufFile::open(&path).expect("test fixture");
        assert_eq!(f.version(), 3);
        assert_eq!(
            f.get_str("general.architecture").expect("test fixture"),
            "llama"
        );
        assert_eq!(f.get_u64("llama.block_count").expect("test fixture"), 30);
        assert_eq!(
            f.get_u64("llama.embedding_length").expect("test fixture"),
            576
        );
        assert_eq!(
            f.get_f32("llama.rope.freq_base").expect("test fixture"),
            100000.0
        );
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens")
                .expect("test fixture")
                .len(),
            49152
        );
        assert_eq!(
            f.get_str_array("tokenizer.ggml.merges")
                .expect("test fixture")
                .len(),
            48900
        );
        assert_eq!(
            f.get_i64_array("tokenizer.ggml.token_type")
                .expect("test fixture")
                .len(),
            49152
        );
        assert_eq!(f.tensors().len(), 272);

        let emb = f.tensor_info("token_embd.weight").expect("test fixture");
        assert_eq!(emb.ggml_type, GgmlType::Q8_0);
        assert_eq!(emb.shape(), vec![49152, 576]);
        let q = f.tensor_info("blk.0.attn_q.weight").expect("test fixture");
        assert_eq!(q.ggml_type, GgmlType::Q4_1);
        assert_eq!(q.shape(), vec![576, 576]);

        // Expected values and checksums from the `gguf` Python package's dequantisation.
        // (tensor, [(flat index, expected f32 bits)], expected checksum)
        type Case = (&'static str, &'static [(usize, u32)], (u64, u64));
        let cases: [Case; 2] = [
            (
                "token_embd.weight",
                &[
                    (0, 0xbdda3400),
                    (1, 0x3d071400),
                    (31, 0xbe4d3700),
                    (32, 0xbdbf7600),
                    (575, 0x3cf3c000),
                    (576_017, 0x3e5b0400),
                    (28_311_551, 0xbd2ad000),
                ],
                (0xd02dd66b0596c0, 0x68e85510da9a3140),
            ),
            (
                "blk.0.attn_q.weight",
                &[
                    (0, 0xbdc54000),
                    (15, 0x3f09b000),
                    (16, 0xbe648000),
                    (31, 0xbdc54000),
                    (100_000, 0xbdfa6000),
                    (331_775, 0xbe830000),
                ],
                (0x27be4c063c200, 0x14051b085bc7a00),
            ),
        ];
        for (name, points, sums) in cases {
            let v = f.dequantize(name).expect("test fixture");
            assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite value");
            for &(i, bits) in points {
                assert_eq!(v[i].to_bits(), bits, "{name}[{i}] = {}", v[i]);
            }
            assert_eq!(checksum(&v), sums, "{name}: checksum");
        }
        assert_eq!(
            f.dequantize("blk.0.attn_norm.weight")
                .expect("test fixture")[0]
                .to_bits(),
            0x3c650000
        );

        // Every tensor, timed (the whole model, about 135M values).
        let start = std::time::Instant::now();
        let mut total = 0u64;
        let mut n = 0usize;
        for t in f.tensors() {
            let v = f.dequantize(&t.name).expect("test fixture");
            n += v.len();
            total = total.wrapping_add(checksum(&v).1);
        }
        eprintln!(
            "dequantised {} tensors ({n} values) in {:.3?}",
            f.tensors().len(),
            start.elapsed()
        );
        assert_eq!(total, 0xf9f585eaec353940);
    }
}
