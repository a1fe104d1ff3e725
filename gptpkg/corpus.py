"""Pretraining sources into token shards: documents, parallel tokenization, a cache.

A source is a list of units; a unit is a file of the user's corpus folder or a bundled
source's documents. Worker processes tokenize whole units (`tokenize_unit`) into a
content-addressed cache outside DVC's outputs, so a file already tokenized is never
tokenized again; `write_shards` then cuts every source into train and validation shards
(`gptpkg.shards`) from the cache, in bounded memory. Torch-free.

The corpus folder: `.txt` and `.md` files are one document each; `.jsonl` files hold one
document per line (its `text` field); `.parquet` files one per row (their `text`
column). Text files and jsonl may be compressed (`.gz`, `.zst`). Bad input is counted,
never fatal: bytes that are not UTF-8 are replaced by U+FFFD (the file is counted in
`not_utf8_files`), binary files and files of another kind are skipped and counted, as are
empty documents and jsonl lines without a string `text`. A parquet file without a `text`
column is an error naming it.

A Hugging Face dataset (`HFDataset`) is a unit too: `datasets` streams its rows (never the
whole dataset in memory), one document per row's text field; rows without a string text
are counted. Its cache key is the dataset's resolved revision (a Hub commit is immutable)
or, for local data files, their bytes.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GptpkgError
from .shards import DTYPE, ShardWriter


class CorpusError(GptpkgError, ValueError):
    """The corpus folder is missing, or a file in it cannot be read as its kind says."""


CACHE_VERSION = "gptpkg-tokens-1"
TEXT_KINDS = (".txt", ".md")
KINDS = (*TEXT_KINDS, ".jsonl", ".parquet")
COMPRESSED = (".gz", ".zst")
PIECE_CHARS = 1 << 20  # a long document is tokenized in pieces of about this many characters
READ_BYTES = 1 << 20
# docs.npy of a cache entry: per document its token count (with the end token), the
# share key of the validation split, and a forced split (-1 none, 0 train, 1 val).
DOC_DTYPE = np.dtype([("tokens", "<i8"), ("key", "<u8"), ("split", "i1")])
FORCED = {None: -1, "train": 0, "val": 1}


def kind_of(path: Path) -> tuple[str, str]:
    """(kind, compression) of a corpus file by its name: ('.jsonl', '.gz'); kind '' when
    the file is of no supported kind."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED else ""
    kind = suffixes[-2] if comp and len(suffixes) == 2 else (suffixes[-1] if suffixes and not comp else "")
    if kind not in KINDS or (kind == ".parquet" and comp):
        return "", comp
    return kind, comp


def corpus_files(folder: str | Path) -> list[Path] | None:
    """Every file under `folder` (hidden files and folders left out), in sorted order: the
    order their documents take in the shards. None when there is no such folder."""
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise CorpusError(f"paths.corpus {folder}: not a folder; expected a folder of text files")
        return None
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in files if not f.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _open_bytes(path: Path, comp: str):
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
    return open(path, "rb")  # noqa: SIM115


@dataclass
class Counts:
    """What reading a unit found, besides its documents: skips and repairs."""

    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # the first few, with file and line

    def skip(self, what: str, where: str) -> None:
        self.skipped[what] += 1
        if len(self.notes) < 5:
            self.notes.append(f"{where}: {what.replace('_', ' ')}")


def _text_chunks(raw, path: Path, counts: Counts) -> Iterator[str]:
    """Decoded text of a byte stream; invalid UTF-8 is replaced (and the file counted)."""
    strict = codecs.getincrementaldecoder("utf-8")("strict")
    lenient = None
    while True:
        data = raw.read(READ_BYTES)
        final = not data
        if lenient is None:
            try:
                text = strict.decode(data, final)
            except UnicodeDecodeError:
                counts.skip("not_utf8_files", str(path))
                lenient = codecs.getincrementaldecoder("utf-8")("replace")
                text = lenient.decode(strict.getstate()[0] + data, final)
        else:
            text = lenient.decode(data, final)
        if text:
            yield text
        if final:
            return


def _cut(buf: str) -> int:
    """Where `buf` may be cut without changing its GPT-2 tokens: after a newline that a
    non-space character precedes and follows (the newline is then a pre-token of its own
    either way), the last such place; 0 when there is none."""
    p = len(buf) - 1
    while True:
        p = buf.rfind("\n", 1, p)
        if p < 1:
            return 0
        if not buf[p - 1].isspace() and not buf[p + 1].isspace():
            return p + 1


