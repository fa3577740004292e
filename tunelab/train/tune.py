"""Hyperparameter search over an SFT recipe with Optuna: TPE sampling, median pruning on the
validation loss, the study kept in SQLite (resumable), a report with the best trial, parameter
importances and the trial history.

    tunelab tune examples/tune_sft_support.yaml [--trials 20] [--resume] [--n-jobs 2]

Each trial is one ordinary SFT run (a catalog row, a run folder) of the ``base`` recipe with the
sampled values set; its objective is the run's best validation loss. The pruner sees the
validation loss at every evaluation (``train.eval_every``) and stops a trial whose loss is worse
than the median of earlier trials at the same step (Optuna MedianPruner). The study lives in
``<workspace>/tune/<name>/study.db``; ``--resume`` continues it up to ``trials`` finished trials.
Parallel trials (``n_jobs`` > 1) run in separate processes that share the SQLite study; each uses
cores / n_jobs torch threads and its own sampler seed, so workers do not propose the same values.
"""

from __future__ import annotations

import fcntl
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab import config as cfglib
from tunelab import recipes
from tunelab._optional import require
from tunelab._plot import new_figure, png_bytes
from tunelab.config import Strict
from tunelab.errors import ConfigError, TunelabError
from tunelab.models import refs
from tunelab.train import sft
from tunelab.workspace import Workspace, write_json

# search-space name → the recipe field it sets
FIELDS = {"learning_rate": "train.learning_rate", "batch_size": "train.batch_size", "epochs": "train.epochs",
          "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
          "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay"}


class Param(Strict):
    """A range (``low``/``high``, optionally ``log``) or a list of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[float | int | str] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either choices: [...] or low: and high:")
        if self.choices is None and not self.low < self.high:
            raise ValueError("low must be below high")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        return self


class TuneConfig(Strict):
    recipe: Literal["tune"] = "tune"
    name: str = Field(description="study name: <workspace>/tune/<name>/")
    base: str = Field(description="the SFT recipe file the trials vary (relative to this file or absolute)")
    overrides: list[str] = Field(default_factory=list, description="set on every trial (a.b=c)")
    trials: int = Field(10, ge=1, description="finished trials wanted in the study")
    n_jobs: int = Field(1, ge=1, description="trials run in parallel processes")
    seed: int = Field(0, description="TPE sampler seed")
    startup_trials: int = Field(3, ge=0, description="random trials before TPE, and trials before pruning starts")
    warmup_steps: int = Field(0, ge=0, description="training steps of a trial before it may be pruned")
    space: dict[str, Param] = Field(description=f"what is searched: {', '.join(FIELDS)}")
    base_dir: str | None = Field(None, description="(set by the loader) the folder of the tune file")

    @model_validator(mode="after")
    def _known(self):
        bad = [k for k in self.space if k not in FIELDS]
        if bad:
            raise ValueError(f"space: unknown {', '.join(bad)}; known: {', '.join(FIELDS)}")
        return self


def _base_path(cfg: TuneConfig) -> Path:
    p = Path(cfg.base)
    if not p.is_absolute() and cfg.base_dir:
        p = Path(cfg.base_dir) / p
    try:
        cfglib.load_yaml(p)
    except ConfigError as e:  # missing, a folder, empty, binary...: one line that says which
        raise TunelabError(f"base: {e}") from None
    return p


def study_dir(cfg: TuneConfig, ws: Workspace) -> Path:
    return ws.root / "tune" / cfg.name


def _storage(cfg: TuneConfig, ws: Workspace) -> str:
    return f"sqlite:///{study_dir(cfg, ws) / 'study.db'}"


def _rdb(cfg: TuneConfig, ws: Workspace):
    """The study storage; parallel workers wait up to a minute for SQLite's write lock instead of failing."""
    import optuna

    return optuna.storages.RDBStorage(_storage(cfg, ws), engine_kwargs={"connect_args": {"timeout": 60}})


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _sampler_seed(seed: int, trials_before: int, worker: int) -> int:
    """One sampler seed per (study seed, trials already in the study, worker): parallel workers and a
    resumed session draw different random startup values instead of repeating the first worker's."""
    if trials_before == 0 and worker == 0:
        return seed  # a fresh one-process study: the configured seed as given
    import numpy as np

    return int(np.random.SeedSequence([seed, trials_before, worker]).generate_state(1)[0])


def _suggest(trial, name: str, p: Param):
    if p.choices is not None:
        return trial.suggest_categorical(name, p.choices)
    return trial.suggest_float(name, p.low, p.high, log=p.log)


