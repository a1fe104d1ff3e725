"""The stage registry: every pipeline stage once, with its help text, the function that
runs it, the section of params.yaml it reads, the checkpoint it trains and its Dagster
asset group. The CLI, the runner and workflows/ read it; a test checks it against
dvc.yaml. Torch-free: a stage's module is imported only when the stage runs.

A stage function takes (its typed params section, a `StageContext`) and returns its
metrics dict; the runner writes that dict as metrics/<stage>.json.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Paths
from .fetch import MIRROR_ENV
from .loggers import MetricLogger, NullLogger


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    target: str  # "module:function", relative to gptpkg
    group: str  # Dagster asset group
    section: str = ""  # the params.yaml section it reads; "" = the stage's name
    checkpoint: str | None = None  # the `paths` key of the checkpoint it trains
    wandb: bool = False  # opens a W&B run although it trains nothing (it logs the model it exports)

    @property
    def params_section(self) -> str:
        return self.section or self.name

    def function(self) -> Callable[[Any, StageContext], dict[str, Any]]:
        module, name = self.target.split(":")
        # The import statement's machinery (not importlib's), so `-X importtime` lists
        # the module: the dvc.yaml deps test reads that list.
        return getattr(__import__(f"gptpkg.{module}", fromlist=[name]), name)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "fetch",
            "fetch the raw files (offline mirror first, then the canonical URLs), sha256-verified",
            "fetch:run",
            "data",
            section="data",
        ),
        Stage(
            "prepare",
            "tokenize once; write pretraining token arrays, spam and instruction splits",
            "prepare:run",
            "data",
        ),
        Stage(
            "pretrain",
            "pretrain a GPT on the chosen corpus (next-token loss)",
            "pretrain:run",
            "pretraining",
            checkpoint="pretrained",
        ),
        Stage(
            "finetune_spam",
            "fine-tune the pretrained GPT into the spam classifier",
            "classifier:run",
            "classifier",
            checkpoint="spam_classifier",
        ),
        Stage("baseline_spam", "TF-IDF + logistic regression on the same spam split", "baseline:run", "classifier"),
        Stage(
            "finetune_instruct",
            "instruction-fine-tune the pretrained GPT; write test responses",
            "instruct:run",
            "instruction",
            checkpoint="instruct_model",
        ),
        Stage(
            "baseline_instruct",
            "answer each instruction with the output of the nearest training instruction (TF-IDF)",
            "answers:run",
            "instruction",
        ),
        Stage(
            "export_onnx",
            "export the spam classifier to ONNX, checked against PyTorch on the test split",
            "export:run",
            "serving",
            wandb=True,
        ),
        Stage(
            "package",
            "import the exported ONNX model into the BentoML model store (versioned tag)",
            "export:package",
            "serving",
        ),
    )
}


@dataclass
class StageContext:
    """What a stage gets besides its own params section."""

    paths: Paths
    data_mirror: str = ""  # params.data.mirror
    logger: MetricLogger = field(default_factory=NullLogger)
    resume: bool = False  # continue from the stage's last checkpoint
    progress: bool = True  # tqdm bars (tqdm itself turns them off when not on a terminal)

    @property
    def mirror(self) -> str | None:
        """The offline mirror folder: $GPTPKG_DATA_MIRROR, else params.data.mirror."""
        return os.environ.get(MIRROR_ENV) or self.data_mirror or None
