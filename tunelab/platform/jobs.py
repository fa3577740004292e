"""An API request → a tunelab recipe (YAML) and the CLI command a worker runs for it.

Every front end (OpenAI's fine-tuning shape, Bedrock's customization jobs, the native recipe
endpoint) ends here: a recipe validated by the recipe's own config class (the same strict,
all-problems-at-once validation as ``tunelab validate``), written as ``recipe.yaml`` in the job's
folder, and one command of the real CLI. Nothing about training is decided in the platform.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tunelab import recipes
from tunelab.data.formats import BadRecord
from tunelab.errors import ConfigError, TunelabError
from tunelab.workspace import Workspace

# recipes `tunelab train` runs (recipes.RECIPES minus the ones with their own command)
TRAIN_RECIPES = ("sft", "dpo", "cpt", "distill", "classify", "pretrain", "reward", "rlhf", "pipeline")
COMMANDS = ("train", "data_prepare", "compare", "eval", "export")
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
DEFAULT_LR = 2e-4  # TrainSection's default: learning_rate_multiplier scales it


def job_dir(ws: Workspace, job_id: str) -> Path:
    return ws.root / "platform" / "jobs" / job_id


def run_dir(ws: Workspace, run_id: str) -> Path:
    return ws.runs_dir / run_id


def read_log(path: Path, tail: int, offset: int | None = None) -> tuple[str, int, int]:
    """A job's log from byte ``max(offset, size - tail)`` to the end: the text, where it starts and where the next
    read starts. An incomplete UTF-8 character at the end (being written) is left for the next read; other bytes
    that are not UTF-8 are shown as U+FFFD. An offset past the end reads nothing."""
    import codecs

    if not path.is_file():
        return "", offset or 0, offset or 0
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        start = max(offset or 0, size - tail)
        if start >= size:
            return "", start, start
        f.seek(start)
        data = f.read(size - start)
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    text = dec.decode(data, final=False)
    return text, start, start + len(data) - len(dec.getstate()[0])


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, mappings merged key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate_recipe(raw: dict, source: str = "recipe") -> tuple[str, Any]:
    """Validate a recipe mapping exactly as the CLI does (tunelab.recipes.load_recipe); returns (name, config)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "recipe.yaml"
        p.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        try:
            cfg, _ = recipes.load_recipe(p)
        except ConfigError as e:
            raise ConfigError(e.problems, source) from None
    return str(raw.get("recipe")), cfg


def resolve_file_ids(obj: Any, lookup) -> Any:
    """Replace every string that is an uploaded file's id with the file's path (``lookup`` returns None for an
    id this project does not have: it stays as written, and the recipe's own check reports the missing file)."""
    if isinstance(obj, dict):
        return {k: resolve_file_ids(v, lookup) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve_file_ids(v, lookup) for v in obj]
    if isinstance(obj, str) and FILE_ID.match(obj):
        path = lookup(obj)
        return path if path is not None else obj
    return obj


def command_for(recipe_name: str) -> str:
    if recipe_name in TRAIN_RECIPES:
        return "train"
    if recipe_name == "data":
        return "data_prepare"
    if recipe_name == "suite":
        return "compare"
    raise ConfigError([f"recipe: '{recipe_name}' cannot run as a job; job recipes: "
                       f"{', '.join((*TRAIN_RECIPES, 'data', 'suite'))}"])


# ---------------------------------------------------------------- OpenAI fine-tuning → sft / dpo recipe


def _auto(v, default):
    return default if v in (None, "auto") else v


