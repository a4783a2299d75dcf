"""Activation-aware weight quantization (AWQ, Lin et al. 2024) for pocketlm's Transformer.

A few input channels carry much larger activations than the rest; RTN gives their weights the same
coarse grid as everyone else's. AWQ multiplies those weight columns by s > 1 before quantizing and
divides the input by s, folding the division into whatever produced the input (an RMSNorm weight or
the rows of the previous linear), so the float model is unchanged and only the rounding improves.

The flow (our own code, after mit-han-lab/llm-awq's auto_scale.py / auto_clip.py / pre_quant.py):

1. Calibration runs through the FLOAT model, layer by layer: each layer's inputs are the float outputs
   of the layer before. llm-awq does the same in effect (it computes a layer's output before scaling
   and clipping that layer), scaling is exact in float, and it keeps the search of one layer
   independent of every other layer's, so a result is a pure function of the float model and the data.
2. Per layer, four groups of linears that share an input, searched on the float layer, independently:
   - "qkv": q/k/v after input_layernorm (folded into the norm); loss: the attention sublayer output;
   - "vo": v_proj -> o_proj (folded into v_proj's rows), only when v's outputs are o's inputs one to
     one (n_heads == n_kv_heads). Under GQA (SmolLM2: 9 query heads share 3 KV heads) o_proj's input
     columns are repeated KV channels, so the group is skipped and the result says why;
   - "gate_up": gate/up after post_attention_layernorm (folded into that norm); loss: the MLP output;
   - "down": down_proj after up_proj (folded into up_proj's rows); loss: down_proj's output.
   s = s_x^alpha, s_x = mean |x| per input channel over all calibration tokens, alpha on the grid
   i/n_grid (i = 0..n_grid-1), normalised by sqrt(max(s) * min(s)) as llm-awq does; candidates are
   scored as Q(W * s) / s against the float block. alpha = 0 is exactly RTN, and ties keep the smaller
   alpha, so on the search data AWQ is never worse than RTN.
3. Clipping: per group of weights (of the scale-folded layer), max |w| shrinks by 1 - i/clip_grid for
   i < max_shrink * clip_grid, keeping the ratio that minimises that group's share of its linear's
   output error, sum over tokens of (x_g . (Q(w_g) - w_g))^2. q/k are not clipped by default (their
   error passes through the q.k product, as llm-awq notes).
4. The LM head, when it takes the scheme's own grid (config.head, set by `--head same`): clipped the
   same way on the final norm's output, and not scaled. A scale would have to fold into the final
   norm, which unties a tied embedding (a second 49152 x 576 table on SmolLM2); and a joint search
   of alpha with clipping inside each candidate picked alpha = 0 on SmolLM2 g64 anyway (head output
   error 0.49 at alpha 0, 0.62 at 0.2, against 1.19 for RTN; scales alone reached 0.92). Clipping the
   tied table clips the embedding rows too, as the two are one matrix; measured with the body float
   (4,096 tokens), PPL 17.53 for the RTN int4 head and 15.78 clipped, against 14.95 in fp32.

Cost: a single linear's output error over tokens is a quadratic form in the weight error,
mean_t (x_t . d)^2 = d^T G d with G = X^T X / n, so "down", "vo" and every clip search use input Gram
matrices (built once per layer from up to `gram_tokens` tokens) instead of re-running the tokens per
candidate: the clip search then costs out * in * group_size per ratio, independent of the token count,
and needs no subsampling of tokens or output channels. The "qkv" and "gate_up" searches run the real
sublayer (attention, SwiGLU) on the first `search_tokens` calibration tokens, whole sequences.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from pocketlm.runtime.errors import PocketLMError

from ..model import rope
from ..model.transformer import DecoderLayer, Transformer, causal_mask
from .fold import fold_scales_
from .rtn import INT8_PER_CHANNEL, WeightQuantSpec, fake_quant

GROUPS = ("qkv", "vo", "gate_up", "down")
HEAD_CHOICES = ("float", "int8", "same")


@dataclass(frozen=True)
class AwqConfig:
    """Search settings; the defaults are llm-awq's grids."""

    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    clip: bool = True
    clip_grid: int = 20  # clip ratios 1 - i/clip_grid ...
    max_shrink: float = 0.5  # ... for i < max_shrink * clip_grid (down to 0.55)
    clip_qk: bool = False
    search_tokens: int = 4096  # tokens (whole sequences) the qkv / gate_up candidates run on
    gram_tokens: int = 16384  # tokens (evenly strided) in the Gram matrices of down / vo / clip
    head: bool = False  # also clip the LM head, for a head on the scheme's own grid (step 4 above)


