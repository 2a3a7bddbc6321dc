#!/usr/bin/env python3
"""Reference peer for `cairn bench pipeline`: llama.cpp replays a stage's generation calls.

Same input as hf_calls.py (--calls FILE). llama.cpp (the `xllamacpp` wheel, in process, one
slot, prompt cache off) runs every request of every call one at a time, on the GGUF file's
own weights (quantised as stored), with the request's temperature, top-p, top-k (0: none),
seed and length, stopping at the model's end-of-turn token as the stage does. Totals from
llama.cpp's own timings: `decode_tok_s` = generated tokens / generation time,
`end_to_end_tok_s` = generated tokens / wall time of all requests. One warm-up request.
Threads: --threads (default 2). Prints one JSON object on stdout.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


def log(msg):
    print(f"llamacpp_calls: {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="GGUF file")
    ap.add_argument("--calls", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import xllamacpp as xlc

    calls = json.loads(a.calls.read_text())["calls"]
    longest = max(len(r["prompt"]) + r["max_new_tokens"] for c in calls for r in c)
    params = xlc.CommonParams()
    params.model.path = str(a.model.expanduser().resolve())
    params.n_ctx = max(512, longest + 8)
    params.n_batch = 512
    params.n_ubatch = 512
    params.n_parallel = 1
    params.n_gpu_layers = 0
    params.cpuparams.n_threads = a.threads
    params.cpuparams_batch.n_threads = a.threads
    params.cache_prompt = False
    server = xlc.Server(params)

    def complete(r, n_predict=None):
        req = {"prompt": r["prompt"], "n_predict": n_predict or r["max_new_tokens"],
               "temperature": r["temperature"], "top_p": r["top_p"],
               "top_k": r["top_k"] if r["top_k"] > 0 else 0, "min_p": 0.0,
               "seed": r["seed"] & 0xFFFFFFFF, "cache_prompt": False}
        t0 = time.perf_counter()
        res = server.handle_completions(req)
        wall = time.perf_counter() - t0
        if not isinstance(res, dict) or "timings" not in res:
            raise RuntimeError(f"llama.cpp request failed: {res!r}"[:500])
        return wall, res["timings"]

    complete(calls[0][0], 4)
    walls = pre = gen = 0.0
    new = 0
    for i, call in enumerate(calls):
        for r in call:
            wall, t = complete(r)
            walls += wall
            pre += t["prompt_ms"] / 1e3
            gen += t["predicted_ms"] / 1e3
            new += t["predicted_n"]
        log(f"call {i + 1}/{len(calls)}: {len(call)} requests")
    print(json.dumps({
        "peer": "llama.cpp", "xllamacpp": xlc.__version__, "threads": a.threads,
        "calls": len(calls), "requests": sum(len(c) for c in calls), "new_tokens": new,
        "seconds": walls, "prefill_seconds": pre, "generation_seconds": gen,
        "decode_tok_s": new / max(gen, 1e-9), "end_to_end_tok_s": new / max(walls, 1e-9),
    }))
    del server


if __name__ == "__main__":
    main()
