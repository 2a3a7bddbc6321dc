//! The model runtime on tiny random Llamas built in the test: save → load, KV cache against
//! full recomputation, batching against one-at-a-time, seeding against batch composition,
//! the GGUF path (llama.cpp's Q/K row order), bf16 weights, the model worker, and bad input.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cairn::model::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};
use cairn::model::llama::{KvCache, Llama};
use cairn::model::load::{load_gguf, load_hf_weights};
use cairn::model::{Dtype, GenerateRequest, LlamaConfig, ModelError, SamplingParams, ScoreRequest};
use cairn::worker::{Job, JobOutput, ModelWorker, ServedModel, WorkerOptions};
use tch::{Device, Kind, Tensor};

use common::VOCAB;

fn tiny(seed: u64) -> Llama {
    Llama::random(LlamaConfig::tiny(VOCAB), seed, Device::Cpu).expect("random model")
}

fn full_logits(model: &Llama, ids: &[u32]) -> Tensor {
    let _g = tch::no_grad_guard();
    let n = ids.len() as i64;
    let tokens =
        Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).view([1, n]);
    let positions = Tensor::arange(n, (Kind::Int64, Device::Cpu)).view([1, n]);
    let valid = Tensor::ones([1, n], (Kind::Bool, Device::Cpu));
    let hidden = model
        .forward(&tokens, &positions, &valid, None)
        .expect("forward");
    model.logits(&hidden).squeeze_dim(0)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn sampled(seed: u64, max_new: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: 0,
        top_p: 0.95,
        max_new_tokens: max_new,
        seed,
        stop: vec![],
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 200, 3],
        vec![9],
        vec![44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54],
        vec![100, 101],
    ]
}

