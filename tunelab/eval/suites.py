"""Evaluation suites: YAML files naming tasks (data, type, metrics, decoding) that any model runs.

A task is one of
- ``generation``: the model answers each prompt (fixed decoding), scored against a reference
  (ROUGE, BLEU, chrF, exact match, BERTScore);
- ``classification``: each label is scored by its log-likelihood after the prompt; the most likely
  label is the prediction and the softmax over labels gives ROC-AUC (accuracy, P/R/F1);
- ``multiple_choice``: the lm-eval-harness rule: the choice with the highest log-likelihood wins
  (``accuracy``); ``accuracy_norm`` divides by the choice's length in characters (lm-eval's acc_norm);
- ``perplexity``: token-weighted perplexity of plain text in fixed blocks.

Prompts, targets and choices are Jinja templates over each record (``"{{ question }}"``), as in
lm-eval-harness. A task may instead point at an lm-eval-harness task YAML (``lm_eval: task.yaml``)
whose dataset is local: tunelab/eval/lm_eval_tasks.py reads it as lm-eval 0.4.x does (few-shot
contexts, ``process_docs`` and ``!function`` hooks, ``include``), and ``choice_logliks`` tokenizes
context and continuation as lm-eval does.

The built-in forgetting probe (``probe``) is a small general-English text (perplexity) and a small
multiple-choice set shipped with tunelab, both written for tunelab; a suite can point it at any
other files (e.g. wikitext). It is run on the base and on each tuned model; a tuned model whose
general perplexity rises or whose probe accuracy falls by more than the threshold is flagged.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab import config as cfglib
from tunelab._console import progress, status
from tunelab.config import Strict
from tunelab.data.formats import BadRecord
from tunelab.data.readers import read
from tunelab.errors import TunelabError
from tunelab.eval.business import BusinessSection
from tunelab.eval.judge import LLMJudge, reward_judgments
from tunelab.eval.lm_eval_tasks import read_task
from tunelab.eval.templates import find_path
from tunelab.eval.templates import jinja_env as _env
from tunelab.models.generation import generate
from tunelab.scoring import metrics as M
from tunelab.scoring.metrics import resolve_names
from tunelab.scoring.stats import bootstrap_ci
from tunelab.train.numerics import blocks_nll, prompt_ids
from tunelab.train.preference import completion_logprobs, load_reward_model

TASK_TYPES = ("generation", "classification", "multiple_choice", "perplexity")
DEFAULT_METRICS = {
    "generation": ["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "exact_match"],
    "classification": ["accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_micro", "f1_weighted"],
    "multiple_choice": ["accuracy", "accuracy_norm"],
    "perplexity": ["perplexity"],
}


class DecodingSection(Strict):
    """How generation tasks decode: greedy by default, so two models see the same rule."""

    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    stop: list[str] = Field(default_factory=list, description="cut a generation at the first of these strings")


class TaskSpec(Strict):
    name: str
    type: Literal["generation", "classification", "multiple_choice", "perplexity"] | None = None
    data: str | None = Field(None, description="local file (.jsonl/.json/.csv/.txt); relative to the current "
                                                "folder, else to the suite file")
    lm_eval: str | None = Field(None, description="an lm-eval-harness task YAML with a local dataset (its "
                                                  "!function hooks run, as in lm-eval)")
    prompt: str = Field("{{ prompt }}", description="Jinja template over a record: the model's input")
    target: str = Field("{{ reference }}", description="Jinja template: the reference / gold label / gold choice")
    choices: str | list[str] | None = Field(None, description="multiple_choice: Jinja giving a list, or a list")
    labels: list[str] | None = Field(None, description="classification: the label set (default: those in the data)")
    category: str | None = Field(None, description="record field for the per-category breakdown")
    metrics: list[str] | None = None
    limit: int | None = Field(None, ge=1)
    skip: int = Field(0, ge=0, description="leave out the first N records (e.g. the ones a run trained on)")
    chat: bool | None = Field(None, description="wrap the prompt in the model's chat template "
                                                "(default: yes for generation when the model has one)")
    target_delimiter: str = " "
    num_fewshot: int | None = Field(None, ge=0, description="lm_eval tasks: override the file's num_fewshot "
                                                            "(as lm-eval's --num_fewshot; not when the file says 0)")
    fewshot_seed: int = Field(1234, description="lm_eval tasks: the few-shot sampler's seed (lm-eval's "
                                                "fewshot_random_seed, default 1234)")
    block_size: int = Field(256, ge=8, description="perplexity: tokens per block")
    decoding: DecodingSection | None = None


class BootstrapSection(Strict):
    n_resamples: int = Field(1000, ge=1)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class ForgettingSection(Strict):
    enabled: bool = True
    text: str | None = Field(None, description="general text for perplexity (default: the built-in probe text)")
    multiple_choice: str | None = Field(None, description="JSONL of question/choices/answer (default: built-in)")
    max_perplexity_increase: float = Field(0.10, ge=0, description="flag when general perplexity rises by more "
                                                                    "than this fraction")
    max_accuracy_drop: float = Field(0.10, ge=0, description="flag when probe accuracy falls by more than this")
    block_size: int = Field(128, ge=8)


class JudgeSection(Strict):
    """Pairwise win rate of each model over the baseline on generation tasks: a reward model
    (``reward_model``: a reward run or folder) or an LLM behind an OpenAI-compatible endpoint."""

    reward_model: str | None = None
    endpoint: str | None = Field(None, description="base URL ending before /chat/completions, e.g. http://host:8000/v1")
    model: str | None = Field(None, description="the judge model's name at the endpoint")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    timeout_s: float = Field(60, gt=0)
    limit: int | None = Field(None, ge=1, description="judge the first N examples of each task")


class ModelSpec(Strict):
    name: str
    ref: str = Field(..., description="a run id, a model folder or a packaged model name")


class SuiteConfig(Strict):
    """``recipe: suite``: ``tunelab compare SUITE`` runs it; ``tunelab validate`` checks it."""

    recipe: Literal["suite"] = "suite"
    name: str
    tasks: list[TaskSpec] = Field(..., min_length=1)
    models: list[ModelSpec] = Field(default_factory=list, description="what 'tunelab compare' runs; the first is "
                                                                      "the baseline of every difference")
    decoding: DecodingSection = Field(default_factory=DecodingSection)
    bootstrap: BootstrapSection = Field(default_factory=BootstrapSection)
    forgetting: ForgettingSection = Field(default_factory=ForgettingSection)
    judge: JudgeSection | None = None
    business: BusinessSection = Field(default_factory=BusinessSection)
    max_examples_in_report: int = Field(500, ge=0)

    @model_validator(mode="after")
    def _semantics(self):
        check_suite(self)
        return self


def load_suite(path: str | Path, overrides: list[str] | None = None) -> tuple[SuiteConfig, Path]:
    """The suite and the folder its relative paths are read from."""
    raw = cfglib.apply_overrides(cfglib.load_yaml(path, "suite file"), overrides or [])
    raw.setdefault("recipe", "suite")
    cfg = cfglib.validate(SuiteConfig, raw, str(path))  # runs check_suite too
    return cfg, Path(path).resolve().parent


def check_suite(cfg: SuiteConfig) -> None:
    """What field types cannot say: unique task names, data per task, metric names.
    Raises ValueError, which the config loader reports with the file name like any other problem."""
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique ({', '.join(names)})")
    j = cfg.judge
    if j is not None and bool(j.reward_model) == bool(j.endpoint):
        raise ValueError("judge: give either reward_model or endpoint (+ model)")
    if j is not None and j.endpoint and not j.model:
        raise ValueError("judge: an endpoint needs model: (the judge model's name)")
    for t in cfg.tasks:
        if not t.data and not t.lm_eval:
            raise ValueError(f"task '{t.name}' needs data: FILE or lm_eval: TASK.yaml")
        if not t.lm_eval and t.type is None:
            raise ValueError(f"task '{t.name}' needs a type: {' | '.join(TASK_TYPES)}")
        if t.metrics and t.type:  # an lm_eval task's type is known once its file is read (load_task checks)
            try:
                _check_metrics(t.type, t.metrics)
            except TunelabError as e:
                raise ValueError(f"task '{t.name}': {e}") from None


def _check_metrics(kind: str, names: list[str]) -> None:
    extra = [n for n in names if n == "accuracy_norm"]
    rest = [n for n in names if n != "accuracy_norm"]
    if extra and kind != "multiple_choice":
        raise TunelabError("accuracy_norm is a multiple_choice metric")
    if rest:
        resolve_names(rest)


# ----------------------------------------------------------------------------- task data


@dataclass
class Task:
    name: str
    type: str
    metrics: list[str]
    items: list[dict]  # prompt, target, (choices, gold), category
    spec: TaskSpec
    source: str
    rejected: list[dict] = field(default_factory=list)


def _render(env, template, doc: dict):
    """lm-eval's rule: a bare field name is that field; otherwise a Jinja template."""
    if isinstance(template, list):
        return template
    if isinstance(template, int):
        return template
    if template in doc:
        return doc[template]
    return env.from_string(template).render(**doc)


