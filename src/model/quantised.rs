//! Weight matrices kept as their GGUF file's quantised blocks instead of f32 or bf16 panels:
//! an inference-only model then holds its projections in about the file's size. The blocks
//! are re-laid, once at load, into the column panels the fused kernels read
//! ([`pack_quantised`]); each product dequantises one 32-column panel at a time into the
//! packed f32 or bf16 layout and runs the same register tiles (`fused/gemm.inc`). The
//! dequantisation is the reference one, operation for operation, so a product over a
//! quantised matrix equals the packed product over the dequantised matrix bit for bit.
//!
//! Layout of one panel (32 consecutive rows of the matrix, the last panel padded with zero
//! bytes), super-block by super-block along a row (S values: 32 for Q4_0, Q4_1 and Q8_0, 256
//! for the K types). Within a super-block the 32 columns' scales come first, then the values
//! one input index at a time, so that dequantising writes whole panel rows:
//!
//! | type | per super-block of a panel |
//! |---|---|
//! | Q4_0 | `d[32]` f16, then per value 16 bytes of nibbles (byte c: column c low, c + 16 high) |
//! | Q4_1 | `d[32]`, `m[32]` f16, nibbles as Q4_0 |
//! | Q8_0 | `d[32]` f16, then per value 32 signed bytes |
//! | Q4_K | `d[32]`, `dmin[32]` f16, scales `[8][32]`, minimums `[8][32]` (six-bit), nibbles |
//! | Q5_K | as Q4_K, one byte (0..32) per value |
//! | Q6_K | `d[32]` f16, signed scales `[16][32]`, one signed byte (q − 32) per value |

use super::gguf::GgmlType;

/// Output rows per panel (the kernels' `kPanelCols`).
const PANEL_ROWS: usize = 32;

/// A matrix `[rows, cols]` as quantised panels, for `fused::linear_quant`.
#[derive(Debug)]
pub struct QuantMatrix {
    pub(super) data: Vec<u8>,
    pub(super) offsets: Vec<i64>,
    pub(super) types: Vec<i32>,
    rows: usize,
    cols: usize,
}

impl QuantMatrix {
    /// Output rows (`n`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Inputs per row (`k`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() + self.offsets.len() * 8 + self.types.len() * 4
    }
}

/// Consecutive rows of a matrix taken from one GGUF tensor: its type, its raw bytes (row
/// after row), and, where the tensor's row order differs from the matrix's (llama.cpp's
/// interleaved Q/K heads), the tensor row of each of its matrix rows.
pub struct QuantRows<'a> {
    /// The tensor's ggml type.
    pub ggml_type: GgmlType,
    /// The tensor's data.
    pub bytes: &'a [u8],
    /// Rows it contributes.
    pub rows: usize,
    /// `row_of[i]`: the tensor row holding matrix row `i` of this part (identity if `None`).
    pub row_of: Option<Vec<usize>>,
}

/// How a ggml type is laid out in a panel: (values per super-block, bytes per super-block,
/// header bytes before the values, bytes per value row).
fn layout(t: GgmlType) -> Option<(usize, usize, usize, usize)> {
    Some(match t {
        GgmlType::Q4_0 => (32, 64 + 32 * 16, 64, 16),
        GgmlType::Q4_1 => (32, 128 + 32 * 16, 128, 16),
        GgmlType::Q8_0 => (32, 64 + 32 * 32, 64, 32),
        GgmlType::Q4_K => (256, 640 + 256 * 16, 640, 16),
        GgmlType::Q5_K => (256, 640 + 256 * 32, 640, 32),
        GgmlType::Q6_K => (256, 576 + 256 * 32, 576, 32),
        _ => return None,
    })
}

/// Whether the quantised products read matrices of this type.
pub fn readable(t: GgmlType) -> bool {
    layout(t.canonical()).is_some()
}

