import pytest

from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime import text


def test_default_text_is_real_prose():
    body = text.load_text(None, "all")
    assert len(body) > 300_000 and "the" in body.split()


def test_splits_are_disjoint_cover_everything_and_are_stable():
    docs = text.default_documents()
    parts = {s: text.split_documents(docs, s) for s in ("train", "calib", "eval")}
    assert sum(len(p) for p in parts.values()) == len(docs)
    assert not set(parts["eval"]) & set(parts["train"]) and not set(parts["calib"]) & set(parts["train"])
    assert 0.1 < len(parts["eval"]) / len(docs) < 0.3
    # content-addressed: a document's split does not depend on the others
    assert text.split_documents(docs[::-1], "eval") == parts["eval"][::-1]


def test_file_text_splits_by_paragraph(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"paragraph number {i} with words" for i in range(100)))
    assert len(text.split_documents(text.file_documents(f), "eval")) > 5


def test_missing_and_empty_text_files_are_refused(tmp_path):
    with pytest.raises(PocketLMError, match=r"does not exist; pass a UTF-8 text file"):
        text.load_text(tmp_path / "none.txt")
    (tmp_path / "e.txt").write_text("\n\n \n")
    with pytest.raises(PocketLMError, match=r"is empty"):
        text.load_text(tmp_path / "e.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PocketLMError, match=r"not UTF-8"):
        text.load_text(tmp_path / "b.txt")


def test_token_windows_are_fixed_size_and_non_overlapping():
    w = text.token_windows(list(range(100)), 16)
    assert w.shape == (6, 16) and w[1, 0] == 16
    with pytest.raises(PocketLMError, match=r"fewer than one window"):
        text.token_windows([1, 2], 16)
