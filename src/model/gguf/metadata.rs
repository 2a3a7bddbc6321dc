//! Typed metadata values of a GGUF file (numbers, strings, nested arrays) and their
//! accessors.

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

pub(super) const VT_U8: u32 = 0;
pub(super) const VT_I8: u32 = 1;
pub(super) const VT_U16: u32 = 2;
pub(super) const VT_I16: u32 = 3;
pub(super) const VT_U32: u32 = 4;
pub(super) const VT_I32: u32 = 5;
pub(super) const VT_F32: u32 = 6;
pub(super) const VT_BOOL: u32 = 7;
pub(super) const VT_STRING: u32 = 8;
pub(super) const VT_ARRAY: u32 = 9;
pub(super) const VT_U64: u32 = 10;
pub(super) const VT_I64: u32 = 11;
pub(super) const VT_F64: u32 = 12;

/// Name of a GGUF value type id, for messages.
pub(super) fn value_type_name(vt: u32) -> &'static str {
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
pub(super) fn min_encoded_size(vt: u32) -> Option<u64> {
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
