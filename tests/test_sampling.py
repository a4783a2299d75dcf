import numpy as np
import pytest

from pocketlm.runtime.chat_template import render
from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.sampling import Sampling, choose

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05]))


def _draws(sampling, n=4000):
    rng = np.random.default_rng(0)
    return np.bincount([choose(LOGITS, sampling, rng) for _ in range(n)], minlength=4) / n


def test_greedy_takes_the_argmax():
    assert choose(LOGITS, Sampling(), np.random.default_rng(0)) == 0


def test_temperature_one_follows_the_distribution():
    assert np.abs(_draws(Sampling(temperature=1.0)) - [0.5, 0.3, 0.15, 0.05]).max() < 0.03


def test_top_k_keeps_only_the_k_best():
    freq = _draws(Sampling(temperature=1.0, top_k=2))
    assert freq[2] == freq[3] == 0 and abs(freq[0] - 0.5 / 0.8) < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    freq = _draws(Sampling(temperature=1.0, top_p=0.7))  # {0.5, 0.3} reaches 0.7
    assert freq[2] == freq[3] == 0 and freq[1] > 0


def test_same_seed_same_tokens():
    a = [choose(LOGITS, Sampling(temperature=1.0), np.random.default_rng(7)) for _ in range(5)]
    b = [choose(LOGITS, Sampling(temperature=1.0), np.random.default_rng(7)) for _ in range(5)]
    assert a == b


def test_bad_settings_are_refused():
    with pytest.raises(PocketLMError, match=r"0 < top_p <= 1"):
        Sampling(top_p=0)


def test_chat_template_renders_in_a_sandbox():
    t = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert render(t, [{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    with pytest.raises(PocketLMError, match=r"no chat template"):
        render(None, [])


def test_streamed_text_pieces_join_to_the_full_decode():
    """Streaming decodes only a short tail per token; the pieces must still add up exactly,
    multi-byte characters and word-boundary spaces included."""
    import numpy as np

    from pocketlm.runtime.generate import TextStream
    from pocketlm.runtime.tokenizer import Tokenizer
    from pocketlm.toolchain.sources import resolve

    tok = Tokenizer(resolve("default").path)
    texts = ["naïve café — 日本語のテキスト 🙂🙂 done.", " leading space and\nnew lines\n\n  indented"]
    rng = np.random.default_rng(0)
    seqs = [tok.encode(t) for t in texts] + [rng.integers(0, tok.vocab_size, 200).tolist()]
    for ids in seqs:
        stream = TextStream(tok)
        pieces = [stream.push(i) for i in ids]
        joined = "".join(pieces)
        full = tok.decode(ids)
        assert full.startswith(joined) and len(full) - len(joined) <= 4  # only an unfinished character held back
        if "\ufffd" not in full:
            assert joined == full
