"""The tokenizer as the runtime sees it: the `tokenizers` library over tokenizer.json, no transformers."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PocketLMError


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise PocketLMError(f"no tokenizer at '{file}'; the folder must hold the model's tokenizer.json")
        self._tok = _Tokenizer.from_file(str(file))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, no special tokens added (templates add their own)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
