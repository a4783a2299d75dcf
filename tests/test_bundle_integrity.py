"""A bundle proves what it holds: hashes checked on open, golden outputs recorded at export time,
and a validator that catches weights altered after export even when the hashes are redone."""

import json
import shutil

import numpy as np
import pytest

from pocketlm.runtime.bundle import Bundle, sha256_file
from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.targets import available, load_target
from pocketlm.runtime.validate import validate_backend


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle[1], tmp_path / "b")


def _rehash(root):
    m = json.loads((root / "manifest.json").read_text())
    m["files"] = {name: sha256_file(root / name) for name in m["files"]}
    (root / "manifest.json").write_text(json.dumps(m))


def test_golden_outputs_are_recorded_without_pickles(copy):
    golden = Bundle.open(copy).golden()
    assert golden["logits_0"].shape[0] == golden["greedy_0"].shape[0] == 32
    assert golden["prompt_ids_1"].dtype == np.int64


def test_altered_program_is_refused(copy):
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(PocketLMError, match=r"'model.onnx.data' in bundle .* does not match the sha256 in its manifest"):
        Bundle.open(copy)


def test_truncated_program_is_refused(copy):
    pte = copy / "model.pte"
    pte.write_bytes(pte.read_bytes()[:1000])
    with pytest.raises(PocketLMError, match=r"'model.pte' .* altered or truncated"):
        Bundle.open(copy)


def test_missing_tokenizer_is_refused(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(PocketLMError, match=r"missing its tokenizer 'tokenizer.json'"):
        Bundle.open(copy)


def test_manifest_entry_outside_the_bundle_is_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["programs"]["onnx"]["file"] = "../x"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PocketLMError, match=r"manifest entry '../x' points outside the bundle"):
        Bundle.open(copy)


@pytest.mark.parametrize("backend", ["onnx", "executorch"])
def test_fresh_export_passes_parity_against_its_golden_outputs(copy, backend):
    report = validate_backend(Bundle.open(copy), backend)
    assert report["passed"], report["checks"]
    assert report["parity"]["max_logits_abs"] < 1e-4
    assert abs(report["perplexity"]["delta_pct"]) < 0.01


def test_weights_altered_after_export_fail_parity_even_with_redone_hashes(copy):
    data = np.frombuffer((copy / "model.onnx.data").read_bytes(), dtype=np.float32).copy()
    data[: len(data) // 2] *= 1.05  # a planted regression: 5% on half the weights
    (copy / "model.onnx.data").write_bytes(data.tobytes())
    _rehash(copy)
    report = validate_backend(Bundle.open(copy), "onnx")
    assert not report["passed"]
    assert report["parity"]["max_logits_abs"] > 1e-3


def test_target_profiles_load_and_refuse_unsupported_requests(tmp_path):
    assert {"generic-x86-cpu", "android-arm64-xnnpack", "raspberry-pi-5"} <= set(available())
    phone = load_target("android-arm64-xnnpack")
    assert phone.backend == "executorch" and phone.cache["sink_size"] == 4
    with pytest.raises(PocketLMError, match=r"does not support backend 'onnx'; it runs executorch"):
        phone.check_request(backends=["onnx"])
    with pytest.raises(PocketLMError, match=r"target 'no-such-phone' does not exist; known targets: android-arm64-xnnpack"):
        load_target("no-such-phone")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nbackend = "onnx"\nthreads = 2\nturbo = true\n[cache]\nsink_size = 4\n')
    with pytest.raises(PocketLMError, match=r"unknown key 'turbo' at top level"):
        load_target(str(bad))
