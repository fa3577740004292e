"""Trainer callbacks: metrics.jsonl (loss, validation loss, lr, tokens/s per step) and a progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from tunelab._console import progress


class MetricsJsonl(TrainerCallback):
    """Append one JSON row per logged step to ``metrics.jsonl`` with tokens/s over that step."""

    def __init__(self, path: Path, extra: tuple[str, ...] = ()):
        self.path = path
        self.extra = extra  # recipe-specific keys of training rows, e.g. distill_loss
        self._t0 = None
        self._tokens0 = 0
        self._last = None

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()
        self._tokens0 = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        dt = time.perf_counter() - self._t0 if self._t0 else float("nan")
        tokens = state.num_input_tokens_seen - self._tokens0
        self._last = {"step_time_s": round(dt, 4), "step_tokens": int(tokens),
                      "tokens_per_s": round(tokens / dt, 2) if dt > 0 else None}

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero:  # a distributed run: one writer (logs are already all-reduced)
            return
        logs = dict(logs or {})
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": round(time.time(), 3)}
        if "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
            row["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50))
            # recipe metrics (classification accuracy, macro-F1, ...) next to the loss
            row.update({k: v for k, v in logs.items() if k.startswith("eval_") and k not in row
                        and not k.endswith(("_runtime", "_per_second"))})
        elif "loss" in logs:
            row.update({k: logs[k] for k in ("loss", "learning_rate", "grad_norm", *self.extra) if k in logs})
            row["tokens_seen"] = state.num_input_tokens_seen
            if self._last:
                row.update(self._last)
        else:
            return  # end-of-training summary logs go to summary.json instead
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class Progress(TrainerCallback):
    """One bar for the run with the latest loss and validation loss, and one for each validation pass (the
    Trainer's own bars are off), so no phase of training is silent; plain lines where stderr is not a terminal."""

    def __init__(self, desc: str = "train"):
        self.desc = desc
        self.bar = None
        self.val_bar = None
        self.post: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kw):
        self.bar = progress(state.max_steps, self.desc, unit="step", initial=state.global_step)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
        if self.val_bar is None:
            n = len(eval_dataloader.dataset) if eval_dataloader is not None and hasattr(eval_dataloader, "dataset") \
                else None
            self.val_bar = progress(n, f"validation at step {state.global_step}", unit="ex")
        size = getattr(eval_dataloader, "batch_size", None) or args.per_device_eval_batch_size
        total = self.val_bar.total
        self.val_bar.update(min(size, total - self.val_bar.n) if total else size)

    def on_evaluate(self, args, state, control, **kw):
        if self.val_bar is not None:
            self.val_bar.close()
            self.val_bar = None

    def on_step_end(self, args, state, control, **kw):
        if self.bar:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" in logs:
            self.post["loss"] = f"{logs['loss']:.3f}"
        if "eval_loss" in logs:
            self.post["val"] = f"{logs['eval_loss']:.3f}"
        if self.bar:
            self.bar.set_postfix(self.post, refresh=False)

    def on_train_end(self, args, state, control, **kw):
        if self.bar:
            self.bar.close()
            self.bar = None


def release_input_grads(model) -> bool:
    """Remove the hook that makes the input embeddings' output require a gradient (``enable_input_require_grads``,
    which transformers sets whenever it turns on gradient checkpointing and TRL's trainers set for PEFT models);
    True if there was one. Reentrant checkpointing needed it: a checkpointed block whose input needs no gradient
    gave its parameters none. Non-reentrant checkpointing (transformers' default) does not, and with the hook the
    backward pass also runs through the frozen layers below the lowest adapter (every layer with
    ``lora.last_layers``; the first layer's input gradient otherwise): computed and thrown away."""
    from tunelab.train._cpu_speed import _transformers_model

    base = _transformers_model(model)
    if getattr(base, "_require_grads_hook", None) is None or not hasattr(base, "disable_input_require_grads"):
        return False
    base.disable_input_require_grads()
    return True


def _no_input_grads() -> None:
    """Stands in for ``enable_input_require_grads`` on a model while :class:`InputGradsOff` trains it."""


class InputGradsOff(TrainerCallback):
    """At the start of training, :func:`release_input_grads` when gradient checkpointing is on and not reentrant
    (the Trainer turns checkpointing on, with the hook, just before ``on_train_begin``), and keep it off until
    the end: TRL's DPO, GRPO and RLOO trainers turn checkpointing off and on again around each reference forward,
    which would add the hook back every step, so ``enable_input_require_grads`` is a no-op on the model meanwhile."""

    def __init__(self):
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # transformers 5 names them activation_checkpointing(_kwargs); gradient_checkpointing* are older aliases
        on = getattr(args, "activation_checkpointing", None)
        on = getattr(args, "gradient_checkpointing", False) if on is None else on
        kw = dict(getattr(args, "activation_checkpointing_kwargs", None)
                  or getattr(args, "gradient_checkpointing_kwargs", None) or {})
        kw.pop("every_n_layers", None)
        kw.pop("offload", None)
        # transformers checkpoints non-reentrant when given no other arguments; with others, torch's own default
        # decides, which has been reentrant: keep the hook then
        if model is None or not on or kw.get("use_reentrant", bool(kw)):
            return
        from tunelab.train._cpu_speed import _transformers_model

        base = _transformers_model(model)
        release_input_grads(base)
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads = _no_input_grads
            self._model = base

    def on_train_end(self, args, state, control, **kwargs):
        if self._model is not None and "enable_input_require_grads" in vars(self._model):
            del self._model.enable_input_require_grads
        self._model = None


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows logged after ``after_step`` (work lost to an interruption, redone on resume)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
