"""Instruction tuning (SFT): a PEFT adapter or full fine-tuning of a causal LM on chat/instruction records.

    tunelab train examples/sft_lora_support.yaml [--set method=dora] [--set train.epochs=2] [--resume RUN_ID]

``method``: lora | dora | rslora | qlora | prompt_tuning | prefix_tuning | p_tuning | ia3 | full
(tunelab/train/peft.py; each reads its own section: ``lora:``, ``prompt:``, ``ia3:``, ``qlora:``).

Top to bottom: resolve the model → tokenizer (+ chat template) → data (masked labels,
truncation counted) → model (+ adapter) → transformers Trainer with validation, early
stopping and checkpoints → save the best adapter/model with the tokenizer → summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab import config as cfglib
from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.sections import ChatDataSection, GenerationSection, LoraSection, ModelSection, TrainSection
from tunelab.train.peft import PROMPT_FAMILY, IA3Section, PromptSection, QuantSection, TrainMethod
from tunelab.workspace import Workspace, sha256_file, write_json


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


# ----------------------------------------------------------------------------- data

def load_chats(path: str, data: ChatDataSection, rejects: list[dict], limit: int | None = None) -> list[list[dict]]:
    """Read a file into chat message lists; unusable records go to ``rejects`` with file, line and reason."""
    from tunelab.data.formats import BadRecord, to_messages
    from tunelab.data.readers import read

    chats = []
    for _, line, rec in read(path):
        if limit is not None and len(chats) >= limit:
            break
        try:
            if isinstance(rec, BadRecord):
                raise rec
            chats.append(to_messages(rec, data.format, data.system_prompt))
        except BadRecord as e:
            rejects.append({"file": str(path), "line": line, "reason": str(e)})
    return chats


def split_validation(chats: list[list[dict]], share: float, seed: int) -> tuple[list, list]:
    from tunelab.data.split import content_fraction

    train, val = [], []
    for c in chats:
        (val if content_fraction(c, salt=f"val{seed}") < share else train).append(c)
    return train, val


def dataset_lineage(data: ChatDataSection) -> dict:
    files = {k: getattr(data, k) for k in ("train", "validation", "test") if getattr(data, k)}
    missing = [f"data.{k}: file not found: {v}" for k, v in files.items() if not Path(v).is_file()]
    if missing:
        raise TunelabError("; ".join(missing))
    hashes = {k: {"path": str(Path(v).resolve()), "sha256": sha256_file(v)} for k, v in files.items()}
    blob = json.dumps({"files": {k: v["sha256"] for k, v in hashes.items()},
                       "config": data.model_dump(mode="json", exclude={"train", "validation", "test"})},
                      sort_keys=True)
    out = {"dataset_id": "ds-" + hashlib.sha256(blob.encode()).hexdigest()[:16], "files": hashes}
    manifest = Path(data.train).parent / "manifest.json"
    if manifest.is_file():  # a version made by `tunelab data prepare`: lineage continues to its raw files
        m = json.loads(manifest.read_text(encoding="utf-8"))
        out.update({"dataset_id": m.get("dataset_id", out["dataset_id"]), "dataset_version": str(manifest.parent),
                    "dataset_sources": m.get("sources", [])})
    return out


# ----------------------------------------------------------------------------- run

def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last, so a kill mid-save is skipped)."""
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1])) if done else None


