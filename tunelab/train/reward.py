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

from typing import Literal

from pydantic import Field, model_validator

from tunelab.config import Strict
from tunelab.models import refs
from tunelab.sections import LoraSection, ModelSection, PreferenceDataSection, TrainSection, refuse_unread
from tunelab.train import _run
from tunelab.train import preference as P
from tunelab.train._cpu_speed import Speedups
from tunelab.train.device import plan
from tunelab.train.distributed import world_size
from tunelab.train.numerics import encode_prompt_responses
from tunelab.train.peft import peft_config, peft_section
from tunelab.train.shared_prompt import paired_trainer, shared_prompts
from tunelab.workspace import Workspace


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

    @model_validator(mode="after")
    def _unread(self):
        refuse_unread(self.train, "train", "reward", P.UNREAD_TRAIN)
        return self


def _features(tokenizer, pairs: list[dict], max_length: int) -> tuple[list[dict], int]:
    feats, truncated = [], 0
    for p in pairs:
        (c, r), cut = encode_prompt_responses(tokenizer, p["prompt"], [p["chosen"], p["rejected"]], max_length)
        truncated += int(cut)
        if c == r:
            continue  # identical after truncation: no signal
        feats.append({"chosen_ids": c, "rejected_ids": r})
    return feats, truncated


def run(cfg: RewardConfig | None, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train a reward model; return the summary (also written to ``summary.json``)."""
    return _run.execute("reward", cfg, _steps, RewardConfig, workspace, resume, parent_id)


def _steps(r: _run.Run) -> dict:
    import transformers
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    cfg, start, data_lineage = P.prepare(r)  # a missing file or a bad model name fails before a run folder
    P.begin(r, cfg, start, data_lineage)

    # 1. tokenizer and pairs (prompts cut from the left to fit), tokenized
    tokenizer, template_added = refs.load_tokenizer(start)
    chat = P.chat_choice(cfg.data.chat_template, template_added)  # hh-rlhf transcripts: chat turns or raw text
    train_feats, val_feats, held_pairs, data_report = P.pair_sets(r, cfg, tokenizer, _features, "truncated_pairs",
                                                                  chat)
    L, held_name = cfg.data.max_length, data_report["heldout_set"]

    # 2. model: a scalar head on the decoder (its random init is fixed by the seed)
    dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
    transformers.set_seed(cfg.train.seed)
    model = refs.load(start, task="seq_cls", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    if r.main:  # the held-out evaluation is rank 0's (no RNG drawn: the ranks stay in step)
        before = P.pairwise_eval(model, tokenizer, held_pairs, L, cfg.eval_batch_size, desc="held-out before",
                                 check=r.stop_check("held-out evaluation before training"))
        print(f"held-out before: accuracy {before['accuracy']} (95% CI {before['accuracy_ci95']}, "
              f"n={before['pairs']}), mean margin {before['mean_margin']}")

    # 3. trainer
    total_steps = _run.steps_total(len(train_feats), cfg.train)
    has_val = bool(val_feats)
    args = _run.training_args(cfg.train, dplan, r.checkpoints, has_val=has_val, total_steps=total_steps,
                              cls=TRLRewardConfig, max_length=None,  # already fitted, prompt cut from the left
                              center_rewards_coefficient=cfg.center_rewards, disable_dropout=True,
                              remove_unused_columns=False)
    # its loss runs inside paired_batches(): the shared prompt forward reads the batch as [chosen; rejected]
    trainer = paired_trainer(RewardTrainer, "compute_loss")(
        model=model, args=args, train_dataset=Dataset.from_list(train_feats),
        eval_dataset=Dataset.from_list(val_feats) if has_val else None, processing_class=tokenizer,
        callbacks=r.callbacks(extra=("accuracy", "margin", "mean_reward"),
                              patience=cfg.train.early_stopping_patience if has_val else None),
        peft_config=peft_config(peft_section(cfg), "SEQ_CLS", model=model)
        if cfg.method != "full" else None)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(f"device: {dplan.why}; {trainable:,} trainable of {total:,} parameters; {total_steps} steps")
    speed = Speedups(dplan, cfg.method, cfg.train.speedups).apply(trainer.model, r.dir)
    speed.note("fused response-only loss", False, "does not apply: the reward is a scalar head read at the last "
                                                  "token, there are no vocabulary-wide logits to skip")
    r.speedups = speed
    try:
        with shared_prompts(speed, trainer.model):
            print(speed.line())
            out = r.train(trainer)
    finally:
        speed.restore()
    if not r.main:  # saving and the held-out evaluation are rank 0's
        return r.worker_summary()

    # 4. save; held-out after, on the reloaded artifact
    out_dir = _run.save_output(trainer.model, tokenizer, r.dir, adapter=cfg.method != "full",
                               selected_adapters=["default"])
    scorer, _ = P.load_reward_model(str(r.dir), r.ws)  # exactly the saved artifact, in fp32
    after = P.pairwise_eval(scorer.model, scorer.tokenizer, held_pairs, L, cfg.eval_batch_size, desc="held-out after",
                            check=r.stop_check("held-out evaluation after training", trainer.state.global_step))
    gain = P.paired_gain(before.pop("wins"), after.pop("wins")) if before["pairs"] else None
    print(f"held-out after: accuracy {after['accuracy']} (95% CI {after['accuracy_ci95']}, n={after['pairs']}), "
          f"mean margin {after['mean_margin']}; gain over the untrained head {gain and gain['difference']} "
          f"(paired 95% CI [{gain and gain['ci_low']}, {gain and gain['ci_high']}])")

    st = trainer.state
    rows = _run.train_rows(st.log_history)
    return r.finish({
        "method": cfg.method, "base_model": cfg.model.name,
        "output": str(out_dir), "steps": st.global_step, "max_steps": st.max_steps,
        "best_step": _run.best_step(st),
        "best_eval_loss": st.best_metric,
        "final_train_loss": rows[-1]["loss"] if rows else None,
        "heldout": {"set": held_name, "before": before, "after": after, "accuracy_gain": gain},
        "pairwise_accuracy_ci95": after["accuracy_ci95"],
        "pairwise_accuracy_before": before["accuracy"], "pairwise_accuracy_after": after["accuracy"],
        "mean_margin_before": before["mean_margin"], "mean_margin_after": after["mean_margin"],
        "train_runtime_s": round(out.metrics.get("train_runtime", 0.0), 2),
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "device": dplan.__dict__, "data": data_report,
        "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
    }, catalog_metrics=("pairwise_accuracy_after", "pairwise_accuracy_before", "mean_margin_after",
                        "final_train_loss", "best_eval_loss", "steps"))