#[test]
fn save_then_load_gives_identical_logits() {
    let model = tiny(1);
    let dir = tempfile::tempdir().expect("tempdir");
    model.save_dir(dir.path()).expect("save");
    let back = load_hf_weights(dir.path(), Device::Cpu).expect("load");
    let ids = [3u32, 14, 15, 92, 65];
    assert!(full_logits(&model, &ids).equal(&full_logits(&back, &ids)));
    assert_eq!(back.config(), model.config());
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    let model = tiny(2);
    let _g = tch::no_grad_guard();
    let ids: Vec<u32> = vec![7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
    let full = full_logits(&model, &ids);
    let mut cache = KvCache::new(model.config(), 1, 32, Device::Cpu);
    let as_tensor = |s: &[u32]| {
        Tensor::from_slice(&s.iter().map(|&t| t as i64).collect::<Vec<_>>())
            .view([1, s.len() as i64])
    };
    // Prefill four, then one token at a time.
    let pos = Tensor::arange(4, (Kind::Int64, Device::Cpu)).view([1, 4]);
    let h = model
        .forward(
            &as_tensor(&ids[..4]),
            &pos,
            &Tensor::ones([1, 4], (Kind::Bool, Device::Cpu)),
            Some(&mut cache),
        )
        .expect("prefill");
    let mut steps = vec![model.logits(&h).squeeze_dim(0)];
    for (i, &t) in ids.iter().enumerate().skip(4) {
        let pos = Tensor::from_slice(&[i as i64]).view([1, 1]);
        let h = model
            .forward(
                &as_tensor(&[t]),
                &pos,
                &Tensor::ones([1, 1], (Kind::Bool, Device::Cpu)),
                Some(&mut cache),
            )
            .expect("step");
        steps.push(model.logits(&h).squeeze_dim(0));
    }
    let cached = Tensor::cat(&steps, 0);
    let diff = max_abs_diff(&cached, &full);
    assert!(diff < 1e-4, "cached vs full: {diff}");
    assert_eq!(cache.len(), 10);
}

/// Step-by-step cached logits of `prompts` (left-padded into one batch) for `steps` greedy
/// tokens, concatenated.
fn cached_steps(model: &Llama, prompts: &[Vec<u32>], steps: usize) -> Tensor {
    let _g = tch::no_grad_guard();
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let (tokens, positions, valid, len) = cairn::model::generate::left_pad(&refs, Device::Cpu);
    let b = prompts.len() as i64;
    // The model's own cache format (f16 for bf16 weights), read by both paths.
    let mut cache = model.new_cache(b, len + steps as i64);
    let hidden = model
        .forward(&tokens, &positions, &valid, Some(&mut cache))
        .expect("prefill");
    let mut logits = model.logits(&hidden.select(1, len - 1));
    let mut out = vec![logits.shallow_clone()];
    let mut next: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    for _ in 0..steps {
        let tok = logits.argmax(-1, false).view([b, 1]);
        let pos = Tensor::from_slice(&next).view([b, 1]);
        let hidden = model
            .forward(
                &tok,
                &pos,
                &Tensor::ones([b, 1], (Kind::Bool, Device::Cpu)),
                Some(&mut cache),
            )
            .expect("step");
        logits = model.logits(&hidden.select(1, 0));
        out.push(logits.shallow_clone());
        next.iter_mut().for_each(|n| *n += 1);
    }
    Tensor::stack(&out, 0)
}

#[test]
fn fused_kernels_match_the_plain_tensor_ops() {
    // Grouped queries (3 per kv head), q/k/v biases and left padding: every branch of the
    // fused path, prefill and decode, in both number formats.
    let config = LlamaConfig {
        num_attention_heads: 6,
        num_key_value_heads: 2,
        hidden_size: 48,
        attention_bias: true,
        ..LlamaConfig::tiny(common::VOCAB)
    };
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let mut model = Llama::random(config.clone(), 21, Device::Cpu).expect("random model");
        model.set_dtype(dtype);
        assert!(model.fused_kernels(), "fused kernels are the default");
        // bf16 models cache keys and values as f16, f32 models as f32.
        let cache_kind = if dtype == Dtype::Bf16 {
            Kind::Half
        } else {
            Kind::Float
        };
        assert_eq!(model.new_cache(2, 8).kind(), cache_kind, "{dtype}");
        let fused = cached_steps(&model, &prompts(), 6);
        model.set_fused_kernels(false);
        let plain = cached_steps(&model, &prompts(), 6);
        let diff = max_abs_diff(&fused, &plain);
        // With bf16 weights the plain path rounds every product to bf16 (2^-8 of its
        // magnitude, a "step"), logits included; the fused path's packed kernels keep their
        // f32 sums. The two differ by the plain path's roundings, carried through the
        // layers: allow four steps of the largest logit.
        let tolerance = match dtype {
            Dtype::F32 => 2e-3,
            Dtype::Bf16 => 4.0 * plain.abs().max().double_value(&[]) / 256.0,
        };
        assert!(
            diff <= tolerance,
            "{dtype}: fused vs plain logits differ by {diff} (tolerance {tolerance})"
        );
        assert!(fused.argmax(-1, false).equal(&plain.argmax(-1, false)));

        // Whole generations, greedy and sampled: same tokens, log-probabilities to 1e-4.
        let requests: Vec<GenerateRequest> = prompts()
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| GenerateRequest {
                prompt,
                params: if i % 2 == 0 {
                    SamplingParams::greedy(10)
                } else {
                    sampled(7 + i as u64, 10)
                },
            })
            .collect();
        let plain = cairn::model::generate::generate(&model, &[], &requests).expect("plain");
        model.set_fused_kernels(true);
        let fused = cairn::model::generate::generate(&model, &[], &requests).expect("fused");
        model.set_fused_kernels(false);
        // A log-probability moves with its logit and with the log-normaliser.
        let logprob_tolerance = match dtype {
            Dtype::F32 => 1e-3,
            Dtype::Bf16 => 2.0 * tolerance,
        };
        for ((f, p), request) in fused.iter().zip(&plain).zip(&requests) {
            // f32: the same tokens. bf16: the plain path's bf16-rounded logits tie near-equal
            // tokens of this random model, where the fused path's f32 sums do not, so the
            // generations may part; each fused token's log-probability is then checked
            // against the plain path's for the same tokens (scored without the kernels).
            let reference = if dtype == Dtype::F32 {
                assert_eq!(f.tokens, p.tokens, "{dtype}");
                p.logprobs.clone()
            } else {
                let scored = cairn::model::generate::score(
                    &model,
                    &[ScoreRequest {
                        context: request.prompt.clone(),
                        continuation: f.tokens.clone(),
                    }],
                )
                .expect("score");
                scored[0].logprobs.clone()
            };
            assert_eq!(reference.len(), f.logprobs.len());
            for (x, y) in f.logprobs.iter().zip(&reference) {
                assert!(
                    f64::from((x - y).abs()) <= logprob_tolerance,
                    "{dtype}: logprob {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let model = tiny(3);
    let eos = [1u32];
    for greedy in [true, false] {
        let requests: Vec<GenerateRequest> = prompts()
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| GenerateRequest {
                prompt,
                params: if greedy {
                    SamplingParams::greedy(12 + i)
                } else {
                    sampled(100 + i as u64, 12 + i)
                },
            })
            .collect();
        let batched = cairn::model::generate::generate(&model, &eos, &requests).expect("batched");
        for (r, b) in requests.iter().zip(&batched) {
            let alone = cairn::model::generate::generate(&model, &eos, std::slice::from_ref(r))
                .expect("alone");
            assert_eq!(alone[0].tokens, b.tokens, "greedy={greedy}");
            for (x, y) in alone[0].logprobs.iter().zip(&b.logprobs) {
                assert!((x - y).abs() < 1e-4);
            }
        }
        // Different lengths: the early finishers left the batch and the others went on.
        let lens: Vec<usize> = batched.iter().map(|g| g.tokens.len()).collect();
        assert!(
            lens.iter().any(|&l| l != lens[0]) || lens.iter().all(|&l| l == 12),
            "{lens:?}"
        );
    }
}

#[test]
fn seeded_sampling_does_not_depend_on_batch_composition() {
    let model = tiny(4);
    let target = GenerateRequest {
        prompt: vec![10, 20, 30],
        params: sampled(77, 16),
    };
    let alone = cairn::model::generate::generate(&model, &[], std::slice::from_ref(&target))
        .expect("alone");
    let others: Vec<GenerateRequest> = prompts()
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| GenerateRequest {
            prompt,
            params: sampled(i as u64, 5 + 3 * i),
        })
        .collect();
    for position in 0..=others.len() {
        let mut batch = others.clone();
        batch.insert(position, target.clone());
        let out = cairn::model::generate::generate(&model, &[], &batch).expect("batch");
        assert_eq!(
            out[position].tokens, alone[0].tokens,
            "target at position {position}"
        );
    }
    let reseeded = GenerateRequest {
        params: sampled(78, 16),
        ..target
    };
    let other = cairn::model::generate::generate(&model, &[], &[reseeded]).expect("other seed");
    assert_ne!(other[0].tokens, alone[0].tokens, "the seed must matter");
}

#[test]
fn batched_scoring_equals_one_at_a_time_and_full_forward() {
    let model = tiny(5);
    let requests = vec![
        ScoreRequest {
            context: vec![1, 2, 3],
            continuation: vec![4, 5],
        },
        ScoreRequest {
            context: vec![9],
            continuation: vec![8, 7, 6, 5, 4],
        },
        ScoreRequest {
            context: vec![33, 34, 35, 36, 37, 38],
            continuation: vec![],
        },
    ];
    let batched = cairn::model::generate::score(&model, &requests).expect("batched");
    for (r, b) in requests.iter().zip(&batched) {
        let alone = cairn::model::generate::score(&model, std::slice::from_ref(r)).expect("alone");
        assert_eq!(alone[0].logprobs.len(), r.continuation.len());
        for (x, y) in alone[0].logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4);
        }
        // Against a log-softmax of a plain forward pass.
        let all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
        let lp = full_logits(&model, &all).log_softmax(-1, Kind::Float);
        for (j, &t) in r.continuation.iter().enumerate() {
            let expected = lp.double_value(&[(r.context.len() + j - 1) as i64, t as i64]);
            assert!((expected - b.logprobs[j] as f64).abs() < 1e-4);
        }
        assert!((b.total - b.logprobs.iter().sum::<f32>()).abs() < 1e-5);
    }
}

/// Multiple-choice scoring (context once, choices from its cache) gives the same totals as
/// scoring each choice as its own sequence, for choices of different lengths in one batch.
#[test]
fn choice_scoring_equals_scoring_each_choice() {
    let model = tiny(8);
    let requests = vec![
        cairn::model::ChoiceRequest {
            context: vec![1, 2, 3, 4, 5, 6],
            choices: vec![vec![40, 41, 42], vec![40, 43, 42], vec![7]],
        },
        cairn::model::ChoiceRequest {
            context: vec![9],
            choices: vec![vec![8, 7], vec![6, 5, 4, 3]],
        },
    ];
    let got = cairn::model::generate::score_choices(&model, &requests).expect("choices");
    assert_eq!(got.iter().map(|g| g.len()).collect::<Vec<_>>(), vec![3, 2]);
    for (r, totals) in requests.iter().zip(&got) {
        for (c, total) in r.choices.iter().zip(totals) {
            let alone = cairn::model::generate::score(
                &model,
                &[ScoreRequest {
                    context: r.context.clone(),
                    continuation: c.clone(),
                }],
            )
            .expect("alone");
            assert!(
                (alone[0].total - total).abs() < 1e-3,
                "{c:?}: {} vs {total}",
                alone[0].total
            );
        }
    }
    assert!(
        cairn::model::generate::score_choices(
            &model,
            &[cairn::model::ChoiceRequest {
                context: vec![1],
                choices: vec![vec![]],
            }]
        )
        .is_err(),
        "an empty choice is an error, not a panic"
    );
}

