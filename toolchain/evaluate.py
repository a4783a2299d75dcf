"""Perplexity of any source under the shared protocol (pocketlm.runtime.perplexity)."""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from pocketlm.runtime import perplexity as ppl_protocol
from pocketlm.runtime.text import load_text
from pocketlm.runtime.tokenizer import Tokenizer

from .load import load_hf_model, load_model
from .sources import Source, resolve

DEFAULT_CTX = 512
DEFAULT_MAX_TOKENS = 16384


def eval_text_ids(source: Source, text: str | os.PathLike | None) -> np.ndarray:
    """Token ids of the evaluation text: a user's file whole, or the default prose's eval split."""
    body = load_text(None, split="eval") if text is None else load_text(text, split="all")
    return np.asarray(Tokenizer(source.path).encode(body), dtype=np.int64)


def torch_logits_fn(model, hf: bool = False):
    @torch.no_grad()
    def logits(ids: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(ids)[None]
        out = model(x).logits if hf else model(x)
        return out[0].float().numpy()

    return logits


def evaluate_perplexity(
    source: str | os.PathLike | Source,
    text: str | os.PathLike | None = None,
    ctx: int = DEFAULT_CTX,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    reference: str = "pocketlm",
    show_progress: bool = True,
) -> ppl_protocol.PerplexityResult:
    """reference="pocketlm" runs pocketlm's Transformer; "hf" runs the Hugging Face model itself."""
    src = source if isinstance(source, Source) else resolve(source)
    ids = eval_text_ids(src, text)
    model = load_hf_model(src) if reference == "hf" else load_model(src)[0]
    progress = (lambda w: tqdm(w, desc=f"perplexity ({reference})", unit="window")) if show_progress else None
    return ppl_protocol.perplexity(torch_logits_fn(model, hf=reference == "hf"), ids, ctx, max_tokens, progress)
