"""Continued pre-training (domain adaptation): next-token training of an existing model on raw domain text.

    tunelab train examples/cpt_contracts_stories260k.yaml [--set replay.ratio=0] [--resume RUN_ID]

Top to bottom: resolve the model and its tokenizer → domain text (held out by content hash) and
optional general text → pack both into fixed blocks → mix general blocks into training at
``replay.ratio`` (replay against catastrophic forgetting) → domain and general perplexity of the
base model on fixed held-out blocks → LoRA or full → Trainer (validation on the domain held-out
blocks, early stopping, checkpoints) → the same perplexities after → adapter/ or model/ → summary.

Forgetting is made visible: general perplexity before and after is measured on the same blocks
(token-weighted, exp(sum NLL / tokens)); set ``replay.ratio: 0`` to measure it without mixing.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field, model_validator

from tunelab.config import Strict
from tunelab.data.lineage import absolute_paths, text_lineage
from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.sections import SFT_ONLY_TRAIN, LoraSection, ModelSection, TextDataSection, TrainSection, refuse_unread
from tunelab.train import _run
from tunelab.train.blocks import documents, spread, tokenize_and_pack, train_blocks, training_summary
from tunelab.train.device import plan
from tunelab.train.distributed import local_device
from tunelab.train.numerics import blocks_perplexity
from tunelab.train.peft import adapter_report, apply_peft, peft_section
from tunelab.workspace import Workspace


class ReplaySection(Strict):
    """General text: mixed into training at ``ratio`` and scored before/after to show forgetting."""

    files: list[str] = Field(min_length=1, description="general text: files, folders or records with text")
    ratio: float = Field(0.2, ge=0.0, lt=1.0, description="share of training blocks drawn from this text; "
                                                           "0: only measure general perplexity")
    text_unit: Literal["document", "paragraph"] = "document"
    heldout_share: float = Field(0.05, gt=0.0, lt=0.5, description="general documents held out for perplexity")
    limit: int | None = Field(None, ge=1, description="use only the first N documents")


class CPTConfig(Strict):
    """Recipe for continued pre-training on raw text."""

    recipe: Literal["cpt"] = "cpt"
    name: str | None = Field(None, description="a short name used in the run id")
    model: ModelSection
    data: TextDataSection
    replay: ReplaySection | None = None
    method: Literal["lora", "full"] = "lora"
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()

    @model_validator(mode="after")
    def _unread(self):
        # padding-free batches are SFT's; train.group_by_length is accepted and changes nothing here:
        # every packed block has one length (the Trainer samples them at random)
        refuse_unread(self.train, "train", "cpt", SFT_ONLY_TRAIN)
        return self


def replay_blocks(general: list[list[int]], n_domain: int, ratio: float, seed: int) -> tuple[list[list[int]], dict]:
    """General blocks so that they are ``ratio`` of all training blocks: n = round(D·r / (1 − r)).

    Drawn without replacement when there are enough, else every block is repeated as evenly as
    possible (reported). Fixed by the seed."""
    want = round(n_domain * ratio / (1 - ratio)) if ratio > 0 else 0
    if want and not general:
        raise TunelabError("replay.ratio > 0 but the general text gave no training block; add general text")
    rng = random.Random(seed)
    idx: list[int] = []
    while len(idx) < want:
        idx += rng.sample(range(len(general)), min(len(general), want - len(idx)))
    picked = [general[i] for i in idx]
    return picked, {"ratio": ratio, "blocks": len(picked), "available": len(general),
                    "repeated": want > len(general),
                    "actual_share": round(len(picked) / max(1, n_domain + len(picked)), 4)}


def run(cfg: CPTConfig | None, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Continue pre-training; return the summary (also written to ``summary.json``)."""
    return _run.execute("cpt", cfg, _steps, CPTConfig, workspace, resume, parent_id)


