"""Bad inputs stop a stage with a clear message and leave earlier outputs intact; the
profile writer; the metrics/runtime split and the plot files of a stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from gptpkg.cli import main
from gptpkg.config import ConfigError, load_params
from gptpkg.profiles import apply_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (params.yaml with the tiny profile written in, profiles/) as cwd."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    apply_profile(tmp_path / "params.yaml", "tiny")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def edit_params(project: Path, section: str, **keys) -> None:
    f = project / "params.yaml"
    params = yaml.safe_load(f.read_text())
    params[section].update(keys)
    f.write_text(yaml.safe_dump(params, sort_keys=False))


def sentinel(folder: Path, name: str = "model.safetensors") -> Path:
    """An earlier output that a failing stage must leave as it was."""
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / name
    f.write_bytes(b"earlier output")
    return f


def run(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args + ["--no-progress"])
    return rc, capsys.readouterr().err


def copy_raw(project: Path, shared_data: Path, skip: str | None = None) -> Path:
    """The project's raw files (params.data.files), from the offline mirror, except `skip`."""
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    for name in load_params(project / "params.yaml").data.files:
        if name != skip:
            shutil.copy(shared_data / name, raw / name)
    return raw


def test_missing_raw_file_stops_prepare(project, shared_data, capsys):
    copy_raw(project, shared_data, skip="the-verdict.txt")
    old = sentinel(project / "data" / "processed", "corpus.npy")
    rc, err = run(["prepare"], capsys)
    assert rc == 1
    assert "data/raw/the-verdict.txt is missing" in err and "gptpkg fetch" in err
    assert old.read_bytes() == b"earlier output"


def test_corrupt_raw_file_stops_prepare(project, shared_data, capsys):
    raw = copy_raw(project, shared_data)
    (raw / "SMSSpamCollection").write_bytes((raw / "SMSSpamCollection").read_bytes()[:-100])
    old = sentinel(project / "data" / "processed", "corpus.npy")
    rc, err = run(["prepare"], capsys)
    assert rc == 1
    assert "SMSSpamCollection is corrupt" in err and "expected 7d039a24" in err
    assert old.read_bytes() == b"earlier output"


def test_fetch_without_mirror_or_network_names_the_way_out(project, capsys, monkeypatch):
    monkeypatch.delenv("GPTPKG_DATA_MIRROR")
    edit_params(project, "data", mirror="no-such-mirror", retries=1, files=["the-verdict.txt"])
    rc, err = run(["fetch"], capsys)
    assert rc == 1
    assert "could not download" in err and "GPTPKG_DATA_MIRROR" in err
    assert not (project / "data" / "raw" / "the-verdict.txt").exists()


def test_unknown_params_key_stops_before_anything_runs(project, capsys):
    edit_params(project, "pretrain", learning_rate=0.1)
    old = sentinel(project / "models" / "pretrained")
    rc, err = run(["pretrain"], capsys)
    assert rc == 1
    assert "params.pretrain: unknown key(s) ['learning_rate']" in err
    assert old.read_bytes() == b"earlier output"
    assert not (project / "wandb_runs").exists()  # failed before a W&B run was opened


@pytest.mark.parametrize(
    "stage, key, value, output, message",
    [
        ("finetune_spam", "lr", "fast", "spam_classifier", "params.finetune_spam.lr: expected a number, got 'fast'"),
        (
            "pretrain",
            "max_length",
            4096,
            "pretrained",
            "params.pretrain.max_length: expected 1..128 (the context_length of tiny), got 4096",
        ),
        (
            "finetune_spam",
            "batching",
            "sorted",
            "spam_classifier",
            "params.finetune_spam.batching: expected bucketed|shuffled|pad_longest, got 'sorted'",
        ),
        (
            "finetune_instruct",
            "drop_rate",
            1.5,
            "instruct",
            "params.finetune_instruct.drop_rate: expected null (the start model's) or a probability in [0, 1), got 1.5",
        ),
    ],
)
def test_bad_value_names_the_key_and_keeps_the_old_output(project, capsys, stage, key, value, output, message):
    edit_params(project, stage, **{key: value})
    old = sentinel(project / "models" / output)
    rc, err = run([stage], capsys)
    assert rc == 1
    assert message in err
    assert old.read_bytes() == b"earlier output"


def test_override_of_missing_key_is_an_error(project, capsys):
    rc, err = run(["baseline_spam", "--set", "baseline_spam.c=1.0"], capsys)
    assert rc == 1 and "no key 'baseline_spam.c'" in err


def test_empty_corpus_list(project, capsys):
    edit_params(project, "pretrain", corpus=[])
    rc, err = run(["pretrain"], capsys)
    assert rc == 1 and "params.pretrain.corpus" in err and "non-empty" in err


