"""Pre-training from scratch (small scale): a BPE tokenizer and a Llama-architecture model from a config.

    tunelab train examples/pretrain_tinyshakespeare.yaml [--set train.max_steps=200] [--resume RUN_ID]

Top to bottom: read raw text → hold out documents by content hash → train a byte-level BPE
tokenizer on the training documents (or reuse a tokenizer folder) → pack documents joined with
EOS into fixed blocks → a randomly initialized Llama from ``model:`` → held-out perplexity at
random init → transformers Trainer (validation on the held-out blocks, early stopping,
checkpoints) → held-out perplexity of the best weights → ``run_dir/model`` (HF folder with the
tokenizer) → summary.

The raw-text helpers here (reading, held-out split, packing, the block Trainer) are shared with
continued pre-training (cpt.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab import config as cfglib
from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.sections import TextDataSection, TrainSection
from tunelab.workspace import Workspace, sha256_file, write_json


class ArchSection(Strict):
    """A Llama-architecture decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention)."""

    hidden_size: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = Field(None, ge=1, description="key/value heads (grouped-query attention); None: = heads")
    intermediate_size: int | None = Field(None, ge=1, description="MLP width; None: ~8/3 × hidden, a multiple of 32")
    context_length: int = Field(256, ge=8, description="maximum positions; also the default block size")
    tie_embeddings: bool = Field(True, description="share input embeddings and LM head (fewer parameters)")

    @model_validator(mode="after")
    def _shapes(self):
        problems = []
        if self.hidden_size % self.heads:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by heads {self.heads}")
        elif (self.hidden_size // self.heads) % 2:
            problems.append(f"head size hidden_size/heads = {self.hidden_size // self.heads} must be even (RoPE)")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            problems.append(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def mlp_width(self) -> int:
        return self.intermediate_size or 32 * max(1, round(8 * self.hidden_size / 3 / 32))


class TokenizerSection(Strict):
    vocab_size: int | None = Field(None, ge=264, description="BPE vocabulary (256 bytes + merges + 3 special "
                                                              "tokens); None: 4096 when a tokenizer is trained")
    min_frequency: int = Field(2, ge=1, description="a merge must occur this often (when training one)")
    path: str | None = Field(None, description="reuse this tokenizer folder instead of training one")

    @model_validator(mode="after")
    def _one_source(self):
        if self.path and self.vocab_size is not None:
            raise ValueError("give either path (reuse a tokenizer) or vocab_size (train one), not both")
        return self


class PretrainConfig(Strict):
    """Recipe for pre-training a small model from scratch."""

    recipe: Literal["pretrain"] = "pretrain"
    name: str | None = Field(None, description="a short name used in the run id")
    model: ArchSection = ArchSection()
    tokenizer: TokenizerSection = TokenizerSection()
    data: TextDataSection
    train: TrainSection = TrainSection()  # from scratch wants a higher learning_rate (1e-3 to 3e-3)

    @model_validator(mode="after")
    def _block_fits(self):
        if self.data.block_size and self.data.block_size > self.model.context_length:
            raise ValueError(f"data.block_size {self.data.block_size} exceeds model.context_length "
                             f"{self.model.context_length}; lower it or raise the context")
        return self


# ----------------------------------------------------------------------------- raw text (shared with cpt)

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def expand_files(files: list[str], field: str) -> list[Path]:
    """The files behind ``files`` (folders: their .txt/.md, recursively, sorted). Missing ones are one error."""
    from tunelab.data.readers import TEXT_SUFFIXES

    missing = [f"{field}: not found: {f}" for f in files if not Path(f).exists()]
    if missing:
        raise TunelabError("; ".join(missing))
    out: list[Path] = []
    for f in map(Path, files):
        if f.is_dir():
            found = sorted(p for p in f.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise TunelabError(f"{field}: folder {f} has no .txt/.md files")
            out += found
        else:
            out.append(f)
    return out


def text_lineage(sections: dict[str, TextDataSection | object]) -> dict:
    """Dataset id from the content of every input file plus the data config (DESIGN principle 8)."""
    files, configs = {}, {}
    for name, sec in sections.items():
        for p in expand_files(sec.files, f"{name}.files"):
            files[str(p.resolve())] = sha256_file(p)
        configs[name] = sec.model_dump(mode="json", exclude={"files"})
    blob = json.dumps({"files": sorted(files.values()), "config": configs}, sort_keys=True)
    return {"dataset_id": "ds-" + hashlib.sha256(blob.encode()).hexdigest()[:16],
            "files": [{"path": p, "sha256": h} for p, h in files.items()]}


def absolute_files(sec):
    """The section with absolute paths, so a stored config works from any directory (eval, --resume)."""
    return sec.model_copy(update={"files": [str(Path(f).resolve()) for f in sec.files]})


def load_texts(files: list[str], text_unit: str, limit: int | None, rejects: list[dict]) -> list[str]:
    """Documents from plain text (a file, a folder) or records; unusable records go to ``rejects``."""
    from tunelab.data.formats import BadRecord
    from tunelab.data.readers import read
    from tunelab.data.records import export, to_canonical

    texts: list[str] = []
    for f in files:
        for src, line, rec in read(f):
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                text = export(to_canonical(rec), "text")["text"]
            except BadRecord as e:
                rejects.append({"file": src, "line": line, "reason": str(e)})
                continue
            parts = _BLANK_LINE.split(text) if text_unit == "paragraph" else [text]
            for part in parts:
                if part.strip():
                    texts.append(part.strip() if text_unit == "paragraph" else part)
                    if limit is not None and len(texts) >= limit:
                        return texts
    return texts


def split_heldout(texts: list[str], share: float) -> tuple[list[str], list[str]]:
    """Held-out documents chosen by content hash: the same on every run, seed and machine; duplicates stay together."""
    from tunelab.data.split import content_fraction

    train, held = [], []
    for t in texts:
        (held if content_fraction(t, salt="heldout") < share else train).append(t)
    return train, held


def tokenize_and_pack(tokenizer, texts: list[str], block_size: int, batch: int = 256):
    from tunelab.train.numerics import pack_blocks

    if tokenizer.eos_token_id is None:
        raise TunelabError("the tokenizer has no EOS token, which separates packed documents; add one")

    def streams():
        for i in range(0, len(texts), batch):
            yield from tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]

    return pack_blocks(streams(), block_size, tokenizer.eos_token_id)


def spread(blocks: list, n: int | None) -> list:
    """At most ``n`` blocks spread evenly over the list (not just its start): a fixed, representative eval set."""
    if n is None or len(blocks) <= n:
        return list(blocks)
    return [blocks[(i * len(blocks)) // n] for i in range(n)]


def train_blocks(model, tokenizer, train: list[list[int]], evals: list[list[int]], tc: TrainSection,
                 run_dir: Path, label: str, resume: bool):
    """Train a causal LM on packed blocks with transformers' Trainer (validation, early stopping,
    checkpoints, --resume); the best weights are loaded at the end when there was validation.
    Returns (the model with its plain forward, trainer, train output, device plan)."""
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from tunelab.train import callbacks as cb
    from tunelab.train.numerics import PadCollator
    from tunelab.train.device import plan
    from tunelab.train.distributed import is_main
    from tunelab.train._run import last_checkpoint

    dplan = plan(tc.precision, tc.gradient_checkpointing)
    feats = [{"input_ids": b, "labels": b} for b in train]  # every position is a target in pretraining
    eval_feats = [{"input_ids": b, "labels": b} for b in evals]
    steps_per_epoch = math.ceil(len(feats) / (tc.batch_size * tc.grad_accum))
    total_steps = tc.max_steps or math.ceil(steps_per_epoch * tc.epochs)
    has_val = bool(eval_feats)
    ckpt_dir = run_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=tc.batch_size,
        per_device_eval_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        learning_rate=tc.learning_rate,
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps or -1,
        lr_scheduler_type=tc.scheduler,
        warmup_steps=int(round(tc.warmup_ratio * total_steps)),
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        seed=tc.seed,
        data_seed=tc.seed,
        bf16=dplan.precision == "bf16",
        fp16=dplan.precision == "fp16",
        use_cpu=dplan.device == "cpu",
        activation_checkpointing=dplan.gradient_checkpointing,
        eval_strategy="steps" if has_val else "no",
        eval_steps=tc.eval_every,
        save_strategy="steps",
        save_steps=tc.eval_every,
        save_total_limit=tc.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="random",  # blocks all have one length: nothing to group
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        save_only_model=False,
        prediction_loss_only=True,
    )
    callbacks = [cb.MetricsJsonl(run_dir / "metrics.jsonl"), cb.Progress(label)]
    if has_val and tc.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=tc.early_stopping_patience))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=model, args=args, train_dataset=feats, eval_dataset=eval_feats or None,
                      data_collator=PadCollator(pad), processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)

    resume_from = None
    main = is_main()  # metrics.jsonl is rank 0's under --nproc
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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"device: {dplan.why}; {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%); {total_steps} steps of {tc.batch_size * tc.grad_accum} blocks")
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    # accelerate wraps forward in autocast for mixed precision (bf16 on AMX CPUs); unwrap it so the
    # perplexity after training is measured in fp32 like the one before, and the probe matches a reload.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return model, trainer, out, dplan


def save_folder(model, tokenizer, out_dir: Path) -> None:
    """save_pretrained model + tokenizer into ``out_dir`` atomically (a kill never leaves half a folder)."""
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def training_summary(trainer, out) -> dict:
    """Steps, early stop, best step/loss, tokens trained and tokens/s, from the Trainer's state."""
    from tunelab.train.distributed import world_size

    st = trainer.state
    rows = [r for r in st.log_history if "loss" in r and "eval_loss" not in r]
    runtime = out.metrics.get("train_runtime", 0.0)
    return {
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "early_stopped": bool(st.best_model_checkpoint and st.global_step < st.max_steps),
        "best_step": int(st.best_model_checkpoint.rsplit("-", 1)[-1]) if st.best_model_checkpoint else st.global_step,
        "best_eval_loss": st.best_metric,
        "final_train_loss": rows[-1]["loss"] if rows else None,
        "train_runtime_s": round(runtime, 2),
        "tokens_trained": st.num_input_tokens_seen,
        "tokens_per_s": round(st.num_input_tokens_seen / max(runtime, 1e-9), 2),
        "world_size": world_size(),
        "global_batch_size": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
        * world_size(),
    }


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], tc: TokenizerSection, context_length: int):
    """A byte-level BPE (GPT-2 style: any text encodes, no unknown tokens) trained with HF tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=tc.vocab_size or 4096, min_frequency=tc.min_frequency,
                                  special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=context_length)


def build_model(arch: ArchSection, tokenizer, seed: int):
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.set_seed(seed)  # the same random init on every run (and on --resume)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.mlp_width(),
                      num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                      num_key_value_heads=arch.kv_heads or arch.heads, max_position_embeddings=arch.context_length,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=arch.tie_embeddings)
    return LlamaForCausalLM(cfg).to(torch.float32)


# ----------------------------------------------------------------------------- run

def run(cfg: PretrainConfig, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train a tokenizer and a model from scratch; return the summary (also in ``summary.json``)."""
    from tunelab.train.distributed import is_main, local_device, main_first, worker_summary

    ws = workspace or Workspace.resolve()
    catalog = ws.catalog()
    main = is_main()  # under --nproc only rank 0 writes files and the catalog (tunelab/train/distributed.py)
    if resume:
        run_dir = ws.run_dir(resume)
        run_id = run_dir.name
        cfg = cfglib.load(PretrainConfig, run_dir / "config.yaml")  # the run's own config, not the file's
    else:
        if cfg.tokenizer.path and not Path(cfg.tokenizer.path).is_dir():
            raise TunelabError(f"tokenizer.path: folder not found: {cfg.tokenizer.path}")
        tok = cfg.tokenizer.path and cfg.tokenizer.model_copy(update={"path": str(Path(cfg.tokenizer.path).resolve())})
        cfg = cfg.model_copy(update={"data": absolute_files(cfg.data), "tokenizer": tok or cfg.tokenizer})
    started = time.time()
    data_lineage = text_lineage({"data": cfg.data})  # a missing file fails here, before a run directory is made

    # 1. raw text → training and held-out documents (by content hash); a mistake fails before a run exists
    rejects: list[dict] = []
    texts = load_texts(cfg.data.files, cfg.data.text_unit, cfg.data.limit, rejects)
    train_texts, held_texts = split_heldout(texts, cfg.data.heldout_share)
    if not train_texts or not held_texts:
        raise TunelabError(f"{len(texts)} documents gave {len(train_texts)} for training and {len(held_texts)} "
                           f"held out; add text, raise data.heldout_share, or use data.text_unit: paragraph")
    if not resume:
        run_id, run_dir = ws.new_run_dir("pretrain", cfg.name)
        if main:
            (run_dir / "config.yaml").write_text(cfglib.dump(cfg), encoding="utf-8")

    import transformers
    from transformers import AutoTokenizer

    from tunelab.environment import capture
    from tunelab.train.numerics import blocks_perplexity
    from tunelab.train.device import plan
    from tunelab.train._run import write_probe

    transformers.logging.set_verbosity_error()
    lineage = {"run_id": run_id, "parent_id": parent_id, "base_model": None, **data_lineage}
    if main:
        write_json(run_dir / "lineage.json", lineage)
        write_json(run_dir / "environment.json", capture())
    if main and not resume:
        catalog.add_run(id=run_id, kind="pretrain", dir=run_dir, name=cfg.name, parent_id=parent_id,
                        dataset_id=lineage["dataset_id"], config=cfg.model_dump(mode="json"))
    elif main:
        catalog.update_run(run_id, status="running")

    try:
        if main:
            with open(run_dir / "rejects.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rejects)

        # 2. tokenizer: trained on the training documents only (held-out text stays unseen), or reused.
        # Under --nproc rank 0 makes it and the other ranks load what it saved: one vocabulary for all.
        tok_dir = run_dir / "tokenizer"
        with main_first():
            if tok_dir.is_dir():  # --resume (or another rank made it): the tokenizer this run already has
                tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            elif cfg.tokenizer.path:
                tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer.path)
                tokenizer.save_pretrained(tok_dir)
            else:
                t0 = time.time()
                tokenizer = train_tokenizer(train_texts, cfg.tokenizer, cfg.model.context_length)
                tokenizer.save_pretrained(tok_dir)
                print(f"tokenizer: byte-level BPE, {len(tokenizer):,} tokens, trained in {time.time() - t0:.1f}s")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        # 3. pack into fixed blocks
        block = cfg.data.block_size or cfg.model.context_length
        train_pack = tokenize_and_pack(tokenizer, train_texts, block)
        held_pack = tokenize_and_pack(tokenizer, held_texts, block)
        eval_blocks = spread(held_pack.blocks, cfg.data.max_eval_blocks)
        if not train_pack.blocks or not eval_blocks:
            raise TunelabError(f"too little text for one {block}-token block in training and held out "
                               f"({train_pack.tokens} and {held_pack.tokens} tokens); lower data.block_size")
        data_report = {"documents": len(texts), "rejected": len(rejects), "train": train_pack.as_dict(),
                       "heldout": {**held_pack.as_dict(), "eval_blocks": len(eval_blocks)}}
        print(f"data: {len(train_texts)} train / {len(held_texts)} held-out documents; "
              f"{train_pack.tokens:,} train tokens → {len(train_pack.blocks)} blocks of {block} "
              f"(dropped {train_pack.dropped} in the final partial block); {len(eval_blocks)} held-out blocks "
              f"scored; rejected records: {len(rejects)}")

        # 4. model at random init, and its held-out perplexity (~vocabulary size)
        model = build_model(cfg.model, tokenizer, cfg.train.seed).to(local_device(plan(cfg.train.precision).device))
        if main:  # evaluations are rank 0's (no RNG is drawn: the ranks stay in step)
            before = blocks_perplexity(model, eval_blocks, cfg.train.batch_size)
            print(f"held-out perplexity at random init: {before['perplexity']:.2f}")

        # 5. train (best weights restored when there was validation)
        model, trainer, out, dplan = train_blocks(model, tokenizer, train_pack.blocks, eval_blocks, cfg.train,
                                                  run_dir, f"pretrain {run_id}", bool(resume))
        if not main:
            return worker_summary(run_id)
        after = blocks_perplexity(model, eval_blocks, cfg.train.batch_size)

        # 6. save an HF folder (model + tokenizer) that loads with AutoModelForCausalLM / AutoTokenizer
        model = model.to("cpu")  # saved and probed where a plain reload lands
        out_dir = run_dir / "model"
        save_folder(model, tokenizer, out_dir)
        write_probe(model, eval_blocks[0], run_dir / "probe.safetensors")

        total = sum(p.numel() for p in model.parameters())
        summary = {
            "run_id": run_id,
            "status": "completed",
            "method": "pretrain",
            "output": str(out_dir),
            **training_summary(trainer, out),
            "heldout_perplexity_before": round(before["perplexity"], 4),
            "heldout_perplexity_after": round(after["perplexity"], 4),
            "perplexity": {"before": before, "after": after},
            "trainable_params": total,
            "total_params": total,
            "vocab_size": len(tokenizer),
            "device": dplan.__dict__,
            "data": data_report,
            "wall_time_s": round(time.time() - started, 2),
        }
        summary["epochs_over_train_blocks"] = round(
            summary["tokens_trained"] / max(1, len(train_pack.blocks) * block), 3)
        write_json(run_dir / "summary.json", summary)
        catalog.update_run(run_id, status="completed", metrics={
            k: summary[k] for k in ("heldout_perplexity_before", "heldout_perplexity_after", "best_eval_loss",
                                    "steps", "tokens_trained", "tokens_per_s")})
        print(f"pretrain {run_id}: held-out perplexity {before['perplexity']:.2f} → {after['perplexity']:.2f} "
              f"over {after['tokens']:,} tokens; {summary['tokens_trained']:,} tokens trained; model in {out_dir}")
        return summary
    except BaseException as e:
        if main:
            catalog.update_run(run_id, status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
