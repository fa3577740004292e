"""Recipes: strict validation, every problem at once with its path and fix, --set overrides, shipped YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunelab import config as cfglib
from tunelab.errors import ConfigError
from tunelab.recipes import load_recipe
from tunelab.train.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"recipe": "sft", "model": {"name": "m"}, "data": {"train": "t.jsonl"}}


def test_defaults_and_overrides():
    cfg = cfglib.load(SFTConfig, data=GOOD, overrides=["train.learning_rate=1e-4", "lora.r=4",
                                                        "data.system_prompt=Be nice.", "train.max_steps=7"])
    assert cfg.train.learning_rate == 1e-4 and cfg.lora.r == 4 and cfg.train.max_steps == 7
    assert cfg.data.system_prompt == "Be nice."
    assert cfg.method == "lora" and cfg.train.precision == "auto"


def test_every_problem_reported_at_once_with_paths():
    bad = {"recipe": "sft", "model": {"nmae": "x"}, "data": {"train": "t.jsonl", "max_lenght": 3},
           "train": {"learning_rate": 0, "scheduler": "wavy"}, "lorra": {}}
    with pytest.raises(ConfigError) as e:
        cfglib.load(SFTConfig, data=bad)
    msg = str(e.value)
    assert len(e.value.problems) >= 6
    assert "model.name: required" in msg
    assert "model.nmae: unknown key; did you mean 'name'?" in msg
    assert "data.max_lenght: unknown key; did you mean 'max_length'?" in msg
    assert "train.learning_rate" in msg and "greater than 0" in msg
    assert "train.scheduler" in msg and "cosine" in msg
    assert "lorra: unknown key; did you mean 'lora'?" in msg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        cfglib.apply_overrides({}, ["train.learning_rate"])
    with pytest.raises(ConfigError, match="unknown key"):
        cfglib.load(SFTConfig, data=GOOD, overrides=["train.lr=1"])


def test_unknown_recipe_and_missing_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**GOOD, "recipe": "magic"}))
    with pytest.raises(ConfigError, match="unknown recipe 'magic'"):
        load_recipe(p)
    p.write_text(yaml.safe_dump({k: v for k, v in GOOD.items() if k != "recipe"}))
    with pytest.raises(ConfigError, match="recipe: missing"):
        load_recipe(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(p)
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(p)


def shipped_yamls() -> list[Path]:
    # not recipes: examples/lm_eval_tasks/ holds task files in lm-eval-harness's format (read by suites),
    # examples/distributed/ accelerate launcher configs (tests/recipes/test_distributed_cli.py)
    found = sorted((ROOT / "examples").rglob("*.yaml")) + sorted((ROOT / "tunelab").rglob("*.yaml"))
    return [p for p in found if not {"lm_eval_tasks", "distributed"} & set(p.relative_to(ROOT).parts)]


def test_project_ships_yaml_recipes():
    assert len(shipped_yamls()) >= 2


@pytest.mark.parametrize("path", shipped_yamls(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_validates(path):
    cfg, run = load_recipe(path)
    assert callable(run)
    # dumping and loading back gives the same config (what a run stores in config.yaml)
    again = cfglib.validate(type(cfg), yaml.safe_load(cfglib.dump(cfg)))
    assert again == cfg
