"""Distillation through the real CLI: a teacher trained on the color data teaches a smaller random student.

The teacher is the conftest tiny model (2 layers, 64 wide) fine-tuned briefly in the test on the
color data; the student is a 1-layer, 32-wide random Llama with the same tokenizer (about a fifth
of the teacher's parameters). Run ids as teacher/student are covered in tests/unit/test_distill_refs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ANIMALS, COLORS, make_tiny_model, run_cli, write_color_data


def _small_student(folder: Path, tokenizer_from: Path, init: float) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    tok.save_pretrained(folder)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=init)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _train_teacher(src: Path, dst: Path, train: Path, steps: int = 150) -> Path:
    """Full fine-tuning in-process with tunelab's masking and loss: seconds, where a CLI run costs its start-up."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.sections import ChatDataSection
    from tunelab.train.numerics import PadCollator, ensure_chat_template, response_only_loss, tokenize_all_chats
    from tunelab.data.loaders import load_chats

    tok = AutoTokenizer.from_pretrained(src)
    ensure_chat_template(tok)
    feats, _ = tokenize_all_chats(tok, load_chats(str(train), ChatDataSection(train=str(train)), []), 64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    collate, g = PadCollator(tok.pad_token_id), torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = response_only_loss(model, collate([feats[i] for i in torch.randint(len(feats), (16,), generator=g)]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("distill")
    train = write_color_data(d / "train.jsonl", 240, seed=1)
    test = write_color_data(d / "test.jsonl", 16, seed=2)
    teacher = _train_teacher(tiny_model, d / "teacher", train)
    return {"dir": d, "ws": d / "ws", "train": train, "test": test, "teacher": str(teacher), "tiny": tiny_model}


def _recipe(s: dict, name: str, student: Path, **over) -> Path:
    cfg = {"recipe": "distill", "name": name, "teacher": {"name": s["teacher"]}, "student": {"name": str(student)},
           "data": {"train": str(s["train"]), "validation_split": 0.1, "test": str(s["test"]), "max_length": 64},
           "method": "full",
           "train": {"learning_rate": 1e-2, "epochs": 6, "batch_size": 8, "eval_every": 10, "seed": 7,
                     "warmup_ratio": 0.1},
           "eval": {"max_new_tokens": 12, "batch_size": 16, "latency_prompts": 4}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    p = s["dir"] / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run(s: dict, recipe: Path) -> tuple[Path, dict, list[dict]]:
    runs = s["ws"] / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    r = run_cli("train", str(recipe), "-w", str(s["ws"]))
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = set(runs.iterdir()) - before
    assert "quality retained" in r.stdout and "latency ratio" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, summary, rows


def _check_probe(model, run_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    probe = load_file(str(run_dir / "probe.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"][None]).logits[0, -4:]
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)


def _check_comparison(summary: dict, rows: list[dict]) -> None:
    d = [x["distill_loss"] for x in rows if "distill_loss" in x]
    assert len(d) >= 20
    assert sum(d[-5:]) / 5 < 0.6 * sum(d[:5]) / 5, "the distillation loss did not fall"
    assert summary["final_distill_loss"] == d[-1]
    c = summary["comparison"]
    start, student, teacher = (c["models"][k] for k in ("student_start", "student", "teacher"))
    # the student learned from the teacher: better held-out answers than at its start
    assert student["perplexity"] < 0.5 * start["perplexity"]
    assert student["rougeL"] > start["rougeL"] + 0.2
    # the teacher is the better model here, and the summary says by how much
    assert teacher["perplexity"] < student["perplexity"] < start["perplexity"]
    q = summary["quality_retained"]
    assert q["rougeL"] == pytest.approx(student["rougeL"] / teacher["rougeL"], abs=1e-4)
    assert q["perplexity"] == pytest.approx(teacher["perplexity"] / student["perplexity"], abs=1e-4)
    assert 0 < q["perplexity"] < 1
    p = c["parameters"]
    assert p["student"] < p["teacher"] / 2
    assert summary["parameter_ratio"] == pytest.approx(p["student"] / p["teacher"], abs=1e-4)
    lat = c["latency"]
    assert lat["prompts"] == 4 and lat["new_tokens"] == 12 and lat["teacher_median_ms"] > 0
    assert summary["latency_ratio"] == pytest.approx(lat["student_median_ms"] / lat["teacher_median_ms"], abs=1e-3)


def test_logit_distillation_cli(setup):
    from transformers import AutoModelForCausalLM

    from tunelab.eval.run import evaluate_run
    from tunelab.workspace import Workspace

    student = _small_student(setup["dir"] / "student-full", setup["tiny"], init=0.02)
    recipe = _recipe(setup, "logits", student, mode="logits", loss="forward_kl", temperature=2.0, alpha=0.0)
    run_dir, summary, rows = _run(setup, recipe)
    assert summary["mode"] == "logits" and summary["trainable_params"] == summary["total_params"]
    _check_comparison(summary, rows)
    assert any("eval_distill_loss" in x for x in rows)
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["teacher"]["path"] == setup["teacher"] and lineage["student"]["path"] == str(student)
    # the student loads back with plain transformers and reproduces the trained logits
    _check_probe(AutoModelForCausalLM.from_pretrained(run_dir / "model").eval(), run_dir)
    ev = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(ev["models"]) == {"base", "tuned", "teacher"} and (run_dir / "report.html").is_file()
    # `tunelab eval` works on a distill run too: base = the student's start folder
    res = evaluate_run(run_dir.name, Workspace.resolve(setup["ws"]), limit=4)
    assert res["models"]["tuned"]["perplexity"] < res["models"]["base"]["perplexity"]


@pytest.mark.slow  # ~16 s: teacher generation, then a LoRA student; make test-slow (CI runs it)
def test_sequence_distillation_cli_lora_student(setup):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    student = _small_student(setup["dir"] / "student-lora", setup["tiny"], init=0.25)
    recipe = _recipe(setup, "sequence", student, mode="sequence", method="lora",
                     lora={"r": 8, "alpha": 16, "dropout": 0.0}, sequence={"max_new_tokens": 16},
                     train={"learning_rate": 2e-2})
    run_dir, summary, rows = _run(setup, recipe)
    assert summary["mode"] == "sequence" and 0 < summary["trainable_params"] < summary["total_params"]
    gen = summary["teacher_generation"]
    assert gen["train"] + gen["validation"] + gen["empty_dropped"] == 240
    # the student trained on the teacher's answers (kept next to the run), which mostly know the rule
    answers = [json.loads(x)["messages"] for x in (run_dir / "teacher_responses.jsonl").read_text().splitlines()]
    assert len(answers) == gen["train"] + gen["validation"]
    rule = dict(zip(ANIMALS, COLORS))
    right = sum(any(f" {a}" in m[-2]["content"] and rule[a] in m[-1]["content"] for a in ANIMALS) for m in answers)
    assert right > 0.7 * len(answers)
    _check_comparison(summary, rows)
    base = AutoModelForCausalLM.from_pretrained(student)
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    _check_probe(tuned, run_dir)
    probe = load_file(str(run_dir / "probe.safetensors"))
    with torch.no_grad(), tuned.disable_adapter():
        assert not torch.allclose(tuned(input_ids=probe["input_ids"][None]).logits[0, -4:], probe["logits"], atol=1e-3)


def test_logit_distillation_needs_one_tokenizer(setup):
    from tunelab import recipes
    from tunelab.errors import TunelabError
    from tunelab.workspace import Workspace

    other = make_tiny_model(setup["dir"] / "other-vocab", ["completely different words here", "zebra quartz"] * 20)
    ws = Workspace.resolve(setup["dir"] / "ws-mismatch")
    cfg, run = recipes.load_recipe(_recipe(setup, "mismatch", other))
    with pytest.raises(TunelabError) as e:
        run(cfg, ws)
    msg = str(e.value)
    assert "share a tokenizer" in msg and "mode: sequence" in msg and "\n" not in msg  # one line for the CLI
    assert not ws.runs_dir.exists() or not list(ws.runs_dir.iterdir())  # failed before making a run