def pieces(chunks: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
    """The text of `chunks` re-cut into pieces of about `size` characters at places where
    tokenizing the pieces gives the tokens of the whole (`_cut`)."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        if len(buf) >= size:
            p = _cut(buf)
            if p:
                yield buf[:p]
                buf = buf[p:]
    if buf:
        yield buf


def documents(path: Path, counts: Counts) -> Iterator[Iterable[str]]:
    """The documents of one corpus file, each as its text pieces."""
    kind, comp = kind_of(path)
    if not kind:
        counts.skip("unsupported_files", f"{path} (expected .txt, .md, .jsonl, .parquet, optionally .gz/.zst)")
        return
    if kind == ".parquet":
        yield from _parquet_documents(path, counts)
        return
    try:
        with _open_bytes(path, comp) as raw:
            head = raw.read(8192)
            if b"\0" in head:
                counts.skip("binary_files", str(path))
                return
            stream = io.BufferedReader(_Prefixed(head, raw))
            if kind in TEXT_KINDS:
                yield pieces(_text_chunks(stream, path, counts))
                return
            yield from _jsonl_documents(stream, path, counts)
    except Exception as e:
        if not _broken_archive(e):
            raise
        counts.skip("unreadable_files", f"{path} ({type(e).__name__}: {e})")


def _broken_archive(e: Exception) -> bool:
    """A .gz or .zst that does not decompress (a truncated or corrupt archive)."""
    import zlib

    return isinstance(e, (gzip.BadGzipFile, EOFError, zlib.error)) or type(e).__name__ == "ZstdError"


class _Prefixed(io.RawIOBase):
    """A byte stream with `head` (already read) put back in front."""

    def __init__(self, head: bytes, raw) -> None:
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.raw.read(len(b))
        b[: len(data)] = data
        return len(data)


def _jsonl_documents(stream, path: Path, counts: Counts) -> Iterator[Iterable[str]]:
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
    for n, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            counts.skip("bad_jsonl_lines", f"{path}:{n} (not JSON)")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            counts.skip("bad_jsonl_lines", f"{path}:{n} (no string 'text' field)")
            continue
        yield (rec["text"],)


def _parquet_documents(path: Path, counts: Counts) -> Iterator[Iterable[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading parquet needs pyarrow: pip install 'gptpkg[corpus]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise CorpusError(f"{path}: no 'text' column (columns: {names}); expected a string column named text")
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                counts.skip("bad_parquet_rows", f"{path} (a non-string text value)")
                continue
            yield (value,)


# ---------------------------------------------------------------------------------
# Tokenizing units into the cache


@dataclass(frozen=True)
class HFDataset:
    """A split of a Hugging Face dataset, as `datasets.load_dataset(dataset, config,
    split=split, revision=revision, data_files=data_files, streaming=True)` gives it
    (empty strings: the library's defaults); its first `max_documents` (0 = all)."""

    dataset: str
    config: str = ""
    split: str = "train"
    revision: str = ""
    data_files: str = ""
    text_field: str = "text"
    max_documents: int = 0


@dataclass(frozen=True)
class Unit:
    """What one worker tokenizes: a corpus file (`path`), a bundled source's documents
    (`docs`: (text, forced split or None) pairs) or a Hugging Face dataset (`hf`), under a
    name."""

    name: str
    path: str = ""
    docs: tuple[tuple[str, str | None], ...] = ()
    hf: HFDataset | None = None


def share_key(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "little")


_TOKENIZER = None


def _init_worker(mirror: str | None) -> None:
    global _TOKENIZER
    from .tokenizer import get_tokenizer

    _TOKENIZER = get_tokenizer(mirror)


def unit_key(unit: Unit) -> str:
    """The cache key: the content of the unit (the file's bytes), the cache format and
    the tokenizer."""
    h = hashlib.sha256(f"{CACHE_VERSION}\0gpt2\0".encode())
    if unit.path:
        with open(unit.path, "rb") as f:
            while data := f.read(1 << 24):
                h.update(data)
        h.update(b"\0" + Path(unit.path).name.lower().encode())  # the name says how to read it
    else:
        h.update(json.dumps(unit.docs, ensure_ascii=False).encode())
    return h.hexdigest()


HF_EXTRA = "pip install 'gptpkg[hf-datasets]'"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _hf_error(hf: HFDataset, what: str, e: Exception, network: bool = False) -> CorpusError:
    """One line naming the dataset, what failed and why; where the failure may be the
    network's, whether the offline switches of huggingface_hub and datasets are on."""
    offline = [v for v in OFFLINE_VARS if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    hint = f"; {'/'.join(offline)} is set: only local data files stream" if offline and network else ""
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CorpusError(f"prepare.hf_dataset {hf.dataset!r}: {what} ({type(e).__name__}: {reason}){hint}")


def hf_builder(hf: HFDataset):
    """The `datasets` builder of `hf`: what `load_dataset(..., streaming=True)` makes
    before it streams (its `hash` is the resolved Hub commit, its config the data files)."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"prepare.hf_dataset {hf.dataset!r}: streaming it needs datasets: {HF_EXTRA}") from None
    try:
        return datasets.load_dataset_builder(
            hf.dataset, hf.config or None, revision=hf.revision or None, data_files=hf.data_files or None
        )
    except Exception as e:
        raise _hf_error(hf, "cannot load it", e, network=True) from None


def hf_origin(hf: HFDataset, builder) -> dict[str, Any]:
    """What the manifest records of a Hugging Face source: the dataset, its resolved
    revision (the Hub commit; null for local data files), configuration and split."""
    return {
        "dataset": hf.dataset,
        "revision": builder.hash if builder.repo_id else None,
        "requested_revision": hf.revision or None,
        "config": builder.config.name,
        "split": hf.split,
        "data_files": hf.data_files or None,
        "text_field": hf.text_field,
        "max_documents": hf.max_documents,
    }


def hf_key(hf: HFDataset, builder) -> str:
    """The cache key of a Hugging Face source: what it reads (its origin, with the Hub
    commit) and, for local data files, their bytes; the cache format and the tokenizer."""
    h = hashlib.sha256(f"{CACHE_VERSION}\0gpt2\0hf\0".encode())
    h.update(json.dumps([hf_origin(hf, builder), builder.hash], sort_keys=True).encode())
    files = (builder.config.data_files or {}).get(hf.split, [])
    for f in files:
        if os.path.isfile(f):  # local; a Hub file is fixed by the commit
            h.update(b"\0" + Path(f).name.encode() + b"\0")
            with open(f, "rb") as src:
                while data := src.read(1 << 24):
                    h.update(data)
    return h.hexdigest()


def hf_documents(hf: HFDataset, builder, counts: Counts) -> Iterator[Iterable[str]]:
    """The documents of a Hugging Face source, one row at a time from the stream."""
    try:
        stream = builder.as_streaming_dataset(split=hf.split)
    except Exception as e:
        raise _hf_error(hf, f"no split {hf.split!r}", e) from None
    columns = list(stream.features) if stream.features is not None else None
    if columns is not None and hf.text_field not in columns:
        raise CorpusError(
            f"prepare.hf_dataset {hf.dataset!r}: no {hf.text_field!r} field (fields: {columns}); "
            "expected prepare.hf_text_field to name the text"
        )
    taken, rows = 0, iter(stream)
    for n in itertools.count():
        if hf.max_documents and taken >= hf.max_documents:
            return
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise _hf_error(hf, f"streaming stopped at row {n}", e, network=True) from None
        text = row.get(hf.text_field)
        if not isinstance(text, str):
            counts.skip("bad_hf_rows", f"{hf.dataset} row {n} (no string {hf.text_field!r} field)")
            continue
        taken += 1
        yield (text,)


def tokenize_unit(unit: Unit, cache: str) -> dict[str, Any]:
    """Tokenize `unit` into the cache (nothing when already there); its entry's record:
    key, documents, tokens, skips (and a Hugging Face source's origin)."""
    from .tokenizer import EOT_ID

    if unit.hf:
        builder = hf_builder(unit.hf)
        key, origin = hf_key(unit.hf, builder), {"origin": hf_origin(unit.hf, builder)}
    else:
        key, origin = unit_key(unit), {}
    entry = Path(cache) / key[:2] / key
    if (entry / "record.json").is_file():
        return {**json.loads((entry / "record.json").read_text(encoding="utf-8")), "cached": True}
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    counts = Counts()
    docs = []
    eot = np.asarray([EOT_ID], dtype=DTYPE)
    try:
        with open(tmp / "tokens.u16", "wb") as out:
            if unit.hf:
                source = ((d, None) for d in hf_documents(unit.hf, builder, counts))
            elif unit.path:
                source = ((d, None) for d in documents(Path(unit.path), counts))
            else:
                source = (((text,), split) for text, split in unit.docs)
            for doc_pieces, split in source:
                n, h, seen = 0, hashlib.blake2b(digest_size=8), False
                held: list[np.ndarray] = []  # tokens of leading whitespace, until text shows
                for piece in doc_pieces:
                    h.update(piece.encode("utf-8", "surrogatepass"))
                    ids = np.asarray(_TOKENIZER.encode_ordinary(piece), dtype=DTYPE)
                    if not seen:
                        held.append(ids)
                        if not piece.strip():
                            continue
                        seen, ids = True, np.concatenate(held)
                    out.write(ids.tobytes())
                    n += len(ids)
                if not seen:
                    counts.skip("empty_documents", unit.path or unit.name)
                    continue
                out.write(eot.tobytes())
                docs.append((n + 1, share_key(h.digest()), FORCED[split]))
        np.save(tmp / "docs.npy", np.asarray(docs, dtype=DOC_DTYPE))
        record = {
            "key": key,
            "documents": len(docs),
            "tokens": int(sum(d[0] for d in docs)),
            "skipped": dict(counts.skipped),
            "notes": counts.notes,
            **origin,
        }
        (tmp / "record.json").write_text(json.dumps(record), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:  # another worker cached the same content first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**record, "cached": False}


def _tokenize_task(args: tuple[Unit, str]) -> dict[str, Any]:
    return tokenize_unit(*args)


def tokenize_units(units: Sequence[Unit], cache: str | Path, workers: int, mirror: str | None) -> list[dict]:
    """Every unit's cache record, in order: `workers` processes tokenize the units not yet
    cached (1 = in this process)."""
    tasks = [(u, str(cache)) for u in units]
    if workers <= 1 or len(units) <= 1:
        _init_worker(mirror)
        return [_tokenize_task(t) for t in tasks]
    import multiprocessing as mp

    # spawn: a worker inherits no state of the parent (threads, open files), only its args.
    with mp.get_context("spawn").Pool(min(workers, len(units)), _init_worker, (mirror,)) as pool:
        return list(pool.imap(_tokenize_task, tasks))


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------
# Cache entries into shards


def _entry(cache: Path, key: str) -> Path:
    return cache / key[:2] / key


def val_documents(docs: np.ndarray, val_share: float) -> np.ndarray:
    """Which documents of a source validate: the forced ones, and of the others those
    whose share key (a hash of the text) falls in the first `val_share` of its range, so
    the choice of a document never depends on the others. At least one document
    validates and one trains when there are two or more."""
    free = docs["split"] < 0
    is_val = (docs["split"] == 1) | (free & (docs["key"] < np.uint64(int(val_share * 2**64))))
    if free.sum() >= 2 and not (docs["split"] >= 0).any():
        keys = docs["key"]
        if not is_val.any():
            is_val[np.argmin(keys)] = True
        if is_val.all():
            is_val[np.argmax(keys)] = False
    return is_val


def write_shards(
    folder: Path, name: str, records: Sequence[dict], cache: Path, val_share: float, shard_tokens: int
) -> dict[str, Any]:
    """Write source `name`'s train and val shards into `folder` from its units' cache
    `records` (in order); its manifest entry. A source of one document (a single text)
    is cut: its first 1 - `val_share` of tokens train, the rest validates."""
    docs_per = [np.load(_entry(cache, r["key"]) / "docs.npy") for r in records]
    all_docs = np.concatenate(docs_per) if docs_per else np.zeros(0, DOC_DTYPE)
    is_val = val_documents(all_docs, val_share)
    single = len(all_docs) == 1 and all_docs["split"][0] < 0
    writers = {p: ShardWriter(folder, name, p, shard_tokens) for p in ("train", "val")}
    doc_counts = {"train": 0, "val": 0}
    at = 0
    for rec, docs in zip(records, docs_per):
        tokens = np.memmap(_entry(cache, rec["key"]) / "tokens.u16", dtype=DTYPE, mode="r") if rec["tokens"] else []
        mask = is_val[at : at + len(docs)]
        at += len(docs)
        if single:
            cut = int((1 - val_share) * len(tokens))
            writers["train"].write(tokens[:cut])
            writers["val"].write(tokens[cut:])
            doc_counts["train"] = doc_counts["val"] = 1
            continue
        start = 0
        for lo in range(0, len(docs), 1 << 16):  # bounded memory: 65,536 documents at a time
            lengths, m = docs["tokens"][lo : lo + (1 << 16)], mask[lo : lo + (1 << 16)]
            end = start + int(lengths.sum())
            chunk = np.asarray(tokens[start:end])
            token_val = np.repeat(m, lengths)
            writers["train"].write(chunk[~token_val])
            writers["val"].write(chunk[token_val])
            doc_counts["val"] += int(m.sum())
            doc_counts["train"] += int((~m).sum())
            start = end
    skipped: Counter = Counter()
    for r in records:
        skipped.update(r["skipped"])
    out: dict[str, Any] = {"files": len(records), "documents": len(all_docs), "skipped": dict(sorted(skipped.items()))}
    for part, w in writers.items():
        shards = w.close()
        out[part] = {"documents": doc_counts[part], "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    return out
