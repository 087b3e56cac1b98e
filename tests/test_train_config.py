"""Training config: file formats, typed overrides, and refusal of unknown keys."""

from __future__ import annotations

import dataclasses

import pytest

from scratchlm.cli import main
from scratchlm.errors import ScratchLMError
from scratchlm.model import ModelConfig
from scratchlm.train.config import ModelSection, TrainConfig, load_train_config
from tests.conftest import REPO_ROOT

YAML = """
model: {preset: tiny, n_layers: 2}
data: {dir: some/data, tokenizer: some/tok}
optimizer: {lr: 3e-4, name: muon}
run: {max_tokens: 1e6, compile: true}
"""


def test_yaml_values_get_their_declared_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    config = load_train_config(path)
    # PyYAML reads 3e-4 and 1e6 as a string and a float; the fields are float and int.
    assert config.optimizer.lr == pytest.approx(3e-4) and isinstance(config.optimizer.lr, float)
    assert config.run.max_tokens == 1_000_000 and isinstance(config.run.max_tokens, int)
    assert config.run.compile is True and config.model.n_layers == 2
    assert config.model.overrides() == {"n_layers": 2}


def test_toml_matches_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text(YAML)
    (tmp_path / "c.toml").write_text(
        '[model]\npreset = "tiny"\nn_layers = 2\n[data]\ndir = "some/data"\n'
        'tokenizer = "some/tok"\n[optimizer]\nlr = 3e-4\nname = "muon"\n'
        '[run]\nmax_tokens = 1000000\ncompile = true\n')
    assert load_train_config(tmp_path / "c.toml") == load_train_config(tmp_path / "c.yaml")


def test_overrides_are_parsed_to_the_field_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    config = load_train_config(path, ["--optimizer.lr=1e-2", "run.max_tokens=null",
                                      "run.max_steps=7", "run.compile=false",
                                      "run.sample_prompt=123"])
    assert config.optimizer.lr == 0.01 and config.run.max_tokens is None
    assert config.run.max_steps == 7 and config.run.compile is False
    assert config.run.sample_prompt == "123"  # str fields stay verbatim


@pytest.mark.parametrize("text, expected", [
    ("model: {preset: tiny, n_layerz: 2}\n", "unknown key in section 'model' 'n_layerz'; valid: preset"),
    ("modle: {}\n", "unknown section 'modle'; valid: model, data, optimizer, schedule, run"),
    ("run: {max_steps: ten}\n", "run.max_steps: expected int or null, got 'ten'"),
    ("run: [1, 2]\n", "section 'run' must be a mapping"),
])
def test_bad_files_are_refused_naming_the_field(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ScratchLMError, match="bad.yaml") as info:
        load_train_config(path, ["data.dir=x"])
    assert expected in str(info.value)


@pytest.mark.parametrize("override, expected", [
    ("optimizer.learning_rate=1", "unknown key in section 'optimizer' 'learning_rate'"),
    ("run.max_steps", "expected section.key=value"),
    ("optimizer.name=sgd", "optimizer.name: must be one of adamw, torch-adamw, muon"),
    ("run.max_steps=-3", "run.max_steps: must be > 0"),
])
def test_bad_overrides_are_refused(override, expected):
    with pytest.raises(ScratchLMError, match=expected):
        load_train_config(None, ["data.dir=x", "run.max_steps=3", override])


def test_a_budget_is_required():
    with pytest.raises(ScratchLMError, match="run.max_steps, run.max_tokens, run.max_minutes"):
        load_train_config(None, ["data.dir=x"])


def test_model_section_mirrors_model_config_fields():
    """Every override field of the model section must be a ModelConfig field (drift check)."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    section_fields = set(ModelSection().__dataclass_fields__) - {"preset", "init_from"}
    assert section_fields <= model_fields
    assert model_fields - section_fields == {"vocab_size"}  # always from the tokenizer


def test_cli_rejects_unknown_override_and_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--config", "x.yaml", "--out", str(tmp_path), "--run.max_stepz=3"])
    assert "--run.max_stepz" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml"), "--out",
                 str(tmp_path)]) == 1
    assert "config file not found" in capsys.readouterr().err


def test_effective_config_round_trips_through_yaml(tmp_path):
    from scratchlm.train.config import dump_config_yaml

    config = load_train_config(None, ["data.dir=x", "run.max_minutes=2.5", "model.dropout=0.1"])
    path = tmp_path / "effective.yaml"
    path.write_text(dump_config_yaml(config))
    assert load_train_config(path) == config
    assert isinstance(config, TrainConfig)


def test_shipped_configs_load():
    configs = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"cpu-smoke.yaml", "tinyshakespeare.yaml",
                                         "tinystories-small.yaml", "gpt2-124m-fineweb-8gpu.yaml"}
    for path in configs:
        config = load_train_config(path)
        # Every shipped global batch divides into whole micro-batches of one process.
        context = config.model.context_length
        assert config.run.global_batch_tokens % (config.run.micro_batch_size * context) == 0
