"""Export a source to a bundle folder: programs per backend, tokenizer, manifest (written last)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from pocketlm.runtime.bundle import GOLDEN, MANIFEST, SCHEMA_VERSION, sha256_file
from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.sink_cache import CacheLayout

from ..atomic import atomic_folder
from ..load import load_model, load_tokenizer
from ..model.convert import TOKENIZER_FILES
from ..model.transformer import Transformer
from ..sources import Source
from ..generate import chat_prompt_ids, stop_token_ids
from .golden import golden_prompts, reference_perplexity, write_golden

BACKENDS = ("onnx", "executorch")
PROGRAM_FILES = {"onnx": "model.onnx", "executorch": "model.pte"}


def export_bundle(
    source: str | os.PathLike | Source,
    out: str | os.PathLike,
    backends: tuple[str, ...] = BACKENDS,
    sink_size: int = 4,
    window_size: int = 508,
    chunk: int = 32,
) -> Path:
    """Write a bundle at `out` atomically: everything goes to a temp folder that is renamed at the end."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise PocketLMError(f"unknown backend {unknown or '(none)'}; choose from {', '.join(BACKENDS)}")
    layout = CacheLayout(sink_size, window_size, chunk)  # validated before any compute
    out = Path(out)
    model, src = load_model(source)
    tokenizer = load_tokenizer(src)
    with atomic_folder(out) as tmp:
        programs = {}
        for backend in backends:
            t0 = time.perf_counter()
            print(f"exporting {backend} (cache {sink_size} sinks + {window_size} window, chunk {chunk})", flush=True)
            path = tmp / PROGRAM_FILES[backend]
            _export_one(backend, model, layout, path, stop_token_ids(model, tokenizer))
            files = sorted(p.name for p in tmp.iterdir() if p.name.startswith(path.name))
            programs[backend] = {"file": path.name, "files": files, "export_s": round(time.perf_counter() - t0, 1)}
            print(f"  {backend}: {programs[backend]['export_s']} s", flush=True)
        for name in TOKENIZER_FILES:
            if (src.path / name).exists():
                shutil.copy2(src.path / name, tmp / name)
        print("recording golden outputs and the reference perplexity (PyTorch, same cache)", flush=True)
        chat_ids = (lambda q: chat_prompt_ids(tokenizer, q)) if tokenizer.chat_template else None
        prompts = golden_prompts(tmp, chat_ids)
        golden = write_golden(model, layout, prompts, tmp / GOLDEN)
        manifest = build_manifest(model, src, layout, programs, tokenizer)
        manifest["golden"] = golden
        manifest["reference"] = {"perplexity": reference_perplexity(model, layout, tmp)}
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _export_one(backend: str, model: Transformer, layout: CacheLayout, path: Path, stop_ids) -> None:
    if backend == "onnx":
        from .onnx_export import export_onnx

        export_onnx(model, layout, path)
    else:
        from .executorch_export import export_executorch

        export_executorch(model, layout, path, stop_ids)


def build_manifest(model: Transformer, src: Source, layout: CacheLayout, programs: dict, tokenizer) -> dict:
    c = model.config
    return {
        "schema_version": SCHEMA_VERSION,
        "source": src.describe(),
        "stages": [],
        "architecture": c.to_dict(),
        "rope": {"head_dim": c.head_dim, "theta": c.rope_theta, "scaling": c.rope_scaling.__dict__ if c.rope_scaling else None},
        "cache": {"sink_size": layout.sink_size, "window_size": layout.window_size, "chunk": layout.chunk},
        "quantization": {"scheme": "fp32"},
        "programs": programs,
        "tokenizer": {
            "file": "tokenizer.json",
            "chat_template": tokenizer.chat_template,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "stop_token_ids": list(stop_token_ids(model, tokenizer)),
        },
    }
