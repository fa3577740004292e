"""Causal-LM training on raw text packed into fixed blocks: the steps pre-training (pretrain.py) and
continued pre-training (cpt.py) share.

Documents (``data.loaders.load_texts``, held out by ``split_heldout``) are tokenized and joined with
EOS into blocks of one length (``numerics.pack_blocks``); a fixed, spread-out set of held-out blocks
is scored before and after (``numerics.blocks_perplexity``); transformers' Trainer trains on the
blocks inside the run lifecycle (``_run``: metrics, resume, cancel, early stopping).
"""

from __future__ import annotations

from tunelab.data.loaders import load_texts, split_heldout
from tunelab.errors import TunelabError
from tunelab.train import _run
from tunelab.train.distributed import world_size
from tunelab.train.numerics import PadCollator, pack_blocks


def documents(sec, field: str, rejects: list[dict], need_train: bool = True) -> tuple[list, list, list]:
    """(all, training, held-out) documents of a text section (``files``, ``text_unit``, ``limit``,
    ``heldout_share``), held out by content hash; too few on a side that is needed is one error naming the fix."""
    texts = load_texts(sec.files, sec.text_unit, sec.limit, rejects)
    train, held = split_heldout(texts, sec.heldout_share)
    if not held or (need_train and not train):
        raise TunelabError(f"{len(texts)} documents in {field}.files gave {len(train)} for training and {len(held)} "
                           f"held out; add text, raise {field}.heldout_share, or use {field}.text_unit: paragraph")
    return texts, train, held


def tokenize_and_pack(tokenizer, texts: list[str], block_size: int, batch: int = 256):
    """Documents → token ids → blocks of ``block_size`` joined with EOS (``numerics.Packed``)."""
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


def train_blocks(r: _run.Run, model, tokenizer, train: list[list[int]], evals: list[list[int]], dplan):
    """Train a causal LM on packed blocks (validation on ``evals``, early stopping, checkpoints, --resume);
    the best weights are loaded at the end when there was validation. Returns (the model with its plain
    forward, trainer, train output)."""
    from transformers import Trainer

    from tunelab.train._cpu_speed import Speedups, fused_loss_applies, fused_loss_trainer

    tc = r.cfg.train
    speed = Speedups(dplan, getattr(r.cfg, "method", "full"), tc.speedups).apply(model, r.dir)
    # every position of a packed block is a target: "response-only" is all of them, but the frozen head of a
    # LoRA model still computes its NLL in chunks, without the [tokens x vocab] logits and their gradient
    speed.note("fused response-only loss", speed.on and fused_loss_applies(model),
                       "every block position is a target; a frozen LM head's NLL in chunks, no full logits"
                       if speed.on and fused_loss_applies(model) else "off (train.speedups: off)" if not speed.on
                       else "the model's own forward computes the logits")
    r.speedups = speed
    feats = [{"input_ids": b, "labels": b} for b in train]  # every position is a target in pretraining
    eval_feats = [{"input_ids": b, "labels": b} for b in evals]
    total_steps = _run.steps_total(len(feats), tc)
    has_val = bool(eval_feats)
    args = _run.training_args(tc, dplan, r.checkpoints, has_val=has_val, total_steps=total_steps,
                              include_num_input_tokens_seen="non_padding",
                              train_sampling_strategy="random",  # blocks all have one length: nothing to group
                              remove_unused_columns=False, prediction_loss_only=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = (fused_loss_trainer() if speed.on else Trainer)(model=model, args=args, train_dataset=feats, eval_dataset=eval_feats or None,
                      data_collator=PadCollator(pad), processing_class=tokenizer,
                      callbacks=r.callbacks(patience=tc.early_stopping_patience if has_val else None))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"device: {dplan.why}; {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%); {total_steps} steps of {tc.batch_size * tc.grad_accum} blocks")
    print(speed.line())
    try:
        out = r.train(trainer)
    finally:
        speed.restore()  # the exact fp32 base again (perplexity after, probe, merges)
    # accelerate wraps forward in autocast for mixed precision (bf16 on AMX CPUs); unwrap it so the
    # perplexity after training is measured in fp32 like the one before, and the probe matches a reload.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return model, trainer, out


def training_summary(trainer, out) -> dict:
    """Steps, early stop, best step/loss, tokens trained and tokens/s, from the Trainer's state."""
    st = trainer.state
    rows = _run.train_rows(st.log_history)
    runtime = out.metrics.get("train_runtime", 0.0)
    return {
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "early_stopped": bool(st.best_model_checkpoint and st.global_step < st.max_steps),
        "best_step": _run.best_step(st),
        "best_eval_loss": st.best_metric,
        "final_train_loss": rows[-1]["loss"] if rows else None,
        "train_runtime_s": round(runtime, 2),
        "tokens_trained": st.num_input_tokens_seen,
        "tokens_per_s": round(st.num_input_tokens_seen / max(runtime, 1e-9), 2),
        "world_size": world_size(),
        "global_batch_size": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
        * world_size(),
    }
