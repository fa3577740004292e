"""Distillation on a real model: does a 2-layer student learn more from a teacher than from the references?

    python bench/distill_stories260k.py [--shared ../shared] [--workspace DIR] [--epochs 2]

All on the project's customer-support tickets (examples/data/support), same decoding and held-out set:

1. teacher: stories260K (a real 260K-parameter Llama, 5 layers) fully fine-tuned on the tickets (SFT);
2. student: stories260K cut to 2 of its 5 layers (the first and the last, DistilBERT-style
   initialization from a bigger model's layers), saved as a model folder;
3. baseline: the student instruction-tuned on the reference answers (SFT), same steps and learning rate;
4. logit distillation (examples/distill_logits_stories260k.yaml) and
5. sequence-level distillation (examples/distill_sequence_stories260k.yaml) of the teacher into the student.

Prints held-out ROUGE-L and response perplexity of each, the share of the teacher's quality the
student keeps, the parameter ratio and the generation-latency ratio (median per prompt, measured
by the distill run with the teacher and student interleaved on the same prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_student(src: Path, dst: Path, keep: list[int]) -> Path:
    """A smaller model from a bigger one's layers (same embeddings and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new  # the KV cache is indexed by layer
    model.config.num_hidden_layers = len(keep)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--workspace", default=None, help="default: a temporary folder")
    ap.add_argument("--epochs", type=float, default=2.0)
    a = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab import config as cfglib
    from tunelab.recipes import load_recipe
    from tunelab.train import sft
    from tunelab.train.distill import score
    from tunelab.train.numerics import ensure_chat_template
    from tunelab.workspace import Workspace

    transformers.logging.set_verbosity_error()
    base = Path(a.shared) / "models" / "stories260K"
    if not (base / "config.json").is_file():
        sys.exit(f"stories260K not found under {a.shared}/models (pass --shared)")
    ws = Workspace.resolve(a.workspace or tempfile.mkdtemp(prefix="tunelab-distill-"))
    data = ROOT / "examples" / "data" / "support"
    files = [f"data.{k}={data / f'{k}.jsonl'}" for k in ("train", "validation", "test")]
    common = {"data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"),
                       "test": str(data / "test.jsonl"), "format": "alpaca", "max_length": 256},
              "method": "full",
              "train": {"learning_rate": 3e-3, "epochs": a.epochs, "batch_size": 16, "eval_every": 20,
                        "early_stopping_patience": 3, "seed": 42}}
    t_all = time.time()

    t0 = time.time()
    teacher = sft.run(cfglib.validate(sft.SFTConfig, {"recipe": "sft", "name": "stories-support",
                                                      "model": {"name": str(base)}, **common}), ws)
    t_teacher = time.time() - t0
    student_dir = make_student(base, ws.models_dir / "stories260k-2layer", keep=[0, 4])

    t0 = time.time()
    baseline = sft.run(cfglib.validate(sft.SFTConfig, {"recipe": "sft", "name": "student-references",
                                                       "model": {"name": str(student_dir)}, **common}), ws)
    t_baseline = time.time() - t0

    over = [f"teacher.name={teacher['run_id']}", f"student.name={student_dir}", *files,
            f"train.epochs={a.epochs}"]
    runs = {}
    for mode in ("logits", "sequence"):
        cfg, run = load_recipe(ROOT / "examples" / f"distill_{mode}_stories260k.yaml", over)
        t0 = time.time()
        runs[mode] = (run(cfg, ws), time.time() - t0)

    # the baseline student on the same held-out set with the same decoding as the distill runs
    cmp_cfg = cfg.eval
    tok = AutoTokenizer.from_pretrained(Path(baseline["output"]))
    ensure_chat_template(tok)
    test_chats = sft.load_chats(str(data / "test.jsonl"), cfg.data, [], cmp_cfg.limit)
    b_metrics, _ = score(AutoModelForCausalLM.from_pretrained(baseline["output"]), tok, test_chats,
                         cmp_cfg, cfg.data.max_length, "student (SFT on references)")

    c = runs["logits"][0]["comparison"]
    teach, start = c["models"]["teacher"], c["models"]["student_start"]
    rows = [("teacher: stories260K SFT (5 layers)", teach, c["parameters"]["teacher"], t_teacher),
            ("student at start (2 layers cut from stories260K)", start, c["parameters"]["student"], None),
            ("student SFT on references (baseline)", b_metrics, c["parameters"]["student"], t_baseline)]
    for mode, (s, t) in runs.items():
        rows.append((f"student, {mode} distillation", s["comparison"]["models"]["student"],
                     s["comparison"]["parameters"]["student"], t))
    print(f"\nheld-out: {c['held_out']} support tickets, greedy, {cmp_cfg.max_new_tokens} new tokens; "
          f"workspace {ws.root}")
    print("| model | parameters | ROUGE-L | response perplexity | ROUGE-L kept vs teacher | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m, p, t in rows:
        kept = m["rougeL"] / teach["rougeL"] if teach["rougeL"] else float("nan")
        print(f"| {name} | {p:,} | {m['rougeL']:.4f} | {m['perplexity']:.3f} | {kept:.3f} | "
              f"{'' if t is None else f'{t:.0f}'} |")
    for mode, (s, _) in runs.items():
        lat = s["comparison"]["latency"]
        print(f"{mode}: quality retained {json.dumps(s['quality_retained'])}; parameter ratio "
              f"{s['parameter_ratio']}; latency ratio {s['latency_ratio']} (median of {lat['prompts']} prompts, "
              f"{lat['new_tokens']} tokens each: student {lat['student_median_ms']} ms, teacher "
              f"{lat['teacher_median_ms']} ms); distill loss {s['first_distill_loss']:.3f} -> "
              f"{s['final_distill_loss']:.3f}")
    if runs["sequence"][0].get("teacher_generation"):
        g = runs["sequence"][0]["teacher_generation"]
        print(f"sequence: teacher answered {g['train'] + g['validation']} prompts in {g['seconds']} s")
    print(f"total {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
