"""`pocketlm quantize`: weight quantization as a pipeline stage. Writes a pocketlm model folder whose
weights are the dequantized values (so `eval`, `export` and later stages read it as any SOURCE),
plus the scheme, every per-layer decision and the AWQ search results as data (re-applicable)."""

from __future__ import annotations

import json
import os
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.text import load_text
from pocketlm.runtime.tokenizer import Tokenizer

from .load import load_model
from .model.convert import pocketlm_meta, save_pocketlm
from .quant.awq import HEAD_CHOICES, AwqConfig, AwqResult, awq_search, quantize_model_
from .quant.rtn import WeightQuantSpec
from .sources import Source, resolve

AWQ_FILE = "awq.json"
DEFAULT_GROUP_SIZE = 64
# The tied LM head is read whole every decode step (SmolLM2: 28M weights, 21% of the model): int8 per
# output channel reads a quarter of float's bytes for a perplexity cost within noise
# (bench/results/head_ppl.json), where int4 groups cost far more; so int8 unless asked otherwise.
DEFAULT_HEAD = "int8"
CALIB_SEQ, CALIB_SEQS = 512, 16  # 8,192 calibration tokens by default


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int
    per_channel: bool  # else group-wise
    awq: bool
    description: str
    integer: bool = False  # an integer-only program: calibrated activation ranges, int8 head


SCHEMES = {
    "w8-rtn": Scheme("w8-rtn", 8, True, False, "int8 weights, symmetric per output channel, round-to-nearest; float activations"),
    "w4-rtn": Scheme("w4-rtn", 4, False, False, "int4 weights, group-wise along the input, round-to-nearest; float activations"),
    "w4-awq": Scheme("w4-awq", 4, False, True, "int4 weights, group-wise, AWQ scales and clipping; float activations"),
    "w2-ternary": Scheme("w2-ternary", 2, True, False, "ternary weights {-1, 0, 1} x absmean scale per tensor (BitNet b1.58; needs QAT)"),
    "w8a8-int": Scheme("w8a8-int", 8, True, False, "integer-only: int8 weights per channel (SmoothQuant-searched), int8 "
                       "activations per token, int32 accumulators, fixed-point requantization, integer nonlinearities",
                       integer=True),
    "w4a8-int": Scheme("w4a8-int", 4, False, True, "integer-only: int4 weights group-wise (AWQ), "
                       "int8 LM head and embedding (one table when tied), int8 activations per token, int32 accumulators, fixed-point "
                       "requantization, integer nonlinearities", integer=True),
}
INTEGER_SCHEMES = tuple(name for name, s in SCHEMES.items() if s.integer)
QAT_SEQ = 256
SMOOTHQUANT_FILE, RANGES_FILE = "rotation_smoothing.json", "activation_ranges.json"


def scheme_spec(scheme: str, group_size: int | None = DEFAULT_GROUP_SIZE, symmetric: bool = True) -> tuple[Scheme, WeightQuantSpec]:
    if scheme not in SCHEMES:
        raise PocketLMError(f"unknown scheme '{scheme}'; choose from {', '.join(SCHEMES)}")
    s = SCHEMES[scheme]
    return s, WeightQuantSpec(s.bits, None if s.per_channel else group_size, symmetric)


def scheme_head(scheme: Scheme, head: str | None) -> str:
    """The head a scheme runs: what was asked, else its default; a head the scheme cannot run is refused."""
    if head is not None and head not in HEAD_CHOICES:
        raise PocketLMError(f"--head {head!r}: choose one of {', '.join(HEAD_CHOICES)}")
    if scheme.integer:
        if head not in (None, "int8"):
            raise PocketLMError(f"scheme '{scheme.name}' is integer-only: every matmul, the LM head's too, is int8; drop --head {head}")
        return "int8"
    if scheme.name == "w2-ternary":
        if head not in (None, "float"):
            raise PocketLMError(f"scheme 'w2-ternary' keeps the LM head float (its ternary QAT trains the linears only); drop --head {head}")
        return "float"
    return head or DEFAULT_HEAD