/// Writes the tiny model as a llama.cpp-style GGUF (Q/K rows permuted for adjacent-pair
/// RoPE, F32/F16/Q8_0 tensors, byte-level tokenizer) and loads it back.
#[test]
fn gguf_models_load_with_llama_cpp_row_order_undone() {
    let model = tiny(6);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    common::write_llama_gguf(&model, &path);

    let loaded = load_gguf(&path, Device::Cpu).expect("load gguf");
    let ids = [3u32, 99, 150, 2, 77, 31];
    let diff = max_abs_diff(
        &full_logits(&model, &ids),
        &full_logits(&loaded.model, &ids),
    );
    assert!(diff < 1e-5, "gguf vs original: {diff}");
    assert_eq!(loaded.tokenizer.eos_ids(), &[257]);
    let ids = loaded
        .tokenizer
        .encode("<|im_start|>hi 42")
        .expect("encode");
    assert_eq!(ids[0], 256, "special tokens match whole");
    assert_eq!(loaded.tokenizer.decode(&ids).expect("decode"), "hi 42");

    // A truncated copy is an error naming the file, never a panic.
    let bytes = std::fs::read(&path).expect("read");
    for cut in [10, bytes.len() / 3, bytes.len() - 7] {
        let short = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&short, &bytes[..cut]).expect("write");
        let err = load_gguf(&short, Device::Cpu)
            .err()
            .expect("truncated file is an error");
        assert!(err.to_string().contains(&format!("cut{cut}.gguf")), "{err}");
    }
    // An architecture we do not run.
    let mut other = GgufFile::from_bytes(bytes.clone(), "x")
        .expect("parse")
        .metadata()
        .clone();
    other.insert(
        "general.architecture".into(),
        MetaValue::String("mamba".into()),
    );
    let mut w2 = GgufWriter::new();
    for (k, v) in other {
        w2.add_metadata(k, v);
    }
    let arch = dir.path().join("arch.gguf");
    w2.write(&arch).expect("write");
    let err = load_gguf(&arch, Device::Cpu)
        .err()
        .expect("unsupported architecture");
    assert!(err.to_string().contains("mamba"), "{err}");
}

/// A model loaded from a quantised GGUF and kept as the file's blocks gives the logits and
/// tokens of the same file kept as packed panels, bit for bit, in f32 and bf16; matrices
/// whose rows are not whole blocks stay packed.
#[test]
fn quantised_models_answer_as_the_packed_model_of_the_same_file() {
    let model = tiny(8);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q8.gguf");
    common::write_llama_gguf_as(&model, &path, GgmlType::Q8_0);
    let ids = [3u32, 99, 150, 2, 77, 31, 5, 200];
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let mut packed = cairn::model::load::load_as(&path, Device::Cpu, dtype).expect("load");
        let kept = packed
            .model
            .keep_only_packed_with(|_| Ok(None))
            .expect("packs");
        assert_eq!(kept.quantised, 0);
        let mut quant = cairn::model::load::load_as(&path, Device::Cpu, dtype).expect("load");
        let kept = cairn::model::load::keep_quantised(&mut quant).expect("keeps blocks");
        // Per layer: q/k/v, o and gate/up have 32 inputs (one Q8_0 block); down has 48.
        assert_eq!((kept.quantised, kept.packed), (6, 2), "{kept:?}");
        assert!(quant.model.is_packed_only());
        let (a, b) = (
            full_logits(&packed.model, &ids),
            full_logits(&quant.model, &ids),
        );
        assert!(
            a.equal(&b),
            "{dtype}: logits differ by {}",
            max_abs_diff(&a, &b)
        );
        // And close to the f32 original (Q8_0 rounding only).
        assert!(max_abs_diff(&full_logits(&model, &ids), &b) < 0.1);
        let requests: Vec<GenerateRequest> = (0..3)
            .map(|i| GenerateRequest {
                prompt: ids[..4 + i].to_vec(),
                params: SamplingParams {
                    seed: i as u64,
                    temperature: 0.8,
                    ..SamplingParams::greedy(12)
                },
            })
            .collect();
        let ga = cairn::model::generate::generate(&packed.model, &[], &requests).expect("gen");
        let gb = cairn::model::generate::generate(&quant.model, &[], &requests).expect("gen");
        for (x, y) in ga.iter().zip(&gb) {
            assert_eq!(x.tokens, y.tokens);
            assert_eq!(x.logprobs, y.logprobs);
        }
    }
    // A model directory has no blocks to keep: it is only packed.
    let hf = dir.path().join("hf");
    let original = load_gguf(&path, Device::Cpu).expect("load");
    cairn::model::load::save_dir(&original.model, &original.tokenizer, &hf).expect("save");
    let mut from_dir = cairn::model::load::load_as(&hf, Device::Cpu, Dtype::F32).expect("load");
    let kept = cairn::model::load::keep_quantised(&mut from_dir).expect("packs");
    assert_eq!((kept.quantised, kept.packed), (0, 8));
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let model = tiny(7);
    let too_long = GenerateRequest {
        prompt: vec![1; 250],
        params: SamplingParams::greedy(10),
    };
    let err = cairn::model::generate::generate(&model, &[], &[too_long]).expect_err("context");
    assert!(
        matches!(
            err,
            ModelError::Context {
                needed: 260,
                limit: 256
            }
        ),
        "{err}"
    );
    let bad_id = GenerateRequest {
        prompt: vec![9999],
        params: SamplingParams::greedy(1),
    };
    assert!(matches!(
        cairn::model::generate::generate(&model, &[], &[bad_id]),
        Err(ModelError::InvalidRequest(_))
    ));
    let empty = GenerateRequest {
        prompt: vec![],
        params: SamplingParams::greedy(1),
    };
    assert!(cairn::model::generate::generate(&model, &[], &[empty]).is_err());
    let bad_temp = GenerateRequest {
        prompt: vec![1],
        params: SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy(1)
        },
    };
    assert!(cairn::model::generate::generate(&model, &[], &[bad_temp]).is_err());
    assert!(
        cairn::model::generate::score(
            &model,
            &[ScoreRequest {
                context: vec![],
                continuation: vec![1]
            }]
        )
        .is_err()
    );
    // A directory without a tokenizer.
    let dir = tempfile::tempdir().expect("tempdir");
    model.save_dir(dir.path()).expect("save");
    let err = cairn::model::load(dir.path(), Device::Cpu)
        .err()
        .expect("no tokenizer");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    let err = cairn::model::load(&dir.path().join("nope.gguf"), Device::Cpu)
        .err()
        .expect("missing");
    assert!(err.to_string().contains("nope.gguf"), "{err}");
}