def _steps(r: _run.Run) -> dict:
    import transformers

    cfg = r.cfg.model_copy(update={"data": absolute_paths(r.cfg.data),
                                   "replay": absolute_paths(r.cfg.replay) if r.cfg.replay else None})
    # a missing file fails here, before a run directory is made
    data_lineage = text_lineage({"data": cfg.data, **({"replay": cfg.replay} if cfg.replay else {})})

    # 1. domain text (+ general text) → held-out documents by content hash; mistakes fail before a run exists
    rejects: list[dict] = []
    domain, d_train, d_held = documents(cfg.data, "data", rejects)
    general, g_train, g_held = [], [], []
    if cfg.replay:  # only its held-out part is needed: replay.ratio 0 measures forgetting without mixing
        general, g_train, g_held = documents(cfg.replay, "replay", rejects, need_train=False)
    transformers.logging.set_verbosity_error()
    model_ref = refs.resolve(cfg.model.name, r.ws, trust_remote_code=cfg.model.trust_remote_code, runs=False)
    r.begin(cfg, base_model=cfg.model.name, lineage={"base_model_path": str(model_ref.path), **data_lineage})
    r.write_rejects(rejects)

    # 2. tokenizer, and the base model with its context (the block size unless set; capped at 1024 by default)
    tokenizer, _ = refs.load_tokenizer(model_ref, chat_template=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
    transformers.set_seed(cfg.train.seed)  # adapter init draws from the global RNG
    from tunelab.train._cpu_speed import attention_kwargs

    model = refs.load(model_ref, device=local_device(dplan.device), **attention_kwargs(dplan, cfg.method,
                                                                                        cfg.train.speedups))
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    block = cfg.data.block_size or min(int(context), 1024)
    if block > context:
        raise TunelabError(f"data.block_size {block} exceeds the model's context of {context} tokens; lower it")

    # 3. packed blocks; general blocks mixed into training at replay.ratio
    d_pack, dh_pack = tokenize_and_pack(tokenizer, d_train, block), tokenize_and_pack(tokenizer, d_held, block)
    d_eval = spread(dh_pack.blocks, cfg.data.max_eval_blocks)
    if not d_pack.blocks or not d_eval:
        raise TunelabError(f"too little domain text for one {block}-token block in training and held out "
                           f"({d_pack.tokens} and {dh_pack.tokens} tokens); lower data.block_size or add text")
    data_report = {"block_size": block, "domain": {"documents": len(domain), "train": d_pack.as_dict(),
                                                   "heldout": {**dh_pack.as_dict(), "eval_blocks": len(d_eval)}}}
    train_set, g_eval, replay_report = list(d_pack.blocks), [], None
    if cfg.replay:
        g_pack, gh_pack = tokenize_and_pack(tokenizer, g_train, block), tokenize_and_pack(tokenizer, g_held, block)
        g_eval = spread(gh_pack.blocks, cfg.data.max_eval_blocks)
        if not g_eval:
            raise TunelabError(f"no held-out general block of {block} tokens ({gh_pack.tokens} tokens held out); "
                               f"add general text, raise replay.heldout_share or use replay.text_unit: paragraph")
        mixed, replay_report = replay_blocks(g_pack.blocks, len(d_pack.blocks), cfg.replay.ratio, cfg.train.seed)
        train_set += mixed
        data_report["general"] = {"documents": len(general), "train": g_pack.as_dict(),
                                  "heldout": {**gh_pack.as_dict(), "eval_blocks": len(g_eval)}}
        data_report["replay"] = replay_report
    data_report["rejected"] = len(rejects)
    print(f"data: {len(d_train)} train / {len(d_held)} held-out domain documents → {len(d_pack.blocks)} blocks "
          f"of {block} (dropped {d_pack.dropped} tokens in the final partial block)"
          + (f"; replay: {replay_report['blocks']} general blocks ({100 * replay_report['actual_share']:.1f}% "
             f"of training{', repeated' if replay_report['repeated'] else ''})" if replay_report else "")
          + f"; rejected records: {len(rejects)}")

    # 4. the base model's perplexities on the fixed held-out blocks
    bs = cfg.train.batch_size
    evals = {"domain": d_eval, **({"general": g_eval} if g_eval else {})}
    if r.main:  # evaluations are rank 0's (no RNG is drawn: the ranks stay in step)
        before = {k: blocks_perplexity(model, v, bs) for k, v in evals.items()}
        print("base perplexity: " + ", ".join(f"{k} {v['perplexity']:.3f}" for k, v in before.items()))

    # 5. method, then train on domain blocks (+ replay), validating on the domain held-out blocks
    if cfg.method != "full":
        model = apply_peft(model, peft_section(cfg), "CAUSAL_LM")
    model, trainer, out = train_blocks(r, model, tokenizer, train_set, d_eval, dplan)
    if not r.main:
        return r.worker_summary()
    after = {k: blocks_perplexity(model, v, bs) for k, v in evals.items()}

    # 6. save the best weights (adapter or full model) with the tokenizer, and a reload probe
    model = model.to("cpu")  # saved and probed where a plain reload lands
    out_dir = _run.save_output(model, tokenizer, r.dir, adapter=cfg.method != "full")
    _run.write_probe(model, d_eval[0], r.dir / "probe.safetensors")

    params = adapter_report(model)
    summary = {
        "method": cfg.method,
        "base_model": cfg.model.name,
        "output": str(out_dir),
        **training_summary(trainer, out),
        "domain_perplexity_before": round(before["domain"]["perplexity"], 4),
        "domain_perplexity_after": round(after["domain"]["perplexity"], 4),
    }
    if g_eval:
        summary["general_perplexity_before"] = round(before["general"]["perplexity"], 4)
        summary["general_perplexity_after"] = round(after["general"]["perplexity"], 4)
        summary["forgetting_ratio"] = round(after["general"]["perplexity"] / before["general"]["perplexity"], 4)
    summary = r.finish({
        **summary,
        "perplexity": {"before": before, "after": after},
        "replay": replay_report,
        **{k: params[k] for k in ("trainable_params", "total_params", "trainable_percent")},
        "device": dplan.__dict__,
        "data": data_report,
    }, catalog_metrics=("domain_perplexity_before", "domain_perplexity_after", "general_perplexity_before",
                        "general_perplexity_after", "best_eval_loss", "steps", "tokens_trained", "tokens_per_s"))
    ppl = lambda part: f"{before[part]['perplexity']:.3f} → {after[part]['perplexity']:.3f}"  # noqa: E731
    general = (f"; general {ppl('general')}" if g_eval
               else "; general text not measured (add replay.files, ratio: 0 to measure forgetting)")
    print(f"cpt {r.id}: domain perplexity {ppl('domain')}{general}; {summary['tokens_trained']:,} tokens "
          f"trained; {out_dir.name} in {out_dir}")
    return summary
