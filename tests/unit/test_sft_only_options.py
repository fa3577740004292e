"""The SFT-only train options (padding-free batches, the memory plan's micro-batch and budget) are refused by every
other training recipe when set, instead of being ignored; SFT reads them."""

from __future__ import annotations

import pytest
import yaml

from tunelab import config as cfglib
from tunelab.errors import ConfigError
from tunelab.recipes import get

BASES = {
    "cpt": {"model": {"name": "m"}, "data": {"files": ["x.txt"]}},
    "pretrain": {"data": {"files": ["x.txt"]}},
    "classify": {"model": {"name": "m"}, "data": {"train": "t.csv"}},
    "distill": {"teacher": {"name": "t"}, "student": {"name": "s"}, "data": {"train": "t.jsonl", "validation_split": 0.1}},
    "reward": {"model": {"name": "m"}, "data": {"train": "p.jsonl"}},
    "dpo": {"model": {"name": "m"}, "data": {"train": "p.jsonl"}},
    "rlhf": {"model": {"name": "m"}, "data": {"train": "p.jsonl"}, "reward_function": "tunelab.train.rewards:plain_text"},
}
SET = {"micro_batch_size": 2, "memory_budget_gb": 3.5}


@pytest.mark.parametrize("recipe", sorted(BASES))
@pytest.mark.parametrize("option", sorted(SET))
def test_other_recipes_refuse_the_memory_plan_options(recipe, option):
    cls, _ = get(recipe)
    base = BASES[recipe]
    try:
        cfg = cfglib.validate(cls, base)
    except ConfigError as e:  # the minimal recipe is not enough for this recipe: say which, rather than pass
        pytest.fail(f"the minimal {recipe} recipe does not validate: {e}")
    with pytest.raises(ConfigError, match=f"train.{option}: the {recipe} recipe does not read this option"):
        cfglib.validate(cls, {**base, "train": {option: SET[option]}})
    # a stored config.yaml (every field at its value, defaults included) still validates for --resume
    assert cfglib.validate(cls, yaml.safe_load(cfglib.dump(cfg))) == cfg


def test_sft_reads_them():
    cls, _ = get("sft")
    cfg = cfglib.validate(cls, {"model": {"name": "m"}, "data": {"train": "t.jsonl"}, "train": SET})
    assert cfg.train.micro_batch_size == 2 and cfg.train.memory_budget_gb == 3.5