#[test]
fn the_worker_batches_concurrent_jobs_and_wakes_callers() {
    let factory = |seed: u64| -> cairn::worker::ModelFactory {
        Box::new(move |device| {
            Ok(ServedModel::llama(
                Llama::random(LlamaConfig::tiny(VOCAB), seed, device)?,
                vec![],
            ))
        })
    };
    let worker = ModelWorker::spawn(
        vec![("policy".into(), factory(8)), ("judge".into(), factory(9))],
        WorkerOptions::default(),
    )
    .expect("spawn");
    let reference = tiny(8);
    let handle = worker.handle();
    let woken = Arc::new(AtomicUsize::new(0));
    // Queue many jobs before the worker can drain them, from several threads.
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let h = handle.clone();
            let woken = Arc::clone(&woken);
            std::thread::spawn(move || {
                let req = GenerateRequest {
                    prompt: vec![1 + i as u32, 2, 3],
                    params: sampled(i, 6),
                };
                let wake: cairn::worker::Waker = Arc::new(move || {
                    woken.fetch_add(1, Ordering::SeqCst);
                });
                let rx = h
                    .submit("policy", Job::Generate(vec![req.clone()]), Some(wake))
                    .expect("submit");
                (req, rx.recv().expect("reply"))
            })
        })
        .collect();
    for t in threads {
        let (req, reply) = t.join().expect("thread");
        let Ok(JobOutput::Generated(out)) = reply else {
            panic!("generation failed: {reply:?}")
        };
        let direct = cairn::model::generate::generate(&reference, &[], &[req]).expect("direct");
        assert_eq!(
            out[0].tokens, direct[0].tokens,
            "batched through the worker = direct"
        );
    }
    assert_eq!(woken.load(Ordering::SeqCst), 8, "every job woke its caller");
    // Jobs queued while the worker is busy are merged: a long job first, then seven more.
    let before = handle.stats().expect("stats");
    let slow = handle
        .submit(
            "policy",
            Job::Generate(vec![GenerateRequest {
                prompt: vec![4],
                params: SamplingParams::greedy(240),
            }]),
            None,
        )
        .expect("submit");
    let quick: Vec<_> = (0..7u32)
        .map(|i| {
            let req = GenerateRequest {
                prompt: vec![i + 10],
                params: SamplingParams::greedy(3),
            };
            handle
                .submit("policy", Job::Generate(vec![req]), None)
                .expect("submit")
        })
        .collect();
    assert!(slow.recv().expect("reply").is_ok());
    for q in quick {
        assert!(q.recv().expect("reply").is_ok());
    }
    let after = handle.stats().expect("stats");
    assert_eq!(after.jobs - before.jobs, 8);
    assert!(
        after.batches - before.batches <= 3,
        "queued jobs were not merged: {before:?} -> {after:?}"
    );
    // Scoring on another model, an unknown model, and a bad request among good ones.
    let s = handle
        .score(
            "judge",
            vec![ScoreRequest {
                context: vec![1],
                continuation: vec![2, 3],
            }],
        )
        .expect("score");
    assert_eq!(s[0].logprobs.len(), 2);
    assert!(matches!(
        handle.generate("nobody", vec![]),
        Err(ModelError::InvalidRequest(_))
    ));
    let bad = handle
        .submit(
            "policy",
            Job::Generate(vec![GenerateRequest {
                prompt: vec![9999],
                params: SamplingParams::greedy(2),
            }]),
            None,
        )
        .expect("submit");
    let good = handle
        .submit(
            "policy",
            Job::Generate(vec![GenerateRequest {
                prompt: vec![5],
                params: SamplingParams::greedy(2),
            }]),
            None,
        )
        .expect("submit");
    assert!(bad.recv().expect("reply").is_err());
    assert!(
        good.recv().expect("reply").is_ok(),
        "a bad job must not sink its batch-mates"
    );
}

#[test]
fn sft_steps_through_the_worker_lower_the_loss_and_accumulation_matches_one_batch() {
    use cairn::train::{OptimConfig, SftEval, SftEvalStats, SftExample, SftStep, StepStats};
    let spawn = || {
        ModelWorker::spawn(
            vec![(
                "policy".into(),
                Box::new(|device| {
                    Ok(ServedModel::llama(
                        Llama::random(LlamaConfig::tiny(VOCAB), 11, device)?,
                        vec![],
                    ))
                }) as cairn::worker::ModelFactory,
            )],
            WorkerOptions::default(),
        )
        .expect("spawn")
    };
    let examples: Vec<SftExample> = (0..6u32)
        .map(|i| SftExample {
            context: vec![1, 2 + i],
            target: vec![40 + i, 41 + i, 42 + i],
        })
        .collect();
    let optim = OptimConfig {
        lr: 3e-3,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
    };
    let eval = |h: &cairn::worker::WorkerHandle| match h.call(
        "policy",
        Job::measure(SftEval {
            examples: examples.clone(),
            micro_batch: 4,
        }),
    ) {
        Ok(JobOutput::Measured(r)) => {
            let s = r.get::<SftEvalStats>().expect("an sft eval report");
            assert_eq!(s.tokens, 18);
            s.loss
        }
        other => panic!("eval failed: {other:?}"),
    };
    let worker = spawn();
    let h = worker.handle();
    let before = eval(&h);
    let mut last = f64::INFINITY;
    for step in 1..=20u64 {
        match h.call(
            "policy",
            Job::train(SftStep {
                examples: examples.clone(),
                micro_batch: 2,
                optim: optim.clone(),
            }),
        ) {
            Ok(JobOutput::Trained(r)) => {
                let s = r.get::<StepStats>().expect("an sft step report");
                assert_eq!((s.step, s.tokens), (step, 18));
                assert!(s.loss.is_finite() && s.grad_norm > 0.0);
                last = s.loss;
            }
            other => panic!("train failed: {other:?}"),
        }
    }
    let after = eval(&h);
    assert!(
        after < before * 0.5,
        "loss {before} -> {after} (last step {last})"
    );

    // Accumulating six micro-batches of one equals one batch of six.
    let (a, b) = (spawn(), spawn());
    for (w, micro) in [(&a, 1usize), (&b, 6)] {
        w.handle()
            .call(
                "policy",
                Job::train(SftStep {
                    examples: examples.clone(),
                    micro_batch: micro,
                    optim: optim.clone(),
                }),
            )
            .expect("step");
    }
    let (la, lb) = (eval(&a.handle()), eval(&b.handle()));
    assert!((la - lb).abs() < 1e-4, "accumulated {la} vs whole {lb}");

    // A saved checkpoint reloads with the trained weights.
    let dir = tempfile::tempdir().expect("tempdir");
    match h.call("policy", Job::Save(dir.path().to_path_buf())) {
        Ok(JobOutput::Saved(files)) => assert!(files.iter().all(|f| f.exists())),
        other => panic!("save failed: {other:?}"),
    }
    let reloaded = load_hf_weights(dir.path(), Device::Cpu).expect("reload");
    let loss = cairn::train::sft::sft_eval(&reloaded, &examples, 6)
        .expect("eval")
        .0;
    assert!(
        (loss - after).abs() < 1e-5,
        "reloaded {loss} vs worker {after}"
    );
}

