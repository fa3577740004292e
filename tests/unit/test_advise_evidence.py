"""The rule-table advisor cites measured ladder reports (the contract in docs/advise.md) and recommends only
models `tunelab models pull` can get or the user named."""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tunelab.advise.advisor import DEFAULT_MODEL, RULES, Answers, advise, format_advice
from tunelab.advise.estimate import PRESETS
from tunelab.advise.evidence import read_ladder_reports
from tunelab.models.resolve import PACKAGED


def ladder_report(task="support", created="2026-12-06T11:00:00+00:00", verdict="rag", met=True) -> dict:
    """A report in the shape docs/advise.md ("Ladder reports") fixes for `tunelab advise --measure`."""
    return {
        "kind": "ladder",
        "task": {"name": task, "file": "task.yaml"},
        "created_at": created,
        "target": {"metric": "rougeL", "op": ">=", "value": 0.4},
        "rungs": [
            {"name": "zero_shot", "metric": "rougeL", "value": 0.21, "interval": [0.18, 0.24], "meets_target": False},
            {"name": "few_shot", "metric": "rougeL", "value": 0.29, "interval": [0.26, 0.33], "meets_target": False},
            {"name": "rag", "metric": "rougeL", "value": 0.43, "interval": [0.41, 0.46], "meets_target": True},
            {"name": "lora_pilot", "metric": "rougeL", "value": 0.38, "interval": [0.35, 0.41], "meets_target": False},
        ],
        "verdict": {"rung": verdict, "meets_target": met, "shortfall": None},
    }


def write_report(ws: Path, d: dict, run_id: str = "ladder-support-20261206-110000-ab12") -> Path:
    p = ws / "runs" / run_id / "report.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(d))
    return p


def by_name(res: dict) -> dict:
    return {r["recommendation"]: r for r in res["recommendations"]}


ASKS = dict(knowledge_changes=True, labeled_examples=2000, behaviour_change="style", unlabeled_domain_tokens=5e7,
            domain_shift="high")


def test_measured_rungs_are_cited_next_their_rules(tmp_path):
    write_report(tmp_path, ladder_report())
    recs = by_name(advise(Answers(task="support", **ASKS), tmp_path))
    rag = recs["rag"]["evidence"]
    assert rag["kind"] == "measured"
    assert rag["text"] == ("measured on support 2026-12-06, target rougeL >= 0.4: rag 0.43 [0.41, 0.46] met the target; "
                           "verdict: rag")
    ft = recs["fine_tuning"]["evidence"]
    assert ft["kind"] == "measured" and "lora_pilot 0.38 [0.35, 0.41] missed it" in ft["text"]
    # a rule no rung measures says so, and still points at the verdict
    cpt = recs["continued_pretraining"]["evidence"]
    assert cpt["kind"] == "rule_of_thumb" and "has no rung for this" in cpt["text"] and "verdict: rag" in cpt["text"]
    # the printed advice carries the same lines
    text = format_advice(advise(Answers(task="support", **ASKS), tmp_path))
    assert "evidence: measured on support 2026-12-06, target rougeL >= 0.4: rag 0.43" in text


def test_prompting_cites_zero_and_few_shot_and_newest_report_wins(tmp_path):
    write_report(tmp_path, ladder_report(created="2026-11-01T09:00:00+00:00", verdict="few_shot"), "ladder-support-a")
    write_report(tmp_path, ladder_report(created="2026-12-06T11:00:00+00:00", verdict="rag"), "ladder-support-b")
    ev = by_name(advise(Answers(task="support"), tmp_path))["prompt_engineering"]["evidence"]
    assert "zero_shot 0.21" in ev["text"] and "few_shot 0.29" in ev["text"]
    assert "2026-12-06" in ev["text"] and ev["report"].endswith("ladder-support-b/report.json")


def test_without_a_comparable_report_each_rule_is_a_rule_of_thumb(tmp_path):
    # nothing measured at all
    for r in advise(Answers(**ASKS), tmp_path)["recommendations"]:
        assert r["evidence"]["kind"] == "rule_of_thumb" and "tunelab advise --measure" in r["evidence"]["text"]
    write_report(tmp_path, ladder_report(task="support"))
    # a report of another task is not cited; the advice names what was measured
    for r in advise(Answers(task="contracts", **ASKS), tmp_path)["recommendations"]:
        assert r["evidence"]["kind"] == "rule_of_thumb"
        assert "no measured ladder for task 'contracts'" in r["evidence"]["text"] and "support" in r["evidence"]["text"]
    # no task named: not cited, but the user learns how to cite it
    for r in advise(Answers(**ASKS), tmp_path)["recommendations"]:
        assert r["evidence"]["kind"] == "rule_of_thumb" and "--set task=NAME (support)" in r["evidence"]["text"]


