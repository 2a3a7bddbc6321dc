//! Fused CPU kernels for inference: rotary embedding with the KV-cache append, decode-step
//! attention, SiLU-gated products, the per-row summary of next-token logits, and dense
//! products over weights packed once into column panels ([`pack_linear`], [`linear_packed`]).
//!
//! Written in C++ (`fused/kernels.cpp`, and `fused/attention.inc` and `fused/gemm.inc`
//! compiled once per x86-64 level and picked at load time; `build.rs` builds them against
//! the libtorch headers) so they run inside libtorch's own OpenMP pool: a decode step at
//! batch 64 otherwise spends as long in ~25 small tensor ops per layer as in its attention,
//! and a thread pool of our own would fight libtorch's spinning workers for the two cores.
//! The decoder uses the products for CPU inference without autograd, and the other kernels
//! there too when it has a KV cache (see `Llama::forward`); the plain tensor ops remain the
//! reference they are tested against.

use std::ffi::{CStr, c_char};
use std::ptr;

use super::quantised::QuantMatrix;
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use super::ModelError;

unsafe extern "C" {
    fn cairn_free_error(msg: *mut c_char);
    fn cairn_grad_enabled() -> i32;
    fn cairn_rope_append(
        qkv: *const C_tensor,
        positions: *const C_tensor,
        cos: *const C_tensor,
        sin: *const C_tensor,
        k_cache: *mut C_tensor,
        v_cache: *mut C_tensor,
        past: i64,
        nh: i64,
        nkv: i64,
        isa: i32,
        q_out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn cairn_cache_attention(
        q: *const C_tensor,
        k_cache: *const C_tensor,
        v_cache: *const C_tensor,
        valid: *const C_tensor,
        past: i64,
        scale: f64,
        out_bf16: i32,
        isa: i32,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn cairn_rms_norm(
        x: *const C_tensor,
        w: *const C_tensor,
        eps: f64,
        out_bf16: i32,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn cairn_logits_summary(
        logits: *const C_tensor,
        log_z: *mut *mut C_tensor,
        max: *mut *mut C_tensor,
        argmax: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn cairn_silu_mul(gate_up: *const C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn cairn_linear_packed(
        x: *const C_tensor,
        packed: *const C_tensor,
        n: i64,
        bias: *const C_tensor,
        into: *mut C_tensor,
        out_bf16: i32,
        isa: i32,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn cairn_linear_quant(
        x: *const C_tensor,
        data: *const u8,
        bytes: i64,
        offsets: *const i64,
        types: *const i32,
        n: i64,
        bias: *const C_tensor,
        into: *mut C_tensor,
        out_bf16: i32,
        isa: i32,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Turns a kernel's error string (null on success) into a result, freeing the string.
fn check(err: *mut c_char) -> Result<(), ModelError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error is a NUL-terminated string malloc'd by the kernel, owned here.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { cairn_free_error(err) };
    Err(ModelError::Torch(tch::TchError::Torch(format!(
        "fused kernel: {message}"
    ))))
}

/// Takes ownership of a tensor the kernel allocated.
fn owned(t: *mut C_tensor) -> Result<Tensor, ModelError> {
    if t.is_null() {
        return Err(ModelError::Torch(tch::TchError::Torch(
            "fused kernel returned no tensor".into(),
        )));
    }
    // SAFETY: the kernel hands over a heap `at::Tensor*` that nothing else owns.
    Ok(unsafe { Tensor::from_ptr(t) })
}

/// Whether autograd is recording on this thread (the kernels have no backward).
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { cairn_grad_enabled() != 0 }
}

/// The instruction-set level the cache, attention and product kernels run at. They are
/// compiled for each level; [`Isa::Best`] is what the CPU supports. Tests pin the others on
/// their own thread (`at_level`) to check every compiled variant on one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Best = -1,
    #[cfg_attr(not(test), allow(dead_code))]
    Baseline = 0,
    #[cfg_attr(not(test), allow(dead_code))]
    V3 = 1,
    #[cfg_attr(not(test), allow(dead_code))]
    V4 = 2,
    /// x86-64-v4 with AVX512-BF16 (bf16 products on its dot-product instruction).
    #[cfg_attr(not(test), allow(dead_code))]
    V4Bf16 = 3,
}

#[cfg(test)]
thread_local! {
    static PINNED_LEVEL: std::cell::Cell<Isa> = const { std::cell::Cell::new(Isa::Best) };
}

/// The level passed to the kernels: the best one, unless a test pinned another.
fn level() -> i32 {
    #[cfg(test)]
    return PINNED_LEVEL.with(|l| l.get()) as i32;
    #[cfg(not(test))]
    return Isa::Best as i32;
}

/// Rotary embedding of the query and key heads of a fused projection `qkv`
/// `[b, t, (nh + 2·nkv)·hd]` (f32 or bf16, contiguous) at `positions` `[b, t]`, with the rotated keys
/// and the values written into the caches `[b, nkv, capacity, hd]` (both f32 or both f16) at
/// columns `past..past + t`. `cos`/`signed_sin` are the rotate-half tables `[max_pos, hd]`
/// with the sine's first half negated. Returns the rotated queries `[b, nh, t, hd]` (f32).
/// An f16 cache rounds to nearest even; a key or value past the f16 range (65504) is an
/// error, not a cached infinity.
#[allow(clippy::too_many_arguments)]
pub fn rope_append(
    qkv: &Tensor,
    positions: &Tensor,
    cos: &Tensor,
    signed_sin: &Tensor,
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    past: i64,
    heads: (i64, i64),
) -> Result<Tensor, ModelError> {
    let mut q = ptr::null_mut();
    // SAFETY: every pointer is a live tensor for the duration of the call; the kernel checks
    // shapes, kinds and bounds before touching data.
    check(unsafe {
        cairn_rope_append(
            qkv.as_ptr(),
            positions.as_ptr(),
            cos.as_ptr(),
            signed_sin.as_ptr(),
            k_cache.as_mut_ptr(),
            v_cache.as_mut_ptr(),
            past,
            heads.0,
            heads.1,
            level(),
            &mut q,
        )
    })?;
    owned(q)
}

/// Whether a kernel should write `kind` as bf16 (anything else is f32).
fn bf16(kind: Kind) -> i32 {
    i32::from(kind == Kind::BFloat16)
}

/// Attention of `t` new queries per sequence, `q` `[b, nh, t, hd]` (f32, contiguous), whose
/// keys and values are already in the caches (f32 or f16; arithmetic in f32) at columns
/// `past..past + t`: each query attends over the columns up to its own that `valid`
/// `[b, capacity]` does not mark as padding (its own column always counts). Prefills and
/// decode steps (`t = 1`) run the same per-query kernel, summing over unmasked columns in
/// column order, so a token's attention does not depend on the padding or shared prefix
/// around it, and a row's results not on its batch-mates. Returns `[b, t, nh·hd]` as `out`
/// (`Float` or `BFloat16`, the input format of the output projection).
pub fn cache_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    valid: &Tensor,
    past: i64,
    scale: f64,
    out: Kind,
) -> Result<Tensor, ModelError> {
    let kind = out;
    let mut out = ptr::null_mut();
    // SAFETY: as in `rope_append`; nothing is written but the new output.
    check(unsafe {
        cairn_cache_attention(
            q.as_ptr(),
            k_cache.as_ptr(),
            v_cache.as_ptr(),
            valid.as_ptr(),
            past,
            scale,
            bf16(kind),
            level(),
            &mut out,
        )
    })?;
    owned(out)
}

/// [`cache_attention`] for a decode step: one query per sequence (`q` `[b, nh, 1, hd]`) over
/// the first `total` cached positions, the last being its own. Returns `[b, 1, nh·hd]`.
pub fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    valid: &Tensor,
    total: i64,
    scale: f64,
    out: Kind,
) -> Result<Tensor, ModelError> {
    if q.dim() != 4 || q.size()[2] != 1 || total < 1 {
        return Err(ModelError::InvalidRequest(format!(
            "decode attention takes one query per sequence ([b, heads, 1, hd]) over at least \
             one cached position, not {:?} over {total}",
            q.size()
        )));
    }
    cache_attention(q, k_cache, v_cache, valid, total - 1, scale, out)
}

/// RMSNorm of `x` `[.., h]` (f32, contiguous) with weight `w` `[h]` and `eps`, written as
/// `out` (`Float`, or `BFloat16` to feed a bf16 projection without a conversion pass).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, out: Kind) -> Result<Tensor, ModelError> {
    let kind = out;
    let mut out = ptr::null_mut();
    // SAFETY: as in `cache_attention`.
    check(unsafe { cairn_rms_norm(x.as_ptr(), w.as_ptr(), eps, bf16(kind), &mut out) })?;
    owned(out)
}

/// Per row of `logits` `[rows, vocab]` (f32 or bf16, contiguous): the log-normaliser `log Σ exp`, the
/// maximum and the index of its first occurrence, in one pass over each row.
pub fn logits_summary(logits: &Tensor) -> Result<(Tensor, Tensor, Tensor), ModelError> {
    let (mut z, mut m, mut a) = (ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
    // SAFETY: as in `cache_attention`.
    check(unsafe { cairn_logits_summary(logits.as_ptr(), &mut z, &mut m, &mut a) })?;
    Ok((owned(z)?, owned(m)?, owned(a)?))
}

/// `silu(gate) · up` of a fused projection `[.., 2·f]` whose first `f` columns are the gate,
/// in the projection's format (f32 or bf16).
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor, ModelError> {
    let mut out = ptr::null_mut();
    // SAFETY: as in `cache_attention`.
    check(unsafe { cairn_silu_mul(gate_up.as_ptr(), &mut out) })?;
    owned(out)
}

/// Output columns per panel of a packed weight (`kPanelCols` in `fused/gemm.h`).
pub const PANEL_COLS: i64 = 32;

/// A weight `w` `[n, k]` (f32 or bf16, CPU) repacked for [`linear_packed`], in its format:
///
/// - f32: `[⌈n/32⌉, k, 32]`, each panel the transposed block of 32 consecutive rows;
/// - bf16: `[⌈n/32⌉, ⌈k/2⌉, 64]`, the two weights of a column for inputs `2j` and `2j+1`
///   side by side (the operand layout of AVX512-BF16's pairwise dot product).
///
/// Padding (rows up to a multiple of 32, an odd `k`'s last column) is zero. A panel is one
/// contiguous stream, read once per product whatever the batch size. A tensor of another
/// rank or format is an error.
pub fn pack_linear(w: &Tensor) -> Result<Tensor, ModelError> {
    let &[n, k] = w.size().as_slice() else {
        return Err(ModelError::InvalidRequest(format!(
            "only a matrix can be packed, not a tensor of shape {:?}",
            w.size()
        )));
    };
    if !matches!(w.kind(), Kind::Float | Kind::BFloat16) {
        return Err(ModelError::InvalidRequest(format!(
            "only f32 and bf16 matrices can be packed, not {:?}",
            w.kind()
        )));
    }
    let _guard = tch::no_grad_guard();
    let panels = (n + PANEL_COLS - 1) / PANEL_COLS;
    let pairs = w.kind() == Kind::BFloat16;
    let depth = if pairs { k + k % 2 } else { k };
    let padded = if panels * PANEL_COLS == n && depth == k {
        w.shallow_clone()
    } else {
        let grown = Tensor::zeros([panels * PANEL_COLS, depth], (w.kind(), w.device()));
        grown.narrow(0, 0, n).narrow(1, 0, k).copy_(w);
        grown
    };
    Ok(if pairs {
        padded
            .reshape([panels, PANEL_COLS, depth / 2, 2])
            .permute([0, 2, 1, 3])
            .contiguous()
            .reshape([panels, depth / 2, 2 * PANEL_COLS])
    } else {
        padded
            .reshape([panels, PANEL_COLS, k])
            .transpose(1, 2)
            .contiguous()
    })
}

/// `x · wᵀ (+ bias)` for `x` `[.., k]` (contiguous) and `w` `[n, k]` given as
/// [`pack_linear`]`(w)`, in the same format as `x` (f32, or bf16 with f32 accumulation), on
/// AVX-512 / AVX2 register tiles where the CPU has them (AVX512-BF16's dot product for bf16).
/// The product is written as `out` (`Float`, or `BFloat16` for a bf16 `x`). Each output is
/// one chain of multiply-adds over `k` in order, so a row's result does not depend on the
/// other rows of `x` (batch composition) or on the number of threads.
///
/// ```
/// use cairn::model::fused::{linear_packed, pack_linear};
/// use tch::{Device, Kind, Tensor};
///
/// let w = Tensor::randn([40, 16], (Kind::Float, Device::Cpu)); // [n, k]
/// let packed = pack_linear(&w)?; // once per weight
/// assert_eq!(packed.size(), [2, 16, 32]); // two panels of 32 columns, the second padded
/// let x = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
/// let y = linear_packed(&x, &packed, 40, None, Kind::Float)?;
/// assert!(y.allclose(&x.matmul(&w.tr()), 1e-5, 1e-5, false));
/// # Ok::<(), cairn::model::ModelError>(())
/// ```
pub fn linear_packed(
    x: &Tensor,
    packed: &Tensor,
    n: i64,
    bias: Option<&Tensor>,
    out: Kind,
) -> Result<Tensor, ModelError> {
    let kind = out;
    let mut out = ptr::null_mut();
    let bias = bias.map_or(ptr::null(), |b| b.as_ptr());
    // SAFETY: the tensors outlive the call; the kernel checks their formats and shapes and
    // writes only the new output.
    check(unsafe {
        cairn_linear_packed(
            x.as_ptr(),
            packed.as_ptr(),
            n,
            bias,
            ptr::null_mut(),
            bf16(kind),
            level(),
            &mut out,
        )
    })?;
    owned(out)
}

/// `into += x · wᵀ (+ bias)` in place, for `into` `[.., n]` (f32, contiguous, as many rows as
/// `x`) and `w` packed by [`pack_linear`] in `x`'s format: the residual add of a projection
/// without a separate pass over the stream.
pub fn add_linear_packed_(
    into: &mut Tensor,
    x: &Tensor,
    packed: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(), ModelError> {
    let n = into.size().last().copied().unwrap_or(0);
    let bias = bias.map_or(ptr::null(), |b| b.as_ptr());
    let mut unused = ptr::null_mut();
    // SAFETY: as in `linear_packed`; the kernel writes into `into`'s own storage, which the
    // exclusive borrow guarantees no one else is reading.
    check(unsafe {
        cairn_linear_packed(
            x.as_ptr(),
            packed.as_ptr(),
            n,
            bias,
            into.as_mut_ptr(),
            0,
            level(),
            &mut unused,
        )
    })
}

/// `x · wᵀ (+ bias)` as [`linear_packed`], for `w` kept as quantised panels
/// ([`super::quantised::pack_quantised`]): each panel is dequantised, as the reference
/// dequantiser does, into the packed layout of `x`'s format just before its tiles run, so
/// the result equals [`linear_packed`] over `pack_linear` of the dequantised matrix (in
/// `x`'s format) bit for bit, while only the quantised blocks stay in memory.
pub fn linear_quant(
    x: &Tensor,
    w: &QuantMatrix,
    bias: Option<&Tensor>,
    out: Kind,
) -> Result<Tensor, ModelError> {
    let kind = out;
    let mut out = ptr::null_mut();
    quant_call(x, w, bias, ptr::null_mut(), bf16(kind), &mut out)?;
    owned(out)
}

/// `into += x · wᵀ (+ bias)` in place, as [`add_linear_packed_`] for quantised panels.
pub fn add_linear_quant_(
    into: &mut Tensor,
    x: &Tensor,
    w: &QuantMatrix,
    bias: Option<&Tensor>,
) -> Result<(), ModelError> {
    if into.size().last().copied() != Some(w.rows() as i64) {
        return Err(ModelError::InvalidRequest(format!(
            "accumulator {:?} does not have {} columns",
            into.size(),
            w.rows()
        )));
    }
    let mut unused = ptr::null_mut();
    quant_call(x, w, bias, into.as_mut_ptr(), 0, &mut unused)
}

fn quant_call(
    x: &Tensor,
    w: &QuantMatrix,
    bias: Option<&Tensor>,
    into: *mut C_tensor,
    out_bf16: i32,
    out: &mut *mut C_tensor,
) -> Result<(), ModelError> {
    if x.size().last().copied() != Some(w.cols() as i64) {
        return Err(ModelError::InvalidRequest(format!(
            "input {:?} does not have the {} columns of the quantised weight",
            x.size(),
            w.cols()
        )));
    }
    let bias = bias.map_or(ptr::null(), |b| b.as_ptr());
    // SAFETY: `w`'s vectors hold one type and offset per panel of its `rows` (the kernel
    // checks every panel lies inside `data` before reading); the tensors outlive the call.
    check(unsafe {
        cairn_linear_quant(
            x.as_ptr(),
            w.data.as_ptr(),
            w.data.len() as i64,
            w.offsets.as_ptr(),
            w.types.as_ptr(),
            w.rows() as i64,
            bias,
            into,
            out_bf16,
            level(),
            out,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{GgmlType, dequantize_bytes};
    use crate::model::quantised::{QuantRows, pack_quantised};
    use tch::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn silu_mul_matches_the_tensor_ops() {
        tch::manual_seed(1);
        let x = Tensor::randn([5, 3, 2 * 37], (Kind::Float, Device::Cpu)) * 6.0;
        let expected = x.narrow(-1, 0, 37).silu() * x.narrow(-1, 37, 37);
        let got = silu_mul(&x).expect("kernel runs");
        assert_eq!(got.size(), vec![5, 3, 37]);
        assert!(max_diff(&got, &expected) < 1e-5);
    }

    #[test]
    fn logits_summary_matches_logsumexp_and_argmax() {
        tch::manual_seed(2);
        let x = Tensor::randn([7, 1001], (Kind::Float, Device::Cpu)) * 8.0;
        let (z, m, a) = logits_summary(&x).expect("kernel runs");
        let (em, ea) = x.max_dim(-1, false);
        assert!(max_diff(&z, &x.logsumexp([-1i64].as_slice(), false)) < 1e-4);
        assert_eq!(max_diff(&m, &em), 0.0);
        assert_eq!(
            Vec::<i64>::try_from(&a).ok(),
            Vec::<i64>::try_from(&ea).ok()
        );
    }

    #[test]
    fn logits_summary_takes_the_first_of_tied_maxima() {
        let x = Tensor::from_slice(&[1.0f32, 3.0, 0.5, 3.0]).view([1, 4]);
        let (_, _, a) = logits_summary(&x).expect("kernel runs");
        assert_eq!(Vec::<i64>::try_from(&a).ok(), Some(vec![1]));
    }

    /// Decode attention by tensor ops: grouped query rows, additive mask, softmax.
    fn reference_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        valid: &Tensor,
        total: i64,
    ) -> Tensor {
        let (b, nh, hd) = (q.size()[0], q.size()[1], q.size()[3]);
        let nkv = k.size()[1];
        let live = valid.narrow(1, 0, total).copy();
        let _ = live.narrow(1, total - 1, 1).fill_(1);
        let mask = Tensor::zeros([b, 1, 1, total], (Kind::Float, Device::Cpu)).masked_fill(
            &live.logical_not().view([b, 1, 1, total]),
            f64::NEG_INFINITY,
        );
        let scores = q
            .reshape([b, nkv, nh / nkv, hd])
            .matmul(&k.narrow(2, 0, total).transpose(-1, -2))
            / (hd as f64).sqrt()
            + mask;
        scores
            .softmax(-1, Kind::Float)
            .matmul(&v.narrow(2, 0, total))
            .reshape([b, 1, nh * hd])
    }

    /// Runs `f` with the kernels pinned to `isa` on this thread.
    fn at_level<T>(isa: Isa, f: impl FnOnce() -> T) -> T {
        PINNED_LEVEL.with(|l| l.set(isa));
        let out = f();
        PINNED_LEVEL.with(|l| l.set(Isa::Best));
        out
    }

    /// The instruction-set levels this CPU runs (the kernels refuse the others).
    fn levels() -> Vec<Isa> {
        let q = Tensor::zeros([1, 1, 1, 16], (Kind::Float, Device::Cpu));
        let valid = Tensor::ones([1, 1], (Kind::Bool, Device::Cpu));
        let runs = |isa| {
            at_level(isa, || {
                decode_attention(&q, &q, &q, &valid, 1, 1.0, Kind::Float)
            })
            .map_err(|e| assert!(e.to_string().contains("lacks"), "{e}"))
            .is_ok()
        };
        let levels: Vec<Isa> = [Isa::Baseline, Isa::V3, Isa::V4, Isa::V4Bf16]
            .into_iter()
            .filter(|&isa| runs(isa))
            .collect();
        assert!(levels.contains(&Isa::Baseline));
        levels
    }

    #[test]
    fn decode_attention_matches_the_tensor_ops_for_every_head_size() {
        tch::manual_seed(3);
        // Head sizes 64 and 128 take the register-blocked paths (rows shared by the group up
        // to 4 and 2 query heads per kv head, one query row at a time beyond), the others
        // the plain loops; each at every instruction-set level, over f32 and f16 caches.
        for (hd, nh, nkv) in [
            (8i64, 6i64, 2i64),
            (24, 6, 2),
            (64, 6, 2),
            (64, 6, 1),
            (64, 4, 4),
            (128, 6, 2),
            (128, 4, 2),
        ] {
            let (b, cap, total) = (3i64, 40i64, 33i64);
            let f = (Kind::Float, Device::Cpu);
            let q = Tensor::randn([b, nh, 1, hd], f);
            let k = Tensor::randn([b, nkv, cap, hd], f) * 2.0;
            let v = Tensor::randn([b, nkv, cap, hd], f);
            // Padding: row 1 has its first five columns masked, row 2 all but the last.
            let valid = Tensor::ones([b, cap], (Kind::Bool, Device::Cpu));
            let _ = valid.get(1).narrow(0, 0, 5).fill_(0);
            let _ = valid.get(2).fill_(0);
            for isa in levels() {
                for cache_kind in [Kind::Float, Kind::Half] {
                    let (k, v) = (k.to_kind(cache_kind), v.to_kind(cache_kind));
                    let got = at_level(isa, || {
                        decode_attention(
                            &q,
                            &k,
                            &v,
                            &valid,
                            total,
                            1.0 / (hd as f64).sqrt(),
                            Kind::Float,
                        )
                    })
                    .expect("kernel runs");
                    // The reference reads the same (possibly rounded) cache, widened.
                    let (k, v) = (k.to_kind(Kind::Float), v.to_kind(Kind::Float));
                    let expected = reference_attention(&q, &k, &v, &valid, total);
                    let diff = max_diff(&got, &expected);
                    let case = format!("head size {hd}, {nh}/{nkv} heads, {isa:?}, {cache_kind:?}");
                    assert!(diff < 1e-5, "{case}: {diff}");
                    // A fully masked row attends to its own position alone.
                    let own = v.get(2).narrow(1, total - 1, 1).reshape([1, nkv * hd]);
                    let row = got
                        .get(2)
                        .view([nkv, nh / nkv, hd])
                        .select(1, 0)
                        .reshape([1, nkv * hd]);
                    assert!(max_diff(&row, &own) < 1e-6, "{case}");
                }
            }
        }
    }

    #[test]
    fn f16_caches_hold_the_nearest_f16_of_what_f32_caches_hold() {
        tch::manual_seed(7);
        let (b, t, nh, nkv, hd) = (2i64, 5i64, 2i64, 1i64, 40i64);
        let f = (Kind::Float, Device::Cpu);
        // Magnitudes from f16 subnormals (< 2^-14) to near the top of its range, and exact
        // halfway cases between neighbouring f16 values (ties go to even).
        let magnitude = (Tensor::rand([b, t, (nh + 2 * nkv) * hd], f) * 44.0 - 29.0).exp2();
        let sign = Tensor::randn([b, t, (nh + 2 * nkv) * hd], f).sign();
        let qkv = magnitude * sign;
        let ties = Tensor::from_slice(&[
            1.0f32 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            2f32.powi(-24) * 1.5,
            2f32.powi(-24) * 2.5,
            2f32.powi(-25),
            65504.0,
            -65504.0,
            0.0,
        ]);
        qkv.get(0).get(0).narrow(0, 0, 8).copy_(&ties);
        qkv.get(0).get(0).narrow(0, (nh + nkv) * hd, 8).copy_(&ties);
        let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu))
            .repeat([b])
            .view([b, t]);
        // cos = 1, signed sin = 0: the keys are the inputs themselves.
        let cos = Tensor::ones([t, hd], f);
        let sin = Tensor::zeros([t, hd], f);
        let shape = [b, nkv, t, hd];
        let (mut k32, mut v32) = (Tensor::zeros(shape, f), Tensor::zeros(shape, f));
        let q32 = rope_append(
            &qkv,
            &positions,
            &cos,
            &sin,
            &mut k32,
            &mut v32,
            0,
            (nh, nkv),
        )
        .expect("kernel runs");
        for isa in levels() {
            let half = (Kind::Half, Device::Cpu);
            let (mut k16, mut v16) = (Tensor::zeros(shape, half), Tensor::zeros(shape, half));
            let append = |input: &Tensor, k: &mut Tensor, v: &mut Tensor| {
                at_level(isa, || {
                    rope_append(input, &positions, &cos, &sin, k, v, 0, (nh, nkv))
                })
            };
            let q16 = append(&qkv, &mut k16, &mut v16).expect("kernel runs");
            assert!(q16.equal(&q32), "{isa:?} queries stay f32");
            // Bit for bit what libtorch's own rounding to f16 gives.
            assert!(k16.equal(&k32.to_kind(Kind::Half)), "{isa:?} keys");
            assert!(v16.equal(&v32.to_kind(Kind::Half)), "{isa:?} values");
            // Past the f16 range: an error, not a cached infinity.
            let big = qkv.copy();
            let _ = big
                .get(1)
                .get(2)
                .narrow(0, (nh + nkv) * hd + 3, 1)
                .fill_(65520.0);
            let err = append(&big, &mut k16, &mut v16).expect_err("out of the f16 range");
            assert!(err.to_string().contains("f16"), "{isa:?}: {err}");
        }
        // Mixed formats are refused.
        let mut k16 = Tensor::zeros(shape, (Kind::Half, Device::Cpu));
        let mixed = rope_append(
            &qkv,
            &positions,
            &cos,
            &sin,
            &mut k16,
            &mut v32,
            0,
            (nh, nkv),
        );
        assert!(mixed.is_err());
    }

    #[test]
    fn rope_append_writes_rotated_keys_and_values_into_the_cache() {
        tch::manual_seed(4);
        let (b, t, nh, nkv, hd, cap, past) = (2i64, 3i64, 4i64, 2i64, 8i64, 10i64, 4i64);
        let f = (Kind::Float, Device::Cpu);
        let qkv = Tensor::randn([b, t, (nh + 2 * nkv) * hd], f);
        let positions = Tensor::from_slice(&[4i64, 5, 6, 0, 1, 2]).view([b, t]);
        let cos = Tensor::randn([16, hd], f);
        let sin = Tensor::randn([16, hd], f);
        let mut kc = Tensor::zeros([b, nkv, cap, hd], f);
        let mut vc = Tensor::zeros([b, nkv, cap, hd], f);
        let q = rope_append(
            &qkv,
            &positions,
            &cos,
            &sin,
            &mut kc,
            &mut vc,
            past,
            (nh, nkv),
        )
        .expect("kernel runs");
        // Reference: x·cos + swap_halves(x)·sin, per head.
        let heads = qkv.narrow(2, 0, (nh + nkv) * hd).view([b, t, nh + nkv, hd]);
        let c = cos
            .index_select(0, &positions.flatten(0, 1))
            .view([b, t, 1, hd]);
        let s = sin
            .index_select(0, &positions.flatten(0, 1))
            .view([b, t, 1, hd]);
        let half = hd / 2;
        let swapped = Tensor::cat(&[heads.narrow(3, half, half), heads.narrow(3, 0, half)], 3);
        let rotated = &heads * &c + swapped * &s;
        assert!(max_diff(&q, &rotated.narrow(2, 0, nh).transpose(1, 2)) < 1e-6);
        let keys = kc.narrow(2, past, t);
        assert!(max_diff(&keys, &rotated.narrow(2, nh, nkv).transpose(1, 2)) < 1e-6);
        let values = qkv
            .narrow(2, (nh + nkv) * hd, nkv * hd)
            .view([b, t, nkv, hd])
            .transpose(1, 2);
        assert_eq!(max_diff(&vc.narrow(2, past, t), &values), 0.0);
        // Columns outside past..past+t are untouched.
        assert_eq!(
            kc.narrow(2, 0, past)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        // A position outside the tables is an error, not an out-of-bounds read.
        let far = Tensor::from_slice(&[4i64, 5, 99, 0, 1, 2]).view([b, t]);
        assert!(rope_append(&qkv, &far, &cos, &sin, &mut kc, &mut vc, past, (nh, nkv)).is_err());
    }

    #[test]
    fn rms_norm_matches_the_tensor_op_in_both_output_formats() {
        tch::manual_seed(5);
        let x = Tensor::randn([4, 3, 96], (Kind::Float, Device::Cpu)) * 3.0;
        let w = Tensor::randn([96], (Kind::Float, Device::Cpu));
        let expected = x.rms_norm([96i64].as_slice(), Some(&w), 1e-5);
        let f32_out = rms_norm(&x, &w, 1e-5, Kind::Float).expect("kernel runs");
        assert_eq!(f32_out.kind(), Kind::Float);
        assert!(max_diff(&f32_out, &expected) < 1e-5);
        let bf16_out = rms_norm(&x, &w, 1e-5, Kind::BFloat16).expect("kernel runs");
        assert_eq!(bf16_out.kind(), Kind::BFloat16);
        // Rounded once, to the nearest bf16: within half a bf16 step of the exact value.
        let err = (bf16_out.to_kind(Kind::Float) - &expected).abs();
        let step = expected.abs() * 2f64.powi(-8) + 1e-6;
        assert!(bool::try_from(err.le_tensor(&step).all()).unwrap_or(false));
    }

    #[test]
    fn bf16_inputs_give_what_their_f32_widening_gives() {
        tch::manual_seed(6);
        let logits =
            (Tensor::randn([3, 777], (Kind::Float, Device::Cpu)) * 5.0).to_kind(Kind::BFloat16);
        let wide = logits.to_kind(Kind::Float);
        let (z, m, a) = logits_summary(&logits).expect("kernel runs");
        let (wz, wm, wa) = logits_summary(&wide).expect("kernel runs");
        assert!(max_diff(&z, &wz) < 1e-6);
        assert_eq!(max_diff(&m, &wm), 0.0);
        assert!(a.equal(&wa));
        let gate_up =
            (Tensor::randn([5, 2 * 40], (Kind::Float, Device::Cpu)) * 4.0).to_kind(Kind::BFloat16);
        let narrow = silu_mul(&gate_up).expect("kernel runs");
        assert_eq!(narrow.kind(), Kind::BFloat16);
        let wide = silu_mul(&gate_up.to_kind(Kind::Float)).expect("kernel runs");
        // The bf16 result is the f32 result rounded once.
        assert!(narrow.equal(&wide.to_kind(Kind::BFloat16)));
        // Rotary embedding of a bf16 projection equals that of its widening.
        let qkv = Tensor::randn([2, 1, 4 * 8], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let positions = Tensor::from_slice(&[3i64, 7]).view([2, 1]);
        let tables = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
        let caches = || Tensor::zeros([2, 1, 4, 8], (Kind::Float, Device::Cpu));
        let (mut k1, mut v1, mut k2, mut v2) = (caches(), caches(), caches(), caches());
        let q1 = rope_append(
            &qkv,
            &positions,
            &tables,
            &tables,
            &mut k1,
            &mut v1,
            0,
            (2, 1),
        )
        .expect("kernel runs");
        let wide = qkv.to_kind(Kind::Float);
        let q2 = rope_append(
            &wide,
            &positions,
            &tables,
            &tables,
            &mut k2,
            &mut v2,
            0,
            (2, 1),
        )
        .expect("kernel runs");
        assert!(q1.equal(&q2) && k1.equal(&k2) && v1.equal(&v2));
        // Attention written as bf16 is the f32 output rounded once.
        let q = Tensor::randn([2, 2, 1, 64], (Kind::Float, Device::Cpu));
        let cache = Tensor::randn([2, 1, 5, 64], (Kind::Float, Device::Cpu));
        let valid = Tensor::ones([2, 5], (Kind::Bool, Device::Cpu));
        let a32 = decode_attention(&q, &cache, &cache, &valid, 5, 0.125, Kind::Float)
            .expect("kernel runs");
        let a16 = decode_attention(&q, &cache, &cache, &valid, 5, 0.125, Kind::BFloat16)
            .expect("kernel runs");
        assert!(a16.equal(&a32.to_kind(Kind::BFloat16)));
    }

    #[test]
    fn kernels_reject_bad_input_with_an_error() {
        let ints = Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu));
        let err = logits_summary(&ints).expect_err("i64 logits are refused");
        assert!(err.to_string().contains("must be f32"), "{err}");
        let odd = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        assert!(silu_mul(&odd).is_err());
        let q = Tensor::zeros([1, 4, 1, 8], (Kind::Float, Device::Cpu));
        let cache = Tensor::zeros([1, 2, 6, 8], (Kind::Float, Device::Cpu));
        let valid = Tensor::ones([1, 6], (Kind::Bool, Device::Cpu));
        assert!(decode_attention(&q, &cache, &cache, &valid, 7, 1.0, Kind::Float).is_err());
        assert!(decode_attention(&q, &cache, &cache, &valid, 6, 1.0, Kind::Float).is_ok());
    }

    #[test]
    fn packed_products_match_the_tensor_op_at_every_level() {
        tch::manual_seed(11);
        // Widths around the 32-column panels, row counts around every tile height (12 / 2 /
        // 1 rows) and past the 128-row block, odd inner sizes (a bf16 pair cut short).
        for kind in [Kind::Float, Kind::BFloat16] {
            for (n, k) in [(1, 1), (31, 7), (32, 64), (33, 65), (100, 576), (960, 37)] {
                let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(kind);
                let bias = Tensor::randn([n], (Kind::Float, Device::Cpu));
                let packed = pack_linear(&w).expect("a matrix");
                let depth = if kind == Kind::Float { k } else { (k + 1) / 2 };
                let width = if kind == Kind::Float { 32 } else { 64 };
                assert_eq!(packed.size(), vec![(n + 31) / 32, depth, width]);
                let wide = |t: &Tensor| t.to_kind(Kind::Double);
                for m in [1, 2, 5, 12, 13, 25, 130] {
                    let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu)).to_kind(kind);
                    let expected = wide(&x).matmul(&wide(&w).tr()).to_kind(Kind::Float);
                    let tolerance = 1e-5 * (k as f64).sqrt() * 4.0;
                    for isa in levels() {
                        at_level(isa, || {
                            let got = linear_packed(&x, &packed, n, None, Kind::Float)
                                .expect("kernel runs");
                            assert_eq!(got.size(), vec![m, n]);
                            let d = max_diff(&got, &expected);
                            assert!(d < tolerance, "{kind:?} {isa:?} n={n} k={k} m={m}: {d}");
                            let with_bias = linear_packed(&x, &packed, n, Some(&bias), Kind::Float)
                                .expect("kernel runs");
                            assert!(max_diff(&with_bias, &(&expected + &bias)) < tolerance);
                            let mut stream = Tensor::randn([m, n], (Kind::Float, Device::Cpu));
                            let before = stream.copy();
                            add_linear_packed_(&mut stream, &x, &packed, Some(&bias))
                                .expect("kernel runs");
                            assert!(max_diff(&stream, &(&before + &expected + &bias)) < tolerance);
                            if kind == Kind::BFloat16 {
                                // Written as bf16: the f32 result rounded to nearest even.
                                let half = linear_packed(&x, &packed, n, Some(&bias), kind)
                                    .expect("kernel runs");
                                assert_eq!(half.kind(), Kind::BFloat16);
                                assert!(half.equal(&with_bias.to_kind(Kind::BFloat16)));
                            }
                        });
                    }
                }
            }
        }
        // Leading dimensions are kept: [b, t, k] → [b, t, n].
        let w = Tensor::randn([40, 16], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        let got = linear_packed(
            &x,
            &pack_linear(&w).expect("a matrix"),
            40,
            None,
            Kind::Float,
        )
        .expect("kernel runs");
        assert_eq!(got.size(), vec![2, 3, 40]);
        assert!(max_diff(&got, &x.matmul(&w.tr())) < 1e-4);
    }

    /// Random blocks of `t` for `rows` rows of `cols` values, their f16 scales finite and
    /// small (random bytes there could be NaN, which no equality sees).
    fn random_blocks(t: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let block = t.type_size().expect("a block type");
        let per_row = cols / t.block_size().expect("a block type");
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        let mut bytes: Vec<u8> = (0..rows * per_row * block).map(|_| next()).collect();
        let halves: &[usize] = match t {
            GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            _ => &[0],
        };
        for b in bytes.chunks_mut(block) {
            for &at in halves {
                // Sign, exponent 2^-13 .. 2^-6 (normal and a few subnormal-free values).
                let v = half::f16::from_f32(f32::from(next()) / 255.0 * 0.01 - 0.004);
                b[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        bytes
    }

    #[test]
    fn quantised_products_equal_the_packed_product_of_the_dequantised_matrix() {
        tch::manual_seed(12);
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ];
        for (i, &t) in types.iter().enumerate() {
            let block = t.block_size().expect("a block type");
            // Rows around the 32-row panels; inner sizes of one and several super-blocks.
            for (n, k) in [(1, block), (33, 2 * block), (70, 3 * block)] {
                let bytes = random_blocks(t, n, k, 7 + i as u64 * 131 + n as u64);
                let parts = [QuantRows {
                    ggml_type: t,
                    bytes: &bytes,
                    rows: n,
                    row_of: None,
                }];
                let q = pack_quantised(&parts, k)
                    .expect("sizes agree")
                    .expect("readable");
                let dense = dequantize_bytes(t, &bytes, n * k).expect("reference");
                let w = Tensor::from_slice(&dense).view([n as i64, k as i64]);
                let bias = Tensor::randn([n as i64], (Kind::Float, Device::Cpu));
                for kind in [Kind::Float, Kind::BFloat16] {
                    let packed = pack_linear(&w.to_kind(kind)).expect("a matrix");
                    for m in [1, 5, 8, 12, 13, 130] {
                        let x =
                            Tensor::randn([m, k as i64], (Kind::Float, Device::Cpu)).to_kind(kind);
                        for isa in levels() {
                            at_level(isa, || {
                                let want =
                                    linear_packed(&x, &packed, n as i64, Some(&bias), Kind::Float)
                                        .expect("kernel runs");
                                let got = linear_quant(&x, &q, Some(&bias), Kind::Float)
                                    .expect("kernel runs");
                                assert!(got.equal(&want), "{t} {kind:?} {isa:?} n={n} k={k} m={m}");
                                let mut a =
                                    Tensor::randn([m, n as i64], (Kind::Float, Device::Cpu));
                                let mut b = a.copy();
                                add_linear_packed_(&mut a, &x, &packed, None).expect("kernel runs");
                                add_linear_quant_(&mut b, &x, &q, None).expect("kernel runs");
                                assert!(a.equal(&b), "{t} {kind:?} {isa:?} accumulating");
                                if kind == Kind::BFloat16 {
                                    let half =
                                        linear_quant(&x, &q, None, kind).expect("kernel runs");
                                    let want = linear_packed(&x, &packed, n as i64, None, kind)
                                        .expect("kernel runs");
                                    assert!(half.equal(&want));
                                }
                            });
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quantised_matrices_keep_their_row_order_and_refuse_mixed_panels() {
        // Two parts (as q and k of a fused projection), the second with its rows reversed.
        let (k, first, second) = (64usize, 40usize, 24usize);
        let a = random_blocks(GgmlType::Q8_0, first, k, 3);
        let b = random_blocks(GgmlType::Q8_0, second, k, 4);
        let order: Vec<usize> = (0..second).rev().collect();
        let parts = [
            QuantRows {
                ggml_type: GgmlType::Q8_0,
                bytes: &a,
                rows: first,
                row_of: None,
            },
            QuantRows {
                ggml_type: GgmlType::Q8_0,
                bytes: &b,
                rows: second,
                row_of: Some(order.clone()),
            },
        ];
        let q = pack_quantised(&parts, k)
            .expect("sizes agree")
            .expect("readable");
        let da = Tensor::from_slice(&dequantize_bytes(GgmlType::Q8_0, &a, first * k).expect("ok"))
            .view([first as i64, k as i64]);
        let db = Tensor::from_slice(&dequantize_bytes(GgmlType::Q8_0, &b, second * k).expect("ok"))
            .view([second as i64, k as i64])
            .flip([0]);
        let w = Tensor::cat(&[da, db], 0);
        let x = Tensor::randn([3, k as i64], (Kind::Float, Device::Cpu));
        let want = linear_packed(
            &x,
            &pack_linear(&w).expect("a matrix"),
            64,
            None,
            Kind::Float,
        )
        .expect("kernel runs");
        assert!(
            linear_quant(&x, &q, None, Kind::Float)
                .expect("runs")
                .equal(&want)
        );
        // A panel holding rows of two types cannot be kept quantised (rows 32..64 would mix).
        let c = random_blocks(GgmlType::Q4_0, second, k, 5);
        let mixed = [
            QuantRows {
                ggml_type: GgmlType::Q8_0,
                bytes: &a,
                rows: first,
                row_of: None,
            },
            QuantRows {
                ggml_type: GgmlType::Q4_0,
                bytes: &c,
                rows: second,
                row_of: None,
            },
        ];
        assert!(pack_quantised(&mixed, k).expect("sizes agree").is_none());
        // Types the products do not read, and sizes that do not match, are told apart.
        let f32s = vec![0u8; 4 * k];
        let plain = [QuantRows {
            ggml_type: GgmlType::F32,
            bytes: &f32s,
            rows: 1,
            row_of: None,
        }];
        assert!(pack_quantised(&plain, k).expect("no error").is_none());
        let short = [QuantRows {
            ggml_type: GgmlType::Q8_0,
            bytes: &a[1..],
            rows: first,
            row_of: None,
        }];
        assert!(pack_quantised(&short, k).is_err());
        // An input of the wrong width is an error, not a read past the weight.
        let wrong = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
        assert!(linear_quant(&wrong, &q, None, Kind::Float).is_err());
    }

    #[test]
    fn a_packed_product_row_does_not_depend_on_its_batch() {
        tch::manual_seed(12);
        let (n, k) = (200, 301);
        for kind in [Kind::Float, Kind::BFloat16] {
            let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(kind);
            let packed = pack_linear(&w).expect("a matrix");
            let x = Tensor::randn([37, k], (Kind::Float, Device::Cpu)).to_kind(kind);
            for isa in levels() {
                at_level(isa, || {
                    let all =
                        linear_packed(&x, &packed, n, None, Kind::Float).expect("kernel runs");
                    for (row, width) in [(0, 1), (5, 1), (13, 7), (30, 7), (11, 26)] {
                        let part =
                            linear_packed(&x.narrow(0, row, width), &packed, n, None, Kind::Float)
                                .expect("kernel runs");
                        // Bit for bit: each output is one chain of multiply-adds in k order.
                        assert!(
                            part.equal(&all.narrow(0, row, width)),
                            "{kind:?} {isa:?}: rows {row}..{} differ when batched",
                            row + width
                        );
                    }
                });
            }
        }
    }

    #[test]
    fn packed_products_reject_mismatched_shapes() {
        let w = Tensor::randn([40, 16], (Kind::Float, Device::Cpu));
        let packed = pack_linear(&w).expect("a matrix");
        let x = Tensor::randn([3, 17], (Kind::Float, Device::Cpu));
        let err = linear_packed(&x, &packed, 40, None, Kind::Float).expect_err("k mismatch");
        assert!(err.to_string().contains("packed weight"), "{err}");
        let x = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
        assert!(
            linear_packed(&x, &packed, 70, None, Kind::Float).is_err(),
            "n beyond the panels"
        );
        let bias = Tensor::randn([39], (Kind::Float, Device::Cpu));
        assert!(linear_packed(&x, &packed, 40, Some(&bias), Kind::Float).is_err());
        let mut wrong = Tensor::zeros([4, 40], (Kind::Float, Device::Cpu));
        assert!(add_linear_packed_(&mut wrong, &x, &packed, None).is_err());
        let halves = x.to_kind(Kind::Half);
        assert!(linear_packed(&halves, &packed, 40, None, Kind::Float).is_err());
        // Input and panels in different formats; a bf16 result of an f32 product.
        let bf = x.to_kind(Kind::BFloat16);
        assert!(linear_packed(&bf, &packed, 40, None, Kind::Float).is_err());
        // Only f32 and bf16 matrices pack.
        assert!(pack_linear(&Tensor::zeros([4], (Kind::Float, Device::Cpu))).is_err());
        assert!(pack_linear(&Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu))).is_err());
        assert!(pack_linear(&Tensor::zeros([4, 4], (Kind::Half, Device::Cpu))).is_err());
        assert!(linear_packed(&x, &packed, 40, None, Kind::BFloat16).is_err());
    }
}
