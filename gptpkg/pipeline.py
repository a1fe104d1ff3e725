"""The stage registry: every pipeline stage once, with its help text, the section of
params.yaml it reads, the files it reads and writes, the checkpoint it trains and its
Dagster asset group. The CLI, the runner, `dvc.yaml` (generated from it by `gptpkg
dvc-yaml`), workflows/ and the benchmarks read it. Torch-free: a stage's module
(`gptpkg.stages.<name>`) is imported only when the stage runs.

Paths are templates over `params.yaml: paths` (`{processed}/spam`): dvc.yaml spells them
as DVC's own templates (`${paths.processed}/spam`), Python resolves them with `resolve`.
A stage function takes (its typed params section, a `StageContext`) and returns its
metrics dict; the runner writes that dict as `{metrics}/<stage>.json` and its
run-dependent figures as `{metrics}/runtime/<stage>.json`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .config import Paths
from .loggers import MetricLogger, NullLogger
from .raw import MIRROR_ENV


@dataclass(frozen=True)
class Out:
    """An output path template. `cache=False`: small files kept in git, not DVC's cache
    (metrics, plot data, records)."""

    path: str
    cache: bool = True


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    group: str  # Dagster asset group
    deps: tuple[str, ...] = ()  # path templates of the data it reads (gptpkg modules are added by dvc-yaml)
    outs: tuple[Out, ...] = ()
    images: tuple[str, ...] = ()  # PNG plots it writes (dvc.yaml `plots:`, uncached)
    section: str = ""  # the params.yaml section it reads; "" = the stage's name
    params: tuple[str, ...] | None = None  # the keys of its section that change its outputs; None = all
    checkpoint: str | None = None  # the `paths` key of the checkpoint it trains
    wandb: bool = False  # opens a W&B run although it trains nothing (it logs the model it exports)
    # Whether {metrics}/<stage>.json holds figures a user compares across experiments
    # (losses, accuracies, parity): dvc.yaml `metrics:`. Else it is a record (file sources,
    # split counts, the BentoML tag), a cached output like the record.
    figures: bool = True
    # A fine-tuning: it also reads the start model its section's `init` names (START_MODELS).
    start_model: bool = False
    # Reads the checkpoint of this section's fine-tuning: with trainable: lora that is an
    # adapter, loaded on its base (the start model), so the base is an input too.
    adapter_of: str = ""
    # Runs only where another stage of the pipeline reads one of its outputs (a start model
    # that no fine-tuning starts from is never built).
    on_demand: bool = False

    @property
    def params_section(self) -> str:
        return self.section or self.name

    @property
    def module(self) -> str:
        return f"gptpkg.stages.{self.name}"

    @property
    def metrics(self) -> tuple[str, str]:
        """Its metrics files: the figures (`dvc metrics` compares them when `figures`), and
        the run's record (timings, W&B run, paths, hashes: never a DVC metric)."""
        return (f"{{metrics}}/{self.name}.json", f"{{metrics}}/runtime/{self.name}.json")

    def function(self) -> Callable[[Any, StageContext], dict[str, Any]]:
        # The import statement's machinery (not importlib's), so `-X importtime` lists the
        # module: the dvc.yaml deps test reads that list.
        return __import__(self.module, fromlist=["run"]).run


def resolve(template: str, paths: Paths) -> str:
    """A path template of the registry (`{processed}/spam`) with `paths` filled in."""
    return template.format(**paths.model_dump())


# A fine-tuning's `init` -> the path template of the model it starts from (scratch: none).
START_MODELS = {"pretrained": "{pretrained}", "openai": "{openai_weights}"}


