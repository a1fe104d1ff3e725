"""The GPT-2 BPE tokenizer (tiktoken `gpt2`), online or from an offline mirror.

tiktoken downloads `vocab.bpe` and `encoder.json` on first use and caches them under
`sha1(url)` in its cache folder. When an offline mirror holds `gpt2/vocab.bpe` and
`gpt2/encoder.json`, we place them in that cache under those names first, so no network
is needed; tiktoken still checks their pinned sha256 itself. No torch imported here.

Two tokenizers share these files and the 50,257 ids (`TOKENIZERS`): `gpt2` (tiktoken's
encoding as is) and `gpt2-digits`, the same BPE with every ASCII digit its own token
(`DigitSplitEncoding`: phone numbers and short codes become digit sequences instead of
arbitrary 1-4 digit chunks). A model is trained, exported and served with one of them:
the prepared corpus and every checkpoint record which.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .fetch import MIRROR_ENV, SOURCES, mirror_dir, sha256_of
from .errors import GptpkgError

END_OF_TEXT = "<|endoftext|>"
EOT_ID = 50256
PAD_ID = EOT_ID  # GPT-2 has no pad token; the book pads with <|endoftext|>


TOKENIZERS = ("gpt2", "gpt2-digits")
DEFAULT_TOKENIZER = "gpt2"
# How a classifier frames one message's tokens (`encode_message`): plain (the text's own
# tokens) | eot (between two <|endoftext|>, as every SMS sits in the pretraining corpus).
FRAMINGS = ("plain", "eot")


def encode_message(tokenizer, text: str, max_length: int, framing: str = "plain") -> list[int]:
    """A classifier's token ids of one message: training, export and serving all use this.
    Special tokens such as <|endoftext|> in the text are encoded as plain text.

    plain: the text's tokens cut to the first `max_length` (an empty text: one end token).
    eot: <|endoftext|>, the text's first `max_length - 2` tokens, <|endoftext|>: the
    pretraining corpus joins the SMS messages with that token, so the model has read
    every message so framed, and last-token pooling reads the closing one."""
    if framing == "plain":
        return tokenizer.encode_ordinary(text)[:max_length] or [EOT_ID]
    if framing == "eot":
        if max_length < 3:
            raise ValueError(f"encode_message: framing 'eot' needs max_length >= 3, got {max_length}")
        return [EOT_ID, *tokenizer.encode_ordinary(text)[: max_length - 2], EOT_ID]
    raise ValueError(f"encode_message: framing expected one of {list(FRAMINGS)}, got {framing!r}")


class TokenizerUnavailable(GptpkgError, RuntimeError):
    pass


class UnknownTokenizer(GptpkgError, ValueError):
    pass


def check_tokenizer(name: object, where: str) -> str:
    """`name` if it is one of TOKENIZERS, else an error naming `where` it came from."""
    if name not in TOKENIZERS:
        raise UnknownTokenizer(f"{where}: expected a tokenizer in {list(TOKENIZERS)}, got {name!r}")
    return name  # type: ignore[return-value]


class DigitSplitEncoding:
    """GPT-2's BPE with every ASCII digit a token of its own ("07090201529" -> 0 7 0 9 ...,
    the first digit keeps a leading space as GPT-2 writes it: " 0").

    GPT-2's pre-tokenizer puts runs of digits in pieces of their own (` ?\\p{N}+`), so a
    token holding an ASCII digit is digits only, with at most one leading space; such a
    token is replaced by its digits' single tokens (GPT-2 has "0".."9" and " 0".." 9").
    Every other token is kept: decoding gives back the text, byte for byte, and the
    ids are GPT-2's, so a model, its checkpoint and its ONNX export keep their shapes."""

    name = "gpt2-digits"

    def __init__(self, base) -> None:
        self.base = base
        self.n_vocab = base.n_vocab
        self.eot_token = base.eot_token
        single = {d: base.encode_single_token(bytes([d])) for d in b"0123456789"}
        spaced = {d: base.encode_single_token(b" " + bytes([d])) for d in b"0123456789"}
        self.split: dict[int, tuple[int, ...]] = {}
        for i in range(base.n_vocab):
            try:
                raw = base.decode_single_token_bytes(i)
            except KeyError:  # an id with no token (none in gpt2; kept general)
                continue
            digits = raw[1:] if raw[:1] == b" " else raw
            if len(digits) > 1 and digits.isdigit():  # bytes.isdigit: ASCII 0-9 only
                first = (spaced if raw[:1] == b" " else single)[digits[0]]
                self.split[i] = (first, *(single[d] for d in digits[1:]))

    def _split(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        split = self.split
        for i in ids:
            parts = split.get(i)
            if parts is None:
                out.append(i)
            else:
                out.extend(parts)
        return out

    def encode(self, text: str, **kw) -> list[int]:
        return self._split(self.base.encode(text, **kw))

    def encode_ordinary(self, text: str) -> list[int]:
        return self._split(self.base.encode_ordinary(text))

    def decode(self, ids) -> str:
        return self.base.decode(ids)


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


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def _digit_split(mirror: str | None) -> DigitSplitEncoding:
    return DigitSplitEncoding(_encoding(mirror))


def get_tokenizer(mirror: str | Path | None = None, name: str = DEFAULT_TOKENIZER):
    """The tokenizer `name` (one of TOKENIZERS): tiktoken's GPT-2 `Encoding` for gpt2,
    a `DigitSplitEncoding` over it for gpt2-digits; both have encode / encode_ordinary /
    decode / name / n_vocab / eot_token. Encode with `allowed_special={END_OF_TEXT}` to
    keep `<|endoftext|>` as one token."""
    check_tokenizer(name, "tokenizer")
    m = mirror_dir(mirror)
    key = str(m) if m else None
    return _encoding(key) if name == "gpt2" else _digit_split(key)


def encode(text: str, mirror: str | Path | None = None, name: str = DEFAULT_TOKENIZER) -> list[int]:
    return get_tokenizer(mirror, name).encode(text, allowed_special={END_OF_TEXT})


def decode(ids: list[int], mirror: str | Path | None = None, name: str = DEFAULT_TOKENIZER) -> str:
    return get_tokenizer(mirror, name).decode(list(ids))


def tokenizer_of(config: dict) -> str:
    """The tokenizer a checkpoint's config.json records (its "meta"; gpt2 if it names none)."""
    return (config.get("meta") or {}).get("tokenizer", DEFAULT_TOKENIZER)
