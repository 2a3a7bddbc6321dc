#!/usr/bin/env python3
"""Regenerate tests/fixtures/gguf/quant_vectors.bin, the reference vectors for
src/model/gguf.rs.

The vectors are random-but-valid GGML blocks (finite f16 scales, random payload
bytes) for every tensor type the Rust reader dequantises, together with the f32
values that the `gguf` Python package (whose quants module follows ggml-quants.c)
produces for them. One extra record holds f32 inputs and the Q8_0 bytes the package
quantises them to, which checks the Rust writer's quantiser.

Usage (with the `gguf` and `numpy` packages installed, e.g. in a venv outside the repo):
    python3 -m venv ~/.cache/cairn/venv-gguf
    ~/.cache/cairn/venv-gguf/bin/pip install gguf numpy
    ~/.cache/cairn/venv-gguf/bin/python scripts/reference/gguf_quant_vectors.py

File format (all little-endian):
    b"GQV1", u32 record_count, then records:
    kind 0 (dequantise): u32 0, u32 ggml_type_id, u32 n_elements, u32 n_bytes,
                         n_bytes raw block bytes, n_elements f32 expected values
    kind 1 (quantise Q8_0): u32 1, u32 n_elements, n_elements f32 inputs,
                            u32 n_bytes, n_bytes expected Q8_0 blocks
"""

import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

SEED = 0x6767_7566
OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gguf" / "quant_vectors.bin"

# Blocks per quantised type: small-block types get more blocks than 256-element ones.
BLOCKS = {
    T.Q4_0: 16,
    T.Q4_1: 16,
    T.Q8_0: 16,
    T.Q4_K: 4,
    T.Q5_K: 4,
    T.Q6_K: 4,
}

# Byte offsets of the f16 scale fields inside one block of each type.
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """n finite f16 bit patterns: half drawn from all finite patterns (subnormals,
    zeros and the largest values included), half typical small weights scales."""
    out = np.empty(n, dtype=np.uint16)
    for i in range(n):
        if rng.random() < 0.5:
            while True:
                bits = int(rng.integers(0, 1 << 16))
                if bits & 0x7C00 != 0x7C00:
                    break
        else:
            bits = int(np.float16(rng.normal(0.0, 0.05)).view(np.uint16))
        out[i] = bits
    return out


def quant_record(rng: np.random.Generator, qtype: T) -> bytes:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    # Force a few edge-case scales: zero, negative zero, the largest finite value.
    specials = [0x0000, 0x8000, 0x7BFF, 0xFBFF, 0x0001]
    for b, bits in enumerate(specials[: n_blocks - 1]):
        off = F16_FIELDS[qtype][0]
        raw[b + 1, off : off + 2] = np.array([bits], dtype=np.uint16).view(np.uint8)
    data = raw.reshape(-1)
    expected = quants.dequantize(data, qtype).astype(np.float32, copy=False).reshape(-1)
    assert expected.size == n_blocks * block_size
    return dequant_record(qtype, data, expected)


def dequant_record(qtype: T, data: np.ndarray, expected: np.ndarray) -> bytes:
    return (
        struct.pack("<IIII", 0, int(qtype), expected.size, data.size)
        + data.astype(np.uint8).tobytes()
        + expected.astype("<f4").tobytes()
    )


def float_records(rng: np.random.Generator) -> list[bytes]:
    records = []
    # F32: raw bit patterns, including infinities and a NaN (copied bit for bit).
    f32 = rng.integers(0, 1 << 32, size=64, dtype=np.uint64).astype(np.uint32)
    f32[:4] = [0x7F800000, 0xFF800000, 0x7FC00001, 0x80000000]
    data = f32.view(np.uint8)
    records.append(dequant_record(T.F32, data, quants.dequantize(data.copy(), T.F32)))
    # F16: every kind of finite value plus the infinities (NaN payload handling differs
    # between numpy and ggml, so NaN is left out here and tested separately in Rust).
    f16 = finite_f16_bits(rng, 256)
    f16[:4] = [0x7C00, 0xFC00, 0x0001, 0x83FF]
    data = f16.view(np.uint8)
    records.append(dequant_record(T.F16, data, quants.dequantize(data.copy(), T.F16)))
    # BF16: raw bit patterns, NaNs included (plain widening, bit for bit).
    bf16 = rng.integers(0, 1 << 16, size=256, dtype=np.uint32).astype(np.uint16)
    bf16[:3] = [0x7F80, 0xFFC1, 0x7F81]
    data = bf16.view(np.uint8)
    records.append(dequant_record(T.BF16, data, quants.dequantize(data.copy(), T.BF16)))
    return records


def q8_0_quantise_record(rng: np.random.Generator) -> bytes:
    n_blocks = 8
    x = rng.normal(0.0, 1.0, size=(n_blocks, 32)).astype(np.float32)
    x[1] *= 1e-3
    x[2] = 0.0  # all-zero block: scale 0
    x[3, 5] = 1000.0  # one outlier
    x[4] = np.round(x[4] * 4) / 4  # many exact halves after scaling
    x[5] *= 60000.0
    x[6] = np.float32(1e-40)  # subnormal block: the reciprocal scale overflows
    x = x.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        q = quants.quantize(x.reshape(1, -1), T.Q8_0).reshape(-1)
    return (
        struct.pack("<II", 1, x.size)
        + x.astype("<f4").tobytes()
        + struct.pack("<I", q.size)
        + q.astype(np.uint8).tobytes()
    )


def main() -> int:
    rng = np.random.default_rng(SEED)
    records = float_records(rng)
    for qtype in BLOCKS:
        records.append(quant_record(rng, qtype))
    records.append(q8_0_quantise_record(rng))
    blob = b"GQV1" + struct.pack("<I", len(records)) + b"".join(records)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(blob)
    print(f"wrote {OUT} ({len(blob)} bytes, {len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
