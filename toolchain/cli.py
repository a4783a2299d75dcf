"""The `pocketlm` command: a thin skin over the Python API (each subcommand calls one function)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pocketlm.runtime.errors import PocketLMError


def _cmd_run(args) -> int:
    from .pipeline import run
    from .recipe import Recipe, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else Recipe(out="out/pocketlm")
    if args.source:
        recipe.source = args.source
    summary = run(recipe, out=args.out)
    return 0 if summary["passed"] else 1


def _cmd_validate(args) -> int:
    from pocketlm.runtime.validate import checks_table, validate_bundle

    report = validate_bundle(args.bundle, args.backend, args.target, args.text, args.threads)
    print(checks_table(report))
    print(f"validation {'PASSED' if report['passed'] else 'FAILED'}")
    _write_json(Path(args.json) if args.json else Path(args.bundle) / "validation.json", report)
    return 0 if report["passed"] else 1


def _cmd_profile(args) -> int:
    from pocketlm.runtime.profile import profile_bundle

    def show(p):
        print(f"{p['backend']:<10} {p['threads']:>2} threads  load {p['load_s']:.2f} s  TTFT {p['ttft_ms']:.0f} ms "
              f"(first prompt {p['first_ttft_ms']:.0f} ms)  prefill {p['prefill_tok_s']:.1f} tok/s  decode {p['decode_tok_s']:.1f} tok/s  "
              f"peak RSS {p['peak_rss_bytes'] / 1e6:.0f} MB", flush=True)

    result = profile_bundle(args.bundle, args.backend, args.threads, on_result=show,
                            prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs)
    for b, size in result["files"]["programs"].items():
        print(f"{b:<10} program {size / 1e6:.1f} MB")
    _write_json(Path(args.json) if args.json else Path(args.bundle) / "profile.json", result)
    return 0


def _cmd_report(args) -> int:
    from pocketlm.runtime.report import build_report, write_report

    def read(path, name):
        p = Path(path) if path else Path(args.bundle) / name
        if not p.is_file():
            if path:
                raise PocketLMError(f"'{p}' does not exist; write it with `pocketlm {name.split('.')[0]} BUNDLE`")
            return None
        return json.loads(p.read_text())

    validation, profile = read(args.validation, "validation.json"), read(args.profile, "profile.json")
    if validation is None and profile is None:
        raise PocketLMError(f"nothing to report in '{args.bundle}': run `pocketlm validate` and/or `pocketlm profile` on it first")
    _, html = write_report(build_report(args.bundle, validation, profile), args.out or args.bundle)
    print(f"report: {html}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate_perplexity

    result = evaluate_perplexity(args.source, text=args.text, ctx=args.ctx, max_tokens=args.max_tokens)
    report = {"source": str(args.source), "text": str(args.text) if args.text else "default:eval", **result.to_dict()}
    print(f"perplexity {result.ppl:.4f} over {result.tokens} tokens ({result.windows} windows of {result.ctx})")
    if args.json:
        _write_json(Path(args.json), report)
    return 0


def _cmd_quantize(args) -> int:
    from .quantize import quantize_source

    out = quantize_source(args.source, args.out, scheme=args.scheme, group_size=args.group_size,
                          symmetric=not args.asymmetric, head=args.head, calib=args.calib, awq_results=args.awq_results,
                          qat_steps=args.qat_steps, qat_lr=args.qat_lr)
    print(f"quantized model folder written to {out}")
    return 0


def _cmd_export(args) -> int:
    from .export import export_bundle

    out = export_bundle(
        args.source, args.out, tuple(args.backend or ("onnx", "executorch")),
        sink_size=args.sink_size, window_size=args.window_size, chunk=args.chunk, onnx_int4=args.onnx_int4,
    )
    print(f"bundle written to {out}")
    return 0


def _sampling(args):
    from pocketlm.runtime.sampling import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _cmd_generate(args) -> int:
    from pocketlm.runtime.generate import Generator

    gen = Generator(args.bundle, args.backend, args.threads)
    if args.raw:
        ids = gen.tokenizer.encode(args.prompt)
    else:
        ids = gen.chat_ids([{"role": "user", "content": args.prompt}])
    out = gen.generate(ids, args.max_new_tokens, _sampling(args), on_text=lambda t: print(t, end="", flush=True))
    print()
    print(
        f"[{gen.backend.name}] {out.prompt_tokens} prompt tokens, {len(out.tokens)} new; "
        f"time to first token {out.ttft_s * 1000:.0f} ms, decode {out.decode_tok_s:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


def _cmd_chat(args) -> int:
    from pocketlm.runtime.generate import Generator

    gen = Generator(args.bundle, args.backend, args.threads)
    messages: list[dict] = []
    print("pocketlm chat: an empty line or Ctrl-D ends the conversation", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        print("bot> ", end="", flush=True)
        out = gen.chat_turn(messages, max_new_tokens=args.max_new_tokens, sampling=_sampling(args),
                            on_text=lambda t: print(t, end="", flush=True))
        print()
        messages.append({"role": "assistant", "content": out.text})
    return 0


def _add_generation_args(p) -> None:
    p.add_argument("bundle", help="bundle folder written by `pocketlm export`")
    p.add_argument("--backend", choices=["onnx", "executorch"], default=None, help="default: the bundle's first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import DEFAULT_CTX, DEFAULT_MAX_TOKENS

    parser = argparse.ArgumentParser(prog="pocketlm", description="Make a causal LM phone-ready, and prove it still behaves.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job: export -> profile -> validate -> report (default: built-in model)")
    p.add_argument("recipe", nargs="?", default=None, help="recipe TOML (default: the built-in recipe)")
    p.add_argument("--source", default=None, help="override the recipe's source (HF folder, .gguf, pocketlm folder, 'default')")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's, else out/pocketlm)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="parity, perplexity and target budgets of a bundle; non-zero exit on failure")
    p.add_argument("bundle")
    p.add_argument("--backend", action="append", choices=["onnx", "executorch"], help="repeat for several (default: all in the bundle)")
    p.add_argument("--target", default=None, help="target profile name (targets/*.toml) or path")
    p.add_argument("--text", default=None, help="UTF-8 text file for the perplexity check (default: the eval split)")
    p.add_argument("--threads", type=int, default=None, help="default: the target's, else 2")
    p.add_argument("--json", default=None, help="default: BUNDLE/validation.json")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("profile", help="load time, TTFT, prefill/decode tokens/s, peak RSS and sizes per backend and threads")
    p.add_argument("bundle")
    p.add_argument("--backend", action="append", choices=["onnx", "executorch"], help="repeat for several (default: all)")
    p.add_argument("--threads", type=int, action="append", help="repeat for a sweep (default: 1, 2 and 4 where the cores exist)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up; medians are reported")
    p.add_argument("--json", default=None, help="default: BUNDLE/profile.json")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("report", help="report.json + self-contained report.html from validation.json and profile.json")
    p.add_argument("bundle")
    p.add_argument("--validation", default=None, help="default: BUNDLE/validation.json")
    p.add_argument("--profile", default=None, help="default: BUNDLE/profile.json")
    p.add_argument("--out", default=None, help="folder for the report (default: the bundle)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("eval", help="perplexity of a source on a text (non-overlapping windows)")
    p.add_argument("source", help="HF folder, .gguf file, pocketlm folder, or 'default'")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the eval split of Python's pydoc topics)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"window length in tokens (default {DEFAULT_CTX})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"tokens of text to use (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("quantize", help="quantize a source's weights into a pocketlm model folder (a SOURCE for eval/export)")
    p.add_argument("source", help="HF folder, .gguf file, pocketlm folder, or 'default'")
    p.add_argument("--scheme", default="w4-awq",
                   help="w4-awq (default), w4-rtn, w8-rtn, w2-ternary (needs --qat-steps), w8a8-int or w4a8-int (integer-only programs)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size along the input (default 64; must divide the layer widths)")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric groups (zero points) instead of symmetric")
    p.add_argument("--head", default=None, choices=["float", "int8", "same"],
                   help="the LM head (tied to the embedding in SmolLM2): int8 per output channel (default), float, or the "
                        "scheme's own (int4 groups; w4-awq also searches its clipping); w8a8-int and w4a8-int always make it int8, w2-ternary keeps it float")
    p.add_argument("--calib", default=None, help="UTF-8 calibration text (default: the calib split of the default prose)")
    p.add_argument("--awq-results", default=None, help="re-apply a saved AWQ search (awq.json) instead of searching")
    p.add_argument("--qat-steps", type=int, default=0, help="quantization-aware training steps first (distilled from the float model)")
    p.add_argument("--qat-lr", type=float, default=1e-5)
    p.add_argument("--out", required=True, help="model folder to write")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("export", help="export a source to a bundle (ONNX and/or ExecuTorch) with the sink-window cache")
    p.add_argument("source", help="HF folder, .gguf file, pocketlm folder, or 'default'")
    p.add_argument("--backend", action="append", choices=["onnx", "executorch"], help="repeat for several (default: both)")
    p.add_argument("--sink-size", type=int, default=4, help="attention-sink slots kept forever (default 4)")
    p.add_argument("--window-size", type=int, default=508, help="rolling-window slots (default 508)")
    p.add_argument("--chunk", type=int, default=32, help="prefill chunk length in tokens (default 32)")
    p.add_argument("--onnx-int4", default="auto", choices=["auto", "int8", "float", "off"],
                   help="for an int4-quantized source: MatMulNBits with int8 activations (auto/int8), with float "
                        "activations (float), or plain float32 MatMuls (off)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="stream a completion from a bundle (runs without PyTorch for ONNX)")
    _add_generation_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text as is")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with a bundle")
    _add_generation_args(p)
    p.set_defaults(func=_cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PocketLMError as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
