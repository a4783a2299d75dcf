"""The host generation loop over an exported bundle: prefill, then one token at a time, streaming."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import chat_template
from .backends import load_backend
from .bundle import Bundle
from .errors import PocketLMError
from .sampling import Sampling, choose
from .session import CachedSession
from .tokenizer import Tokenizer


@dataclass
class Generation:
    tokens: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float  # prompt in -> first new token chosen
    decode_s: float  # the remaining tokens
    stopped: str  # "stop_token" | "max_new_tokens"
    step_s: list[float] = field(default_factory=list, repr=False)

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0


class TextStream:
    """Turns tokens into text pieces as they come, decoding only a short tail each time (not the whole
    answer, which would make streaming quadratic). A piece is held back while it ends in an incomplete
    multi-byte character; decoding from one token earlier keeps word-boundary spaces right."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.tokens, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self.prefix : self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):]


class Generator:
    def __init__(self, bundle: Bundle | str, backend: str | None = None, threads: int = 2):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.backend = load_backend(self.bundle, backend or self.bundle.backends[0], threads)
        self.session = CachedSession(self.backend, self.bundle.layout, self.bundle.rope_freq)
        self.tokenizer = Tokenizer(self.bundle.root)
        self.stop_ids = set(self.bundle.stop_token_ids)
        self.history: list[int] = []  # every token the cache has seen, for incremental chat

    def reset(self) -> None:
        self.session.reset()
        self.history = []

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 128,
        sampling: Sampling = Sampling(),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continue the conversation in the cache with prompt_ids; stream text pieces to on_text."""
        if not prompt_ids:
            raise PocketLMError("empty prompt: it encodes to zero tokens; pass some text")
        rng = np.random.default_rng(sampling.seed)
        t0 = time.perf_counter()
        logits = self.session.feed(prompt_ids)
        self.history += list(prompt_ids)
        new: list[int] = []
        steps, stopped = [], "max_new_tokens"
        stream = TextStream(self.tokenizer)
        ttft = 0.0
        for i in range(max_new_tokens):
            token = choose(logits, sampling, rng)
            if i == 0:
                ttft = time.perf_counter() - t0
            if token in self.stop_ids:
                stopped = "stop_token"
                break
            new.append(token)
            if on_text:
                piece = stream.push(token)
                if piece:
                    on_text(piece)
            if i + 1 < max_new_tokens:
                ts = time.perf_counter()
                logits = self.session.feed([token])
                steps.append(time.perf_counter() - ts)
                self.history.append(token)  # history is exactly what the cache has seen
        decode_s = time.perf_counter() - t0 - ttft
        return Generation(new, self.tokenizer.decode(new), len(prompt_ids), ttft, decode_s, stopped, steps)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The conversation rendered with the bundle's template, as token ids."""
        tok = self.bundle.manifest["tokenizer"]
        text = chat_template.render(
            self.bundle.chat_template, messages, bos_token=tok.get("bos_token") or "", eos_token=tok.get("eos_token") or ""
        )
        return self.tokenizer.encode(text)  # special-token strings in the text become their ids

    def chat_turn(self, messages: list[dict], **kw) -> Generation:
        """Feed only what the cache has not seen yet (templates are append-only), then answer."""
        ids = self.chat_ids(messages)
        seen = self.history
        if ids[: len(seen)] != seen or len(ids) == len(seen):
            self.reset()
            seen = []
        return self.generate(ids[len(seen):], **kw)