def _pruning_callback(trial):
    """A TrainerCallback that reports each validation loss to Optuna and stops a trial it prunes."""
    from transformers import TrainerCallback

    class OptunaPruning(TrainerCallback):
        pruned_at: int | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            trial.report(float(loss), step=state.global_step)
            if trial.should_prune():
                self.pruned_at = state.global_step
                control.should_training_stop = True

    return OptunaPruning()


def _objective(cfg: TuneConfig, ws: Workspace, worker: int = 0):
    def objective(trial) -> float:
        import optuna
        import torch

        values = {k: _suggest(trial, k, p) for k, p in cfg.space.items()}
        overrides = [*cfg.overrides, *(f"{FIELDS[k]}={v}" for k, v in values.items()),
                     f"name={cfg.name}-t{trial.number}"]
        base, fn = recipes.load_recipe(_base_path(cfg), overrides)
        if fn is not sft.run:
            raise TunelabError(f"base: {cfg.base} is a '{base.recipe}' recipe; tune searches sft recipes")
        if not (base.data.validation or base.data.validation_split > 0):
            raise TunelabError("base: the recipe needs validation data (data.validation or data.validation_split): "
                               "it is the objective")
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("threads", torch.get_num_threads())
        hook = _pruning_callback(trial)
        summary = sft.run(base, ws, callbacks=[hook])
        trial.set_user_attr("run_id", summary["run_id"])
        trial.set_user_attr("steps", summary["steps"])
        if hook.pruned_at is not None:
            trial.set_user_attr("pruned_at_step", hook.pruned_at)
            raise optuna.TrialPruned(f"pruned at step {hook.pruned_at}")
        loss = summary["best_eval_loss"]
        if loss is None or not math.isfinite(loss):
            raise TunelabError(f"trial {trial.number}: no finite validation loss (run {summary['run_id']})")
        return float(loss)

    return objective


def _study(cfg: TuneConfig, ws: Workspace, create: bool, seed: int | None = None):
    import optuna

    sampler = optuna.samplers.TPESampler(seed=cfg.seed if seed is None else seed, n_startup_trials=cfg.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_steps,
                                         n_min_trials=1)
    if create:
        return optuna.create_study(study_name=cfg.name, storage=_rdb(cfg, ws), direction="minimize",
                                   sampler=sampler, pruner=pruner)
    return optuna.load_study(study_name=cfg.name, storage=_rdb(cfg, ws), sampler=sampler, pruner=pruner)


def _finished(study) -> int:
    import optuna

    return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)


