"""Direct preference optimization and its RL-free relatives (IPO, hinge, robust DPO), LoRA or full.

    tunelab train examples/dpo_lora_hh_rlhf.yaml [--set loss=ipo] [--resume RUN_ID]

Top to bottom: resolve the starting policy (a model folder, a packaged name, or an SFT run id:
its adapter keeps training) → tokenizer → pairs (prompts cut from the left to fit) → held-out
log-probabilities of chosen and rejected under the start → TRL DPOTrainer with ``loss_type`` =
``loss`` (the reference is the starting policy) → the same held-out numbers under the trained
policy: log-prob preference accuracy, implicit-reward accuracy and margin β·[(log π/π_ref)(y_w) −
(log π/π_ref)(y_l)] (Rafailov et al. 2023) → optionally generations judged by a reward model →
save → summary.
"""

from __future__ import annotations

import math
import time
from typing import Literal

from pydantic import Field

from tunelab import config as cfglib
from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.sections import LoraSection, ModelSection, PolicyEvalSection, PreferenceDataSection, TrainSection
from tunelab.workspace import Workspace, write_json

LOSSES = ("sigmoid", "ipo", "hinge", "robust")  # TRL DPOTrainer loss_type values offered here


class DPOConfig(Strict):
    """Recipe for DPO / IPO on preference pairs."""

    recipe: Literal["dpo"] = "dpo"
    name: str | None = Field(None, description="a short name used in the run id")
    model: ModelSection = Field(description="starting policy: packaged name, folder, hub id or an SFT run id")
    data: PreferenceDataSection
    method: Literal["lora", "dora", "rslora", "full"] = Field("lora", description="a LoRA-family adapter "
                                                                     "(tunelab/train/peft.py) or full")
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: IPO (Azar et al. 2023); hinge: SLiC; robust: noisy-label DPO")
    beta: float = Field(0.1, gt=0, description="strength of the pull to the reference (IPO: its tau)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="robust: assumed share of flipped labels")
    eval: PolicyEvalSection = PolicyEvalSection()


def heldout_preferences(lc: list[float], lr: list[float], ref_c: list[float] | None = None,
                        ref_r: list[float] | None = None, beta: float = 0.1) -> dict:
    """Held-out numbers from per-pair log-probabilities (policy, and the reference when given)."""
    n = len(lc)
    if not n:
        return {"pairs": 0}
    mean = (lambda xs: round(sum(xs) / len(xs), 4))
    out = {"pairs": n, "logp_accuracy": mean([1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(lc, lr)]),
           "mean_logp_chosen": mean(lc), "mean_logp_rejected": mean(lr)}
    if ref_c is not None:
        dc = [a - b for a, b in zip(lc, ref_c)]
        dr = [a - b for a, b in zip(lr, ref_r)]
        m = [c - r for c, r in zip(dc, dr)]
        out.update({"implicit_reward_accuracy": mean([1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in m]),
                    "implicit_reward_margin": round(beta * sum(m) / n, 4),
                    "chosen_logratio": mean(dc), "rejected_logratio": mean(dr)})
    return out


def run(cfg: DPOConfig, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train; return the summary (also written to ``summary.json``)."""
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
        cfg = cfglib.load(DPOConfig, run_dir / "config.yaml")
    else:
        dataset_lineage(cfg.data)
        cfg = P.absolute_data(cfg)
        run_id, run_dir = ws.new_run_dir("dpo", cfg.name)
        if main:
            (run_dir / "config.yaml").write_text(cfglib.dump(cfg), encoding="utf-8")
    started = time.time()

    import datasets
    import transformers
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    from tunelab.train import callbacks as cb
    from tunelab.train.device import plan

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    start = P.resolve_start(cfg.model.name, ws)
    parent_id = parent_id or start.run_id
    lineage = {"run_id": run_id, "parent_id": parent_id, "base_model": cfg.model.name,
               "base_model_path": str(start.base_path), "start_adapter": str(start.adapter) if start.adapter else None,
               **dataset_lineage(cfg.data)}
    if cfg.eval.reward_model:
        lineage["judge_reward_model"] = cfg.eval.reward_model
    if main:
        P.start_record(run_dir, lineage)
    if main and not resume:
        catalog.add_run(id=run_id, kind="dpo", dir=run_dir, name=cfg.name, parent_id=parent_id,
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
        train_pairs, tr_cut = P.fit_pairs(tokenizer, train_pairs, L)
        val_pairs, va_cut = P.fit_pairs(tokenizer, val_pairs, L)
        if not train_pairs:
            raise TunelabError(f"no usable preference pairs in {cfg.data.train} ({len(rejects)} rejected; "
                               f"see {run_dir / 'rejects.jsonl'})")
        data_report = {"train_pairs": len(train_pairs), "validation_pairs": len(val_pairs),
                       "heldout_pairs": len(held_pairs), "heldout_set": held_name, "rejected": len(rejects),
                       "prompts_cut": tr_cut + va_cut}
        print(f"data: {len(train_pairs)} train / {len(val_pairs)} validation pairs; held-out report on "
              f"{len(held_pairs)} {held_name} pairs; prompts cut from the left to fit {L} tokens: "
              f"{tr_cut + va_cut}; rejected records: {len(rejects)}")

        # 2. the starting policy, and its held-out log-probabilities (it is also the reference)
        dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
        transformers.set_seed(cfg.train.seed)
        ref_model = P.load_causal(start, device=P.eval_device())
        if main:  # the held-out evaluation is rank 0's (no RNG drawn: the ranks stay in step)
            ref_c, ref_r = P.pair_logps(ref_model, tokenizer, held_pairs, L)
            before = heldout_preferences(ref_c, ref_r)
            print(f"held-out before: log-prob preference accuracy {before.get('logp_accuracy')}")
        model, peft_config = P.policy_for_training(start, cfg.method, cfg.lora)

        # 3. trainer
        steps_per_epoch = math.ceil(len(train_pairs) / (cfg.train.batch_size * cfg.train.grad_accum))
        total_steps = cfg.train.max_steps or math.ceil(steps_per_epoch * cfg.train.epochs)
        has_val = bool(val_pairs)
        args = TRLDPOConfig(**P.trainer_args(cfg.train, dplan, run_dir / "checkpoints", has_val, total_steps),
                            loss_type=[cfg.loss], beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                            max_length=L, disable_dropout=True)
        callbacks = [cb.MetricsJsonl(run_dir / "metrics.jsonl", extra=(
            "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected")), cb.Progress(f"dpo {run_id}")]
        if has_val and cfg.train.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
        # full fine-tuning from a folder: the start model already loaded is the reference (no third copy)
        trl_ref = ref_model if peft_config is None and start.adapter is None else None
        trainer = DPOTrainer(model=model, ref_model=trl_ref, args=args, train_dataset=Dataset.from_list(train_pairs),
                             eval_dataset=Dataset.from_list(val_pairs) if has_val else None,
                             processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config)
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
        print(f"device: {dplan.why}; loss {cfg.loss}, beta {cfg.beta}; {trainable:,} trainable of {total:,} "
              f"parameters; {total_steps} steps")
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if not main:  # saving and the held-out evaluation are rank 0's
            return worker_summary(run_id)

        # 4. save; held-out after (the start model is the reference), optional reward-model judgement
        out_dir = P.save_output(trainer.model, tokenizer, run_dir, cfg.method != "full")
        policy = P.load_trained(start, out_dir, cfg.method != "full")  # exactly the saved artifact, in fp32
        pc, pr = P.pair_logps(policy, tokenizer, held_pairs, L)
        after = heldout_preferences(pc, pr, ref_c, ref_r, cfg.beta)
        print(f"held-out after: log-prob preference accuracy {after.get('logp_accuracy')}, implicit reward "
              f"accuracy {after.get('implicit_reward_accuracy')}, margin {after.get('implicit_reward_margin')}")
        judged = None
        if cfg.eval.reward_model:
            scorer, info = P.load_reward_model(cfg.eval.reward_model, ws)
            prompts = P.judge_prompts(held_pairs, cfg.eval.prompts)
            judged = P.evaluate_policy(policy, ref_model, tokenizer, prompts, scorer, samples=cfg.eval.samples,
                                       max_new_tokens=cfg.eval.max_new_tokens, max_length=L,
                                       batch_size=cfg.eval.batch_size, seed=cfg.train.seed)
            (run_dir / "eval").mkdir(exist_ok=True)
            P.write_rows(run_dir / "eval" / "generations.jsonl", judged.pop("rows"))
            judged.update(info)
            print(f"reward-model judge: reward {judged['reward_before']} -> {judged['reward_after']}, win-rate "
                  f"{judged['win_rate']}, KL to start {judged['kl_to_reference']}")

        st = trainer.state
        rows = P.train_rows(st.log_history)
        summary = {
            "run_id": run_id, "status": "completed", "method": cfg.method, "loss": cfg.loss, "beta": cfg.beta,
            "base_model": cfg.model.name, "parent_id": parent_id, "output": str(out_dir),
            "steps": st.global_step, "max_steps": st.max_steps,
            "best_step": (int(st.best_model_checkpoint.rsplit("-", 1)[-1]) if st.best_model_checkpoint
                          else st.global_step),
            "best_eval_loss": st.best_metric, "final_train_loss": rows[-1]["loss"] if rows else None,
            "heldout": {"set": held_name, "before": before, "after": after},
            "logp_accuracy_before": before.get("logp_accuracy"), "logp_accuracy_after": after.get("logp_accuracy"),
            "implicit_reward_accuracy": after.get("implicit_reward_accuracy"),
            "implicit_reward_margin": after.get("implicit_reward_margin"),
            "judge": judged,
            "train_runtime_s": round(out.metrics.get("train_runtime", 0.0), 2),
            "trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "device": dplan.__dict__, "data": data_report, "wall_time_s": round(time.time() - started, 2),
            "world_size": world_size(), "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
        }
        if judged:
            summary.update({k: judged[k] for k in ("reward_before", "reward_after", "win_rate", "kl_to_reference")})
        write_json(run_dir / "summary.json", summary)
        catalog.update_run(run_id, status="completed", metrics={
            k: summary.get(k) for k in ("implicit_reward_accuracy", "implicit_reward_margin", "logp_accuracy_after",
                                        "win_rate", "final_train_loss", "steps")})
        return summary
    except BaseException as e:
        if main:
            catalog.update_run(run_id, status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
