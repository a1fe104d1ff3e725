"""The GPT-2 BPE tokenizer (tiktoken `gpt2`), online or from an offline mirror.

The encoding is built with tiktoken's public API from GPT-2's two BPE files
(`vocab.bpe`, `encoder.json`): read from the offline mirror when it holds them, else
from their canonical URLs (tiktoken downloads and caches those itself), and checked
against the sha256 pins of `gptpkg.raw.SOURCES`. Nothing here knows how tiktoken names
its cache files, and with TIKTOKEN_CACHE_DIR="" (tiktoken's "no cache") nothing is
written anywhere. No torch imported here.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from .errors import GptpkgError
from .raw import MIRROR_ENV, SOURCES, mirror_dir

END_OF_TEXT = "<|endoftext|>"
EOT_ID = 50256
PAD_ID = EOT_ID  # GPT-2 has no pad token; the book pads with <|endoftext|>
BPE_FILES = ("gpt2/vocab.bpe", "gpt2/encoder.json")
# The pre-tokenizer regex of the GPT-2 release (openai/gpt-2 src/encoder.py).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def encode_message(tokenizer, text: str, max_length: int) -> list[int]:
    """A classifier's token ids of one message: training, export and serving all use this.
    The text's tokens cut to the first `max_length`; special tokens such as
    <|endoftext|> in the text are encoded as plain text; an empty text is one end token."""
    return tokenizer.encode_ordinary(text)[:max_length] or [EOT_ID]


class TokenizerUnavailable(GptpkgError, RuntimeError):
    pass


def bpe_file(name: str, mirror: str | Path | None = None) -> bytes:
    """The bytes of one GPT-2 BPE file (`gpt2/vocab.bpe` or `gpt2/encoder.json`): the
    mirror's copy when there, else the download (through tiktoken's own cache), checked
    against its pinned sha256."""
    from tiktoken.load import read_file, read_file_cached

    src, where = _source(name, mirror)
    try:
        data = read_file(src) if where == "mirror" else read_file_cached(src, SOURCES[name].sha256)
    except Exception as e:  # requests/urllib errors, tiktoken's hash mismatch
        raise TokenizerUnavailable(
            f"could not read {name} from {src} ({type(e).__name__}: {e}). Offline? Set {MIRROR_ENV} "
            "(or params data.mirror) to a folder holding gpt2/encoder.json and gpt2/vocab.bpe, "
            "or connect to the internet once so tiktoken can cache them."
        ) from None
    got = hashlib.sha256(data).hexdigest()
    if got != SOURCES[name].sha256:
        raise TokenizerUnavailable(f"{src}: sha256 {got}, expected {SOURCES[name].sha256} ({name})")
    return data


def _source(name: str, mirror: str | Path | None) -> tuple[str, str]:
    mdir = mirror_dir(mirror)
    if mdir is not None and (mdir / name).is_file():
        return str(mdir / name), "mirror"
    return SOURCES[name].url, "url"


@functools.cache
def _encoding(mirror: str | None):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    for name in BPE_FILES:  # a missing, unreachable or wrong file: a TokenizerUnavailable naming it
        bpe_file(name, mirror)
    vocab, encoder = (SOURCES[name] for name in BPE_FILES)
    ranks = data_gym_to_mergeable_bpe_ranks(
        _source(vocab.name, mirror)[0],
        _source(encoder.name, mirror)[0],
        vocab_bpe_hash=vocab.sha256,
        encoder_json_hash=encoder.sha256,
    )
    return tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: EOT_ID},
        explicit_n_vocab=EOT_ID + 1,
    )


def get_tokenizer(mirror: str | Path | None = None):
    """tiktoken's GPT-2 `Encoding` (encode / encode_ordinary / decode / n_vocab /
    eot_token). Encode with `allowed_special={END_OF_TEXT}` to keep `<|endoftext|>` as
    one token."""
    m = mirror_dir(mirror)
    return _encoding(str(m) if m else None)
