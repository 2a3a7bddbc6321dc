//! Dequantising block-quantised tensors (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) and the 16-bit
//! floats to `f32`, reproducing ggml's reference arithmetic exactly; and quantising to Q8_0
//! for the writer.

use super::*;

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
pub(super) fn check_sizes(
    ggml_type: GgmlType,
    n_bytes: usize,
    n_elements: usize,
) -> Result<(), String> {
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
pub(super) fn decode(ggml_type: GgmlType, bytes: &[u8], out: &mut [f32]) {
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
pub(super) fn blocks<const B: usize, const N: usize>(
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
pub(super) fn f16_at<const B: usize>(b: &[u8; B], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

// Layout: f16 scale d, then 16 bytes holding 32 four-bit values; byte j holds element j
// in its low nibble and element j + 16 in its high nibble. Value = (q - 8) * d.
pub(super) fn dequant_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = (i32::from(q & 0x0F) - 8) as f32 * d;
        y[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

// Layout: f16 scale d, f16 minimum m, then 16 bytes of nibbles as in Q4_0.
// Value = q * d + m.
pub(super) fn dequant_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = f32::from(q & 0x0F) * d + m;
        y[j + 16] = f32::from(q >> 4) * d + m;
    }
}

// Layout: f16 scale d, then 32 signed bytes. Value = q * d.
pub(super) fn dequant_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
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
pub(crate) fn scale_min_k4(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 0x3F, s[j + 4] & 0x3F)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

pub(super) fn k_scales<const B: usize>(b: &[u8; B]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[4..16]);
    s
}

// Layout: f16 d, f16 dmin, 12 bytes of packed six-bit scales/minimums, 128 bytes of
// nibbles. Each 64-element group g uses 32 bytes: low nibbles are sub-block 2g, high
// nibbles sub-block 2g + 1. Value = (d * scale) * q - (dmin * min).
pub(super) fn dequant_q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
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
pub(super) fn dequant_q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
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
pub(super) fn dequant_q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
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
pub(super) fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
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