def test_catalog_rows_of_kind_ladder_are_read(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.json").write_text(json.dumps(ladder_report(task="kb")))
    con = sqlite3.connect(tmp_path / "tunelab.db")
    con.execute("CREATE TABLE runs (id TEXT, kind TEXT, dir TEXT)")
    con.execute("INSERT INTO runs VALUES ('x', 'ladder', ?), ('y', 'sft', ?)", (str(elsewhere), str(tmp_path)))
    con.commit()
    con.close()
    reports, skipped = read_ladder_reports(tmp_path)
    assert [d["task"]["name"] for d in reports] == ["kb"] and not skipped
    assert by_name(advise(Answers(task="kb", knowledge_changes=True), tmp_path))["rag"]["evidence"]["kind"] == "measured"


@pytest.mark.parametrize("content,reason", [
    ("{not json", "unreadable"),
    (json.dumps({"kind": "ladder"}), "task.name missing"),
    (json.dumps({**ladder_report(), "rungs": [{"name": "rag", "metric": "rougeL", "value": "high"}]}),
     "rungs[0].value is not a number"),
    (json.dumps({**ladder_report(), "verdict": {"rung": "rag"}}), "verdict.rung or verdict.meets_target missing"),
])
def test_a_broken_report_is_skipped_with_its_reason(tmp_path, content, reason):
    p = tmp_path / "runs" / "ladder-x" / "report.json"
    p.parent.mkdir(parents=True)
    p.write_text(content)
    res = advise(Answers(task="support", knowledge_changes=True), tmp_path)
    assert res["skipped_reports"] == [{"path": str(p.resolve()), "reason": res["skipped_reports"][0]["reason"]}]
    assert reason in res["skipped_reports"][0]["reason"]
    assert by_name(res)["rag"]["evidence"]["kind"] == "rule_of_thumb"
    assert f"skipped ladder report {p.resolve()}" in format_advice(res)


def test_cli_cites_and_creates_no_workspace(tmp_path):
    ws = tmp_path / "ws"
    write_report(ws, ladder_report())
    r = run_cli("advise", "--set", "task=support", "--set", "knowledge_changes=true", "--workspace", str(ws))
    assert r.returncode == 0, r.stderr
    assert "evidence: measured on support 2026-12-06, target rougeL >= 0.4: rag 0.43" in r.stdout
    r = run_cli("advise", "--set", "knowledge_changes=true", "--json", cwd=tmp_path, env={"TUNELAB_WORKSPACE": ""})
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "tunelab-workspace").exists()


# ----------------------------------------------------------------------------- models

USER_MODELS = ["", "smollm2-360m", "llama-3.1-8b", "org/some-model", "SmolLM2-135M-Instruct"]
# each answer on both sides of its rule's threshold (960 combinations, a few seconds)
GRID = dict(
    knowledge_changes=[False, True], labeled_examples=[0, 5000], behaviour_change=["none", "task"],
    domain=[dict(unlabeled_domain_tokens=0), dict(unlabeled_domain_tokens=5e7, domain_shift="high")],
    preference_pairs=[0, 1000], deploy=["cloud", "edge"], gpu_memory_gb=[None, 24, 80], model=USER_MODELS,
)
NOT_PULLABLE = sorted(set(PRESETS) - set(PACKAGED))


def _pullable_or_named(name: str, named: str) -> bool:
    return name.lower() in PACKAGED or (named and name == named)


def test_every_recommended_model_is_pullable_or_named():
    keys = list(GRID)
    fired = set()
    combos = list(itertools.product(*GRID.values()))
    assert len(combos) > 900
    for values in combos:
        answers = dict(zip(keys, values))
        answers.update(answers.pop("domain"))
        a = Answers(**answers)
        res = advise(a)
        named = a.model
        names = [res["model"]["name"]] + [m["name"] for r in res["recommendations"] for m in r["models"]]
        m = re.search(r"--model (\S+)", res.get("estimate_command", ""))
        names += [m.group(1)] if m else []
        bad = [n for n in names if not _pullable_or_named(n, named)]
        assert not bad, (answers, bad)
        # the text names no model that is neither pull-able nor the user's
        text = format_advice(res)
        stray = [p for p in NOT_PULLABLE if p != named.lower() and re.search(rf"(?<![\w.-]){re.escape(p)}(?![\w.-])", text)]
        assert not stray, (answers, stray)
        if not named:
            assert res["model"] == {**res["model"], "name": DEFAULT_MODEL, "source": "packaged"}
        fired |= {r["recommendation"] for r in res["recommendations"]}
    # the grid reaches every rule and the derived PEFT/full recommendations
    assert {r.name for r in RULES} | {"peft_lora", "peft_qlora", "full_fine_tuning"} <= fired


