"""The run lifecycle: the one place where a training run starts, records its state, fails, is
interrupted or cancelled, resumes and finishes. Every recipe's ``run()`` is one call::

    def run(cfg, workspace=None, resume=None, parent_id=None):
        return _run.execute("reward", cfg, _steps, RewardConfig, workspace, resume, parent_id)

and ``_steps(r: Run)`` holds the method's own steps. What this module owns:

- resume: ``--resume RUN`` reloads the run's own config.yaml and continues from the newest complete
  checkpoint (metrics logged after it are dropped);
- the run folder, config.yaml, lineage.json, environment.json, the catalog row and its states
  ``queued → running → completed | failed | interrupted | cancelled`` (``begin`` makes the folder
  and the row together, after the recipe has checked its inputs and resolved its model, so a bad
  model name leaves neither);
- a heartbeat (pid, host, time) so ``tunelab runs list`` shows a run whose process died as
  ``interrupted`` (tunelab/catalog.py), and the error message of a failed run;
- cooperative cancel: a file ``CANCEL`` in the run folder (``Workspace.request_cancel``) is seen at
  the next optimizer step: the Trainer saves a checkpoint and the run ends ``cancelled``;
  ``--resume`` continues it;
- rank-0 guards under ``--nproc`` (only rank 0 writes files and the catalog);
- the one ``training_args`` builder for transformers' and TRL's argument classes;
- saving the trained weights atomically, the reload probe and summary.json.

Plain functions and one record (no base class): recipes call what they need.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab import allocator
from tunelab import config as cfglib
from tunelab.catalog import HEARTBEAT_S
from tunelab.environment import capture
from tunelab.errors import TunelabError
from tunelab.train.distributed import is_main, rank, world_size
from tunelab.workspace import CANCEL_FILE, Workspace, umask_modes, write_json


class Cancelled(Exception):
    """A run stopped because its CANCEL file appeared: at a step boundary (a checkpoint was saved), or between
    batches of a phase outside the training steps (``phase``: the held-out evaluation before or after training)."""

    def __init__(self, step: int, phase: str | None = None):
        super().__init__(f"cancelled at step {step}" + (f" ({phase})" if phase else ""))
        self.step = step
        self.phase = phase


class _Terminated(KeyboardInterrupt):
    """SIGTERM: treated like Ctrl-C, so the run is recorded as interrupted (and can be resumed)."""


@dataclass
class Run:
    """One run in progress: its config, folder, catalog row and what the recipe recorded."""

    kind: str
    cfg: Any
    ws: Workspace
    resumed: bool
    parent_id: str | None = None
    id: str | None = None
    dir: Path | None = None
    main: bool = field(default_factory=is_main)
    started: float = field(default_factory=time.time)
    lineage: dict = field(default_factory=dict)
    began: bool = False
    cancel_step: int | None = None
    loss: dict | None = None  # final_loss() of the trained Trainer
    speedups: Any = None  # the run's _cpu_speed.Speedups: its record goes into summary.json
    _stop: threading.Event | None = None

    @property
    def catalog(self):
        return self.ws.catalog()

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    # ------------------------------------------------------------------ start

    def begin(self, cfg=None, *, base_model: str | None, lineage: dict, parent_id: str | None = None,
              dataset_id: str | None = None) -> dict:
        """Make the run folder (a new run) and its catalog row, and write config.yaml, lineage.json and
        environment.json. Call it once the recipe has checked its inputs and resolved its model."""
        if cfg is not None:
            self.cfg = cfg
        if not self.resumed:
            self.id, self.dir = self.ws.new_run_dir(self.kind, getattr(self.cfg, "name", None))
            if self.main:
                (self.dir / "config.yaml").write_text(cfglib.dump(self.cfg), encoding="utf-8")
        self.parent_id = parent_id or self.parent_id
        self.lineage = {"run_id": self.id, "parent_id": self.parent_id, "base_model": base_model, **lineage}
        if self.main:
            (self.dir / CANCEL_FILE).unlink(missing_ok=True)  # a resume is a request to go on
            write_json(self.dir / "lineage.json", self.lineage)
            write_json(self.dir / "environment.json", capture())
            cat = self.catalog
            if cat.get_run(self.id) is None:  # a new run (or one a job queue pre-assigned an id to)
                cat.add_run(id=self.id, kind=self.kind, dir=self.dir, name=getattr(self.cfg, "name", None),
                            parent_id=self.parent_id, base_model=base_model,
                            dataset_id=dataset_id or self.lineage.get("dataset_id"),
                            config=self.cfg.model_dump(mode="json"))
            cat.update_run(self.id, status="running", pid=os.getpid(), host=socket.gethostname(),
                           heartbeat_at=time.time())
            self._start_heartbeat()
        self.began = True
        return self.lineage

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        cat, run_id, stop = self.catalog, self.id, self._stop

        def beat():
            while not stop.wait(HEARTBEAT_S):
                try:
                    cat.update_run(run_id, heartbeat_at=time.time())
                except Exception as e:  # a locked database for a moment is not a reason to stop training
                    print(f"warning: heartbeat not recorded ({e})")

        threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True).start()

    def stop_heartbeat(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # ------------------------------------------------------------------ data and training

    def write_rejects(self, rejects: list[dict]) -> None:
        if self.main:
            write_rows(self.dir / "rejects.jsonl", rejects)

    def stop_check(self, phase: str, step: int | None = None) -> Callable[[], None]:
        """For a long phase outside the training steps (the held-out evaluation before or after training): a
        function to call between its batches that raises :class:`Cancelled` once the run's CANCEL file exists,
        so a cancel stops the run within a batch there as it does within a step in training. (SIGTERM needs no
        check: it interrupts any phase, see ``_sigterm_as_interrupt``.) Under ``--nproc`` the evaluation before
        training is rank 0's while the other ranks wait in the trainer, so there it checks nothing and the
        cancel is seen at the first step, where every rank stops together. ``step``: the step trained so far
        (None: before training)."""
        if self.dir is None or (step is None and world_size() > 1):
            return lambda: None
        flag = self.dir / CANCEL_FILE

        def check() -> None:
            if flag.exists():
                raise Cancelled(step or 0, phase)

        return check

    def callbacks(self, desc: str | None = None, *, extra: tuple[str, ...] = (), patience: int | None = None,
                  more: list | None = None) -> list:
        """metrics.jsonl, the progress bar, cancel, early stopping (``patience`` evaluations) and ``more``."""
        from transformers import EarlyStoppingCallback

        from tunelab.train import callbacks as cb

        out = [cb.MetricsJsonl(self.metrics_path, extra=extra), cb.Progress(desc or f"{self.kind} {self.id}"),
               _cancel_callback(self), *(more or [])]
        if patience:
            out.append(EarlyStoppingCallback(early_stopping_patience=patience))
        return out

    def train(self, trainer):
        """``trainer.train()``, resuming from the newest complete checkpoint on ``--resume``; raises
        :class:`Cancelled` when the run's CANCEL file stopped it (after the checkpoint was saved)."""
        from transformers.trainer_callback import PrinterCallback

        from tunelab.train import callbacks as cb

        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(cb.InputGradsOff())
        resume_from = last_checkpoint(self.checkpoints) if self.resumed else None
        if self.resumed and resume_from is None:
            print("no complete checkpoint yet: starting this run from the beginning")
        if self.main:
            if resume_from is None:
                self.metrics_path.unlink(missing_ok=True)
            else:
                cb.truncate_metrics(self.metrics_path, checkpoint_step(resume_from))
                print(f"resuming from {resume_from.name}")
        try:
            out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except BaseException:
            end_tracking("FAILED")
            raise
        self.loss = final_loss(trainer)
        release_freed_memory()
        if self.cancel_step is not None:
            end_tracking("KILLED")
            raise Cancelled(self.cancel_step)
        return out

    # ------------------------------------------------------------------ end

    def finish(self, summary: dict, catalog_metrics: tuple[str, ...] = ()) -> dict:
        """Write summary.json and mark the run completed; return the summary."""
        summary = {"run_id": self.id, "status": "completed", **summary,
                   "wall_time_s": round(time.time() - self.started, 2)}
        if self.loss and "final_train_loss" in summary:  # the epoch mean, not one (maybe tiny) last step
            summary.update(self.loss)
        summary.setdefault("world_size", world_size())
        if self.speedups is not None:
            summary.update({k: v for k, v in self.speedups.record().items() if k not in summary})
        write_json(self.dir / "summary.json", summary)
        self.catalog.update_run(self.id, status="completed",
                                metrics={k: summary.get(k) for k in catalog_metrics})
        return summary

    def worker_summary(self) -> dict:
        """What a rank other than 0 returns after training: the run's files are rank 0's to write."""
        return {"run_id": self.id, "status": "worker", "rank": rank()}


