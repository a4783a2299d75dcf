"""Integer-only W4A8 (scheme w4a8-int) on a tiny model: int4 group-wise weights inside the integer
program (each group's int32 accumulator weighted by its Q15 scale share), the ONNX program against
the numpy integer reference bit for bit while the ring wraps, the weights stored packed as INT4,
ExecuTorch's XNNPACK 8da4w program of the same weights, and one int8 table for the tied LM head and
the embedding lookup."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from pocketlm.runtime.backends import load_backend
from pocketlm.runtime.bundle import Bundle
from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.integer import arith as A
from pocketlm.runtime.integer.model import linear
from pocketlm.runtime.integer.ops import NumpyOps
from pocketlm.runtime.integer.reference import IntegerReferenceBackend
from pocketlm.runtime.session import CachedSession
from pocketlm.runtime.validate import validate_bundle
from pocketlm.toolchain.export import _integer_model, export_bundle
from pocketlm.toolchain.export.integer_program import _linear
from pocketlm.toolchain.load import load_model
from pocketlm.toolchain.quant.rtn import WeightQuantSpec, fake_quant
from pocketlm.toolchain.quantize import quantize_source

from conftest import TINY_VOCAB, tiny_hf_model

LAYOUT = dict(sink_size=4, window_size=12, chunk=5)
STREAM = np.random.default_rng(3).integers(3, TINY_VOCAB, 90).tolist()  # 90 tokens through 16 slots
GROUP = 32
# every linear's input width (96, 128) is a multiple of 32, as XNNPACK's int4 kernels need
SHAPE = dict(hidden_size=96, intermediate_size=128, head_dim=16)


@pytest.fixture(scope="module")
def w4a8(tmp_path_factory, tiny_tokenizer_dir):
    """(w4a8-int folder, bundle with both backends), made once for the module."""
    root = tmp_path_factory.mktemp("w4a8")
    tiny_hf_model(**SHAPE).save_pretrained(root / "src")
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", root / "src" / "tokenizer.json")
    folder = quantize_source(root / "src", root / "q", scheme="w4a8-int", group_size=GROUP, calib_seqs=2)
    bundle = export_bundle(folder, root / "bundle", ("onnx", "executorch"), **LAYOUT)
    return folder, bundle


def _feed(session, ids):
    return np.concatenate([session.feed(ids[:17], keep_logits=True)] + [session.feed([t], keep_logits=True) for t in ids[17:]])


def test_grouped_int4_linear_computes_the_dequantized_product():
    """int8 per-token codes x int4 group codes, group shares in Q15, requantized: the real product
    to within the output's rounding (s_out) and the group shares' (2^-15 of a row's largest)."""
    torch.manual_seed(0)
    w = fake_quant(torch.randn(48, 128) * torch.linspace(0.1, 3.0, 128), WeightQuantSpec(4, GROUP, True))
    x = torch.randn(5, 128).double().numpy()
    s_unit, s_out = 1e-6, 1e-3  # the int32 input's scale (as an RMSNorm output's), the output's
    lin = _linear([w], s_unit, [s_out], group_size=GROUP)
    assert lin.weight.shape == (128 // GROUP, GROUP, 48) and lin.group_factor.max() == 1 << 15
    amax = np.rint(np.abs(x).max(1, keepdims=True) / s_unit).astype(np.int64)  # per token, in units of s_unit
    codes = np.rint(x / (amax * s_unit) * A.ACT_QMAX).astype(np.int8)
    y = linear(NumpyOps(), lin, codes, amax, "t").astype(np.float64) * s_out
    expected = (codes * amax * s_unit / A.ACT_QMAX) @ w.double().numpy().T
    assert np.abs(y - expected).max() < s_out + 1e-4 * np.abs(expected).max()


def test_quantize_records_int4_groups_awq_and_one_int8_table_for_the_tied_head_and_embedding(w4a8):
    folder, _ = w4a8
    q = json.loads((folder / "pocketlm_model.json").read_text())["quantization"]
    assert q["scheme"] == "w4a8-int" and q["weights"] == {"bits": 4, "group_size": GROUP, "symmetric": True}
    assert q["head"] == "int8" and q["layers"]["lm_head"]["bits"] == 8
    assert q["layers"]["model.embed_tokens"] == {"bits": 8, "group_size": None, "symmetric": True, "tied_to": "lm_head"}
    assert q["layers"]["model.layers.0.mlp.down_proj"]["bits"] == 4 and "awq" in q["layers"]["model.layers.0.mlp.down_proj"]
    assert "rotation" not in json.loads((folder / "awq.json").read_text())["info"] and "smoothquant" not in q
    model, _ = load_model(folder)
    assert model.config.tie_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_w4a8_onnx_program_equals_the_numpy_reference_bit_for_bit_while_the_ring_wraps(w4a8):
    folder, out = w4a8
    bundle = Bundle.open(out)
    program = CachedSession(load_backend(bundle, "onnx"), bundle.layout, bundle.rope_freq)
    model, src = load_model(folder)
    integer = _integer_model(src, model)
    assert sum(lin.group_factor is not None for lin in integer.linears().values()) == 8  # all but the LM head
    reference = CachedSession(IntegerReferenceBackend(integer, bundle.layout), bundle.layout, bundle.rope_freq)
    ours, ref = _feed(program, STREAM), _feed(reference, STREAM)
    assert ours.shape == (90, TINY_VOCAB)
    assert np.array_equal(ours, ref)


def test_w4a8_weights_are_stored_packed_as_int4_and_nothing_is_float(w4a8):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(w4a8[1] / "model.onnx")))
    g = model.graph
    int4 = [i for i in g.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 8
    int8 = [i for i in g.initializer if i.data_type == onnx.TensorProto.INT8 and TINY_VOCAB in i.dims]
    assert [list(i.dims) for i in int8] == [[SHAPE["hidden_size"], TINY_VOCAB]]  # the head's table, gathered for the lookup too
    for init in int4:  # two codes per byte
        assert len(init.raw_data) == (np.prod(init.dims) + 1) // 2
    allowed = {onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
               onnx.TensorProto.INT64, onnx.TensorProto.BOOL}
    types = {i.name: i.data_type for i in g.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]})
    assert set(types.values()) <= allowed


