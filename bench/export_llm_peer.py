"""Peer benchmark: a .pte from ExecuTorch's own LLM export (executorch.extension.llm.export.export_llm, KV cache,
dynamic shape, XNNPACK), run with ExecuTorch's Python runtime like pocketlm's executorch backend: prefill
of the prompt in one call (chunks of the program's max_seq_len - 1), then greedy decode one token per call.
Same measures as pocketlm.runtime.profile: TTFT (prompt in -> first token chosen), prefill tok/s =
prompt / TTFT, decode tok/s over new_tokens steps, median of `runs` after a warm-up; plus file size and
peak RSS. The .pte is made outside the repo (export_llm is not run here).

Usage:
  python bench/export_llm_peer.py PTE --tokenizer HF_FOLDER_OR_TOKENIZER_JSON [--bundle BUNDLE [--backend onnx] ...]
      [--threads 2] [--prompt-tokens 128] [--new-tokens 128] [--runs 3] [--ppl-tokens 2048] [--made-by SCRIPT] [--name export_llm_peer] [--out FILE]

--bundle (repeatable): pocketlm bundles whose program (ExecuTorch unless --backend, given once for
all bundles or once per bundle, says otherwise) is timed in the same process, in alternating rounds with the peer (round r runs the peer, then each bundle, in an order that reverses
every round), same prompt and token counts; their medians and ratios to the peer are reported. On
a shared machine only such same-process, alternating comparisons are worth a ratio.

--ppl-tokens N also scores the program's perplexity under pocketlm's protocol (the eval split, windows of
512, every token but each window's first), feeding one token per call (its forward returns only the last
position's logits), so its speed can be read next to its accuracy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

# Both programs' attention kernel (llama::custom_sdpa) calls torch's MKL from ExecuTorch's worker threads;
# OpenMP threads there oversubscribe the pool (pocketlm.runtime.backends.executorch), and export_llm's
# one-query-per-head decode suffers most. One OpenMP thread, set before torch loads, for both.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from _common import bundle_backends, peak_rss_bytes, prompt_ids, rss_bytes, write_json

from pocketlm.runtime.profile import file_sizes

from pocketlm.runtime.tokenizer import Tokenizer


class ExportLlmProgram:
    """export_llm's `forward(tokens[1, n] int64, input_pos[1] int64) -> logits[1, vocab]` (last position);
    its KV cache is a mutable buffer in the program, written at input_pos..input_pos+n-1."""

    def __init__(self, path: Path, threads: int):
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime, Verification

        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::custom_sdpa, llama::update_cache)
        import executorch.kernels.quantized  # noqa: F401

        self.torch = torch
        if threads and portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        program = Runtime.get().load_program(path, verification=Verification.Minimal)
        meta = lambda name: int(program.load_method(name).execute([])[0])  # noqa: E731
        self.max_seq_len, self.max_context_len = meta("get_max_seq_len"), meta("get_max_context_len")
        self.chunk = self.max_seq_len - 1 if meta("enable_dynamic_shape") else 1  # token_dim max is max_seq_len - 1
        self.forward = program.load_method("forward")

    def feed(self, tokens: list[int], pos: int):
        """Logits after the last of `tokens`, which land at cache positions pos.. ."""
        torch = self.torch
        for i in range(0, len(tokens), self.chunk):
            part = tokens[i : i + self.chunk]
            logits = self.forward.execute([torch.tensor([part], dtype=torch.long), torch.tensor([pos + i], dtype=torch.long)])[0]
        return logits

    def window_logits(self, ids) -> "np.ndarray":
        """Logits at every position of one window, a fresh conversation from position 0."""
        import numpy as np

        return np.stack([self.feed([int(t)], pos)[0].float().numpy() for pos, t in enumerate(ids)])

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """Greedy: prompt -> first token (TTFT), then new_tokens decode steps. Returns (tokens, ttft_s, decode_s).
        Starting again at position 0 needs no reset: attention only reads positions < input_pos + n."""
        if len(prompt) + new_tokens > self.max_context_len:
            raise SystemExit(f"prompt + new tokens ({len(prompt) + new_tokens}) exceed the program's context {self.max_context_len}")
        t0 = time.perf_counter()
        token = int(self.feed(prompt, 0).argmax(-1))
        ttft = time.perf_counter() - t0
        out, pos = [token], len(prompt)
        for _ in range(new_tokens):
            token = int(self.feed([token], pos).argmax(-1))
            out.append(token)
            pos += 1
        return out, ttft, time.perf_counter() - t0 - ttft


def pocketlm_generator(bundle: str, backend: str, threads: int):
    """A bundle's program in this process, producing exactly the requested tokens (no stop)."""
    from pocketlm.runtime.generate import Generator

    gen = Generator(bundle, backend, threads)
    gen.stop_ids = set()
    gen.generate(gen.tokenizer.encode("Warm up the program."), max_new_tokens=8)
    return gen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pte")
    ap.add_argument("--tokenizer", required=True, help="HF folder with tokenizer.json (the same weights' folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bundle", action="append", default=[], help="a pocketlm bundle to time alongside")
    ap.add_argument("--backend", action="append", default=[], help="its program (default executorch): once, or once per --bundle")
    ap.add_argument("--ppl-tokens", type=int, default=0)
    ap.add_argument("--made-by", default=None, help="the script that made the .pte (its text is recorded in the JSON)")
    ap.add_argument("--name", default="export_llm_peer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    backends = bundle_backends(ap, args.bundle, args.backend, "executorch")

    tokenizer = Tokenizer(args.tokenizer)
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    t0 = time.perf_counter()
    model = ExportLlmProgram(Path(args.pte), args.threads)
    load_s = time.perf_counter() - t0
    model.generate(prompt[:32], 8)  # warm-up
    ours = {(b, be): pocketlm_generator(b, be, args.threads) for b, be in zip(args.bundle, backends)}
    ttft, prefill, decode = [], [], []
    ours_runs = {b: {"ttft": [], "prefill": [], "decode": []} for b in ours}
    for r in range(args.runs):
        order = ["peer", *ours]
        for who in (order if r % 2 == 0 else order[::-1]):
            if who == "peer":
                tokens, t, d = model.generate(prompt, args.new_tokens)
                ttft.append(t)
                prefill.append(len(prompt) / t)
                decode.append(args.new_tokens / d)
            else:
                gen = ours[who]
                gen.reset()
                out = gen.generate(prompt, max_new_tokens=args.new_tokens + 1)
                for k, v in (("ttft", out.ttft_s), ("prefill", out.prefill_tok_s), ("decode", out.decode_tok_s)):
                    ours_runs[who][k].append(v)
    row = {
        "pte": str(args.pte), "made_by": Path(args.made_by).read_text() if args.made_by else None,
        "file_bytes": Path(args.pte).stat().st_size, "threads": args.threads, "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "runs": args.runs,
        "max_seq_len": model.max_seq_len, "max_context_len": model.max_context_len, "prefill_chunk": model.chunk,
        "load_s": load_s, "ttft_ms": 1000 * statistics.median(ttft), "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode), "decode_tok_s_runs": decode,
        "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes(),
        "rss_note": "this process's, with the --bundle programs loaded too" if args.bundle else "this process's",
        "sample": tokenizer.decode(tokens[:32]),
    }
    if args.ppl_tokens:
        import numpy as np

        from pocketlm.runtime import perplexity as ppl_protocol
        from pocketlm.runtime.text import load_text

        ids = np.asarray(tokenizer.encode(load_text(None, "eval")), np.int64)
        row["perplexity"] = ppl_protocol.perplexity(model.window_logits, ids, 512, args.ppl_tokens).to_dict()
    row["pocketlm"] = []
    for (b, backend), runs in ours_runs.items():
        gen = ours[(b, backend)]
        mine = {"bundle": b, "backend": backend, "scheme": gen.bundle.manifest["quantization"]["scheme"],
                "weights": gen.bundle.manifest["programs"][backend].get("weights"),
                "cache": gen.bundle.manifest["cache"], "program_bytes": file_sizes(gen.bundle)["programs"][backend],
                "ttft_ms": 1000 * statistics.median(runs["ttft"]), "prefill_tok_s": statistics.median(runs["prefill"]),
                "decode_tok_s": statistics.median(runs["decode"]), "decode_tok_s_runs": runs["decode"]}
        mine["vs_export_llm"] = {"decode": mine["decode_tok_s"] / row["decode_tok_s"],
                                 "prefill": mine["prefill_tok_s"] / row["prefill_tok_s"]}
        row["pocketlm"].append(mine)
        print("pocketlm", b, backend, {k: mine[k] for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms")}, mine["vs_export_llm"], flush=True)
    print({k: row[k] for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "file_bytes", "peak_rss_bytes")}, flush=True)
    print("sample:", repr(row["sample"]))
    write_json(args.name, row, args.out)


if __name__ == "__main__":
    main()