def _as_list(x) -> list[str]:
    if isinstance(x, list):
        return [str(c) for c in x]
    try:
        v = ast.literal_eval(x)
    except (ValueError, SyntaxError):
        raise TunelabError(f"choices must render to a list, got {str(x)[:80]!r}") from None
    if not isinstance(v, (list, tuple)):
        raise TunelabError(f"choices must render to a list, got {str(x)[:80]!r}")
    return [str(c) for c in v]


def _lm_eval_task(spec: TaskSpec, base: Path) -> tuple[TaskSpec, dict]:
    """Read an lm-eval-harness task file (local dataset) as lm-eval 0.4.x reads it: tunelab/eval/lm_eval_tasks.py."""
    p = find_path(spec.lm_eval, base)
    want = None if spec.limit is None else spec.skip + spec.limit
    r = read_task(p, num_fewshot=spec.num_fewshot, fewshot_seed=spec.fewshot_seed, n_docs=want)
    upd = {"type": spec.type or r["type"], "data": r["source"], "target_delimiter": r["target_delimiter"],
           # lm-eval's context is plain text (no chat template unless asked)
           "chat": spec.chat if spec.chat is not None else False}
    if r["type"] == "generation":
        upd["decoding"] = (spec.decoding or DecodingSection()).model_copy(update={"stop": r["stop"]})
    if upd["type"] != r["type"]:
        raise TunelabError(f"task '{spec.name}': {p.name} is a {r['type']} task, not {upd['type']}")
    return spec.model_copy(update=upd), r


