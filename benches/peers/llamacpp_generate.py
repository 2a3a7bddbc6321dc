#!/usr/bin/env python3
"""Reference peer: llama.cpp at batch 1 on the same GGUF file (Q4_1 weights as stored).

llama.cpp comes from the `xllamacpp` wheel on PyPI (prebuilt llama.cpp, CPU build for
x86_64 with AVX2/FMA/F16C, no AVX-512; no compiler needed). The model runs in process
through llama.cpp's own server engine (one slot, no HTTP client involved; the engine
does open a listener on 127.0.0.1 that nothing uses).

What it measures, with --threads (default 2) for both prompt processing and generation:

* decode throughput at batch 1: the fixed chat prompt (same text as hf_generate.py),
  greedy (temperature 0), exactly --new-tokens tokens (EOS ignored), prompt cache off.
  `decode_tok_s["1"]` = N / wall time of the whole request (prompt prefill included, the
  same definition as hf_generate.py). `decode_only_tok_s["1"]` is llama.cpp's own
  token-generation rate from its timings (prefill excluded, like llama-bench's tg).
  One warm-up request, then the median of --repeats.
* prefill throughput: one sequence of --prefill-len fixed pseudo-random token ids,
  one token generated; llama.cpp's prompt-eval rate (tokens/s), median of --repeats.

Prints one JSON object on stdout; llama.cpp's log goes to stderr.

Run (after benches/peers/setup.sh):
    ~/.cache/cairn/venv-peers/bin/python benches/peers/llamacpp_generate.py
    ~/.cache/cairn/venv-peers/bin/python benches/peers/llamacpp_generate.py \
        --new-tokens 32 --repeats 1                      # quick check
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
    print(f"llamacpp_generate: {msg}", file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill measurement")
    ap.add_argument("--prompt", default=USER_PROMPT, help="user message of the chat prompt")
    a = ap.parse_args()
    if a.new_tokens < 2 or a.repeats < 1 or a.prefill_len < 1:
        ap.error("need --new-tokens >= 2, --repeats >= 1, --prefill-len >= 1")
    return a


def gguf_metadata(path):
    """(vocabulary size, chat template or None) from the GGUF's metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    n_vocab = len(reader.get_field("tokenizer.ggml.tokens").data)
    tmpl = reader.get_field("tokenizer.chat_template")
    return n_vocab, (tmpl.contents() if tmpl is not None else None)


def render_prompt(template, user_prompt):
    """The chat prompt exactly as transformers' apply_chat_template renders it."""
    messages = [{"role": "user", "content": user_prompt}]
    if template:
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages, add_generation_prompt=True)
    return f"<|im_start|>user\n{user_prompt}<|im_end|>\n<|im_start|>assistant\n"


def main():
    a = parse_args()
    load_avg = [round(x, 2) for x in os.getloadavg()]  # a busy machine skews every number
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import numpy as np
    import xllamacpp as xlc

    model_path = a.model.expanduser().resolve()
    if not model_path.is_file():
        sys.exit(f"llamacpp_generate: model not found: {model_path} (run scripts/setup)")

    n_ctx = max(512, a.prefill_len + 8, 64 + a.new_tokens)
    params = xlc.CommonParams()
    params.model.path = str(model_path)
    params.n_ctx = n_ctx
    params.n_batch = max(512, a.prefill_len)
    params.n_ubatch = max(512, a.prefill_len)
    params.n_parallel = 1
    params.n_gpu_layers = 0
    params.cpuparams.n_threads = a.threads
    params.cpuparams_batch.n_threads = a.threads
    params.cache_prompt = False

    log(f"loading {model_path.name}")
    t0 = time.perf_counter()
    server = xlc.Server(params)
    load_s = time.perf_counter() - t0

    # The same prompt text as hf_generate.py: the GGUF's own chat template (for SmolLM2,
    # ChatML with its default system line; ~40 tokens).
    n_vocab, template = gguf_metadata(model_path)
    prompt = render_prompt(template, a.prompt)

    def complete(prompt_value, n_predict):
        req = {
            "prompt": prompt_value,
            "n_predict": n_predict,
            "ignore_eos": True,
            "temperature": 0.0,
            "top_k": 1,
            "cache_prompt": False,
            "seed": 0,
        }
        t_start = time.perf_counter()
        res = server.handle_completions(req)
        wall = time.perf_counter() - t_start
        if not isinstance(res, dict) or "timings" not in res:
            raise RuntimeError(f"llama.cpp request failed: {res!r}"[:500])
        return wall, res

    log("decode: warm-up")
    complete(prompt, 8)
    walls, evals = [], []
    sample_text, prompt_tokens = None, None
    for r in range(a.repeats):
        wall, res = complete(prompt, a.new_tokens)
        t = res["timings"]
        if t["predicted_n"] != a.new_tokens:
            raise RuntimeError(f"generated {t['predicted_n']} tokens, wanted {a.new_tokens}")
        walls.append(wall)
        evals.append(t["predicted_per_second"])
        prompt_tokens = t["prompt_n"]
        if sample_text is None:
            sample_text = res["choices"][0]["text"]
        log(f"decode run {r + 1}: {wall:.2f}s, {a.new_tokens / wall:.1f} tok/s end to end, "
            f"{t['predicted_per_second']:.1f} tok/s eval only")

    result = {
        "peer": "llama.cpp",
        "version": {
            "xllamacpp": xlc.__version__,
            "llama_cpp_build": xlc.BUILD_INFO,
            "system_info": xlc.get_system_info().strip(),
            "python": platform.python_version(),
        },
        "model": model_path.name,
        "weights_dtype": "as stored in the GGUF (Q4_1 for the default model)",
        "threads": a.threads,
        "new_tokens": a.new_tokens,
        "prompt_tokens": prompt_tokens,
        "decode_tok_s": {"1": round(a.new_tokens / statistics.median(walls), 2)},
        "decode_only_tok_s": {"1": round(statistics.median(evals), 2)},
        "decode_runs": {"1": len(walls)},
    }

    if not a.no_prefill:
        rng = np.random.default_rng(0)
        hi = min(n_vocab, 40000)
        ids = [int(i) for i in rng.integers(1000, hi, size=a.prefill_len)]
        log(f"prefill [1, {a.prefill_len}]: warm-up")
        complete(ids, 1)
        rates = []
        for r in range(a.repeats):
            _, res = complete(ids, 1)
            t = res["timings"]
            if t["prompt_n"] != a.prefill_len:
                raise RuntimeError(f"prompt was {t['prompt_n']} tokens, wanted {a.prefill_len}")
            rates.append(t["prompt_per_second"])
            log(f"prefill run {r + 1}: {t['prompt_ms']:.0f} ms, {rates[-1]:.1f} tok/s")
        result["prefill_tok_s"] = round(statistics.median(rates), 2)
        result["prefill_shape"] = [1, a.prefill_len]

    result["sample_completion"] = sample_text
    result["load_s"] = round(load_s, 2)
    result["loadavg_at_start"] = load_avg
    print(json.dumps(result))
    sys.stdout.flush()
    del server


if __name__ == "__main__":
    main()
