"""What an exported bundle holds, as the runtime learns it: only from manifest.json, never from file names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import rope
from .errors import PocketLMError
from .sink_cache import CacheLayout

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, path) -> "Bundle":
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
        return cls(root, manifest)

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
