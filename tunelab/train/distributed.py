"""Data-parallel training: ``tunelab train RECIPE --nproc N`` relaunches itself through torchrun.

    tunelab train examples/sft_lora_support.yaml --nproc 2

The parent process (no ``LOCAL_RANK`` in its environment) reads the recipe, makes the run id,
divides ``train.batch_size`` by N so the *global* batch stays what the recipe says, and runs
``python -m torch.distributed.run --standalone --nproc_per_node N -m tunelab train ...``.
Every rank gets the run id in ``TUNELAB_RUN_ID``, so all ranks share one run directory (and the
Trainer's checkpoints, which hold one RNG state per rank); only rank 0 writes the run's files and
the catalog row. On CPU the process group uses gloo; on GPUs NCCL (accelerate's choice).

Multi-node, FSDP and DeepSpeed: see docs/distributed.md and examples/distributed/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tunelab.errors import TunelabError

RUN_ID_ENV = "TUNELAB_RUN_ID"
SUPPORTED = ("sft",)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True in a single process and in rank 0 of a distributed run: the one that writes files."""
    return rank() == 0


def launch(recipe: Path, overrides: list[str], workspace: Path, nproc: int) -> str:
    """Run the recipe on ``nproc`` local processes; return the run id (the run's summary is on disk)."""
    from tunelab import recipes
    from tunelab.workspace import Workspace

    cfg, _ = recipes.load_recipe(recipe, overrides)  # validate once, in the parent
    if cfg.recipe not in SUPPORTED:
        raise TunelabError(f"--nproc supports recipe {', '.join(SUPPORTED)} (got '{cfg.recipe}'); "
                           f"run other recipes with accelerate launch (docs/distributed.md)")
    bs = cfg.train.batch_size
    if bs % nproc:
        raise TunelabError(f"train.batch_size {bs} is the global batch and must divide by --nproc {nproc}; "
                           f"set train.batch_size to a multiple of {nproc}")
    ws = Workspace.resolve(workspace)
    run_id, _ = ws.new_run_dir(cfg.recipe, getattr(cfg, "name", None))  # made here; ranks reuse it
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
