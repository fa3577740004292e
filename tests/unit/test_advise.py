"""The decision advisor on a table of scenarios, and its CLI (YAML answers and interactive prompts)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_cli
from tunelab.advise.advisor import RULES, Answers, advise

# (scenario, answers, recommendations that must appear, recommendations that must not)
SCENARIOS = [
    ("news assistant, facts change daily", dict(knowledge_changes=True),
     {"rag", "prompt_engineering"}, {"fine_tuning", "continued_pretraining"}),
    ("answers must cite the policy documents", dict(needs_citations=True, labeled_examples=20),
     {"rag"}, {"fine_tuning"}),
    ("support replies in the house style, 2k examples", dict(labeled_examples=2000, behaviour_change="style"),
     {"fine_tuning"}, {"rag", "prompt_engineering", "continued_pretraining"}),
    ("JSON output format from 500 examples", dict(labeled_examples=500, behaviour_change="format"),
     {"fine_tuning"}, {"rag"}),
    ("50M tokens of contracts, far from web text", dict(unlabeled_domain_tokens=5e7, domain_shift="high"),
     {"continued_pretraining"}, {"fine_tuning", "rlhf_dpo"}),
    ("unlabeled text close to web text", dict(unlabeled_domain_tokens=5e7, domain_shift="low"),
     set(), {"continued_pretraining"}),
    ("runs offline on a phone", dict(labeled_examples=3000, behaviour_change="task", deploy="edge"),
     {"distillation", "fine_tuning"}, {"rag"}),
    ("50 ms latency budget", dict(latency_ms=50), {"distillation"}, {"rlhf_dpo"}),
    ("10k preference comparisons", dict(preference_pairs=10000), {"rlhf_dpo"}, {"prompt_engineering"}),
    ("8B model on one 24 GB GPU", dict(labeled_examples=2000, behaviour_change="task", model="llama-3.1-8b",
                                       gpu_memory_gb=24), {"fine_tuning", "peft_qlora"}, {"full_fine_tuning"}),
    ("7B model on an 80 GB GPU", dict(labeled_examples=2000, behaviour_change="task", model="llama-2-7b",
                                      gpu_memory_gb=80), {"peft_lora"}, {"full_fine_tuning", "peft_qlora"}),
    ("135M model on a 24 GB GPU", dict(labeled_examples=2000, behaviour_change="task", model="smollm2-135m",
                                       gpu_memory_gb=24), {"full_fine_tuning"}, {"peft_lora", "peft_qlora"}),
    ("nothing but an idea", dict(), {"prompt_engineering"},
     {"rag", "fine_tuning", "continued_pretraining", "distillation", "rlhf_dpo"}),
]


@pytest.mark.parametrize("name,answers,must,must_not", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenarios(name, answers, must, must_not):
    res = advise(Answers(**answers))
    got = {r["recommendation"] for r in res["recommendations"]}
    assert must <= got, (name, got)
    assert not (must_not & got), (name, got)
    for r in res["recommendations"]:
        assert r["reason"] and r["tradeoff"] and r["rule"]
    trains = got & {"fine_tuning", "continued_pretraining", "distillation", "rlhf_dpo"}
    # a training recommendation comes with the estimate of that training
    assert bool(trains) == ("estimate_command" in res)
    if "estimate" in res:
        assert res["estimate"]["memory"]["total"] > 0
        assert f"--method {res['estimate_method']}" in res["estimate_command"]


def test_rules_have_words():
    assert len({r.name for r in RULES}) == len(RULES) == 6
    assert all(r.reason and r.tradeoff and r.condition for r in RULES)


def test_cli_yaml_and_prompts(tmp_path):
    f = tmp_path / "answers.yaml"
    f.write_text(yaml.safe_dump({"labeled_examples": 2000, "behaviour_change": "style", "knowledge_changes": True}))
    r = run_cli("advise", str(f), "--json")
    assert r.returncode == 0, r.stderr
    got = [x["recommendation"] for x in json.loads(r.stdout)["recommendations"]]
    assert "rag" in got and "fine_tuning" in got
    r = run_cli("advise", str(f))
    assert "why:" in r.stdout and "trade-off:" in r.stdout and "tunelab estimate --model" in r.stdout
    # interactive: answers typed on stdin, empty lines keep the defaults
    import subprocess
    import sys

    lines = ["reply like our agents", "n", "n", "3000", "style", "0", "low", "0", "cloud", "", "", "smollm2-135m"]
    p = subprocess.run([sys.executable, "-m", "tunelab", "advise", "--json"], input="\n".join(lines) + "\n",
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout[p.stdout.index("{"):])
    assert out["answers"]["labeled_examples"] == 3000
    assert {x["recommendation"] for x in out["recommendations"]} >= {"fine_tuning"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("labeled_exampels: 5\n")
    r = run_cli("advise", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "labeled_exampels" in r.stderr