def calibration_tokens(tokenizer_dir: Path, calib: str | os.PathLike | None, seq: int = CALIB_SEQ, n_seqs: int = CALIB_SEQS) -> torch.Tensor:
    """[n, seq] token windows of the calibration text (default: the calib split of the default prose)."""
    body = load_text(None, "calib") if calib is None else load_text(calib, "all")
    ids = Tokenizer(tokenizer_dir).encode(body)
    n = min(n_seqs, len(ids) // seq)
    if n == 0:
        raise PocketLMError(f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq}; pass a longer --calib file")
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


def quantize_source(
    source: str | os.PathLike | Source,
    out: str | os.PathLike,
    scheme: str = "w4-awq",
    group_size: int | None = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
    head: str | None = None,
    calib: str | os.PathLike | None = None,
    awq_results: str | os.PathLike | None = None,
    awq_config: AwqConfig | None = None,
    calib_seqs: int = CALIB_SEQS,
    qat_steps: int = 0,
    qat_lr: float = 1e-5,
    qat_batch: int = 4,
) -> Path:
    """Quantize a source's linear weights and write the result as a pocketlm model folder at `out`.

    head: the tied LM head's quantization (HEAD_CHOICES); None takes the scheme's: int8 (DEFAULT_HEAD),
    float for w2-ternary.
    awq_results: a saved search (awq.json from an earlier run) to re-apply instead of searching.
    qat_steps: > 0 trains with fake-quantized weights first (distilled from the float model on the
    calibration text, or the default text's train split), then quantizes with the same quantizer.
    """
    sch, spec = scheme_spec(scheme, group_size, symmetric)
    if scheme == "w2-ternary" and qat_steps <= 0:
        raise PocketLMError("scheme 'w2-ternary' needs quantization-aware training: pass --qat-steps N (a few hundred)")
    if sch.integer and not symmetric:
        raise PocketLMError(f"scheme '{scheme}' runs symmetric integer weights (zero point 0); drop --asymmetric")
    if qat_steps and sch.integer:
        raise PocketLMError(f"scheme '{scheme}' calibrates its activations after PTQ; QAT is not available for it: drop --qat-steps")
    if qat_steps and sch.awq:
        raise PocketLMError("QAT starts from round-to-nearest: use --scheme w4-rtn (or w8-rtn, w2-ternary) with --qat-steps")
    head = scheme_head(sch, head)
    if awq_results and not sch.awq:
        raise PocketLMError(f"--awq-results applies to AWQ schemes only, not '{scheme}'")
    src = source if isinstance(source, Source) else resolve(source)
    previous = _previous_stages(src)  # an already-quantized source is refused before any compute
    model, src = load_model(src)
    t0 = time.perf_counter()
    awq = None
    if sch.awq:
        if awq_results:
            awq = AwqResult.load(awq_results)
            if awq.spec != spec:
                raise PocketLMError(f"'{awq_results}' was searched for {awq.spec.describe()}, not {spec.describe()}; "
                                    "search again or pass the matching --group-size")
            if "rotation" in awq.info:
                raise PocketLMError(f"'{awq_results}' was searched on a rotated model (an earlier w4a8-int); its scales "
                                    f"do not fit '{scheme}': search again without --awq-results")
        else:
            tokens = calibration_tokens(src.path, calib, n_seqs=calib_seqs)
            print(f"AWQ search: {spec.describe()}, {tokens.numel()} calibration tokens, {model.config.n_layers} layers", flush=True)
            config = awq_config or AwqConfig()
            if head == "same":  # the head takes the scheme's grid: its clipping is searched too
                config = dataclasses.replace(config, head=True)
            with torch.no_grad():
                awq = awq_search(model, tokens, spec, config)
    qat = None
    if qat_steps:
        import copy

        from .quant.qat import TERNARY, qat_train_

        teacher = copy.deepcopy(model)
        body_split = "all" if calib else "train"
        ids = Tokenizer(src.path).encode(load_text(calib, body_split))
        n = len(ids) // QAT_SEQ
        tokens = torch.tensor(ids[: n * QAT_SEQ], dtype=torch.long).view(n, QAT_SEQ)
        print(f"QAT: {qat_steps} steps, batch {qat_batch} x {QAT_SEQ} tokens, lr {qat_lr}", flush=True)
        qat = qat_train_(model, teacher, tokens, TERNARY if scheme == "w2-ternary" else spec, qat_steps, qat_lr, qat_batch)
        del teacher
    files = {}
    with torch.no_grad():
        if sch.integer:
            from .quant.integer_only import prepare_w4a8_, prepare_w8a8_

            tokens = calibration_tokens(src.path, calib, n_seqs=calib_seqs)
            batches = list(tokens.split(2))
            if scheme == "w8a8-int":
                print(f"w8a8-int: SmoothQuant search and activation ranges on {tokens.numel()} calibration tokens", flush=True)
                decisions, record, ranges = prepare_w8a8_(model, batches)
                files[SMOOTHQUANT_FILE] = json.dumps(record, separators=(",", ":"))
            else:
                print(f"w4a8-int: activation ranges on {tokens.numel()} calibration tokens", flush=True)
                decisions, ranges = prepare_w4a8_(model, batches, spec, awq)
            files[RANGES_FILE] = json.dumps(ranges, indent=1)
        elif scheme == "w2-ternary":
            from .quant.qat import ternarize_

            decisions = ternarize_(model)
            decisions["lm_head"] = {"float": True}
        else:
            decisions = quantize_model_(model, spec, awq=awq, head=head)
    seconds = time.perf_counter() - t0
    stage = {
        "stage": "quantize", "scheme": scheme, "weights": spec.to_dict(), "head": head,
        "calibration": None if not (sch.awq or sch.integer) or (awq_results and not sch.integer)
        else (str(calib) if calib else "default:calib"),
        "awq_results": AWQ_FILE if awq else None, "seconds": round(seconds, 1),
        "qat": None if qat is None else {k: v for k, v in qat.items() if k != "losses"},
    }
    quantization = {"scheme": scheme, "description": sch.description, "weights": spec.to_dict(), "head": head,
                    "activations": "int8 per token (dynamic), integer-only program" if sch.integer else "float32",
                    "storage": "dequantized float32 weights on the quantization grid", "layers": decisions}
    if sch.integer:
        quantization.update(activation_ranges=RANGES_FILE, **({"smoothquant": SMOOTHQUANT_FILE} if SMOOTHQUANT_FILE in files else {}))
    if awq:
        files[AWQ_FILE] = awq.to_json()
    if qat:
        files["qat_losses.json"] = json.dumps(qat["losses"])
    return save_pocketlm(model, out, tokenizer_dir=src.path,
                         extra={"stages": previous + [stage], "quantization": quantization}, files=files)


def _previous_stages(src: Source) -> list[dict]:
    if src.kind != "pocketlm":
        return []
    meta = pocketlm_meta(src.path)
    if meta.get("quantization"):
        raise PocketLMError(f"'{src.spec}' is already quantized ({meta['quantization']['scheme']}); quantize the float model instead")
    return meta.get("stages", [])
