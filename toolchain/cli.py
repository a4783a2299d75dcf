"""The `pocketlm` command: a thin skin over the Python API (each subcommand calls one function)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pocketlm.runtime.errors import PocketLMError


def _cmd_run(args) -> int:
    from .pipeline import run

    run(source=args.source, out=args.out)
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate_perplexity

    result = evaluate_perplexity(args.source, text=args.text, ctx=args.ctx, max_tokens=args.max_tokens)
    report = {"source": str(args.source), "text": str(args.text) if args.text else "default:eval", **result.to_dict()}
    print(f"perplexity {result.ppl:.4f} over {result.tokens} tokens ({result.windows} windows of {result.ctx})")
    if args.json:
        _write_json(Path(args.json), report)
    return 0


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import DEFAULT_CTX, DEFAULT_MAX_TOKENS

    parser = argparse.ArgumentParser(prog="pocketlm", description="Make a causal LM phone-ready, and prove it still behaves.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job on a source (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--source", default="default", help="HF folder, .gguf file, pocketlm folder, or 'default'")
    p.add_argument("--out", default=None, help="folder for run.json")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("eval", help="perplexity of a source on a text (non-overlapping windows)")
    p.add_argument("source", help="HF folder, .gguf file, pocketlm folder, or 'default'")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the eval split of Python's pydoc topics)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"window length in tokens (default {DEFAULT_CTX})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"tokens of text to use (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.set_defaults(func=_cmd_eval)
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