def test_w4a8_bundle_validates_exactly_on_onnx_and_closely_on_executorch_8da4w(w4a8):
    bundle = Bundle.open(w4a8[1])
    onnx_program, et_program = bundle.manifest["programs"]["onnx"], bundle.manifest["programs"]["executorch"]
    assert onnx_program["arithmetic"] == "integer-only"
    assert onnx_program["parity_thresholds"]["max_ppl_delta_pct"] == 4.0  # W8A8's is 2.0: see INTEGER_PARITY_W4
    assert onnx_program["weights"] == f"int4 groups of {GROUP} in 8 matmuls, int8 per output channel in 1 matmul; embedding int8 per row (the LM head table, shared)"
    assert et_program["weights"].startswith(f"int4 XNNPACK 8da4w, group {GROUP}, 8 linears + int8 per channel, XNNPACK 8da8w, 1 linear")
    report = validate_bundle(bundle.root)
    assert report["passed"], report
    assert report["backends"]["onnx"]["parity"]["max_logits_abs"] == 0.0


def test_an_awq_result_is_re_applied_to_the_unrotated_model_it_was_searched_on(w4a8, tmp_path):
    """w4a8-int searches AWQ on the float model as w4-awq does, so either's awq.json fits the other;
    a search from the rotated w4a8-int of earlier versions is refused."""
    folder, _ = w4a8
    src = folder.parent / "src"
    again = quantize_source(src, tmp_path / "again", scheme="w4a8-int", group_size=GROUP, calib_seqs=2,
                            awq_results=folder / "awq.json")
    first, second = load_model(folder)[0].state_dict(), load_model(again)[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    w4 = quantize_source(src, tmp_path / "w4", scheme="w4-awq", group_size=GROUP, head="int8", awq_results=folder / "awq.json")
    w4_state = load_model(w4)[0].state_dict()
    assert all(torch.equal(first[k], w4_state[k]) for k in first)
    rotated = json.loads((folder / "awq.json").read_text())
    rotated["info"]["rotation"] = {"method": "random orthogonal residual rotation, norm gains folded", "seed": 0}
    (tmp_path / "rotated.json").write_text(json.dumps(rotated))
    with pytest.raises(PocketLMError, match=r"searched on a rotated model \(an earlier w4a8-int\); its scales do not fit 'w4a8-int'"):
        quantize_source(src, tmp_path / "x", scheme="w4a8-int", group_size=GROUP, awq_results=tmp_path / "rotated.json")
    assert not (tmp_path / "x").exists()
