"""Pre-training from scratch (small scale): a BPE tokenizer and a Llama-architecture model from a config.

    tunelab train examples/pretrain_tinyshakespeare.yaml [--set train.max_steps=200] [--resume RUN_ID]

Top to bottom: read raw text → hold out documents by content hash → train a byte-level BPE
tokenizer on the training documents (or reuse a tokenizer folder) → pack documents joined with
EOS into fixed blocks → a randomly initialized Llama from ``model:`` → held-out perplexity at
random init → transformers Trainer (validation on the held-out blocks, early stopping,
checkpoints) → held-out perplexity of the best weights → ``run_dir/model`` (HF folder with the
tokenizer) → summary.

Reading and holding out raw text are ``data/loaders.py``'s; packing and the block Trainer are
``train/blocks.py``'s, shared with continued pre-training (cpt.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab.config import Strict
from tunelab.data.lineage import absolute_paths, text_lineage
from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.sections import SFT_ONLY_TRAIN, TextDataSection, TrainSection, refuse_unread
from tunelab.train import _run
from tunelab.train.blocks import documents, spread, tokenize_and_pack, train_blocks, training_summary
from tunelab.train.device import plan
from tunelab.train.distributed import local_device, main_first
from tunelab.train.numerics import blocks_perplexity
from tunelab.workspace import Workspace


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
    def _unread(self):
        # padding-free batches are SFT's; train.group_by_length is accepted and changes nothing here:
        # every packed block has one length (the Trainer samples them at random)
        refuse_unread(self.train, "train", "pretrain", SFT_ONLY_TRAIN)
        return self

    @model_validator(mode="after")
    def _block_fits(self):
        if self.data.block_size and self.data.block_size > self.model.context_length:
            raise ValueError(f"data.block_size {self.data.block_size} exceeds model.context_length "
                             f"{self.model.context_length}; lower it or raise the context")
        return self


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

def run(cfg: PretrainConfig | None, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train a tokenizer and a model from scratch; return the summary (also in ``summary.json``)."""
    return _run.execute("pretrain", cfg, _steps, PretrainConfig, workspace, resume, parent_id)


def _steps(r: _run.Run) -> dict:
    import transformers

    cfg = r.cfg
    if not r.resumed:
        if cfg.tokenizer.path and not Path(cfg.tokenizer.path).is_dir():
            raise TunelabError(f"tokenizer.path: folder not found: {cfg.tokenizer.path}")
        tok = cfg.tokenizer.path and cfg.tokenizer.model_copy(update={"path": str(Path(cfg.tokenizer.path).resolve())})
        cfg = cfg.model_copy(update={"data": absolute_paths(cfg.data), "tokenizer": tok or cfg.tokenizer})
    data_lineage = text_lineage({"data": cfg.data})  # a missing file fails here, before a run directory is made

    # 1. raw text → training and held-out documents (by content hash); a mistake fails before a run exists
    rejects: list[dict] = []
    texts, train_texts, held_texts = documents(cfg.data, "data", rejects)
    transformers.logging.set_verbosity_error()
    r.begin(cfg, base_model=None, lineage=data_lineage)
    r.write_rejects(rejects)

    # 2. tokenizer: trained on the training documents only (held-out text stays unseen), or reused.
    # Under --nproc rank 0 makes it and the other ranks load what it saved: one vocabulary for all.
    tok_dir = r.dir / "tokenizer"
    with main_first():
        if tok_dir.is_dir():  # --resume (or another rank made it): the tokenizer this run already has
            tokenizer = _load_tokenizer(tok_dir)
        elif cfg.tokenizer.path:
            tokenizer = _load_tokenizer(Path(cfg.tokenizer.path))
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
    dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
    model = build_model(cfg.model, tokenizer, cfg.train.seed).to(local_device(dplan.device))
    if r.main:  # evaluations are rank 0's (no RNG is drawn: the ranks stay in step)
        before = blocks_perplexity(model, eval_blocks, cfg.train.batch_size)
        print(f"held-out perplexity at random init: {before['perplexity']:.2f}")

    # 5. train (best weights restored when there was validation)
    model, trainer, out = train_blocks(r, model, tokenizer, train_pack.blocks, eval_blocks, dplan)
    if not r.main:
        return r.worker_summary()
    after = blocks_perplexity(model, eval_blocks, cfg.train.batch_size)

    # 6. save an HF folder (model + tokenizer) that loads with AutoModelForCausalLM / AutoTokenizer
    model = model.to("cpu")  # saved and probed where a plain reload lands
    out_dir = _run.save_output(model, tokenizer, r.dir, adapter=False)
    _run.write_probe(model, eval_blocks[0], r.dir / "probe.safetensors")

    total = sum(p.numel() for p in model.parameters())
    trained = training_summary(trainer, out)
    summary = r.finish({
        "method": "pretrain",
        "output": str(out_dir),
        **trained,
        "heldout_perplexity_before": round(before["perplexity"], 4),
        "heldout_perplexity_after": round(after["perplexity"], 4),
        "perplexity": {"before": before, "after": after},
        "trainable_params": total,
        "total_params": total,
        "vocab_size": len(tokenizer),
        "device": dplan.__dict__,
        "data": data_report,
        "epochs_over_train_blocks": round(trained["tokens_trained"] / max(1, len(train_pack.blocks) * block), 3),
    }, catalog_metrics=("heldout_perplexity_before", "heldout_perplexity_after", "best_eval_loss", "steps",
                        "tokens_trained", "tokens_per_s"))
    print(f"pretrain {r.id}: held-out perplexity {before['perplexity']:.2f} → {after['perplexity']:.2f} "
          f"over {after['tokens']:,} tokens; {summary['tokens_trained']:,} tokens trained; model in {out_dir}")
    return summary


def _load_tokenizer(folder: Path):
    """A tokenizer folder (this run's, or ``tokenizer.path``), loaded through the one model reference."""
    tokenizer, _ = refs.load_tokenizer(refs.ModelRef(str(folder), folder), chat_template=False)
    return tokenizer
