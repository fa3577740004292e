"""Direct preference optimization and its RL-free relatives (IPO, hinge, robust DPO), LoRA or full.

    tunelab train examples/dpo_hh_rlhf.yaml [--set loss=ipo] [--resume RUN_ID]

Top to bottom: resolve the starting policy (a model folder, a packaged name, or an SFT run id:
its adapter keeps training) → tokenizer → pairs (prompts cut from the left to fit) → held-out
log-probabilities of chosen and rejected under the start → TRL DPOTrainer with ``loss_type`` =
``loss`` (the reference is the starting policy) → the same held-out numbers under the trained
policy: log-prob preference accuracy, implicit-reward accuracy and margin β·[(log π/π_ref)(y_w) −
(log π/π_ref)(y_l)] (Rafailov et al. 2023) → optionally generations judged by a reward model →
save → summary.
"""

from __future__ import annotations

import contextlib
from typing import Literal

from pydantic import Field, model_validator

from tunelab.config import Strict
from tunelab.models import refs
from tunelab.sections import (LoraSection, ModelSection, PolicyEvalSection, PreferenceDataSection, TrainSection,
                              refuse_unread)
from tunelab.train import _run
from tunelab.train import preference as P
from tunelab.train._cpu_speed import Speedups
from tunelab.train.device import plan
from tunelab.train.distributed import world_size
from tunelab.train.shared_prompt import paired_trainer, shared_prompts
from tunelab.workspace import Workspace

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

    @model_validator(mode="after")
    def _unread(self):
        refuse_unread(self.train, "train", "dpo", P.UNREAD_TRAIN)
        return self


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
        wins = [1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in m]
        # the start is the reference: every implicit reward is 0, every pair a tie (accuracy 0.5, margin 0), so
        # the gain over the start is the accuracy − 0.5 and the margin itself, with intervals over held-out pairs
        acc_ci = P.mean_ci(wins)
        out.update({"implicit_reward_accuracy": mean(wins), "implicit_reward_accuracy_ci95": acc_ci,
                    "implicit_reward_accuracy_gain": round(sum(wins) / n - 0.5, 4),
                    "implicit_reward_accuracy_gain_ci95": [None if v is None else round(v - 0.5, 4) for v in acc_ci],
                    "implicit_reward_margin": round(beta * sum(m) / n, 4),
                    "implicit_reward_margin_ci95": P.mean_ci([beta * x for x in m]),
                    "chosen_logratio": mean(dc), "rejected_logratio": mean(dr)})
    return out


@contextlib.contextmanager
def compact_fused_head(on: bool = True):
    """TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, which DPOTrainer puts on the policy and the
    reference) projects only the positions with a label (the completion tokens) on CUDA/XPU, and every position
    elsewhere, so that compiled tile shapes stay fixed on devices like Neuron. On a CPU nothing is compiled:
    this lets it take the compact path there too. Same per-token log-probabilities (tests/unit/test_recipe_speed.py);
    the prompt tokens, most of an hh-rlhf pair, no longer go through the vocabulary-wide head."""
    if not on:
        yield
        return
    import trl.trainer.utils as tu

    before = tu._use_triton
    tu._use_triton = lambda device: True  # "compact" in _fused_forward; the kernels pick torch tiles on CPU
    try:
        yield
    finally:
        tu._use_triton = before


