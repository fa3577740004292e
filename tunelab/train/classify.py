"""Transfer learning for text classification: linear probe, full fine-tuning or LoRA, on an encoder or a decoder.

    tunelab train examples/classify_banking77_minilm.yaml [--set method=lora] [--resume RUN_ID]

Top to bottom: resolve the model → tokenizer → data (a text field and a label field; the label set
comes from train; validation by content hash or from a file) → AutoModelForSequenceClassification
with id2label/label2id (backbone frozen for a linear probe, or LoRA with the head trained in full)
→ transformers Trainer: validation accuracy (or macro-F1, or loss) picks the best checkpoint, early
stopping → save the best model/adapter with the tokenizer and the labels → test metrics from
scikit-learn (accuracy, macro-F1, per-class report) and a confusion-matrix PNG → summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab._optional import require
from tunelab._plot import new_figure, png_bytes
from tunelab.config import Strict
from tunelab.data.formats import BadRecord
from tunelab.data.lineage import absolute_paths, file_lineage
from tunelab.data.loaders import split_validation
from tunelab.data.readers import read
from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.sections import SFT_ONLY_TRAIN, LoraSection, ModelSection, TrainSection, refuse_unread
from tunelab.train import _run
from tunelab.train._cpu_speed import Speedups
from tunelab.train.device import plan
from tunelab.train.distributed import world_size
from tunelab.train.peft import PeftSection, apply_peft, count_parameters
from tunelab.workspace import Workspace, write_json


class ClassifyDataSection(Strict):
    train: str = Field(description="training file (.csv, .jsonl, .json, .parquet)")
    validation: str | None = Field(None, description="validation file; or use validation_split")
    validation_split: float = Field(0.1, ge=0.0, lt=0.5, description="share of train held out by content hash")
    test: str | None = Field(None, description="held-out test file: accuracy, macro-F1, confusion matrix")
    text_field: str = Field("text", description="name of the text column/key")
    label_field: str = Field("label", description="name of the label column/key")
    max_length: int = Field(128, ge=8, description="tokens; longer texts are truncated and counted")
    limit: int | None = Field(None, ge=1, description="use only the first N training records")


class ClassifyConfig(Strict):
    """Recipe for sequence classification (transfer learning)."""

    recipe: Literal["classify"] = "classify"
    name: str | None = Field(None, description="a short name used in the run id")
    model: ModelSection
    data: ClassifyDataSection
    method: Literal["linear_probe", "full", "lora"] = Field(
        "full", description="linear_probe: frozen backbone, only the head trains; full: every weight; "
                            "lora: adapters on the backbone's linear layers, the head trained in full")
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    select_by: Literal["accuracy", "macro_f1", "loss"] = Field(
        "accuracy", description="validation metric that picks the best checkpoint and drives early stopping")

    @model_validator(mode="after")
    def _unread(self):
        refuse_unread(self.train, "train", "classify", SFT_ONLY_TRAIN)  # padding-free batches are SFT's
        return self


# ----------------------------------------------------------------------------- data

def _label_str(v) -> str | None:
    if v is None or isinstance(v, (dict, list)):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    return s or None


def load_examples(path: str, data: ClassifyDataSection, rejects: list[dict],
                  limit: int | None = None) -> list[tuple[str, str]]:
    """(text, label) pairs from a file; unusable records go to ``rejects`` with file, line and reason."""
    out: list[tuple[str, str]] = []
    for _, line, rec in read(path):
        if limit is not None and len(out) >= limit:
            break
        if isinstance(rec, BadRecord):
            reason = str(rec)
        elif not isinstance(rec, dict):
            reason = "record is not an object"
        elif data.text_field not in rec or data.label_field not in rec:
            miss = [f for f in (data.text_field, data.label_field) if f not in rec]
            reason = (f"no field {', '.join(repr(m) for m in miss)} (fields: {', '.join(map(str, rec))}); "
                      f"set data.text_field / data.label_field")
        elif not isinstance(rec[data.text_field], str) or not rec[data.text_field].strip():
            reason = "empty text"
        elif _label_str(rec[data.label_field]) is None:
            reason = "empty label"
        else:
            out.append((rec[data.text_field], _label_str(rec[data.label_field])))
            continue
        rejects.append({"file": str(path), "line": line, "reason": reason})
    return out


def label_names(examples: list[tuple[str, str]]) -> list[str]:
    """The sorted label set (numerically when every label is an integer)."""
    labels = {lab for _, lab in examples}
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def known_labels(examples: list[tuple[str, str]], label2id: dict, path: str, rejects: list[dict]) -> list:
    """Drop validation/test examples whose label the training set never shows (counted as rejects)."""
    keep = [ex for ex in examples if ex[1] in label2id]
    unseen = sorted({lab for _, lab in examples if lab not in label2id})
    for lab in unseen:
        n = sum(1 for _, x in examples if x == lab)
        rejects.append({"file": str(path), "line": None, "reason": f"label '{lab}' is not in the training labels "
                                                                    f"({n} records)"})
    return keep


def encode(tokenizer, examples: list[tuple[str, str]], label2id: dict, max_length: int) -> tuple[list[dict], dict]:
    """Token ids, attention mask and label id per example; how many were truncated is counted, not hidden."""
    if not examples:
        return [], {"examples": 0, "truncated": 0, "length_p50": 0, "length_p95": 0, "length_max": 0}
    texts = [t for t, _ in examples]
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    feats = [{"input_ids": ids, "attention_mask": m, "labels": label2id[lab]}
             for ids, m, (_, lab) in zip(enc["input_ids"], enc["attention_mask"], examples)]
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return feats, {"examples": len(feats), "truncated": sum(1 for n in lengths if n > max_length),
                   "length_p50": pct(0.5), "length_p95": pct(0.95), "length_max": lengths[-1]}


# ----------------------------------------------------------------------------- model

def head_modules(model) -> list[str]:
    """Names of the top-level modules outside the backbone that hold weights: the classification head
    (``classifier`` for BERT, ``score`` for Llama, ``pre_classifier`` + ``classifier`` for DistilBERT)."""
    base = getattr(model, model.base_model_prefix, None)
    return [n for n, m in model.named_children() if m is not base and any(True for _ in m.parameters())]


def lora_targets(model, target_modules: list[str] | str) -> list[str] | str:
    """'all-linear' → every Linear inside the backbone (full names), never the head, which trains in full."""
    import torch

    if target_modules != "all-linear":
        return target_modules
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    return sorted(f"{prefix}.{n}" for n, m in base.named_modules() if isinstance(m, torch.nn.Linear))


def build_model(model: refs.ModelRef | str | Path, method: str, lora: LoraSection, names: list[str],
                pad_token_id: int):
    """AutoModelForSequenceClassification with the label mapping, prepared for the chosen method."""
    model = refs.load(model, task="seq_cls", num_labels=len(names), id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)},
                      ignore_mismatched_sizes=True)  # a checkpoint with another head: keep the backbone, new head
    if model.config.pad_token_id is None:
        # decoders classify from the last non-pad token, so they must know the pad id
        model.config.pad_token_id = pad_token_id
    head = head_modules(model)
    if not head:
        raise TunelabError(f"cannot find the classification head of {type(model).__name__}")
    if method == "linear_probe":
        for n, p in model.named_parameters():
            p.requires_grad = n.split(".")[0] in head
    elif method == "lora":
        model = apply_peft(model, PeftSection(method="lora", lora=lora), "SEQ_CLS",
                           target_modules=lora_targets(model, lora.target_modules),
                           modules_to_save=list(head))  # a copy: peft extends the list it is given
    return model, head


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Rows padded on the right to one length, and their attention masks."""
    n = max(map(len, rows))
    return [x + [pad_id] * (n - len(x)) for x in rows], [[1] * len(x) + [0] * (n - len(x)) for x in rows]


