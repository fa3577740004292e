"""RLHF: online RL against a reward (a trained reward model, or a function) with a KL penalty to the
starting policy. GRPO (Shao et al. 2024) or RLOO (Ahmadian et al. 2024), LoRA or full.

    tunelab train examples/rlhf_grpo_function.yaml [--set beta=0.1] [--resume RUN_ID]

Top to bottom: resolve the starting policy (a model folder, a packaged name, or an SFT run id:
its adapter keeps training) and the reward (``reward_model``: a reward run id or a
sequence-classification folder; or ``reward_function: module:function``) → prompts (from
preference pairs or instruction/chat records; cut from the left to leave room for the answer) →
TRL GRPOTrainer / RLOOTrainer, ``beta`` > 0 so the loss carries β·KL(π‖π_ref), π_ref = the start
→ on held-out prompts, the start and the trained policy each sample completions: mean reward
before/after, win-rate of the policy over the start (judged by the reward, or by ``eval.reward_model``),
and KL(π‖π_start) estimated on the policy's own samples → save → summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.sections import (LoraSection, ModelSection, PolicyEvalSection, PreferenceDataSection, TrainSection,
                              refuse_unread)
from tunelab.train import _run
from tunelab.train import preference as P
from tunelab.train.device import plan
from tunelab.train.numerics import fit_prompt, n_special_tokens
from tunelab.workspace import Workspace


class RLHFConfig(Strict):
    """Recipe for online RL with a KL penalty to the starting policy."""

    recipe: Literal["rlhf"] = "rlhf"
    name: str | None = Field(None, description="a short name used in the run id")
    model: ModelSection = Field(description="starting policy: packaged name, folder, hub id or an SFT run id")
    data: PreferenceDataSection = Field(description="prompts: preference pairs, instruction/chat records, "
                                                    "or records with a 'prompt' field")
    algorithm: Literal["grpo", "rloo"] = "grpo"
    reward_model: str | None = Field(None, description="reward run id (recipe: reward) or a reward model folder")
    reward_function: str | None = Field(None, description="'module:function' or 'file.py:function' returning one "
                                                          "float per completion: fn(prompts, completions, **kw)")
    beta: float = Field(0.05, gt=0, description="KL penalty to the starting policy")
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt (the group)")
    max_new_tokens: int = Field(48, ge=1, description="completion length during training")
    temperature: float = Field(1.0, gt=0)
    method: Literal["lora", "dora", "rslora", "full"] = Field("lora", description="a LoRA-family adapter "
                                                                     "(tunelab/train/peft.py) or full")
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    eval: PolicyEvalSection = PolicyEvalSection()

    @model_validator(mode="after")
    def _one_reward_and_groups(self):
        # no validation pass in RL here (held-out prompts are judged after training): nothing to stop early on
        # train.speedups: GRPO/RLOO generate and score with TRL's own fused head; the speed-up layer is not wired in
        refuse_unread(self.train, "train", "rlhf", P.UNREAD_TRAIN + ("early_stopping_patience", "speedups"))
        problems = []
        if bool(self.reward_model) == bool(self.reward_function):
            problems.append("give exactly one of reward_model (a reward run id or folder) or reward_function "
                            "(module:function)")
        if (self.train.batch_size * self.train.grad_accum) % self.num_generations:
            problems.append(f"train.batch_size × train.grad_accum ({self.train.batch_size * self.train.grad_accum}) "
                            f"must be a multiple of num_generations ({self.num_generations}): each prompt's group "
                            "of completions is compared within one batch")
        if self.max_new_tokens >= self.data.max_length:
            problems.append(f"max_new_tokens ({self.max_new_tokens}) must be below data.max_length "
                            f"({self.data.max_length}), which also holds the prompt")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def run(cfg: RLHFConfig | None, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train; return the summary (also written to ``summary.json``)."""
    return _run.execute("rlhf", cfg, _steps, RLHFConfig, workspace, resume, parent_id)