def execute(kind: str, cfg, steps: Callable[[Run], dict], config_cls, workspace: Workspace | None = None,
            resume: str | None = None, parent_id: str | None = None) -> dict:
    """Run a recipe's ``steps`` inside the lifecycle; return its summary.

    On ``resume`` the run's own config.yaml is reloaded (``cfg`` is ignored). An exception marks the run
    ``failed`` with its message (``interrupted`` for Ctrl-C or SIGTERM) and propagates; a cancel returns
    ``{"status": "cancelled", ...}``.
    """
    ws = workspace or Workspace.resolve()
    r = Run(kind=kind, cfg=cfg, ws=ws, resumed=bool(resume), parent_id=parent_id)
    if resume:
        r.dir = ws.run_dir(resume)
        r.id = r.dir.name
        r.cfg = cfglib.load(config_cls, r.dir / "config.yaml")
    elif cfg is None:
        raise TunelabError(f"{kind}: give a recipe, or resume a run")
    restore = _sigterm_as_interrupt()
    restore_threads = _set_threads(getattr(getattr(r.cfg, "train", None), "threads", None))
    if r.main and parent_id is None:
        print(allocator.describe())
    try:
        return steps(r)
    except Cancelled as c:
        if r.main:
            r.catalog.update_run(r.id, status="cancelled")
        if c.phase is None:
            print(f"run {r.id} cancelled at step {c.step} (checkpoint saved); continue it with "
                  f"'tunelab train --resume {r.id}'")
        else:
            print(f"run {r.id} cancelled at step {c.step}, in the {c.phase}; continue it with "
                  f"'tunelab train --resume {r.id}' (it resumes from its newest checkpoint, or from the start)")
        return {"run_id": r.id, "status": "cancelled", "stopped_step": c.step,
                **({"stopped_in": c.phase} if c.phase else {})}
    except BaseException as e:
        if r.main and r.began:
            interrupted = isinstance(e, KeyboardInterrupt)
            r.catalog.update_run(r.id, status="interrupted" if interrupted else "failed",
                                 error=None if interrupted else (f"{type(e).__name__}: {e}"[:2000]))
        raise
    finally:
        r.stop_heartbeat()
        restore()
        restore_threads()


