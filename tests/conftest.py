"""Shared fixtures: tiny models built in code from real configs' shapes, and the real default model
loaded once per test session (converted from its GGUF once, then read from the cache)."""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

# Two threads, or one per worker when xdist runs two (`make test`): two workers of two threads each on
# a 2-core machine spin in each other's OpenMP barriers.
torch.set_num_threads(2 if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") == "1" else 1)

TINY_VOCAB = 320


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and on a loaded machine every OpenMP barrier waits for
    a busy core (16 ms per tiny linear at 2 threads); restore conftest's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_hf_config(model_type: str = "llama", **overrides):
    """A SmolLM2-shaped (GQA 3:1, tied) config, shrunk: 2 layers, dim 48, head_dim 16 (six heads of 16: q is wider than dim)."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,  # ONNX Runtime's GroupQueryAttention rotates heads of a multiple of 16
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(model_type, **overrides), dtype=torch.float32)
    # Random init leaves norms at 1; perturb them so a norm bug cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained in-process on the default prose (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pocketlm.runtime.text import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([load_text(None, "train")[:200_000]], trainer)
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def tiny_hf_folder(tmp_path, tiny_tokenizer_dir) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_hf_model().save_pretrained(folder)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def real():
    """The real default model (SmolLM2-135M-Instruct): pocketlm's Transformer, the HF reference, tokenizer."""
    from pocketlm.toolchain.load import load_hf_model, load_model, load_tokenizer

    model, source = load_model("default")
    return types.SimpleNamespace(
        source=source, model=model, hf=load_hf_model(source), tokenizer=load_tokenizer(source)
    )


REAL_LAYOUT = dict(sink_size=4, window_size=60, chunk=16)  # 64 slots: 256+ tokens wrap the ring 4 times
# `make test` runs two xdist workers, a test file per work unit: these files (each holding every test of
# one real-model bundle, so each bundle is exported once) go first, longest first, so that both workers
# start on one and the short files fill in after
HEAVY_FIRST = ("test_quantize_real_model.py", "test_integer_real_model.py", "test_export_real_model.py")


def pytest_collection_modifyitems(items):
    heavy = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: heavy.get(item.path.name, len(heavy)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def real_stream(real):
    """The first 200 tokens of the default eval text."""
    from pocketlm.runtime.text import load_text
    from pocketlm.runtime.tokenizer import Tokenizer

    return Tokenizer(real.source.path).encode(load_text(None, "eval"))[:200]


def teacher_forced(session, stream):
    """A 100-token prompt (7 chunks of 16), then 100 single-token steps: 200 tokens through 64 slots."""
    return np.concatenate([session.feed(stream[:100], keep_logits=True)] + [session.feed([t], keep_logits=True) for t in stream[100:]])


@pytest.fixture(scope="session")
def real_bundle(real, tmp_path_factory):
    """The default model in float32, exported once per test session to ONNX: the exact parity checks
    against PyTorch (test_export_real_model.py). ExecuTorch meets the real model in real_int4_bundle
    (one ExecuTorch lowering of the 135M model a session: it is the slowest step of the suite)."""
    from pocketlm.toolchain.export import export_bundle

    return export_bundle(real.source, tmp_path_factory.mktemp("real") / "bundle", ("onnx",), **REAL_LAYOUT)


@pytest.fixture(scope="session")
def real_awq_g64(real, tmp_path_factory):
    """The default model quantized w4-awq g64 with the int8 head (the fast bundle's weights) and CI's
    cheaper AWQ search, once per session (per worker: the int4 and the integer files each search); its
    awq.json re-applies to w4a8-int (both search on the float model) and to an int4 head (the search
    clips the head too), so a worker pays for the search once."""
    from pocketlm.toolchain.quant.awq import AwqConfig
    from pocketlm.toolchain.quantize import quantize_source

    # cheaper than the default search (which the benchmark uses), so the suite stays fast
    ci_awq = AwqConfig(n_grid=10, clip_grid=10, search_tokens=1024, gram_tokens=2048, head=True)
    return quantize_source(real.source, tmp_path_factory.mktemp("awq") / "w4-awq", scheme="w4-awq", group_size=64,
                           head="int8", awq_config=ci_awq, calib_seqs=4)


@pytest.fixture(scope="session")
def real_int4_bundle(real_awq_g64, tmp_path_factory):
    """The fast int4 bundle a phone gets (w4-awq g64, int8 head) exported once per session to both
    backends, with the small cache (64 slots) so that the real-model tests wrap its ring; its tests
    are all in test_quantize_real_model.py (one worker exports it)."""
    from pocketlm.toolchain.export import export_bundle

    return export_bundle(real_awq_g64, tmp_path_factory.mktemp("real_int4") / "bundle", ("onnx", "executorch"), **REAL_LAYOUT)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random model exported once to both backends: (source folder, bundle folder)."""
    from pocketlm.toolchain.export import export_bundle

    folder = tmp_path_factory.mktemp("src") / "tiny"
    tiny_hf_model().save_pretrained(folder)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    out = export_bundle(folder, tmp_path_factory.mktemp("b") / "bundle", ("onnx", "executorch"), sink_size=4, window_size=12, chunk=5)
    return folder, out
