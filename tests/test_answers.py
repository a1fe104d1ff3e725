"""Offline scores of instruction answers (rouge-score, exact match), the retrieval
baseline stage on the real instruction splits, the sample table and the Dagster check
that compares the model with the baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import params_in

from gptpkg.answers import BASELINE_RESPONSES, distinct_share, item_scores, mean_scores, sample_table
from gptpkg.config import BaselineInstructConfig
from gptpkg.stages.baseline_instruct import nearest_outputs


def test_item_scores_are_rouge_l_f1_and_folded_exact_match():
    rows = item_scores(
        ["The cat sat on the mat.", "Paris", "a b c d"],
        ["the  CAT sat on the mat.", "paris ", "x y"],
    )
    assert [r["item"] for r in rows] == [0, 1, 2]
    assert rows[0]["rouge_l"] == pytest.approx(1.0) and rows[0]["exact_match"] == 1
    assert rows[1]["exact_match"] == 1 and rows[2] == {"item": 2, "rouge_l": 0.0, "exact_match": 0}
    # LCS "the cat on the" (4 words) of 6 and 5 words: F1 = 2 * (4/6 * 4/5) / (4/6 + 4/5)
    (r,) = item_scores(["the cat sat on the mat"], ["the cat is on the"])
    assert r["rouge_l"] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert mean_scores(rows, "test_") == pytest.approx({"test_rouge_l": 2 / 3, "test_exact_match": 2 / 3})
    with pytest.raises(ValueError, match="one answer per reference"):
        item_scores(["a"], [])


def test_distinct_share_folds_case_and_whitespace():
    assert distinct_share([":)", ":) ", " :)", ":)"]) == 0.25
    assert distinct_share(["Paris", "paris", "Rome", "Oslo"]) == 0.75
    assert distinct_share([]) == 0.0


def test_nearest_outputs_answers_with_the_closest_training_instruction():
    train = [
        {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
        {"instruction": "Convert the sentence to passive voice.", "input": "The cat ate the fish.", "output": "P1"},
        {"instruction": "Give a synonym.", "input": "happy", "output": "Joyful."},
    ]
    queries = [
        {"instruction": "What is the capital of France?", "input": ""},
        {"instruction": "Give a synonym for the word.", "input": "sad"},
        {"instruction": "Rewrite in passive voice.", "input": "The dog ate the fish."},
    ]
    cfg = BaselineInstructConfig(max_features=0, ngram_max=1)
    assert nearest_outputs(train, queries, cfg) == ["Paris.", "Joyful.", "P1"]


def test_baseline_instruct_stage_on_the_real_splits(tmp_path):
    from gptpkg.runner import run_stage

    params = params_in(tmp_path, profile="tiny")
    run_stage("fetch", params)
    run_stage("prepare", params)
    m = run_stage("baseline_instruct", params)
    # the retrieval baseline is well above nothing, below perfect, on val and test
    assert 0.3 < m["test_rouge_l"] < 0.7 and 0.3 < m["val_rouge_l"] < 0.7
    assert 0.0 <= m["test_exact_match"] < 0.2 and m["train_records"] == 935
    stable = json.loads((Path(params.paths.metrics) / "baseline_instruct.json").read_text())
    assert stable["test_rouge_l"] == m["test_rouge_l"] and "wall_time_s" not in stable
    responses = json.loads((Path(params.paths.metrics) / BASELINE_RESPONSES).read_text())
    test = json.loads((Path(params.paths.processed) / "instruct" / "test.json").read_text())
    assert [r["instruction"] for r in responses] == [e["instruction"] for e in test]
    train_outputs = {
        e["output"] for e in json.loads((Path(params.paths.processed) / "instruct" / "train.json").read_text())
    }
    assert all(r["baseline_response"] in train_outputs for r in responses)
    scores = json.loads((Path(params.paths.plots) / "baseline_instruct_scores.json").read_text())
    assert [s["rouge_l"] for s in scores] == [r["rouge_l"] for r in responses]
    assert sum(s["rouge_l"] for s in scores) / len(scores) == pytest.approx(m["test_rouge_l"])


def test_sample_table_puts_model_and_baseline_side_by_side():
    model = [
        {"instruction": f"Say {i}.", "input": "" if i else "with | pipe", "output": f"{i}", "model_response": "x"}
        | {"rouge_l": 0.0}
        for i in range(12)
    ]
    baseline = [{**r, "baseline_response": f"b{i}", "rouge_l": 0.5} for i, r in enumerate(model[:5])]
    table = sample_table(model, baseline).splitlines()
    assert len(table) == 2 + 10
    assert "with \\| pipe" in table[2] and "| b0 | 0.50 |" in table[2]
    assert table[-1].endswith("| — | — |")  # item 9: the baseline file holds no answer to it
    assert len(sample_table(model, None).splitlines()) == 12


def test_rouge_l_check_warns_below_the_baseline(tmp_path):
    from dagster import build_asset_check_context

    from workflows.checks import build_checks
    from workflows.dvc_project import Stage
    from workflows.resources import DvcWorkspace

    def stage(name):
        return Stage(name, f"gptpkg {name}", ("prepare",), (), (), (f"metrics/{name}.json",), (), "x", "instruction")

    (check,) = build_checks([stage("finetune_instruct"), stage("baseline_instruct")])
    (tmp_path / "metrics").mkdir()
    res = DvcWorkspace(root=str(tmp_path))

    def run(model, base):
        for name, m in (("finetune_instruct", model), ("baseline_instruct", base)):
            (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps(m))
        return check(build_asset_check_context(), dvc=res)

    r = run({"test_rouge_l": 0.5}, {"test_rouge_l": 0.45})
    assert r.passed and r.severity.value == "WARN"
    r = run({"test_rouge_l": 0.3}, {"test_rouge_l": 0.45})
    assert not r.passed and r.severity.value == "WARN" and "0.3000 vs retrieval baseline 0.4500" in r.description
    r = run({"test_loss": 2.0}, {"test_rouge_l": 0.45})
    assert not r.passed and "test_rouge_l" in r.description
