#!/usr/bin/env python3
"""Reference peer: Hugging Face transformers `generate` on CPU, f32 (or bf16) weights.

What it measures (SmolLM2-135M-Instruct by default, loaded from the same GGUF file cairn
uses; transformers dequantises the Q4_1 tensors to f32 on load):

* decode throughput, for each batch size B in --batch: B identical copies of a fixed
  ChatML prompt (~40 tokens, left padded) run through
  `generate(max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True)`.
  `decode_tok_s[B]` = B*N / wall time of the whole `generate` call (the prompt's prefill is
  included, as in an end-to-end request). `decode_only_tok_s[B]` = B*(N-1) / time from the
  first sampled token to the end (prefill excluded). One untimed warm-up per batch size
  (--warmup-tokens new tokens), then the median of --repeats timed runs; a batch size
  whose first timed run takes longer than --slow-run-s seconds is not repeated
  (`decode_runs` says how many runs each median is over).
* prefill throughput: one forward pass (KV cache built, logits only for the last
  position, as `generate` does) over a batch of --prefill-batch sequences of
  --prefill-len fixed pseudo-random token ids; tokens/s = batch*len / wall time, median
  of --repeats after a warm-up.

--dtype bfloat16 loads the weights as bf16 instead (the whole model then runs in bf16, as
transformers does for `dtype=torch.bfloat16`): the peer for cairn's `--dtype bf16`.

Threads: torch.set_num_threads(--threads), default 2 (the machine's size).

Prints one JSON object on stdout; progress and library noise go to stderr.

Run (after benches/peers/setup.sh):
    ~/.cache/cairn/venv-peers/bin/python benches/peers/hf_generate.py
    ~/.cache/cairn/venv-peers/bin/python benches/peers/hf_generate.py \
        --batch 1,8 --new-tokens 32 --repeats 1          # quick check
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

DEFAULT_MODEL = (
    Path(os.environ.get("CAIRN_HOME", Path.home() / ".cache" / "cairn"))
    / "models"
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
USER_PROMPT = "Write a short story about a lighthouse keeper."


def log(msg):
    print(f"hf_generate: {msg}", file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file")
    ap.add_argument("--batch", default="1,8,32,64", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup-tokens", type=int, default=16,
                    help="new tokens in the untimed warm-up run per batch size")
    ap.add_argument("--slow-run-s", type=float, default=60.0,
                    help="do not repeat a batch size whose first timed run took longer")
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill measurement")
    ap.add_argument("--prompt", default=USER_PROMPT, help="user message of the chat prompt")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights dtype after dequantisation")
    a = ap.parse_args()
    a.batches = [int(b) for b in a.batch.split(",") if b.strip()]
    if not a.batches or min(a.batches) < 1 or a.new_tokens < 2 or a.repeats < 1:
        ap.error("need batch sizes >= 1, --new-tokens >= 2, --repeats >= 1")
    return a


def main():
    a = parse_args()
    load_avg = [round(x, 2) for x in os.getloadavg()]  # a busy machine skews every number
    # Pin every thread pool before torch is imported.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import torch
    import transformers
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    model_path = a.model.expanduser().resolve()
    if not model_path.is_file():
        sys.exit(f"hf_generate: model not found: {model_path} (run scripts/setup)")

    log(f"loading {model_path.name} (dequantising to {a.dtype})")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=getattr(torch, a.dtype)
    )
    model.eval()
    load_s = time.perf_counter() - t0
    log(f"loaded in {load_s:.1f}s: {model.config.num_hidden_layers} layers, "
        f"hidden {model.config.hidden_size}, vocab {model.config.vocab_size}, "
        f"dtype {next(model.parameters()).dtype}")

    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    messages = [{"role": "user", "content": a.prompt}]
    if tok.chat_template:
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # SmolLM2's ChatML, written out
        prompt = f"<|im_start|>user\n{a.prompt}<|im_end|>\n<|im_start|>assistant\n"
    prompt_tokens = len(tok(prompt)["input_ids"])
    log(f"prompt: {prompt_tokens} tokens")

    gen_cfg = dict(do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id,
                   temperature=None, top_p=None, top_k=None)

    class FirstTokenClock(LogitsProcessor):
        """Records when the first sampling step happens, i.e. when the prefill ends."""

        def __init__(self):
            self.t_first = None

        def __call__(self, input_ids, scores):
            if self.t_first is None:
                self.t_first = time.perf_counter()
            return scores

    def run_generate(batch, n_new):
        enc = tok([prompt] * batch, return_tensors="pt", padding=True)
        clock = FirstTokenClock()
        t_start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new,
                                 logits_processor=[clock], **gen_cfg)
        t_end = time.perf_counter()
        got = out.shape[1] - enc["input_ids"].shape[1]
        if got != n_new or out.shape[0] != batch:
            raise RuntimeError(f"generate returned {tuple(out.shape)}, wanted {n_new} new tokens")
        return t_end - t_start, t_end - clock.t_first, out

    decode, decode_only, runs = {}, {}, {}
    sample_text = None
    for b in a.batches:
        log(f"decode B={b}: warm-up ({a.warmup_tokens} tokens)")
        run_generate(b, max(2, a.warmup_tokens))
        walls, tails = [], []
        for r in range(a.repeats):
            wall, tail, out = run_generate(b, a.new_tokens)
            walls.append(wall)
            tails.append(tail)
            log(f"decode B={b} run {r + 1}: {wall:.2f}s, {b * a.new_tokens / wall:.1f} tok/s")
            if sample_text is None:
                sample_text = tok.decode(out[0, -a.new_tokens:], skip_special_tokens=True)
            if wall > a.slow_run_s:
                break
        decode[str(b)] = round(b * a.new_tokens / statistics.median(walls), 2)
        decode_only[str(b)] = round(b * (a.new_tokens - 1) / statistics.median(tails), 2)
        runs[str(b)] = len(walls)

    result = {
        "peer": "transformers",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "numpy": np.__version__,
        },
        "model": model_path.name,
        "weights_dtype": a.dtype,
        "threads": torch.get_num_threads(),
        "new_tokens": a.new_tokens,
        "prompt_tokens": prompt_tokens,
        "decode_tok_s": decode,
        "decode_only_tok_s": decode_only,
        "decode_runs": runs,
    }

    if not a.no_prefill:
        shape = [a.prefill_batch, a.prefill_len]
        rng = np.random.default_rng(0)
        ids = torch.from_numpy(
            rng.integers(1000, min(model.config.vocab_size, 40000), size=shape, dtype=np.int64)
        )
        mask = torch.ones_like(ids)

        def prefill():
            t_start = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t_start

        log(f"prefill {shape}: warm-up")
        prefill()
        walls = []
        for r in range(a.repeats):
            walls.append(prefill())
            log(f"prefill run {r + 1}: {walls[-1]:.2f}s")
        result["prefill_tok_s"] = round(shape[0] * shape[1] / statistics.median(walls), 2)
        result["prefill_shape"] = shape

    result["sample_completion"] = sample_text
    result["load_s"] = round(load_s, 2)
    result["loadavg_at_start"] = load_avg
    print(json.dumps(result))


def _dist_version(name):
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
