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

mod metadata;
mod parse;
mod quant;
#[cfg(test)]
mod tests;
mod types;
mod writer;

pub use metadata::*;
use parse::*;
pub use quant::*;
pub use types::*;
pub use writer::*;

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