def _nocache(*paths: str) -> tuple[Out, ...]:
    return tuple(Out(p, cache=False) for p in paths)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "fetch",
            "fetch the raw files (offline mirror first, then the canonical URLs), sha256-verified",
            "data",
            outs=(Out("{raw}"),),
            section="data",
            figures=False,
            params=("files",),  # where a file comes from, and how patiently, never changes it
        ),
        Stage(
            "prepare",
            "tokenize once; write pretraining token shards, spam and instruction splits",
            "data",
            deps=("{raw}", "{corpus}"),
            outs=(Out("{processed}"),),
            figures=False,
            # how many processes tokenize never changes the shards
            params=(
                "seed",
                "pretrain_train_ratio",
                "spam_split",
                "instruct_seed",
                "shard_tokens",
                "hf_dataset",
                "hf_config",
                "hf_split",
                "hf_revision",
                "hf_data_files",
                "hf_text_field",
                "hf_max_documents",
            ),
        ),
        Stage(
            "pretrain",
            "pretrain a GPT on the chosen corpus (next-token loss)",
            "pretraining",
            deps=("{processed}/corpus",),
            outs=(Out("{pretrained}"), Out("{metrics}/pretrain_samples.json"), *_nocache("{plots}/pretrain.json")),
            images=("{plots}/pretrain_loss.png",),
            checkpoint="pretrained",
            on_demand=True,
        ),
        Stage(
            "weights",
            "obtain OpenAI's GPT-2 weights (Hugging Face Hub or a local folder), verified",
            "pretraining",
            outs=(Out("{openai_weights}"),),
            figures=False,
            on_demand=True,
        ),
        Stage(
            "finetune_spam",
            "fine-tune the pretrained GPT into the spam classifier",
            "classifier",
            deps=("{processed}/spam",),
            outs=(
                Out("{spam_classifier}"),
                *_nocache(
                    "{plots}/finetune_spam.json",
                    "{plots}/finetune_spam_confusion.json",
                    "{metrics}/finetune_spam_predictions.json",
                ),
            ),
            images=("{plots}/finetune_spam_loss.png", "{plots}/finetune_spam_confusion.png"),
            checkpoint="spam_classifier",
            start_model=True,
        ),
        Stage(
            "baseline_spam",
            "TF-IDF + logistic regression on the same spam split",
            "classifier",
            deps=("{processed}/spam",),
            outs=_nocache("{plots}/baseline_spam_confusion.json"),
            images=("{plots}/baseline_spam_confusion.png",),
        ),
        Stage(
            "finetune_instruct",
            "instruction-fine-tune the pretrained GPT; write test responses",
            "instruction",
            deps=("{processed}/instruct",),
            outs=(
                Out("{instruct_model}"),
                Out("{metrics}/instruct_responses.json"),
                *_nocache("{plots}/finetune_instruct.json", "{plots}/finetune_instruct_scores.json"),
            ),
            images=("{plots}/finetune_instruct_loss.png",),
            checkpoint="instruct_model",
            start_model=True,
        ),
        Stage(
            "baseline_instruct",
            "answer each instruction with the output of the nearest training instruction (TF-IDF)",
            "instruction",
            deps=("{processed}/instruct",),
            outs=(
                Out("{metrics}/baseline_instruct_responses.json"),
                *_nocache("{plots}/baseline_instruct_scores.json"),
            ),
        ),
        Stage(
            "export_onnx",
            "export the spam classifier to ONNX, checked against PyTorch on the test split",
            "serving",
            deps=("{spam_classifier}", "{processed}/spam/test.jsonl"),
            outs=(Out("{onnx}"),),
            wandb=True,
            adapter_of="finetune_spam",
        ),
        # The BentoML model store lies outside the repository ($BENTOML_HOME): DVC sees the
        # store entry's record (tag, sha256), uncached, so a fresh clone or a deleted record
        # reruns the stage, which checks the entry each time it runs.
        Stage(
            "package",
            "import the exported ONNX model into the BentoML model store (versioned tag)",
            "serving",
            deps=("{onnx}",),
            outs=_nocache("{bento_model}"),
            figures=False,
        ),
    )
}


def inside(path: str, parent: str) -> bool:
    """Whether `path` is `parent` or lies in it (posix paths or templates)."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def planned(params) -> dict[str, Stage]:
    """The pipeline that `params` (a `Params`) describe, in registry order: each
    fine-tuning reads the start model its `init` names, and an `on_demand` stage is kept
    only where a kept stage reads its outputs; a stage that loads a LoRA adapter also
    reads its base. With init: openai for both fine-tunings
    there is no pretrain stage; with init: pretrained, no weights stage. dvc.yaml, the
    Dagster assets and `dvc repro` all see this pipeline."""
    stages = {}
    for s in STAGES.values():
        if s.start_model:
            start = START_MODELS.get(getattr(params, s.params_section).init)
            s = replace(s, deps=(start, *s.deps)) if start else s
        if s.adapter_of and getattr(params, s.adapter_of).trainable == "lora":
            s = replace(s, deps=(*s.deps, START_MODELS[getattr(params, s.adapter_of).init]))
        stages[s.name] = s
    reads = [d for s in stages.values() if not s.on_demand for d in s.deps]
    return {
        n: s
        for n, s in stages.items()
        if not s.on_demand or any(inside(d, o.path) or inside(o.path, d) for o in s.outs for d in reads)
    }


def upstream(stage: Stage, stages: dict[str, Stage] | None = None) -> tuple[str, ...]:
    """The stages of `stages` (default: the registry) whose outputs `stage` reads, in order."""
    produced = {
        s.name: [o.path for o in s.outs] + list(s.metrics) + list(s.images) for s in (stages or STAGES).values()
    }
    return tuple(
        n
        for n, outs in produced.items()
        if n != stage.name and any(inside(d, o) or inside(o, d) for d in stage.deps for o in outs)
    )


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
