"""Suites (YAML, lm-eval task files), the forgetting probe, N-model comparison, business metrics, report."""

from __future__ import annotations

import json
import random
import shutil

import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("matplotlib")

from tests.conftest import ANIMAL_TOPICS, ANIMALS, COLORS, run_cli, write_topic_data  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402
from tunelab.eval import suites as S  # noqa: E402

RULE = {a: COLORS[i] for i, a in enumerate(ANIMALS)}


def _color_rows(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.choice(ANIMALS)
        out.append({"instruction": f"What color is the {a}?", "output": f"The {a} is {RULE[a]}.", "animal": a})
    return out


@pytest.fixture(scope="module")
def tuned_model(tiny_model, tmp_path_factory):
    """The tiny Llama after a few hundred causal-LM steps on color sentences: a real 'tuned' variant."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tuned") / "model"
    shutil.copytree(tiny_model, d)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    texts = [f"{r['instruction']} {r['output']}" for r in _color_rows(64, seed=5)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        batch = tok(texts[(step * 8) % 64:(step * 8) % 64 + 8], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(d)
    return d


def _suite(tmp_path, extra: str = "") -> tuple:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "colors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _color_rows(16, seed=9)))
    write_topic_data(data / "topics.jsonl", 24, seed=4, topics=ANIMAL_TOPICS)
    rng = random.Random(2)
    mc = []
    for a in ANIMALS:
        opts = rng.sample([c for c in COLORS if c != RULE[a]], 3) + [RULE[a]]
        rng.shuffle(opts)
        mc.append({"animal": a, "options": opts, "label": opts.index(RULE[a])})
    (data / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (data / "colors_task.yaml").write_text(
        "task: animal_colors\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: mc.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"What color is the {{animal}}? The {{animal}} is\"\n"
        "doc_to_choice: \"{{options}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (data / "text.txt").write_text("\n\n".join(f"{r['instruction']} {r['output']}" for r in _color_rows(10, seed=3)))
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
name: colors
bootstrap: {{n_resamples: 200}}
decoding: {{max_new_tokens: 8, batch_size: 8}}
business: {{latency_requests: 3, max_new_tokens: 4, price_per_hour: 2.0}}
tasks:
  - name: answer
    type: generation
    data: data/colors.jsonl
    prompt: "{{{{ instruction }}}}"
    target: "{{{{ output }}}}"
    category: animal
    metrics: [rougeL, bleu, exact_match]
  - name: topic
    type: classification
    data: data/topics.jsonl
    prompt: "{{{{ text }}}} Topic:"
    target: "{{{{ label }}}}"
    metrics: [accuracy, f1_macro, roc_auc]
  - name: mc
    lm_eval: data/colors_task.yaml
  - name: text
    type: perplexity
    data: data/text.txt
{extra}""")
    return suite, data


def test_lm_eval_task_file_is_read_as_lm_eval_reads_it(tmp_path):
    suite, _ = _suite(tmp_path)
    cfg, base = S.load_suite(suite)
    t = S.load_task(cfg.tasks[2], base)
    assert t.type == "multiple_choice" and len(t.items) == len(ANIMALS)
    it = t.items[0]
    assert it["prompt"] == f"What color is the {ANIMALS[0]}? The {ANIMALS[0]} is"
    assert it["target"] == RULE[ANIMALS[0]] and it["choices"][it["gold"]] == RULE[ANIMALS[0]]
    assert t.metrics == ["accuracy", "accuracy_norm"]
    c = S.load_task(cfg.tasks[1], base)
    assert c.items[0]["choices"] == sorted(ANIMAL_TOPICS)


