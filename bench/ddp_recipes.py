"""`tunelab train --nproc 2` against one process for the recipes the test suite does not run under DDP
(pretrain, reward, dpo): the same tiny models, data and 4-step settings as
tests/recipes/test_distributed_recipes_cli.py, the per-step losses of both printed and compared.

    python bench/ddp_recipes.py [pretrain reward dpo]

Uses the test helpers (tests/conftest.py builds the tiny Llama; nothing is downloaded). About 15 s per
recipe on 2 cores, most of it the start-up of the two processes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def configs(d: Path, tiny: Path) -> dict:
    from tests.recipes.test_distributed_recipes_cli import TRAIN
    from tests.recipes.test_preference_cli import write_pairs
    from tests.recipes.test_pretrain_cpt_cli import write_stories

    corpus = write_stories(d / "corpus.txt", 200, seed=0)
    train, test = write_pairs(d / "pairs.jsonl", 48, 1), write_pairs(d / "pairs_test.jsonl", 6, 2)
    pref = lambda kind: {"recipe": kind, "name": "ddp", "model": {"name": str(tiny)},  # noqa: E731
                         "data": {"train": str(train), "test": str(test), "validation_split": 0.0, "max_length": 48},
                         "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": TRAIN}
    return {
        "pretrain": {"recipe": "pretrain", "name": "ddp",
                     "model": {"hidden_size": 32, "layers": 2, "heads": 2, "kv_heads": 1, "context_length": 32},
                     "tokenizer": {"vocab_size": 320},
                     "data": {"files": [str(corpus)], "text_unit": "paragraph", "heldout_share": 0.1},
                     "train": {**TRAIN, "learning_rate": 3e-3}},
        "reward": pref("reward"),
        "dpo": pref("dpo"),
    }


def main(names: list[str]) -> None:
    import pytest

    from tests.conftest import make_tiny_model, write_color_data
    from tests.recipes.test_distributed_recipes_cli import _run_both

    root = Path(tempfile.mkdtemp(prefix="ddp-recipes-"))
    data = write_color_data(root / "corpus.jsonl", 200, seed=123)
    corpus = [json.loads(x)["instruction"] + " " + json.loads(x)["output"] for x in data.read_text().splitlines()]
    tiny = make_tiny_model(root / "tiny", corpus + ["### User:", "### Assistant:", "system user assistant"])
    cfgs = configs(root, tiny)
    for name in names or list(cfgs):
        d = root / name
        d.mkdir()
        run1, run2, _, _ = _run_both(d, cfgs[name])  # asserts the losses agree within relative 1e-4
        s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (run1, run2))
        if name == "pretrain":
            same_tok = (run1 / "tokenizer" / "tokenizer.json").read_text() == \
                (run2 / "tokenizer" / "tokenizer.json").read_text()
            print(f"pretrain: tokenizers identical {same_tok}; held-out perplexity "
                  f"{s1['heldout_perplexity_before']} -> {s1['heldout_perplexity_after']} (1 process), "
                  f"{s2['heldout_perplexity_before']} -> {s2['heldout_perplexity_after']} (2 processes)")
        else:
            same = s2["heldout"]["after"] == pytest.approx(s1["heldout"]["after"], rel=1e-3, abs=1e-4)
            print(f"{name}: held-out after training equal within 1e-3: {same}")
        print(f"{name}: 2 processes match 1 process (relative 1e-4)")


if __name__ == "__main__":
    main(sys.argv[1:])
