"""Your own corpus through `prepare`: the folder's file kinds, bad input counted or named,
whole-document validation, parallel and incremental tokenization that give the shards of
a clean serial run, and errors that name a corrupt prepared file."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import params_in

from gptpkg.corpus import CorpusError, pieces
from gptpkg.prepared import read_corpus, read_instruct_split
from gptpkg.runner import run_stage
from gptpkg.shards import PreparedDataError, split_stream
from gptpkg.tokenizer import EOT_ID

BOOKS = {
    "a/book1.txt": "Call me Ishmael. Some years ago, never mind how long precisely.\n\nThe sea.\n",
    "a/book2.md": "# Chapter 1\n\nIt was the best of times, it was the worst of times.\n",
    "b/notes.txt": "Ünïcödé is fine: 東京 🎉 and a literal <|endoftext|> stays text.\n",
}
LINES = [f"document number {i}: " + "words " * (i % 7 + 1) for i in range(60)]


def write_corpus(folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    for name, text in BOOKS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    jsonl = "\n".join(json.dumps({"text": t}) for t in LINES[:20]) + "\n" + '{"title": "no text"}\nnot json\n'
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    zst = "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(LINES[20:40])) + "\n"
    (folder / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst.encode()))
    pq.write_table(pa.table({"text": LINES[40:], "n": list(range(20))}), folder / "e.parquet")
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    (folder / "empty.txt").write_text("  \n\n")
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    (folder / ".DS_Store").write_bytes(b"\0\0")


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    params = params_in(root, "prepare.shard_tokens=1024", "prepare.workers=2")
    run_stage("fetch", params)
    return root


def _params(root: Path, *sets: str):
    return params_in(root, "prepare.shard_tokens=1024", "prepare.workers=2", *sets)


def _shards(params) -> dict:
    manifest = json.loads((Path(params.paths.processed) / "corpus" / "manifest.json").read_text())
    return {s: [r["sha256"] for p in ("train", "val") for r in v[p]["shards"]] for s, v in manifest["sources"].items()}


def _docs(params, part: str) -> list[str]:
    from gptpkg.tokenizer import get_tokenizer

    ids = np.concatenate(list(split_stream(Path(params.paths.processed) / "corpus", ["corpus"], part).chunks()))
    cuts = np.flatnonzero(ids == EOT_ID)
    tok = get_tokenizer()
    return [tok.decode(ids[a + 1 if i else 0 : b].tolist()) for i, (a, b) in enumerate(zip([0, *cuts], cuts))]


def test_a_folder_of_every_kind_becomes_the_corpus_source(fetched, capsys):
    params = _params(fetched)
    write_corpus(Path(params.paths.corpus))
    m = run_stage("prepare", params)
    # 10 files: 3 texts + latin1 (repaired) + 3 x 20 records; empty, binary, csv, 2 bad lines skipped
    assert m["corpus/documents"] == 64 and m["corpus/files"] == 10
    assert m["corpus/not_utf8_files"] == 1 and m["corpus/empty_documents"] == 1
    assert m["corpus/binary_files"] == 1 and m["corpus/unsupported_files"] == 1 and m["corpus/bad_jsonl_lines"] == 2
    err = capsys.readouterr().err
    assert "c.jsonl.gz:21 (no string 'text' field)" in err and "c.jsonl.gz:22 (not JSON)" in err
    train, val = _docs(params, "train"), _docs(params, "val")
    assert m["tokens/corpus.train"] > 0 and m["tokens/corpus.val"] > 0
    # whole documents: every validation document is one of the inputs, none is also trained on
    texts = {*BOOKS.values(), *LINES, "caf\ufffd cr\ufffdme br\ufffdl\ufffde\n"}  # bad bytes replaced
    assert set(train) | set(val) == texts and not set(train) & set(val)
    assert 0 < len(val) < len(train)
    assert BOOKS["b/notes.txt"] in train + val  # the literal special-token text is plain text


def test_parallel_and_incremental_give_the_shards_of_a_clean_serial_run(fetched):
    params = _params(fetched)
    base = _shards(params)  # prepared by the test above (workers=2)
    extra = Path(params.paths.corpus) / "b" / "new.txt"
    extra.write_text("A new chapter, added later.\n")
    m = run_stage("prepare", params)
    assert m["tokenized_units"] == 1  # only the new file
    grown = _shards(params)
    assert grown["sms"] == base["sms"] and grown["corpus"] != base["corpus"]
    shutil.rmtree(params.paths.token_cache)
    serial = _params(fetched, "prepare.workers=1")
    assert run_stage("prepare", serial)["tokenized_units"] == 5 + 10  # 4 bundled, 11 files (hidden .DS_Store: none)
    assert _shards(serial) == grown
    extra.unlink()
    run_stage("prepare", params)
    assert _shards(params) == base


def test_a_bad_parquet_file_is_named_and_the_previous_shards_stay(fetched):
    import pyarrow as pa
    import pyarrow.parquet as pq

    params = _params(fetched)
    before = _shards(params)
    bad = Path(params.paths.corpus) / "f.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    with pytest.raises(CorpusError, match=r"f\.parquet: no 'text' column \(columns: \['body'\]\)"):
        run_stage("prepare", params)
    bad.unlink()
    assert _shards(params) == before
    assert read_corpus(params.paths, ["corpus", "sms"], "train")  # still readable


def test_corrupt_prepared_files_are_named_with_the_fix(fetched):
    params = _params(fetched)
    corpus = Path(params.paths.processed) / "corpus"
    shard = sorted(corpus.glob("sms.train.*.bin"))[1]
    data = shard.read_bytes()
    try:
        shard.write_bytes(data[:-100])
        with pytest.raises(PreparedDataError, match=rf"{shard.name}: .*truncated.*rerun the prepare stage"):
            read_corpus(params.paths, ["sms"], "train")
        shard.write_bytes(data[:-2] + b"\1\1")
        with pytest.raises(PreparedDataError, match="sha256 of its tokens differs"):
            read_corpus(params.paths, ["sms"], "train")
    finally:
        shard.write_bytes(data)
    val = Path(params.paths.processed) / "instruct" / "val.json"
    good = val.read_text()
    try:
        val.write_text(good[: len(good) // 2])
        with pytest.raises(PreparedDataError, match=r"instruct/val\.json: not valid JSON .*rerun the prepare stage"):
            read_instruct_split(params.paths, "val")
    finally:
        val.write_text(good)
    manifest = corpus / "manifest.json"
    good = manifest.read_text()
    try:
        manifest.write_text(good[:50])
        with pytest.raises(PreparedDataError, match=r"manifest\.json: not valid JSON"):
            read_corpus(params.paths, ["sms"], "val")
    finally:
        manifest.write_text(good)


def test_pieces_tokenize_as_the_whole_text(shared_data, tok):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:200_000] + "\n \nend  \n\n  x"
    parts = list(pieces([text[i : i + 3000] for i in range(0, len(text), 3000)], size=5000))
    assert len(parts) > 20 and "".join(parts) == text
    assert [t for p in parts for t in tok.encode_ordinary(p)] == tok.encode_ordinary(text)


# A Hugging Face dataset as the source `hf`: local JSON-lines and parquet files through the
# same `datasets` calls a Hub id takes (load_dataset_builder, then its stream), offline.
HF_TEXTS = [*LINES[:30], BOOKS["b/notes.txt"], "  \n"]  # the last one is empty


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # workers are spawned: they read it at import
    return tmp_path


def _hf_params(fetched: Path, where: Path, *sets: str):
    return _params(fetched, f"paths.corpus={where / 'folder'}", f"paths.processed={where / 'processed'}", *sets)


def _tokens(params, source: str, part: str) -> np.ndarray:
    stream = split_stream(Path(params.paths.processed) / "corpus", [source], part)
    return np.concatenate(list(stream.chunks())) if len(stream) else np.zeros(0, np.uint16)


def test_a_local_json_or_parquet_dataset_streams_into_the_shards_of_the_folder(fetched, hf_env):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (hf_env / "folder").mkdir()
    (hf_env / "folder" / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in HF_TEXTS) + "\n")
    rows = [{"text": t, "id": i} for i, t in enumerate(HF_TEXTS)]
    (hf_env / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:5] + [{"id": -1}] + rows[5:]) + "\n")
    pq.write_table(pa.table({"text": [*HF_TEXTS[:3], None, *HF_TEXTS[3:]]}), hf_env / "data.parquet")
    for kind, file in (("json", "data.jsonl"), ("parquet", "data.parquet")):
        params = _hf_params(fetched, hf_env, f"prepare.hf_dataset={kind}", f"prepare.hf_data_files={hf_env / file}")
        m = run_stage("prepare", params)
        assert m["hf/documents"] == m["corpus/documents"] == len(HF_TEXTS) - 1
        assert m["hf/bad_hf_rows"] == 1 and m["hf/empty_documents"] == 1
        for part in ("train", "val"):  # the same documents validate: the choice hashes the text
            assert len(_tokens(params, "hf", part)) > 0
            assert np.array_equal(_tokens(params, "hf", part), _tokens(params, "corpus", part))
        entry = json.loads((Path(params.paths.processed) / "corpus" / "manifest.json").read_text())["sources"]["hf"]
        assert entry["dataset"]["dataset"] == kind and entry["dataset"]["revision"] is None  # local files: no commit
        assert entry["dataset"]["config"] == "default" and entry["documents"] == len(HF_TEXTS) - 1
    assert run_stage("prepare", params)["tokenized_units"] == 0  # unchanged: from the cache
    first = _hf_params(
        fetched,
        hf_env,
        "prepare.hf_dataset=parquet",
        f"prepare.hf_data_files={hf_env / file}",
        "prepare.hf_max_documents=4",
    )
    m = run_stage("prepare", first)
    assert m["hf/documents"] == 4 and m["tokenized_units"] == 1
    ids = np.concatenate([_tokens(first, "hf", "train"), _tokens(first, "hf", "val")])
    assert (ids == EOT_ID).sum() == 4


def test_a_dataset_that_cannot_be_read_is_one_line_naming_it(fetched, hf_env, monkeypatch):
    import sys

    (hf_env / "data.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    local = (f"prepare.hf_data_files={hf_env / 'data.jsonl'}", "prepare.hf_dataset=json")
    with pytest.raises(CorpusError, match=r"'json': no 'text' field \(fields: \['body'\]\); expected prepare.hf_text"):
        run_stage("prepare", _hf_params(fetched, hf_env, *local))
    run_stage("prepare", _hf_params(fetched, hf_env, *local, "prepare.hf_text_field=body"))
    with pytest.raises(CorpusError, match=r"'someone/no-such-data': cannot load it .*HF_HUB_OFFLINE is set"):
        run_stage("prepare", _hf_params(fetched, hf_env, "prepare.hf_dataset=someone/no-such-data"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(CorpusError, match=r"needs datasets: pip install 'gptpkg\[hf-datasets\]'"):
        run_stage("prepare", _hf_params(fetched, hf_env, *local, "prepare.workers=1"))