def openai_recipe(*, method: str, model: str, train_path: str, val_path: str | None, train_records: int,
                  hyper: dict, seed: int | None, name: str, defaults: dict) -> tuple[dict, dict]:
    """The recipe for an OpenAI job, and the hyperparameters it resolved ("auto" → numbers)."""
    n_epochs = int(_auto(hyper.get("n_epochs"), 3))
    batch_size = int(_auto(hyper.get("batch_size"), max(1, min(8, train_records))))
    lr_mult = float(_auto(hyper.get("learning_rate_multiplier"), 1.0))
    steps = max(1, math.ceil(train_records / batch_size) * n_epochs)
    train = {"epochs": n_epochs, "batch_size": batch_size, "learning_rate": DEFAULT_LR * lr_mult,
             # a checkpoint (and a validation pass) about every tenth of the run: what resume and pause restart from
             "eval_every": max(1, steps // 10), "early_stopping_patience": None}
    if seed is not None:
        train["seed"] = seed
    resolved = {"n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": lr_mult}
    if method == "dpo":
        beta = float(_auto(hyper.get("beta"), 0.1))
        resolved["beta"] = beta
        data = {"train": train_path, "validation": val_path, "validation_split": 0.0}
        recipe = {"recipe": "dpo", "name": name, "model": {"name": model}, "data": data, "train": train, "beta": beta}
    else:
        data = {"train": train_path, "validation": val_path}
        recipe = {"recipe": "sft", "name": name, "model": {"name": model}, "data": data, "train": train}
    if not val_path:
        data.pop("validation")
    recipe = deep_merge(defaults.get(recipe["recipe"], {}), recipe)
    return recipe, resolved


def openai_dpo_to_pairs(src: Path, dst: Path) -> int:
    """OpenAI's DPO records ({input: {messages}, preferred_output, non_preferred_output}) → tunelab preference
    pairs {prompt, chosen, rejected}; the prompt is the conversation before the answer, as text."""
    n = 0
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            if not line.strip():
                continue
            rec = json.loads(line)
            fout.write(json.dumps(dpo_pair(rec)) + "\n")
            n += 1
    return n


def dpo_pair(rec: dict) -> dict:
    msgs = (rec.get("input") or {}).get("messages") if isinstance(rec.get("input"), dict) else None
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise BadRecord("input.messages must be a non-empty list of messages")
    if msgs[-1].get("role") != "user":
        raise BadRecord("input.messages must end with a user message")
    out = {}
    for key, field in (("chosen", "preferred_output"), ("rejected", "non_preferred_output")):
        v = rec.get(field)
        if not (isinstance(v, list) and v and isinstance(v[0], dict) and isinstance(v[0].get("content"), str)
                and v[0]["content"].strip()):
            raise BadRecord(f"{field} must be a list with one assistant message with text")
        out[key] = v[0]["content"]
    turns = [f"{m.get('role')}: {m.get('content')}" for m in msgs[:-1] if isinstance(m.get("content"), str)]
    prompt = msgs[-1].get("content")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRecord("the last user message must have text content")
    return {"prompt": "\n".join([*turns, prompt]) if turns else prompt, **out}


# ---------------------------------------------------------------- the worker's command line


def argv_for(job: dict, ws: Workspace) -> list[str]:
    """The CLI arguments (after ``python -m tunelab``) that run ``job``."""
    d = job_dir(ws, job["id"])
    cmd, spec = job["command"], job["spec"]
    if cmd == "train":
        if job["resume"] and job["run_id"] and (run_dir(ws, job["run_id"]) / "config.yaml").is_file():
            return ["train", "--resume", job["run_id"], "--workspace", str(ws.root)]
        nproc = int((spec.get("options") or {}).get("nproc") or 1)  # data-parallel processes via torchrun
        return ["train", str(d / "recipe.yaml"), "--workspace", str(ws.root), *(["--nproc", str(nproc)] * (nproc > 1))]
    if cmd == "data_prepare":
        return ["data", "prepare", str(d / "recipe.yaml"), "--result-json", str(d / "result.json"),
                "--workspace", str(ws.root)]
    if cmd == "compare":
        return ["compare", str(d / "recipe.yaml"), "--out", str(d / "compare"), "--workspace", str(ws.root)]
    opts = spec.get("options") or {}
    if cmd == "eval":
        argv = ["eval", spec["run"], "--workspace", str(ws.root)]
        if opts.get("limit"):
            argv += ["--limit", str(int(opts["limit"]))]
        for flag in ("no_base", "no_business", "no_probe"):
            if opts.get(flag):
                argv.append("--" + flag.replace("_", "-"))
        return argv
    if cmd == "export":
        argv = ["export", spec["run"], "--out", str(d / "export"), "--workspace", str(ws.root)]
        if opts.get("merge"):
            argv += ["--merge", "--dtype", str(opts.get("dtype", "fp32"))]
        return argv
    raise TunelabError(f"job {job['id']}: unknown command '{cmd}'")


def write_recipe(ws: Workspace, job_id: str, recipe: dict | None) -> str | None:
    d = job_dir(ws, job_id)
    d.mkdir(parents=True, exist_ok=True)
    if recipe is None:
        return None
    text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    (d / "recipe.yaml").write_text(text, encoding="utf-8")
    return text
