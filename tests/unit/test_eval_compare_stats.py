"""tunelab compare: Holm–Bonferroni over all differences, and a peak-memory figure per model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunelab.scoring import stats as ST
from tunelab.eval import suites as S


def test_holm_adjusted_p_values_are_statsmodels_and_holms():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    raw = [0.01, 0.04, 0.03, None, 0.005]
    adj = ST.holm(raw)
    # by hand (Holm 1979): sorted 0.005·4, 0.01·3, 0.03·2, 0.04·1 → 0.02, 0.03, 0.06, max(0.06, 0.04)
    assert adj == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    _, ref, _, _ = multitest.multipletests([0.01, 0.04, 0.03, 0.005], method="holm")
    assert [a for a in adj if a is not None] == pytest.approx(list(ref), abs=1e-15)
    assert ST.holm([None]) == [None] and ST.holm([0.9]) == [0.9]


def test_compare_marks_significance_on_adjusted_p_values():
    from tunelab.scoring import metrics as M
    from tunelab.eval.compare import assemble

    cfg = S.SuiteConfig(name="x", tasks=[S.TaskSpec(name=f"t{i}", type="multiple_choice", data="d.jsonl")
                                         for i in range(4)],
                        forgetting={"enabled": False}, bootstrap={"n_resamples": 999, "seed": 0})
    n = 40
    base = [1] * 20 + [0] * 20
    # one large effect and three small ones: raw p of the small ones is near 0.05, Holm's is not
    variants = {"t0": [1] * 38 + [0] * 2, "t1": [1] * 24 + [0] * 16, "t2": [1] * 25 + [0] * 15,
                "t3": [1] * 24 + [0] * 16}
    tasks = [S.Task(t.name, "multiple_choice", ["accuracy"], [{}] * n, t, "d.jsonl") for t in cfg.tasks]

    def scored(vals):
        return M.Scored(values={"accuracy": {"value": sum(vals) / n, "ci_low": None, "ci_high": None, "n": n}},
                        stats={"accuracy": ST.mean_statistic(vals)})

    sc = {"base": {t.name: scored(base) for t in tasks}, "tuned": {t.name: scored(variants[t.name]) for t in tasks}}
    res = assemble(cfg, tasks, [{"name": "base", "ref": "a"}, {"name": "tuned", "ref": "b"}], sc,
                   {"base": {}, "tuned": {}})
    d = [res["differences"]["tuned"][t.name]["accuracy"] for t in tasks]
    assert res["multiple_comparisons"]["tests"] == 4 and res["multiple_comparisons"]["method"] == "holm"
    assert [x["p_value_adjusted"] for x in d] == pytest.approx(ST.holm([x["p_value"] for x in d]))
    for x in d:
        assert x["p_value_adjusted"] >= x["p_value"]
        assert x["significant"] == (x["p_value_adjusted"] < 0.05)
        assert x["significant_unadjusted"] == (x["p_value"] < 0.05)
    assert d[0]["significant"]
    # a difference that is significant alone but not once four were tested
    assert any(x["significant_unadjusted"] and not x["significant"] for x in d)
    json.dumps(S.json_safe(res))


def test_each_models_peak_memory_is_its_own(tiny_model, tmp_path):
    """Two models in one process: the small one measured after a large one must not report the
    large one's peak (one process peak RSS would: it only grows)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("resetting the peak RSS needs Linux /proc/self/clear_refs")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.eval.compare import run_compare
    from tunelab.workspace import Workspace

    torch.set_num_threads(2)
    big = tmp_path / "big"
    shutil.copytree(tiny_model, big)
    cfg = LlamaConfig.from_pretrained(big)
    cfg.vocab_size = 300_000  # a 77 MB embedding (the extra rows are never produced by the tokenizer)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(big)
    del cfg
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"q": f"The {a} is", "c": ["red", "blue"], "a": i % 2})
                                               + "\n" for i, a in enumerate(["cat", "dog", "bird", "fish"])))
    (tmp_path / "s.yaml").write_text(
        "name: mem\nforgetting: {enabled: false}\nbootstrap: {n_resamples: 20}\n"
        "business: {latency_requests: 2, max_new_tokens: 2}\n"
        "tasks:\n  - {name: mc, type: multiple_choice, data: mc.jsonl, prompt: '{{ q }}', choices: '{{ c }}',"
        " target: '{{ a }}'}\n")
    res = run_compare(tmp_path / "s.yaml", Workspace.resolve(tmp_path / "ws"),
                      models=[f"big={big}", f"small={tiny_model}"], out=tmp_path / "out")
    mb, ms = (res["models"][m]["business"]["memory"] for m in ("big", "small"))
    assert mb["reset"] and ms["reset"] and "since this model was loaded" in ms["what"]
    assert ms["peak_bytes"] < mb["peak_bytes"], (ms, mb)
    # and the difference is of the order of the large model's weights (77 MB), not noise
    assert mb["peak_bytes"] - ms["peak_bytes"] > 40 * 2**20
