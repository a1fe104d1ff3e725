import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import zipfile

import pytest

from gptpkg import raw as fetch_mod
from gptpkg import tokenizer as tok_mod
from gptpkg.raw import FetchError, RawFile, fetch_file, verify_file


def test_tokenizer_offline_from_mirror(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    tok_mod._encoding.cache_clear()
    try:
        enc = tok_mod.get_tokenizer(shared_data)
        assert enc.encode("Hello, world") == [15496, 11, 995]
        assert enc.encode("a<|endoftext|>", allowed_special={tok_mod.END_OF_TEXT}) == [64, 50256]
        assert enc.n_vocab == 50257 and enc.eot_token == tok_mod.EOT_ID
    finally:
        tok_mod._encoding.cache_clear()


def test_tokenizer_matches_tiktokens_own_gpt2_pattern(shared_data):
    """The GPT-2 release's regex splits text as tiktoken's (faster) gpt2 pattern does."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        str(shared_data / "gpt2" / "vocab.bpe"), str(shared_data / "gpt2" / "encoder.json")
    )
    ref = tiktoken.Encoding("ref", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
    text = (shared_data / "SMSSpamCollection").read_text(encoding="utf-8") + " it's  \n\n don't 1,234 ÄÖü 😀 \t"
    assert tok_mod.get_tokenizer(shared_data).encode_ordinary(text) == ref.encode_ordinary(text)


def test_no_cache_writes_nothing_and_bundles_the_pinned_files(tmp_path, shared_data):
    """TIKTOKEN_CACHE_DIR="" is tiktoken's "no cache": the tokenizer and the export's
    bundle are built from the mirror without a file written anywhere else (the working
    directory stays empty); the bundle holds the pinned bytes."""
    work, bundle = tmp_path / "cwd", tmp_path / "bundle"
    work.mkdir()
    bundle.mkdir()
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gptpkg.onnx_export import bundle_tokenizer\n"
        "from gptpkg.tokenizer import get_tokenizer\n"
        "print(get_tokenizer(sys.argv[1]).encode('Hello, world'))\n"
        "bundle_tokenizer(Path(sys.argv[2]), sys.argv[1])\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": ""}
    out = subprocess.run(
        [sys.executable, "-c", code, str(shared_data), str(bundle)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[15496, 11, 995]"
    assert list(work.iterdir()) == []
    for name in tok_mod.BPE_FILES:
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == fetch_mod.SOURCES[name].sha256


def test_tokenizer_refuses_a_mirror_file_off_its_pin(tmp_path, shared_data):
    mirror = tmp_path / "mirror"
    (mirror / "gpt2").mkdir(parents=True)
    (mirror / "gpt2" / "vocab.bpe").write_bytes((shared_data / "gpt2" / "vocab.bpe").read_bytes() + b"x")
    with pytest.raises(tok_mod.TokenizerUnavailable, match=r"vocab.bpe: sha256 .*, expected 1ce16647"):
        tok_mod.bpe_file("gpt2/vocab.bpe", mirror)


def test_tokenizer_without_mirror_or_network_says_how_to_fix(tmp_path):
    # A fresh process (tiktoken keeps loaded encodings per process) with an empty cache,
    # no mirror, and sockets that refuse to connect.
    code = (
        "import socket\n"
        "def refuse(self, addr): raise OSError('network blocked by the test')\n"
        "socket.socket.connect = refuse\n"
        "from gptpkg.tokenizer import get_tokenizer, TokenizerUnavailable\n"
        "try:\n    get_tokenizer()\nexcept TokenizerUnavailable as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GPTPKG_DATA_MIRROR"}
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty-cache")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ERR"), out.stdout + out.stderr
    assert "GPTPKG_DATA_MIRROR" in out.stdout and "gpt2/encoder.json" in out.stdout


def test_fetch_from_mirror_then_present(tmp_path, shared_data):
    path, how = fetch_file("the-verdict.txt", tmp_path, mirror=shared_data)
    assert how == "mirror" and path.read_bytes() == (shared_data / "the-verdict.txt").read_bytes()
    assert fetch_file("the-verdict.txt", tmp_path, mirror=shared_data)[1] == "present"
    assert verify_file(path, "the-verdict.txt") == path


def test_corrupt_mirror_file_overwrites_nothing(tmp_path, shared_data):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "the-verdict.txt").write_text("tampered")
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / "the-verdict.txt").write_text("old local copy")
    with pytest.raises(FetchError, match="expected b41e41a6"):
        fetch_file("the-verdict.txt", dest, mirror=mirror)
    assert (dest / "the-verdict.txt").read_text() == "old local copy"
    with pytest.raises(FetchError, match="is corrupt"):
        verify_file(dest / "the-verdict.txt", "the-verdict.txt")
    with pytest.raises(FetchError, match="is missing"):
        verify_file(dest / "nope.txt", "the-verdict.txt")


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_and_unzips(tmp_path, http_server, monkeypatch):
    root, base = http_server
    monkeypatch.delenv("GPTPKG_DATA_MIRROR")
    payload = b"ham\thello\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("inner.txt", payload)
    (root / "a.zip").write_bytes(buf.getvalue())
    (root / "b.txt").write_bytes(b"plain")
    sha = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(fetch_mod.SOURCES, "inner.txt", RawFile("inner.txt", f"{base}/a.zip", sha, "inner.txt"))
    monkeypatch.setitem(fetch_mod.SOURCES, "b.txt", RawFile("b.txt", f"{base}/b.txt", "0" * 64))
    dest = tmp_path / "raw"
    path, how = fetch_file("inner.txt", dest, timeout=5, retries=1)
    assert how == "download" and path.read_bytes() == payload
    (dest / "b.txt").write_text("keep me")
    with pytest.raises(FetchError, match="expected 0000"):
        fetch_file("b.txt", dest, timeout=5, retries=1)
    assert (dest / "b.txt").read_text() == "keep me"
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temp files left
    monkeypatch.setitem(fetch_mod.SOURCES, "c.txt", RawFile("c.txt", f"{base}/missing.txt", "0" * 64))
    with pytest.raises(FetchError, match="could not download .* after 1 attempt"):
        fetch_file("c.txt", dest, timeout=5, retries=1)


def test_unknown_raw_file(tmp_path):
    with pytest.raises(FetchError, match="unknown raw file 'x'"):
        fetch_file("x", tmp_path)
