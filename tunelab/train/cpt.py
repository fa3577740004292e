"""Continued pre-training (domain adaptation): next-token training of an existing model on raw domain text.

    tunelab train examples/cpt_contracts_stories260k.yaml [--set replay.ratio=0] [--resume RUN_ID]

Top to bottom: resolve the model and its tokenizer → domain text (held out by content hash) and
optional general text → pack both into fixed blocks → mix general blocks into training at
``replay.ratio`` (replay against catastrophic forgetting) → domain and general perplexity of the
base model on fixed held-out blocks → LoRA or full → Trainer (validation on the domain held-out
blocks, early stopping, checkpoints) → the same perplexities after → adapter/ or model/ → summary.

Forgetting is made visible: general perplexity before and after is measured on the same blocks
(token-weighted, exp(sum NLL / tokens)); set ``replay.ratio: 0`` to measure it without mixing.
"""

from __future__ import annotations

import json
import random
import time
from typing import Literal

from pydantic import Field

from tunelab import config as cfglib
from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.sections import LoraSection, ModelSection, TextDataSection, TrainSection
from tunelab.workspace import Workspace, write_json


class ReplaySection(Strict):
    """General text: mixed into training at ``ratio`` and scored before/after to show forgetting."""

    files: list[str] = Field(min_length=1, description="general text: files, folders or records with text")
    ratio: float = Field(0.2, ge=0.0, lt=1.0, description="share of training blocks drawn from this text; "
                                                           "0: only measure general perplexity")
    text_unit: Literal["document", "paragraph"] = "document"
    heldout_share: float = Field(0.05, gt=0.0, lt=0.5, description="general documents held out for perplexity")
    limit: int | None = Field(None, ge=1, description="use only the first N documents")


class CPTConfig(Strict):
    """Recipe for continued pre-training on raw text."""

    recipe: Literal["cpt"] = "cpt"
    name: str | None = Field(None, description="a short name used in the run id")
    model: ModelSection
    data: TextDataSection
    replay: ReplaySection | None = None
    method: Literal["lora", "full"] = "lora"
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()


def attach_method(model, cfg: CPTConfig):
    """The one place the training method wraps the model (PEFT adapters here; full: unchanged)."""
    if cfg.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                            target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))


def replay_blocks(general: list[list[int]], n_domain: int, ratio: float, seed: int) -> tuple[list[list[int]], dict]:
    """General blocks so that they are ``ratio`` of all training blocks: n = round(D·r / (1 − r)).

    Drawn without replacement when there are enough, else every block is repeated as evenly as
    possible (reported). Fixed by the seed."""
    want = round(n_domain * ratio / (1 - ratio)) if ratio > 0 else 0
    if want and not general:
        raise TunelabError("replay.ratio > 0 but the general text gave no training block; add general text")
    rng = random.Random(seed)
    idx: list[int] = []
    while len(idx) < want:
        idx += rng.sample(range(len(general)), min(len(general), want - len(idx)))
    picked = [general[i] for i in idx]
    return picked, {"ratio": ratio, "blocks": len(picked), "available": len(general),
                    "repeated": want > len(general),
                    "actual_share": round(len(picked) / max(1, n_domain + len(picked)), 4)}


