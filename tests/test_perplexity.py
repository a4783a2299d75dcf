import math

import numpy as np
import pytest
import torch

from pocketlm.runtime import perplexity as P
from pocketlm.runtime.errors import PocketLMError
from pocketlm.toolchain.evaluate import eval_text_ids, evaluate_perplexity, torch_logits_fn


def test_uniform_logits_give_the_vocabulary_size():
    r = P.perplexity(lambda ids: np.zeros((len(ids), 50), np.float32), np.arange(1000) % 50, ctx=64)
    assert r.ppl == pytest.approx(50.0, rel=1e-9)


def test_every_token_but_each_windows_first_is_scored():
    r = P.perplexity(lambda ids: np.zeros((len(ids), 8), np.float32), np.zeros(1000, np.int64), ctx=64, max_tokens=300)
    # windows of 64,64,64,64,44 -> 63*4 + 43 scored
    assert (r.windows, r.tokens) == (5, 63 * 4 + 43)


def test_token_nll_equals_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((33, 1000)) * 5).astype(np.float32)
    ids = rng.integers(0, 1000, 33)
    ours = P.token_nll(logits, ids)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]).double(), torch.from_numpy(ids[1:]), reduction="none")
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_too_little_text_is_refused():
    with pytest.raises(PocketLMError, match=r"at least 2"):
        P.perplexity(lambda ids: None, [5], ctx=64)
    with pytest.raises(PocketLMError, match=r"--ctx must be at least 2"):
        P.eval_windows([1, 2, 3], 1)


def test_tiny_model_perplexity_from_a_text_file(tiny_hf_folder, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    ours = evaluate_perplexity(tiny_hf_folder, text=f, ctx=64, max_tokens=512, show_progress=False)
    hf = evaluate_perplexity(tiny_hf_folder, text=f, ctx=64, max_tokens=512, reference="hf", show_progress=False)
    assert ours.tokens == 512 - 8 and math.isfinite(ours.ppl)
    assert ours.ppl == pytest.approx(hf.ppl, rel=1e-5)


@pytest.mark.real_model
def test_real_model_perplexity_agrees_with_hugging_face(real):
    ids = eval_text_ids(real.source, None)
    ours = P.perplexity(torch_logits_fn(real.model), ids, ctx=256, max_tokens=2048)
    hf = P.perplexity(torch_logits_fn(real.hf, hf=True), ids, ctx=256, max_tokens=2048)
    assert ours.tokens == hf.tokens == 2048 - 8
    assert abs(ours.ppl / hf.ppl - 1) < 0.005
    assert 5 < ours.ppl < 40  # a working 135M model on English prose, not a broken one
