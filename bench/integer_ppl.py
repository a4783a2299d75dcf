"""Integer-only programs (schemes w8a8-int, w4a8-int) against fp32 on the default text, same run, pocketlm
eval protocol (16,384 tokens, windows of 512): the integer ONNX program run by ONNX Runtime through a
4 + 508 cache (one window fits, so it equals a dense cache), the same folder's float model (the same
int8 or int4 weights, float activations: the weights' share of the loss), and bit-exactness of ONNX
Runtime against the numpy integer reference on the first windows. Optionally ONNX Runtime's own
dynamic int8 quantization of the fp32 ONNX export (quantize_dynamic, per-tensor activations), the
tool a user would reach for.
Usage: python bench/integer_ppl.py [--scheme w8a8-int|w4a8-int] [--group-size 64] [--folder FOLDER] [--max-tokens 16384]
       [--exact-windows 2] [--ort-dynamic] [--out FILE]
Writes bench/results/integer_ppl.json (w8a8-int) or integer_ppl_w4a8.json."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import write_json

from pocketlm.runtime import perplexity as ppl_protocol
from pocketlm.runtime.backends.onnx import OnnxBackend
from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.integer.reference import IntegerReferenceBackend
from pocketlm.runtime.profile import file_sizes
from pocketlm.runtime.session import CachedSession, fresh_window_logits
from pocketlm.runtime.validate import session_for
from pocketlm.toolchain.evaluate import eval_text_ids, evaluate_perplexity
from pocketlm.toolchain.export import _integer_model, export_bundle
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.quantize import quantize_source

CTX = 512
LAYOUT = dict(sink_size=4, window_size=508, chunk=32)


def program_ppl(session, ids, max_tokens) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = ppl_protocol.perplexity(fresh_window_logits(session), ids, CTX, max_tokens)
    return result.ppl, result.tokens / (time.perf_counter() - t0)


def ort_dynamic_ppl(source: str, root: Path, ids, max_tokens) -> dict:
    """ONNX Runtime's quantize_dynamic on pocketlm's fp32 ONNX program (MatMul weights int8, activations
    int8 per tensor computed at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bundle = Bundle.open(export_bundle(source, root / "fp32-bundle", ("onnx",), **LAYOUT))
    dynamic = root / "ort-dynamic" / "model.onnx"
    dynamic.parent.mkdir()
    quantize_dynamic(str(bundle.program_path("onnx")), str(dynamic), weight_type=QuantType.QInt8, use_external_data_format=True)
    session = CachedSession(OnnxBackend(dynamic, bundle.cache_shapes()), bundle.layout, bundle.rope_freq)
    ppl, _ = program_ppl(session, ids, max_tokens)
    return {"ppl": ppl}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="default")
    ap.add_argument("--scheme", default="w8a8-int", choices=["w8a8-int", "w4a8-int"])
    ap.add_argument("--group-size", type=int, default=64, help="w4a8-int's int4 groups")
    ap.add_argument("--folder", default=None, help="an existing folder of that scheme (default: quantize the source now)")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--exact-windows", type=int, default=2, help="windows compared with the numpy reference, bit for bit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ort-dynamic", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="pocketlm-int-"))
    results = {}
    results["fp32"] = {"ppl": evaluate_perplexity(args.source, max_tokens=args.max_tokens, show_progress=False).ppl}
    print("fp32", results["fp32"], flush=True)

    t0 = time.perf_counter()
    scheme = args.scheme
    folder = Path(args.folder) if args.folder else quantize_source(args.source, root / scheme, scheme=scheme, group_size=args.group_size)
    quantize_s = None if args.folder else time.perf_counter() - t0
    results[f"{scheme} float activations"] = {"ppl": evaluate_perplexity(folder, max_tokens=args.max_tokens, show_progress=False).ppl}
    print("the same weights, float activations", results[f"{scheme} float activations"], flush=True)

    t0 = time.perf_counter()
    bundle = Bundle.open(export_bundle(folder, root / "bundle", ("onnx",), **LAYOUT))
    export_s = time.perf_counter() - t0
    model, src = load_model(folder)
    ids = eval_text_ids(src, None)
    ppl, tok_s = program_ppl(session_for(bundle, "onnx", args.threads), ids, args.max_tokens)
    program_bytes = file_sizes(bundle)["programs"]["onnx"]
    results[f"{scheme} ONNX Runtime"] = {"ppl": ppl, "eval_tok_s": tok_s, "quantize_s": quantize_s, "export_s": export_s,
                                         "program_bytes": program_bytes}
    print("integer-only program", results[f"{scheme} ONNX Runtime"], flush=True)

    n = args.exact_windows * CTX
    program = fresh_window_logits(session_for(bundle, "onnx", args.threads))
    reference = fresh_window_logits(CachedSession(IntegerReferenceBackend(_integer_model(src, model), bundle.layout),
                                                  bundle.layout, bundle.rope_freq))
    windows = ppl_protocol.eval_windows(ids, CTX, n)
    diffs = [float(np.abs(program(w) - reference(w)).max()) for w in windows]
    results["bit_exact"] = {"tokens": int(sum(len(w) for w in windows)), "max_logits_abs": max(diffs)}
    print("ONNX Runtime vs numpy reference", results["bit_exact"], flush=True)
    if args.ort_dynamic:
        results["ort quantize_dynamic int8"] = ort_dynamic_ppl(args.source, root, ids, args.max_tokens)
        print("ORT quantize_dynamic", results["ort quantize_dynamic int8"], flush=True)

    fp = results["fp32"]["ppl"]
    for r in results.values():
        if "ppl" in r:
            r["vs_fp32_pct"] = 100 * (r["ppl"] / fp - 1)
    write_json("integer_ppl" if scheme == "w8a8-int" else "integer_ppl_w4a8",
               {"source": args.source, "scheme": scheme, "max_tokens": args.max_tokens, "ctx": CTX, "cache": LAYOUT,
                "threads": args.threads, "program": bundle.manifest["programs"]["onnx"]["arithmetic"],
                "weights": bundle.manifest["programs"]["onnx"]["weights"], "results": results}, args.out)


if __name__ == "__main__":
    main()
