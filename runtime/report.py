"""report.json and a self-contained report.html (inline SVG, no network) from a validation and a profile.

The page is meant to be looked at: latency per backend and thread count, the logits error
histogram, perplexity against position through the streaming cache, and the budget table.
"""

from __future__ import annotations

import json
import math
import time
from html import escape
from pathlib import Path

from .bundle import Bundle
from .svg import bar_chart, line_chart
from .validate import _fmt

REPORT_JSON, REPORT_HTML = "report.json", "report.html"
ARITHMETIC_KEYS = ("arithmetic", "weights", "activations", "requant_rounding", "integer_ops", "float_ops")


def build_report(bundle_path, validation: dict | None, profile: dict | None, extra: dict | None = None) -> dict:
    bundle = Bundle.open(bundle_path, verify=False)
    m = bundle.manifest
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "bundle": str(bundle.root),
        "source": m["source"], "stages": m.get("stages", []), "cache": m["cache"],
        "quantization": m.get("quantization", {}),
        "programs": {b: {k: p[k] for k in ARITHMETIC_KEYS if k in p} for b, p in m["programs"].items()},
        "layers": len(m["architecture"]["layers"]),
        "validation": validation, "profile": profile, **(extra or {}),
        "passed": None if validation is None else validation["passed"],
    }


