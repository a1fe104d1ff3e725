"""Token shards: what `prepare` writes for pretraining and `pretrain` reads.

A split of a source (`sms.train`, `corpus.val`) is a run of shard files of at most
`shard_tokens` tokens each: a header of 256 little-endian int32 (magic, version, token
count; the rest zero) followed by the tokens as uint16 (GPT-2's 50,257 ids fit). Every
document ends with <|endoftext|>, so splits and sources concatenate without a separator.
`manifest.json` beside the shards lists per source its files, documents and skips, and
per split its shards (tokens, sha256 of the token bytes), and the tokenizer.

Readers never copy a split into memory: `TokenStream` maps the shards (`np.memmap`) and
copies out only the windows asked for. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GptpkgError

MAGIC = 0x67707473  # "gpts"
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DTYPE = np.dtype("<u2")
MANIFEST = "manifest.json"
PARTS = ("train", "val")
RERUN = "rerun the prepare stage (`gptpkg prepare` or `dvc repro prepare`)"


class PreparedDataError(GptpkgError, ValueError):
    """A file that `prepare` wrote is missing, truncated or corrupt."""


def corrupt(path: str | Path, what: str) -> PreparedDataError:
    return PreparedDataError(f"{path}: {what}; {RERUN}")


def shard_name(source: str, part: str, index: int) -> str:
    return f"{source}.{part}.{index:06d}.bin"


class ShardWriter:
    """Appends tokens to `<folder>/<source>.<part>.NNNNNN.bin`, a new shard every
    `shard_tokens` tokens; `close()` returns the shard records for the manifest."""

    def __init__(self, folder: Path, source: str, part: str, shard_tokens: int) -> None:
        self.folder, self.source, self.part, self.shard_tokens = folder, source, part, shard_tokens
        self.records: list[dict[str, Any]] = []
        self._file = None

    def _open(self) -> None:
        name = shard_name(self.source, self.part, len(self.records))
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _finish
        self._file.write(b"\0" * HEADER_BYTES)
        self._count, self._hash = 0, hashlib.sha256()
        self.records.append({"file": name})

    def _finish(self) -> None:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (MAGIC, VERSION, self._count)
        self._file.seek(0)
        self._file.write(header.tobytes())
        self._file.close()
        self._file = None
        self.records[-1].update(tokens=self._count, sha256=self._hash.hexdigest())

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=DTYPE)
        while len(tokens):
            if self._file is None:
                self._open()
            take = tokens[: self.shard_tokens - self._count]
            data = take.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(take)
            tokens = tokens[len(take) :]
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.records


def write_manifest(folder: Path, sources: dict[str, Any], shard_tokens: int) -> None:
    """`manifest.json`: the sources' entries (`corpus.write_shards`), the format, the tokenizer."""
    from .files import write_json
    from .tokenizer import EOT_ID

    tokenizer = {"name": "gpt2", "n_vocab": EOT_ID + 1, "eot_id": EOT_ID}
    write_json(
        folder / MANIFEST,
        {
            "version": VERSION,
            "dtype": "uint16",
            "shard_tokens": shard_tokens,
            "tokenizer": tokenizer,
            "sources": sources,
        },
    )


def read_manifest(folder: str | Path) -> dict[str, Any]:
    f = Path(folder) / MANIFEST
    if not f.is_file():
        raise PreparedDataError(f"{f} missing; run the prepare stage first")
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise corrupt(f, f"not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION or "sources" not in manifest:
        raise corrupt(f, f"not a version-{VERSION} token shard manifest")
    return manifest


def open_shard(path: Path, record: dict[str, Any], verify: bool = True) -> np.ndarray:
    """The tokens of one shard, memory-mapped, after checking its header and size against
    the manifest `record` (and, with `verify`, the sha256 of its tokens)."""
    if not path.is_file():
        raise corrupt(path, "missing")
    expected = HEADER_BYTES + DTYPE.itemsize * int(record["tokens"])
    size = path.stat().st_size
    if size != expected:
        raise corrupt(path, f"{size} bytes, expected {expected} ({record['tokens']} tokens): truncated or overwritten")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if tuple(header[:3]) != (MAGIC, VERSION, record["tokens"]):
        raise corrupt(path, f"bad header {tuple(header[:3])}, expected {(MAGIC, VERSION, record['tokens'])}")
    tokens = np.memmap(path, dtype=DTYPE, mode="r", offset=HEADER_BYTES, shape=(int(record["tokens"]),))
    if verify:
        h = hashlib.sha256()
        for i in range(0, len(tokens), 1 << 24):
            h.update(tokens[i : i + (1 << 24)].tobytes())
        if h.hexdigest() != record["sha256"]:
            raise corrupt(path, "sha256 of its tokens differs from the manifest's")
    return tokens


@dataclass
class TokenStream:
    """Token ids of several arrays (memory-mapped shards, or in-memory ids) read as one
    stream; `read(a, b)` copies tokens a..b-1 out as int64."""

    pieces: Sequence[np.ndarray]

    def __post_init__(self) -> None:
        self.pieces = [p for p in self.pieces if len(p)]
        self.ends = np.cumsum([len(p) for p in self.pieces], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, a: int, b: int) -> np.ndarray:
        i = int(np.searchsorted(self.ends, a, side="right"))
        out, start = [], int(self.ends[i - 1]) if i else 0
        while a < b:
            piece = self.pieces[i]
            take = piece[a - start : b - start]
            out.append(np.asarray(take, dtype=np.int64))
            a += len(take)
            start, i = int(self.ends[i]), i + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def chunks(self, size: int = 1 << 24) -> Iterator[np.ndarray]:
        for p in self.pieces:
            for i in range(0, len(p), size):
                yield p[i : i + size]


def split_stream(folder: str | Path, sources: Sequence[str], part: str, verify: bool = True) -> TokenStream:
    """The `part` split of `sources`, in that order, as one stream over their shards."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    pieces = []
    for s in sources:
        if s not in manifest["sources"]:
            raise corrupt(folder / MANIFEST, f"no source {s!r} (it has {sorted(manifest['sources'])})")
        for rec in manifest["sources"][s][part]["shards"]:
            pieces.append(open_shard(folder / rec["file"], rec, verify))
    return TokenStream(pieces)
