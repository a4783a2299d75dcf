"""What an exported bundle holds, as the runtime learns it: only from manifest.json, never from file names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import rope
from .errors import PocketLMError
from .sink_cache import CacheLayout

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GOLDEN = "golden.npz"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, path, verify: bool = True) -> "Bundle":
        """Read the manifest; with verify, refuse any listed file that escapes the bundle, is missing,
        or differs from its recorded sha256 (altered, truncated or replaced)."""
        root = Path(path)
        file = root / MANIFEST
        if not file.is_file():
            raise PocketLMError(f"'{root}' is not a pocketlm bundle (no {MANIFEST}); create one with `pocketlm export`")
        manifest = json.loads(file.read_text())
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise PocketLMError(
                f"bundle schema version {manifest.get('schema_version')!r} is not supported by this runtime "
                f"(it reads version {SCHEMA_VERSION}); re-export the bundle with this pocketlm version"
            )
        bundle = cls(root, manifest)
        bundle._check_paths()
        if verify:
            bundle.verify()
        return bundle

    def _check_paths(self) -> None:
        names = list(self.manifest.get("files", {}))
        names += [p["file"] for p in self.manifest.get("programs", {}).values()]
        names.append(self.manifest.get("tokenizer", {}).get("file", "tokenizer.json"))
        root = self.root.resolve()
        for name in names:
            target = (self.root / name).resolve()
            if Path(name).is_absolute() or root not in target.parents:
                raise PocketLMError(
                    f"manifest entry '{name}' points outside the bundle '{self.root}'; a bundle only refers to "
                    "files inside its own folder: re-export it"
                )

    def verify(self) -> None:
        files = self.manifest.get("files")
        if not files:
            raise PocketLMError(f"bundle '{self.root}' lists no file hashes in its manifest; re-export it")
        tok = self.manifest.get("tokenizer", {}).get("file", "tokenizer.json")
        if not (self.root / tok).is_file():
            raise PocketLMError(f"bundle '{self.root}' is missing its tokenizer '{tok}'; copy it back or re-export")
        for name, digest in files.items():
            path = self.root / name
            if not path.is_file():
                raise PocketLMError(f"bundle '{self.root}' is missing '{name}', listed in its manifest; re-export it")
            if sha256_file(path) != digest:
                raise PocketLMError(
                    f"'{name}' in bundle '{self.root}' does not match the sha256 in its manifest: the file was altered "
                    "or truncated after export; re-export the bundle"
                )

    def golden(self, backend: str | None = None) -> dict[str, np.ndarray]:
        """The reference outputs recorded at export time (plain arrays, never pickles): the PyTorch
        reference's, or the program's own where its arithmetic has an exact reference of its own
        (an integer-only program's numpy reference, named by its manifest entry)."""
        name = self.manifest["programs"].get(backend, {}).get("golden", GOLDEN) if backend else GOLDEN
        with np.load(self.root / name, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    @property
    def reference(self) -> dict:
        return self.manifest.get("reference", {})

    @property
    def layout(self) -> CacheLayout:
        c = self.manifest["cache"]
        return CacheLayout(c["sink_size"], c["window_size"], c["chunk"])

    @property
    def rope_freq(self) -> np.ndarray:
        r = self.manifest["rope"]
        return rope.inv_freq(r["head_dim"], r["theta"], r.get("scaling"))

    def cache_shapes(self) -> list[tuple[int, int, int, int]]:
        hd, length = self.manifest["rope"]["head_dim"], self.layout.physical_len
        return [(1, layer["n_kv_heads"], length, hd) for layer in self.manifest["architecture"]["layers"]]

    @property
    def backends(self) -> list[str]:
        return sorted(self.manifest["programs"])

    def program_path(self, backend: str) -> Path:
        programs = self.manifest["programs"]
        if backend not in programs:
            raise PocketLMError(
                f"bundle '{self.root}' has no '{backend}' program; it has: {', '.join(sorted(programs)) or 'none'}"
            )
        return self.root / programs[backend]["file"]

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return tuple(self.manifest["tokenizer"]["stop_token_ids"])

    @property
    def chat_template(self) -> str | None:
        return self.manifest["tokenizer"].get("chat_template")