def write_report(report: dict, out_dir) -> tuple[Path, Path]:
    """Both files, each written to a temp name then renamed (never a half-written report)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in ((REPORT_JSON, json.dumps(report, indent=2)), (REPORT_HTML, render_html(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
        paths.append(out / name)
    return paths[0], paths[1]


def _latency_plots(profile: dict) -> list[tuple[str, str]]:
    by_backend: dict[str, list] = {}
    for p in profile["points"]:
        by_backend.setdefault(p["backend"], []).append(p)
    for pts in by_backend.values():
        pts.sort(key=lambda p: p["threads"])

    def series(key):
        return {b: ([p["threads"] for p in pts], [p[key] for p in pts]) for b, pts in by_backend.items()}

    return [
        ("latency-decode", line_chart(series("decode_tok_s"), "Decode speed", "threads", "tokens/s", width=480, height=280, y_zero=True)),
        ("latency-prefill", line_chart(series("prefill_tok_s"), "Prefill speed", "threads", "tokens/s", width=480, height=280, y_zero=True)),
        ("latency-ttft", line_chart(series("ttft_ms"), "Time to first token", "threads", "ms", width=480, height=280, y_zero=True)),
    ]


def _error_histogram(backend: str, errors: list[float]) -> str:
    """Max |logit difference| per generated step, in decades (1e-7 ... 1e-1 and above)."""
    edges = list(range(-8, 1))
    counts = [0] * (len(edges) + 1)
    for e in errors:
        d = math.floor(math.log10(e)) if e > 0 else -99
        counts[min(max(d - edges[0] + 1, 0), len(counts) - 1)] += 1
    labels = [f"<1e{edges[0]}"] + [f"1e{d}" for d in edges]
    return bar_chart(labels, counts, f"{backend}: logits error per step (max |Δ| vs PyTorch)", "max |Δlogit| (decade)", "steps", width=480, height=280)


def _ppl_plot(validation: dict, cache: dict) -> str:
    series = {}
    ref = None
    for b, r in validation["backends"].items():
        nll = r["perplexity"].get("nll_by_position", {})
        if nll.get("position"):
            series[b] = (nll["position"], [math.exp(v) for v in nll["nll"]])
        ref = r["perplexity"].get("reference_ppl") or ref
    if ref and series:
        xs = next(iter(series.values()))[0]
        series["PyTorch reference (whole text)"] = ([xs[0], xs[-1]], [ref, ref])
    capacity = cache["sink_size"] + cache["window_size"]
    return line_chart(series, f"Perplexity by position in the window (cache {cache['sink_size']} sinks + {cache['window_size']} window = {capacity} slots)",
                      "token position", "perplexity (bin mean)")


def _table(rows: list[list[str]], head: list[str], row_class=None) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def summary_rows(report: dict) -> list[list[str]]:
    v, prof = report.get("validation") or {"backends": {}}, report.get("profile")
    rows = []
    backends = sorted(set(v["backends"]) | {p["backend"] for p in (prof or {}).get("points", [])})
    for b in backends:
        r = v["backends"].get(b)
        pts = [p for p in (prof or {}).get("points", []) if p["backend"] == b]
        best = max(pts, key=lambda p: p["decode_tok_s"], default=None)
        size = (prof or {}).get("files", {}).get("programs", {}).get(b)
        rows.append([
            b,
            f"{r['parity']['max_logits_abs']:.2e}" if r else "–",
            f"{r['parity']['top1_agreement']:.3f}" if r else "–",
            f"{r['perplexity']['ppl']:.3f}" if r else "–",
            _fmt(size, "bytes") if size else "–",
            f"{best['ttft_ms']:.0f} ms" if best else "–",
            f"{best['prefill_tok_s']:.1f}" if best else "–",
            f"{best['decode_tok_s']:.1f} ({best['threads']} thr)" if best else "–",
            _fmt(best["peak_rss_bytes"], "bytes") if best else "–",
            ("PASS" if r["passed"] else "FAIL") if r else "–",
        ])
    return rows


SUMMARY_HEAD = ["backend", "logits max |Δ|", "top-1", "perplexity", "program size", "TTFT", "prefill tok/s",
                "decode tok/s", "peak RSS", "checks"]

_STYLE = """body{font-family:sans-serif;max-width:1000px;margin:24px auto;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}tr.fail td{background:#fde2e2}tr.pass td:last-child{color:#17692b}
.verdict{font-size:20px;font-weight:bold}.pass-v{color:#17692b}.fail-v{color:#b3261e}
figure{margin:12px 0;display:inline-block}code{background:#f3f3f3;padding:1px 4px}"""

# Counts the plots that actually laid out (non-empty boxes); a headless-browser test reads it back.
_SELF_CHECK = """<script>
window.addEventListener('load', function () {
  var n = 0;
  document.querySelectorAll('figure.plot svg').forEach(function (s) {
    var box = s.getBBox(); if (box.width > 0 && box.height > 0 && s.querySelector('polyline,rect.bar')) n++;
  });
  document.body.setAttribute('data-plots-rendered', String(n));
});
</script>"""


def _arithmetic(programs: dict) -> list[str]:
    """What each program computes in: float32 unless its manifest says otherwise; an integer-only
    program lists the operations that ran in integers and those (if any) that stayed in float."""
    items = []
    for b, p in programs.items():
        text = f"<b>{escape(b)}</b>: {escape(p.get('arithmetic', 'float32'))}"
        for key in ("weights", "activations", "requant_rounding"):
            if key in p:
                text += f"; {key.replace('_', ' ')}: {escape(str(p[key]))}"
        if "integer_ops" in p:
            text += f". In integers: {escape(', '.join(p['integer_ops']))}. In floating point: " \
                    f"{escape(', '.join(p['float_ops'])) or 'nothing'} (the host converts RoPE tables to Q14 and reads int32 logits)"
        items.append(f"<li>{text}</li>")
    return ["<h2>Arithmetic</h2><ul>", *items, "</ul>"] if items else []


def render_html(report: dict) -> str:
    v, prof = report.get("validation"), report.get("profile")
    src, cache, q = report["source"], report["cache"], report.get("quantization", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>pocketlm report: {escape(src.get('name', ''))}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>pocketlm report: {escape(src.get('name', ''))}</h1>",
             f"<p>Bundle <code>{escape(report['bundle'])}</code>, generated {escape(report['generated'])}. "
             f"Source sha256 <code>{escape(str(src.get('sha256', ''))[:16])}…</code>. "
             f"Cache: {cache['sink_size']} attention sinks + {cache['window_size']} window slots, prefill chunk {cache['chunk']}. "
             f"Quantization: {escape(q.get('scheme', 'fp32'))}. "
             f"Stages: {escape(', '.join(s.get('stage', '?') for s in report.get('stages', [])) or 'none (export only)')}.</p>"]
    if v is not None:
        ok = v["passed"]
        parts.append(f"<p class='verdict {'pass-v' if ok else 'fail-v'}'>Validation {'PASSED' if ok else 'FAILED'}"
                     f"{' against target ' + escape(v['target']) if v.get('target') else ''}</p>")
    parts += ["<h2>Summary</h2>", _table(summary_rows(report), SUMMARY_HEAD)]
    if v is not None:
        rows, classes = [], []
        for b, r in v["backends"].items():
            for c in r["checks"]:
                rows.append([b, c["check"], _fmt(c["value"], c["unit"]), _fmt(c["limit"], c["unit"]), "PASS" if c["passed"] else "FAIL"])
                classes.append("pass" if c["passed"] else "fail")
        parts += ["<h2>Checks and budgets</h2>", _table(rows, ["backend", "check", "value", "limit", "result"], classes)]
    figures = []
    if prof:
        figures += _latency_plots(prof)
    if v is not None:
        figures += [(f"error-{b}", _error_histogram(b, r["parity"]["per_step_max_abs"])) for b, r in v["backends"].items()]
        figures.append(("ppl-position", _ppl_plot(v, cache)))
    if figures:
        parts.append("<h2>Plots</h2>")
        parts += [f"<figure class='plot' data-plot='{escape(name)}'>{svg}</figure>" for name, svg in figures]
    parts += _arithmetic(report.get("programs", {}))
    if v is not None:
        parts.append("<h2>Parity details</h2><ul>")
        for b, r in v["backends"].items():
            p, pp = r["parity"], r["perplexity"]
            parts.append(f"<li><b>{escape(b)}</b>: identical greedy prefix per golden prompt {p['identical_greedy_prefix']} "
                         f"of {p['greedy_steps']} steps; min cosine {p['min_cosine']:.6f}; perplexity {pp['ppl']:.4f} over "
                         f"{pp['tokens']} tokens (reference {pp.get('reference_ppl') or '–'})</li>")
        parts.append("</ul>")
    if prof:
        s = prof["settings"]
        parts.append(f"<p>Latency: median of {s['runs']} runs after a warm-up, {s['prompt_tokens']}-token prompt, "
                     f"{s['new_tokens']} new tokens, each backend and thread count in its own process (peak RSS is that process's).</p>")
    parts += [_SELF_CHECK, "</body></html>"]
    return "\n".join(parts)