def test_a_named_model_pull_cannot_get_is_said():
    res = advise(Answers(model="smollm2-360m", labeled_examples=500, behaviour_change="style"))
    assert res["model"]["source"] == "named" and res["model"]["get"] is None
    assert "tunelab models pull cannot get it" in res["model"]["note"] and DEFAULT_MODEL in res["model"]["note"]
    res = advise(Answers(labeled_examples=500, behaviour_change="style"))
    assert res["model"]["get"] == f"tunelab models pull {DEFAULT_MODEL}"
    assert f"--model {DEFAULT_MODEL}" in res["estimate_command"]


def test_the_example_answers_name_a_pullable_model():
    import yaml

    ex = Path(__file__).resolve().parents[2] / "examples" / "advise_support_bot.yaml"
    assert yaml.safe_load(ex.read_text())["model"].lower() in PACKAGED


def test_interactive_answers_are_checked_as_typed():
    from tunelab.advise.advisor import QUESTIONS, ask

    typed = {"knowledge_changes": ["maybe", "yes"], "labeled_examples": ["lots", "3000"], "deploy": ["laptop", "edge"],
             "unlabeled_domain_tokens": ["5e7"], "behaviour_change": ["style"], "task": ["support"]}
    said, asked = [], []
    by_text = {Answers.model_fields[n].description: n for n in [*QUESTIONS, "task"]}

    def prompt(text, default):
        name = next(n for d, n in by_text.items() if text.startswith(d))
        asked.append(name)
        return typed[name].pop(0) if typed.get(name) else ""

    a = ask(prompt, ["support"], say=said.append)
    assert (a.knowledge_changes, a.labeled_examples, a.deploy, a.unlabeled_domain_tokens, a.task) == (
        True, 3000, "edge", 5e7, "support")
    assert len(said) == 3 and "knowledge_changes" in said[0] and "'laptop'" in said[2]
    # without measured tasks, the task is not asked
    asked.clear()
    ask(prompt, [], say=said.append)
    assert "task" not in asked and set(asked) == set(QUESTIONS)


def test_advise_help_lists_every_answer():
    from typer.testing import CliRunner

    from tunelab.cli import app

    r = CliRunner().invoke(app, ["advise", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0
    missing = [f for f in Answers.model_fields if f != "recipe" and f not in r.output]
    assert not missing, missing


def test_new_user_mistakes_get_one_line_each(tmp_path):
    import subprocess
    import sys

    # a training recipe handed to the advisor: one problem that says what to do, not one per section
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("recipe: sft\nmodel: {name: x}\ndata: {train: t.jsonl}\ntrain: {max_steps: 1}\n")
    r = run_cli("advise", str(recipe))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "1 problem(s)" in r.stderr and "tunelab train FILE" in r.stderr
    # interactive with --json: the questions go to stderr, stdout is the JSON alone
    p = subprocess.run([sys.executable, "-m", "tunelab", "advise", "--json", "-w", str(tmp_path / "ws")],
                       input="\n" * 20, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["model"]["name"] == DEFAULT_MODEL and "base model you mean to use" in p.stderr
    # no GPU named: the advice says which device its estimate assumed
    res = advise(Answers(labeled_examples=500, behaviour_change="style"))
    assert "no gpu_memory_gb given" in res["estimate_note"] and "no gpu_memory_gb given" in format_advice(res)


@pytest.mark.parametrize("rung,rule", [
    ({"name": "zero-shot"}, "prompt_engineering"), ({"name": "Few-shot (k=3)"}, "prompt_engineering"),
    ({"name": "RAG top-4"}, "rag"), ({"name": "pilot", "kind": "lora"}, "fine_tuning"),
    ({"name": "lora pilot"}, "fine_tuning"), ({"name": "endpoint"}, None), ({"name": "ragged"}, None),
    ({"name": "mine", "rule": "distillation"}, "distillation"),
])
def test_rung_names_map_to_rules(rung, rule):
    from tunelab.advise.evidence import rule_of

    assert rule_of(rung) == rule


def test_task_may_be_a_plain_name(tmp_path):
    write_report(tmp_path, {**ladder_report(), "task": "support"})
    assert by_name(advise(Answers(task="support", knowledge_changes=True), tmp_path))["rag"]["evidence"]["kind"] == "measured"


def test_a_rung_on_another_metric_names_it_and_no_target_is_fine(tmp_path):
    d = ladder_report()
    d["rungs"][2] = {"name": "rag", "metric": "exact_match", "value": 0.5}
    del d["target"]
    write_report(tmp_path, d)
    ev = by_name(advise(Answers(task="support", knowledge_changes=True), tmp_path))["rag"]["evidence"]
    assert ev["text"] == "measured on support 2026-12-06: rag exact_match 0.5; verdict: rag"
