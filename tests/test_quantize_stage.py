"""`pocketlm quantize` as a stage: a model folder every later stage accepts, decisions on record,
AWQ results re-applicable, bad settings refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pocketlm.runtime.errors import PocketLMError
from pocketlm.toolchain import cli
from pocketlm.toolchain.quant.awq import AwqConfig
from pocketlm.toolchain.quantize import quantize_source

FAST_AWQ = AwqConfig(n_grid=5, clip_grid=10, search_tokens=256, gram_tokens=512)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    pass


def test_quantized_folder_is_a_source_for_eval_and_records_every_decision(tiny_hf_folder, tmp_path, capsys):
    out = quantize_source(tiny_hf_folder, tmp_path / "q", scheme="w4-awq", group_size=16, awq_config=FAST_AWQ, calib_seqs=2)
    meta = json.loads((out / "pocketlm_model.json").read_text())
    q = meta["quantization"]
    assert q["scheme"] == "w4-awq" and q["weights"] == {"bits": 4, "group_size": 16, "symmetric": True}
    assert q["layers"]["model.layers.0.mlp.down_proj"]["bits"] == 4
    # the tied head's explicit choice: int8 per output channel unless asked otherwise
    assert q["head"] == "int8" and q["layers"]["lm_head"]["bits"] == 8 and q["layers"]["lm_head"]["group_size"] is None
    assert meta["stages"][-1]["stage"] == "quantize" and meta["stages"][-1]["awq_results"] == "awq.json"
    # weights lie on the int4 grid: at most 2*7+1 distinct values per 16-weight group
    w = load_file(str(out / "model.safetensors"))["model.layers.1.self_attn.o_proj.weight"]
    assert max(len(torch.unique(g)) for g in w.reshape(-1, 16)) <= 15
    assert cli.main(["eval", str(out), "--max-tokens", "512", "--ctx", "128"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_saved_awq_results_reproduce_the_same_weights(tiny_hf_folder, tmp_path):
    first = quantize_source(tiny_hf_folder, tmp_path / "a", scheme="w4-awq", group_size=16, awq_config=FAST_AWQ, calib_seqs=2)
    again = quantize_source(tiny_hf_folder, tmp_path / "b", scheme="w4-awq", group_size=16, awq_results=first / "awq.json")
    a, b = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PocketLMError, match=r"was searched for int4 g16 sym, not int4 g8 sym"):
        quantize_source(tiny_hf_folder, tmp_path / "c", scheme="w4-awq", group_size=8, awq_results=first / "awq.json")


@pytest.mark.parametrize("onnx_int4", ["int8", "float", "off"])
def test_export_of_an_int4_folder_runs_matmulnbits_and_passes_parity(tiny_hf_folder, tmp_path, onnx_int4):
    import onnx

    from pocketlm.runtime.bundle import Bundle
    from pocketlm.runtime.validate import validate_backend
    from pocketlm.toolchain.export import export_bundle

    q = quantize_source(tiny_hf_folder, tmp_path / "q", scheme="w4-rtn", group_size=16, head="float")
    bundle = Bundle.open(export_bundle(q, tmp_path / "bundle", ("onnx",), sink_size=4, window_size=12, chunk=5, onnx_int4=onnx_int4))
    m = bundle.manifest
    assert m["quantization"]["scheme"] == "w4-rtn" and m["stages"][0]["stage"] == "quantize"
    assert m["quantization"]["layers"]["model.layers.0.self_attn.q_proj"]["group_size"] == 16
    nodes = onnx.load(str(bundle.root / "model.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    # 2 layers x 4 linears (q|k|v and gate|up fused) become MatMulNBits; the float (tied) LM head stays a MatMul
    assert ops.count("MatMulNBits") == (0 if onnx_int4 == "off" else 8)
    report = validate_backend(bundle, "onnx")
    assert report["passed"], report["checks"]
    if onnx_int4 != "int8":  # same weights, float activations: as close as the float program
        assert report["parity"]["max_logits_abs"] < 1e-4


def test_bad_quantization_settings_are_refused_by_name(tiny_hf_folder, tmp_path, capsys):
    assert cli.main(["quantize", str(tiny_hf_folder), "--scheme", "w3-magic", "--out", str(tmp_path / "x")]) == 2
    assert "unknown scheme 'w3-magic'; choose from w8-rtn, w4-rtn, w4-awq" in capsys.readouterr().err
    assert cli.main(["quantize", str(tiny_hf_folder), "--scheme", "w4-rtn", "--group-size", "40", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "group size 40" in err and "48" in err
    assert not (tmp_path / "x").exists()  # nothing half-written
    q = quantize_source(tiny_hf_folder, tmp_path / "q", scheme="w8-rtn")
    with pytest.raises(PocketLMError, match=r"is already quantized \(w8-rtn\); quantize the float model instead"):
        quantize_source(q, tmp_path / "qq", scheme="w4-rtn", group_size=16)


def test_executorch_runs_int4_sources_as_xnnpack_8da4w_with_the_stage_codes(tiny_tokenizer_dir, tmp_path):
    """Groups of 32 (XNNPACK's multiple): every linear but the float head is delegated as 8da4w, with the
    quantize stage's own codes; parity against the float reference within the int8-activation bounds."""
    import shutil

    from conftest import tiny_hf_model

    from pocketlm.runtime.bundle import Bundle
    from pocketlm.runtime.validate import validate_backend
    from pocketlm.toolchain.export import export_bundle

    src = tmp_path / "tiny64"
    tiny_hf_model(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2).save_pretrained(src)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    q = quantize_source(src, tmp_path / "q", scheme="w4-rtn", group_size=32, head="float")
    bundle = Bundle.open(export_bundle(q, tmp_path / "bundle", ("executorch",), sink_size=4, window_size=12, chunk=5))
    program = bundle.manifest["programs"]["executorch"]
    assert program["weights"] == "int4 XNNPACK 8da4w, group 32, 8 linears"
    report = validate_backend(bundle, "executorch")
    assert report["passed"], report["checks"]
    assert 0 < report["parity"]["max_logits_abs"] < 0.05  # int8 activations: close, not exact


def test_each_scheme_gets_the_head_it_can_run_and_a_head_it_cannot_is_refused(tiny_hf_folder, tmp_path, capsys):
    from pocketlm.toolchain.quantize import SCHEMES, scheme_head

    assert [scheme_head(SCHEMES[s], None) for s in ("w4-rtn", "w4-awq", "w8-rtn", "w8a8-int", "w4a8-int", "w2-ternary")] == \
        ["int8"] * 5 + ["float"]
    assert scheme_head(SCHEMES["w4-rtn"], "same") == "same" and scheme_head(SCHEMES["w4-awq"], "float") == "float"
    with pytest.raises(PocketLMError, match=r"scheme 'w8a8-int' is integer-only: .* drop --head float"):
        quantize_source(tiny_hf_folder, tmp_path / "i", scheme="w8a8-int", head="float")
    with pytest.raises(PocketLMError, match=r"scheme 'w2-ternary' keeps the LM head float .* drop --head int8"):
        quantize_source(tiny_hf_folder, tmp_path / "t", scheme="w2-ternary", head="int8", qat_steps=2)
    assert cli.main(["quantize", str(tiny_hf_folder), "--scheme", "w4-rtn", "--group-size", "16", "--head", "float",
                     "--out", str(tmp_path / "f")]) == 0
    q = json.loads((tmp_path / "f" / "pocketlm_model.json").read_text())["quantization"]
    assert q["head"] == "float" and q["layers"]["lm_head"].get("float") is True
    assert not (tmp_path / "i").exists() and not (tmp_path / "t").exists()


def test_executorch_int4_refuses_groups_xnnpack_cannot_run_before_any_export(tiny_hf_folder, tmp_path):
    from pocketlm.toolchain.export import export_bundle

    q = quantize_source(tiny_hf_folder, tmp_path / "q", scheme="w4-rtn", group_size=16)
    with pytest.raises(PocketLMError, match=r"needs a group size that is a multiple of 32; .* has groups of 16"):
        export_bundle(q, tmp_path / "bundle", ("onnx", "executorch"), sink_size=4, window_size=12, chunk=5)
    assert not (tmp_path / "bundle").exists()


def test_an_int8_head_runs_as_8bit_kernels_next_to_the_int4_linears(tiny_tokenizer_dir, tmp_path):
    """--head int8 with int4 linears: ONNX Runtime gets an 8-bit MatMulNBits for the LM head and
    ExecuTorch an XNNPACK 8da8w linear, both with the quantize stage's codes; parity still holds."""
    import shutil

    import onnx

    from conftest import tiny_hf_model

    from pocketlm.runtime.bundle import Bundle
    from pocketlm.runtime.validate import validate_bundle
    from pocketlm.toolchain.export import export_bundle

    src = tmp_path / "tiny64"
    tiny_hf_model(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2).save_pretrained(src)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    q = quantize_source(src, tmp_path / "q", scheme="w4-rtn", group_size=32, head="int8")
    bundle = Bundle.open(export_bundle(q, tmp_path / "bundle", ("onnx", "executorch"), sink_size=4, window_size=12, chunk=5))
    programs = bundle.manifest["programs"]
    assert programs["onnx"]["weights"] == ("int4 MatMulNBits, group 32, 8 matmuls + int8 per channel MatMulNBits, 1 matmul; "
                                           "embedding int8 (the LM head's codes, GatherBlockQuantized)")
    assert programs["executorch"]["weights"] == ("int4 XNNPACK 8da4w, group 32, 8 linears + int8 per channel, XNNPACK 8da8w, "
                                                 "1 linear; embedding int8 (embedding_byte)")
    nodes = onnx.load(str(bundle.root / "model.onnx"), load_external_data=False).graph.node
    assert sorted(a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits") == [4] * 8 + [8]
    _assert_the_lookup_reads_the_heads_codes(bundle, bits=8)
    report = validate_bundle(bundle.root)
    assert report["passed"], report


def _assert_the_lookup_reads_the_heads_codes(bundle, bits: int):
    """The tied embedding is one packed table: the head's MatMulNBits and the lookup's
    GatherBlockQuantized read the same initializer, and no float copy of the table is left."""
    import onnx

    from conftest import TINY_VOCAB

    graph = onnx.load(str(bundle.root / "model.onnx"), load_external_data=False).graph
    attr = lambda node, name: next(a.i for a in node.attribute if a.name == name)  # noqa: E731
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and attr(n, "N") == TINY_VOCAB]
    lookups = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(heads) == 1 and attr(heads[0], "bits") == bits
    assert [n.input[0] for n in lookups] == [heads[0].input[1]] and attr(lookups[0], "bits") == bits
    assert not [n for n in graph.node if n.op_type == "Gather" and n.input[0] in {i.name for i in graph.initializer}
                and onnx.TensorProto.FLOAT == next(i.data_type for i in graph.initializer if i.name == n.input[0])]


def test_an_int4_head_leaves_one_int4_table_for_the_head_and_the_lookup(tiny_tokenizer_dir, tmp_path):
    import shutil

    from conftest import tiny_hf_model

    from pocketlm.runtime.bundle import Bundle
    from pocketlm.runtime.validate import validate_bundle
    from pocketlm.toolchain.export import export_bundle

    src = tmp_path / "tiny64"
    tiny_hf_model(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2).save_pretrained(src)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    q = quantize_source(src, tmp_path / "q", scheme="w4-rtn", group_size=32, head="same")
    bundle = Bundle.open(export_bundle(q, tmp_path / "bundle", ("onnx", "executorch"), sink_size=4, window_size=12, chunk=5))
    assert bundle.manifest["programs"]["executorch"]["weights"] == "int4 XNNPACK 8da4w, group 32, 9 linears; embedding int4 (embedding_4bit)"
    assert bundle.manifest["programs"]["onnx"]["weights"] == ("int4 MatMulNBits, group 32, 9 matmuls; "
                                                              "embedding int4 (the LM head's codes, GatherBlockQuantized)")
    _assert_the_lookup_reads_the_heads_codes(bundle, bits=4)
    report = validate_bundle(bundle.root)
    assert report["passed"], report
