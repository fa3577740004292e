"""Reward model from preference pairs (Bradley–Terry): a scalar head on a decoder, LoRA or full.

    tunelab train examples/reward_hh_rlhf.yaml [--set train.max_steps=200] [--resume RUN_ID]

Top to bottom: resolve the model → tokenizer → pairs (hh-rlhf transcripts split into
prompt/chosen/rejected; prompts cut from the left to fit) → AutoModelForSequenceClassification
(num_labels=1, + LoRA with the score head trained in full) → pairwise accuracy and margin on the
held-out pairs *before* → TRL RewardTrainer (loss −log σ(r_chosen − r_rejected), Ouyang et al. 2022
eq. 1) → the same held-out numbers *after* → save the adapter/model with the tokenizer → summary.
The reward of a text is the score head read at its last token.
"""

from __future__ import annotations

import math
import time
from typing import Literal

from pydantic import Field

from tunelab import config as cfglib
from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.sections import LoraSection, ModelSection, PreferenceDataSection, TrainSection
from tunelab.workspace import Workspace, write_json


class RewardConfig(Strict):
    """Recipe for a reward model."""

    recipe: Literal["reward"] = "reward"
    name: str | None = Field(None, description="a short name used in the run id")
    model: ModelSection
    data: PreferenceDataSection
    method: Literal["lora", "dora", "rslora", "full"] = Field("lora", description="a LoRA-family adapter "
                                                                     "(tunelab/train/peft.py) or full")
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    center_rewards: float | None = Field(None, ge=0.0, description="weight of a mean-zero reward penalty "
                                                                    "(Eisenstein et al. 2023; 0.01 is typical)")
    eval_batch_size: int = Field(16, ge=1)


def _features(tokenizer, pairs: list[dict], max_length: int) -> tuple[list[dict], int]:
    from tunelab.train.numerics import encode_prompt_response

    feats, truncated = [], 0
    for p in pairs:
        c, tc = encode_prompt_response(tokenizer, p["prompt"], p["chosen"], max_length)
        r, tr = encode_prompt_response(tokenizer, p["prompt"], p["rejected"], max_length)
        truncated += int(tc or tr)
        if c == r:
            continue  # identical after truncation: no signal
        feats.append({"chosen_ids": c, "rejected_ids": r})
    return feats, truncated


