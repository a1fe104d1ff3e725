"""Test-wide setup: the offline data mirror, W&B offline, and no network.

Every test runs with `GPTPKG_DATA_MIRROR` pointing at ../shared/data, a private
tiktoken cache, W&B in offline mode, and sockets that refuse any address outside
the loopback range, so a test that tries to reach the network fails loudly.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest
from helpers import params_in

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()


def _is_local(address) -> bool:
    if isinstance(address, tuple):
        host = address[0]
    else:
        return True  # unix sockets
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        raise OSError(f"tests must not reach the network (tried {address!r})")
    return _real_connect(self, address)


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.exit(f"the offline data mirror {SHARED_DATA} is missing", returncode=2)
    os.environ["GPTPKG_DATA_MIRROR"] = str(SHARED_DATA)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("tiktoken-cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("WANDB_DIR", str(tmp_path_factory.mktemp("wandb")))
    # the BentoML model store of every test run (and of `dvc repro` inside tests) is private
    os.environ["BENTOML_HOME"] = str(tmp_path_factory.mktemp("bentoml-home"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def tok(_offline_env):
    from gptpkg.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def tiny_onnx_export(_offline_env, tmp_path_factory, shared_data):
    """A tiny random spam classifier checkpoint, a 60-message test split, and the real
    `export_onnx` stage run on them: (params, metrics). Shared by the export and serving tests."""
    import json

    import torch

    from gptpkg.checkpoint import save_checkpoint
    from gptpkg.data import read_sms_spam
    from gptpkg.model import GPT, GPTClassifier
    from gptpkg.presets import model_config
    from gptpkg.runner import run_stage

    root = tmp_path_factory.mktemp("onnx-pipeline")
    params = params_in(root)
    torch.manual_seed(0)
    model = GPTClassifier(GPT(model_config("tiny")), 2)
    meta = {"labels": ["ham", "spam"], "max_length": 32, "pad_id": 50256}
    save_checkpoint(params.paths.spam_classifier, model, meta)
    rows = read_sms_spam(shared_data / "SMSSpamCollection")[:58] + [("", 0), ("¡Olé! 🎉 <|endoftext|> 東京", 1)]
    test = Path(params.paths.processed) / "spam" / "test.jsonl"
    test.parent.mkdir(parents=True)
    test.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows) + "\n", encoding="utf-8")
    return params, run_stage("export_onnx", params)
