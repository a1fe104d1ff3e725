import json
from pathlib import Path

import pydantic
import pytest
import torch

from gptpkg.config import ConfigError, Params, TrainConfig, WandbConfig, load_params
from gptpkg.model import GPT
from gptpkg.presets import KNOWN_PARAM_COUNTS, PRESETS, ModelConfig, model_config
from gptpkg.profiles import apply_profile, merged_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.mark.parametrize("name,count", sorted(KNOWN_PARAM_COUNTS.items()))
def test_openai_preset_parameter_counts(name, count):
    with torch.device("meta"):
        model = GPT(model_config(name))
    assert model.num_params() == count


def test_untied_head_adds_the_output_matrix():
    with torch.device("meta"):
        tied = GPT(model_config("gpt2-small")).num_params()
        untied = GPT(model_config("gpt2-small", tie_weights=False)).num_params()
    assert untied - tied == 50257 * 768


def test_every_preset_builds_a_model():
    for name in PRESETS:
        cfg = model_config(name)
        assert cfg.emb_dim % cfg.n_heads == 0


def test_unknown_preset_and_key_are_named():
    with pytest.raises(ConfigError, match="model preset: expected one of .* got 'gpt3'"):
        model_config("gpt3")
    with pytest.raises(ConfigError, match="n_layer"):
        model_config("tiny", n_layer=3)


def test_parse_rejects_unknown_missing_and_wrong_types():
    with pytest.raises(ConfigError, match=r"params.pretrain: unknown key\(s\) \['lrr'\]"):
        TrainConfig.parse({"lrr": 1.0}, "params.pretrain")
    with pytest.raises(ConfigError, match=r"params.pretrain.batch_size: expected an integer, got 'eight'"):
        TrainConfig.parse({"batch_size": "eight"}, "params.pretrain")
    with pytest.raises(ConfigError, match="missing required key 'mode'"):
        WandbConfig.parse({"project": "p", "entity": ""}, "params.wandb")
    with pytest.raises(ConfigError, match=r"params.pretrain.batch_size: expected an integer >= 1, got 0"):
        TrainConfig.parse({"batch_size": 0}, "params.pretrain")
    # ints are accepted where floats are expected, bools are not ints
    assert TrainConfig.parse({"lr": 1}, "x").lr == 1.0
    assert isinstance(TrainConfig.parse({"lr": 1}, "x").lr, float)
    with pytest.raises(ConfigError):
        TrainConfig.parse({"batch_size": True}, "x")


def test_model_config_validates_heads():
    with pytest.raises(ConfigError, match="emb_dim: expected a multiple of n_heads=4"):
        ModelConfig.parse({"emb_dim": 30, "n_heads": 4}, "model")


def test_vocab_padding():
    cfg = model_config("tiny", vocab_multiple=64)
    assert cfg.padded_vocab_size == 50304
    model = GPT(cfg)
    assert model.tok_emb.weight.shape[0] == 50304
    logits = model(torch.zeros(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 50257)


def test_load_params_gives_one_typed_tree():
    params = load_params(PARAMS)
    assert isinstance(params, Params)
    assert list(Params.model_fields) == list(merged_params(PARAMS))  # every section, in order
    assert isinstance(params.finetune_spam, TrainConfig) and params.finetune_spam.soup >= 1
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        params.finetune_spam.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("value,expected", [("true", True), ("false", False), ("auto", "auto"), ("True", True)])
def test_compile_takes_yaml_booleans(value, expected):
    assert load_params(PARAMS, [f"pretrain.compile={value}"]).pretrain.compile == expected


@pytest.mark.parametrize(
    "override,message",
    [
        ("pretrain.compile=maybe", r"params.pretrain.compile: expected true\|false or auto, got 'maybe'"),
        ("pretrain.precision=fp16", r"params.pretrain.precision: expected auto\|fp32\|bf16, got 'fp16'"),
        ("pretrain.max_length=1000", r"params.pretrain.max_length: expected 1..256 \(the context_length of cpu-mini\)"),
        ("pretrain.model=gpt5", r"params.pretrain.model: expected a preset of"),
        ("pretrain.corpus=[]", r"params.pretrain.corpus: expected a non-empty list"),
        (
            "pretrain.corpus=[wiki]",
            r"params.pretrain.corpus: expected a list of the-verdict.txt\|tinyshakespeare.txt\|sms",
        ),
        ("finetune_spam.epochs=0", r"params.finetune_spam.epochs: expected > 0, or max_steps > 0"),
        ("pretrain.device=tpu", r"params.pretrain.device: expected auto\|cpu\|cuda\|cuda:N\|mps, got 'tpu'"),
        ("finetune_spam.lr=abc", r"params.finetune_spam.lr: expected a number, got 'abc'"),
        ("finetune_spam.batching=pad", r"params.finetune_spam.batching: expected bucketed\|shuffled\|pad_longest"),
        ("finetune_spam.soup=0", r"params.finetune_spam.soup: expected an integer >= 1"),
        ("finetune_spam.cv_folds=1", r"params.finetune_spam.cv_folds: expected 0 \(off\) or a number of folds >= 2"),
        ("finetune_spam.decision_spam_share=1.0", r"params.finetune_spam.decision_spam_share: expected null"),
        ("finetune_spam.drop_rate=1.5", r"params.finetune_spam.drop_rate: expected null \(the start model's\)"),
        ("finetune_spam.class_weights=[1.0]", r"params.finetune_spam.class_weights: expected null or two positive"),
        ("weights.model=gpt3", r"params.weights.model: expected gpt2\|gpt2-medium\|gpt2-large\|gpt2-xl, got .gpt3."),
        ("finetune_spam.train_data=nontest", r"params.finetune_spam.train_data: expected book\|all, got 'nontest'"),
        ("finetune_spam.sparse_embedding=auto", r"params.finetune_spam.sparse_embedding: expected true\|false"),
        ("prepare.spam_split=half", r"params.prepare.spam_split: expected book\|full, got 'half'"),
        ("data.files=[nope.txt]", r"params.data.files: expected names from"),
        (
            "finetune_instruct.repetition_penalty=0",
            r"params.finetune_instruct.repetition_penalty: expected a number > 0",
        ),
        ("finetune_instruct.no_repeat_ngram=-1", r"params.finetune_instruct.no_repeat_ngram: expected an integer >= 0"),
        ("baseline_instruct.ngram_max=0", r"params.baseline_instruct.ngram_max: expected an integer >= 1, got 0"),
        ("export_onnx.opset=13", r"params.export_onnx.opset: expected an ONNX opset >= 17, got 13"),
        ("package.variant=fp16", r"params.package.variant: expected fp32\|int8, got 'fp16'"),
        ("wandb.mode=cloud", r"params.wandb.mode: expected offline\|online\|disabled, got 'cloud'"),
        ("finetune_spam.lrr=1", r"override 'finetune_spam.lrr=1': no key 'finetune_spam.lrr' in params.yaml"),
        ("finetune_spam.lr", r"override 'finetune_spam.lr': expected section.key=value"),
    ],
)
def test_each_rule_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(PARAMS, [override])


def test_profiles_change_only_existing_keys(tmp_path):
    (tmp_path / "params.yaml").write_text("a:\n  x: 1\n  y: [1, 2]\n")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.yaml").write_text("a:\n  x: 2\n")
    (tmp_path / "profiles" / "bad.yaml").write_text("a:\n  z: 2\n")
    assert merged_params(tmp_path / "params.yaml", ["a.y=[3]"], "p") == {"a": {"x": 2, "y": [3]}}
    with pytest.raises(ConfigError, match=r"profiles/bad.yaml: no key 'a.z' in params.yaml"):
        merged_params(tmp_path / "params.yaml", profile="bad")
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        merged_params(tmp_path / "params.yaml", profile="nope")
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


SHIPPED = [None] + sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))