/// Re-lays the rows of `parts` (in order; `cols` values each) as quantised panels. `None`
/// when the matrix cannot be kept this way: a type the products do not read, `cols` not a
/// whole number of super-blocks, or a panel whose 32 rows would mix types. An error when the
/// parts' sizes do not match their types.
pub fn pack_quantised(parts: &[QuantRows<'_>], cols: usize) -> Result<Option<QuantMatrix>, String> {
    // Matrix row → (part, tensor row).
    let mut rows = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let t = part.ggml_type.canonical();
        let Some((values, ..)) = layout(t) else {
            return Ok(None);
        };
        if cols == 0 || !cols.is_multiple_of(values) {
            return Ok(None);
        }
        let block = t.type_size().unwrap_or(0);
        let expected = part.rows * (cols / values) * block;
        if part.bytes.len() != expected {
            return Err(format!(
                "a {t} tensor of {} rows of {cols} needs {expected} bytes, has {}",
                part.rows,
                part.bytes.len()
            ));
        }
        if let Some(order) = &part.row_of
            && (order.len() != part.rows || order.iter().any(|&r| r >= part.rows))
        {
            return Err(format!(
                "a row order of {} entries for {} rows",
                order.len(),
                part.rows
            ));
        }
        for r in 0..part.rows {
            rows.push((i, part.row_of.as_ref().map_or(r, |o| o[r])));
        }
    }
    let n = rows.len();
    let panels = n.div_ceil(PANEL_ROWS);
    let mut types = Vec::with_capacity(panels);
    let mut offsets = Vec::with_capacity(panels);
    let mut size = 0usize;
    for p in 0..panels {
        let first = parts[rows[p * PANEL_ROWS].0].ggml_type.canonical();
        let end = n.min((p + 1) * PANEL_ROWS);
        if rows[p * PANEL_ROWS..end]
            .iter()
            .any(|&(i, _)| parts[i].ggml_type.canonical() != first)
        {
            return Ok(None);
        }
        let Some((values, sb_bytes, ..)) = layout(first) else {
            return Ok(None);
        };
        types.push(first.id() as i32);
        offsets.push(size as i64);
        size += cols / values * sb_bytes;
    }
    let mut data = vec![0u8; size];
    for (p, &offset) in offsets.iter().enumerate() {
        let t = parts[rows[p * PANEL_ROWS].0].ggml_type.canonical();
        let (values, sb_bytes, header, row_bytes) = layout(t).unwrap_or((1, 0, 0, 0));
        let block = t.type_size().unwrap_or(0);
        let blocks_per_row = cols / values;
        for c in 0..PANEL_ROWS.min(n - p * PANEL_ROWS) {
            let (i, r) = rows[p * PANEL_ROWS + c];
            let row = &parts[i].bytes[r * blocks_per_row * block..(r + 1) * blocks_per_row * block];
            for s in 0..blocks_per_row {
                let at = offset as usize + s * sb_bytes;
                let sb = &mut data[at..at + sb_bytes];
                place(
                    t,
                    &row[s * block..(s + 1) * block],
                    sb,
                    c,
                    header,
                    row_bytes,
                );
            }
        }
    }
    Ok(Some(QuantMatrix {
        data,
        offsets,
        types,
        rows: n,
        cols,
    }))
}

/// Writes one GGUF block (column `c` of a panel) into its super-block `sb` of the panel.
fn place(t: GgmlType, b: &[u8], sb: &mut [u8], c: usize, header: usize, row_bytes: usize) {
    let mut put_half = |at: usize, from: usize| {
        sb[at + 2 * c] = b[from];
        sb[at + 2 * c + 1] = b[from + 1];
    };
    let mut values = [0u8; 256];
    let count = match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let qs = if t == GgmlType::Q4_0 { 2 } else { 4 };
            put_half(0, 0);
            if t == GgmlType::Q4_1 {
                put_half(64, 2);
            }
            for j in 0..16 {
                values[j] = b[qs + j] & 0x0f;
                values[j + 16] = b[qs + j] >> 4;
            }
            32
        }
        GgmlType::Q8_0 => {
            put_half(0, 0);
            values[..32].copy_from_slice(&b[2..34]);
            32
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            put_half(0, 0);
            put_half(64, 2);
            let mut scales = [0u8; 12];
            scales.copy_from_slice(&b[4..16]);
            for j in 0..8 {
                let (sc, m) = super::gguf::scale_min_k4(j, &scales);
                sb[128 + 32 * j + c] = sc;
                sb[384 + 32 * j + c] = m;
            }
            let qs = if t == GgmlType::Q4_K { 16 } else { 48 };
            for g in 0..4 {
                for l in 0..32 {
                    let q = b[qs + 32 * g + l];
                    let (mut lo, mut hi) = (q & 0x0f, q >> 4);
                    if t == GgmlType::Q5_K {
                        let h = b[16 + l];
                        lo += if h & (1 << (2 * g)) != 0 { 16 } else { 0 };
                        hi += if h & (2 << (2 * g)) != 0 { 16 } else { 0 };
                    }
                    values[64 * g + l] = lo;
                    values[64 * g + 32 + l] = hi;
                }
            }
            256
        }
        GgmlType::Q6_K => {
            put_half(0, 208);
            for g in 0..16 {
                sb[64 + 32 * g + c] = b[192 + g];
            }
            for half in 0..2 {
                let (ql, qh, out) = (64 * half, 128 + 32 * half, 128 * half);
                for l in 0..32 {
                    let (lo_a, lo_b, h) = (b[ql + l], b[ql + l + 32], b[qh + l]);
                    // Stored as the signed byte q - 32 (two's complement).
                    let six = |v: u8| v.wrapping_sub(32);
                    values[out + l] = six((lo_a & 0x0F) | ((h & 3) << 4));
                    values[out + l + 32] = six((lo_b & 0x0F) | (((h >> 2) & 3) << 4));
                    values[out + l + 64] = six((lo_a >> 4) | (((h >> 4) & 3) << 4));
                    values[out + l + 96] = six((lo_b >> 4) | (((h >> 6) & 3) << 4));
                }
            }
            256
        }
        _ => 0,
    };
    for (e, &v) in values[..count].iter().enumerate() {
        let row = header + e * row_bytes;
        if row_bytes == 16 {
            let byte = &mut sb[row + c % 16];
            *byte |= if c < 16 { v } else { v << 4 };
        } else {
            sb[row + c] = v;
        }
    }
}
