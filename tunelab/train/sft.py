"""Instruction tuning (SFT): a PEFT adapter or full fine-tuning of a causal LM on chat/instruction records.

    tunelab train examples/sft_lora_support.yaml [--set method=dora] [--set train.epochs=2] [--resume RUN_ID]

``method``: lora | dora | rslora | qlora | prompt_tuning | prefix_tuning | p_tuning | ia3 | full
(tunelab/train/peft.py; each reads its own section: ``lora:``, ``prompt:``, ``ia3:``, ``qlora:``).

Top to bottom: resolve the model → tokenizer (+ chat template) → data (masked labels,
truncation counted) → model (+ adapter) → transformers Trainer with validation, early
stopping and checkpoints → save the best adapter/model with the tokenizer → summary.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunelab.config import Strict
from tunelab.data.lineage import absolute_paths, file_lineage
from tunelab.data.loaders import train_validation_chats
from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.sections import ChatDataSection, GenerationSection, LoraSection, ModelSection, TrainSection
from tunelab.train import _run
from tunelab.train.device import checkpoint_every, padding_free, plan
from tunelab.train.distributed import world_size
from tunelab.train.memory import resident_gb, sft_memory_plan
from tunelab.train.numerics import (
    PadCollator,
    PaddingFreeCollator,
    print_data_report,
    tokenize_all_chats,
)
from tunelab.train.peft import (
    PROMPT_FAMILY,
    IA3Section,
    PromptSection,
    QuantSection,
    TrainMethod,
    adapter_report,
    apply_peft,
    check_requirements,
    ignored_sections,
    load_kwargs,
    peft_section,
)
from tunelab.workspace import Workspace


class SFTConfig(Strict):
    """Recipe for instruction tuning."""

    recipe: Literal["sft"] = "sft"
    name: str | None = Field(None, description="a short name used in the run id")
    model: ModelSection
    data: ChatDataSection
    method: TrainMethod = Field("lora", description="a PEFT method (tunelab/train/peft.py) or full")
    lora: LoraSection = LoraSection()  # lora, dora, rslora, qlora
    prompt: PromptSection = PromptSection()  # prompt_tuning, prefix_tuning, p_tuning
    ia3: IA3Section = IA3Section()
    qlora: QuantSection = QuantSection()  # the 4-bit base of qlora
    train: TrainSection = TrainSection()
    eval: GenerationSection = GenerationSection()

    @model_validator(mode="after")
    def _padding_free(self):
        if self.train.padding_free is True and self.method in PROMPT_FAMILY:
            raise ValueError(f"train.padding_free: {self.method} prepends virtual tokens to each padded row; "
                             f"set train.padding_free: auto (or false)")
        return self


def run(cfg: SFTConfig | None, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None, callbacks: list | None = None) -> dict:
    """Train; return the summary (also written to ``summary.json``).

    ``callbacks``: extra transformers TrainerCallbacks (the hyperparameter search's pruning hook).
    """
    return _run.execute("sft", cfg, lambda r: _steps(r, callbacks), SFTConfig, workspace, resume, parent_id)


def _steps(r: _run.Run, extra_callbacks: list | None) -> dict:
    import transformers

    from tunelab.train._cpu_speed import Speedups, attention_kwargs, fused_loss_applies, fused_loss_trainer
    from tunelab.train.shared_prompt import PREFIX_NAME, note_prefix_saved

    cfg = r.cfg.model_copy(update={"data": absolute_paths(r.cfg.data)})
    if cfg.method != "full":
        check_requirements(peft_section(cfg))  # e.g. qlora without CUDA/bitsandbytes: fail before anything
    data_lineage = file_lineage(cfg.data)  # a missing file fails here, before a run folder is made
    transformers.logging.set_verbosity_error()
    model_ref = refs.resolve(cfg.model.name, r.ws, trust_remote_code=cfg.model.trust_remote_code, runs=False)
    r.begin(cfg, base_model=cfg.model.name, lineage={"base_model_path": str(model_ref.path), **data_lineage})

    speed = None
    try:
        # 1. tokenizer, with a chat template (the model's own, or tunelab's plain one)
        tokenizer, template_added = refs.load_tokenizer(model_ref)

        # 2. data: chats → masked token ids; every reject and truncation counted
        rejects: list[dict] = []
        chats, val_chats = train_validation_chats(cfg.data, cfg.train.seed, rejects)
        n_unreadable = len(rejects)
        train_feats, train_stats = tokenize_all_chats(tokenizer, chats, cfg.data.max_length, rejects, "train")
        val_feats, val_stats = tokenize_all_chats(tokenizer, val_chats, cfg.data.max_length, rejects, "validation")
        r.write_rejects(rejects)  # unreadable records and chats whose response was truncated away
        if not train_feats:
            raise TunelabError(f"no usable training examples in {cfg.data.train} "
                               f"({len(rejects)} rejected; see {r.dir / 'rejects.jsonl'})")
        data_report = {"train": train_stats.as_dict(), "validation": val_stats.as_dict(), "rejected": n_unreadable}
        print_data_report(data_report, cfg.data.max_length)

        # 3. model (+ adapter)
        dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
        runtime_gb = resident_gb()  # the process before the model: the base of the memory plan's CPU prediction
        transformers.set_seed(cfg.train.seed)  # adapter init draws from the global RNG
        for s in ignored_sections(cfg):
            print(f"note: method {cfg.method} does not read the '{s}:' section")
        # the shared speed-ups (tunelab/train/_cpu_speed.py): under CPU bf16 autocast eager attention and a bf16
        # frozen base, fast LoRA dropout masks on CPU; the fused response-only loss
        attn = attention_kwargs(dplan, cfg.method, cfg.train.speedups)
        print(f"loading the model {cfg.model.name} ({cfg.method})", flush=True)
        if cfg.method == "full":
            model = refs.load(model_ref)
        else:
            adapter_cfg = peft_section(cfg)
            model = refs.load(model_ref, **attn, **load_kwargs(adapter_cfg))
            model = apply_peft(model, adapter_cfg, "CAUSAL_LM", tokenizer_path=str(model_ref.path))
        speed = Speedups(dplan, cfg.method, cfg.train.speedups).apply(model, r.dir)
        speed.note("fused response-only loss", speed.on and fused_loss_applies(model),
                           "logits only at response tokens, a frozen head's NLL in chunks" if speed.on and
                           fused_loss_applies(model) else "off (train.speedups: off)" if not speed.on else
                           f"{cfg.method} changes the inputs: the model's own forward computes the logits")
        params = adapter_report(model)
        trainable, total = params["trainable_params"], params["total_params"]
        # prompt-family methods prepend virtual tokens per row: only padded batches (checked in SFTConfig)
        pf, pf_why = (False, f"off for {cfg.method}") if cfg.method in PROMPT_FAMILY else \
            padding_free(cfg.train.padding_free, dplan, getattr(model.config, "_attn_implementation", None))

        # 4. memory: micro-batch x accumulation and checkpointing that fit train.memory_budget_gb (where not set)
        mem = sft_memory_plan(cfg, dplan, checkpoint_every(cfg.train.gradient_checkpointing, dplan),
                              data_report["train"], model_ref.path, runtime_gb)
        print(mem.line())
        if mem.fits is False:
            print("warning: the run may not fit its memory budget: " + mem.why)
        ckpt_every = mem.checkpoint_every

        # 5. trainer
        total_steps = _run.steps_total(len(train_feats), cfg.train)
        has_val = bool(val_feats)
        args = _run.training_args(
            cfg.train, dplan, r.checkpoints, has_val=has_val, total_steps=total_steps, checkpoint_every=ckpt_every,
            per_device_train_batch_size=mem.micro_batch, gradient_accumulation_steps=mem.grad_accum,
            include_num_input_tokens_seen="all" if pf else "non_padding",  # a padding-free row has no padding
            train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
            remove_unused_columns=False, prediction_loss_only=True)
        # the tokens every row of a padded batch starts with (system prompt, chat header) once: not with packed rows
        # (no padding to align), nor with checkpointed layers (they drop the prefix's cache)
        why_not = ("off (train.speedups: off)" if not speed.on else
                   f"{cfg.method} changes the inputs" if not fused_loss_applies(model) else
                   "padding-free rows" if pf else "gradient checkpointing drops the prefix's cache" if ckpt_every
                   else None)
        share = speed.note(PREFIX_NAME, why_not is None, why_not or "the tokens every row of a batch starts with "
                                                                    "(a system prompt, the chat header) run once")
        # speed-ups on: tunelab's loss (response_only_loss falls back to the model's logits where it cannot fuse)
        trainer = (fused_loss_trainer(share_prefix=share) if speed.on else transformers.Trainer)(
            model=model, args=args, train_dataset=train_feats, eval_dataset=val_feats or None,
            data_collator=PaddingFreeCollator() if pf else PadCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=r.callbacks(patience=cfg.train.early_stopping_patience if has_val else None,
                                  more=extra_callbacks))
        ckpt = {0: "off", 1: "every layer"}.get(ckpt_every, f"every {ckpt_every} layers")
        print(speed.line())
        print(f"device: {dplan.why}; gradient checkpointing {ckpt}; padding-free batches {'on' if pf else 'off'} "
              f"({pf_why}); {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.2f}%); {total_steps} steps")
        out = r.train(trainer)
        if share:
            note_prefix_saved(speed, trainer.prefix_stats)
    finally:
        if speed is not None:
            speed.restore()  # the exact fp32 base again (probe, evaluation, merges); removes the temp file
    if not r.main:  # the model, probe and summary are rank 0's to write
        return r.worker_summary()

    # 6. save the best weights (load_best_model_at_end restored them) with the tokenizer
    out_dir = _run.save_output(trainer.model, tokenizer, r.dir, adapter=cfg.method != "full")
    # Under bf16/fp16 mixed precision accelerate wraps forward in autocast; the probe must be the
    # saved weights' own (fp32) logits, which is what a reload computes: drop the wrapper first.
    probe_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    _run.write_probe(probe_model, (val_feats or train_feats)[0]["input_ids"], r.dir / "probe.safetensors")
    params = adapter_report(trainer.model, out_dir)
    # what the Trainer actually did, read off the model (not the plan): see docs/methods/full.md
    checkpointed = bool(getattr(trainer.model, "is_activation_checkpointing", False))

    st = trainer.state
    train_rows = _run.train_rows(st.log_history)
    return r.finish({
        "method": cfg.method,
        "base_model": cfg.model.name,
        "output": str(out_dir),
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "early_stopped": bool(has_val and st.global_step < st.max_steps),
        "stopped_step": st.global_step,
        "best_step": _run.best_step(st),
        "best_eval_loss": st.best_metric,
        "best_checkpoint": st.best_model_checkpoint,
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "train_runtime_s": round(out.metrics.get("train_runtime", 0.0), 2),
        "tokens_seen": st.num_input_tokens_seen,
        "tokens_per_s": round(st.num_input_tokens_seen / max(out.metrics.get("train_runtime", 1e-9), 1e-9), 2),
        **params,  # trainable_params, total_params, trainable_percent, adapter_bytes (the saved weights)
        "gradient_checkpointing": checkpointed,
        "checkpoint_every_n_layers": ckpt_every if checkpointed else 0,
        "padding_free": pf,
        **speed.record(),
        "device": dplan.__dict__,
        "chat_template": "tunelab fallback (model had none)" if template_added else "model's own",
        "data": data_report,
        "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
        # the micro-batch, accumulation and checkpointing chosen, the estimate and budget
        "memory": {**mem.as_dict(), "runtime_gb": round(runtime_gb, 3)},
    }, catalog_metrics=("final_train_loss", "best_eval_loss", "best_step", "steps", "tokens_per_s"))