def _steps(r: _run.Run) -> dict:
    import transformers
    from datasets import Dataset

    cfg, start, data_lineage = P.prepare(r)  # a missing file or a bad model name fails before a run folder
    if cfg.reward_function and ".py:" in cfg.reward_function:  # a file: stored absolute, like the data
        path, _, fn = cfg.reward_function.rpartition(":")
        cfg = cfg.model_copy(update={"reward_function": f"{Path(path).resolve()}:{fn}"})
    # the reward next: a wrong id fails before a run folder is made too
    if cfg.reward_model:
        reward_fn, reward_info = P.load_reward_model(cfg.reward_model, r.ws)
    else:
        reward_fn, reward_info = P.load_reward_function(cfg.reward_function), {"reward_function": cfg.reward_function}
    P.begin(r, cfg, start, {**reward_info, **data_lineage})

    # 1. tokenizer and prompts (cut from the left so prompt + completion fits max_length)
    tokenizer, template_added = refs.load_tokenizer(start)
    chat = P.chat_choice(cfg.data.chat_template, template_added)  # hh-rlhf transcripts: chat turns or raw text
    P.warn_if_reward_reads_otherwise(reward_info, chat)
    rejects: list[dict] = []
    train_prompts, _, held, held_name = P.prompt_sets(cfg, tokenizer, rejects, chat)
    r.write_rejects(rejects)
    if not train_prompts:
        raise TunelabError(f"no usable prompts in {cfg.data.train} ({len(rejects)} rejected; "
                           f"see {r.dir / 'rejects.jsonl'})")
    budget = cfg.data.max_length - cfg.max_new_tokens - n_special_tokens(tokenizer)
    held_prompts = P.judge_prompts(held, cfg.eval.prompts)
    n_hh = P.count_hh(train_prompts + held_prompts)
    fitted = [fit_prompt(tokenizer, p, budget) for p in train_prompts]  # a chat prompt loses whole turns
    train_prompts = [str(t) for t, _ in fitted]
    cut = sum(c for _, c in fitted)
    data_report = {"train_prompts": len(train_prompts), "heldout_prompts": len(held_prompts),
                   "heldout_set": held_name, "rejected": len(rejects), "prompts_cut": cut,
                   "hh_transcripts": n_hh, "chat_template": chat.label}
    print(f"data: {len(train_prompts)} train prompts; held-out report on {len(held_prompts)} {held_name} "
          f"prompts; prompts cut from the left to leave {cfg.max_new_tokens} new tokens in "
          f"{cfg.data.max_length}: {cut}; rejected records: {len(rejects)}; hh-rlhf transcripts: {n_hh}, "
          f"as {chat.label}")

    # 2. policy (+ adapter); the trainer keeps the start as the KL reference
    dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
    transformers.set_seed(cfg.train.seed)
    model, peft_config = P.policy_for_training(start, cfg)

    # 3. trainer: one step takes batch_size × grad_accum completions, num_generations per prompt
    n_gen = cfg.num_generations
    total_steps = _run.steps_total(len(train_prompts) * n_gen, cfg.train)
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig as ArgsCls, GRPOTrainer as TrainerCls
    else:
        from trl import RLOOConfig as ArgsCls, RLOOTrainer as TrainerCls
    args = _run.training_args(cfg.train, dplan, r.checkpoints, has_val=False, total_steps=total_steps, cls=ArgsCls,
                              remove_unused_columns=False, beta=cfg.beta, num_generations=n_gen,
                              max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
                              disable_dropout=True, log_completions=False)
    trainer = TrainerCls(model=model, reward_funcs=[reward_fn], args=args,
                         train_dataset=Dataset.from_list([{"prompt": p} for p in train_prompts]),
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=r.callbacks(f"{cfg.algorithm} {r.id}", extra=(
                             "reward", "reward_std", "kl", "entropy", "completions/mean_length")))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(f"device: {dplan.why}; {cfg.algorithm}, beta {cfg.beta}, {n_gen} completions per prompt; "
          f"{trainable:,} trainable of {total:,} parameters; {total_steps} steps")
    out = r.train(trainer)

    # 4. save; held-out: start vs trained policy (reloaded from disk), judged by the reward (or a judge)
    adapter = cfg.method != "full"
    out_dir = _run.save_output(trainer.model, tokenizer, r.dir, adapter=adapter, selected_adapters=["default"])
    policy = P.load_trained(start, out_dir, adapter)
    judge, judge_info = reward_fn, {"judge": "training reward"}
    if cfg.eval.reward_model:
        judge, info = P.load_reward_model(cfg.eval.reward_model, r.ws)
        P.warn_if_reward_reads_otherwise(info, chat)
        judge_info = {"judge": cfg.eval.reward_model, **{f"judge_{k}": v for k, v in info.items()}}
    res = {}
    if held_prompts:
        start_model = refs.load(start, device=refs.eval_device())
        res = P.judge_policy(r.dir, policy, start_model, tokenizer, held_prompts, judge, cfg.eval,
                             max_length=cfg.data.max_length, seed=cfg.train.seed,
                             check=r.stop_check("held-out evaluation after training", trainer.state.global_step))
        print(f"held-out: reward {res['reward_before']} -> {res['reward_after']}, win-rate over the start "
              f"{res['win_rate']}, KL to the start {res['kl_to_reference']} nats")
    else:
        print("warning: no held-out prompts (set data.test or data.validation_split); no before/after report")

    st = trainer.state
    rows = _run.train_rows(st.log_history)
    rewards = [x["reward"] for x in rows if "reward" in x]
    k = max(1, len(rewards) // 5)
    return r.finish({
        "algorithm": cfg.algorithm, "method": cfg.method,
        "beta": cfg.beta, "base_model": cfg.model.name, "parent_id": r.parent_id, "output": str(out_dir),
        "steps": st.global_step, "max_steps": st.max_steps,
        "final_train_loss": rows[-1]["loss"] if rows else None,
        "train_reward_first": round(sum(rewards[:k]) / k, 4) if rewards else None,
        "train_reward_last": round(sum(rewards[-k:]) / k, 4) if rewards else None,
        "train_kl_last": next((x["kl"] for x in reversed(rows) if "kl" in x), None),
        "heldout": {"set": held_name, **judge_info, **res},
        "reward_before": res.get("reward_before"), "reward_after": res.get("reward_after"),
        "win_rate": res.get("win_rate"), "kl_to_reference": res.get("kl_to_reference"),
        "reward": reward_info,
        "train_runtime_s": round(out.metrics.get("train_runtime", 0.0), 2),
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "device": dplan.__dict__, "data": data_report,
    }, catalog_metrics=("reward_after", "reward_before", "win_rate", "kl_to_reference", "steps"))