#[test]
fn bf16_weights_track_f32_and_keep_the_runtime_invariants() {
    let f32_model = tiny(6);
    let mut model = tiny(6);
    model.set_dtype(Dtype::Bf16);
    assert_eq!(model.dtype(), Dtype::Bf16);
    let ids: Vec<u32> = vec![7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
    let exact = full_logits(&f32_model, &ids);
    let full = full_logits(&model, &ids);
    assert_eq!(full.kind(), Kind::Float, "logits come back as f32");
    // bfloat16 keeps ~3 significant digits: close to f32, but not equal (the conversion
    // really happened).
    let diff = max_abs_diff(&full, &exact);
    let scale = exact.abs().max().double_value(&[]);
    assert!(
        diff > 0.0,
        "bf16 logits equal f32 ones: nothing was converted"
    );
    assert!(
        diff < 0.05 * scale,
        "bf16 vs f32: {diff} (logit scale {scale})"
    );

    // The KV cache path computes what a full forward pass computes.
    let _g = tch::no_grad_guard();
    let mut cache = KvCache::new(model.config(), 1, 32, Device::Cpu);
    let mut steps = Vec::new();
    for (i, &t) in ids.iter().enumerate() {
        let h = model
            .forward(
                &Tensor::from_slice(&[t as i64]).view([1, 1]),
                &Tensor::from_slice(&[i as i64]).view([1, 1]),
                &Tensor::ones([1, 1], (Kind::Bool, Device::Cpu)),
                Some(&mut cache),
            )
            .expect("step");
        steps.push(model.logits(&h).squeeze_dim(0));
    }
    let diff = max_abs_diff(&Tensor::cat(&steps, 0), &full);
    assert!(diff < 0.02 * scale, "bf16 cached vs full: {diff}");

    // Batching does not change a greedy sequence's tokens.
    let requests: Vec<GenerateRequest> = prompts()
        .into_iter()
        .map(|prompt| GenerateRequest {
            prompt,
            params: SamplingParams::greedy(10),
        })
        .collect();
    let batched = cairn::model::generate::generate(&model, &[], &requests).expect("batched");
    for (r, b) in requests.iter().zip(&batched) {
        let alone =
            cairn::model::generate::generate(&model, &[], std::slice::from_ref(r)).expect("alone");
        assert_eq!(alone[0].tokens, b.tokens);
    }

    // A bf16 model is for inference: training it is refused, not silently degraded.
    let err = cairn::train::Trainer::new(&model, &cairn::train::OptimConfig::default())
        .err()
        .expect("training a bf16 model must fail")
        .to_string();
    assert!(err.contains("bf16"), "{err}");
}

/// A batch whose prompts share a long prefix (few-shot examples): with prefix sharing on,
/// the prefix runs once and its keys and values are copied into every row. Greedy tokens,
/// log-probabilities and choice scores agree with the unshared path, for f32 and bf16
/// weights, on the fused and the plain path; fewer prompt tokens go through the model.
#[test]
fn shared_prefix_prefill_matches_the_unshared_path() {
    let prefix: Vec<u32> = (0..40).map(|i| 10 + (i * 7) % 200).collect();
    let prompts: Vec<Vec<u32>> = [vec![5u32, 6, 7], vec![9], vec![11, 12, 13, 14, 15, 16]]
        .into_iter()
        .map(|own| prefix.iter().copied().chain(own).collect())
        .collect();
    let eos = [1u32];
    for (dtype, fused) in [(Dtype::F32, true), (Dtype::F32, false), (Dtype::Bf16, true)] {
        let mut model = tiny(21);
        model.set_dtype(dtype);
        model.set_fused_kernels(fused);
        let requests: Vec<GenerateRequest> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| GenerateRequest {
                prompt: p.clone(),
                params: if i == 1 {
                    sampled(7, 10)
                } else {
                    SamplingParams::greedy(10)
                },
            })
            .collect();
        let choices: Vec<cairn::model::ChoiceRequest> = prompts
            .iter()
            .map(|p| cairn::model::ChoiceRequest {
                context: p.clone(),
                choices: vec![vec![40, 41], vec![42]],
            })
            .collect();
        let plain = cairn::model::generate::generate(&model, &eos, &requests).expect("plain");
        let plain_choices =
            cairn::model::generate::score_choices(&model, &choices).expect("plain choices");
        let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let unshared_tokens = cairn::model::generate::prefill_tokens(&model, &refs);
        model.set_share_prefix(true);
        assert!(model.shares_prefix());
        let shared = cairn::model::generate::generate(&model, &eos, &requests).expect("shared");
        let shared_choices =
            cairn::model::generate::score_choices(&model, &choices).expect("shared choices");
        let shared_tokens = cairn::model::generate::prefill_tokens(&model, &refs);
        assert_eq!(unshared_tokens, 3 * 40 + 3 + 1 + 6);
        assert_eq!(shared_tokens, 40 + 3 + 1 + 6, "the prefix runs once");
        let tol = if dtype == Dtype::F32 { 1e-4 } else { 5e-2 };
        for (a, b) in plain.iter().zip(&shared) {
            assert_eq!(a.tokens, b.tokens, "{dtype:?} fused={fused}");
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!((x - y).abs() < tol, "{dtype:?} fused={fused}: {x} vs {y}");
            }
        }
        for (a, b) in plain_choices
            .iter()
            .flatten()
            .zip(shared_choices.iter().flatten())
        {
            assert!(
                (a - b).abs() < tol * 10.0,
                "{dtype:?} fused={fused}: {a} vs {b}"
            );
        }
        // One prompt alone, or prompts that share too little, take the unshared path.
        let single = cairn::model::generate::generate(&model, &eos, &requests[..1]).expect("one");
        assert_eq!(single[0].tokens, plain[0].tokens);
        assert_eq!(
            cairn::model::generate::prefill_tokens(&model, &[&[1, 2, 3], &[1, 2, 4]]),
            6
        );
    }
}

