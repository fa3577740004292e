"""Pipelines: several recipes in a row, each stage's trained model feeding the next.

    tunelab train examples/pipeline_cpt_sft_stories260k.yaml

A pipeline recipe lists stages; each stage is an ordinary recipe (a YAML file, or the same
keys inline under ``config:``) with optional ``--set``-style overrides. Top to bottom, for
each stage: read its recipe → put the previous stage's trained model into the field this
recipe starts from (``model.name``; ``student.name`` for distillation; or the stage's
``input:``) → validate it → run it with ``parent_id`` = the previous stage's run, so the
catalog links every stage to the one before it (``tunelab runs show``). A stage that trained a
LoRA/DoRA/IA3 adapter hands on its base with the adapter merged in (``<run>/merged``), so the
next stage may be any recipe; prompt/prefix-tuning adapters cannot be merged and end the
chain with a clear error. The pipeline's own summary lists each stage's run id, output and
headline metrics; it is written to ``<workspace>/pipelines/<name>-<time>.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tunelab import config as cfglib
from tunelab import recipes
from tunelab.config import Strict
from tunelab.errors import ConfigError, TunelabError
from tunelab.models import refs
from tunelab.train import _run
from tunelab.train.export import merge_adapter
from tunelab.workspace import Workspace, write_json

# the field each recipe starts from; a stage's ``input:`` overrides it
INPUT_FIELD = {"sft": "model.name", "cpt": "model.name", "dpo": "model.name", "rlhf": "model.name",
               "reward": "model.name", "classify": "model.name", "distill": "student.name"}


class StageSpec(Strict):
    name: str | None = Field(None, description="a label for the stage (default: its recipe name)")
    file: str | None = Field(None, description="a recipe YAML (relative paths: from the pipeline file's folder)")
    config: dict[str, Any] | None = Field(None, description="or the recipe inline")
    set: list[str] = Field(default_factory=list, description="overrides, as with --set: ['train.max_steps=20']")
    input: str | None = Field(None, description="dotted field that gets the previous stage's model; 'none' to "
                                               "start this stage from its own recipe")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.file is None) == (self.config is None):
            raise ValueError("give each stage either file: (a recipe YAML) or config: (the recipe inline)")
        return self


class PipelineConfig(Strict):
    """Recipe that chains other recipes."""

    recipe: Literal["pipeline"] = "pipeline"
    name: str | None = None
    stages: list[StageSpec] = Field(min_length=1)
    base_dir: str | None = Field(None, description="folder that stage files are relative to (set from the "
                                                  "pipeline file's location when loaded from a file)")


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError([f"cannot set {dotted}: '{k}' is not a section"])
    node[keys[-1]] = value


def stage_configs(cfg: PipelineConfig) -> list[tuple[str, dict]]:
    """Each stage's raw recipe dict (file or inline, overrides applied) and its label; checks the
    recipes exist and that every stage after the first has a field to receive the previous model."""
    out, problems = [], []
    base = Path(cfg.base_dir) if cfg.base_dir else Path.cwd()
    for i, st in enumerate(cfg.stages):
        if st.file is not None:
            p = Path(st.file)
            p = p if p.is_absolute() or p.exists() else base / p
            try:
                raw = cfglib.load_yaml(p)
            except ConfigError as e:  # not found, a folder, not YAML...: listed with the stage's other problems
                problems.append(f"stages.{i}.file: {e.problems[0]}")
                continue
        else:
            raw = json.loads(json.dumps(st.config))  # a copy
        raw = cfglib.apply_overrides(raw, st.set)
        recipe = raw.get("recipe")
        if recipe in (None, "pipeline", "data"):
            problems.append(f"stages.{i}: recipe '{recipe}' cannot be a stage (a training recipe is needed)")
            continue
        if i > 0 and (st.input or INPUT_FIELD.get(str(recipe))) is None:
            problems.append(f"stages.{i}: say which field gets the previous stage's model (input: model.name) "
                            f"or start it from its own recipe (input: none)")
        out.append((st.name or str(recipe), raw))
    if problems:
        raise ConfigError(problems)
    return out


def hand_on(summary: dict, ws: Workspace) -> str:
    """The model folder a finished stage passes to the next: its full model, or base + adapter merged."""
    out = Path(summary.get("output") or "")
    if not out.is_dir():
        raise TunelabError(f"stage run {summary.get('run_id')} reports no output folder")
    if not (out / "adapter_config.json").is_file():
        return str(out)
    run_dir = ws.run_dir(summary["run_id"])
    if (run_dir / "merged" / "config.json").is_file():
        return str(run_dir / "merged")
    m = refs.resolve(summary["run_id"], ws)  # the run's base (from its lineage) + its adapter
    tokenizer, _ = refs.load_tokenizer(m, chat_template=False)  # the adapter's own, with its chat template
    return str(_run.save_output(merge_adapter(m.path, m.adapter), tokenizer, run_dir, adapter=False, folder="merged"))


def run(cfg: PipelineConfig, workspace: Workspace | None = None, resume: str | None = None,
        parent_id: str | None = None) -> dict:
    """Run the stages in order; return a summary with one row per stage."""
    if resume:
        raise TunelabError("a pipeline is resumed stage by stage: 'tunelab train --resume STAGE_RUN_ID' for the "
                           "interrupted stage, then run the remaining stages with input set to its output")
    ws = workspace or Workspace.resolve()
    stages = stage_configs(cfg)
    started = time.time()
    rows: list[dict] = []
    previous_model, previous_run = None, parent_id
    for i, ((label, raw), spec) in enumerate(zip(stages, cfg.stages)):
        field = spec.input or INPUT_FIELD.get(raw["recipe"])
        if previous_model is not None and field and field.lower() != "none":
            _set_dotted(raw, field, previous_model)
        cls, fn = recipes.get(raw["recipe"])
        stage_cfg = cfglib.validate(cls, raw, f"stages.{i} ({label})")
        print(f"== stage {i + 1}/{len(stages)}: {label} ({raw['recipe']})"
              + (f", from {previous_model}" if previous_model and field and field.lower() != "none" else ""))
        summary = fn(stage_cfg, ws, parent_id=previous_run)
        previous_model, previous_run = hand_on(summary, ws), summary["run_id"]
        rows.append({"stage": label, "recipe": raw["recipe"], "run_id": summary["run_id"],
                     "parent_id": rows[-1]["run_id"] if rows else parent_id, "output": summary.get("output"),
                     "hands_on": previous_model,
                     "metrics": {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not
                                 isinstance(v, bool) and k not in ("max_steps",)}})
    result = {"pipeline": cfg.name, "status": "completed", "stages": rows, "final_model": previous_model,
              "final_run_id": previous_run, "wall_time_s": round(time.time() - started, 2),
              "run_id": previous_run, "output": previous_model}
    out = ws.root / "pipelines" / f"{cfg.name or 'pipeline'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    result["summary_file"] = str(out)
    return result
