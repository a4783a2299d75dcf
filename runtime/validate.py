"""Does an exported program still behave like the PyTorch original? Checked against the golden
outputs and reference perplexity the export recorded, so no PyTorch is needed on the device."""

from __future__ import annotations

import numpy as np

from . import perplexity as ppl_protocol
from .backends import load_backend
from .bundle import Bundle
from .errors import PocketLMError
from .session import CachedSession, fresh_window_logits
from .text import load_text
from .tokenizer import Tokenizer

DEFAULT_THRESHOLDS = {"max_logits_abs": 1e-3, "min_cosine": 0.9999, "min_top1": 1.0, "max_ppl_delta_pct": 1.0}


def session_for(bundle: Bundle, backend: str, threads: int = 2) -> CachedSession:
    return CachedSession(load_backend(bundle, backend, threads), bundle.layout, bundle.rope_freq)


def golden_parity(bundle: Bundle, session: CachedSession, backend: str | None = None) -> dict:
    """Feed each golden prompt, then the reference's greedy tokens (teacher forcing), comparing logits
    with the golden outputs recorded for `backend`'s program."""
    golden = bundle.golden(backend)
    n = bundle.manifest["golden"]["prompts"]
    max_abs, cosines, top1, prefixes, errors = 0.0, [], [], [], []
    for k in range(n):
        ref, tokens = golden[f"logits_{k}"], golden[f"greedy_{k}"]
        session.reset()
        ours = [session.feed(golden[f"prompt_ids_{k}"].tolist())]
        for t in tokens[:-1]:
            ours.append(session.feed([int(t)]))
        ours = np.stack(ours)
        diff = np.abs(ours - ref)
        max_abs = max(max_abs, float(diff.max()))
        errors.append(diff.max(axis=1))
        cosines += (np.sum(ours * ref, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))).tolist()
        agree = ours.argmax(1) == tokens
        top1 += agree.tolist()
        prefixes.append(int(np.argmin(agree)) if not agree.all() else len(agree))
    return {
        "max_logits_abs": max_abs,
        "min_cosine": float(min(cosines)),
        "top1_agreement": float(np.mean(top1)),
        "identical_greedy_prefix": prefixes,
        "greedy_steps": int(len(golden["greedy_0"])),
        "per_step_max_abs": np.concatenate(errors).tolist(),
    }


def bundle_perplexity(bundle: Bundle, session: CachedSession, text=None) -> ppl_protocol.PerplexityResult:
    """The shared protocol through the cache, with the ctx and token count the reference used."""
    ref = bundle.reference.get("perplexity", {})
    body = load_text(None, "eval") if text is None else load_text(text, "all")
    ids = np.asarray(Tokenizer(bundle.root).encode(body), np.int64)
    return ppl_protocol.perplexity(fresh_window_logits(session), ids, ref.get("ctx", 512), ref.get("max_tokens", 2048))


def check(name: str, value, limit, ok: bool, unit: str = "") -> dict:
    return {"check": name, "value": value, "limit": limit, "passed": bool(ok), "unit": unit}


def parity_checks(parity: dict, ppl: dict | None, thresholds: dict) -> list[dict]:
    t = {**DEFAULT_THRESHOLDS, **thresholds}
    out = [
        check("logits max abs", parity["max_logits_abs"], t["max_logits_abs"], parity["max_logits_abs"] <= t["max_logits_abs"]),
        check("logits cosine (min)", parity["min_cosine"], t["min_cosine"], parity["min_cosine"] >= t["min_cosine"]),
        check("top-1 agreement", parity["top1_agreement"], t["min_top1"], parity["top1_agreement"] >= t["min_top1"]),
    ]
    if ppl and ppl.get("delta_pct") is not None:
        out.append(check("perplexity delta", ppl["delta_pct"], t["max_ppl_delta_pct"], abs(ppl["delta_pct"]) <= t["max_ppl_delta_pct"], "%"))
    return out


