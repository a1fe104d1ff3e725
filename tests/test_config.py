from pathlib import Path

import pytest
import torch

from gptpkg.config import (
    KNOWN_PARAM_COUNTS, PRESETS, ConfigError, ModelConfig, TrainConfig, from_dict,
    load_params, model_config,
)
from gptpkg.model import GPT
from gptpkg import stages

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ConfigError, match="unknown model preset 'gpt3'"):
        model_config("gpt3")
    with pytest.raises(ConfigError, match="n_layer"):
        model_config("tiny", n_layer=3)


def test_from_dict_rejects_unknown_missing_and_wrong_types():
    with pytest.raises(ConfigError, match=r"params.pretrain: unknown key\(s\) \['lrr'\]"):
        from_dict(TrainConfig, {"lrr": 1.0}, "params.pretrain")
    with pytest.raises(ConfigError, match=r"params.pretrain.batch_size: expected int, got 'eight'"):
        from_dict(TrainConfig, {"batch_size": "eight"}, "params.pretrain")
    with pytest.raises(ConfigError, match="missing required key 'mode'"):
        from_dict(stages.WandbConfig, {"project": "p", "entity": ""}, "params.wandb")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        from_dict(TrainConfig, {"batch_size": 0}, "params.pretrain")
    # ints are accepted where floats are expected, bools are not ints
    assert from_dict(TrainConfig, {"lr": 1}, "x").lr == 1.0
    with pytest.raises(ConfigError):
        from_dict(TrainConfig, {"batch_size": True}, "x")


def test_model_config_validates_heads():
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(emb_dim=30, n_heads=4)


def test_vocab_padding():
    cfg = model_config("tiny", vocab_multiple=64)
    assert cfg.padded_vocab_size == 50304
    model = GPT(cfg)
    assert model.tok_emb.weight.shape[0] == 50304
    logits = model(torch.zeros(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 50257)


def test_overrides_and_profiles(tmp_path):
    (tmp_path / "params.yaml").write_text("a:\n  x: 1\n  y: [1, 2]\n")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.yaml").write_text("a:\n  x: 2\n")
    (tmp_path / "profiles" / "bad.yaml").write_text("a:\n  z: 2\n")
    params = load_params(tmp_path / "params.yaml", ["a.y=[3]"], "p")
    assert params == {"a": {"x": 2, "y": [3]}}
    with pytest.raises(ConfigError, match=r"key\(s\) \['z'\] are not in params.yaml section 'a'"):
        load_params(tmp_path / "params.yaml", profile="bad")
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_params(tmp_path / "params.yaml", profile="nope")
    with pytest.raises(ConfigError, match="no key 'a.w'"):
        load_params(tmp_path / "params.yaml", ["a.w=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


SHIPPED = [None] + sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))


@pytest.mark.parametrize("profile", SHIPPED)
def test_every_shipped_params_profile_parses(profile):
    params = load_params(ROOT / "params.yaml", profile=profile)
    stages.paths_of(params)
    for name, cls in [("prepare", stages.PrepareConfig), ("pretrain", stages.PretrainConfig),
                      ("finetune_spam", stages.SpamConfig), ("baseline_spam", stages.BaselineConfig),
                      ("finetune_instruct", stages.InstructConfig)]:
        cfg, train = stages.stage_config(params, name, cls)
        assert cfg is not None
    pre, _ = stages.stage_config(params, "pretrain", stages.PretrainConfig)
    assert pre.max_length <= model_config(pre.model).context_length
