"""`pocketlm run [RECIPE]`: the main job. Source -> export to each backend with the sink-window cache ->
validate (parity, perplexity, budgets) -> profile -> report, with a summary table at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .recipe import Recipe

DEMO_PROMPT = "What is the capital of France?"


def run(recipe: Recipe | None = None, out: str | None = None, prompt: str = DEMO_PROMPT) -> dict:
    """Run every stage of the recipe (default recipe: default model, generic-x86-cpu target)."""
    from pocketlm.runtime.generate import Generator
    from pocketlm.runtime.profile import default_thread_sweep, profile_bundle
    from pocketlm.runtime.report import SUMMARY_HEAD, build_report, summary_rows, write_report
    from pocketlm.runtime.validate import checks_table, format_table, validate_bundle

    from .export import export_bundle

    recipe = recipe or Recipe(out="out/pocketlm")
    root = Path(out or recipe.out)
    target = recipe.resolved_target()
    backends = list(recipe.export.backends)
    q = recipe.quantize
    head = None
    if q:
        from .quantize import scheme_head, scheme_spec

        scheme, _ = scheme_spec(q.scheme, q.group_size, not q.asymmetric)  # a bad scheme fails now, not after minutes
        head = scheme_head(scheme, q.head)
    target.check_request(backends, q.scheme if q else "fp32")  # before any compute
    cache = recipe.cache(target)
    threads = sorted(set(recipe.profile.threads or default_thread_sweep()) | {target.threads})
    timings, t0 = {}, time.perf_counter()

    source = recipe.source
    if q:
        from .quantize import quantize_source

        print(f"[0/4] quantize {source}: {q.scheme}, group {q.group_size}, head {head}", flush=True)
        source = str(quantize_source(source, root / "quantized", scheme=q.scheme, group_size=q.group_size,
                                     symmetric=not q.asymmetric, head=head, calib=q.calib, awq_results=q.awq_results))
        timings["quantize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    print(f"[1/4] export {source} -> {', '.join(backends)} (cache {cache['sink_size']} sinks + "
          f"{cache['window_size']} window, chunk {cache['chunk']}; target {target.name})", flush=True)
    bundle = export_bundle(source, root / "bundle", tuple(backends), **cache,
                           onnx_int4=q.onnx_int4 if q else "auto")
    timings["export"] = time.perf_counter() - t0

    gen = Generator(bundle, backends[0], target.threads)
    answer = gen.generate(gen.chat_ids([{"role": "user", "content": prompt}]) if gen.bundle.chat_template
                          else gen.tokenizer.encode(prompt), max_new_tokens=48).text.strip()
    print(f"      {prompt} -> {answer}", flush=True)
    del gen

    print(f"[2/4] profile: {', '.join(backends)} at {threads} threads, each in its own process", flush=True)
    t1 = time.perf_counter()
    profile = profile_bundle(
        bundle, backends, threads, prompt_tokens=recipe.profile.prompt_tokens, new_tokens=recipe.profile.new_tokens,
        runs=recipe.profile.runs,
        on_result=lambda p: print(f"      {p['backend']:<10} {p['threads']} thr: TTFT {p['ttft_ms']:.0f} ms, prefill "
                                  f"{p['prefill_tok_s']:.1f} tok/s, decode {p['decode_tok_s']:.1f} tok/s", flush=True),
    )
    timings["profile"] = time.perf_counter() - t1

    print(f"[3/4] validate against the golden outputs and target {target.name}", flush=True)
    t2 = time.perf_counter()
    validation = validate_bundle(bundle, backends, target, recipe.validate.text, target.threads, profile=profile)
    timings["validate"] = time.perf_counter() - t2
    print(checks_table(validation), flush=True)

    print("[4/4] report", flush=True)
    report = build_report(bundle, validation, profile, {"prompt": prompt, "answer": answer, "target": target.name,
                                                         "timings_s": {k: round(v, 1) for k, v in timings.items()}})
    json_path, html_path = write_report(report, bundle)
    summary = {"bundle": str(bundle), "report_html": str(html_path), "report_json": str(json_path),
               "passed": validation["passed"], "answer": answer, "timings_s": report["timings_s"]}
    (root / "run.json").write_text(json.dumps(summary, indent=2))

    print()
    print(format_table([SUMMARY_HEAD, *summary_rows(report)]))
    print(f"\nvalidation {'PASSED' if validation['passed'] else 'FAILED'}; report: {html_path}")
    return summary
