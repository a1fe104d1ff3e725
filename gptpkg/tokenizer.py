"""The GPT-2 BPE tokenizer (tiktoken `gpt2`), online or from an offline mirror.

tiktoken downloads `vocab.bpe` and `encoder.json` on first use and caches them under
`sha1(url)` in its cache folder. When an offline mirror holds `gpt2/vocab.bpe` and
`gpt2/encoder.json`, we place them in that cache under those names first, so no network
is needed; tiktoken still checks their pinned sha256 itself. No torch imported here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import GptpkgError
from .fetch import MIRROR_ENV, SOURCES, mirror_dir, sha256_of

END_OF_TEXT = "<|endoftext|>"
EOT_ID = 50256
PAD_ID = EOT_ID  # GPT-2 has no pad token; the book pads with <|endoftext|>


def encode_message(tokenizer, text: str, max_length: int) -> list[int]:
    """A classifier's token ids of one message: training, export and serving all use this.
    The text's tokens cut to the first `max_length`; special tokens such as
    <|endoftext|> in the text are encoded as plain text; an empty text is one end token."""
    return tokenizer.encode_ordinary(text)[:max_length] or [EOT_ID]


class TokenizerUnavailable(GptpkgError, RuntimeError):
    pass


def tiktoken_cache_dir() -> Path:
    """The folder tiktoken reads its cache from (same rule as tiktoken.load)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return Path(os.environ["TIKTOKEN_CACHE_DIR"])
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return Path(os.environ["DATA_GYM_CACHE_DIR"])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def seed_tiktoken_cache(mirror: str | Path | None = None) -> bool:
    """Copy the mirror's GPT-2 BPE files into tiktoken's cache. True if it did (or the
    cache already held them)."""
    mdir = mirror_dir(mirror)
    if mdir is None:
        return False
    cache = tiktoken_cache_dir()
    done = True
    for name in ("gpt2/vocab.bpe", "gpt2/encoder.json"):
        src = SOURCES[name]
        target = cache / hashlib.sha1(src.url.encode()).hexdigest()
        if target.is_file() and sha256_of(target) == src.sha256:
            continue
        local = mdir / name
        if not local.is_file():
            done = False
            continue
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".gptpkg-")
        os.close(fd)
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)
    return done


@functools.cache
def _encoding(mirror: str | None):
    import tiktoken

    seed_tiktoken_cache(mirror)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests/urllib errors, hash mismatch
        raise TokenizerUnavailable(
            "could not load tiktoken's 'gpt2' encoding "
            f"({type(e).__name__}: {e}). Offline? Set {MIRROR_ENV} (or params data.mirror) "
            "to a folder holding gpt2/encoder.json and gpt2/vocab.bpe, "
            "or connect to the internet once so tiktoken can cache them."
        ) from None


def get_tokenizer(mirror: str | Path | None = None):
    """tiktoken's GPT-2 `Encoding` (encode / encode_ordinary / decode / n_vocab /
    eot_token). Encode with `allowed_special={END_OF_TEXT}` to keep `<|endoftext|>` as
    one token."""
    m = mirror_dir(mirror)
    return _encoding(str(m) if m else None)