@pytest.mark.parametrize("profile", SHIPPED)
def test_every_shipped_params_profile_parses(profile):
    params = load_params(PARAMS, profile=profile)
    assert params.pretrain.max_length <= params.pretrain.architecture().context_length


def test_apply_profile_writes_the_same_values_load_params_gives(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    (tmp_path / "profiles").symlink_to(ROOT / "profiles")
    changed = apply_profile(tmp_path / "params.yaml", "fast", ["finetune_spam.soup=2"])
    assert "pretrain.model" in changed and "finetune_spam.soup" in changed
    assert load_params(tmp_path / "params.yaml") == load_params(PARAMS, ["finetune_spam.soup=2"], "fast")
    assert "# every file and folder" in (tmp_path / "params.yaml").read_text()  # comments kept
    assert apply_profile(tmp_path / "params.yaml", "fast") == []  # nothing left to change
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="finetune_spam.soup"):
        apply_profile(tmp_path / "params.yaml", None, ["finetune_spam.soup=0"])
    assert (tmp_path / "params.yaml").read_text() == before  # a bad value writes nothing


def test_every_key_has_a_description():
    for name, section in Params.model_fields.items():
        for key, field in section.annotation.model_fields.items():
            assert field.description, f"params.{name}.{key} has no description"
    assert all(f.description for f in ModelConfig.model_fields.values())


def test_parsed_values_keep_their_json():
    """Checkpoints record `training_params()` as JSON, and `--resume` compares it: an int
    given for a float becomes a float, lists stay lists, null stays None, and the keys come
    in declaration order (the loop's keys, then the section's own)."""
    raw = merged_params(PARAMS)["finetune_spam"]
    changes = {"lr": 1, "epochs": 2, "grad_clip": 0, "class_weights": [1, 3], "drop_rate": None, "compile": True}
    cfg = load_params(PARAMS, [f"finetune_spam.{k}={json.dumps(v)}" for k, v in changes.items()]).finetune_spam
    params = cfg.training_params()
    assert json.dumps({k: params[k] for k in changes}) == (
        '{"lr": 1.0, "epochs": 2.0, "grad_clip": 0.0, "class_weights": [1.0, 3.0], "drop_rate": null, "compile": true}'
    )
    assert json.dumps(params["max_steps"]) == "0" and params["batch_size"] == raw["batch_size"]
    assert list(params) == [k for k in type(cfg).model_fields if k not in type(cfg).AFTER_TRAINING]
    assert list(type(cfg).model_fields)[: len(TrainConfig.model_fields)] == list(TrainConfig.model_fields)
    assert cfg.replace(seed=7).training_params() == {**params, "seed": 7}
    with pytest.raises(ConfigError, match=r"SpamConfig.soup: expected an integer >= 1"):
        cfg.replace(soup=0)
