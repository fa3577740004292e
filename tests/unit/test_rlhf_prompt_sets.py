"""RL prompts are split as reward/DPO pairs are: data.limit applies after data.test_split."""

import json
from types import SimpleNamespace

from tunelab.sections import PreferenceDataSection
from tunelab.train import preference as P


def test_limit_applies_after_the_held_out_split(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"tell me about the color number {i}"}) + "\n" for i in range(80)))
    chat = P.ChatChoice(False, "raw text")

    def sets(limit):
        cfg = SimpleNamespace(data=PreferenceDataSection(train=str(f), validation_split=0.0, test_split=0.3,
                                                         limit=limit), train=SimpleNamespace(seed=0))
        return P.prompt_sets(cfg, tok, [], chat)

    train_all, _, held_all, name = sets(None)
    train_10, _, held_10, _ = sets(10)
    assert name == "test_split" and held_all
    assert held_10 == held_all  # the held-out prompts do not depend on data.limit
    assert len(train_10) == 10 and train_10 == train_all[:10]
    assert not set(train_10) & set(held_10)