def load_task(spec: TaskSpec, base: Path) -> Task:
    """Read a task's records and render prompt, target, choices and category for each."""
    if spec.lm_eval:
        spec, r = _lm_eval_task(spec, base)
        return _task_from_lm_eval(spec, r)
    path = find_path(spec.data, base)
    if not path.exists():
        raise TunelabError(f"task '{spec.name}': data not found: {path}")
    kind = spec.type
    metrics = list(spec.metrics or DEFAULT_METRICS[kind])
    _check_metrics(kind, metrics)
    env = _env()
    items: list[dict] = []
    rejected: list[dict] = []
    text_unit = "paragraph" if kind == "perplexity" else "document"
    for k, (src, line, rec) in enumerate(read(path, text_unit=text_unit)):
        if k < spec.skip:
            continue
        if spec.limit is not None and len(items) >= spec.limit:
            break
        try:
            if isinstance(rec, BadRecord):
                raise rec
            if kind == "perplexity":
                text = rec.get("text") if isinstance(rec, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise BadRecord("no 'text' field")
                items.append({"text": text})
                continue
            item = {"prompt": str(_render(env, spec.prompt, rec))}
            target = _render(env, spec.target, rec)
            if kind == "multiple_choice":
                choices = _as_list(_render(env, spec.choices, rec)) if spec.choices is not None else None
                if not choices:
                    raise BadRecord("no choices (set choices: in the task)")
                gold = _gold(target, choices)
                item.update({"choices": choices, "gold": gold, "target": choices[gold]})
            else:
                item["target"] = str(target)
            if spec.category:
                item["category"] = str(rec.get(spec.category, "")) if isinstance(rec, dict) else ""
            items.append(item)
        except (BadRecord, TunelabError) as e:
            rejected.append({"source": src, "line": line, "reason": str(e)})
        except Exception as e:  # a template naming a field this record lacks
            rejected.append({"source": src, "line": line, "reason": f"{type(e).__name__}: {e}"})
    if not items:
        first = rejected[0]["reason"] if rejected else "the file is empty"
        raise TunelabError(f"task '{spec.name}': no usable records in {path} ({len(rejected)} rejected; first: "
                           f"{first})")
    if kind == "classification":
        labels = spec.labels or sorted({it["target"] for it in items})
        unknown = sorted({it["target"] for it in items} - set(labels))
        if unknown:
            raise TunelabError(f"task '{spec.name}': gold labels not in labels: {', '.join(unknown[:5])}")
        if len(labels) < 2:
            raise TunelabError(f"task '{spec.name}': classification needs at least two labels")
        for it in items:
            it["choices"], it["gold"] = labels, labels.index(it["target"])
    return Task(spec.name, kind, metrics, items, spec, str(path), rejected)


def _task_from_lm_eval(spec: TaskSpec, r: dict) -> Task:
    kind = spec.type
    metrics = list(spec.metrics or DEFAULT_METRICS[kind])
    _check_metrics(kind, metrics)
    items = []
    for it in r["items"]:
        if it["doc"] < spec.skip:
            continue
        if spec.limit is not None and len(items) >= spec.limit:
            break
        rec = it.pop("record", None)
        it.pop("doc")
        if spec.category:
            it["category"] = str(rec.get(spec.category, "")) if isinstance(rec, dict) else ""
        items.append(it)
    if not items:
        first = r["rejected"][0]["reason"] if r["rejected"] else "no docs"
        raise TunelabError(f"task '{spec.name}': no usable docs in {r['source']} ({len(r['rejected'])} rejected; "
                           f"first: {first})")
    return Task(spec.name, kind, metrics, items, spec, r["source"], r["rejected"])


def _gold(target, choices: list[str]) -> int:
    if isinstance(target, int) and not isinstance(target, bool):
        idx = target
    elif isinstance(target, str) and target.strip().lstrip("-").isdigit():
        idx = int(target.strip())
    elif str(target) in choices:
        return choices.index(str(target))
    else:
        raise TunelabError(f"target {str(target)[:40]!r} is neither a choice nor an index")
    if not 0 <= idx < len(choices):
        raise TunelabError(f"target index {idx} is outside the {len(choices)} choices")
    return idx


# ----------------------------------------------------------------------------- scoring a model


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's tokenization of a (context, continuation) request (``TemplateLM.loglikelihood`` and
    ``_encode_pair``, 0.4.x, causal models): the context's trailing whitespace moves to the continuation,
    the whole string is encoded and the continuation is what follows the context's tokens; an empty
    context is the BOS (else EOS) token."""

    def enc(text: str) -> list[int]:  # HFLM.tok_encode: no second BOS when the text already starts with one
        bos = tokenizer.bos_token
        return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], enc(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:  # a context of whitespace only (lm-eval refuses it): condition on the prefix token
        return _encode_pair(tokenizer, "", continuation)
    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx):]


def choice_logliks(model, tokenizer, contexts: list[str], choices: list[list[str]], delimiter: str = " ",
                   batch_size: int = 16, desc: str | None = None) -> list[list[float]]:
    """log p(delimiter + choice | context) for every choice of every item, tokenized as lm-eval does."""
    ctx_ids, cont_ids, owner = [], [], []
    for i, (c, chs) in enumerate(zip(contexts, choices)):
        for ch in chs:
            a, b = _encode_pair(tokenizer, c, delimiter + ch)
            ctx_ids.append(a)
            cont_ids.append(b)
            owner.append(i)
    lps = completion_logprobs(model, ctx_ids, cont_ids, tokenizer.pad_token_id, batch_size,
                              desc=f"{desc}: {len(contexts)} items, {len(ctx_ids)} choices" if desc else None)
    out: list[list[float]] = [[] for _ in contexts]
    for i, lp in zip(owner, lps):
        out[i].append(lp)
    return out


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        return prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def run_task(task: Task, model, tokenizer, decoding: DecodingSection, boot: BootstrapSection, opts: dict | None = None,
             model_name: str = ""):
    """Score one model on one task → (Scored, per-example rows, generation stats). ``model_name`` labels the
    progress bars."""
    import numpy as np

    label = f"{model_name} " if model_name else ""

    kw = {"n_resamples": boot.n_resamples, "confidence": boot.confidence, "seed": boot.seed, **(opts or {})}
    items = task.items
    dec = task.spec.decoding or decoding
    gen_stats: dict = {}
    if task.type == "generation":
        chat = task.spec.chat if task.spec.chat is not None else bool(getattr(tokenizer, "chat_template", None))
        prompts = [_prompt_ids(tokenizer, it["prompt"], chat) for it in items]
        preds, stats = generate(model, tokenizer, prompts, dec.max_new_tokens, dec.batch_size,
                                desc=f"{label}{task.name}: generate", sampling=dec)
        preds = [_cut(p, dec.stop) for p in preds]
        refs = [it["target"] for it in items]
        scored = M.evaluate(task.metrics, preds, refs, **kw)
        rows = [{"index": i, "prompt": it["prompt"], "reference": it["target"], "prediction": preds[i],
                 **({"category": it["category"]} if "category" in it else {}), **stats[i]}
                for i, it in enumerate(items)]
        gen_stats = {"generated_tokens": sum(s["new_tokens"] for s in stats)}
    elif task.type in ("classification", "multiple_choice"):
        ll = choice_logliks(model, tokenizer, [it["prompt"] for it in items], [it["choices"] for it in items],
                            task.spec.target_delimiter, dec.batch_size, desc=f"{label}{task.name}")
        pred = [int(np.argmax(x)) for x in ll]
        gold = [it["gold"] for it in items]
        rows = []
        if task.type == "classification":
            labels = items[0]["choices"]
            probs = [np.exp(np.asarray(x) - np.logaddexp.reduce(x)) for x in ll]
            want = [m for m in task.metrics]
            preds_l = [labels[p] for p in pred]
            refs_l = [it["target"] for it in items]
            main = [m for m in want if m != "roc_auc"]
            scored = M.evaluate(main, preds_l, refs_l, **kw) if main else M.Scored()
            if "roc_auc" in want:
                scores = [p[1] for p in probs] if len(labels) == 2 else [p.tolist() for p in probs]
                refs_auc = [labels.index(r) if len(labels) == 2 else r for r in refs_l]
                auc = M.evaluate(["roc_auc"], scores, refs_auc, labels=labels, **kw)
                scored.values.update(auc.values)
                scored.stats.update(auc.stats)
            scored.values = {m: scored.values[m] for m in M.resolve_names(want)}
            for i, it in enumerate(items):
                rows.append({"index": i, "prompt": it["prompt"], "reference": it["target"],
                             "prediction": preds_l[i], "correct": preds_l[i] == it["target"],
                             "probability": round(float(probs[i][pred[i]]), 4),
                             **({"category": it["category"]} if "category" in it else {})})
        else:
            # lm-eval's acc_norm: log-likelihood / the choice's length in characters
            norm = [int(np.argmax([v / max(len(c), 1) for v, c in zip(x, it["choices"])]))
                    for x, it in zip(ll, items)]
            scored = M.Scored()
            if "accuracy" in task.metrics:
                s = M.evaluate(["accuracy"], pred, gold, **kw)
                scored.values.update(s.values)
                scored.stats.update(s.stats)
            if "accuracy_norm" in task.metrics:
                s = M.evaluate(["accuracy"], norm, gold, **kw)
                scored.values["accuracy_norm"] = s.values["accuracy"]
                scored.stats["accuracy_norm"] = s.stats["accuracy"]
            for i, it in enumerate(items):
                rows.append({"index": i, "prompt": it["prompt"], "reference": it["target"],
                             "prediction": it["choices"][pred[i]], "correct": pred[i] == gold[i],
                             "loglik": [round(v, 4) for v in ll[i]],
                             **({"category": it["category"]} if "category" in it else {})})
    else:
        nll, counts, rows = [], [], []
        blocks = _blocks(tokenizer, [it["text"] for it in items], task.spec.block_size)
        if not blocks:
            raise TunelabError(f"task '{task.name}': the text is shorter than two tokens")

        for i, (doc, b) in enumerate(progress(blocks, f"{label}{task.name}: perplexity", unit="block")):
            total, n = blocks_nll(model, [b], 1)
            nll.append(total)
            counts.append(n)
            rows.append({"index": i, "document": doc, "tokens": n, "nll": round(total, 4),
                         "perplexity": round(math.exp(total / n), 4)})
        scored = M.evaluate(["perplexity"], nll, counts, **kw)
    # keep intervals for metrics that were renamed (accuracy_norm)
    for k, v in scored.values.items():
        if "ci_low" not in v:
            v["ci_low"], v["ci_high"] = bootstrap_ci(scored.stats[k], n_resamples=boot.n_resamples,
                                                     confidence=boot.confidence, seed=boot.seed)
    return scored, rows, gen_stats


def _cut(text: str, stops: list[str]) -> str:
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


def _blocks(tokenizer, texts: list[str], size: int) -> list[tuple[int, list[int]]]:
    """Each document cut into non-overlapping blocks of ``size`` tokens (the last may be shorter)."""
    out = []
    for d, t in enumerate(texts):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), size):
            b = ids[s: s + size]
            if len(b) >= 2:
                out.append((d, b))
    return out


# ----------------------------------------------------------------------------- forgetting probe


def probe_files(cfg: ForgettingSection, base: Path | None = None) -> tuple[Path, Path]:
    """The probe's text and multiple-choice files: the suite's own, or the ones tunelab ships."""
    from importlib.resources import files

    res = files("tunelab.resources")
    text = Path(str(res / "probe_general.txt"))
    mc = Path(str(res / "probe_mc.jsonl"))
    if cfg.text:
        text = find_path(cfg.text, base or Path.cwd())
    if cfg.multiple_choice:
        mc = find_path(cfg.multiple_choice, base or Path.cwd())
    return text, mc


def probe(model, tokenizer, cfg: ForgettingSection, base: Path | None = None, model_name: str = "") -> dict:
    """General-capability probe: perplexity on general text and multiple-choice accuracy."""
    text, mc = probe_files(cfg, base)
    boot = BootstrapSection(n_resamples=200)
    ppl_task = load_task(TaskSpec(name="probe_text", type="perplexity", data=str(text), block_size=cfg.block_size),
                         Path("."))
    mc_task = load_task(TaskSpec(name="probe_mc", type="multiple_choice", data=str(mc), prompt="{{ question }}",
                                 choices="{{ choices }}", target="{{ answer }}", metrics=["accuracy"]), Path("."))
    status(f"forgetting probe{' of ' + model_name if model_name else ''}: perplexity on {len(ppl_task.items)} "
           f"general text(s), accuracy on {len(mc_task.items)} multiple-choice items")
    p, _, _ = run_task(ppl_task, model, tokenizer, DecodingSection(), boot, model_name=model_name)
    a, _, _ = run_task(mc_task, model, tokenizer, DecodingSection(), boot, model_name=model_name)
    return {"general_perplexity": p.values["perplexity"]["value"], "probe_accuracy": a.values["accuracy"]["value"],
            "text": str(text), "multiple_choice": str(mc), "mc_items": len(mc_task.items)}


def forgetting_verdict(before: dict, after: dict, cfg: ForgettingSection) -> dict:
    """Compare the probe after tuning with before; ``flagged`` when either threshold is crossed."""
    rise = after["general_perplexity"] / before["general_perplexity"] - 1
    drop = before["probe_accuracy"] - after["probe_accuracy"]
    reasons = []
    if rise > cfg.max_perplexity_increase:
        reasons.append(f"general perplexity rose {rise:+.1%} (threshold {cfg.max_perplexity_increase:.0%})")
    if drop > cfg.max_accuracy_drop:
        reasons.append(f"probe accuracy fell {drop:.3f} (threshold {cfg.max_accuracy_drop})")
    return {"before": before, "after": after, "perplexity_change": rise, "accuracy_change": -drop,
            "flagged": bool(reasons), "reasons": reasons,
            "thresholds": {"max_perplexity_increase": cfg.max_perplexity_increase,
                           "max_accuracy_drop": cfg.max_accuracy_drop}}


def judge_win_rates(cfg: SuiteConfig, ws, baseline: str, rows: dict, tasks: list) -> dict:
    """Win rate of every model over the baseline on each generation task, by the suite's judge."""
    j = cfg.judge
    if j.reward_model:
        scorer, _ = load_reward_model(j.reward_model, ws)

        def judge(p, a, b):
            return reward_judgments(scorer, p, a, b)
        who = f"reward model {j.reward_model}"
    else:
        llm = LLMJudge(j.endpoint, j.model, api_key_env=j.api_key_env, timeout=j.timeout_s, seed=cfg.bootstrap.seed)
        judge, who = llm, f"LLM judge {j.model} at {j.endpoint}"
    out: dict = {"judge": who}
    b = cfg.bootstrap
    for m in rows:
        if m == baseline:
            continue
        out[m] = {}
        for t in tasks:
            if t.type != "generation":
                continue
            base_rows, rows_m = rows[baseline][t.name][: j.limit], rows[m][t.name][: j.limit]
            js = judge([r["prompt"] for r in base_rows], [r["prediction"] for r in base_rows],
                       [r["prediction"] for r in rows_m])
            v = M.evaluate(["win_rate"], js, n_resamples=b.n_resamples, confidence=b.confidence, seed=b.seed)
            out[m][t.name] = {k: x for k, x in v.values["win_rate"].items() if k != "per_example"}
            out[m][t.name]["counts"] = {"win": js.count(1.0), "tie": js.count(0.5), "loss": js.count(0.0)}
    return out


def json_safe(x):
    """NaN/inf → None so results are valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def dumps(x) -> str:
    return json.dumps(json_safe(x), ensure_ascii=False)
