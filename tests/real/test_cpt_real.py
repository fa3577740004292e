"""Continued pre-training of a real model (stories260K, trained on children's stories) on real contracts
(CUAD) with wikitext replay: legal-text perplexity must fall. Skips when ../shared is absent."""

from __future__ import annotations

import pytest


def test_cpt_stories260k_on_contracts_lowers_domain_perplexity(tmp_path, shared):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunelab import config as cfglib
    from tunelab.train.cpt import CPTConfig, run
    from tunelab.workspace import Workspace

    model = shared / "models" / "stories260K"
    contracts = shared / "data" / "cuad-contracts" / "full_contract_txt"
    wiki = shared / "data" / "wikitext2-tokenized" / "valid.txt"
    if not (model.is_dir() and contracts.is_dir() and wiki.is_file()):
        pytest.skip("stories260K, cuad-contracts or wikitext2 missing from ../shared")
    cfg = cfglib.validate(CPTConfig, {
        "recipe": "cpt", "name": "stories-cuad", "model": {"name": str(model)},
        "data": {"files": [str(contracts)], "text_unit": "paragraph", "limit": 250, "block_size": 128,
                 "max_eval_blocks": 16},
        "replay": {"files": [str(wiki)], "text_unit": "paragraph", "limit": 120, "ratio": 0.2},
        "method": "full",
        "train": {"learning_rate": 2e-3, "max_steps": 12, "batch_size": 8, "eval_every": 6, "seed": 1},
    })
    s = run(cfg, Workspace.resolve(tmp_path / "ws"))

    # the base model has never seen legal text: domain perplexity is high, and falls within a dozen steps
    assert s["domain_perplexity_before"] > 50
    assert s["domain_perplexity_after"] < 0.6 * s["domain_perplexity_before"]
    assert s["general_perplexity_before"] > 0 and s["general_perplexity_after"] > 0
    assert s["replay"]["blocks"] > 0 and abs(s["replay"]["actual_share"] - 0.2) < 0.01
    # the saved model reloads with plain transformers and reproduces the trained model's logits
    out = AutoModelForCausalLM.from_pretrained(s["output"]).eval()
    probe = load_file(str(tmp_path / "ws" / "runs" / s["run_id"] / "probe.safetensors"))
    with torch.no_grad():
        logits = out(input_ids=probe["input_ids"][None]).logits[0, -4:]
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)