/// A model that keeps only packed weights answers and evaluates as before, and a job that
/// would train, save or copy it is refused with its name instead of running on released
/// matrices.
#[test]
fn a_packed_only_model_serves_inference_and_refuses_weight_changes() {
    use cairn::train::{OptimConfig, SftEval, SftEvalStats, SftExample, SftStep};
    let factory = |packed_only: bool| -> cairn::worker::ModelFactory {
        Box::new(move |device| {
            let mut model = Llama::random(LlamaConfig::tiny(VOCAB), 12, device)?;
            if packed_only {
                assert!(model.keep_only_packed()? > 0);
            }
            Ok(ServedModel::llama(model, vec![]))
        })
    };
    let worker = ModelWorker::spawn(
        vec![
            ("full".into(), factory(false)),
            ("packed".into(), factory(true)),
        ],
        WorkerOptions::default(),
    )
    .expect("spawn");
    let h = worker.handle();
    let request = GenerateRequest {
        prompt: vec![1, 5, 9],
        params: sampled(3, 6),
    };
    let answer = |model: &str| match h.call(model, Job::Generate(vec![request.clone()])) {
        Ok(JobOutput::Generated(g)) => g,
        other => panic!("generation failed: {other:?}"),
    };
    assert_eq!(
        answer("full"),
        answer("packed"),
        "same weights, same tokens"
    );
    let examples = vec![SftExample {
        context: vec![1, 2],
        target: vec![3, 4],
    }];
    let eval = |model: &str| match h.call(
        model,
        Job::measure(SftEval {
            examples: examples.clone(),
            micro_batch: 1,
        }),
    ) {
        Ok(JobOutput::Measured(r)) => r.get::<SftEvalStats>().expect("sft eval").loss,
        other => panic!("eval failed: {other:?}"),
    };
    assert_eq!(eval("full"), eval("packed"));
    let refused = |job: Job| match h.call("packed", job) {
        Err(e) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let train = Job::train(SftStep {
        examples: examples.clone(),
        micro_batch: 1,
        optim: OptimConfig {
            lr: 1e-3,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        },
    });
    let e = refused(train);
    assert!(
        e.contains("model `packed` keeps only its packed inference weights"),
        "{e}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(refused(Job::Save(dir.path().to_path_buf())).contains("save job"));
    assert!(refused(Job::CopyFrom("full".into())).contains("copy job"));
    match h.call("full", Job::CopyFrom("packed".into())) {
        Err(e) => assert!(e.to_string().contains("`packed`"), "{e}"),
        other => panic!("copying out of a packed-only model must fail: {other:?}"),
    }
}

/// A shared prefix is computed once per prefix and weights: a later call with the same
/// prefix is served from memory and computes exactly the same answers; a weight change
/// computes it afresh.
#[test]
fn a_shared_prefix_is_reused_across_calls_until_the_weights_change() {
    let mut model = tiny(21);
    model.set_share_prefix(true);
    let prefix: Vec<u32> = (1..=24).collect();
    let batch = |tails: &[&[u32]]| -> Vec<GenerateRequest> {
        tails
            .iter()
            .enumerate()
            .map(|(i, tail)| GenerateRequest {
                prompt: prefix.iter().chain(tail.iter()).copied().collect(),
                params: if i == 0 {
                    SamplingParams::greedy(6)
                } else {
                    sampled(5 + i as u64, 6)
                },
            })
            .collect()
    };
    let first = batch(&[&[40, 41], &[42], &[43, 44, 45]]);
    let answer = |m: &Llama, r: &[GenerateRequest]| {
        cairn::model::generate::generate(m, &[], r).expect("generates")
    };
    let computed = answer(&model, &first);
    assert_eq!(model.prefix_tokens_reused(), 0);
    assert_eq!(
        model.prompt_tokens_prefilled(),
        24 + 6,
        "the prefix once, then each row's own tokens"
    );
    let served = answer(&model, &first);
    assert_eq!(
        model.prefix_tokens_reused(),
        24,
        "the second call reuses the prefix"
    );
    assert_eq!(
        model.prompt_tokens_prefilled(),
        30 + 6,
        "only the own tokens"
    );
    assert_eq!(computed, served, "served from memory, the same bits");
    // Another batch behind the same prefix reuses it too, and matches a fresh model's answer.
    let other = batch(&[&[50], &[51, 52]]);
    let reused = answer(&model, &other);
    assert_eq!(model.prefix_tokens_reused(), 48);
    let mut fresh = tiny(21);
    fresh.set_share_prefix(true);
    assert_eq!(answer(&fresh, &other), reused);
    assert_eq!(fresh.prefix_tokens_reused(), 0);
    assert_eq!(fresh.prompt_tokens_prefilled(), 24 + 3);
    assert_eq!(model.prompt_tokens_prefilled(), 36 + 3);
    let mut unshared = tiny(21);
    unshared.set_share_prefix(false);
    answer(&unshared, &first);
    assert_eq!(
        unshared.prompt_tokens_prefilled(),
        3 * 24 + 6,
        "without sharing every row prefills the prefix"
    );
    // A weight update (what an optimiser step does) invalidates what was kept.
    {
        let _g = tch::no_grad_guard();
        for (_, mut t) in model.var_store().variables() {
            let _ = t.g_add_scalar_(0.01);
        }
    }
    let after = answer(&model, &first);
    assert_eq!(model.prefix_tokens_reused(), 48, "recomputed, not served");
    assert_eq!(model.prompt_tokens_prefilled(), 39 + 30);
    assert_ne!(after, computed, "the update reached the answers");
}

/// Training algorithms are an open set: one defined here, outside the crate, runs through
/// the worker like the built-in ones — its own optimiser slot, its own report type, saved
/// and restored by name with the training state — with no change to `worker/` or `train/`.
#[test]
fn a_training_algorithm_from_outside_the_crate_runs_saves_and_resumes_through_the_worker() {
    use cairn::model::generate::score_tensors;
    use cairn::train::{Algorithm, OptimConfig, Report, Trainer};

    /// Unlikelihood: lowers the log-probability of the given continuations.
    #[derive(Debug)]
    struct Unlikelihood(Vec<ScoreRequest>);
    #[derive(Clone, Debug, PartialEq)]
    struct UnlikelihoodStats {
        logprob: f64,
        step: u64,
    }
    impl Algorithm for Unlikelihood {
        fn kind_name(&self) -> &'static str {
            "unlikelihood step"
        }
        fn optimiser(&self) -> &'static str {
            "unlikelihood"
        }
        fn optim(&self) -> OptimConfig {
            OptimConfig {
                lr: 3e-3,
                weight_decay: 0.0,
                max_grad_norm: 1.0,
            }
        }
        fn sequences(&self) -> usize {
            self.0.len()
        }
        fn step(&self, model: &Llama, trainer: &mut Trainer) -> Result<Report, ModelError> {
            let config = self.optim();
            trainer.begin_step(&config);
            let (logprobs, _) = score_tensors(model, &self.0)?;
            let total = logprobs.sum(tch::Kind::Float);
            let logprob = total.double_value(&[]);
            total.backward();
            trainer.finish_step(&config);
            Ok(Report::new(UnlikelihoodStats {
                logprob,
                step: trainer.steps(),
            }))
        }
        fn stand_in(&self) -> Report {
            Report::new(UnlikelihoodStats {
                logprob: 0.0,
                step: 0,
            })
        }
    }

    let spawn = || {
        ModelWorker::spawn(
            vec![(
                "policy".into(),
                Box::new(|device| {
                    Ok(ServedModel::llama(
                        Llama::random(LlamaConfig::tiny(VOCAB), 13, device)?,
                        vec![],
                    ))
                }) as cairn::worker::ModelFactory,
            )],
            WorkerOptions::default(),
        )
        .expect("spawn")
    };
    let requests = vec![ScoreRequest {
        context: vec![1, 2, 3],
        continuation: vec![7, 8],
    }];
    let step = |h: &cairn::worker::WorkerHandle| match h
        .call("policy", Job::train(Unlikelihood(requests.clone())))
    {
        Ok(JobOutput::Trained(r)) => r
            .take::<UnlikelihoodStats>()
            .expect("the algorithm's own report type"),
        other => panic!("custom step failed: {other:?}"),
    };
    let worker = spawn();
    let h = worker.handle();
    let first = step(&h);
    let second = step(&h);
    let third = step(&h);
    assert_eq!((first.step, second.step, third.step), (1, 2, 3));
    assert!(
        third.logprob < first.logprob,
        "unlikelihood lowers the log-probability: {} -> {}",
        first.logprob,
        third.logprob
    );

    // Its optimiser slot is saved under its own name and restored with its step count.
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    h.call("policy", Job::SaveState(state.clone()))
        .expect("save state");
    let resumed = spawn();
    let r = resumed.handle();
    r.call("policy", Job::LoadState(state)).expect("load state");
    let fourth_resumed = step(&r);
    let fourth = step(&h);
    assert_eq!(
        fourth_resumed, fourth,
        "a restored state steps exactly as the original"
    );
    assert_eq!(fourth.step, 4);
}

