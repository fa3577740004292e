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

import json
import math
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunelab import config as cfglib
from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.sections import LoraSection, ModelSection, TrainSection
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
    from tunelab.data.formats import BadRecord
    from tunelab.data.readers import read

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


def split_validation(examples: list[tuple[str, str]], share: float, seed: int) -> tuple[list, list]:
    """Hold out a share of train by content hash: duplicates land on the same side (no leak)."""
    from tunelab.data.split import content_fraction

    train, val = [], []
    for ex in examples:
        (val if content_fraction(list(ex), salt=f"val{seed}") < share else train).append(ex)
    return train, val


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


def build_model(model_path, method: str, lora: LoraSection, names: list[str], pad_token_id: int):
    """AutoModelForSequenceClassification with the label mapping, prepared for the chosen method."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, dtype=torch.float32,
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
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="SEQ_CLS",
            target_modules=lora_targets(model, lora.target_modules),
            modules_to_save=list(head)))  # a copy: peft extends the list it is given
    return model, head


def write_probe(model, feats: list[dict], path: Path) -> None:
    """Logits of the final model on a few fixed inputs, so anyone can check that the saved
    artifact, loaded back with plain transformers/peft, reproduces the trained model."""
    import torch
    from accelerate.utils import extract_model_from_parallel
    from safetensors.torch import save_file

    # Mixed-precision training leaves accelerate's autocast wrapper on model.forward; the probe must
    # hold what the saved fp32 weights compute, so the wrapper comes off (the last use of the model).
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    n = max(len(f["input_ids"]) for f in feats)
    ids = torch.zeros((len(feats), n), dtype=torch.long)
    mask = torch.zeros((len(feats), n), dtype=torch.long)
    pad = model.config.pad_token_id or 0
    ids.fill_(pad)
    for i, f in enumerate(feats):
        ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, :len(f["input_ids"])] = 1
    model.eval()
    with torch.no_grad():
        dev = next(model.parameters()).device
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()}, str(path))


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

    from tunelab._plot import new_figure, png_bytes

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

def run(cfg: ClassifyConfig, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Train; evaluate on the test file; return the summary (also written to ``summary.json``)."""
    from tunelab.train.distributed import is_main, world_size, worker_summary
    from tunelab.data.lineage import file_lineage as dataset_lineage
    from tunelab.train._run import last_checkpoint

    ws = workspace or Workspace.resolve()
    catalog = ws.catalog()
    main = is_main()  # under --nproc only rank 0 writes files and the catalog (tunelab/train/distributed.py)

    if resume:
        run_dir = ws.run_dir(resume)
        run_id = run_dir.name
        cfg = cfglib.load(ClassifyConfig, run_dir / "config.yaml")  # the run's own config, not the file's
    else:
        dataset_lineage(cfg.data)  # fail on a missing file before a run directory is made
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            k: str(Path(getattr(cfg.data, k)).resolve()) for k in ("train", "validation", "test")
            if getattr(cfg.data, k)})})
        run_id, run_dir = ws.new_run_dir("classify", cfg.name)
        if main:
            (run_dir / "config.yaml").write_text(cfglib.dump(cfg), encoding="utf-8")
    started = time.time()

    import torch
    import transformers
    from transformers import AutoTokenizer, DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from tunelab._optional import require
    from tunelab.environment import capture
    from tunelab.models import resolve
    from tunelab.train import callbacks as cb
    from tunelab.train.device import plan

    require("sklearn", "eval")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # per-shard load/save bars: noise next to the run's own bar
    model_path = resolve(cfg.model.name, ws)
    lineage = {"run_id": run_id, "parent_id": parent_id, "base_model": cfg.model.name,
               "base_model_path": str(model_path), **dataset_lineage(cfg.data)}
    if main:
        write_json(run_dir / "lineage.json", lineage)
        write_json(run_dir / "environment.json", capture())
    if main and not resume:
        catalog.add_run(id=run_id, kind="classify", dir=run_dir, name=cfg.name, parent_id=parent_id,
                        base_model=cfg.model.name, dataset_id=lineage["dataset_id"],
                        config=cfg.model_dump(mode="json"))
    elif main:
        catalog.update_run(run_id, status="running")

    try:
        # 1. tokenizer (decoders often lack a pad token: use EOS, the model finds the last real token)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

        # 2. data: (text, label) pairs; labels from train; unseen labels elsewhere are rejected
        d = cfg.data
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
        if main:
            with open(run_dir / "rejects.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rejects)
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
        model, head = build_model(model_path, cfg.method, cfg.lora, names, tokenizer.pad_token_id)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())

        # 4. trainer
        steps_per_epoch = math.ceil(len(train_feats) / (cfg.train.batch_size * cfg.train.grad_accum))
        total_steps = cfg.train.max_steps or math.ceil(steps_per_epoch * cfg.train.epochs)
        has_val = bool(val_feats)
        metric = "eval_loss" if cfg.select_by == "loss" else cfg.select_by
        ckpt_dir = run_dir / "checkpoints"
        args = TrainingArguments(
            output_dir=str(ckpt_dir),
            per_device_train_batch_size=cfg.train.batch_size,
            per_device_eval_batch_size=cfg.train.batch_size * 2,  # no gradients: twice the batch fits
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
            activation_checkpointing=dplan.gradient_checkpointing,
            eval_strategy="steps" if has_val else "no",
            eval_steps=cfg.train.eval_every,
            save_strategy="steps",
            save_steps=cfg.train.eval_every,
            save_total_limit=cfg.train.save_total_limit,
            load_best_model_at_end=has_val,
            metric_for_best_model=metric if has_val else None,
            greater_is_better=(metric != "eval_loss") if has_val else None,
            restore_callback_states_from_checkpoint=True,
            logging_strategy="steps",
            logging_steps=1,
            include_num_input_tokens_seen="non_padding",
            train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            save_only_model=False,
        )
        callbacks = [cb.MetricsJsonl(run_dir / "metrics.jsonl"), cb.Progress(f"classify {run_id}")]
        if has_val and cfg.train.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
        trainer = Trainer(model=model, args=args, train_dataset=train_feats, eval_dataset=val_feats or None,
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                          compute_metrics=_compute_metrics, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        # A classification loss is the mean over the batch and ignores num_items_in_batch, but the forward
        # of every transformers model takes **kwargs, so the Trainer would treat it as a token-summed loss:
        # not divide it by grad_accum, and multiply it by the process count under --nproc (N times the
        # gradient). Declared here, the loss is averaged like any mean loss (docs/distributed.md).
        trainer.model_accepts_loss_kwargs = False

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
        print(f"device: {dplan.why}; method {cfg.method}: {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.2f}%; head: {', '.join(head)}); {total_steps} steps")
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

        # 5. save the best weights (load_best_model_at_end restored them) with the tokenizer and labels
        out_dir = run_dir / ("adapter" if cfg.method == "lora" else "model")
        if main:
            tmp = run_dir / f".{out_dir.name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "labels.json", {"id2label": dict(enumerate(names)), "label2id": label2id,
                                             "text_field": d.text_field, "label_field": d.label_field})
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)

        # 6. evaluation with the best weights: validation and test, every number from scikit-learn
        eval_dir = run_dir / "eval"
        # The eval sampler follows train_sampling_strategy: length-grouped batches would reorder the
        # predictions. Sequential order keeps them aligned with the texts written next to them.
        trainer.args.train_sampling_strategy = "random"
        # Under --nproc every rank predicts its share of the batches and Trainer.predict gathers them in
        # order (padding repeats dropped); rank 0 holds all predictions and writes them.
        preds = {split: trainer.predict(feats, metric_key_prefix=split)
                 for split, feats in (("validation", val_feats), ("test", test_feats)) if feats}
        if not main:
            return worker_summary(run_id)
        eval_dir.mkdir(exist_ok=True)
        results: dict[str, dict] = {}
        for split, feats, exs in (("validation", val_feats, val_ex), ("test", test_feats, test_ex)):
            if not feats:
                continue
            pred = preds[split]
            logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            results[split] = full_report(logits, pred.label_ids, names)
            probs = torch.softmax(torch.as_tensor(logits).float(), -1)
            conf, top = probs.max(-1)
            with open(eval_dir / f"{split}_predictions.jsonl", "w", encoding="utf-8") as f:
                for (text, lab), p, c in zip(exs, top.tolist(), conf.tolist()):
                    f.write(json.dumps({"text": text, "label": lab, "prediction": names[p],
                                        "confidence": round(c, 4), "correct": names[p] == lab}) + "\n")
            (run_dir / "plots").mkdir(exist_ok=True)
            (run_dir / "plots" / f"confusion_{split}.png").write_bytes(confusion_png(
                results[split]["confusion_matrix"], names,
                f"{split}: accuracy {results[split]['accuracy']:.3f}, macro-F1 {results[split]['macro_f1']:.3f}"))
        write_json(eval_dir / "metrics.json", {"labels": names, **results})
        write_probe(trainer.model, (val_feats or train_feats)[:4], run_dir / "probe.safetensors")

        st = trainer.state
        best_step = int(st.best_model_checkpoint.rsplit("-", 1)[-1]) if st.best_model_checkpoint else st.global_step
        train_rows = [r for r in st.log_history if "loss" in r and "eval_loss" not in r]
        runtime = out.metrics.get("train_runtime", 0.0)
        summary = {
            "run_id": run_id,
            "status": "completed",
            "method": cfg.method,
            "base_model": cfg.model.name,
            "output": str(out_dir),
            "labels": len(names),
            "steps": st.global_step,
            "max_steps": st.max_steps,
            "epochs_done": round(st.epoch or 0.0, 3),
            "early_stopped": bool(has_val and st.global_step < st.max_steps),
            "best_step": best_step,
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
            "world_size": world_size(),
            "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size(),
            "tokens_seen": st.num_input_tokens_seen,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "head": head,
            "device": dplan.__dict__,
            "data": data_report,
            "wall_time_s": round(time.time() - started, 2),
        }
        write_json(run_dir / "summary.json", summary)
        catalog.update_run(run_id, status="completed", metrics={
            k: summary[k] for k in ("test_accuracy", "test_macro_f1", "val_accuracy", "best_step", "steps")})
        shown = [f"{s} accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f} (n={r['n']})"
                 for s, r in results.items()]
        print(f"classify {run_id}: {'; '.join(shown) or 'no validation or test data'}; "
              f"{st.global_step} steps in {runtime:.0f} s; written: {out_dir}, {eval_dir / 'metrics.json'}")
        return summary
    except BaseException as e:
        if main:
            catalog.update_run(run_id, status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