def test_choice_loglik_equals_a_direct_forward_pass(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    (ll,) = S.choice_logliks(model, tok, ["What color is the cat? The cat is"], [["red", "blue green"]])
    ctx = tok("What color is the cat? The cat is")["input_ids"]
    for choice, got in zip(["red", "blue green"], ll):
        cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert got == pytest.approx(want, abs=1e-4)


def test_compare_two_models_end_to_end(tiny_model, tuned_model, tmp_path):
    import threading
    from http.server import HTTPServer

    from tests.unit.test_eval_metrics import _FakeJudge

    server = HTTPServer(("127.0.0.1", 0), _FakeJudge)  # an OpenAI-compatible judge: prefers answers with "good"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    suite, _ = _suite(tmp_path, extra=f"judge: {{endpoint: 'http://127.0.0.1:{server.server_port}/v1', "
                                      f"model: fake, api_key_env: null}}\n")
    ws, out = tmp_path / "ws", tmp_path / "out"
    try:
        r = run_cli("compare", str(suite), "-m", f"base={tiny_model}", "-m", f"tuned={tuned_model}", "--out",
                    str(out), "-w", str(ws), env={"OMP_NUM_THREADS": "2"})
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "paired bootstrap vs base" in r.stdout and "ROI" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == ["base", "tuned"] and res["baseline"] == "base"
    for m in ("base", "tuned"):
        for task, meta in res["tasks"].items():
            for k in meta["metrics"]:
                v = res["scores"][m][task][k]
                assert v["ci_low"] <= v["value"] <= v["ci_high"], (m, task, k)
            rows = [json.loads(l) for l in (out / m / f"{task}.jsonl").read_text().splitlines()]
            assert len(rows) == meta["n"]
    assert set(res["scores"]["tuned"]["topic"]) == {"accuracy", "f1_macro", "roc_auc"}
    # the tuned model learned the color sentences: lower perplexity, significantly, on the same blocks
    d = res["differences"]["tuned"]["text"]["perplexity"]
    assert d["difference"] < 0 and d["better"] and 0 < d["p_value"] < 0.05
    assert res["differences"]["tuned"]["mc"]["accuracy"]["difference"] > 0
    for task in res["differences"]["tuned"].values():
        for dd in task.values():
            assert dd["p_value"] is None or 0 < dd["p_value"] <= 1
    # per-category breakdown of the generation task: one row per animal, n adding up
    cats = res["categories"]["answer"]
    assert sum(c["n"] for c in cats.values()) == res["tasks"]["answer"]["n"]
    # forgetting: the probe ran on both; the verdict is recorded
    f = res["forgetting"]["tuned"]
    assert isinstance(f["flagged"], bool) and f["before"]["mc_items"] == 24
    # business figures
    b = res["models"]["tuned"]["business"]
    assert b["latency"]["first_token_s"]["p50"] <= b["latency"]["total_s"]["p50"]
    assert b["latency"]["total_s"]["p50"] <= b["latency"]["total_s"]["p95"] and b["latency"]["tokens_per_s"] > 0
    assert b["size"]["model_bytes"] == 4 * b["size"]["parameters"]
    assert b["cost"]["serving_cost_per_1k_tokens"] == pytest.approx(2.0 / 3600 / b["latency"]["tokens_per_s"] * 1000)
    # the LLM judge's win rate of tuned over base on the generation task
    w = res["win_rates"]["tuned"]["answer"]
    n = res["tasks"]["answer"]["n"]
    assert sum(w["counts"].values()) == n
    assert w["value"] == pytest.approx((w["counts"]["win"] + 0.5 * w["counts"]["tie"]) / n)
    assert "win rate of tuned over base on answer (LLM judge fake" in r.stdout
    html = (out / "report.html").read_text()
    for needle in ("Per-category breakdown", "Business metrics", "Forgetting", "Per-example outputs", "tlFilter",
                   "paired-bootstrap", "ROI", "Win rate (judge)"):
        assert needle in html
    assert html.count("data:image/png;base64,") >= 4 + 1 + 1  # 4 task panels, 1 category, 1 latency histogram
    listed = run_cli("runs", "list", "--kind", "compare", "-w", str(ws))
    assert "compare-colors-" in listed.stdout


