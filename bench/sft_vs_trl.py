"""tunelab's SFT against TRL's SFTTrainer: tokens/s and peak RSS on the same model, data, LoRA and hyperparameters.

    tunelab models pull smollm2-135m-instruct -w WS
    python bench/sft_vs_trl.py --model WS/models/smollm2-135m-instruct \
        [--data examples/data/support/train.jsonl] [--configs tunelab,trl-defaults,trl-nogc] \
        [--rounds 2] [--warmup 2] [--steps 6]

Every configuration runs in its own subprocess (peak RSS is that child's ``ru_maxrss`` from
``os.wait4``), in alternating order (round 1 A B C, round 2 C B A, ...) so drift on a shared
machine hits each side alike. A run trains ``warmup + steps`` optimizer steps; tokens/s is the
non-padding input tokens of the measured steps over their summed step time (step begin → step
end, the same callback for both sides). Medians over rounds are printed, with ratios against
TRL's defaults and against the fastest TRL configuration measured in this run.

The recipe is examples/sft_lora_support.yaml (LoRA r=16 alpha=32 dropout 0.05 on all linear
layers, lr 4e-4 cosine, 5% warmup, batch 8, max_length 256, seed 42); TRL gets the same chats
as conversational prompt/completion records, so both train on the response tokens only.

Configurations:
  tunelab            tunelab's defaults (precision, checkpointing, padding-free: all `auto`)
  tunelab-padded     ... with train.padding_free=false
  tunelab-pf         ... with train.padding_free=true
  tunelab-nogc       ... with train.gradient_checkpointing=false
  tunelab-gc         ... with train.gradient_checkpointing=true (every layer)
  tunelab-ckpt2      ... checkpointing every 2nd decoder layer (the CPU bf16 default until 2026-12-07)
  tunelab-fp32       ... with train.precision=fp32
  tunelab-bf16       ... with train.precision=bf16 (checkpointing and micro-batch as the defaults pick)
  tunelab-bf16-nogc  ... with train.precision=bf16 and train.gradient_checkpointing=false
  tunelab-bf16-nogc-mb4, tunelab-bf16-nogc-mb2  ... and train.micro_batch_size=4 or 2
  tunelab-mb4        ... with train.micro_batch_size=4 (two micro-batches of 4 accumulated: the same 8 per step)
  tunelab-mb2        ... with train.micro_batch_size=2 (four micro-batches of 2)
  tunelab-peft-lora  ... with peft's own LoRA forward instead of the fused LoRA linear (CPU fp32)
  tunelab-whole      ... with train.micro_batch_size=8 (the whole batch, the default unless a memory budget splits it)
  tunelab-sdpa       ... with SDPA attention instead of the checkpointed eager attention of CPU bf16 runs
  tunelab-noprefix   ... without the shared prompt prefix (every row computes the system prompt and header itself)
  trl-defaults       TRL SFTConfig defaults (bf16 autocast, gradient checkpointing)
  trl-nogc           ... without gradient checkpointing
  trl-grouped        ... with length-grouped batches (train_sampling_strategy="group_by_length", as tunelab)
  trl-nogc-grouped   ... length-grouped, without gradient checkpointing
  trl-pf             ... padding_free=True (one unpadded row per batch)
  trl-pf-nogc        ... padding_free=True without gradient checkpointing
  trl-packing        ... packing=True (best-fit-decreasing rows of max_length, padding-free)
  trl-packing-nogc   ... packing=True without gradient checkpointing
  trl-fp32           ... bf16=False, no gradient checkpointing
  tunelab-system     tunelab's defaults under the C library's malloc (TUNELAB_ALLOCATOR=system)
  trl-defaults-jemalloc, trl-fp32-jemalloc  ... TRL's with jemalloc preloaded, as tunelab's children

Allocator: tunelab's children start as `tunelab train` does (tunelab/allocator.py: jemalloc
preloaded on a CPU machine that has it, TUNELAB_ALLOCATOR decides); TRL's under the C library's malloc, its
default, unless the configuration ends in -jemalloc (an allocator this bench was started with is removed
first). Each row says which it ran on.
Run it alone: a second job on 2 cores slows every side.
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
RECIPE = ROOT / "examples" / "sft_lora_support.yaml"
CONFIGS = ("tunelab", "tunelab-padded", "tunelab-pf", "tunelab-nogc", "tunelab-gc", "tunelab-ckpt2", "tunelab-fp32",
           "tunelab-fp32-mb4", "tunelab-fp32-mb2",
           "tunelab-bf16", "tunelab-bf16-nogc", "tunelab-bf16-nogc-mb4", "tunelab-bf16-nogc-mb2",
           "tunelab-mb4", "tunelab-mb2", "tunelab-whole", "tunelab-peft-lora", "tunelab-noprefix", "tunelab-sdpa",
           "trl-defaults", "trl-nogc", "trl-grouped", "trl-nogc-grouped", "trl-pf", "trl-pf-nogc", "trl-packing",
           "trl-packing-nogc", "trl-fp32", "tunelab-system", "trl-defaults-jemalloc", "trl-fp32-jemalloc")


def _recipe(model: str, data: str, total_steps: int) -> dict:
    from tunelab.config import load_yaml

    raw = load_yaml(RECIPE)
    raw["model"] = {"name": model}
    raw["data"].update({"train": data, "validation": None, "test": None})
    raw["train"].update({"max_steps": total_steps, "eval_every": 10 ** 6, "early_stopping_patience": None})
    return raw


def _step_rows(metrics: Path, warmup: int) -> list[dict]:
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    return [r for r in rows if "step_time_s" in r and r["step"] > warmup]


def child_tunelab(a, variant: str, tmp: Path) -> dict:
    import contextlib
    import io

    from tunelab import config as cfglib
    from tunelab.train.sft import SFTConfig, run
    from tunelab.workspace import Workspace

    raw = _recipe(a.model, a.data, a.warmup + a.steps)
    if variant == "tunelab-padded":
        raw["train"]["padding_free"] = False
    elif variant == "tunelab-pf":
        raw["train"]["padding_free"] = True
    elif variant in ("tunelab-nogc", "tunelab-gc"):
        raw["train"]["gradient_checkpointing"] = variant == "tunelab-gc"
    elif variant.startswith("tunelab-fp32"):
        raw["train"]["precision"] = "fp32"
        if "-mb" in variant:
            raw["train"]["micro_batch_size"] = int(variant[-1])
    elif variant.startswith("tunelab-bf16"):
        raw["train"]["precision"] = "bf16"
        if "-nogc" in variant:
            raw["train"]["gradient_checkpointing"] = False
        if "-mb" in variant:
            raw["train"]["micro_batch_size"] = int(variant[-1])
    elif variant in ("tunelab-mb4", "tunelab-mb2"):
        raw["train"]["micro_batch_size"] = int(variant[-1])
    elif variant == "tunelab-peft-lora":
        from tunelab.train import _cpu_speed

        _cpu_speed.use_fused_lora_linear = lambda model: 0
    elif variant == "tunelab-sdpa":
        from tunelab.train import _cpu_speed

        _cpu_speed.attention_kwargs = lambda *a, **k: {}
    elif variant == "tunelab-noprefix":
        from tunelab.train import shared_prompt

        shared_prompt.shared_prefix_hidden = lambda decoder, inputs, stats=None: None
    elif variant == "tunelab-whole":
        raw["train"]["micro_batch_size"] = raw["train"]["batch_size"]
    elif variant == "tunelab-ckpt2":
        from tunelab.train import sft

        sft.checkpoint_every = lambda requested, dplan: 2
        raw["train"]["micro_batch_size"] = raw["train"]["batch_size"]
    cfg = cfglib.validate(SFTConfig, raw)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        s = run(cfg, Workspace.resolve(tmp / "ws"))
    rows = _step_rows(Path(s["output"]).parent / "metrics.jsonl", a.warmup)
    return {"rows": rows, "setup": {"device": s["device"]["why"], "precision": s["device"]["precision"],
                                    "gradient_checkpointing": s["gradient_checkpointing"],
                                    "checkpoint_every_n_layers": s.get("checkpoint_every_n_layers"),
                                    "padding_free": s.get("padding_free"),
                                    "micro_batch": s["memory"]["micro_batch"]}}


def child_trl(a, variant: str, tmp: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tunelab.train.callbacks import MetricsJsonl
    from tunelab.data.loaders import load_chats
    from tunelab.config import validate
    from tunelab.train.sft import SFTConfig as TLConfig

    transformers.logging.set_verbosity_error()
    variant = variant.removesuffix("-jemalloc")
    total = a.warmup + a.steps
    tl = validate(TLConfig, _recipe(a.model, a.data, total))
    chats = load_chats(tl.data.train, tl.data, [], tl.data.limit)
    ds = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in chats])
    t = tl.train
    kw = {}
    pf = variant in ("trl-pf", "trl-pf-nogc", "trl-packing", "trl-packing-nogc")
    if variant in ("trl-nogc", "trl-pf-nogc", "trl-fp32", "trl-nogc-grouped", "trl-packing-nogc"):
        kw["gradient_checkpointing"] = False
    if variant in ("trl-grouped", "trl-nogc-grouped"):
        kw["train_sampling_strategy"] = "group_by_length"
    if variant == "trl-fp32":
        kw["bf16"] = False
    if variant in ("trl-pf", "trl-pf-nogc"):
        kw.update(padding_free=True, max_length=None)  # TRL: padding_free without packing cannot truncate
    if variant in ("trl-packing", "trl-packing-nogc"):
        kw["packing"] = True
    args = SFTConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, max_steps=total,
        lr_scheduler_type=t.scheduler, warmup_steps=int(round(t.warmup_ratio * total)), weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        # a padding-free row has no padding; pad == eos for SmolLM2, so "non_padding" would miss the EOS tokens
        include_num_input_tokens_seen="all" if pf else "non_padding",
        **{"max_length": tl.data.max_length, **kw})
    lora = LoraConfig(r=tl.lora.r, lora_alpha=tl.lora.alpha, lora_dropout=tl.lora.dropout,
                      target_modules=tl.lora.target_modules, task_type="CAUSAL_LM")
    metrics = tmp / "metrics.jsonl"
    trainer = SFTTrainer(model=str(a.model), args=args, train_dataset=ds, peft_config=lora,
                         callbacks=[MetricsJsonl(metrics)])
    trainer.train()
    return {"rows": _step_rows(metrics, a.warmup),
            "setup": {"precision": "bf16" if args.bf16 else "fp32", "gradient_checkpointing": args.gradient_checkpointing,
                      "padding_free": pf, "packing": args.packing,
                      "sampling": getattr(args, "train_sampling_strategy", "random")}}


def child(a) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        fn = child_tunelab if a.child.startswith("tunelab") else child_trl
        res = fn(a, a.child, Path(tmp))
    from tunelab.allocator import loaded

    res["setup"]["allocator"] = loaded()
    rows = res["rows"]
    tokens = sum(r["step_tokens"] for r in rows)
    secs = sum(r["step_time_s"] for r in rows)
    res.update(tokens=tokens, seconds=secs, tokens_per_s=tokens / secs, threads=torch.get_num_threads(),
               median_step_s=statistics.median(r["step_time_s"] for r in rows),
               losses=[r.get("loss") for r in rows])
    Path(a.out).write_text(json.dumps(res))


def _env(config: str) -> dict:
    """A child's environment: tunelab's pick the allocator as `tunelab train` does; TRL's keep the C library's
    unless the configuration asks for jemalloc."""
    from tunelab import allocator

    env = allocator.without(os.environ)  # whatever this bench was started with
    if config == "tunelab-system":
        return {**env, allocator.ENV: "system"}
    if config.startswith("tunelab"):
        return allocator.preload_env(env) or env
    if config.endswith("-jemalloc"):
        pre = allocator.preload_env({**env, allocator.ENV: "jemalloc"})
        if pre is None:
            sys.exit(f"{config}: no jemalloc library found (apt-get install libjemalloc2)")
        return pre
    return env


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from tunelab.environment import cpu_flags

    flags = cpu_flags()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, AMX-bf16 {'yes' if 'amx_bf16' in flags else 'no'}, "
            f"AVX-512-bf16 {'yes' if 'avx512_bf16' in flags else 'no'}{gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF folder (tunelab models pull smollm2-135m-instruct -w WS)")
    ap.add_argument("--data", default=str(ROOT / "examples" / "data" / "support" / "train.jsonl"))
    ap.add_argument("--configs", default="tunelab,trl-defaults,trl-nogc")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)

    import transformers
    import trl

    configs = a.configs.split(",")
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        sys.exit(f"unknown configuration(s) {bad}; choose from {', '.join(CONFIGS)}")
    print(f"machine: {machine()}")
    print(f"model {Path(a.model).name}; data {Path(a.data).name}; recipe {RECIPE.relative_to(ROOT)} "
          f"(LoRA r=16, batch 8, max_length 256); transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{a.warmup} warm-up + {a.steps} measured steps per run, {a.rounds} rounds, alternating order")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for c in (configs if r % 2 == 0 else configs[::-1]):
                out = Path(tmp) / f"{c}-{r}.json"
                cmd = [sys.executable, __file__, "--model", a.model, "--data", a.data, "--warmup", str(a.warmup),
                       "--steps", str(a.steps), "--child", c, "--out", str(out)]
                p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(c))
                log = p.stdout.read()
                _, status, usage = os.wait4(p.pid, 0)
                if status != 0 or not out.exists():
                    print(f"round {r + 1} {c}: FAILED\n{log[-3000:]}")
                    continue
                res = json.loads(out.read_text())
                res["peak_rss_gb"] = usage.ru_maxrss / 1024 ** 2  # ru_maxrss is KiB on Linux
                runs[c].append(res)
                print(f"round {r + 1} {c}: {res['tokens_per_s']:.1f} tokens/s ({res['tokens']} tokens in "
                      f"{res['seconds']:.1f} s), peak RSS {res['peak_rss_gb']:.2f} GB; {res['setup']}", flush=True)
    med = {c: (statistics.median(x["tokens_per_s"] for x in v), statistics.median(x["peak_rss_gb"] for x in v),
               statistics.median(x["median_step_s"] for x in v)) for c, v in runs.items() if v}
    trl_ok = [c for c in med if c.startswith("trl")]
    fastest = max(trl_ok, key=lambda c: med[c][0]) if trl_ok else None
    base = "trl-defaults" if "trl-defaults" in med else None
    print("\n| configuration | tokens/s (median) | peak RSS GB (median) | median step s | vs TRL defaults "
          f"| vs fastest TRL ({fastest}) |")
    print("|---|---:|---:|---:|---:|---:|")
    for c, (tps, rss, step) in med.items():
        vb = f"{tps / med[base][0]:.2f}x" if base else "-"
        vf = f"{tps / med[fastest][0]:.2f}x" if fastest else "-"
        print(f"| {c} | {tps:.1f} | {rss:.2f} | {step:.2f} | {vb} | {vf} |")
    if "tunelab" in med and fastest and base:
        print(f"\ntunelab defaults: {med['tunelab'][0] / med[fastest][0]:.2f}x the tokens/s of the fastest TRL "
              f"configuration ({fastest}); peak RSS {med['tunelab'][1]:.2f} GB vs {med[base][1]:.2f} GB for "
              f"TRL's defaults ({med['tunelab'][1] / med[base][1]:.2f}x)")


if __name__ == "__main__":
    main()