@dataclass
class AwqResult:
    """What the search decided, as plain data: enough to redo the folding and clipping on a fresh model.

    layers[i][group] is {"alpha", "scales" (list of floats), "loss", "rtn_loss"} or {"skipped": why};
    clip maps a linear's full name to its shrink steps [out][n_groups] (ratio = 1 - step / clip_grid).
    """

    spec: WeightQuantSpec
    layers: list[dict[str, dict]]
    clip: dict[str, list[list[int]]] = field(default_factory=dict)
    clip_grid: int = 20
    info: dict = field(default_factory=dict)

    def clip_ratios(self, name: str) -> torch.Tensor | None:
        steps = self.clip.get(name)
        return None if steps is None else _clip_ratio(torch.tensor(steps), self.clip_grid)

    def to_dict(self) -> dict:
        return {
            "method": "awq",
            "spec": self.spec.to_dict(),
            "layers": self.layers,
            "clip_grid": self.clip_grid,
            "clip": self.clip,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AwqResult":
        if d.get("method") != "awq":
            raise PocketLMError(f"not an AWQ result (method={d.get('method')!r})")
        return cls(
            spec=WeightQuantSpec.from_dict(d["spec"]),
            layers=d["layers"],
            clip={k: v for k, v in d.get("clip", {}).items()},
            clip_grid=int(d.get("clip_grid", 20)),
            info=d.get("info", {}),
        )

    def to_json(self) -> str:
        # compact: the clip steps are ~100k small integers per layer on a 135M model at group 32
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AwqResult":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AwqResult":
        return cls.from_json(Path(path).read_text())

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _clip_ratio(steps: torch.Tensor, grid: int) -> torch.Tensor:
    """The one definition of a shrink step's ratio, shared by the search and the re-application."""
    return 1.0 - steps.to(torch.float32) / grid


# --- calibration ------------------------------------------------------------------------------------


def _as_batches(tokens) -> list[torch.Tensor]:
    """A [B, T] tensor, a [T] tensor, or a sequence of them -> list of [B, T] long tensors."""
    items = [tokens] if isinstance(tokens, torch.Tensor) else list(tokens)
    out = []
    for t in items:
        t = torch.as_tensor(t, dtype=torch.long)
        out.append(t[None] if t.dim() == 1 else t)
    if not out or any(t.dim() != 2 or t.numel() == 0 for t in out):
        raise PocketLMError("AWQ calibration needs token ids as [batch, seq] tensors, at least one token")
    return out


_CAPTURE = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj", "down_in": "mlp.down_proj"}


@torch.no_grad()
def _run_layer(layer: DecoderLayer, xs: list[torch.Tensor], ropes: dict) -> tuple[dict, list[torch.Tensor]]:
    """Run the float layer on each batch; return the inputs of its linear groups (forward hooks) per
    batch, and its outputs (the next layer's inputs)."""
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in _CAPTURE}
    handles = []
    for key, name in _CAPTURE.items():
        def hook(_m, args, _out, key=key):
            feats[key].append(args[0].detach())

        handles.append(layer.get_submodule(name).register_forward_hook(hook))
    try:
        outs = [layer(x, *ropes[x.shape[1]]) for x in xs]
    finally:
        for h in handles:
            h.remove()
    return feats, outs


