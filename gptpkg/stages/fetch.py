"""The `fetch` stage: every raw file `params.data.files` lists, from the destination if
valid, else the offline mirror, else its canonical URL; each checked against its pinned
sha256 (gptpkg.raw)."""

from __future__ import annotations

from ..config import DataConfig
from ..raw import fetch_file


def run(cfg: DataConfig, ctx) -> dict:
    """The `fetch` stage (`cfg`: params.data): every listed raw file, verified."""
    how = {}
    for name in cfg.files:
        _, how[name] = fetch_file(name, ctx.paths.raw, mirror=ctx.mirror, timeout=cfg.timeout_s, retries=cfg.retries)
    return {"files": how}
