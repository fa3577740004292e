"""Knowledge distillation: a small student learns from a larger teacher on chat/instruction data.

    tunelab train examples/distill_logits_stories260k.yaml [--set temperature=2.0] [--resume RUN_ID]

Two modes:

- ``mode: logits`` — the student matches the teacher's next-token distribution on the response
  tokens of the training chats (the same label mask as SFT): forward KL(teacher ‖ student)
  (Hinton et al. 2015, arXiv:1503.02531) or the generalized JSD of GKD (Agarwal et al. 2024,
  arXiv:2306.13649), softened by ``temperature`` and scaled by T²; ``alpha`` mixes in the
  hard-label cross-entropy on the reference responses. Teacher and student must share a tokenizer.
- ``mode: sequence`` — sequence-level distillation (Kim & Rush 2016, arXiv:1606.07947): the
  teacher answers the training prompts (greedy), and the student is instruction-tuned on those
  answers. Any two causal LMs work: only text passes between them.

Top to bottom: resolve teacher and student (model folders, packaged names or run ids; an
adapter run is its base + adapter) → tokenizers (logits: same vocabulary, checked) → data →
[sequence: teacher responses] → held-out quality of the student before training → student
(+ adapter, tunelab.train.peft) → transformers Trainer with one override (the loss) → save the
best student with the tokenizer → held-out comparison of teacher, student-at-start and student:
response perplexity and ROUGE-L against the references, parameter ratio, and generation
latency (median per prompt, same prompts and decoding, measured in this run) → summary.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab.config import Strict
from tunelab.data.lineage import absolute_paths, file_lineage
from tunelab.data.loaders import load_chats, train_validation_chats
from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.models.generation import generate
from tunelab.scoring import metrics as M
from tunelab.sections import SFT_ONLY_TRAIN, ChatDataSection, LoraSection, ModelSection, TrainSection, refuse_unread
from tunelab.train import _run
from tunelab.train import peft as tpeft
from tunelab.train._cpu_speed import Speedups
from tunelab.train.device import plan
from tunelab.train.distributed import main_first, world_size
from tunelab.train.numerics import (IGNORE_INDEX, PadCollator, distill_loss, print_data_report, prompt_ids,
                                    response_nll, response_only_loss, tokenize_all_chats)
from tunelab.train.peft import IA3Section
from tunelab.workspace import Workspace, write_json

_LOGIT_DEFAULTS = {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.0, "jsd_beta": 0.5}


class CompareSection(Strict):
    """The held-out comparison of teacher and student written to the summary (and eval/metrics.json)."""

    max_new_tokens: int = Field(64, ge=1, description="greedy tokens per answer (and per latency prompt)")
    batch_size: int = Field(16, ge=1, description="batch size for scoring and ROUGE generation")
    limit: int | None = Field(None, ge=1, description="compare on the first N held-out records")
    latency_prompts: int = Field(16, ge=1, description="prompts timed one at a time for the latency ratio")


class SequenceSection(Strict):
    """How the teacher answers the training prompts in ``mode: sequence``."""

    max_new_tokens: int = Field(128, ge=1, description="longest teacher response (tokens); longer ones are cut")
    batch_size: int = Field(16, ge=1)


class DistillConfig(Strict):
    """Recipe for teacher → student distillation."""

    recipe: Literal["distill"] = "distill"
    name: str | None = Field(None, description="a short name used in the run id")
    teacher: ModelSection
    student: ModelSection
    data: ChatDataSection
    mode: Literal["logits", "sequence"] = "logits"
    loss: Literal["forward_kl", "jsd"] = Field("forward_kl", description="logits: the divergence to minimize")
    temperature: float = Field(1.0, gt=0, description="logits: softmax temperature of both models (loss × T²)")
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="logits: weight of the hard-label CE on the references; "
                                                          "loss = alpha·CE + (1-alpha)·divergence")
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="jsd: teacher weight in the mixture (0.5: symmetric)")
    method: Literal["full", "lora", "dora", "rslora", "ia3"] = Field(
        "full", description="the student is small: train all its weights, or an adapter (tunelab.train.peft)")
    lora: LoraSection = LoraSection()
    ia3: IA3Section = IA3Section()
    sequence: SequenceSection = SequenceSection()
    train: TrainSection = TrainSection()
    eval: CompareSection = CompareSection()

    @model_validator(mode="after")
    def _consistent(self):
        refuse_unread(self.train, "train", "distill", SFT_ONLY_TRAIN)  # padded batches only (SFT-only option)
        problems = []
        if self.mode == "sequence":
            changed = [k for k, v in _LOGIT_DEFAULTS.items() if getattr(self, k) != v]
            if changed:
                problems.append(f"{', '.join(changed)} apply to mode: logits only (mode: sequence trains on the "
                                f"teacher's responses with cross-entropy); remove them or set mode: logits")
        if self.loss == "forward_kl" and self.jsd_beta != _LOGIT_DEFAULTS["jsd_beta"]:
            problems.append("jsd_beta applies to loss: jsd only")
        if not (self.data.test or self.data.validation or self.data.validation_split > 0):
            problems.append("distillation reports held-out quality of teacher and student: set data.test, "
                            "data.validation or data.validation_split")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ----------------------------------------------------------------------------- models

def check_same_vocabulary(t_tok, s_tok, teacher: str, student: str) -> None:
    """Logit distillation compares distributions token by token: both models must use one vocabulary."""
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    if tv != sv:
        diff = len(set(tv.items()) ^ set(sv.items()))
        raise TunelabError(
            f"logit distillation needs teacher and student to share a tokenizer: teacher '{teacher}' has "
            f"{len(tv):,} tokens, student '{student}' has {len(sv):,} ({diff:,} token/id pairs differ); "
            f"pick a student from the teacher's family or use mode: sequence (only text passes between them)")


def _n_params(model) -> int:
    """Parameters of the model as deployed (an unmerged adapter's own weights excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "ia3_" not in n)


# ----------------------------------------------------------------------------- trainer

def _trainer_class():
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """transformers' Trainer with one override: the distillation loss (teacher logits, or CE on
        teacher responses). ``distill_loss`` (and ``ce_loss``) are logged per response token."""

        def __init__(self, *args, teacher=None, kd: dict | None = None, fused: bool = True, **kw):
            super().__init__(*args, **kw)
            self.teacher = teacher.to(self.args.device).eval() if teacher is not None else None
            self.kd = kd or {}
            self.fused = fused  # logits only at response tokens (False: the plain full-logits computation)
            self._acc = {"train": [0.0, 0.0, 0], "eval": [0.0, 0.0, 0]}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # the losses call decoder and LM head directly, past accelerate's autocast on model.forward
            with self.accelerator.autocast():
                out = self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                    and self.accelerator.num_processes > 1:
                # num_items_in_batch counts the response tokens of all ranks and DDP averages gradients
                # over ranks: scale back by the rank count, as Trainer.compute_loss does (and sft.py)
                k = self.accelerator.num_processes
                out = (out[0] * k, {"loss": out[0] * k}) if return_outputs else out * k
            return out

        def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            acc = self._acc["train" if model.training else "eval"]
            if self.teacher is not None:
                loss, kd, ce, n = distill_loss(model, self.teacher, inputs, num_items_in_batch=num_items_in_batch,
                                               fused=self.fused, **self.kd)
            else:  # sequence level: the responses are the teacher's; the loss is SFT's
                n = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
                mean = response_only_loss(model, inputs) if self.fused else model(**inputs).loss
                kd = ce = float(mean.detach()) * n
                loss = mean * n / (num_items_in_batch.to(mean.device) if hasattr(num_items_in_batch, "to")
                                   else num_items_in_batch) if num_items_in_batch is not None else mean
            acc[0] += kd
            acc[1] += ce
            acc[2] += n
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs, start_time=None):
            mode = "eval" if "eval_loss" in logs else "train"
            kd, ce, n = self._acc[mode]
            if self.accelerator.num_processes > 1:  # every rank logs here: sum the ranks' token counts and losses
                import torch

                kd, ce, n = self.accelerator.reduce(torch.tensor([kd, ce, float(n)], dtype=torch.float64,
                                                                 device=self.args.device), reduction="sum").tolist()
            if n and (mode == "eval" or "loss" in logs):
                prefix = "eval_" if mode == "eval" else ""
                logs[f"{prefix}distill_loss"] = kd / n
                if self.teacher is not None and self.kd.get("alpha", 0) > 0:
                    logs[f"{prefix}ce_loss"] = ce / n
                self._acc[mode] = [0.0, 0.0, 0]
            super().log(logs, start_time)

    return DistillTrainer