def release_freed_memory() -> None:
    """Give the heap memory freed at the end of training back to the operating system.

    glibc's malloc keeps freed heap pages mapped for reuse: after the last step a process still holds
    its peak activations' worth of resident memory although nothing uses it, and what comes next (the
    fp32 base weights put back, the probe, evaluation, a merge) adds to that. Measured on SFT of
    SmolLM2-135M with LoRA under bf16 (bench/sft_vs_trl.py on an AMD EPYC, Zen 4): the process peak came
    after training, 0.2-0.3 GB over the training peak, until this call. A no-op where the C library has no
    ``malloc_trim`` (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if allocator.purge():  # a preloaded allocator handed its freed pages back
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set_threads(n: int | None) -> Callable[[], None]:
    """``train.threads``: torch's CPU threads for this run (restored afterwards); nothing when unset."""
    if not n:
        return lambda: None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    print(f"torch CPU threads: {n} (train.threads; was {before})")
    return lambda: torch.set_num_threads(before)


def _sigterm_as_interrupt() -> Callable[[], None]:
    """SIGTERM → KeyboardInterrupt in the main thread, so a stopped run is recorded as interrupted."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise _Terminated()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)


def _cancel_callback(run: Run):
    from transformers import TrainerCallback

    class CancelOnFile(TrainerCallback):
        """Stops training at a step boundary when the run's CANCEL file exists, saving a checkpoint first.
        Under --nproc the ranks agree (max over ranks) so all stop at the same step."""

        def on_step_end(self, args, state, control, **kw):
            flag = (run.dir / CANCEL_FILE).exists()
            if world_size() > 1:
                import torch
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    t = torch.tensor([int(flag)], device="cpu")
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    flag = bool(t.item())
            if flag:
                run.cancel_step = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

    return CancelOnFile()


# ----------------------------------------------------------------------------- helpers recipes share


def training_args(t, dplan, out_dir: Path, *, has_val: bool, total_steps: int, cls=None,
                  checkpoint_every: int | None = None, metric: str = "eval_loss", greater_is_better: bool = False,
                  **extra):
    """The one TrainingArguments builder, for transformers' class and TRL's config classes alike.

    ``t`` is the recipe's ``train:`` section, ``dplan`` the device plan (precision, device). Gradient
    checkpointing is ``checkpoint_every``: 0 off, 1 every layer, k > 1 every k-th decoder layer
    (default: the plan's choice). TRL's own defaults (bf16 on, checkpointing on) are replaced here.
    ``extra`` adds or overrides fields (TRL's ``beta``, ``max_length``, ...).
    """
    if cls is None:
        from transformers import TrainingArguments as cls
    ck = int(dplan.gradient_checkpointing) if checkpoint_every is None else checkpoint_every
    fields = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        lr_scheduler_type=t.scheduler,
        warmup_steps=int(round(t.warmup_ratio * total_steps)),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dplan.precision == "bf16",
        fp16=dplan.precision == "fp16",
        use_cpu=dplan.device == "cpu",
        activation_checkpointing=ck > 0,
        # k > 1: only every k-th decoder layer (transformers' every_n_layers); tunelab/train/device.py
        activation_checkpointing_kwargs={"every_n_layers": ck} if ck > 1 else None,
        eval_strategy="steps" if has_val else "no",
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.eval_every,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model=metric if has_val else None,
        greater_is_better=greater_is_better if has_val else None,
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=1,
        report_to=tracking(getattr(t, "report_to", None), Path(out_dir).parent) or "none",
        run_name=Path(out_dir).parent.name,
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_only_model=False,
    )
    fields.update(extra)
    return cls(**fields)


_OWN_MLFLOW_URI: list[str] = []  # the store tunelab pointed MLflow at (a user's own MLFLOW_TRACKING_URI is kept)


def tracking(report_to, run_dir: Path) -> list[str]:
    """``train.report_to`` for transformers' integrations, which read their places from the environment:
    TensorBoard event files go to ``<run>/tensorboard``; MLflow logs to the server or database in the user's
    MLFLOW_TRACKING_URI when set, else to a local file store ``<run>/mlruns`` (MLflow 3 keeps that backend in
    maintenance mode and asks for MLFLOW_ALLOW_FILE_STORE; ``mlflow ui --backend-store-uri <run>/mlruns``
    shows it). Returns the integrations to report to."""
    report = list(report_to or [])
    if "tensorboard" in report:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "mlflow" in report:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None or uri in _OWN_MLFLOW_URI:
            uri = (run_dir / "mlruns").resolve().as_uri()
            _OWN_MLFLOW_URI[:] = [uri]
            os.environ["MLFLOW_TRACKING_URI"] = uri
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            import sys

            if "mlflow" in sys.modules:  # an earlier run in this process set MLflow's store: this run has its own
                sys.modules["mlflow"].set_tracking_uri(uri)
    return report


def end_tracking(status: str) -> None:
    """End an MLflow run a failed or cancelled training left open (transformers ends it only on success), so
    the next run in this process does not log into it."""
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status=status)


def final_loss(trainer) -> dict | None:
    """The training loss a summary reports: the mean over the last epoch's worth of optimizer steps, each step
    weighted by the examples it trained on, instead of the last step's loss alone.

    transformers' Trainer keeps the last, partial batch of an epoch (``dataloader_drop_last`` False), and so
    does tunelab: every example is trained on in every epoch. That step can hold a single example, whose loss
    printed alone is noise (3.55 after steps at 0.8-1.0); weighted by its examples it counts as one example.
    ``last_step_loss`` keeps the last step's value."""
    import math

    rows = train_rows(trainer.state.log_history)
    if not rows:
        return None
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    try:
        n = len(trainer.train_dataset)
    except TypeError:  # an iterable dataset: no epoch length, every step counts alike
        n = None
    spe = math.ceil(math.ceil(n / (args.per_device_train_batch_size * max(args.world_size, 1)))
                    / args.gradient_accumulation_steps) if n else len(rows)
    last = rows[-1]["step"]
    window = [r for r in rows if r["step"] > last - spe]

    def examples(step: int) -> int:
        return per_step if n is None else max(1, min(per_step, n - ((step - 1) % spe) * per_step))

    w = [examples(r["step"]) for r in window]
    return {"final_train_loss": sum(x * r["loss"] for x, r in zip(w, window)) / sum(w),
            "final_train_loss_steps": len(window), "last_step_loss": rows[-1]["loss"],
            "last_step_examples": examples(last),
            "final_train_loss_is": "mean over the last epoch's steps (or all steps of a shorter run), each weighted "
                                   "by its examples"}


def steps_total(n_examples: int, t, world: int = 1) -> int:
    """Optimizer steps of a run: ``max_steps``, or epochs over ``n_examples`` at the global batch."""
    import math

    per_epoch = math.ceil(n_examples / (t.batch_size * t.grad_accum * world))
    return t.max_steps or math.ceil(per_epoch * t.epochs)


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last, so a kill mid-save is skipped)."""
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=checkpoint_step) if done else None


def checkpoint_step(path: Path | str) -> int:
    return int(str(path).rsplit("-", 1)[-1])


def best_step(state) -> int:
    """The step of the best checkpoint (the last step when nothing was validated)."""
    return checkpoint_step(state.best_model_checkpoint) if state.best_model_checkpoint else state.global_step


def train_rows(log_history: list[dict]) -> list[dict]:
    """The training-loss rows of a Trainer's log history (validation rows left out)."""
    return [r for r in log_history if "loss" in r and not any(k.startswith("eval_") for k in r)]


def save_output(model, tokenizer, run_dir: Path, adapter: bool, selected_adapters: list[str] | None = None,
                files: dict[str, Any] | None = None, folder: str | None = None) -> Path:
    """Write the trained adapter (``adapter/``) or model (``model/``; or ``folder``) with the tokenizer,
    atomically: a half-written folder never replaces a good one. ``files``: JSON files to put beside the
    weights (name → content), written before the folder takes its place."""
    out_dir = run_dir / (folder or ("adapter" if adapter else "model"))
    tmp = run_dir / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter and selected_adapters and hasattr(model, "peft_config"):
        model.save_pretrained(tmp, selected_adapters=selected_adapters)
    else:
        model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, content in (files or {}).items():
        write_json(tmp / name, content)
    umask_modes(tmp)  # safetensors writes 0600
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def write_probe(model, input_ids, path: Path, **inputs) -> None:
    """Save the final model's logits on one fixed input, so anyone can check that the saved artifact,
    loaded back with plain transformers/peft, reproduces the trained model.

    ``input_ids``: one row of token ids, or a batch of rows of one length (a padded batch: pass its
    ``attention_mask`` in ``inputs``); a batch is saved with its ``inputs``, so a reload feeds the same."""
    import torch
    from safetensors.torch import save_file

    model.eval()
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    batch = ids.dim() == 2
    ids = ids if batch else ids[None]
    dev = next(model.parameters()).device  # the model may sit on a GPU; the probe is saved from the CPU
    with torch.no_grad():
        logits = model(input_ids=ids.to(dev), **{k: v.to(dev) for k, v in inputs.items()}).logits
    if batch:  # causal LM: last 4 positions of each row; a head: every row
        saved = {"input_ids": ids, **{k: v.cpu() for k, v in inputs.items()},
                 "logits": logits[:, -4:] if logits.dim() == 3 else logits}
    else:  # causal LM: last 4 positions; a head: its row
        saved = {"input_ids": ids[0], "logits": logits[0, -4:] if logits.dim() == 3 else logits[0]}
    saved["logits"] = saved["logits"].float().cpu()
    save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    umask_modes(path)


def write_rows(path: Path, rows: list[dict]) -> None:
    """A JSONL file written atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
