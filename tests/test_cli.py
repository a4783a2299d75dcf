import json

import pytest

from pocketlm.toolchain import cli


def test_eval_prints_and_writes_json(tiny_hf_folder, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("Some prose to score, over and over again. " * 100)
    out = tmp_path / "r" / "ppl.json"
    rc = cli.main(["eval", str(tiny_hf_folder), "--text", str(f), "--ctx", "32", "--max-tokens", "256", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["tokens"] == 256 - 8 and report["ppl"] > 1
    assert "perplexity" in capsys.readouterr().out


def test_bad_source_exits_2_with_the_message(tmp_path, capsys):
    rc = cli.main(["eval", str(tmp_path / "missing")])
    assert rc == 2
    assert "pocketlm: error: model source" in capsys.readouterr().err


def test_unknown_subcommand_is_an_argparse_error():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