# ----------------------------------------------------------------------------- metrics

def metrics_from_logits(logits, label_ids) -> dict:
    """Accuracy and macro-F1 (scikit-learn; macro over the classes present in truth or prediction)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    preds = np.asarray(logits).argmax(-1)
    return {"accuracy": float(accuracy_score(label_ids, preds)),
            "macro_f1": float(f1_score(label_ids, preds, average="macro", zero_division=0))}


def _compute_metrics(p) -> dict:
    logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
    return metrics_from_logits(logits, p.label_ids)


def full_report(logits, label_ids, names: list[str]) -> dict:
    """Accuracy, macro-F1, the per-class report and the confusion matrix, all from scikit-learn."""
    import numpy as np
    from sklearn.metrics import classification_report, confusion_matrix

    preds = np.asarray(logits).argmax(-1)
    ids = list(range(len(names)))
    return {**metrics_from_logits(logits, label_ids), "n": int(len(label_ids)),
            "per_class": classification_report(label_ids, preds, labels=ids, target_names=names,
                                               output_dict=True, zero_division=0),
            "confusion_matrix": confusion_matrix(label_ids, preds, labels=ids).tolist()}


def confusion_png(cm: list[list[int]], names: list[str], title: str) -> bytes:
    """Row-normalized confusion matrix (each row: where that true class went) as a PNG."""
    import numpy as np

    m = np.asarray(cm, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(names)
    side = min(max(4.0, 0.16 * k + 2.5), 16.0)
    fig = new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    font = 9 if k <= 12 else max(3, int(200 / k))
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=90, fontsize=font)
    ax.set_yticklabels(names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 12:
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title)
    return png_bytes(fig)


# ----------------------------------------------------------------------------- run

def run(cfg: ClassifyConfig | None, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train; evaluate on the test file; return the summary (also written to ``summary.json``)."""
    return _run.execute("classify", cfg, _steps, ClassifyConfig, workspace, resume, parent_id)


