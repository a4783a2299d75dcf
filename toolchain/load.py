"""Load a resolved source as pocketlm's Transformer, as the Hugging Face reference, or its tokenizer."""

from __future__ import annotations

import os

from pocketlm.runtime.errors import PocketLMError

from .model import convert
from .model.transformer import Transformer
from .sources import Source, resolve


def load_model(spec: str | os.PathLike | Source) -> tuple[Transformer, Source]:
    """pocketlm's own float32 Transformer for any source, in eval mode."""
    source = spec if isinstance(spec, Source) else resolve(spec)
    if source.kind == "pocketlm":
        return convert.load_pocketlm(source.path), source
    return convert.load_hf_folder(source.path), source


def load_hf_model(spec: str | os.PathLike | Source):
    """The Hugging Face model itself (float32, eval): the reference pocketlm is checked against."""
    from transformers import AutoModelForCausalLM

    source = spec if isinstance(spec, Source) else resolve(spec)
    if source.kind != "hf":
        raise PocketLMError(f"'{source.spec}' is a pocketlm model folder; it has no Hugging Face reference model")
    return AutoModelForCausalLM.from_pretrained(str(source.path), dtype="float32").eval()


def load_tokenizer(spec: str | os.PathLike | Source):
    """The Hugging Face tokenizer (with its chat template) saved beside the weights."""
    from transformers import AutoTokenizer

    source = spec if isinstance(spec, Source) else resolve(spec)
    if not (source.path / "tokenizer.json").exists() and not (source.path / "tokenizer.model").exists():
        raise PocketLMError(f"'{source.path}' has no tokenizer (tokenizer.json); copy the model's tokenizer files into it")
    return AutoTokenizer.from_pretrained(str(source.path))
