"""Recipes: unknown keys refused by name; `pocketlm run RECIPE` runs export -> profile -> validate -> report."""

from __future__ import annotations

import json

import pytest

from pocketlm.runtime.errors import PocketLMError
from pocketlm.toolchain import cli
from pocketlm.toolchain.recipe import load_recipe


def test_a_recipe_key_that_does_not_exist_is_refused_by_name(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('source = "default"\n[export]\nbackends = ["onnx"]\nwindow = 60\n')
    with pytest.raises(PocketLMError, match=r"r.toml: unknown key 'window' at \[export\]; allowed keys there: "
                                            r"backends, chunk, sink_size, window_size"):
        load_recipe(bad)
    bad.write_text('sorce = "default"\n')
    with pytest.raises(PocketLMError, match=r"unknown key 'sorce' at top level"):
        load_recipe(bad)


def test_a_missing_or_malformed_recipe_is_refused(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.toml")]) == 2
    assert f"recipe '{tmp_path / 'nope.toml'}' does not exist; pass a TOML file" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("source = \n")
    with pytest.raises(PocketLMError, match="is not valid TOML"):
        load_recipe(bad)


def test_a_recipe_asking_for_a_backend_its_target_lacks_fails_before_any_compute(tmp_path):
    from pocketlm.toolchain.pipeline import run

    r = tmp_path / "r.toml"
    r.write_text('source = "no/such/folder"\ntarget = "android-arm64-xnnpack"\n[export]\nbackends = ["onnx"]\n')
    with pytest.raises(PocketLMError, match="target 'android-arm64-xnnpack' does not support backend 'onnx'"):
        run(load_recipe(r))  # the missing source would fail later: the target check comes first


def test_run_with_a_recipe_exports_profiles_validates_and_reports(tiny_hf_folder, tmp_path, capsys):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        f'source = "{tiny_hf_folder}"\ntarget = "generic-x86-cpu"\nout = "out"\n'
        '[export]\nbackends = ["onnx", "executorch"]\nsink_size = 4\nwindow_size = 12\nchunk = 5\n'
        '[profile]\nthreads = [1]\nnew_tokens = 16\nruns = 1\n'
    )
    assert cli.main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert summary["passed"] and summary["report_html"].endswith("report.html")
    bundle = tmp_path / "out" / "bundle"
    report = json.loads((bundle / "report.json").read_text())
    assert report["cache"] == {"sink_size": 4, "window_size": 12, "chunk": 5}
    # the target's thread count (2) is always profiled, besides the recipe's sweep
    assert {(p["backend"], p["threads"]) for p in report["profile"]["points"]} == {
        ("onnx", 1), ("onnx", 2), ("executorch", 1), ("executorch", 2)}
    assert "validation PASSED" in out and "report:" in out and "decode tok/s" in out


def test_recipe_quantize_table_is_checked_before_any_compute(tmp_path):
    from pocketlm.toolchain.pipeline import run

    r = tmp_path / "r.toml"
    r.write_text('source = "no/such/folder"\n[quantize]\nscheme = "w4-rtn"\ngroup_size = 48\nbits = 4\n')
    with pytest.raises(PocketLMError, match=r"unknown key 'bits' at \[quantize\]"):
        load_recipe(r)
    r.write_text('source = "no/such/folder"\n[quantize]\nscheme = "w3-magic"\n')
    with pytest.raises(PocketLMError, match=r"unknown scheme 'w3-magic'"):
        run(load_recipe(r))
    r.write_text('source = "no/such/folder"\ntarget = "tiny-onnx.toml"\n[quantize]\nscheme = "w4-awq"\n')
    (tmp_path / "tiny-onnx.toml").write_text('name = "tiny-onnx"\nbackend = "onnx"\nthreads = 1\n[cache]\nsink_size = 4\n'
                                              'window_size = 12\nchunk = 5\n[quantization]\nsupported = ["fp32"]\n')
    recipe = load_recipe(r)
    recipe.target = str(tmp_path / "tiny-onnx.toml")
    recipe.export.backends = ["onnx"]
    with pytest.raises(PocketLMError, match=r"target 'tiny-onnx' does not support quantization 'w4-awq'; supported: fp32"):
        run(recipe)


def test_run_with_a_quantize_table_quantizes_then_exports_the_int4_program(tiny_hf_folder, tmp_path, capsys):
    recipe = tmp_path / "q.toml"
    recipe.write_text(
        f'source = "{tiny_hf_folder}"\nout = "out"\n'
        '[quantize]\nscheme = "w4-rtn"\ngroup_size = 16\n'
        '[export]\nbackends = ["onnx"]\nsink_size = 4\nwindow_size = 12\nchunk = 5\n'
        '[profile]\nthreads = [2]\nnew_tokens = 8\nruns = 1\n'
    )
    assert cli.main(["run", str(recipe)]) == 0
    report = json.loads((tmp_path / "out" / "bundle" / "report.json").read_text())
    assert report["quantization"]["scheme"] == "w4-rtn" and report["stages"][0]["stage"] == "quantize"
    assert report["passed"]
    assert (tmp_path / "out" / "quantized" / "pocketlm_model.json").is_file()
