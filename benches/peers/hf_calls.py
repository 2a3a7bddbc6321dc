#!/usr/bin/env python3
"""Reference peer for `cairn bench pipeline`: transformers replays a stage's generation calls.

Input (--calls FILE): {"calls": [[request, ...], ...]}, one list per model call as the
stage made it, each request {"prompt": [token ids], "temperature", "top_p", "top_k",
"max_new_tokens", "seed", "stop": [token ids that end the row]}. Each call runs as one
left-padded batch through `generate` with the same sampling settings (do_sample when the
temperature is above 0; top_k 0 means no limit), stopping a row at its stop tokens, as the
stage does. transformers draws from one generator per batch, not one per row, so the
tokens differ from cairn's; the lengths are what the settings give.

Per call: wall time, prefill time (until the first sampling step) and new tokens (each row
up to and including its stop token). Totals: `decode_tok_s` = new tokens / time outside
the prefills, `end_to_end_tok_s` = new tokens / wall time. One untimed warm-up call first.
Threads: --threads (default 2). Prints one JSON object on stdout.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


def log(msg):
    print(f"hf_calls: {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="GGUF file")
    ap.add_argument("--calls", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessor

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    calls = json.loads(a.calls.read_text())["calls"]
    path = a.model.expanduser().resolve()
    log(f"loading {path.name} as {a.dtype}")
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, a.dtype)
    )
    model.eval()
    pad = 0

    class FirstTokenClock(LogitsProcessor):
        def __init__(self):
            self.t_first = None

        def __call__(self, input_ids, scores):
            if self.t_first is None:
                self.t_first = time.perf_counter()
            return scores

    def run(call):
        longest = max(len(r["prompt"]) for r in call)
        ids = torch.tensor([[pad] * (longest - len(r["prompt"])) + r["prompt"] for r in call])
        mask = torch.tensor([[0] * (longest - len(r["prompt"])) + [1] * len(r["prompt"])
                             for r in call])
        r0 = call[0]
        stop = sorted({t for r in call for t in r["stop"]})
        sample = r0["temperature"] > 0
        cfg = dict(max_new_tokens=max(r["max_new_tokens"] for r in call), use_cache=True,
                   pad_token_id=pad, eos_token_id=stop or None, do_sample=sample)
        if sample:
            cfg.update(temperature=r0["temperature"], top_p=r0["top_p"],
                       top_k=r0["top_k"] if r0["top_k"] > 0 else None)
        else:
            cfg.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(r0["seed"] & 0x7FFFFFFF)
        clock = FirstTokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=[clock],
                                 **cfg)
        wall = time.perf_counter() - t0
        new = 0
        for row, r in zip(out[:, longest:].tolist(), call):
            n = 0
            for t in row[: r["max_new_tokens"]]:
                n += 1
                if t in r["stop"]:
                    break
            new += n
        return wall, (clock.t_first or t0 + wall) - t0, new

    log(f"{len(calls)} calls; warm-up")
    run([dict(calls[0][0], max_new_tokens=4)])
    per_call = []
    for i, call in enumerate(calls):
        wall, prefill, new = run(call)
        per_call.append({"rows": len(call), "seconds": wall, "prefill_seconds": prefill,
                         "new_tokens": new})
        log(f"call {i + 1}/{len(calls)}: {len(call)} rows, {new} tokens, {wall:.1f}s")
    secs = sum(c["seconds"] for c in per_call)
    pre = sum(c["prefill_seconds"] for c in per_call)
    new = sum(c["new_tokens"] for c in per_call)
    print(json.dumps({
        "peer": "transformers", "transformers": transformers.__version__,
        "torch": torch.__version__, "weights_dtype": a.dtype, "threads": a.threads,
        "calls": len(per_call), "new_tokens": new, "seconds": secs, "prefill_seconds": pre,
        "decode_tok_s": new / max(secs - pre, 1e-9), "end_to_end_tok_s": new / max(secs, 1e-9),
        "per_call": per_call,
    }))


if __name__ == "__main__":
    main()