def run(cfg: RewardConfig, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train a reward model; return the summary (also written to ``summary.json``)."""
    from tunelab.train import preference as P
    from tunelab.train.distributed import is_main, world_size, worker_summary
    from tunelab.data.lineage import file_lineage as dataset_lineage
    from tunelab.train._run import last_checkpoint

    ws = workspace or Workspace.resolve()
    catalog = ws.catalog()
    main = is_main()  # under --nproc only rank 0 writes files and evaluates (tunelab/train/distributed.py)
    if resume:
        run_dir = ws.run_dir(resume)
        run_id = run_dir.name
        cfg = cfglib.load(RewardConfig, run_dir / "config.yaml")
    else:
        dataset_lineage(cfg.data)  # fail on a missing file before a run directory is made
        cfg = P.absolute_data(cfg)
        run_id, run_dir = ws.new_run_dir("reward", cfg.name)
        if main:
            (run_dir / "config.yaml").write_text(cfglib.dump(cfg), encoding="utf-8")
    started = time.time()

    import torch
    import datasets
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    from tunelab.train import callbacks as cb
    from tunelab.train.device import plan

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    start = P.resolve_start(cfg.model.name, ws)
    if start.adapter is not None:
        raise TunelabError(f"model.name: run {start.run_id} holds a LoRA adapter; a reward model starts from a full "
                           "model folder (a packaged name, a folder, or a full fine-tuning run)")
    parent_id = parent_id or start.run_id
    lineage = {"run_id": run_id, "parent_id": parent_id, "base_model": cfg.model.name,
               "base_model_path": str(start.base_path), **dataset_lineage(cfg.data)}
    if main:
        P.start_record(run_dir, lineage)
    if main and not resume:
        catalog.add_run(id=run_id, kind="reward", dir=run_dir, name=cfg.name, parent_id=parent_id,
                        base_model=cfg.model.name, dataset_id=lineage["dataset_id"], config=cfg.model_dump(mode="json"))
    elif main:
        catalog.update_run(run_id, status="running")

    try:
        # 1. tokenizer and pairs
        tokenizer, _ = P.load_tokenizer(start)
        rejects: list[dict] = []
        load = (lambda path: P.load_pairs(path, tokenizer, rejects))
        pairs = P.load_pairs(cfg.data.train, tokenizer, rejects, cfg.data.limit)
        train_pairs, val_pairs, held_pairs, held_name = P.split_sets(pairs, cfg.data, cfg.train.seed, load)
        if main:
            P.write_rejects(run_dir, rejects)
        L = cfg.data.max_length
        train_feats, tr_cut = _features(tokenizer, train_pairs, L)
        val_feats, va_cut = _features(tokenizer, val_pairs, L)
        if not train_feats:
            raise TunelabError(f"no usable preference pairs in {cfg.data.train} ({len(rejects)} rejected; "
                               f"see {run_dir / 'rejects.jsonl'})")
        data_report = {"train_pairs": len(train_feats), "validation_pairs": len(val_feats),
                       "heldout_pairs": len(held_pairs), "heldout_set": held_name, "rejected": len(rejects),
                       "truncated_pairs": tr_cut + va_cut}
        print(f"data: {len(train_feats)} train / {len(val_feats)} validation pairs; held-out report on "
              f"{len(held_pairs)} {held_name} pairs; prompts cut from the left to fit {L} tokens: "
              f"{tr_cut + va_cut}; rejected records: {len(rejects)}")

        # 2. model: a scalar head on the decoder (its random init is fixed by the seed)
        dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
        transformers.set_seed(cfg.train.seed)
        model = AutoModelForSequenceClassification.from_pretrained(start.base_path, num_labels=1,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
        if main:  # the held-out evaluation is rank 0's (no RNG drawn: the ranks stay in step)
            before = P.pairwise_eval(model, tokenizer, held_pairs, L, cfg.eval_batch_size)
            print(f"held-out before: accuracy {before['accuracy']}, mean margin {before['mean_margin']}")

        # 3. trainer
        steps_per_epoch = math.ceil(len(train_feats) / (cfg.train.batch_size * cfg.train.grad_accum))
        total_steps = cfg.train.max_steps or math.ceil(steps_per_epoch * cfg.train.epochs)
        has_val = bool(val_feats)
        args = TRLRewardConfig(**P.trainer_args(cfg.train, dplan, run_dir / "checkpoints", has_val, total_steps),
                               max_length=None,  # already fitted, prompt cut from the left
                               center_rewards_coefficient=cfg.center_rewards, disable_dropout=True,
                               remove_unused_columns=False)
        callbacks = [cb.MetricsJsonl(run_dir / "metrics.jsonl", extra=("accuracy", "margin", "mean_reward")),
                     cb.Progress(f"reward {run_id}")]
        if has_val and cfg.train.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(train_feats),
            eval_dataset=Dataset.from_list(val_feats) if has_val else None, processing_class=tokenizer,
            callbacks=callbacks,
            peft_config=P.adapter_config(cfg.method, cfg.lora, "SEQ_CLS") if cfg.method != "full" else None)
        trainer.remove_callback(PrinterCallback)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())

        resume_from = None
        if resume:
            resume_from = last_checkpoint(run_dir / "checkpoints")
            if resume_from is not None and main:
                cb.truncate_metrics(run_dir / "metrics.jsonl", int(resume_from.name.split("-")[-1]))
                print(f"resuming from {resume_from.name}")
        if resume_from is None and main:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        print(f"device: {dplan.why}; {trainable:,} trainable of {total:,} parameters; {total_steps} steps")
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if not main:  # saving and the held-out evaluation are rank 0's
            return worker_summary(run_id)

        # 4. save; held-out after, on the reloaded artifact
        out_dir = P.save_output(trainer.model, tokenizer, run_dir, cfg.method != "full")
        scorer, _ = P.load_reward_model(str(run_dir), ws)  # exactly the saved artifact, in fp32
        after = P.pairwise_eval(scorer.model, scorer.tokenizer, held_pairs, L, cfg.eval_batch_size)
        print(f"held-out after: accuracy {after['accuracy']}, mean margin {after['mean_margin']}")

        st = trainer.state
        rows = P.train_rows(st.log_history)
        summary = {
            "run_id": run_id, "status": "completed", "method": cfg.method, "base_model": cfg.model.name,
            "output": str(out_dir), "steps": st.global_step, "max_steps": st.max_steps,
            "best_step": (int(st.best_model_checkpoint.rsplit("-", 1)[-1]) if st.best_model_checkpoint
                          else st.global_step),
            "best_eval_loss": st.best_metric,
            "final_train_loss": rows[-1]["loss"] if rows else None,
            "heldout": {"set": held_name, "before": before, "after": after},
            "pairwise_accuracy_before": before["accuracy"], "pairwise_accuracy_after": after["accuracy"],
            "mean_margin_before": before["mean_margin"], "mean_margin_after": after["mean_margin"],
            "train_runtime_s": round(out.metrics.get("train_runtime", 0.0), 2),
            "trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "device": dplan.__dict__, "data": data_report, "wall_time_s": round(time.time() - started, 2),
            "world_size": world_size(), "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
        }
        write_json(run_dir / "summary.json", summary)
        catalog.update_run(run_id, status="completed", metrics={
            k: summary[k] for k in ("pairwise_accuracy_after", "pairwise_accuracy_before", "mean_margin_after",
                                    "final_train_loss", "best_eval_loss", "steps")})
        return summary
    except BaseException as e:
        if main:
            catalog.update_run(run_id, status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