def _flat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def _gram(x: torch.Tensor, limit: int) -> torch.Tensor:
    """G = X^T X / n over at most `limit` evenly strided tokens of X [n, in]."""
    if x.shape[0] > limit:
        x = x[torch.linspace(0, x.shape[0] - 1, limit).round().long()]
    return x.T @ x / x.shape[0]


def _head_rows(xs: list[torch.Tensor], limit: int) -> list[tuple[int, int]]:
    """(batch, rows) covering the first ~limit tokens in whole sequences (at least one sequence)."""
    picks, taken = [], 0
    for b, x in enumerate(xs):
        if taken >= limit:
            break
        rows = min(x.shape[0], max(1, math.ceil((limit - taken) / x.shape[1])))
        picks.append((b, rows))
        taken += rows * x.shape[1]
    return picks


# --- the scale search -------------------------------------------------------------------------------


def _candidate_scales(s_x: torch.Tensor, alpha: float) -> torch.Tensor:
    s = s_x.pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def _scaled_qdq(w: torch.Tensor, s: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Q(W * s) / s: the effective float weight of a scaled-then-quantized linear seen from its
    un-scaled input."""
    return fake_quant(w * s, spec) / s


def _search(s_x: torch.Tensor, n_grid: int, loss_of) -> dict:
    losses, best = [], None
    for i in range(n_grid):
        alpha = i / n_grid
        s = _candidate_scales(s_x, alpha)
        loss = float(loss_of(s))
        if not math.isfinite(loss):
            raise PocketLMError(f"AWQ search produced a non-finite loss at alpha={alpha}")
        losses.append(loss)
        if best is None or loss < best[2]:
            best = (alpha, s, loss)
    alpha, s, loss = best
    return {"alpha": alpha, "scales": s.tolist(), "loss": loss, "rtn_loss": losses[0]}


def _gram_loss(w: torch.Tensor, gram: torch.Tensor, spec: WeightQuantSpec):
    """Loss of a single linear: mean over tokens and outputs of (x . (Q(W s)/s - W))^2, via the Gram."""

    def loss_of(s: torch.Tensor) -> float:
        d = _scaled_qdq(w, s, spec) - w
        return ((d @ gram) * d).sum().item() / w.shape[0]

    return loss_of


@torch.no_grad()
def _search_layer(layer: DecoderLayer, feats: dict, ropes: dict, spec: WeightQuantSpec, cfg: AwqConfig, grams: dict) -> dict:
    attn, mlp = layer.self_attn, layer.mlp
    picks = _head_rows(feats["attn_in"], cfg.search_tokens)
    result: dict[str, dict] = {}

    # qkv -> the attention sublayer's output (o_proj stays float, as in llm-awq)
    x_attn = [feats["attn_in"][b][:r] for b, r in picks]
    ref = [attn(x, *ropes[x.shape[1]]) for x in x_attn]
    n_ref = sum(r.numel() for r in ref)
    w_qkv = {n: attn.get_submodule(n).weight for n in ("q_proj", "k_proj", "v_proj")}

    def qkv_loss(s):
        params = {f"{n}.weight": _scaled_qdq(w, s, spec) for n, w in w_qkv.items()}
        return sum(
            (functional_call(attn, params, (x, *ropes[x.shape[1]])) - r).pow(2).sum().item() for x, r in zip(x_attn, ref)
        ) / n_ref

    result["qkv"] = _search(_flat(feats["attn_in"]).abs().mean(0), cfg.n_grid, qkv_loss)

    # v -> o, only when v's output rows are o's input columns one to one
    v_out, o_in = attn.v_proj.out_features, attn.o_proj.in_features
    if v_out == o_in:
        s_x = _flat(feats["o_in"]).abs().mean(0)
        result["vo"] = _search(s_x, cfg.n_grid, _gram_loss(attn.o_proj.weight, grams["o_in"], spec))
    else:
        result["vo"] = {
            "skipped": f"GQA: {attn.n_heads} query heads share {attn.n_kv_heads} KV heads, so v_proj's {v_out} "
            f"output rows do not map one to one onto o_proj's {o_in} input columns"
        }

    # gate/up -> the MLP output (down_proj stays float)
    x_mlp = _flat([feats["mlp_in"][b][:r] for b, r in picks])
    ref_mlp = mlp(x_mlp)
    w_gu = {n: mlp.get_submodule(n).weight for n in ("gate_proj", "up_proj")}

    def gate_up_loss(s):
        params = {f"{n}.weight": _scaled_qdq(w, s, spec) for n, w in w_gu.items()}
        return (functional_call(mlp, params, (x_mlp,)) - ref_mlp).pow(2).mean().item()

    result["gate_up"] = _search(_flat(feats["mlp_in"]).abs().mean(0), cfg.n_grid, gate_up_loss)

    # down -> its own output
    s_x = _flat(feats["down_in"]).abs().mean(0)
    result["down"] = _search(s_x, cfg.n_grid, _gram_loss(mlp.down_proj.weight, grams["down_in"], spec))
    return result


# --- folding ----------------------------------------------------------------------------------------


def _scales(entry: dict) -> torch.Tensor | None:
    return None if "skipped" in entry else torch.tensor(entry["scales"], dtype=torch.float32)


@torch.no_grad()
def _fold_layer(layer: DecoderLayer, entry: dict, where: str) -> None:
    """Fold one layer's searched scales: W[:, c] *= s[c] and the producer of input c divides by s[c]."""
    attn, mlp = layer.self_attn, layer.mlp
    folds = {
        "qkv": (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
        "vo": (attn.v_proj, [attn.o_proj]),
        "gate_up": (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
        "down": (mlp.up_proj, [mlp.down_proj]),
    }
    for group in GROUPS:
        if group not in entry:
            raise PocketLMError(f"AWQ result for {where} has no '{group}' entry")
        s = _scales(entry[group])
        if s is None:
            continue
        producer, consumers = folds[group]
        for lin in consumers:
            if lin.in_features != s.numel():
                raise PocketLMError(
                    f"AWQ result does not fit the model: {where} '{group}' has {s.numel()} scales, "
                    f"the linear takes {lin.in_features} inputs"
                )
        if isinstance(producer, nn.Linear) and producer.out_features != s.numel():
            raise PocketLMError(f"AWQ result does not fit the model: {where} '{group}' producer has "
                                f"{producer.out_features} outputs, {s.numel()} scales")
        fold_scales_(producer, consumers, s)


def apply_awq(model: Transformer, result: AwqResult) -> Transformer:
    """Fold the result's scales into `model` in place (the float output does not change, to rounding).

    Deterministic: the same result on the same float weights gives bit-identical weights, so a
    serialised result reproduces the searched model. Clipping is not applied here; quantize_model_
    applies it when it quantizes. The model's config records which result was folded in
    (extra["awq_fingerprint"]), so the mark survives save_pocketlm / load_pocketlm and nobody folds twice.
    """
    done = folded_fingerprint(model)
    if done is not None:
        raise PocketLMError(f"AWQ scales ({done}) are already folded into this model; load a fresh copy")
    if len(result.layers) != model.config.n_layers:
        raise PocketLMError(f"AWQ result has {len(result.layers)} layers, the model {model.config.n_layers}")
    for i, (layer, entry) in enumerate(zip(model.model.layers, result.layers)):
        _fold_layer(layer, entry, f"layer {i}")
    extra = {**model.config.extra, "awq_fingerprint": result.fingerprint()}
    model.config = dataclasses.replace(model.config, extra=extra)  # a new config: never mutate a shared one
    return model


def folded_fingerprint(model: Transformer) -> str | None:
    """The fingerprint of the AWQ result folded into `model`, or None for a model without AWQ scales."""
    return model.config.extra.get("awq_fingerprint")


# --- clipping ---------------------------------------------------------------------------------------


@torch.no_grad()
def _search_clip(w: torch.Tensor, gram: torch.Tensor, spec: WeightQuantSpec, cfg: AwqConfig, rows: int = 256) -> torch.Tensor:
    """Shrink step [out, n_groups] minimising each group's output error d_g^T G_gg d_g (G of the
    linear's actual, scale-folded input)."""
    g = spec.group_size_for(w.shape[1])
    ng = w.shape[1] // g
    blocks = torch.stack([gram[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(ng)])  # [ng, g, g]
    n_steps = max(1, int(cfg.max_shrink * cfg.clip_grid))
    best = torch.empty(w.shape[0], ng, dtype=torch.long)
    for r0 in range(0, w.shape[0], rows):
        wr = w[r0:r0 + rows]
        errs = []
        for step in range(n_steps):
            ratio = _clip_ratio(torch.tensor(step), cfg.clip_grid)
            d = (fake_quant(wr, spec, clip=ratio) - wr).reshape(wr.shape[0], ng, g).transpose(0, 1)  # [ng, o, g]
            errs.append(((d @ blocks) * d).sum(-1).T)  # [o, ng]
        best[r0:r0 + rows] = torch.stack(errs).argmin(0)  # first minimum: the mildest shrink on ties
    return best


# --- the whole search -------------------------------------------------------------------------------


def check_group_sizes(model: Transformer, spec: WeightQuantSpec, names=None) -> None:
    """Raise PocketLMError before any work if the group size does not divide some linear's input."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (names is None or name in names):
            spec.group_size_for(mod.in_features, name)


@torch.no_grad()
def awq_search(model: Transformer, tokens, spec: WeightQuantSpec, config: AwqConfig | None = None) -> AwqResult:
    """Search AWQ scales and clip ratios for `spec` on calibration token batches; `model` is not changed.

    tokens: a [batch, seq] LongTensor, or a sequence of them (lengths may differ between batches).
    """
    cfg = config or AwqConfig()
    if folded_fingerprint(model) is not None:
        raise PocketLMError("this model already has AWQ scales folded in; search on the float model")
    check_group_sizes(model, spec, {f"model.layers.{i}.{p}" for i in range(model.config.n_layers)
                                    for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
                      | ({"lm_head"} if cfg.head else set()))
    batches = _as_batches(tokens)
    ropes = {}
    for t in {b.shape[1] for b in batches}:
        cos, sin = rope.cos_sin(model.rope_inv_freq, torch.arange(t))
        ropes[t] = (cos, sin, causal_mask(t))
    xs = [model.model.embed_tokens(b).float() for b in batches]
    layers, clip, skipped = [], {}, []
    clipped = ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    if cfg.clip_qk:
        clipped = ("self_attn.q_proj", "self_attn.k_proj") + clipped
    gram_input = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
                  "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in"}
    input_scale_group = {"attn_in": "qkv", "o_in": "vo", "mlp_in": "gate_up", "down_in": "down"}
    for i, layer in enumerate(model.model.layers):
        feats, xs_next = _run_layer(layer, xs, ropes)
        grams = {k: _gram(_flat(v), cfg.gram_tokens) for k, v in feats.items()}
        entry = _search_layer(layer, feats, ropes, spec, cfg, grams)
        layers.append(entry)
        if "skipped" in entry["vo"]:
            skipped.append(i)
        if cfg.clip:
            folded = copy.deepcopy(layer)
            _fold_layer(folded, entry, f"layer {i}")
            for name in clipped:
                key = gram_input[name]
                s = _scales(entry[input_scale_group[key]])
                gram = grams[key] if s is None else grams[key] / (s[:, None] * s[None, :])  # inputs are x / s
                steps = _search_clip(folded.get_submodule(name).weight, gram, spec, cfg)
                clip[f"model.layers.{i}.{name}"] = steps.tolist()
        xs = xs_next
    if cfg.head and cfg.clip:
        gram = _gram(_flat([model.model.norm(x) for x in xs]), cfg.gram_tokens)
        clip["lm_head"] = _search_clip(model.lm_head.weight, gram, spec, cfg).tolist()
    n_tokens = sum(b.numel() for b in batches)
    info = {
        "calibration_tokens": n_tokens,
        "search_tokens": min(n_tokens, sum(r * xs[b].shape[1] for b, r in _head_rows(xs, cfg.search_tokens))),
        "gram_tokens": min(n_tokens, cfg.gram_tokens),
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "calibration_flow": "float model, layer by layer",
    }
    if skipped:
        info["vo_skipped_layers"] = skipped
    return AwqResult(spec=spec, layers=layers, clip=clip, clip_grid=cfg.clip_grid, info=info)


# --- quantizing the whole model ---------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    """'q_proj' matches every q_proj, 'layers.0' all of layer 0: whole dotted components only."""
    return f".{pattern}." in f".{name}."


@torch.no_grad()
def quantize_model_(
    model: Transformer,
    spec: WeightQuantSpec,
    awq: AwqResult | None = None,
    skip: tuple[str, ...] = ("lm_head", "embed_tokens"),
    head: str = "float",
) -> dict[str, dict]:
    """RTN-quantize every linear of `model` in place (weights become their dequantized values) and
    return the decision per module: name -> {bits, group_size, symmetric[, clip, awq]} or {float: True}.

    awq: a result from awq_search for the same spec; its scales are folded first unless apply_awq
    already folded this very result, and its clip ratios shrink the groups' ranges.
    skip: linears kept float (dotted-name components). The LM head is not governed by `skip` but by
    `head`, because with tied embeddings it is the embedding matrix too: "float" (default) keeps it,
    "int8" quantizes it int8 per output channel (per token row of the embedding), "same" uses `spec`.
    """
    if head not in HEAD_CHOICES:
        raise PocketLMError(f"head={head!r}: choose one of {', '.join(HEAD_CHOICES)}")
    head_spec = {"float": None, "int8": INT8_PER_CHANNEL, "same": spec}[head]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan: dict[str, WeightQuantSpec | None] = {}
    for name, mod in linears.items():
        if name == "lm_head":
            plan[name] = head_spec
        else:
            plan[name] = None if any(_matches(name, p) for p in skip) else spec
    for name, s in plan.items():  # every check before the first change
        if s is not None:
            s.group_size_for(linears[name].in_features, name)
    if awq is not None:
        if awq.spec != spec:
            raise PocketLMError(
                f"the AWQ result was searched for {awq.spec.describe()}, not {spec.describe()}; search again for this spec"
            )
        fingerprint = awq.fingerprint()  # once: it serialises the whole result (seconds on a 135M model)
        done = folded_fingerprint(model)
        if done is None:
            apply_awq(model, awq)
        elif done != fingerprint:
            raise PocketLMError("a different AWQ result is already folded into this model")
    tied = model.config.tie_embeddings
    decisions: dict[str, dict] = {}
    for name, s in plan.items():
        mod = linears[name]
        if s is None:
            decisions[name] = {"float": True}
            continue
        clip = awq.clip_ratios(name) if awq is not None and s == spec else None
        mod.weight.data = fake_quant(mod.weight, s, clip=clip)
        d = {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric}
        if clip is not None:
            d["clip"] = round(float(clip.mean()), 4)  # mean ratio; the full ratios live in the AWQ result
        if awq is not None and (name.startswith("model.layers.") or clip is not None):
            d["awq"] = fingerprint
        decisions[name] = d
    if tied:
        decisions["lm_head"] = {**decisions["lm_head"], "tied_to": "model.embed_tokens"}
        decisions["model.embed_tokens"] = {**decisions["lm_head"], "tied_to": "lm_head"}
    else:
        decisions["model.embed_tokens"] = {"float": True}
    return decisions