def _trainer_class():
    from transformers import Trainer

    from tunelab.train._numerics import response_only_loss

    class SFTTrainer(Trainer):
        """transformers' Trainer with one override: the loss computes logits on response tokens only."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # response_only_loss calls the decoder and the LM head directly, past the autocast wrapper that
            # accelerate puts on model.forward: enter mixed precision here (a no-op under fp32)
            with self.accelerator.autocast():
                loss = response_only_loss(model, inputs, num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                    and self.accelerator.num_processes > 1:
                # num_items_in_batch counts the label tokens of all ranks and DDP averages gradients
                # over ranks: scale back by the rank count, as Trainer.compute_loss does
                loss = loss * self.accelerator.num_processes
            return (loss, {"loss": loss}) if return_outputs else loss

    return SFTTrainer


def write_probe(model, input_ids: list[int], path: Path) -> None:
    """Save the final model's logits on one fixed input, so anyone can check that the saved
    artifact, loaded back with plain transformers/peft, reproduces the trained model."""
    import torch
    from safetensors.torch import save_file

    model.eval()
    ids = torch.tensor([input_ids])
    dev = next(model.parameters()).device  # the model may sit on a GPU; the probe is saved from the CPU
    with torch.no_grad():
        logits = model(input_ids=ids.to(dev)).logits[0, -4:].float().cpu()  # last 4 positions: small on disk
    save_file({"input_ids": ids[0], "logits": logits.contiguous()}, str(path))


def run(cfg: SFTConfig, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None, callbacks: list | None = None) -> dict:
    """Train; return the summary (also written to ``summary.json``).

    ``callbacks``: extra transformers TrainerCallbacks (the hyperparameter search's pruning hook).
    """
    from tunelab.train.peft import apply_peft, adapter_report, check_requirements, ignored_sections, load_kwargs, \
        peft_section

    from tunelab.train.distributed import is_main, world_size

    extra_callbacks = callbacks
    ws = workspace or Workspace.resolve()
    catalog = ws.catalog()
    main = is_main()  # under --nproc only rank 0 writes files and the catalog (tunelab/train/distributed.py)

    if not resume:
        if cfg.method != "full":
            check_requirements(peft_section(cfg))  # e.g. qlora without CUDA/bitsandbytes: fail before anything
        dataset_lineage(cfg.data)  # fail on a missing file before a run directory is made
        # store absolute data paths so eval and --resume work from any directory
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            k: str(Path(getattr(cfg.data, k)).resolve()) for k in ("train", "validation", "test")
            if getattr(cfg.data, k)})})
    if resume:
        run_dir = ws.run_dir(resume)
        run_id = run_dir.name
        cfg = cfglib.load(SFTConfig, run_dir / "config.yaml")  # the run's own config, not the file's
        if cfg.method != "full":
            check_requirements(peft_section(cfg))
    else:
        run_id, run_dir = ws.new_run_dir("sft", cfg.name)
        if main:
            (run_dir / "config.yaml").write_text(cfglib.dump(cfg), encoding="utf-8")
    started = time.time()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from tunelab.environment import capture
    from tunelab.models import resolve
    from tunelab.train import callbacks as cb
    from tunelab.train._numerics import PadCollator, PaddingFreeCollator, ensure_chat_template, tokenize_all_chats
    from tunelab.train._cpu_speed import FrozenBf16, checkpointed_eager_attention, cpu_bf16_training, \
        use_fast_lora_dropout
    from tunelab.train.device import checkpoint_every, padding_free, plan

    transformers.logging.set_verbosity_error()
    model_path = resolve(cfg.model.name, ws)
    lineage = {"run_id": run_id, "parent_id": parent_id, "base_model": cfg.model.name,
               "base_model_path": str(model_path), **dataset_lineage(cfg.data)}
    if main:
        write_json(run_dir / "lineage.json", lineage)
        write_json(run_dir / "environment.json", capture())
    if main and not resume:
        catalog.add_run(id=run_id, kind="sft", dir=run_dir, name=cfg.name, parent_id=parent_id,
                        base_model=cfg.model.name, dataset_id=lineage["dataset_id"], config=cfg.model_dump(mode="json"))
    elif main:
        catalog.update_run(run_id, status="running")

    frozen = None
    try:
        # 1. tokenizer, with a chat template (the model's own, or tunelab's plain one)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        template_added = ensure_chat_template(tokenizer)

        # 2. data: chats → masked token ids; every reject and truncation counted
        rejects: list[dict] = []
        chats = load_chats(cfg.data.train, cfg.data, rejects, cfg.data.limit)
        if cfg.data.validation:
            val_chats = load_chats(cfg.data.validation, cfg.data, rejects)
        elif cfg.data.validation_split > 0:
            chats, val_chats = split_validation(chats, cfg.data.validation_split, cfg.train.seed)
            if not val_chats:
                print("warning: validation_split left no validation examples (too few distinct records); "
                      "training without validation or early stopping")
        else:
            val_chats = []
        if main:
            with open(run_dir / "rejects.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rejects)
        train_feats, train_stats = tokenize_all_chats(tokenizer, chats, cfg.data.max_length)
        val_feats, val_stats = tokenize_all_chats(tokenizer, val_chats, cfg.data.max_length)
        if not train_feats:
            raise TunelabError(f"no usable training examples in {cfg.data.train} "
                               f"({len(rejects)} rejected; see {run_dir / 'rejects.jsonl'})")
        data_report = {"train": train_stats.as_dict(), "validation": val_stats.as_dict(), "rejected": len(rejects)}
        _print_data_report(data_report, cfg.data.max_length)

        # 3. model (+ adapter)
        dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
        ckpt_every = checkpoint_every(cfg.train.gradient_checkpointing, dplan)
        transformers.set_seed(cfg.train.seed)  # adapter init draws from the global RNG
        for s in ignored_sections(cfg):
            print(f"note: method {cfg.method} does not read the '{s}:' section")
        # CPU under bf16 autocast: eager attention, fast LoRA dropout masks, frozen base in bf16 (each
        # measured; tunelab/train/_cpu_speed.py). Off elsewhere and for the methods not measured.
        cpu_fast = cpu_bf16_training(dplan) and cfg.method in ("lora", "rslora", "dora")
        attn = {"attn_implementation": checkpointed_eager_attention()} if cpu_fast else {}
        if cfg.method == "full":
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        else:
            adapter_cfg = peft_section(cfg)
            model = AutoModelForCausalLM.from_pretrained(model_path, **{"dtype": torch.float32, **attn,
                                                                        **load_kwargs(adapter_cfg)})
            model = apply_peft(model, adapter_cfg, "CAUSAL_LM", tokenizer_path=str(model_path))
        n_fast_dropout = use_fast_lora_dropout(model) if dplan.device == "cpu" and cfg.method != "full" else 0
        frozen = FrozenBf16(model, run_dir) if cpu_fast and cfg.method in ("lora", "rslora") else None
        params = adapter_report(model)
        trainable, total = params["trainable_params"], params["total_params"]
        # prompt-family methods prepend virtual tokens per row: only padded batches (checked in SFTConfig)
        pf, pf_why = (False, f"off for {cfg.method}") if cfg.method in PROMPT_FAMILY else \
            padding_free(cfg.train.padding_free, dplan, getattr(model.config, "_attn_implementation", None))

        # 4. trainer
        steps_per_epoch = math.ceil(len(train_feats) / (cfg.train.batch_size * cfg.train.grad_accum))
        total_steps = cfg.train.max_steps or math.ceil(steps_per_epoch * cfg.train.epochs)
        has_val = bool(val_feats)
        ckpt_dir = run_dir / "checkpoints"
        args = TrainingArguments(
            output_dir=str(ckpt_dir),
            per_device_train_batch_size=cfg.train.batch_size,
            per_device_eval_batch_size=cfg.train.batch_size,
            gradient_accumulation_steps=cfg.train.grad_accum,
            learning_rate=cfg.train.learning_rate,
            num_train_epochs=cfg.train.epochs,
            max_steps=cfg.train.max_steps or -1,
            lr_scheduler_type=cfg.train.scheduler,
            warmup_steps=int(round(cfg.train.warmup_ratio * total_steps)),
            weight_decay=cfg.train.weight_decay,
            max_grad_norm=cfg.train.max_grad_norm,
            seed=cfg.train.seed,
            data_seed=cfg.train.seed,
            bf16=dplan.precision == "bf16",
            fp16=dplan.precision == "fp16",
            use_cpu=dplan.device == "cpu",
            activation_checkpointing=ckpt_every > 0,
            # k > 1: only every k-th decoder layer (transformers' every_n_layers); tunelab/train/device.py
            activation_checkpointing_kwargs={"every_n_layers": ckpt_every} if ckpt_every > 1 else None,
            eval_strategy="steps" if has_val else "no",
            eval_steps=cfg.train.eval_every,
            save_strategy="steps",
            save_steps=cfg.train.eval_every,
            save_total_limit=cfg.train.save_total_limit,
            load_best_model_at_end=has_val,
            metric_for_best_model="eval_loss" if has_val else None,
            greater_is_better=False if has_val else None,
            restore_callback_states_from_checkpoint=True,
            logging_strategy="steps",
            logging_steps=1,
            include_num_input_tokens_seen="all" if pf else "non_padding",  # a padding-free row has no padding
            train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            save_only_model=False,
            prediction_loss_only=True,
        )
        _SFTTrainer = _trainer_class()
        callbacks = [cb.MetricsJsonl(run_dir / "metrics.jsonl"), cb.Progress(f"sft {run_id}")]
        callbacks = [*callbacks, *(extra_callbacks or [])]
        if has_val and cfg.train.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
        trainer = _SFTTrainer(model=model, args=args, train_dataset=train_feats, eval_dataset=val_feats or None,
                          data_collator=PaddingFreeCollator() if pf else PadCollator(tokenizer.pad_token_id),
                          processing_class=tokenizer,
                          callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)

        resume_from = None
        if resume:
            resume_from = last_checkpoint(ckpt_dir)
            if resume_from is None:
                print("no complete checkpoint yet: starting this run from the beginning")
                if main:
                    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            elif main:
                cb.truncate_metrics(run_dir / "metrics.jsonl", int(resume_from.name.split("-")[-1]))
                print(f"resuming from {resume_from.name}")
        elif main:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        ckpt = {0: "off", 1: "every layer"}.get(ckpt_every, f"every {ckpt_every} layers")
        speedups = [name for name, on in (("checkpointed eager attention", cpu_fast), ("fast LoRA dropout", n_fast_dropout > 0),
                                          ("frozen base in bf16", frozen is not None)) if on]
        if speedups:
            print(f"cpu speed-ups: {', '.join(speedups)}")
        print(f"device: {dplan.why}; gradient checkpointing {ckpt}; padding-free batches {'on' if pf else 'off'} "
              f"({pf_why}); {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.2f}%); {total_steps} steps")
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if frozen is not None:
            frozen.restore()  # the exact fp32 base again, for the probe, evaluation and merges
        if not main:  # the model, probe and summary are rank 0's to write
            return {"run_id": run_id, "status": "worker", "rank": trainer.args.process_index}

        # 5. save the best weights (load_best_model_at_end restored them) with the tokenizer
        out_dir = run_dir / ("model" if cfg.method == "full" else "adapter")
        tmp = run_dir / f".{out_dir.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        # Under bf16/fp16 mixed precision accelerate wraps forward in autocast; the probe must be the
        # saved weights' own (fp32) logits, which is what a reload computes: drop the wrapper first.
        probe_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        write_probe(probe_model, (val_feats or train_feats)[0]["input_ids"], run_dir / "probe.safetensors")
        params = adapter_report(trainer.model, out_dir)
        # what the Trainer actually did, read off the model (not the plan): see docs/methods/full.md
        checkpointed = bool(getattr(trainer.model, "is_activation_checkpointing", False))

        st = trainer.state
        stopped_early = has_val and st.global_step < st.max_steps
        best_step = int(st.best_model_checkpoint.rsplit("-", 1)[-1]) if st.best_model_checkpoint else st.global_step
        train_rows = [r for r in st.log_history if "loss" in r and "eval_loss" not in r]
        summary = {
            "run_id": run_id,
            "status": "completed",
            "method": cfg.method,
            "base_model": cfg.model.name,
            "output": str(out_dir),
            "steps": st.global_step,
            "max_steps": st.max_steps,
            "early_stopped": bool(stopped_early),
            "stopped_step": st.global_step,
            "best_step": best_step,
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
            "cpu_speedups": speedups,
            "device": dplan.__dict__,
            "chat_template": "tunelab fallback (model had none)" if template_added else "model's own",
            "data": data_report,
            "wall_time_s": round(time.time() - started, 2),
            "world_size": world_size(),
            "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
        }
        write_json(run_dir / "summary.json", summary)
        catalog.update_run(run_id, status="completed", metrics={
            k: summary[k] for k in ("final_train_loss", "best_eval_loss", "best_step", "steps", "tokens_per_s")})
        return summary
    except BaseException as e:
        if frozen is not None:
            frozen.restore()  # removes the temp file of fp32 weights
        if main:
            catalog.update_run(run_id, status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise


def _print_data_report(rep: dict, max_length: int) -> None:
    tr, va = rep["train"], rep["validation"]
    print(f"data: {tr['kept']} train / {va['kept']} validation examples, {tr['tokens']:,} train tokens "
          f"({tr['label_tokens']:,} in responses), p95 length {tr['length_p95']}; "
          f"truncated at {max_length} tokens: {tr['truncated'] + va['truncated']}; "
          f"dropped (no response tokens left): {tr['dropped_no_labels'] + va['dropped_no_labels']}; "
          f"rejected records: {rep['rejected']}")
