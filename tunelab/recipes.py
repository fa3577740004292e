"""Named recipes: ``recipe:`` in a YAML file → (config class, run function), imported lazily."""

from __future__ import annotations

import importlib
from pathlib import Path

from tunelab import config as cfglib
from tunelab.errors import ConfigError

RECIPES: dict[str, str] = {
    "sft": "tunelab.train.sft:SFTConfig:run",
    "data": "tunelab.data.prepare:PrepareConfig:run",
    "distill": "tunelab.train.distill:DistillConfig:run",
    "classify": "tunelab.train.classify:ClassifyConfig:run",
    "pretrain": "tunelab.train.pretrain:PretrainConfig:run",
    "cpt": "tunelab.train.cpt:CPTConfig:run",
    "reward": "tunelab.train.reward:RewardConfig:run",
    "dpo": "tunelab.train.dpo:DPOConfig:run",
    "rlhf": "tunelab.train.rlhf:RLHFConfig:run",
    "pipeline": "tunelab.train.pipeline:PipelineConfig:run",
    "suite": "tunelab.eval.compare:SuiteConfig:run",
    "tune": "tunelab.train.tune:TuneConfig:run",
    "advise": "tunelab.advise.advisor:Answers:advise",
    "ladder": "tunelab.advise.ladder:LadderConfig:run",
}


def get(name: str):
    if name not in RECIPES:
        raise ConfigError([f"recipe: unknown recipe '{name}'; known: {', '.join(sorted(RECIPES))}"])
    mod, cls, fn = RECIPES[name].split(":")
    m = importlib.import_module(mod)
    return getattr(m, cls), getattr(m, fn)


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_files: bool = False):
    """Read a recipe file; return (config, run function). ``check_files``: also report named files
    that do not exist (for recipes that check them)."""
    raw = cfglib.apply_overrides(cfglib.load_yaml(path), overrides or [])
    name = raw.get("recipe")
    if not name:
        raise ConfigError([f"recipe: missing; say which recipe this is ({', '.join(sorted(RECIPES))})"], str(path))
    cls, fn = get(str(name))
    if name in ("pipeline", "tune") and "base_dir" not in raw:  # files named relative to this file
        raw["base_dir"] = str(Path(path).resolve().parent)
    return cfglib.validate(cls, raw, str(path), check_files=check_files), fn