/// Each request generated on its own, in a call of one.
fn each_alone(
    model: &Llama,
    eos: &[u32],
    requests: &[GenerateRequest],
) -> Vec<cairn::model::Generation> {
    requests
        .iter()
        .map(|r| {
            cairn::model::generate::generate(model, eos, std::slice::from_ref(r))
                .expect("alone")
                .remove(0)
        })
        .collect()
}

/// Continuous batching (`decode_rows`): a call with more requests than rows starts the first
/// ones and lets each waiting request join as a running one finishes. Every request gets
/// the tokens it gets alone (its generator is its own) with log-probabilities within
/// rounding, on the fused and the plain path, with and without a shared prefix; the same
/// call twice gives the same bits. The requests are built so that later ones have longer
/// prompts than the running rows' columns (the cache grows on the left), some finish at
/// once, and one asks for nothing.
#[test]
fn continuous_batching_gives_each_request_what_it_gets_alone() {
    let eos = [1u32];
    let lengths = [2usize, 9, 1, 17, 4, 25, 3, 12];
    let budgets = [6usize, 1, 14, 9, 0, 20, 11, 5];
    for (shared, fused) in [(false, true), (false, false), (true, true), (true, false)] {
        let prefix: Vec<u32> = if shared {
            (0..24).map(|i| 30 + (i * 11) % 180).collect()
        } else {
            Vec::new()
        };
        let requests: Vec<GenerateRequest> = lengths
            .iter()
            .zip(budgets)
            .enumerate()
            .map(|(i, (&len, budget))| GenerateRequest {
                prompt: prefix
                    .iter()
                    .copied()
                    .chain((0..len).map(|j| (7 + 13 * i + 5 * j) as u32 % 240 + 2))
                    .collect(),
                params: if i % 3 == 0 {
                    SamplingParams::greedy(budget)
                } else {
                    sampled(300 + i as u64, budget)
                },
            })
            .collect();
        let mut model = tiny(23);
        model.set_fused_kernels(fused);
        model.set_share_prefix(shared);
        let alone = each_alone(&model, &eos, &requests);
        for rows in [1usize, 2, 3, 5] {
            model.set_decode_rows(Some(rows));
            let reused_before = model.prefix_tokens_reused();
            let out = cairn::model::generate::generate(&model, &eos, &requests).expect("rows");
            let what = format!("rows={rows} shared={shared} fused={fused}");
            assert_eq!(out.len(), requests.len(), "{what}");
            for (i, (a, b)) in alone.iter().zip(&out).enumerate() {
                assert_eq!(a.tokens, b.tokens, "{what}: request {i}");
                assert_eq!(a.finish, b.finish, "{what}: request {i}");
                for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                    assert!((x - y).abs() < 1e-4, "{what}: request {i}: {x} vs {y}");
                }
            }
            assert!(
                out[4].tokens.is_empty(),
                "{what}: a zero budget gives nothing"
            );
            let again = cairn::model::generate::generate(&model, &eos, &requests).expect("again");
            assert_eq!(out, again, "{what}: the same call gives the same bits");
            if shared && rows < requests.len() {
                // Later cohorts, even of one request, are served the call's prefix.
                assert!(
                    model.prefix_tokens_reused() > reused_before,
                    "{what}: the prefix is reused by joining requests"
                );
            }
        }
        model.set_decode_rows(None);
        let all = cairn::model::generate::generate(&model, &eos, &requests).expect("all");
        for (a, b) in alone.iter().zip(&all) {
            assert_eq!(a.tokens, b.tokens);
        }
    }
}