def validate_backend(bundle: Bundle, backend: str, text=None, thresholds: dict | None = None, threads: int = 2) -> dict:
    session = session_for(bundle, backend, threads)
    parity = golden_parity(bundle, session, backend)
    result = bundle_perplexity(bundle, session, text)
    ref = bundle.reference.get("perplexity", {}).get("ppl")
    ppl = {**result.to_dict(), "reference_ppl": ref,
           "delta_pct": 100 * (result.ppl / ref - 1) if ref and text is None else None,
           "nll_by_position": _binned(result.token_nll, result.ctx)}
    # a program's own arithmetic (int8 activations, say) can promise less than exactness: its recorded
    # thresholds stand; otherwise the caller's (a target's) apply
    own = bundle.manifest["programs"][backend].get("parity_thresholds") or {}
    checks = parity_checks(parity, ppl, {**(thresholds or {}), **own})
    return {"backend": backend, "parity": parity, "perplexity": ppl, "checks": checks, "passed": all(c["passed"] for c in checks)}


def _binned(token_nll: np.ndarray, ctx: int, bins: int = 16) -> dict:
    """Mean NLL by position inside the ctx-token windows: does the cache hold up as the window fills?"""
    n_windows = len(token_nll) // (ctx - 1)
    if n_windows == 0:
        return {"position": [], "nll": []}
    per_pos = token_nll[: n_windows * (ctx - 1)].reshape(n_windows, ctx - 1).mean(0)
    edges = np.linspace(0, ctx - 1, bins + 1).astype(int)
    return {"position": [int(e) + 1 for e in edges[:-1]], "nll": [float(per_pos[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]}


def validate_bundle(bundle_path, backends=None, target=None, text=None, threads: int | None = None,
                    profile: dict | None = None) -> dict:
    """Parity and perplexity on each backend; with a target, its parity thresholds and its budgets.

    Budgets need latency and memory: they come from `profile` when given (one already measured),
    else from a profile run here at the target's thread count.
    """
    from .profile import best_point, file_sizes, profile_bundle
    from .targets import budget_checks, load_target

    bundle = Bundle.open(bundle_path)
    target = load_target(target) if isinstance(target, str) else target
    if not backends:  # all the bundle's programs the target can run
        backends = [b for b in bundle.backends if not target or b in target.backends]
        if not backends:
            raise PocketLMError(f"target '{target.name}' runs {', '.join(target.backends)}, and bundle '{bundle.root}' "
                                f"has only {', '.join(bundle.backends)}; export for the target's backend")
    backends = list(backends)
    if target:
        target.check_request(backends, bundle.manifest.get("quantization", {}).get("scheme"))
    threads = threads or (target.threads if target else 2)
    results = {b: validate_backend(bundle, b, text, target.parity if target else None, threads) for b in backends}
    budgets = {}
    if target and target.budgets:
        profile = profile or profile_bundle(bundle.root, backends, [threads])
        sizes = file_sizes(bundle)["programs"]
        for b in backends:
            point = best_point(profile, b, threads)
            budgets[b] = budget_checks(target, point, sizes[b])
            results[b]["checks"] += budgets[b]
            results[b]["passed"] = all(c["passed"] for c in results[b]["checks"])
    return {
        "bundle": str(bundle.root), "target": target.name if target else None, "threads": threads,
        "text": str(text) if text else "default:eval", "backends": results,
        "passed": all(r["passed"] for r in results.values()),
    }


def format_table(rows: list) -> str:
    """Left-aligned plain-text columns; the first row is the header."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def checks_table(report: dict) -> str:
    """One row per backend and check: value, limit, PASS or FAIL."""
    rows = [("backend", "check", "value", "limit", "result")]
    for b, r in report["backends"].items():
        for c in r["checks"]:
            rows.append((b, c["check"], _fmt(c["value"], c["unit"]), _fmt(c["limit"], c["unit"]), "PASS" if c["passed"] else "FAIL"))
    return format_table(rows)


def _fmt(v, unit: str) -> str:
    if unit == "bytes":
        return f"{v / 1e6:.1f} MB"
    if isinstance(v, float):
        text = f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.4g}"
    else:
        text = str(v)
    return f"{text} {unit}".strip()