def run(cfg: CPTConfig, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Continue pre-training; return the summary (also written to ``summary.json``)."""
    from tunelab.train.pretrain import (absolute_files, load_texts, save_folder, split_heldout, spread, text_lineage,
                                        tokenize_and_pack, train_blocks, training_summary)

    from tunelab.train.distributed import is_main, local_device, worker_summary

    ws = workspace or Workspace.resolve()
    catalog = ws.catalog()
    main = is_main()  # under --nproc only rank 0 writes files and the catalog (tunelab/train/distributed.py)
    sections = lambda c: {"data": c.data, **({"replay": c.replay} if c.replay else {})}  # noqa: E731
    if resume:
        run_dir = ws.run_dir(resume)
        run_id = run_dir.name
        cfg = cfglib.load(CPTConfig, run_dir / "config.yaml")  # the run's own config, not the file's
    else:
        cfg = cfg.model_copy(update={"data": absolute_files(cfg.data),
                                     "replay": absolute_files(cfg.replay) if cfg.replay else None})
    started = time.time()
    data_lineage = text_lineage(sections(cfg))  # a missing file fails here, before a run directory is made

    # 1. domain text (+ general text) → held-out documents by content hash; mistakes fail before a run exists
    rejects: list[dict] = []
    domain = load_texts(cfg.data.files, cfg.data.text_unit, cfg.data.limit, rejects)
    d_train, d_held = split_heldout(domain, cfg.data.heldout_share)
    if not d_train or not d_held:
        raise TunelabError(f"{len(domain)} domain documents gave {len(d_train)} for training and {len(d_held)} "
                           f"held out; add text, raise data.heldout_share, or use data.text_unit: paragraph")
    general, g_train, g_held = [], [], []
    if cfg.replay:
        general = load_texts(cfg.replay.files, cfg.replay.text_unit, cfg.replay.limit, rejects)
        g_train, g_held = split_heldout(general, cfg.replay.heldout_share)
        if not g_held:
            raise TunelabError(f"none of {len(general)} general documents was held out; add general text, raise "
                               f"replay.heldout_share, or use replay.text_unit: paragraph")
    if not resume:
        run_id, run_dir = ws.new_run_dir("cpt", cfg.name)
        if main:
            (run_dir / "config.yaml").write_text(cfglib.dump(cfg), encoding="utf-8")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.environment import capture
    from tunelab.models import resolve
    from tunelab.train.numerics import blocks_perplexity
    from tunelab.train.device import plan
    from tunelab.train._run import write_probe

    transformers.logging.set_verbosity_error()
    model_path = resolve(cfg.model.name, ws)
    lineage = {"run_id": run_id, "parent_id": parent_id, "base_model": cfg.model.name,
               "base_model_path": str(model_path), **data_lineage}
    if main:
        write_json(run_dir / "lineage.json", lineage)
        write_json(run_dir / "environment.json", capture())
    if main and not resume:
        catalog.add_run(id=run_id, kind="cpt", dir=run_dir, name=cfg.name, parent_id=parent_id,
                        base_model=cfg.model.name, dataset_id=lineage["dataset_id"], config=cfg.model_dump(mode="json"))
    elif main:
        catalog.update_run(run_id, status="running")

    try:
        if main:
            with open(run_dir / "rejects.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rejects)

        # 2. tokenizer and block size (the model's context unless set; capped at 1024 by default)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        mcfg = transformers.AutoConfig.from_pretrained(model_path)
        context = getattr(mcfg, "max_position_embeddings", None) or tokenizer.model_max_length
        block = cfg.data.block_size or min(int(context), 1024)
        if block > context:
            raise TunelabError(f"data.block_size {block} exceeds the model's context of {context} tokens; lower it")

        # 3. packed blocks; general blocks mixed into training at replay.ratio
        d_pack, dh_pack = tokenize_and_pack(tokenizer, d_train, block), tokenize_and_pack(tokenizer, d_held, block)
        d_eval = spread(dh_pack.blocks, cfg.data.max_eval_blocks)
        if not d_pack.blocks or not d_eval:
            raise TunelabError(f"too little domain text for one {block}-token block in training and held out "
                               f"({d_pack.tokens} and {dh_pack.tokens} tokens); lower data.block_size or add text")
        data_report = {"block_size": block, "domain": {"documents": len(domain), "train": d_pack.as_dict(),
                                                       "heldout": {**dh_pack.as_dict(), "eval_blocks": len(d_eval)}}}
        train_set, g_eval, replay_report = list(d_pack.blocks), [], None
        if cfg.replay:
            g_pack, gh_pack = tokenize_and_pack(tokenizer, g_train, block), tokenize_and_pack(tokenizer, g_held, block)
            g_eval = spread(gh_pack.blocks, cfg.data.max_eval_blocks)
            if not g_eval:
                raise TunelabError(f"no held-out general block of {block} tokens ({gh_pack.tokens} tokens held out); "
                                   f"add general text, raise replay.heldout_share or use replay.text_unit: paragraph")
            mixed, replay_report = replay_blocks(g_pack.blocks, len(d_pack.blocks), cfg.replay.ratio, cfg.train.seed)
            train_set += mixed
            data_report["general"] = {"documents": len(general), "train": g_pack.as_dict(),
                                      "heldout": {**gh_pack.as_dict(), "eval_blocks": len(g_eval)}}
            data_report["replay"] = replay_report
        data_report["rejected"] = len(rejects)
        print(f"data: {len(d_train)} train / {len(d_held)} held-out domain documents → {len(d_pack.blocks)} blocks "
              f"of {block} (dropped {d_pack.dropped} tokens in the final partial block)"
              + (f"; replay: {replay_report['blocks']} general blocks ({100 * replay_report['actual_share']:.1f}% "
                 f"of training{', repeated' if replay_report['repeated'] else ''})" if replay_report else "")
              + f"; rejected records: {len(rejects)}")

        # 4. base model and its perplexities on the fixed held-out blocks
        transformers.set_seed(cfg.train.seed)  # adapter init draws from the global RNG
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model = model.to(local_device(plan(cfg.train.precision).device))
        bs = cfg.train.batch_size
        if main:  # evaluations are rank 0's (no RNG is drawn: the ranks stay in step)
            before = {"domain": blocks_perplexity(model, d_eval, bs)}
            if g_eval:
                before["general"] = blocks_perplexity(model, g_eval, bs)
            print("base perplexity: " + ", ".join(f"{k} {v['perplexity']:.3f}" for k, v in before.items()))

        # 5. method, then train on domain blocks (+ replay), validating on the domain held-out blocks
        model = attach_method(model, cfg)
        model, trainer, out, dplan = train_blocks(model, tokenizer, train_set, d_eval, cfg.train, run_dir,
                                                  f"cpt {run_id}", bool(resume))
        if not main:
            return worker_summary(run_id)
        after = {"domain": blocks_perplexity(model, d_eval, bs)}
        if g_eval:
            after["general"] = blocks_perplexity(model, g_eval, bs)

        # 6. save the best weights (adapter or full model) with the tokenizer, and a reload probe
        model = model.to("cpu")  # saved and probed where a plain reload lands
        out_dir = run_dir / ("adapter" if cfg.method == "lora" else "model")
        save_folder(model, tokenizer, out_dir)
        write_probe(model, d_eval[0], run_dir / "probe.safetensors")

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        summary = {
            "run_id": run_id,
            "status": "completed",
            "method": cfg.method,
            "base_model": cfg.model.name,
            "output": str(out_dir),
            **training_summary(trainer, out),
            "domain_perplexity_before": round(before["domain"]["perplexity"], 4),
            "domain_perplexity_after": round(after["domain"]["perplexity"], 4),
        }
        if g_eval:
            summary["general_perplexity_before"] = round(before["general"]["perplexity"], 4)
            summary["general_perplexity_after"] = round(after["general"]["perplexity"], 4)
            summary["forgetting_ratio"] = round(after["general"]["perplexity"] / before["general"]["perplexity"], 4)
        summary.update({
            "perplexity": {"before": before, "after": after},
            "replay": replay_report,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "device": dplan.__dict__,
            "data": data_report,
            "wall_time_s": round(time.time() - started, 2),
        })
        write_json(run_dir / "summary.json", summary)
        catalog.update_run(run_id, status="completed", metrics={
            k: summary.get(k) for k in ("domain_perplexity_before", "domain_perplexity_after",
                                        "general_perplexity_before", "general_perplexity_after", "best_eval_loss",
                                        "steps", "tokens_trained", "tokens_per_s")})
        ppl = lambda part: f"{before[part]['perplexity']:.3f} → {after[part]['perplexity']:.3f}"  # noqa: E731
        general = (f"; general {ppl('general')}" if g_eval
                   else "; general text not measured (add replay.files, ratio: 0 to measure forgetting)")
        print(f"cpt {run_id}: domain perplexity {ppl('domain')}{general}; {summary['tokens_trained']:,} tokens "
              f"trained; {out_dir.name} in {out_dir}")
        return summary
    except BaseException as e:
        if main:
            catalog.update_run(run_id, status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
