"""What the Python host costs per decode step: the session's feed([token]) (step inputs, handing them to
the program, reading the logits, the schedule's bookkeeping) plus the greedy argmax, minus the
program's own call (ExecuTorch's method.execute, ONNX Runtime's run_with_iobinding), timed around
that call inside the same step. Medians over --rounds generations of --new-tokens steps after a
--prompt-tokens prompt.

Usage: python bench/host_overhead.py BUNDLE [--backend executorch] [--threads 2] [--rounds 6] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import prompt_ids, write_json

from pocketlm.runtime.generate import Generator


class TimedCall:
    """Wraps the object whose method runs the program; records each call's seconds."""

    def __init__(self, target, method: str, seconds: list):
        self.target, self.method, self.seconds = target, method, seconds

    def __getattr__(self, name):
        fn = getattr(self.target, name)
        if name != self.method:
            return fn

        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.seconds.append(time.perf_counter() - t0)
            return out

        return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--backend", default="executorch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    gen = Generator(args.bundle, args.backend, args.threads)
    backend, session, program = gen.backend, gen.session, []
    if args.backend == "executorch":
        backend.methods[1] = TimedCall(backend.methods[1], "execute", program)
    else:
        backend.session = TimedCall(backend.session, "run_with_iobinding", program)
    prompt = prompt_ids(gen.tokenizer, args.prompt_tokens)
    host, step = [], []
    for _ in range(args.rounds):
        session.reset()
        logits = session.feed(prompt)
        program.clear()
        for _ in range(args.new_tokens):
            t0 = time.perf_counter()
            logits = session.feed([int(np.argmax(logits))])
            step.append(time.perf_counter() - t0)
        host += [s - p for s, p in zip(step[-args.new_tokens:], program)]
    row = {"bundle": args.bundle, "backend": args.backend, "threads": args.threads, "prompt_tokens": len(prompt),
           "new_tokens": args.new_tokens, "rounds": args.rounds,
           "host_us_median": 1e6 * statistics.median(host), "step_us_median": 1e6 * statistics.median(step)}
    row["host_share"] = row["host_us_median"] / row["step_us_median"]
    print({k: row[k] for k in ("backend", "host_us_median", "step_us_median", "host_share")})
    write_json(args.name or f"host_overhead_{args.backend}", row, args.out)


if __name__ == "__main__":
    main()
