"""tunelab reads an lm-eval-harness task folder as lm-eval 0.4.x does: same contexts (few-shot
sampling, process_docs, !function, include), same log-likelihoods, same acc and acc_norm.

Runs lm-eval itself (``lm_eval.simple_evaluate`` with its HFLM) on the tiny Llama, offline, on a
task folder written here; skipped when lm-eval is not installed (``pip install -e .[dev]`` installs it).
"""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import ANIMALS, COLORS
from tunelab.eval import suites as S

# non-ASCII choices: lm-eval's acc_norm divides by characters, not bytes
CHOICES = COLORS + ["grün", "café au lait", "rosé"]

UTILS = '''
def process_docs(dataset):
    def fix(doc):
        return {"question": doc["q"].strip().rstrip("?") + "?", "options": [o.strip() for o in doc["opts"]]}
    return dataset.map(fix)


def doc_to_text(doc):
    return "Which colour is " + doc["question"][len("What color is "):] + "\\nAnswer"
'''

BASE = """task: colors_random
dataset_path: json
dataset_kwargs:
  data_files:
    train: train.jsonl
    test: test.jsonl
training_split: train
test_split: test
process_docs: !function utils.process_docs
output_type: multiple_choice
num_fewshot: 2
description: "Pick the colour.\\n\\n"
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: options
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

# few-shot docs from the test split itself (the doc is left out of its own shots), first_n, other delimiters
FIRST_N = """include: colors_random.yaml
task: colors_first_n
fewshot_split: test
fewshot_config: {sampler: first_n}
doc_to_text: !function utils.doc_to_text
target_delimiter: ": "
fewshot_delimiter: "\\n---\\n"
"""

# the random sampler with the doc left out (draws n + 1), the gold as a string, a context ending in a
# space (lm-eval moves it into the continuation before tokenizing)
SAME_SPLIT = """include: colors_random.yaml
task: colors_same_split
fewshot_split: test
num_fewshot: 3
doc_to_text: "Q: {{question}}\\nA: "
target_delimiter: ""
doc_to_target: "{{options[label]}}"
"""


def _records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        opts = rng.sample(CHOICES, 4)
        out.append({"q": f" What color is the {rng.choice(ANIMALS)} number {i} ", "opts": [f" {o}" for o in opts],
                    "label": rng.randrange(4)})
    return out


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_task")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(8, 1)))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(16, 2)))
    (d / "utils.py").write_text(UTILS)
    (d / "colors_random.yaml").write_text(BASE)
    (d / "colors_first_n.yaml").write_text(FIRST_N)
    (d / "colors_same_split.yaml").write_text(SAME_SPLIT)
    return d


@pytest.mark.slow  # ~18 s: lm-eval's harness on the same tasks; make test-slow (CI runs it)
def test_contexts_logliks_and_accuracies_equal_lm_evals(task_folder, tiny_model, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(task_folder)  # lm-eval resolves data_files from the current folder; tunelab from the task's
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    names = ["colors_random", "colors_first_n", "colors_same_split"]
    lm = HFLM(pretrained=str(tiny_model), device="cpu", batch_size=8)
    ref = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(task_folder)),
                                  log_samples=True, bootstrap_iters=0)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for name in names:
        task = S.load_task(S.TaskSpec(name=name, lm_eval=f"{name}.yaml"), task_folder)
        assert not task.rejected and task.type == "multiple_choice"
        samples = sorted(ref["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(task.items) == 16
        ours = S.choice_logliks(model, tok, [it["prompt"] for it in task.items], [it["choices"] for it in task.items],
                                task.spec.target_delimiter)
        for s, it, ll in zip(samples, task.items, ours):
            contexts = {a[0] for a in s["arguments"]}
            assert contexts == {it["prompt"]}, name
            assert [a[1] for a in s["arguments"]] == [task.spec.target_delimiter + c for c in it["choices"]]
            assert ll == pytest.approx([r[0][0] for r in s["resps"]], abs=1e-4)
        scored, rows, _ = S.run_task(task, model, tok, S.DecodingSection(), S.BootstrapSection(n_resamples=10))
        res = ref["results"][name]
        assert scored.values["accuracy"]["value"] == pytest.approx(res["acc,none"], abs=1e-12), name
        assert scored.values["accuracy_norm"]["value"] == pytest.approx(res["acc_norm,none"], abs=1e-12), name
        assert [r["correct"] for r in rows] == [bool(s["acc"]) for s in samples]


def test_fewshot_rules(task_folder):
    """What the agreement test relies on, in plain terms: shots, delimiters, the doc left out of its own shots."""
    t = S.load_task(S.TaskSpec(name="f", lm_eval="colors_first_n.yaml"), task_folder)
    first = t.items[0]["prompt"]
    # first_n from the test split: doc 0's shots are docs 1 and 2, doc 1's are docs 0 and 2
    assert first.startswith("Pick the colour.\n\nWhich colour is ") and first.count("\n---\n") == 2
    q = [it["prompt"].rsplit("\n---\n", 1)[1] for it in t.items[:3]]
    assert first.split("\n---\n")[0].endswith(t.items[1]["target"]) and q[1] in first
    assert q[0] in t.items[1]["prompt"].split("\n---\n")[0]
    s = S.load_task(S.TaskSpec(name="s", lm_eval="colors_same_split.yaml"), task_folder)
    for it in s.items:
        shots = it["prompt"].split("\n\n")[1:-1]
        own = it["prompt"].rsplit("\n\n", 1)[1]
        assert len(shots) == 3 and own.endswith("\nA: ") and own.split("\n")[0] not in [x.split("\n")[0] for x in shots]
    # the seed is lm-eval's fewshot_random_seed; another seed draws other shots
    a = S.load_task(S.TaskSpec(name="r", lm_eval="colors_random.yaml"), task_folder)
    b = S.load_task(S.TaskSpec(name="r", lm_eval="colors_random.yaml", fewshot_seed=7), task_folder)
    assert [x["prompt"] for x in a.items] != [x["prompt"] for x in b.items]
    zero = S.load_task(S.TaskSpec(name="r", lm_eval="colors_random.yaml", num_fewshot=0), task_folder)
    q0 = json.loads((task_folder / "test.jsonl").read_text().splitlines()[0])["q"].strip()
    assert zero.items[0]["prompt"] == f"Pick the colour.\n\nQ: {q0}?\nA:"  # description + process_docs + template


def test_shipped_fewshot_example_loads():
    from tests.conftest import ROOT

    t = S.load_task(S.TaskSpec(name="g", lm_eval="examples/lm_eval_tasks/general_mc_fewshot.yaml"), ROOT)
    assert len(t.items) == 16 and not t.rejected and t.items[0]["choices"] == ["A", "B", "C", "D"]
    p = t.items[0]["prompt"]
    assert p.startswith("Answer each question with the letter") and p.count("\nAnswer: ") == 3
    assert p.endswith("\nAnswer:")


@pytest.mark.parametrize("yaml_text, message", [
    ("dataset_path: some/hub_dataset\ntest_split: test\noutput_type: multiple_choice\n", "local dataset"),
    ("include: colors_random.yaml\nprocess_docs: !function nothere.process\n", "no nothere.py"),
    ("include: colors_random.yaml\nprocess_docs: !function utils.missing\n", "has no 'missing'"),
    ("include: colors_random.yaml\nfewshot_config: {sampler: balanced}\n", "sampler 'balanced'"),
    ("include: colors_random.yaml\ntest_split: nope\n", "split 'nope'"),
    ("include: colors_random.yaml\noutput_type: loglikelihood\n", "not supported"),
])
def test_unsupported_task_files_are_one_line_errors(task_folder, yaml_text, message):
    from tunelab.errors import TunelabError

    (task_folder / "bad.yaml").write_text(yaml_text)
    with pytest.raises(TunelabError, match=message):
        S.load_task(S.TaskSpec(name="b", lm_eval="bad.yaml"), task_folder)