def _worker(cfg_json: str, ws_root: str, n: int, worker: int, threads: int, seed: int) -> None:
    """One parallel worker: its own (spawned) process, ``threads`` torch threads, the shared SQLite study."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch is imported in this process
        os.environ[var] = str(threads)
    import optuna
    import torch

    torch.set_num_threads(threads)
    cfg = TuneConfig.model_validate_json(cfg_json)
    ws = Workspace.resolve(ws_root)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(cfg, ws, create=False, seed=seed)
    objective = _objective(cfg, ws, worker)
    lock_path = study_dir(cfg, ws) / "ask.lock"
    for _ in range(n):
        # Optuna takes a queued (WAITING) trial with SELECT ... FOR UPDATE, which SQLite ignores: two workers
        # asking at once were seen to take the same queued trial and then tell it twice ("Cannot tell a PRUNED
        # trial"). Asking under a file lock shared by the workers makes taking a trial one at a time.
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                trial = study.ask()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        study.tell(trial, value)


def run(cfg: TuneConfig, workspace: Workspace | None = None, resume: bool = False) -> dict:
    """Run (or continue) the study until it has ``cfg.trials`` finished trials; write the report."""
    optuna = require("optuna", "tune")
    ws = workspace or Workspace.resolve()
    _base_path(cfg)
    d = study_dir(cfg, ws)
    exists = (d / "study.db").exists()
    if exists and not resume:
        raise TunelabError(f"study '{cfg.name}' exists in {d}; continue it with --resume or choose another name")
    if resume and not exists:
        raise TunelabError(f"no study '{cfg.name}' in {d} to resume")
    d.mkdir(parents=True, exist_ok=True)
    (d / "tune.json").write_text(cfg.model_dump_json(indent=2), encoding="utf-8")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(cfg, ws, create=not exists)
    # trials left RUNNING by an interrupted session will never finish: mark them failed
    for t in study.trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    todo = max(0, cfg.trials - _finished(study))
    jobs = min(cfg.n_jobs, todo) or 1
    before = len(study.trials)
    if jobs == 1:
        study = _study(cfg, ws, create=False, seed=_sampler_seed(cfg.seed, before, 0))
        study.optimize(_objective(cfg, ws), n_trials=todo, catch=())
    else:
        import multiprocessing as mp

        # the shared things the workers would otherwise make at the same moment: the catalog, the model cache
        ws.catalog()
        base, _ = recipes.load_recipe(_base_path(cfg), cfg.overrides)
        refs.resolve(base.model.name, ws, trust_remote_code=base.model.trust_remote_code, runs=False)  # as sft does
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch threads
        share = [todo // jobs + (i < todo % jobs) for i in range(jobs)]
        threads = max(1, _cores() // jobs)
        procs = [ctx.Process(target=_worker, args=(cfg.model_dump_json(), str(ws.root), n, i, threads,
                                                   _sampler_seed(cfg.seed, before, i)))
                 for i, n in enumerate(share) if n]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise TunelabError(f"a tuning worker failed (exit codes {[p.exitcode for p in procs]})")
        study = _study(cfg, ws, create=False)
    return report(cfg, ws, study)


def report(cfg: TuneConfig, ws: Workspace, study=None) -> dict:
    """report.json (best trial, importances, every trial) and history.png in the study folder."""
    import optuna

    study = study or _study(cfg, ws, create=False)
    d = study_dir(cfg, ws)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise TunelabError(f"study '{cfg.name}': no trial completed; see {d}")
    best = study.best_trial
    try:  # fANOVA (optuna's default evaluator) needs at least two completed trials that differ
        importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as e:
        importances = {"unavailable": str(e)}
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "run_id": t.user_attrs.get("run_id"), "pruned_at_step": t.user_attrs.get("pruned_at_step"),
               "worker": t.user_attrs.get("worker"), "threads": t.user_attrs.get("threads"),
               "intermediate": {str(k): v for k, v in t.intermediate_values.items()}} for t in study.trials]
    out = {"study": cfg.name, "storage": _storage(cfg, ws), "direction": "minimize",
           "objective": "best validation loss of the SFT run",
           "best": {"number": best.number, "value": best.value, "params": best.params,
                    "run_id": best.user_attrs.get("run_id")},
           "counts": {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
           "importances": importances, "trials": trials, "history_png": str(d / "history.png")}
    _plot_history(trials, d / "history.png", importances)
    write_json(d / "report.json", out)
    return out


def _plot_history(trials: list[dict], path: Path, importances: dict) -> None:
    fig = new_figure(10, 3.6)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    done = [t for t in trials if t["state"] == "COMPLETE"]
    ax.scatter([t["number"] for t in done], [t["value"] for t in done], label="completed", color="C0")
    pruned = [t for t in trials if t["state"] == "PRUNED" and t["intermediate"]]
    ax.scatter([t["number"] for t in pruned], [list(t["intermediate"].values())[-1] for t in pruned],
               marker="x", color="C3", label="pruned (last reported)")
    best, xs, ys = math.inf, [], []
    for t in sorted(done, key=lambda t: t["number"]):
        best = min(best, t["value"])
        xs.append(t["number"])
        ys.append(best)
    ax.step(xs, ys, where="post", color="C2", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation loss")
    ax.set_title("trial history")
    ax.legend(fontsize=8)
    imp = {k: v for k, v in importances.items() if isinstance(v, float)}
    if imp:
        ax2.barh(list(imp)[::-1], list(imp.values())[::-1], color="C1")
        ax2.set_title("parameter importance (fANOVA)")
    else:
        ax2.text(0.5, 0.5, "importances need 2+ completed trials", ha="center", va="center")
        ax2.set_axis_off()
    path.write_bytes(png_bytes(fig))


def load(path: str | Path, overrides: list[str] | None = None) -> TuneConfig:
    cfg, _ = recipes.load_recipe(path, overrides)
    if not isinstance(cfg, TuneConfig):
        raise TunelabError(f"{path} is a '{cfg.recipe}' recipe; tunelab tune needs 'recipe: tune'")
    return cfg


def format_report(r: dict) -> str:
    b = r["best"]
    lines = [f"study {r['study']}: " + ", ".join(f"{v} {k.lower()}" for k, v in r["counts"].items() if v),
             f"best trial {b['number']}: validation loss {b['value']:.4f}, run {b['run_id']}",
             "  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items()),
             "importances: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k}: {v}"
                                         for k, v in r["importances"].items()),
             f"written: {Path(r['history_png']).parent / 'report.json'}, {r['history_png']}"]
    return "\n".join(lines)