# ----------------------------------------------------------------------------- held-out comparison

def score(model, tokenizer, chats: list[list[dict]], cfg: CompareSection, max_length: int, desc: str):
    """Response perplexity (teacher forcing, response tokens only) and ROUGE/BLEU of greedy answers."""
    prompts = [prompt_ids(tokenizer, c) for c in chats]
    refs = [c[-1]["content"] for c in chats]
    preds, gstats = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, desc=desc)
    feats, _ = tokenize_all_chats(tokenizer, chats, max_length)
    nll, n = response_nll(model, feats, cfg.batch_size, tokenizer.pad_token_id)
    m = M.text_metrics(preds, refs)
    m["perplexity"] = M.perplexity(nll, n)
    m["response_nll_per_token"] = nll / n
    m["response_nll_per_char"] = nll / max(1, sum(len(r) for r in refs))  # comparable across tokenizers
    per = M.rouge_per_example(preds, refs)
    rows = [{"index": i, "prompt": chats[i][-2]["content"] if len(chats[i]) > 1 else "", "reference": refs[i],
             "prediction": preds[i], "rougeL": per[i]["rougeL"], **gstats[i]} for i in range(len(chats))]
    return m, rows


def measure_latency(models: dict, chats: list[list[dict]], n_prompts: int, new_tokens: int) -> dict:
    """Median wall time to answer one prompt (batch 1, greedy, exactly ``new_tokens`` new tokens: EOS
    suppressed so both models do the same work), the models interleaved prompt by prompt after one
    warm-up each, so machine load hits both alike. ``models``: name → (model, tokenizer)."""
    import torch

    chats = chats[:n_prompts]
    times: dict[str, list[float]] = {k: [] for k in models}

    def one(model, tok, chat):
        ids = torch.tensor([prompt_ids(tok, chat)], device=model.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t0

    for model, tok in models.values():
        model.eval()
        one(model, tok, chats[0])  # warm-up: first-call allocations are not the model's speed
    for chat in chats:
        for name, (model, tok) in models.items():
            times[name].append(one(model, tok, chat))
    out = {"prompts": len(chats), "new_tokens": new_tokens, "batch_size": 1, "decoding": "greedy"}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[f"{name}_median_ms"] = round(1000 * med, 3)
        out[f"{name}_ms_per_token"] = round(1000 * med / new_tokens, 3)
    return out


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b not in (None, 0) else None


# ----------------------------------------------------------------------------- run

def _teacher_responses(teacher, t_tok, chats: list[list[dict]], seq: SequenceSection, desc: str):
    """Replace each chat's last assistant turn by the teacher's greedy answer; empty answers are dropped."""
    texts, _ = generate(teacher, t_tok, [prompt_ids(t_tok, c) for c in chats], seq.max_new_tokens, seq.batch_size,
                        desc=desc)
    out = [c[:-1] + [{"role": "assistant", "content": t}] for c, t in zip(chats, texts) if t.strip()]
    return out, len(chats) - len(out)


def _sequence_data(teacher, t_tok, chats, val_chats, cfg: DistillConfig, run_dir: Path, cache: Path):
    """mode: sequence: the teacher's greedy answers replace the references, generated once per run and
    kept in ``teacher_responses.jsonl`` (read back on --resume, and by ranks other than 0 under --nproc)."""
    if cache.is_file():
        rows = [json.loads(x) for x in cache.read_text(encoding="utf-8").splitlines() if x.strip()]
        chats = [r["messages"] for r in rows if r["split"] == "train"]
        val_chats = [r["messages"] for r in rows if r["split"] == "validation"]
        return chats, val_chats, json.loads((run_dir / "teacher_responses.json").read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    chats, dropped = _teacher_responses(teacher, t_tok, chats, cfg.sequence, "teacher answers train")
    val_chats, vdropped = (_teacher_responses(teacher, t_tok, val_chats, cfg.sequence, "teacher answers validation")
                           if val_chats else ([], 0))
    gen = {"train": len(chats), "validation": len(val_chats), "empty_dropped": dropped + vdropped,
           "seconds": round(time.perf_counter() - t0, 2), "max_new_tokens": cfg.sequence.max_new_tokens}
    tmp = cache.with_suffix(".partial")  # complete or absent: a rank waiting on it never reads half a file
    with open(tmp, "w", encoding="utf-8") as f:
        for split, cs in (("train", chats), ("validation", val_chats)):
            f.writelines(json.dumps({"split": split, "messages": c}, ensure_ascii=False) + "\n" for c in cs)
    write_json(run_dir / "teacher_responses.json", gen)
    tmp.replace(cache)
    return chats, val_chats, gen


def run(cfg: DistillConfig | None, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Distill; return the summary (also written to ``summary.json``)."""
    return _run.execute("distill", cfg, _steps, DistillConfig, workspace, resume, parent_id)


def _steps(r: _run.Run) -> dict:
    import transformers

    cfg = r.cfg.model_copy(update={"data": absolute_paths(r.cfg.data)})
    data_lineage = file_lineage(cfg.data)  # a missing file fails here, before a run folder is made
    transformers.logging.set_verbosity_error()
    # 1. teacher and student, and their tokenizers: a bad name or a vocabulary mismatch fails before the run folder
    teacher_ref = refs.resolve(cfg.teacher.name, r.ws, trust_remote_code=cfg.teacher.trust_remote_code)
    student_ref = refs.resolve(cfg.student.name, r.ws, trust_remote_code=cfg.student.trust_remote_code)
    t_tok, _ = refs.load_tokenizer(teacher_ref)
    s_tok, template_added = refs.load_tokenizer(student_ref)
    if cfg.mode == "logits":
        check_same_vocabulary(t_tok, s_tok, cfg.teacher.name, cfg.student.name)
    same_tokenizer = t_tok.get_vocab() == s_tok.get_vocab()
    # base_model_path: what a saved adapter attaches to (or the student's start folder)
    r.begin(cfg, base_model=cfg.student.name, lineage={
        "base_model_path": str(student_ref.path), "teacher": teacher_ref.describe(),
        "student": student_ref.describe(), **data_lineage})

    # 2. data: chats (held out: data.test, else the validation chats)
    rejects: list[dict] = []
    chats, val_chats = train_validation_chats(cfg.data, cfg.train.seed, rejects)
    test_chats = (load_chats(cfg.data.test, cfg.data, rejects, cfg.eval.limit) if cfg.data.test
                  else val_chats[: cfg.eval.limit] if cfg.eval.limit else val_chats)
    r.write_rejects(rejects)
    if not chats or not test_chats:
        raise TunelabError(f"need training and held-out examples: {len(chats)} train, {len(test_chats)} "
                           f"held out ({len(rejects)} rejected; see {r.dir / 'rejects.jsonl'})")

    dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
    teacher = refs.load(teacher_ref, merge=True).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    # 3. sequence mode: the teacher answers the training (and validation) prompts, once per run
    teacher_gen = {}
    if cfg.mode == "sequence":
        with main_first():  # under --nproc rank 0 generates once; the other ranks read its file
            chats, val_chats, teacher_gen = _sequence_data(teacher, t_tok, chats, val_chats, cfg, r.dir,
                                                           r.dir / "teacher_responses.jsonl")
        print(f"teacher responses: {teacher_gen['train']} train / {teacher_gen['validation']} validation "
              f"({teacher_gen['empty_dropped']} empty answers dropped) in {teacher_gen['seconds']} s")

    train_feats, train_stats = tokenize_all_chats(s_tok, chats, cfg.data.max_length)
    val_feats, val_stats = tokenize_all_chats(s_tok, val_chats, cfg.data.max_length)
    if not train_feats:
        raise TunelabError(f"no usable training examples in {cfg.data.train}")
    data_report = {"train": train_stats.as_dict(), "validation": val_stats.as_dict(), "rejected": len(rejects)}
    print_data_report(data_report, cfg.data.max_length)

    # 4. student (+ adapter); its held-out quality at the start, once per run
    transformers.set_seed(cfg.train.seed)  # adapter init draws from the global RNG
    continue_adapter = student_ref.adapter is not None and cfg.method != "full"
    student = refs.load(student_ref, trainable=continue_adapter, merge=True)
    start = _student_start(r, student, s_tok, test_chats, cfg)
    if cfg.method != "full" and not continue_adapter:
        student = tpeft.apply_peft(student, tpeft.peft_section(cfg), tokenizer_path=str(student_ref.tokenizer_path))
    if continue_adapter:
        print(f"student {cfg.student.name} is an adapter run: training its adapter further "
              f"(its own rank and targets; this recipe's lora/ia3 sections are not used)")
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())
    # the shared speed-ups: fast LoRA dropout / a bf16 frozen base for an adapter student; the teacher, used only
    # under no-grad, in bf16 under CPU bf16 autocast; student and teacher logits only at response tokens
    speed = Speedups(dplan, cfg.method, cfg.train.speedups).apply(student, r.dir)
    if cfg.mode == "logits":
        speed.freeze_model_bf16("teacher", teacher, r.dir)
    speed.note("fused response-only loss", speed.on,
               ("student and teacher logits only at response tokens; the teacher forward under no-grad"
                if cfg.mode == "logits" else "the student's logits only at response tokens, a frozen head's NLL "
                "in chunks") if speed.on else "off (train.speedups: off)")
    r.speedups = speed

    # 5. trainer
    total_steps = _run.steps_total(len(train_feats), cfg.train)
    has_val = bool(val_feats)
    args = _run.training_args(
        cfg.train, dplan, r.checkpoints, has_val=has_val, total_steps=total_steps,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        remove_unused_columns=False, prediction_loss_only=True)
    kd = ({"loss": cfg.loss, "temperature": cfg.temperature, "beta": cfg.jsd_beta, "alpha": cfg.alpha}
          if cfg.mode == "logits" else None)
    trainer = _trainer_class()(
        model=student, args=args, train_dataset=train_feats, eval_dataset=val_feats or None,
        data_collator=PadCollator(s_tok.pad_token_id), processing_class=s_tok,
        callbacks=r.callbacks(extra=("distill_loss", "ce_loss"),
                              patience=cfg.train.early_stopping_patience if has_val else None),
        teacher=teacher if cfg.mode == "logits" else None, kd=kd, fused=speed.on)
    what = (f"{cfg.loss}{f' (beta {cfg.jsd_beta})' if cfg.loss == 'jsd' else ''}, T={cfg.temperature}, "
            f"alpha={cfg.alpha}" if cfg.mode == "logits" else "cross-entropy on the teacher's responses")
    print(f"distill ({cfg.mode}: {what}); device: {dplan.why}; student {trainable:,} trainable of {total:,} "
          f"parameters; {total_steps} steps")
    print(speed.line())
    try:
        out = r.train(trainer)
    finally:
        speed.restore()  # the exact fp32 weights of teacher and student base again (comparison, probe)
    if not r.main:  # the model, probe, comparison and summary are rank 0's to write
        return r.worker_summary()

    # 6. save the best student (load_best_model_at_end restored it) with the tokenizer
    # without accelerate's mixed-precision forward wrapper: the saved weights, probe and the timing
    # against the (fp32) teacher all see the plain fp32 model
    student = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).to("cpu").eval()
    teacher = teacher.to("cpu")
    out_dir = _run.save_output(student, s_tok, r.dir, adapter=cfg.method != "full")
    _run.write_probe(student, (val_feats or train_feats)[0]["input_ids"], r.dir / "probe.safetensors")

    # 7. held-out comparison: teacher, student at start, student; parameters; latency
    comparison, s_rows, t_rows = _compare(teacher, t_tok, student, s_tok, start, test_chats, cfg, same_tokenizer)
    quality, latency = comparison["quality_retained"], comparison["latency"]
    _write_eval(r.dir, cfg, comparison, {"base": start["rows"], "tuned": s_rows, "teacher": t_rows})

    st = trainer.state
    train_rows = _run.train_rows(st.log_history)
    d_rows = [x["distill_loss"] for x in train_rows if "distill_loss" in x]
    summary = r.finish({
        "mode": cfg.mode,
        "method": cfg.method,
        "teacher": cfg.teacher.name,
        "student": cfg.student.name,
        "base_model": cfg.student.name,
        "output": str(out_dir),
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "early_stopped": bool(has_val and st.global_step < st.max_steps),
        "best_step": _run.best_step(st),
        "best_eval_loss": st.best_metric,
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "first_distill_loss": d_rows[0] if d_rows else None,
        "final_distill_loss": d_rows[-1] if d_rows else None,
        "quality_retained": quality,
        "rougeL_retained": quality["rougeL"],
        "parameter_ratio": comparison["parameter_ratio"],
        "latency_ratio": latency["ratio"],
        "comparison": comparison,
        "teacher_generation": teacher_gen or None,
        "train_runtime_s": round(out.metrics.get("train_runtime", 0.0), 2),
        "tokens_seen": st.num_input_tokens_seen,
        "tokens_per_s": round(st.num_input_tokens_seen / max(out.metrics.get("train_runtime", 1e-9), 1e-9), 2),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "device": dplan.__dict__,
        "chat_template": "tunelab fallback (model had none)" if template_added else "model's own",
        "data": data_report,
        "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
    }, catalog_metrics=("final_distill_loss", "best_eval_loss", "rougeL_retained", "parameter_ratio",
                        "latency_ratio"))
    _print_comparison(comparison)
    return summary


def _student_start(r: _run.Run, student, s_tok, test_chats, cfg: DistillConfig) -> dict | None:
    """The student's held-out quality before training, scored once per run (kept for --resume)."""
    start_file = r.dir / "eval" / "student_start.json"
    if not r.main:  # the held-out comparison is rank 0's (greedy decoding draws no RNG: ranks stay in step)
        return None
    if start_file.is_file():
        return json.loads(start_file.read_text(encoding="utf-8"))
    m, rows = score(student, s_tok, test_chats, cfg.eval, cfg.data.max_length, "student at start")
    start_file.parent.mkdir(exist_ok=True)
    write_json(start_file, {"metrics": m, "rows": rows})
    return {"metrics": m, "rows": rows}


def _compare(teacher, t_tok, student, s_tok, start: dict, test_chats, cfg: DistillConfig,
             same_tokenizer: bool) -> tuple[dict, list[dict], list[dict]]:
    """Teacher, student at start and trained student on the held-out chats: quality, parameters, latency;
    with the student's and the teacher's per-example rows (for eval/)."""
    s_metrics, s_rows = score(student, s_tok, test_chats, cfg.eval, cfg.data.max_length, "student")
    t_metrics, t_rows = score(teacher, t_tok, test_chats, cfg.eval, cfg.data.max_length, "teacher")
    deployed = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    t_params, s_params = _n_params(teacher), _n_params(deployed)
    latency = measure_latency({"teacher": (teacher, t_tok), "student": (deployed, s_tok)}, test_chats,
                              cfg.eval.latency_prompts, cfg.eval.max_new_tokens)
    latency["ratio"] = _ratio(latency["student_median_ms"], latency["teacher_median_ms"])
    quality = {
        "rougeL": _ratio(s_metrics["rougeL"], t_metrics["rougeL"]),
        # perplexities per token compare only under one tokenizer; per character they always do
        "perplexity": _ratio(t_metrics["perplexity"], s_metrics["perplexity"]) if same_tokenizer else None,
        "nll_per_char": _ratio(t_metrics["response_nll_per_char"], s_metrics["response_nll_per_char"]),
    }
    return {
        "held_out": len(test_chats),
        "data": cfg.data.test or "validation chats",
        "models": {"teacher": t_metrics, "student_start": start["metrics"], "student": s_metrics},
        "quality_retained": quality,
        "student_vs_start": {"rougeL": round(s_metrics["rougeL"] - start["metrics"]["rougeL"], 4),
                             "perplexity": _ratio(s_metrics["perplexity"], start["metrics"]["perplexity"])},
        "parameters": {"teacher": t_params, "student": s_params},
        "parameter_ratio": _ratio(s_params, t_params),
        "latency": latency,
        "same_tokenizer": same_tokenizer,
    }, s_rows, t_rows


def _write_eval(run_dir: Path, cfg: DistillConfig, comparison: dict, rows: dict[str, list[dict]]) -> None:
    """eval/ in the shape `tunelab eval` writes (base = student at start, tuned = distilled student) + teacher."""
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    for name, rs in rows.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs),
                                           encoding="utf-8")
    m = comparison["models"]
    write_json(out / "metrics.json", {
        "run_id": run_dir.name, "data": comparison["data"], "n_examples": comparison["held_out"],
        "decoding": {"strategy": "greedy", "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size},
        "models": {"base": m["student_start"], "tuned": m["student"], "teacher": m["teacher"]},
        "quality_retained": comparison["quality_retained"], "parameter_ratio": comparison["parameter_ratio"],
        "latency": comparison["latency"]})


def _print_comparison(c: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"held-out comparison: {c['held_out']} examples, greedy decoding")
    t.add_column("")
    for name in ("teacher", "student_start", "student"):
        t.add_column(name, justify="right")
    m, lat = c["models"], c["latency"]
    for k in ("rougeL", "perplexity"):
        t.add_row(k, *(f"{m[n][k]:.4f}" for n in ("teacher", "student_start", "student")))
    t.add_row("parameters", f"{c['parameters']['teacher']:,}", "", f"{c['parameters']['student']:,}")
    t.add_row(f"latency ms (median, {lat['new_tokens']} tokens)", f"{lat['teacher_median_ms']:.1f}", "",
              f"{lat['student_median_ms']:.1f}")
    Console(width=200).print(t)
    q = c["quality_retained"]
    print(f"quality retained: ROUGE-L {q['rougeL']}, perplexity {q['perplexity']}; parameter ratio "
          f"{c['parameter_ratio']}; latency ratio {lat['ratio']} (student / teacher)")
