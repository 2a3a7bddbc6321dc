//! The fused CPU inference kernels (`cairn::model::fused`) against the libtorch ops they
//! replace, on the shapes of a SmolLM2-135M decode step, measured in the same run.
//!
//! - `decode_attention/{fused,libtorch}`: one decode step's attention over 30 layers' caches
//!   (batch 64, 9 query / 3 kv heads of 64, 103 of 167 cached positions; ~300 MB, so it
//!   streams from memory as in generation). libtorch: scores by batched matmul, scale,
//!   softmax, batched matmul.
//! - `decode_attention_f16/{fused,libtorch}`: the same over f16 caches (as bf16 models keep
//!   them), against libtorch over the f32 caches.
//! - `logits_summary/{fused,libtorch}`: log-sum-exp, max and argmax of [64, 49152] logits.
//! - `silu_mul/{fused,libtorch}`: `silu(gate)·up` of a [64, 2·1536] projection.
//! - `linear_f32_b{1,64}/{fused,libtorch}`: 30 layers' gate/up products ([3072, 576] f32
//!   weights, 212 MB, so they stream from memory) at batch 1 and 64: `fused::linear_packed`
//!   over packed weights against `x · Wᵀ` (MKL).
//! - `linear_bf16_b{1,64}/{fused,libtorch}`: the same with bf16 weights and inputs (106 MB):
//!   the packed bf16 kernel (AVX512-BF16 where the CPU has it) against libtorch's bf16
//!   `x · Wᵀ` (oneDNN).
//!
//! After the criterion groups, the fused/libtorch time ratios (medians of interleaved runs)
//! go to stderr; `cargo test --benches`, `--test`, `--list`, `--profile-time` and
//! `CAIRN_BENCH_SUMMARY=0` skip them.
//!
//! ```text
//! cargo bench --bench kernels
//! ```

use std::hint::black_box;
use std::time::Instant;

use cairn::model::fused;
use criterion::Criterion;
use tch::{Device, Kind, Tensor};

const LAYERS: usize = 30;
/// Batch, query heads, kv heads, head size, cache capacity, attended positions.
const B: i64 = 64;
const NH: i64 = 9;
const NKV: i64 = 3;
const HD: i64 = 64;
const CAP: i64 = 167;
const TOTAL: i64 = 103;

struct Inputs {
    q: Tensor,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// The same caches in f16 (what bf16 models decode with).
    k16: Vec<Tensor>,
    v16: Vec<Tensor>,
    valid: Tensor,
    logits: Tensor,
    gate_up: Tensor,
    /// Per layer, the f32 gate/up weight and its packed panels.
    w_gate_up: Vec<Tensor>,
    packed_gate_up: Vec<Tensor>,
    x1: Tensor,
    x64: Tensor,
    /// The same in bf16.
    w_gate_up16: Vec<Tensor>,
    packed_gate_up16: Vec<Tensor>,
    x1_16: Tensor,
    x64_16: Tensor,
}

fn inputs() -> Inputs {
    tch::manual_seed(0);
    let f = (Kind::Float, Device::Cpu);
    let k: Vec<Tensor> = (0..LAYERS)
        .map(|_| Tensor::randn([B, NKV, CAP, HD], f))
        .collect();
    let v: Vec<Tensor> = (0..LAYERS)
        .map(|_| Tensor::randn([B, NKV, CAP, HD], f))
        .collect();
    let w_gate_up: Vec<Tensor> = (0..LAYERS)
        .map(|_| Tensor::randn([2 * 1536, 576], f))
        .collect();
    let w_gate_up16: Vec<Tensor> = w_gate_up
        .iter()
        .map(|w| w.to_kind(Kind::BFloat16))
        .collect();
    let half = |t: &Vec<Tensor>| t.iter().map(|t| t.to_kind(Kind::Half)).collect();
    Inputs {
        k16: half(&k),
        v16: half(&v),
        k,
        v,
        q: Tensor::randn([B, NH, 1, HD], f),
        valid: Tensor::ones([B, CAP], (Kind::Bool, Device::Cpu)),
        logits: Tensor::randn([B, 49152], f) * 4.0,
        gate_up: Tensor::randn([B, 2 * 1536], f),
        packed_gate_up: w_gate_up
            .iter()
            .map(|w| fused::pack_linear(w).expect("a matrix"))
            .collect(),
        packed_gate_up16: w_gate_up16
            .iter()
            .map(|w| fused::pack_linear(w).expect("a matrix"))
            .collect(),
        w_gate_up,
        w_gate_up16,
        x1: Tensor::randn([1, 576], f),
        x64: Tensor::randn([B, 576], f),
        x1_16: Tensor::randn([1, 576], f).to_kind(Kind::BFloat16),
        x64_16: Tensor::randn([B, 576], f).to_kind(Kind::BFloat16),
    }
}

fn attention_fused(x: &Inputs) {
    let scale = 1.0 / (HD as f64).sqrt();
    for (k, v) in x.k.iter().zip(&x.v) {
        let out = fused::decode_attention(&x.q, k, v, &x.valid, TOTAL, scale, Kind::Float);
        let _ = black_box(out.expect("kernel runs"));
    }
}

