"""Text for calibration and evaluation: the default prose shipped with Python, or the user's files.

Splits are deterministic and content-addressed: a document lands in train, calibration or eval by
the hash of its text, so adding a document never moves another one between splits.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .errors import PocketLMError

SPLITS = ("train", "calib", "eval", "all")
_EVAL_BUCKETS, _CALIB_BUCKETS = (0, 1), (2,)  # of 10 buckets: eval 20%, calib 10%, train 70%


def default_documents() -> list[str]:
    """Python's own documentation topics (pydoc_data.topics): real English prose, always present."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def file_documents(path: str | os.PathLike) -> list[str]:
    """A user's text file, as paragraphs (blank-line separated)."""
    p = Path(path)
    if not p.is_file():
        raise PocketLMError(f"text file '{path}' does not exist; pass a UTF-8 text file with --text")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PocketLMError(f"text file '{path}' is not UTF-8 text; convert it to UTF-8") from None
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise PocketLMError(f"text file '{path}' is empty; pass a file with some prose in it")
    return docs


def _bucket(doc: str) -> int:
    return int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:4], "little") % 10


def split_documents(docs: list[str], split: str) -> list[str]:
    if split not in SPLITS:
        raise PocketLMError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if split == "all":
        return docs
    if split == "eval":
        return [d for d in docs if _bucket(d) in _EVAL_BUCKETS]
    if split == "calib":
        return [d for d in docs if _bucket(d) in _CALIB_BUCKETS]
    return [d for d in docs if _bucket(d) not in _EVAL_BUCKETS + _CALIB_BUCKETS]


def load_text(path: str | os.PathLike | None = None, split: str = "all") -> str:
    """The text of one split; path None means the default prose."""
    docs = default_documents() if path is None else file_documents(path)
    return "\n\n".join(split_documents(docs, split))


def token_windows(ids: np.ndarray, window: int, max_tokens: int | None = None) -> np.ndarray:
    """Cut a token stream into non-overlapping full windows: [n_windows, window]."""
    ids = np.asarray(ids, dtype=np.int64)[: max_tokens or None]
    n = len(ids) // window
    if n == 0:
        raise PocketLMError(f"the text has {len(ids)} tokens, fewer than one window of {window}; pass more text")
    return ids[: n * window].reshape(n, window)
