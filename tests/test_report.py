"""Validate, profile and report: the CLI commands, their JSON, the HTML report in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from pocketlm.runtime.report import REPORT_HTML, REPORT_JSON, build_report, write_report
from pocketlm.toolchain import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[1], copy)
    return copy


def test_validate_cli_prints_a_table_writes_json_and_passes_a_fresh_export(bundle, capsys):
    assert cli.main(["validate", str(bundle), "--target", "generic-x86-cpu", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "logits max abs" in out and "decode speed" in out and "validation PASSED" in out
    report = json.loads((bundle / "validation.json").read_text())
    assert report["passed"] and set(report["backends"]) == {"onnx", "executorch"}
    names = {c["check"] for c in report["backends"]["onnx"]["checks"]}
    assert {"logits max abs", "top-1 agreement", "perplexity delta", "file size", "peak memory",
            "time to first token", "decode speed"} <= names


def test_validate_cli_exits_non_zero_on_a_planted_regression(bundle, capsys):
    import numpy as np

    from pocketlm.runtime.bundle import sha256_file

    data = np.frombuffer((bundle / "model.onnx.data").read_bytes(), dtype=np.float32).copy()
    data[: len(data) // 2] *= 1.05
    (bundle / "model.onnx.data").write_bytes(data.tobytes())
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"]["model.onnx.data"] = sha256_file(bundle / "model.onnx.data")
    (bundle / "manifest.json").write_text(json.dumps(m))
    assert cli.main(["validate", str(bundle), "--backend", "onnx", "--json", str(bundle / "v.json")]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert not json.loads((bundle / "v.json").read_text())["passed"]


def test_a_budget_the_bundle_misses_fails_validation(bundle, tmp_path, capsys):
    target = tmp_path / "tiny-phone.toml"
    target.write_text('name = "tiny-phone"\nbackend = "onnx"\nthreads = 1\n[cache]\nsink_size = 4\nwindow_size = 12\n'
                      'chunk = 5\n[budgets]\nmax_file_bytes = 1000\n')
    assert cli.main(["validate", str(bundle), "--target", str(target)]) == 1
    out = capsys.readouterr().out
    assert "file size" in out and "FAIL" in out


def test_validate_refuses_a_target_that_does_not_exist(bundle, capsys):
    assert cli.main(["validate", str(bundle), "--target", "no-such-phone"]) == 2
    assert "target 'no-such-phone' does not exist; known targets: android-arm64-xnnpack, generic-x86-cpu, raspberry-pi-5" in capsys.readouterr().err


def test_profile_measures_each_backend_and_thread_count_in_its_own_process(bundle, capsys):
    assert cli.main(["profile", str(bundle), "--threads", "1", "--threads", "2", "--runs", "2", "--new-tokens", "16"]) == 0
    result = json.loads((bundle / "profile.json").read_text())
    points = {(p["backend"], p["threads"]) for p in result["points"]}
    assert points == {("onnx", 1), ("onnx", 2), ("executorch", 1), ("executorch", 2)}
    for p in result["points"]:
        assert p["ttft_ms"] > 0 and p["first_ttft_ms"] > 0 and p["prefill_tok_s"] > 0 and p["decode_tok_s"] > 0 and len(p["decode_tok_s_runs"]) == 2
        assert p["peak_rss_bytes"] >= p["runtime_imports_rss_bytes"] > 0
    onnx = [p for p in result["points"] if p["backend"] == "onnx"]
    # each point is its own process: the ONNX runtime alone never carries ExecuTorch's torch import
    assert max(p["peak_rss_bytes"] for p in onnx) < min(p["runtime_imports_rss_bytes"] for p in result["points"] if p["backend"] == "executorch")
    sizes = result["files"]["programs"]
    assert sizes["onnx"] == (bundle / "model.onnx").stat().st_size + (bundle / "model.onnx.data").stat().st_size
    assert sizes["executorch"] == (bundle / "model.pte").stat().st_size


def _render(html_path, tmp_path) -> str:
    """The page's DOM after load, as headless Chromium lays it out."""
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                           "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(not CHROMIUM and os.environ.get("CI") != "true", reason="chromium not installed (.ci/run installs it)")
def test_report_renders_its_plots_in_headless_chromium(bundle, tmp_path):
    from pocketlm.runtime.profile import profile_bundle
    from pocketlm.runtime.validate import validate_bundle

    assert CHROMIUM, "CI must have Debian's chromium: .ci/run installs it"
    profile = profile_bundle(bundle, None, [1, 2], runs=1, new_tokens=16)
    validation = validate_bundle(bundle, None, "generic-x86-cpu", threads=1, profile=profile)
    json_path, html_path = write_report(build_report(bundle, validation, profile), tmp_path / "report")
    assert json.loads(json_path.read_text())["passed"] is True
    html = html_path.read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    dom = _render(html_path, tmp_path)
    # 3 latency plots, 2 error histograms, 1 perplexity-by-position plot, each laid out with content
    assert 'data-plots-rendered="6"' in dom
    for name in ("latency-decode", "latency-prefill", "latency-ttft", "error-onnx", "error-executorch", "ppl-position"):
        assert f'data-plot="{name}"' in dom
    assert "Validation PASSED" in dom and "time to first token" in dom


def test_report_cli_builds_from_the_json_of_validate_and_profile(bundle, capsys):
    assert cli.main(["report", str(bundle)]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert cli.main(["profile", str(bundle), "--backend", "onnx", "--threads", "1", "--runs", "1", "--new-tokens", "8"]) == 0
    assert cli.main(["report", str(bundle)]) == 0
    assert (bundle / REPORT_HTML).is_file() and json.loads((bundle / REPORT_JSON).read_text())["validation"] is None


def test_anonymous_rss_leaves_out_pages_of_mapped_files(tmp_path):
    """Flatness is judged on allocated memory: weights mapped from a file become resident as they are
    first read (ONNX Runtime's external data), which is not growth of the program's own memory."""
    import mmap

    from pocketlm.runtime.profile import anon_rss_bytes, rss_bytes

    size = 64 * 2**20
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x01" * size)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        rss0, anon0 = rss_bytes(), anon_rss_bytes()
        touched = sum(mapped[i] for i in range(0, size, 4096))  # fault every page in
        rss1, anon1 = rss_bytes(), anon_rss_bytes()
    assert touched == size // 4096
    assert rss1 - rss0 > 48 * 2**20 and anon1 - anon0 < 16 * 2**20
    # a fresh anonymous mapping (not the heap, whose freed pages may still be resident) does count
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as allocated:
        allocated.write(b"\x01" * size)
        assert anon_rss_bytes() - anon1 > 48 * 2**20
