"""Raw inputs: each has a canonical URL and a pinned sha256.

Order of sources for `fetch_file`: the destination if already valid; the offline mirror
folder (`GPTPKG_DATA_MIRROR` or the `mirror` argument); the canonical URL. A checksum
mismatch never overwrites a file: downloads go to a temp name and are renamed only when
their hash matches. No torch here: fetching does not depend on the model code.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import GptpkgError
from .files import atomic_write_bytes

MIRROR_ENV = "GPTPKG_DATA_MIRROR"


class FetchError(GptpkgError, RuntimeError):
    """A raw file could not be obtained or did not match its pinned checksum."""


@dataclass(frozen=True)
class RawFile:
    name: str  # file name under data/raw and in the mirror
    url: str
    sha256: str
    zip_member: str | None = None  # the file inside `url` when that is a zip archive


SOURCES: dict[str, RawFile] = {
    f.name: f
    for f in [
        RawFile(
            "the-verdict.txt",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        ),
        RawFile(
            "tinyshakespeare.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        ),
        RawFile(
            "SMSSpamCollection",
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            zip_member="SMSSpamCollection",
        ),
        RawFile(
            "instruction-data.json",
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        ),
        RawFile(
            "gpt2/encoder.json",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        ),
        RawFile(
            "gpt2/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        ),
    ]
}


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mirror_dir(mirror: str | Path | None = None) -> Path | None:
    """The offline mirror folder: the argument, else `$GPTPKG_DATA_MIRROR`, else None."""
    value = mirror or os.environ.get(MIRROR_ENV)
    return Path(value).expanduser() if value else None


def _download(url: str, timeout: float, retries: int) -> bytes:
    from tqdm.auto import tqdm

    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "gptpkg"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                total = int(r.headers.get("Content-Length") or 0) or None
                buf = io.BytesIO()
                with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=None) as bar:
                    for chunk in iter(lambda: r.read(1 << 16), b""):
                        buf.write(chunk)
                        bar.update(len(chunk))
                return buf.getvalue()
        except OSError as e:  # URLError, timeouts and connection resets are OSErrors
            last = e
            if attempt < retries:
                time.sleep(min(2**attempt, 10))
    raise FetchError(
        f"could not download {url} after {retries} attempt(s): {last}. Offline? Set "
        f"{MIRROR_ENV} to a folder holding a copy of the raw files."
    )


def fetch_file(
    name: str,
    dest_dir: str | Path,
    mirror: str | Path | None = None,
    timeout: float = 60.0,
    retries: int = 3,
) -> tuple[Path, str]:
    """Make `dest_dir/name` a valid copy of raw file `name`. Returns (path, how) where
    how is "present", "mirror" or "download"."""
    if name not in SOURCES:
        raise FetchError(f"unknown raw file {name!r}; known: {sorted(SOURCES)}")
    src = SOURCES[name]
    dest = Path(dest_dir) / name
    if dest.is_file() and sha256_of(dest) == src.sha256:
        return dest, "present"

    mdir = mirror_dir(mirror)
    if mdir is not None and (mdir / name).is_file():
        candidate = mdir / name
        data = candidate.read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != src.sha256:
            raise FetchError(
                f"mirror file {candidate} has sha256 {got}, expected {src.sha256}; nothing was overwritten"
            )
        atomic_write_bytes(dest, data)
        return dest, "mirror"

    data = _download(src.url, timeout, retries)
    if src.zip_member:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                data = z.read(src.zip_member)
        except (zipfile.BadZipFile, KeyError) as e:
            raise FetchError(f"{src.url}: expected a zip holding {src.zip_member!r}: {e}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != src.sha256:
        raise FetchError(f"{src.url} gave {name} with sha256 {got}, expected {src.sha256}; nothing was overwritten")
    atomic_write_bytes(dest, data)
    return dest, "download"


def verify_file(path: str | Path, name: str) -> Path:
    """Raise FetchError unless `path` exists and matches the pinned sha256 of `name`."""
    path = Path(path)
    if not path.is_file():
        raise FetchError(f"raw file {path} is missing; run `gptpkg fetch` first")
    got = sha256_of(path)
    if got != SOURCES[name].sha256:
        raise FetchError(
            f"raw file {path} is corrupt: sha256 {got}, expected {SOURCES[name].sha256}; "
            f"delete it and run `gptpkg fetch`"
        )
    return path
