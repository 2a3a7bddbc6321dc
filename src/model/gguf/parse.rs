//! Parsing a GGUF header: a bounds-checked byte cursor, the metadata value reader, and the
//! tensor table with its aligned data range. Every length is checked against the bytes that
//! remain before it is used.

use super::*;

/// A bounds-checked little-endian cursor over the file's bytes.
pub(super) struct Cursor<'a> {
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

/// Reads metadata values, counting them against [`MAX_METADATA_VALUES`].
pub(super) struct ValueReader<'c, 'a> {
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
pub(super) struct Header {
    pub(super) version: u32,
    pub(super) metadata: BTreeMap<String, MetaValue>,
    pub(super) tensors: Vec<TensorInfo>,
    /// Position of each tensor in `tensors`, by name.
    pub(super) index: HashMap<String, usize>,
    pub(super) alignment: u64,
    pub(super) data_offset: u64,
    /// Absolute byte range of each supported tensor's data (None for other types).
    pub(super) ranges: Vec<Option<(usize, usize)>>,
}

pub(super) fn parse_header(buf: &[u8], file: &str) -> Result<Header, GgufError> {
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
pub(super) fn data_range(
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
