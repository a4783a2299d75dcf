"""Quantization-aware training: the linears see their quantized weights in the forward pass (the same
quantizer the export path uses) and pass gradients straight through to float master weights.

Training distills from the float model (forward KL on its logits, as LLM-QAT does): the student
learns to be the teacher under quantization, which needs no labels and keeps the chat behaviour.
After training the parametrizations are removed and the weights quantized for good by the same
function, so what was trained is exactly what is exported.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..model.transformer import Transformer
from .rtn import WeightQuantSpec, fake_quant_ste, fake_ternary, fake_ternary_ste

TERNARY = "ternary"


class FakeQuantWeight(nn.Module):
    """A parametrization: weight -> its fake-quantized value, identity gradient."""

    def __init__(self, spec: WeightQuantSpec | str):
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_ternary_ste(w) if self.spec == TERNARY else fake_quant_ste(w, self.spec)


def quantized_linears(model: Transformer) -> list[str]:
    """The linears QAT trains quantized: every one but the LM head (tied to the embedding, kept float)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def attach_fake_quant_(model: Transformer, spec: WeightQuantSpec | str) -> list[str]:
    names = quantized_linears(model)
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name), "weight", FakeQuantWeight(spec))
    return names


def detach_fake_quant_(model: Transformer) -> None:
    """Back to plain float master weights (not yet quantized)."""
    for name in quantized_linears(model):
        mod = model.get_submodule(name)
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)


@torch.no_grad()
def ternarize_(model: Transformer) -> dict[str, dict]:
    """BitNet b1.58's final step: each quantized linear becomes absmean-scale x {-1, 0, 1}."""
    decisions = {}
    for name in quantized_linears(model):
        mod = model.get_submodule(name)
        mod.weight.copy_(fake_ternary(mod.weight))
        decisions[name] = {"ternary": True, "scale": float(mod.weight.abs().max())}
    return decisions


def qat_train_(
    student: Transformer,
    teacher: Transformer,
    tokens: torch.Tensor,
    spec: WeightQuantSpec | str,
    steps: int = 200,
    lr: float = 1e-5,
    batch: int = 4,
    seed: int = 0,
    device: str | None = None,
    log_every: int = 25,
) -> dict:
    """Train `student` in place with fake-quantized linears to match `teacher`'s next-token distribution
    on `tokens` [n, seq]. Returns the loss curve. The student leaves with float master weights."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    student.to(device).train()
    teacher.to(device).eval()
    attach_fake_quant_(student, spec)
    params = [p for n, p in student.named_parameters() if "embed_tokens" not in n]  # the (tied) head stays as is
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    try:
        for step in range(steps):
            idx = torch.randint(0, tokens.shape[0], (batch,), generator=gen)
            x = tokens[idx].to(device)
            with torch.no_grad():
                target = F.log_softmax(teacher(x), -1)
            logp = F.log_softmax(student(x), -1)
            loss = F.kl_div(logp, target, log_target=True, reduction="none").sum(-1).mean()  # KL(teacher || student)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            if log_every and (step + 1) % log_every == 0:
                print(f"  QAT step {step + 1}/{steps}: KL {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    finally:
        detach_fake_quant_(student)
        student.cpu().eval()
        teacher.cpu()
    return {"steps": steps, "lr": lr, "batch": batch, "seq": int(tokens.shape[1]), "device": device,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses": losses, "seconds": round(time.perf_counter() - t0, 1)}
