"""Integer-only mode (scheme w8a8-int) on a tiny model: the quantize stage's record, the ONNX program
against the numpy integer reference (bit for bit, while the cache's ring wraps), nothing in the graph
in floating point, the reference against the float model, and ExecuTorch's XNNPACK int8 program."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from pocketlm.runtime.backends import load_backend
from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.integer.reference import IntegerReferenceBackend
from pocketlm.runtime.session import CachedSession
from pocketlm.runtime.validate import validate_bundle
from pocketlm.toolchain import cli
from pocketlm.toolchain.export import _integer_model, export_bundle
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.quantize import quantize_source
from pocketlm.toolchain.reference import reference_session, rope_freq

from conftest import TINY_VOCAB, tiny_hf_model

LAYOUT = dict(sink_size=4, window_size=12, chunk=5)
STREAM = np.random.default_rng(2).integers(3, TINY_VOCAB, 90).tolist()  # 90 tokens through 16 slots
INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL}


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory, tiny_tokenizer_dir):
    """(float source, w8a8-int folder, bundle with both backends), made once for the module."""
    root = tmp_path_factory.mktemp("w8a8")
    tiny_hf_model().save_pretrained(root / "src")
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", root / "src" / "tokenizer.json")
    folder = quantize_source(root / "src", root / "q", scheme="w8a8-int", calib_seqs=2)
    bundle = export_bundle(folder, root / "bundle", ("onnx", "executorch"), **LAYOUT)
    return root / "src", folder, bundle


def _feed(session, ids):
    return np.concatenate([session.feed(ids[:17], keep_logits=True)] + [session.feed([t], keep_logits=True) for t in ids[17:]])


def test_quantize_records_smoothing_int8_weights_and_activation_ranges(w8a8):
    _, folder, _ = w8a8
    meta = json.loads((folder / "pocketlm_model.json").read_text())
    q = meta["quantization"]
    assert q["scheme"] == "w8a8-int" and q["head"] == "int8" and q["weights"]["bits"] == 8
    assert "smoothquant_alpha" in q["layers"]["model.layers.1.mlp.down_proj"]
    assert q["layers"]["model.embed_tokens"]["bits"] == 8
    ranges = json.loads((folder / q["activation_ranges"]).read_text())
    assert len(ranges["layers"]) == 2 and ranges["residual"] > 0 and all(r["k"] > 0 for r in ranges["layers"])
    smoothing = json.loads((folder / q["smoothquant"]).read_text())
    assert set(smoothing["layers"][0]) == {"qkv", "gate_up", "down"} and "none" in smoothing["head"]["losses"]


def test_integer_onnx_program_equals_the_numpy_reference_bit_for_bit_while_the_ring_wraps(w8a8):
    _, folder, out = w8a8
    bundle = Bundle.open(out)
    program = CachedSession(load_backend(bundle, "onnx"), bundle.layout, bundle.rope_freq)
    model, src = load_model(folder)
    reference = CachedSession(IntegerReferenceBackend(_integer_model(src, model), bundle.layout), bundle.layout, bundle.rope_freq)
    ours, ref = _feed(program, STREAM), _feed(reference, STREAM)
    assert ours.shape == (90, TINY_VOCAB)
    assert np.array_equal(ours, ref)


def test_integer_graph_has_no_floating_point_tensor(w8a8):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(w8a8[2] / "model.onnx")))
    g = model.graph
    types = {i.name: i.data_type for i in g.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]})
    assert types and set(types.values()) <= INTEGER_TYPES, {k: v for k, v in types.items() if v not in INTEGER_TYPES}
    ops = {n.op_type for n in g.node}
    assert "MatMulInteger" in ops and not ops & {"DequantizeLinear", "QuantizeLinear", "Softmax", "Sqrt", "Exp"}


def test_integer_reference_tracks_the_float_model(w8a8):
    _, folder, _ = w8a8
    model, src = load_model(folder)
    bundle_layout = Bundle.open(w8a8[2]).layout
    ref = _feed(reference_session(model, bundle_layout), STREAM)
    ours = _feed(CachedSession(IntegerReferenceBackend(_integer_model(src, model), bundle_layout), bundle_layout,
                               rope_freq(model)), STREAM)
    cosine = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() > 0.999 and (ours.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_w8a8_bundle_validates_exactly_on_onnx_and_closely_on_executorch_int8(w8a8):
    bundle = Bundle.open(w8a8[2])
    onnx_program, et_program = bundle.manifest["programs"]["onnx"], bundle.manifest["programs"]["executorch"]
    assert onnx_program["arithmetic"] == "integer-only" and onnx_program["float_ops"] == []
    assert onnx_program["parity_thresholds"]["max_ppl_delta_pct"] == 2.0
    assert onnx_program["golden"] == "golden_integer.npz" and onnx_program["requant_rounding"] == "gemmlowp-srdhm-rdpot"
    assert et_program["weights"].startswith("int8 per channel, XNNPACK 8da8w")
    report = validate_bundle(bundle.root)
    assert report["passed"], report
    assert report["backends"]["onnx"]["parity"]["max_logits_abs"] == 0.0
    assert 0 < report["backends"]["executorch"]["parity"]["max_logits_abs"] < 0.05


def test_w8a8_settings_that_cannot_hold_are_refused_before_any_work(tiny_hf_folder, tmp_path, capsys, w8a8):
    assert cli.main(["quantize", str(tiny_hf_folder), "--scheme", "w8a8-int", "--qat-steps", "5", "--out", str(tmp_path / "x")]) == 2
    assert "QAT is not available for it" in capsys.readouterr().err
    assert cli.main(["quantize", str(tiny_hf_folder), "--scheme", "w4a8-int", "--qat-steps", "5", "--out", str(tmp_path / "x")]) == 2
    assert "scheme 'w4a8-int' calibrates its activations after PTQ; QAT is not available" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(w8a8[1], broken)
    (broken / "activation_ranges.json").unlink()
    with pytest.raises(PocketLMError, match=r"w8a8-int model without its 'activation_ranges.json'; quantize it again"):
        export_bundle(broken, tmp_path / "b", ("onnx",), **LAYOUT)
    assert not (tmp_path / "b").exists()