def test_corpus_without_tokens(project, capsys):
    from gptpkg.shards import write_manifest

    corpus = project / "data" / "processed" / "corpus"
    corpus.mkdir(parents=True)
    write_manifest(corpus, {"the-verdict.txt": {p: {"shards": []} for p in ("train", "val")}}, 1000)
    old = sentinel(project / "models" / "pretrained")
    rc, err = run(["pretrain", "--set", "pretrain.corpus=[the-verdict.txt]"], capsys)
    assert rc == 1
    assert "['the-verdict.txt']: the train split" in err and "holds no tokens" in err
    assert old.read_bytes() == b"earlier output"


# ---------------------------------------------------------------------------------
# Profiles


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_shipped_profile_parses(profile):
    params = load_params(ROOT / "params.yaml", profile=profile)  # every rule checked here
    for section, keys in yaml.safe_load((ROOT / "profiles" / f"{profile}.yaml").read_text()).items():
        for key, value in keys.items():
            assert getattr(getattr(params, section), key) == value, f"{section}.{key}"


def test_apply_profile_keeps_comments_and_sets_values(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    changed = apply_profile(tmp_path / "params.yaml", "gpt2-small")
    assert "pretrain.model" in changed and "finetune_spam.lr" in changed
    text = (tmp_path / "params.yaml").read_text()
    assert "# Every hyperparameter of the pipeline" in text
    assert load_params(tmp_path / "params.yaml") == load_params(ROOT / "params.yaml", profile="gpt2-small")
    assert apply_profile(tmp_path / "params.yaml", "gpt2-small") == []  # idempotent


def test_bad_profile_leaves_params_unchanged(tmp_path, capsys):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "typo.yaml").write_text("pretrain:\n  lerning_rate: 0.1\n")
    (tmp_path / "profiles" / "badtype.yaml").write_text("pretrain:\n  epochs: many\n")
    before = (tmp_path / "params.yaml").read_bytes()
    for name, msg in (
        ("typo", "no key 'pretrain.lerning_rate' in params.yaml"),
        ("badtype", "pretrain.epochs"),
        ("nope", "unknown profile 'nope'"),
    ):
        assert main(["profile", name, "--params", str(tmp_path / "params.yaml")]) == 1
        assert msg in capsys.readouterr().err
        assert (tmp_path / "params.yaml").read_bytes() == before


def test_cli_profile_command(project, capsys):
    assert main(["profile", "tiny"]) == 0
    assert "profile 'tiny' applied, 0 key(s) changed" in capsys.readouterr().out


def test_load_params_rejects_missing_section(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["wandb"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ConfigError, match="params: missing required key 'wandb'"):
        load_params(tmp_path / "params.yaml")


# ---------------------------------------------------------------------------------
# What a stage writes besides its outputs


def test_baseline_writes_stable_metrics_runtime_and_plots(project, shared_data, capsys):
    from gptpkg.plots import confusion_rows
    from gptpkg.runner import RUNTIME_KEYS, run_stage

    copy_raw(project, shared_data)
    params = load_params("params.yaml")
    run_stage("prepare", params)
    run_stage("baseline_spam", params)
    first = (project / "metrics" / "baseline_spam.json").read_text()
    metrics = json.loads(first)
    runtime = json.loads((project / "metrics" / "runtime" / "baseline_spam.json").read_text())
    assert not set(metrics) & set(RUNTIME_KEYS)
    assert runtime["stage_wall_time_s"] > 0 and "wall_time_s" in runtime
    rows = json.loads((project / "plots" / "baseline_spam_confusion.json").read_text())
    assert rows == confusion_rows(metrics["test_confusion"])
    n_test = len((project / "data" / "processed" / "spam" / "test.jsonl").read_text().splitlines())
    assert len(rows) == n_test
    png = (project / "plots" / "baseline_spam_confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    run_stage("baseline_spam", params)  # same params and seed: identical metrics, identical PNG
    assert (project / "metrics" / "baseline_spam.json").read_text() == first
    assert (project / "plots" / "baseline_spam_confusion.png").read_bytes() == png


def test_confusion_rows_expand_counts():
    from gptpkg.plots import confusion_rows

    rows = confusion_rows([[2, 1], [0, 3]])
    assert len(rows) == 6
    assert rows.count({"actual": "ham", "predicted": "spam"}) == 1
    assert rows.count({"actual": "spam", "predicted": "spam"}) == 3


def test_written_files_get_the_usual_mode(tmp_path):
    import os

    from gptpkg.files import atomic_write_text
    from gptpkg.plots import render_curves

    atomic_write_text(tmp_path / "m.json", "{}")
    render_curves([{"step": 1, "train_loss": 2.0, "val_loss": 2.5}], tmp_path / "c.png", "t")
    umask = os.umask(0)
    os.umask(umask)
    for f in ("m.json", "c.png"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~umask


def test_openai_init_without_local_weights(project, capsys):
    edit_params(project, "finetune_spam", init="openai")
    old = sentinel(project / "models" / "spam_classifier")
    rc, err = run(["finetune_spam"], capsys)
    assert rc == 1
    assert "params.finetune_spam.init: openai reads OpenAI's GPT-2 from models/openai" in err
    assert "run the weights stage first" in err
    assert old.read_bytes() == b"earlier output"
