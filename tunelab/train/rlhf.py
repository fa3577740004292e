"""RLHF: online RL against a reward (a trained reward model, or a function) with a KL penalty to the
starting policy. GRPO (Shao et al. 2024) or RLOO (Ahmadian et al. 2024), LoRA or full.

    tunelab train examples/rlhf_grpo_tiny.yaml [--set beta=0.1] [--resume RUN_ID]

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

import math
import time
from typing import Literal

from pydantic import Field, model_validator

from tunelab import config as cfglib
from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.sections import LoraSection, ModelSection, PolicyEvalSection, PreferenceDataSection, TrainSection
from tunelab.workspace import Workspace, write_json


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


def run(cfg: RLHFConfig, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train; return the summary (also written to ``summary.json``)."""
    from tunelab.train import preference as P
    from tunelab.data.lineage import file_lineage as dataset_lineage
    from tunelab.train._run import last_checkpoint

    ws = workspace or Workspace.resolve()
    catalog = ws.catalog()
    if resume:
        run_dir = ws.run_dir(resume)
        run_id = run_dir.name
        cfg = cfglib.load(RLHFConfig, run_dir / "config.yaml")
    else:
        dataset_lineage(cfg.data)
        cfg = P.absolute_data(cfg)
        if cfg.reward_function and ".py:" in cfg.reward_function:
            path, _, fn = cfg.reward_function.rpartition(":")
            from pathlib import Path

            cfg = cfg.model_copy(update={"reward_function": f"{Path(path).resolve()}:{fn}"})
        run_id, run_dir = ws.new_run_dir("rlhf", cfg.name)
        (run_dir / "config.yaml").write_text(cfglib.dump(cfg), encoding="utf-8")
    started = time.time()

    import datasets
    import transformers
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from tunelab.train import callbacks as cb
    from tunelab.train.device import plan

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    start = P.resolve_start(cfg.model.name, ws)
    parent_id = parent_id or start.run_id
    try:
        # the reward first: a wrong id fails before any training work
        if cfg.reward_model:
            reward_fn, reward_info = P.load_reward_model(cfg.reward_model, ws)
        else:
            reward_fn, reward_info = P.load_reward_function(cfg.reward_function), {
                "reward_function": cfg.reward_function}
    except TunelabError:
        catalog.add_run(id=run_id, kind="rlhf", dir=run_dir, name=cfg.name, parent_id=parent_id, status="failed",
                        base_model=cfg.model.name, config=cfg.model_dump(mode="json"))
        raise
    lineage = {"run_id": run_id, "parent_id": parent_id, "base_model": cfg.model.name,
               "base_model_path": str(start.base_path), "start_adapter": str(start.adapter) if start.adapter else None,
               **reward_info, **dataset_lineage(cfg.data)}
    P.start_record(run_dir, lineage)
    if not resume:
        catalog.add_run(id=run_id, kind="rlhf", dir=run_dir, name=cfg.name, parent_id=parent_id,
                        base_model=cfg.model.name, dataset_id=lineage["dataset_id"], config=cfg.model_dump(mode="json"))
    else:
        catalog.update_run(run_id, status="running")

    try:
        # 1. tokenizer and prompts (cut from the left so prompt + completion fits max_length)
        tokenizer, _ = P.load_tokenizer(start)
        rejects: list[dict] = []
        load = (lambda path: P.load_prompts(path, tokenizer, rejects))
        prompts = P.load_prompts(cfg.data.train, tokenizer, rejects, cfg.data.limit)
        train_prompts, _, held, held_name = P.split_sets(prompts, cfg.data, cfg.train.seed, load)
        P.write_rejects(run_dir, rejects)
        if not train_prompts:
            raise TunelabError(f"no usable prompts in {cfg.data.train} ({len(rejects)} rejected; "
                               f"see {run_dir / 'rejects.jsonl'})")
        from tunelab.train.numerics import fit_prompt, n_special_tokens

        budget = cfg.data.max_length - cfg.max_new_tokens - n_special_tokens(tokenizer)
        fitted = [fit_prompt(tokenizer, p, budget) for p in train_prompts]
        train_prompts = [t for t, _ in fitted]
        cut = sum(c for _, c in fitted)
        held_prompts = P.judge_prompts(held, cfg.eval.prompts)
        data_report = {"train_prompts": len(train_prompts), "heldout_prompts": len(held_prompts),
                       "heldout_set": held_name, "rejected": len(rejects), "prompts_cut": cut}
        print(f"data: {len(train_prompts)} train prompts; held-out report on {len(held_prompts)} {held_name} "
              f"prompts; prompts cut from the left to leave {cfg.max_new_tokens} new tokens in "
              f"{cfg.data.max_length}: {cut}; rejected records: {len(rejects)}")

        # 2. policy (+ adapter); the trainer keeps the start as the KL reference
        dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
        transformers.set_seed(cfg.train.seed)
        model, peft_config = P.policy_for_training(start, cfg.method, cfg.lora)

        # 3. trainer
        n_gen = cfg.num_generations
        prompts_per_step = cfg.train.batch_size * cfg.train.grad_accum // n_gen
        total_steps = cfg.train.max_steps or math.ceil(len(train_prompts) * cfg.train.epochs / prompts_per_step)
        common = P.trainer_args(cfg.train, dplan, run_dir / "checkpoints", False, total_steps)
        common.update(remove_unused_columns=False)
        rl_args = dict(beta=cfg.beta, num_generations=n_gen, max_completion_length=cfg.max_new_tokens,
                       temperature=cfg.temperature, disable_dropout=True, log_completions=False)
        if cfg.algorithm == "grpo":
            from trl import GRPOConfig as ArgsCls, GRPOTrainer as TrainerCls
        else:
            from trl import RLOOConfig as ArgsCls, RLOOTrainer as TrainerCls
        args = ArgsCls(**common, **rl_args)
        callbacks = [cb.MetricsJsonl(run_dir / "metrics.jsonl", extra=("reward", "reward_std", "kl", "entropy",
                                                                       "completions/mean_length")),
                     cb.Progress(f"{cfg.algorithm} {run_id}")]
        trainer = TrainerCls(model=model, reward_funcs=[reward_fn], args=args,
                             train_dataset=Dataset.from_list([{"prompt": p} for p in train_prompts]),
                             processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config)
        trainer.remove_callback(PrinterCallback)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())

        resume_from = None
        if resume:
            resume_from = last_checkpoint(run_dir / "checkpoints")
            if resume_from is not None:
                cb.truncate_metrics(run_dir / "metrics.jsonl", int(resume_from.name.split("-")[-1]))
                print(f"resuming from {resume_from.name}")
        if resume_from is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        print(f"device: {dplan.why}; {cfg.algorithm}, beta {cfg.beta}, {n_gen} completions per prompt; "
              f"{trainable:,} trainable of {total:,} parameters; {total_steps} steps")
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

        # 4. save; held-out: start vs trained policy (reloaded from disk), judged by the reward (or a judge)
        out_dir = P.save_output(trainer.model, tokenizer, run_dir, cfg.method != "full")
        policy = P.load_trained(start, out_dir, cfg.method != "full")
        judge, judge_info = reward_fn, {"judge": "training reward"}
        if cfg.eval.reward_model:
            judge, info = P.load_reward_model(cfg.eval.reward_model, ws)
            judge_info = {"judge": cfg.eval.reward_model, **{f"judge_{k}": v for k, v in info.items()}}
        start_model = P.load_causal(start, device=P.eval_device())
        res = {}
        if held_prompts:
            res = P.evaluate_policy(policy, start_model, tokenizer, held_prompts, judge, samples=cfg.eval.samples,
                                    max_new_tokens=cfg.eval.max_new_tokens, max_length=cfg.data.max_length,
                                    batch_size=cfg.eval.batch_size, seed=cfg.train.seed)
            (run_dir / "eval").mkdir(exist_ok=True)
            P.write_rows(run_dir / "eval" / "generations.jsonl", res.pop("rows"))
            print(f"held-out: reward {res['reward_before']} -> {res['reward_after']}, win-rate over the start "
                  f"{res['win_rate']}, KL to the start {res['kl_to_reference']} nats")
        else:
            print("warning: no held-out prompts (set data.test or data.validation_split); no before/after report")

        st = trainer.state
        rows = P.train_rows(st.log_history)
        rewards = [r["reward"] for r in rows if "reward" in r]
        k = max(1, len(rewards) // 5)
        summary = {
            "run_id": run_id, "status": "completed", "algorithm": cfg.algorithm, "method": cfg.method,
            "beta": cfg.beta, "base_model": cfg.model.name, "parent_id": parent_id, "output": str(out_dir),
            "steps": st.global_step, "max_steps": st.max_steps,
            "final_train_loss": rows[-1]["loss"] if rows else None,
            "train_reward_first": round(sum(rewards[:k]) / k, 4) if rewards else None,
            "train_reward_last": round(sum(rewards[-k:]) / k, 4) if rewards else None,
            "train_kl_last": next((r["kl"] for r in reversed(rows) if "kl" in r), None),
            "heldout": {"set": held_name, **judge_info, **res},
            "reward_before": res.get("reward_before"), "reward_after": res.get("reward_after"),
            "win_rate": res.get("win_rate"), "kl_to_reference": res.get("kl_to_reference"),
            "reward": reward_info,
            "train_runtime_s": round(out.metrics.get("train_runtime", 0.0), 2),
            "trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "device": dplan.__dict__, "data": data_report, "wall_time_s": round(time.time() - started, 2),
        }
        write_json(run_dir / "summary.json", summary)
        catalog.update_run(run_id, status="completed", metrics={
            k: summary[k] for k in ("reward_after", "reward_before", "win_rate", "kl_to_reference", "steps")})
        return summary
    except BaseException as e:
        catalog.update_run(run_id, status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
