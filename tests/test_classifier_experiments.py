"""bench/classifier_experiments.py: experiment names and the table built from `dvc exp show --json`."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ce():
    spec = importlib.util.spec_from_file_location("classifier_experiments", ROOT / "bench" / "classifier_experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_lever_is_a_valid_distinct_experiment_name(ce):
    names = [ce.exp_name(lever) for lever in ce.LEVERS]
    assert len(set(names)) == len(names)
    for name in names:  # DVC experiment names are git ref components
        subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"], check=True)


def test_every_override_names_a_real_params_key(ce):
    from gptpkg.config import load_params

    overrides = [o for os_ in ce.LEVERS.values() for o in os_] + [f"{ce.CV_KEY}=5"]
    load_params(ROOT / "params.yaml", overrides)  # unknown or mistyped keys raise
    params = load_params(ROOT / "params.yaml")
    for o in overrides:
        section, key = o.split("=", 1)[0].split(".")
        assert key in params[section], o
    assert ce.NOT_CANDIDATES <= set(ce.LEVERS)


def _exp(name: str, val: float, test: float, pre_s: float, ft_s: float, cv_bal: float | None = None,
         cv_s: float | None = None, ts: str = "2026-11-24T03:00:00") -> dict:
    m = lambda d: {"data": d}  # noqa: E731
    ft = {"val_accuracy": val, "test_accuracy": test, "test_spam_f1": 0.9,
          "heldout_traffic_accuracy": 0.99, "heldout_traffic_spam_f1": 0.95}
    runtime = {"stage_wall_time_s": ft_s}
    if cv_bal is not None:
        ft.update(cv_folds=5, cv_balanced_accuracy=cv_bal, cv_accuracy=0.985, cv_spam_f1=0.93)
        runtime["cv_wall_time_s"] = cv_s
    return {"revs": [{"rev": "abc", "name": name, "data": {"timestamp": ts, "metrics": {
        "metrics/finetune_spam.json": m(ft),
        "metrics/baseline_spam.json": m({"test_accuracy": 0.9667, "heldout_traffic_accuracy": 0.97,
                                         "heldout_traffic_spam_f1": 0.8}),
        "metrics/runtime/pretrain.json": m({"stage_wall_time_s": pre_s}),
        "metrics/runtime/finetune_spam.json": m(runtime),
    }}}], "name": name}


def test_table_rows_come_from_exp_show_in_lever_order(ce):
    show = [{"rev": "workspace", "experiments": None},
            {"rev": "c0ffee", "name": "main", "experiments": [
                _exp(ce.exp_name("seed=2"), 0.98, 0.97, 30.0, 30.0),
                _exp("someone-elses-experiment", 0.5, 0.5, 1.0, 1.0),
                _exp(ce.exp_name("defaults"), 0.9933, 0.9667, 30.0, 150.0, cv_bal=0.955, cv_s=90.0)]}]
    rows = ce.rows_from_exp_show(show)
    assert [r["lever"] for r in rows] == ["defaults", "seed=2"]
    assert rows[0]["minutes"] == pytest.approx(1.5) and rows[0]["cv_minutes"] == pytest.approx(1.5)
    table = ce.markdown(rows)
    assert ("| defaults | 95.50% | 98.50% | 0.9300 | 99.33% | 96.67% | 0.9000 | 99.00% | 0.9500 | 96.67% "
            "| 97.00% | 0.8000 | 1.5 | 1.5 |") in table
    assert "| seed=2 | – | – | – | 98.00% | 97.00% |" in table  # a run without CV
    assert "Chosen by 5-fold CV balanced accuracy: **defaults** (CV balanced acc 95.50%; its test acc 96.67%" in table


def _rows(ce, cv: dict[str, float | None]) -> list[dict]:
    show = [{"rev": "c0ffee", "experiments": [_exp(ce.exp_name(n), 0.99, 0.97, 1.0, 2.0, cv_bal=v, cv_s=1.0)
                                              for n, v in cv.items()]}]
    return ce.rows_from_exp_show(show)


def test_choice_is_the_best_cv_balanced_accuracy_never_val_or_test(ce):
    rows = _rows(ce, {"defaults": 0.95, "lr=0.001": 0.96, "epochs=4": 0.958})
    rows[0]["test_accuracy"], rows[0]["val_accuracy"] = 1.0, 1.0  # test and val do not matter
    assert ce.choose(rows)["lever"] == "lr=0.001"


def test_a_tie_with_the_defaults_keeps_the_defaults(ce):
    assert ce.choose(_rows(ce, {"defaults": 0.96, "lr=0.001": 0.96, "epochs=4": 0.95}))["lever"] == "defaults"
    # other ties: the earlier lever of LEVERS
    assert ce.choose(_rows(ce, {"defaults": 0.9, "epochs=4": 0.96, "lr=0.001": 0.96}))["lever"] == "lr=0.001"


def test_seed_and_baseline_rows_and_rows_without_cv_are_not_candidates(ce):
    rows = _rows(ce, {"defaults": 0.95, "seed=2": 0.99, "baseline_spam.train_data=all": 0.99, "epochs=4": None})
    assert ce.choose(rows)["lever"] == "defaults"
    assert ce.choose(_rows(ce, {"epochs=4": None})) is None


def test_a_lever_run_on_several_commits_is_its_cv_run_then_the_latest(ce):
    name = ce.exp_name("epochs=4")
    show = [{"rev": "old", "experiments": [_exp(name, 0.9, 0.9, 1.0, 1.0, ts="2026-11-24T05:00:00")]},
            {"rev": "new", "experiments": [_exp(name, 0.8, 0.8, 1.0, 2.0, cv_bal=0.95, cv_s=1.0, ts="2026-11-24T03:00:00"),
                                           _exp(name, 0.7, 0.7, 1.0, 2.0, cv_bal=0.96, cv_s=1.0, ts="2026-11-24T04:00:00")]}]
    rows = ce.rows_from_exp_show(show)
    assert len(rows) == 1 and rows[0]["cv_balanced_accuracy"] == 0.96 and rows[0]["val_accuracy"] == 0.7


def test_seed_rows_belong_to_the_lever_they_rerun(ce):
    assert ce.configuration("seed=2") == "defaults"
    assert ce.configuration("soup=3, seed=4") == "soup=3 (3 fine-tunings averaged)"
    assert ce.configuration("r3 pretrain drop_rate=0.1, seed=3") == "r3 pretrain drop_rate=0.1"
    assert ce.configuration("lr=0.001") == "lr=0.001"
    for lever in ce.LEVERS:  # every seed row reruns a lever of the table, and is no candidate
        if ce.configuration(lever) != lever:
            assert ce.configuration(lever) in ce.LEVERS and lever in ce.NOT_CANDIDATES


def test_once_levers_have_seed_reruns_their_seed_means_choose(ce):
    rows = _rows(ce, {"defaults": 0.972, "seed=2": 0.974, "seed=3": 0.968,
                      "soup=3 (3 fine-tunings averaged)": 0.99,  # the best single run, but never rerun with other seeds
                      "pretrain 8 epochs + soup=3": 0.97, "pretrain 8 epochs + soup=3, seed=2": 0.98,
                      "pretrain 8 epochs + soup=3, seed=3": 0.99,
                      "r3 finetune epochs=3": 0.985, "r3 finetune epochs=3, seed=2": 0.975,
                      "r3 finetune epochs=3, seed=3": 0.975})
    means = ce.seed_means(rows)
    assert means["defaults"] == (pytest.approx(0.9713, abs=1e-4), 3)
    assert means["pretrain 8 epochs + soup=3"] == (pytest.approx(0.98), 3)
    assert "soup=3 (3 fine-tunings averaged)" not in means
    assert ce.choose(rows)["lever"] == "pretrain 8 epochs + soup=3"  # 98.00% beats 97.83% and 97.13%
    table = ce.markdown(rows)
    assert "pretrain 8 epochs + soup=3 98.00% (3 seeds)" in table
    assert "mean over fine-tuning seeds: **pretrain 8 epochs + soup=3** (98.00% over 3 seeds" in table
    # seeds of the defaults alone do not change the rule: the best single run still wins
    rows = _rows(ce, {"defaults": 0.972, "seed=2": 0.99, "soup=3 (3 fine-tunings averaged)": 0.975})
    assert ce.choose(rows)["lever"] == "soup=3 (3 fine-tunings averaged)"


def _pred(probs: dict[str, list[tuple[str, int, float]]], folds=5, seed=123) -> dict:
    return {"cv_folds": folds, "cv_seed": seed,
            **{part: [{"text": t, "label": y, "spam_probability": p} for t, y, p in rows] for part, rows in probs.items()}}


def test_an_ensemble_averages_its_members_probabilities_message_by_message(ce):
    a = _pred({"cv": [("h1", 0, 0.2), ("h2", 0, 0.6), ("s1", 1, 0.4), ("s2", 1, 0.9)]})
    b = _pred({"cv": [("h1", 0, 0.1), ("h2", 0, 0.3), ("s1", 1, 0.7), ("s2", 1, 0.2)]})
    assert ce.ensemble_metrics([a], ("cv",))["cv_confusion"] == [[1, 1], [1, 1]]
    assert ce.cv_errors(a) == {1, 2} and ce.cv_errors(b) == {3}
    # means 0.15, 0.45, 0.55, 0.55: every message right
    e = ce.ensemble_metrics([a, b], ("cv",))
    assert e["cv_confusion"] == [[2, 0], [0, 2]] and e["cv_balanced_accuracy"] == 1.0
    b["cv"][3]["spam_probability"] = 0.05  # s2's mean 0.475: missed
    e = ce.ensemble_metrics([a, b], ("cv",))
    assert e["cv_confusion"] == [[2, 0], [1, 1]] and e["cv_balanced_accuracy"] == pytest.approx(0.75)


def test_an_ensemble_refuses_members_on_other_messages_or_folds(ce):
    a = _pred({"cv": [("h1", 0, 0.2), ("s1", 1, 0.9)]})
    with pytest.raises(SystemExit, match="not over the same messages"):
        ce.ensemble_metrics([a, _pred({"cv": [("s1", 1, 0.9), ("h1", 0, 0.2)]})], ("cv",))
    with pytest.raises(SystemExit, match="different folds"):
        ce.ensemble_metrics([a, _pred({"cv": [("h1", 0, 0.2), ("s1", 1, 0.9)]}, seed=2)], ("cv",))
    with pytest.raises(SystemExit, match="not over the same messages"):  # cv_folds 0: no CV predictions
        ce.ensemble_metrics([_pred({"cv": []}, folds=0)], ("cv",))


def test_the_predictions_file_read_is_the_one_finetune_spam_writes(ce):
    from gptpkg.config import load_params
    from gptpkg.finetune import PREDICTIONS_FILE

    assert ce.PREDICTIONS == f"{load_params(ROOT / 'params.yaml')['paths']['metrics']}/{PREDICTIONS_FILE}"


def test_an_ensembles_seed_groups_pair_the_members_runs_at_each_fine_tuning_seed(ce):
    a, b = "r16 pretrain lm_vocab=corpus", "r16 pretrain lm_vocab=corpus, pretrain_seed=124"
    assert ce.seed_groups([a, b]) == [[a, b], [f"{a}, seed=2", f"{b}, seed=2"], [f"{a}, seed=3", f"{b}, seed=3"]]
    assert ce.configuration(b) == b and ce.configuration(f"{b}, seed=3") == b


def test_an_ensemble_reads_each_members_newest_run_with_predictions_from_its_experiment_ref(ce, tmp_path, monkeypatch):
    """exp_predictions on a real git repository holding experiment refs as `dvc exp run` writes them."""
    import json
    import os

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, text=True,
                              capture_output=True, check=True).stdout.strip()

    git("init", "-q")
    lever = "r16 pretrain lm_vocab=corpus"

    def exp_commit(preds: dict | None, when: int) -> str:
        path = tmp_path / ce.PREDICTIONS
        path.parent.mkdir(parents=True, exist_ok=True)
        if preds is None:
            path.unlink(missing_ok=True)
            (tmp_path / "other").write_text(str(when))
        else:
            path.write_text(json.dumps(preds))
        git("add", "-A")
        env = {"GIT_COMMITTER_DATE": f"{when} +0000", "GIT_AUTHOR_DATE": f"{when} +0000"}
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", str(when)], cwd=tmp_path,
                       check=True, env={**os.environ, **env})
        return git("rev-parse", "HEAD")

    old, new = _pred({"cv": [("h", 0, 0.1)]}), _pred({"cv": [("h", 0, 0.2)]})
    git("update-ref", f"refs/exps/aa/bb/base1/{ce.exp_name(lever)}", exp_commit(old, 1_700_000_000))
    git("update-ref", f"refs/exps/cc/dd/base2/{ce.exp_name(lever)}", exp_commit(new, 1_700_000_100))
    git("update-ref", f"refs/exps/ee/ff/base3/{ce.exp_name(lever)}", exp_commit(None, 1_700_000_200))  # before the file
    monkeypatch.setattr(ce, "ROOT", tmp_path)
    assert ce.exp_predictions(lever) == new
    with pytest.raises(SystemExit, match="no experiment 'r16-pretrain-lm_vocab-corpus-seed-2' with"):
        ce.exp_predictions(f"{lever}, seed=2")