fn attention_fused_f16(x: &Inputs) {
    let scale = 1.0 / (HD as f64).sqrt();
    for (k, v) in x.k16.iter().zip(&x.v16) {
        let out = fused::decode_attention(&x.q, k, v, &x.valid, TOTAL, scale, Kind::Float);
        let _ = black_box(out.expect("kernel runs"));
    }
}

fn attention_libtorch(x: &Inputs) {
    let scale = 1.0 / (HD as f64).sqrt();
    let q = x.q.reshape([B, NKV, NH / NKV, HD]);
    for (k, v) in x.k.iter().zip(&x.v) {
        let scores = q.matmul(&k.narrow(2, 0, TOTAL).transpose(-1, -2)) * scale;
        let out = scores
            .softmax(-1, Kind::Float)
            .matmul(&v.narrow(2, 0, TOTAL));
        let _ = black_box(out.transpose(1, 2).reshape([B, 1, NH * HD]));
    }
}

fn logits_fused(x: &Inputs) {
    let _ = black_box(fused::logits_summary(&x.logits).expect("kernel runs"));
}

fn logits_libtorch(x: &Inputs) {
    let (m, a) = x.logits.max_dim(-1, false);
    let _ = black_box((x.logits.logsumexp([-1i64].as_slice(), false), m, a));
}

fn silu_fused(x: &Inputs) {
    let _ = black_box(fused::silu_mul(&x.gate_up).expect("kernel runs"));
}

fn silu_libtorch(x: &Inputs) {
    let _ = black_box(x.gate_up.narrow(-1, 0, 1536).silu() * x.gate_up.narrow(-1, 1536, 1536));
}

fn linear_packed(weights: &[Tensor], input: &Tensor) {
    for w in weights {
        let out = fused::linear_packed(input, w, 2 * 1536, None, input.kind());
        let _ = black_box(out.expect("kernel runs"));
    }
}

fn linear_libtorch(weights: &[Tensor], input: &Tensor) {
    for w in weights {
        let _ = black_box(input.matmul(&w.tr()));
    }
}

type Pair = (&'static str, fn(&Inputs), fn(&Inputs));

const PAIRS: [Pair; 8] = [
    ("decode_attention", attention_fused, attention_libtorch),
    (
        "decode_attention_f16",
        attention_fused_f16,
        attention_libtorch,
    ),
    ("logits_summary", logits_fused, logits_libtorch),
    ("silu_mul", silu_fused, silu_libtorch),
    (
        "linear_f32_b1",
        |x| linear_packed(&x.packed_gate_up, &x.x1),
        |x| linear_libtorch(&x.w_gate_up, &x.x1),
    ),
    (
        "linear_f32_b64",
        |x| linear_packed(&x.packed_gate_up, &x.x64),
        |x| linear_libtorch(&x.w_gate_up, &x.x64),
    ),
    (
        "linear_bf16_b1",
        |x| linear_packed(&x.packed_gate_up16, &x.x1_16),
        |x| linear_libtorch(&x.w_gate_up16, &x.x1_16),
    ),
    (
        "linear_bf16_b64",
        |x| linear_packed(&x.packed_gate_up16, &x.x64_16),
        |x| linear_libtorch(&x.w_gate_up16, &x.x64_16),
    ),
];

fn criterion_groups(c: &mut Criterion, x: &Inputs) {
    let _g = tch::no_grad_guard();
    for (name, fused, reference) in PAIRS {
        let mut group = c.benchmark_group(name);
        group.sample_size(20);
        group.bench_function("fused", |b| b.iter(|| fused(x)));
        group.bench_function("libtorch", |b| b.iter(|| reference(x)));
        group.finish();
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// fused / libtorch time, from runs taken in turns so a slow spell hits both.
fn summary(x: &Inputs) {
    let _g = tch::no_grad_guard();
    eprintln!("fused / libtorch time (median of 15 interleaved runs; < 1 is faster):");
    for (name, fused, reference) in PAIRS {
        let time = |f: fn(&Inputs)| {
            let t = Instant::now();
            f(x);
            t.elapsed().as_secs_f64()
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            a.push(time(fused));
            b.push(time(reference));
        }
        let (a, b) = (median(a), median(b));
        eprintln!(
            "  {name:<18} {:.2}  (fused {:.3} ms, libtorch {:.3} ms)",
            a / b,
            a * 1e3,
            b * 1e3
        );
    }
}

fn main() {
    let x = inputs();
    let mut c = Criterion::default().configure_from_args();
    criterion_groups(&mut c, &x);
    c.final_summary();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and `--test`, `--list`
    // and `--profile-time` are not measuring runs.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let measuring = has("--bench") && !has("--test") && !has("--list") && !has("--profile-time");
    if measuring && std::env::var("CAIRN_BENCH_SUMMARY").as_deref() != Ok("0") {
        summary(&x);
    }
}