def test_forgetting_verdict_thresholds():
    cfg = S.ForgettingSection(max_perplexity_increase=0.1, max_accuracy_drop=0.05)
    before = {"general_perplexity": 10.0, "probe_accuracy": 0.8}
    ok = S.forgetting_verdict(before, {"general_perplexity": 10.5, "probe_accuracy": 0.78}, cfg)
    assert not ok["flagged"] and ok["perplexity_change"] == pytest.approx(0.05)
    bad = S.forgetting_verdict(before, {"general_perplexity": 12.0, "probe_accuracy": 0.7}, cfg)
    assert bad["flagged"] and len(bad["reasons"]) == 2


def test_builtin_probe_runs_on_a_model(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    p = S.probe(model, tok, S.ForgettingSection())
    assert p["general_perplexity"] > 1 and 0 <= p["probe_accuracy"] <= 1 and p["mc_items"] == 24


@pytest.mark.parametrize("body, message", [
    ("name: x\ntasks:\n  - name: a\n    data: d.jsonl\n", "needs a type"),
    ("name: x\ntasks:\n  - name: a\n    type: generation\n", "needs data: FILE or lm_eval"),
    ("name: x\ntasks:\n  - name: a\n    type: generation\n    data: d.jsonl\n    metrics: [rogue]\n",
     "unknown metric 'rogue'"),
    ("name: x\ntasks:\n  - name: a\n    type: translation\n    data: d.jsonl\n", "tasks.0.type"),
    ("name: x\ntasks:\n  - {name: a, type: generation, data: d.jsonl}\n  - {name: a, type: perplexity, data: d.txt}\n",
     "task names must be unique"),
    ("name: x\njudge: {endpoint: 'http://h/v1'}\ntasks:\n  - {name: a, type: generation, data: d.jsonl}\n",
     "an endpoint needs model"),
    ("name: x\nbusiness: {price_per_hr: 3}\ntasks:\n  - {name: a, type: generation, data: d.jsonl}\n", "price_per_hour"),
])
def test_bad_suites_are_clear_errors(tmp_path, body, message):
    p = tmp_path / "s.yaml"
    p.write_text(body)
    with pytest.raises(TunelabError) as e:
        S.load_suite(p)
    assert message in str(e.value)


def test_bad_task_data_is_a_clear_error(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"q": "a", "choices": "not a list", "a": 0}\n{"q": "b", "choices": ["x"], "a": 5}\n')
    spec = S.TaskSpec(name="m", type="multiple_choice", data="d.jsonl", prompt="{{ q }}", choices="{{ choices }}",
                      target="{{ a }}")
    with pytest.raises(TunelabError, match=r"no usable records .*\(2 rejected; first: choices must render to a list"):
        S.load_task(spec, tmp_path)
    with pytest.raises(TunelabError, match="data not found"):
        S.load_task(spec.model_copy(update={"data": "missing.jsonl"}), tmp_path)
    (tmp_path / "one.jsonl").write_text('{"t": "x", "l": "a"}\n{"t": "y", "l": "a"}\n')
    with pytest.raises(TunelabError, match="at least two labels"):
        S.load_task(S.TaskSpec(name="c", type="classification", data="one.jsonl", prompt="{{ t }}",
                               target="{{ l }}"), tmp_path)
    with pytest.raises(TunelabError, match="no models to compare"):
        from tunelab.eval.compare import run_compare
        from tunelab.workspace import Workspace

        (tmp_path / "s.yaml").write_text("name: x\ntasks:\n  - {name: a, type: perplexity, data: one.jsonl}\n")
        run_compare(tmp_path / "s.yaml", Workspace.resolve(tmp_path / "ws"))


def test_shipped_lm_eval_task_file_loads():
    from tests.conftest import ROOT

    spec = S.TaskSpec(name="general_mc", lm_eval="examples/lm_eval_tasks/general_mc_task.yaml")
    t = S.load_task(spec, ROOT)
    assert t.type == "multiple_choice" and len(t.items) == 16 and not t.rejected
    assert t.items[0]["prompt"].startswith("Question: ") and t.items[0]["prompt"].endswith("\nAnswer:")