/// On the CPU's fused path a row's results do not depend on what it is batched with: the
/// same request gives the same tokens and the same log-probability bits alone, left-padded
/// beside longer and shorter prompts, with its few-shot prefix computed once for the batch
/// (prefix sharing), and joining a running batch (continuous batching). Checked for f32 and
/// bf16 weights and for head sizes 8, 64 and 128 with one to six query heads per kv head,
/// which take each of the attention kernel's code paths.
#[test]
fn fused_rows_are_bit_identical_whatever_shares_their_batch() {
    let eos = [1u32];
    let prefix: Vec<u32> = (0..21).map(|i| 30 + (i * 11) % 180).collect();
    let owns = [3usize, 1, 9, 5, 14, 2];
    let requests: Vec<GenerateRequest> = owns
        .iter()
        .enumerate()
        .map(|(i, &own)| GenerateRequest {
            prompt: prefix
                .iter()
                .copied()
                .chain((0..own).map(|j| (11 + 17 * i + 3 * j) as u32 % 240 + 2))
                .collect(),
            params: if i % 2 == 0 {
                SamplingParams::greedy(7 + i)
            } else {
                sampled(40 + i as u64, 9)
            },
        })
        .collect();
    // (hidden, query heads, kv heads): head sizes 8, 64, 64, 128, 128; groups 2, 2, 3, 2, 6.
    for (hidden, heads, kv) in [
        (32, 4, 2),
        (128, 2, 1),
        (192, 3, 1),
        (256, 2, 1),
        (768, 6, 1),
    ] {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let config = LlamaConfig {
                hidden_size: hidden,
                num_attention_heads: heads,
                num_key_value_heads: kv,
                intermediate_size: 64,
                ..LlamaConfig::tiny(VOCAB)
            };
            let mut model = Llama::random(config, 31, Device::Cpu).expect("random model");
            model.set_dtype(dtype);
            assert!(model.fused_kernels());
            let alone = each_alone(&model, &eos, &requests);
            for (share, rows) in [
                (false, None),
                (true, None),
                (false, Some(2)),
                (true, Some(4)),
            ] {
                model.set_share_prefix(share);
                model.set_decode_rows(rows);
                let out = cairn::model::generate::generate(&model, &eos, &requests).expect("batch");
                for (i, (a, b)) in alone.iter().zip(&out).enumerate() {
                    let bits = |g: &cairn::model::Generation| -> Vec<u32> {
                        g.logprobs.iter().map(|x| x.to_bits()).collect()
                    };
                    assert_eq!(
                        (&a.tokens, bits(a)),
                        (&b.tokens, bits(b)),
                        "hidden {hidden}, heads {heads}/{kv}, {dtype:?}, share {share}, \
                         rows {rows:?}: request {i}"
                    );
                }
            }
        }
    }
}

/// A model with a row limit streams across jobs: a job queued behind a running one joins it
/// as soon as a row frees up, and is answered when its own requests finish, before the
/// longer job that started first. Every output is the same bits as generating the request
/// alone. A bad job is refused alone, and a job for another model waits its turn.
#[test]
fn queued_generation_jobs_join_a_running_batch_and_answer_when_done() {
    let eos = [1u32];
    let factory = |rows: Option<usize>| -> cairn::worker::ModelFactory {
        Box::new(move |device| {
            // Loading slowly lets every job below queue before the worker takes the first.
            std::thread::sleep(std::time::Duration::from_millis(300));
            let mut model = Llama::random(LlamaConfig::tiny(VOCAB), 41, device)?;
            model.set_decode_rows(rows);
            Ok(ServedModel::llama(model, vec![1]))
        })
    };
    let worker = ModelWorker::spawn(
        vec![
            ("policy".into(), factory(Some(2))),
            ("other".into(), factory(None)),
        ],
        WorkerOptions {
            merge: false,
            ..WorkerOptions::default()
        },
    )
    .expect("spawn");
    let handle = worker.handle();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let request = |prompt: Vec<u32>, new: usize| GenerateRequest {
        prompt,
        params: SamplingParams {
            stop: vec![],
            ..sampled(new as u64 + 90, new)
        },
    };
    // `long` holds a row for 60 tokens and its partner for 3; `quick` (2 tokens) queues
    // behind it, then a bad job, a job for another model, and a last one.
    let jobs: Vec<(&str, &str, Vec<GenerateRequest>)> = vec![
        (
            "long",
            "policy",
            vec![request(vec![5, 6, 7], 60), request(vec![8], 3)],
        ),
        ("quick", "policy", vec![request(vec![9, 10], 2)]),
        ("bad", "policy", vec![request(vec![], 4)]),
        ("other", "other", vec![request(vec![11], 4)]),
        (
            "last",
            "policy",
            vec![request(vec![12, 13, 14], 5), request(vec![15], 7)],
        ),
    ];
    let receivers: Vec<_> = jobs
        .iter()
        .map(|(label, model, requests)| {
            let order = Arc::clone(&order);
            let label = label.to_string();
            let wake: cairn::worker::Waker = Arc::new(move || {
                order.lock().expect("order").push(label.clone());
            });
            handle
                .submit(model, Job::Generate(requests.clone()), Some(wake))
                .expect("submit")
        })
        .collect();
    let reference = Llama::random(LlamaConfig::tiny(VOCAB), 41, Device::Cpu).expect("model");
    for ((label, _, requests), rx) in jobs.iter().zip(receivers) {
        let reply = rx.recv().expect("reply");
        if *label == "bad" {
            let err = reply.expect_err("an empty prompt is refused");
            assert!(err.to_string().contains("empty prompt"), "{err}");
            continue;
        }
        let Ok(JobOutput::Generated(out)) = reply else {
            panic!("{label}: {reply:?}")
        };
        assert_eq!(out.len(), requests.len(), "{label}");
        for (alone, g) in each_alone(&reference, &eos, requests).iter().zip(&out) {
            let bits = |g: &cairn::model::Generation| -> Vec<u32> {
                g.logprobs.iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(
                (&alone.tokens, bits(alone)),
                (&g.tokens, bits(g)),
                "{label}"
            );
        }
    }
    let order = order.lock().expect("order").clone();
    let at = |label: &str| order.iter().position(|l| l == label).expect(label);
    assert_eq!(order.len(), jobs.len(), "{order:?}");
    assert!(
        at("quick") < at("long"),
        "the queued job finished first: {order:?}"
    );
    assert!(
        at("long") < at("other"),
        "another model's job waits for the stream: {order:?}"
    );
    assert!(
        at("other") < at("last"),
        "jobs behind it keep their turn: {order:?}"
    );
}