def _steps(r: _run.Run) -> dict:
    import torch
    import transformers
    from transformers import DataCollatorWithPadding, Trainer

    require("sklearn", "eval")
    cfg = r.cfg.model_copy(update={"data": absolute_paths(r.cfg.data)})
    d = cfg.data
    data_lineage = file_lineage(d)  # a missing file fails here, before a run folder is made
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # per-shard load/save bars: noise next to the run's own bar
    model_ref = refs.resolve(cfg.model.name, r.ws, trust_remote_code=cfg.model.trust_remote_code, runs=False)
    r.begin(cfg, base_model=cfg.model.name, lineage={"base_model_path": str(model_ref.path), **data_lineage})

    # 1. tokenizer (decoders often lack a pad token: use EOS, the model finds the last real token)
    tokenizer, _ = refs.load_tokenizer(model_ref, chat_template=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    # 2. data: (text, label) pairs; labels from train; unseen labels elsewhere are rejected
    rejects: list[dict] = []
    train_ex = load_examples(d.train, d, rejects, d.limit)
    if not train_ex:
        first = rejects[0]["reason"] if rejects else "the file is empty"
        raise TunelabError(f"no usable training examples in {d.train} ({len(rejects)} rejected; first: {first})")
    if d.validation:
        val_ex = load_examples(d.validation, d, rejects)
    elif d.validation_split > 0:
        train_ex, val_ex = split_validation(train_ex, d.validation_split, cfg.train.seed)
    else:
        val_ex = []
    names = label_names(train_ex)
    if len(names) < 2:
        raise TunelabError(f"{d.train}: only one label ('{names[0]}') in the training data; "
                           f"classification needs at least two (check data.label_field)")
    label2id = {n: i for i, n in enumerate(names)}
    val_ex = known_labels(val_ex, label2id, d.validation or d.train, rejects)
    test_ex = known_labels(load_examples(d.test, d, rejects), label2id, d.test, rejects) if d.test else []
    r.write_rejects(rejects)
    train_feats, train_stats = encode(tokenizer, train_ex, label2id, d.max_length)
    val_feats, val_stats = encode(tokenizer, val_ex, label2id, d.max_length)
    test_feats, test_stats = encode(tokenizer, test_ex, label2id, d.max_length)
    data_report = {"labels": len(names), "train": train_stats, "validation": val_stats, "test": test_stats,
                   "rejected": len(rejects)}
    print(f"data: {len(train_feats)} train / {len(val_feats)} validation / {len(test_feats)} test examples, "
          f"{len(names)} labels; p95 length {train_stats['length_p95']} tokens; truncated at {d.max_length}: "
          f"{train_stats['truncated'] + val_stats['truncated'] + test_stats['truncated']}; "
          f"rejected records: {len(rejects)}")
    if not val_feats:
        print("warning: no validation examples: the last checkpoint is kept and there is no early stopping")

    # 3. model: classification head with the label mapping (+ frozen backbone or LoRA)
    dplan = plan(cfg.train.precision, cfg.train.gradient_checkpointing)
    transformers.set_seed(cfg.train.seed)  # the new head and the adapter draw from the global RNG
    model, head = build_model(model_ref, cfg.method, cfg.lora, names, tokenizer.pad_token_id)
    trainable, total = count_parameters(model)

    # 4. trainer
    total_steps = _run.steps_total(len(train_feats), cfg.train)
    has_val = bool(val_feats)
    metric = "eval_loss" if cfg.select_by == "loss" else cfg.select_by
    args = _run.training_args(
        cfg.train, dplan, r.checkpoints, has_val=has_val, total_steps=total_steps, metric=metric,
        greater_is_better=metric != "eval_loss", include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=train_feats, eval_dataset=val_feats or None,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                      compute_metrics=_compute_metrics,
                      callbacks=r.callbacks(patience=cfg.train.early_stopping_patience if has_val else None))
    # A classification loss is the mean over the batch and ignores num_items_in_batch, but the forward
    # of every transformers model takes **kwargs, so the Trainer would treat it as a token-summed loss:
    # not divide it by grad_accum, and multiply it by the process count under --nproc (N times the
    # gradient). Declared here, the loss is averaged like any mean loss (docs/distributed.md).
    trainer.model_accepts_loss_kwargs = False
    print(f"device: {dplan.why}; method {cfg.method}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%; head: {', '.join(head)}); {total_steps} steps")
    speed = Speedups(dplan, cfg.method, cfg.train.speedups).apply(trainer.model, r.dir)
    speed.note("fused response-only loss", False, "does not apply: the head reads one pooled vector per text, "
                                                  "there are no per-token logits to skip")
    speed.note("length-grouped batches", cfg.train.group_by_length,
               "texts of similar length batched together: less padding (train.group_by_length)"
               if cfg.train.group_by_length else "train.group_by_length: false")
    r.speedups = speed
    print(speed.line())
    try:
        out = r.train(trainer)
    finally:
        speed.restore()

    # 5. save the best weights (load_best_model_at_end restored them) with the tokenizer and labels
    if r.main:
        out_dir = _run.save_output(trainer.model, tokenizer, r.dir, adapter=cfg.method == "lora", files={
            "labels.json": {"id2label": dict(enumerate(names)), "label2id": label2id,
                            "text_field": d.text_field, "label_field": d.label_field}})

    # 6. evaluation with the best weights: validation and test, every number from scikit-learn
    # The eval sampler follows train_sampling_strategy: length-grouped batches would reorder the
    # predictions. Sequential order keeps them aligned with the texts written next to them.
    trainer.args.train_sampling_strategy = "random"
    # Under --nproc every rank predicts its share of the batches and Trainer.predict gathers them in
    # order (padding repeats dropped); rank 0 holds all predictions and writes them.
    preds = {split: trainer.predict(feats, metric_key_prefix=split)
             for split, feats in (("validation", val_feats), ("test", test_feats)) if feats}
    if not r.main:
        return r.worker_summary()
    eval_dir = r.dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    for split, exs in (("validation", val_ex), ("test", test_ex)):
        if split not in preds:
            continue
        pred = preds[split]
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        results[split] = full_report(logits, pred.label_ids, names)
        probs = torch.softmax(torch.as_tensor(logits).float(), -1)
        conf, top = probs.max(-1)
        _run.write_rows(eval_dir / f"{split}_predictions.jsonl", [
            {"text": text, "label": lab, "prediction": names[p], "confidence": round(c, 4),
             "correct": names[p] == lab} for (text, lab), p, c in zip(exs, top.tolist(), conf.tolist())])
        (r.dir / "plots").mkdir(exist_ok=True)
        (r.dir / "plots" / f"confusion_{split}.png").write_bytes(confusion_png(
            results[split]["confusion_matrix"], names,
            f"{split}: accuracy {results[split]['accuracy']:.3f}, macro-F1 {results[split]['macro_f1']:.3f}"))
    write_json(eval_dir / "metrics.json", {"labels": names, **results})
    # Mixed-precision training leaves accelerate's autocast wrapper on model.forward; the probe must hold
    # what the saved fp32 weights compute, so the wrapper comes off (the last use of the model).
    probe_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    ids, mask = pad_right([f["input_ids"] for f in (val_feats or train_feats)[:4]],
                          probe_model.config.pad_token_id or 0)
    _run.write_probe(probe_model, ids, r.dir / "probe.safetensors", attention_mask=torch.tensor(mask))

    st = trainer.state
    runtime = out.metrics.get("train_runtime", 0.0)
    train_rows = _run.train_rows(st.log_history)
    summary = r.finish({
        "method": cfg.method,
        "base_model": cfg.model.name,
        "output": str(out_dir),
        "labels": len(names),
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "epochs_done": round(st.epoch or 0.0, 3),
        "early_stopped": bool(has_val and st.global_step < st.max_steps),
        "best_step": _run.best_step(st),
        "select_by": cfg.select_by,
        "best_eval_metric": st.best_metric,
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "val_accuracy": results.get("validation", {}).get("accuracy"),
        "val_macro_f1": results.get("validation", {}).get("macro_f1"),
        "test_accuracy": results.get("test", {}).get("accuracy"),
        "test_macro_f1": results.get("test", {}).get("macro_f1"),
        "test_examples": results.get("test", {}).get("n", 0),
        "train_runtime_s": round(runtime, 2),
        "examples_per_s": round(st.global_step * cfg.train.batch_size * cfg.train.grad_accum * world_size()
                                / max(runtime, 1e-9), 2),
        "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
        "tokens_seen": st.num_input_tokens_seen,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "head": head,
        "device": dplan.__dict__,
        "data": data_report,
    }, catalog_metrics=("test_accuracy", "test_macro_f1", "val_accuracy", "best_step", "steps"))
    shown = [f"{s} accuracy {x['accuracy']:.4f}, macro-F1 {x['macro_f1']:.4f} (n={x['n']})"
             for s, x in results.items()]
    print(f"classify {r.id}: {'; '.join(shown) or 'no validation or test data'}; "
          f"{st.global_step} steps in {runtime:.0f} s; written: {out_dir}, {eval_dir / 'metrics.json'}")
    return summary
