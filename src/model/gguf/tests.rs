//! Tests of GGUF parsing, dequantisation and writing.

use super::*;
use proptest::prelude::*;

// ---- reference vectors -------------------------------------------------------------

/// Reference vectors produced by `scripts/reference/gguf_quant_vectors.py` with the
/// `gguf` Python package (see that script for the format).
const QUANT_VECTORS: &[u8] = include_bytes!("../../../tests/fixtures/gguf/quant_vectors.bin");

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
    let got = dequantize_bytes(GgmlType::F16, &0x7C01u16.to_le_bytes(), 1).expect("test fixture");
    assert_eq!(got[0].to_bits(), 0x7FC0_2000);
    let got = dequantize_bytes(GgmlType::F16, &0xFE00u16.to_le_bytes(), 1).expect("test fixture");
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
    let f = GgufFile::from_bytes(w.to_bytes().expect("test fixture"), "a64").expect("test fixture");
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