def run(cfg: DPOConfig | None, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train; return the summary (also written to ``summary.json``)."""
    return _run.execute("dpo", cfg, _steps, DPOConfig, workspace, resume, parent_id)


def _steps(r: _run.Run) -> dict:
    import transformers
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    cfg, start, data_lineage = P.prepare(r)  # a missing file or a bad model name fails before a run folder
    P.begin(r, cfg, start, {**data_lineage, **({"judge_reward_model": cfg.eval.reward_model}
                                               if cfg.eval.reward_model else {})})

    # 1. tokenizer and pairs (prompts cut from the left to fit)
    tokenizer, template_added = refs.load_tokenizer(start)
    chat = P.chat_choice(cfg.data.chat_template, template_added)  # hh-rlhf transcripts: chat turns or raw text
    train_pairs, val_pairs, held_pairs, data_report = P.pair_sets(r, cfg, tokenizer, P.fit_pairs, "prompts_cut",
                                                                  chat)
    L, held_name = cfg.data.max_length, data_report["heldout_set"]

    # 2. the starting policy, and its held-out log-probabilities (it is also the reference)
    dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
    transformers.set_seed(cfg.train.seed)
    ref_model = refs.load(start, device=refs.eval_device())
    if r.main:  # the held-out evaluation is rank 0's (no RNG drawn: the ranks stay in step)
        ref_c, ref_r = P.pair_logps(ref_model, tokenizer, held_pairs, L, desc="held-out before",
                                    check=r.stop_check("held-out evaluation before training"))
        before = heldout_preferences(ref_c, ref_r)
        print(f"held-out before: log-prob preference accuracy {before.get('logp_accuracy')}")
    model, peft_config = P.policy_for_training(start, cfg)

    # 3. trainer
    total_steps = _run.steps_total(len(train_pairs), cfg.train)
    has_val = bool(val_pairs)
    args = _run.training_args(cfg.train, dplan, r.checkpoints, has_val=has_val, total_steps=total_steps,
                              cls=TRLDPOConfig, loss_type=[cfg.loss], beta=cfg.beta,
                              label_smoothing=cfg.label_smoothing, max_length=L, disable_dropout=True)
    # full fine-tuning from a folder: the start model already loaded is the reference (no third copy)
    trl_ref = ref_model if peft_config is None and start.adapter is None else None
    # its loss and reference log-probs run inside paired_batches(): the shared prompt forward reads [chosen; rejected]
    trainer = paired_trainer(DPOTrainer, "_compute_loss", "compute_ref_log_probs")(
                         model=model, ref_model=trl_ref, args=args, train_dataset=Dataset.from_list(train_pairs),
                         eval_dataset=Dataset.from_list(val_pairs) if has_val else None, processing_class=tokenizer,
                         callbacks=r.callbacks(extra=("rewards/margins", "rewards/accuracies", "rewards/chosen",
                                                      "rewards/rejected", "logps/chosen", "logps/rejected"),
                                               patience=cfg.train.early_stopping_patience if has_val else None),
                         peft_config=peft_config)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(f"device: {dplan.why}; loss {cfg.loss}, beta {cfg.beta}; {trainable:,} trainable of {total:,} "
          f"parameters; {total_steps} steps")
    # the shared speed-ups on the policy (its LoRA base is also the reference: a bf16 base serves both forwards)
    speed = Speedups(dplan, cfg.method, cfg.train.speedups).apply(trainer.model, r.dir)
    compact = speed.note("fused response-only loss", speed.on and dplan.device == "cpu",
                         "TRL's fused LM head projects only the completion positions of chosen and rejected, in "
                         "the policy and the reference forward (TRL does so on CUDA only)" if speed.on and
                         dplan.device == "cpu" else "off (train.speedups: off)" if not speed.on else
                         "TRL's fused LM head already projects only the completion positions on this device")
    r.speedups = speed
    refs_apart = [trainer.ref_model] if trainer.ref_model is not None else []  # full: a second model
    try:
        with compact_fused_head(compact), shared_prompts(speed, trainer.model, *refs_apart):
            print(speed.line())
            out = r.train(trainer)
    finally:
        speed.restore()
    if not r.main:  # saving and the held-out evaluation are rank 0's
        return r.worker_summary()

    # 4. save; held-out after (the start model is the reference), optional reward-model judgement
    adapter = cfg.method != "full"
    out_dir = _run.save_output(trainer.model, tokenizer, r.dir, adapter=adapter, selected_adapters=["default"])
    policy = P.load_trained(start, out_dir, adapter)  # exactly the saved artifact, in fp32
    after_check = r.stop_check("held-out evaluation after training", trainer.state.global_step)
    pc, pr = P.pair_logps(policy, tokenizer, held_pairs, L, desc="held-out after", check=after_check)
    after = heldout_preferences(pc, pr, ref_c, ref_r, cfg.beta)
    print(f"held-out after (n={after.get('pairs')}): log-prob preference accuracy {after.get('logp_accuracy')}, "
          f"implicit reward accuracy {after.get('implicit_reward_accuracy')} (95% CI "
          f"{after.get('implicit_reward_accuracy_ci95')}; the start ties every pair: 0.5), margin "
          f"{after.get('implicit_reward_margin')} (95% CI {after.get('implicit_reward_margin_ci95')}; start 0)")
    judged = None
    if cfg.eval.reward_model:
        scorer, info = P.load_reward_model(cfg.eval.reward_model, r.ws)
        P.warn_if_reward_reads_otherwise(info, chat)
        judged = P.judge_policy(r.dir, policy, ref_model, tokenizer, P.judge_prompts(held_pairs, cfg.eval.prompts),
                                scorer, cfg.eval, max_length=L, seed=cfg.train.seed, check=after_check)
        judged.update(info)
        print(f"reward-model judge: reward {judged['reward_before']} -> {judged['reward_after']}, win-rate "
              f"{judged['win_rate']}, KL to start {judged['kl_to_reference']}")

    st = trainer.state
    rows = _run.train_rows(st.log_history)
    return r.finish({
        "method": cfg.method, "loss": cfg.loss, "beta": cfg.beta,
        "base_model": cfg.model.name, "parent_id": r.parent_id, "output": str(out_dir),
        "steps": st.global_step, "max_steps": st.max_steps, "best_step": _run.best_step(st),
        "best_eval_loss": st.best_metric, "final_train_loss": rows[-1]["loss"] if rows else None,
        "heldout": {"set": held_name, "before": before, "after": after},
        "logp_accuracy_before": before.get("logp_accuracy"), "logp_accuracy_after": after.get("logp_accuracy"),
        "implicit_reward_accuracy": after.get("implicit_reward_accuracy"),
        "implicit_reward_margin": after.get("implicit_reward_margin"),
        "judge": judged,
        **({k: judged[k] for k in ("reward_before", "reward_after", "win_rate", "kl_to_reference")} if judged else {}),
        "train_runtime_s": round(out.metrics.get("train_runtime", 0.0), 2),
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "device": dplan.__dict__, "data": data_report,
        "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
    }, catalog_metrics=("implicit_reward_accuracy", "implicit_reward_margin", "logp_accuracy_after", "win_rate",
                        "final_train_loss", "steps"))
