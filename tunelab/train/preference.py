"""What the reward, DPO and RLHF recipes share that is about preferences: preference pairs and prompts,
the starting policy, reward scoring, and policy evaluation against a reward.

Everything here is plain text in, text out: a prompt string and a response string. Chat
records are rendered with the model's chat template first, so one scoring function serves
reward training, its evaluation, the RL reward and the before/after report alike; hh-rlhf
transcripts ("\n\nHuman: ...\n\nAssistant:") are parsed into chat turns and rendered the same way
when ``data.chat_template`` says so (:func:`chat_choice`), and kept as raw text otherwise. Models are
resolved and loaded through tunelab/models/refs.py; the run itself (folder, catalog, trainer
arguments, saving) is tunelab/train/_run.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

import yaml

from tunelab._console import progress
from tunelab.data.formats import BadRecord
from tunelab.data.lineage import absolute_paths, file_lineage
from tunelab.data.loaders import load_records, split_by_content, split_validation
from tunelab.data.records import hh_messages, is_hh_prompt, kind, to_canonical
from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.scoring.stats import bootstrap_ci, mean_statistic, paired_bootstrap
from tunelab.sections import SFT_ONLY_TRAIN
from tunelab.train._run import Run, write_rows
from tunelab.train.numerics import (IGNORE_INDEX, Rendered, _causal_parts, causal_logits, encode_prompt_response,
                                    encode_prompt_responses, fit_prompt, n_special_tokens, prompt_budget,
                                    render_prompt, token_nll)
from tunelab.train.peft import peft_config, peft_section
from tunelab.workspace import Workspace

# train: options the TRL-engined recipes do not read, refused in their configs (sections.refuse_unread):
# padding-free batches are SFT's; group_by_length has no input_ids column to sort TRL's reward/DPO pairs by
# (prompt_ids/chosen_ids/rejected_ids), and GRPO/RLOO draw prompts with their own repeat sampler
UNREAD_TRAIN = SFT_ONLY_TRAIN + ("group_by_length",)

# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class ChatChoice:
    """How hh-rlhf transcripts reach the model: ``data.chat_template`` resolved against the tokenizer."""

    use: bool  # parse them into chat turns and render those with the chat template
    label: str  # what was used, in words: printed on the data line, summary.json's data.chat_template


def chat_choice(setting: bool | str, template_added: bool) -> ChatChoice:
    """``data.chat_template`` (auto | true | false) for a tokenizer from ``refs.load_tokenizer``, whose
    ``template_added`` says the model had no chat template of its own (tunelab's plain one was put in).
    auto: the template only where the model has its own (a chat model); a base model keeps the raw text."""
    if setting is False:
        return ChatChoice(False, "raw text (data.chat_template: false)")
    if setting == "auto" and template_added:
        return ChatChoice(False, "raw text (auto: the model has no chat template)")
    return ChatChoice(True, "chat template (tunelab's plain one: the model has none)" if template_added
                      else "chat template (model's own)")


def _rendered(tokenizer, messages: list[dict], source: str | None = None) -> Rendered:
    import jinja2

    try:
        return render_prompt(tokenizer, messages, source)
    except jinja2.TemplateError as e:  # e.g. a template that wants strict user/assistant alternation
        raise BadRecord(f"the model's chat template refuses this conversation: {str(e)[:160]}") from None


def _prompt(x, tokenizer, chat: bool) -> str:
    """A canonical prompt as the model reads it. Chat messages: rendered with the chat template and its
    generation prompt. An hh-rlhf transcript: the same, from its parsed turns, when ``chat``; else its raw
    text. Any other string: as it is."""
    if isinstance(x, str):
        msgs = hh_messages(x) if chat else None
        return x if msgs is None else _rendered(tokenizer, msgs, source=x)
    return _rendered(tokenizer, x)


def _response(x, hh_chat: bool) -> str:
    """A canonical response as text: a string as it is, or the content of its assistant messages. The answer to
    an hh-rlhf transcript rendered as chat loses the space that followed the "Assistant:" cue."""
    if isinstance(x, str):
        return Rendered(x.strip(), source=x) if hh_chat else x
    return "".join(m["content"] for m in x if m.get("role") == "assistant") or "".join(m["content"] for m in x)


def load_pairs(path: str, tokenizer, rejects: list[dict], limit: int | None = None, chat: bool = False) -> list[dict]:
    """Preference records → ``{"prompt", "chosen", "rejected"}`` strings; unusable records go to ``rejects``.

    Accepts prompt/chosen/rejected (strings or chat messages) and hh-rlhf whole transcripts,
    which ``data.records`` splits at the last "\\n\\nAssistant:"; with ``chat`` (:func:`chat_choice`) an
    hh-rlhf prompt becomes chat turns rendered with the tokenizer's chat template.
    """
    def pair(rec) -> dict:
        c = to_canonical(rec)
        if kind(c) != "preference":
            raise BadRecord(f"not a preference pair (a {kind(c)} record); need prompt, chosen, rejected")
        prompt = _prompt(c["prompt"], tokenizer, chat)
        hh_chat = isinstance(prompt, Rendered) and isinstance(c["prompt"], str)
        p = {"prompt": prompt, "chosen": _response(c["chosen"], hh_chat),
             "rejected": _response(c["rejected"], hh_chat)}
        if p["chosen"] == p["rejected"]:
            raise BadRecord("chosen and rejected are the same response")
        return p

    return load_records(path, pair, rejects, limit)


def load_prompts(path: str, tokenizer, rejects: list[dict], limit: int | None = None, chat: bool = False) -> list[str]:
    """Prompts for RL: from preference pairs, chat/instruction records (the context before the last
    assistant turn), or records with just a ``prompt`` field; hh-rlhf prompts as :func:`load_pairs` has them."""
    def prompt(rec) -> str:
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and not ({"chosen", "completion"} & set(rec)):
            p = _prompt(rec["prompt"], tokenizer, chat)
        else:
            c = to_canonical(rec)
            k = kind(c)
            if k == "preference":
                p = _prompt(c["prompt"], tokenizer, chat)
            elif k == "chat":
                msgs = c["messages"]
                ctx = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
                p = _prompt(ctx, tokenizer, chat)
            else:
                raise BadRecord(f"no prompt in a {k} record")
        if not p.strip():
            raise BadRecord("empty prompt")
        return p

    return load_records(path, prompt, rejects, limit)


def split_key(x):
    """What a content-hash split hashes: a pair or a prompt as its record had it (``Rendered.source``), so the
    held-out pairs are the same whichever way they are rendered (``data.chat_template``)."""
    if isinstance(x, dict):
        return {k: getattr(v, "source", v) for k, v in x.items()}
    return getattr(x, "source", x)


def count_hh(items: list) -> int:
    """How many pairs (or prompts) came from hh-rlhf transcripts."""
    def hh(x) -> bool:
        text = split_key(x)["prompt"] if isinstance(x, dict) else split_key(x)
        try:
            return hh_messages(text) is not None
        except BadRecord:
            return is_hh_prompt(text)
    return sum(hh(x) for x in items)


def split_sets(items: list, data, seed: int, load) -> tuple[list, list, list, str]:
    """(train, validation, held-out, name of the held-out set). Validation comes from ``data.validation``
    or a content-hash split; the held-out report set is ``data.test`` when given, else a ``data.test_split``
    share of train split off by content hash first (the same pairs whatever the seed, the order or
    ``data.limit``; never trained on nor used for early stopping), else the validation set."""
    test_split = getattr(data, "test_split", 0.0)
    if data.test and test_split:
        raise TunelabError("data: set data.test or data.test_split, not both")
    split_held = None
    if test_split:
        items, split_held = split_by_content(items, test_split, salt="test", key=split_key)
    if getattr(data, "limit", None):
        items = items[: data.limit]
    if data.validation:
        train, val = items, load(data.validation)
    elif data.validation_split > 0:
        train, val = split_validation(items, data.validation_split, seed, key=split_key)
    else:
        train, val = items, []
    if data.test:
        held, name = load(data.test), "test"
    elif split_held is not None:
        held, name = split_held, "test_split"
    else:
        held, name = val, "validation"
    if data.test_limit:
        held = held[: data.test_limit]
    return train, val, held, name


def fit_pairs(tokenizer, pairs: list[dict], max_length: int) -> tuple[list[dict], int]:
    """Cut each prompt from the left so prompt + the longer response fits ``max_length`` tokens
    (trainers that cut from the right would otherwise drop the responses of long prompts). A chat prompt
    loses whole turns and stays a valid rendered prompt (``numerics.fit_prompt``). Plain strings out."""
    special = n_special_tokens(tokenizer) + 1  # + the EOS the trainer appends
    out, cut = [], 0
    for p in pairs:
        n = max(len(tokenizer(p[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        text, was_cut = fit_prompt(tokenizer, p["prompt"], prompt_budget(max_length, n, special))
        cut += int(was_cut)
        out.append({"prompt": str(text), "chosen": str(p["chosen"]), "rejected": str(p["rejected"])})
    return out, cut


# ----------------------------------------------------------------------------- the start of a run


def prepare(r: Run):
    """The steps before a reward, DPO or RLHF run has a folder: its config with absolute data paths (so
    evaluation and --resume work from any folder), the data lineage (a missing file fails here) and the
    model it starts from (``model.name``: a folder, a packaged name, or a run: its model, or its adapter,
    which keeps training). Starts the recipe cannot use are refused. Returns (cfg, start, lineage)."""
    import datasets
    import transformers

    cfg = r.cfg.model_copy(update={"data": absolute_paths(r.cfg.data)})
    lineage = file_lineage(cfg.data)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    start = refs.resolve(cfg.model.name, r.ws, trust_remote_code=cfg.model.trust_remote_code)
    if start.adapter is not None and cfg.recipe == "reward":
        raise TunelabError(f"model.name: run {start.run_id} holds a LoRA adapter; a reward model starts from a full "
                           "model folder (a packaged name, a folder, or a full fine-tuning run)")
    if start.adapter is not None and cfg.method == "full":
        raise TunelabError(f"model.name: run {start.run_id} holds an adapter; use an adapter method (the run's "
                           "adapter keeps training) or start from a merged model folder (tunelab export --merge)")
    return cfg, start, lineage


def begin(r: Run, cfg, start: refs.ModelRef, lineage: dict) -> None:
    """Make the run's folder and catalog row; a start from a run makes that run the parent."""
    r.begin(cfg, base_model=cfg.model.name, parent_id=r.parent_id or start.run_id,
            lineage={"base_model_path": str(start.path), "start_adapter": str(start.adapter) if start.adapter else None,
                     **lineage})


def prompt_sets(cfg, tokenizer, rejects: list[dict], chat: ChatChoice) -> tuple[list, list, list, str]:
    """The prompts of an RL run: (train, validation, held-out, name of the held-out set), split as the pairs of
    reward and DPO runs are: ``data.limit`` applies after ``data.test_split``, so the held-out prompts do not
    depend on it and the run trains on ``limit`` prompts."""
    prompts = load_prompts(cfg.data.train, tokenizer, rejects, chat=chat.use)
    return split_sets(prompts, cfg.data, cfg.train.seed,
                      lambda path: load_prompts(path, tokenizer, rejects, chat=chat.use))


def pair_sets(r: Run, cfg, tokenizer, fit, cut_key: str, chat: ChatChoice) -> tuple[list, list, list, dict]:
    """The preference pairs of a reward or DPO run: (train, validation, held-out, data report). Train and
    validation go through ``fit(tokenizer, pairs, max_length) -> (items, n_cut)``; rejects are written."""
    rejects: list[dict] = []
    pairs = load_pairs(cfg.data.train, tokenizer, rejects, chat=chat.use)  # data.limit applies after test_split
    train, val, held, held_name = split_sets(pairs, cfg.data, cfg.train.seed,
                                             lambda path: load_pairs(path, tokenizer, rejects, chat=chat.use))
    r.write_rejects(rejects)
    n_hh = count_hh(train + val + (held if held_name != "validation" else []))
    L = cfg.data.max_length
    train, tr_cut = fit(tokenizer, train, L)
    val, va_cut = fit(tokenizer, val, L)
    if not train:
        raise TunelabError(f"no usable preference pairs in {cfg.data.train} ({len(rejects)} rejected; "
                           f"see {r.dir / 'rejects.jsonl'})")
    print(f"data: {len(train)} train / {len(val)} validation pairs; held-out report on {len(held)} {held_name} "
          f"pairs; prompts cut from the left to fit {L} tokens: {tr_cut + va_cut}; rejected records: {len(rejects)}; "
          f"hh-rlhf transcripts: {n_hh}, as {chat.label}")
    return train, val, held, {"train_pairs": len(train), "validation_pairs": len(val), "heldout_pairs": len(held),
                              "heldout_set": held_name, "rejected": len(rejects), cut_key: tr_cut + va_cut,
                              "hh_transcripts": n_hh, "chat_template": chat.label}


def policy_for_training(start: refs.ModelRef, cfg):
    """(model, peft_config) for a TRL trainer. A fresh adapter on a model folder: the reference is the
    folder's model (adapter disabled). Starting from a run with an adapter: that adapter keeps training
    (whatever its method) and TRL keeps a frozen copy as the reference. Full: the reference is the folder's
    model too (a second copy)."""
    model = refs.load(start, trainable=True)
    if start.adapter is not None or cfg.method == "full":
        return model, None
    return model, peft_config(peft_section(cfg), "CAUSAL_LM", model=model)


def load_trained(start: refs.ModelRef, out_dir: Path, adapter: bool):
    """The saved policy, reloaded in float32 from disk: evaluation sees exactly the artifact (and not
    the trainer's model, whose forward accelerate wraps in mixed-precision autocast)."""
    saved = dataclasses.replace(start, adapter=out_dir) if adapter else dataclasses.replace(start, path=out_dir,
                                                                                            adapter=None)
    return refs.load(saved, device=refs.eval_device())


# ----------------------------------------------------------------------------- reward scoring


def _padded(seqs: list[list[int]], pad: int, device, left: bool = False):
    """(input_ids, attention_mask) of a batch on ``device``, right-padded (left-padded for generation)."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def score_ids(model, seqs: list[list[int]], pad_id: int, batch_size: int = 16, desc: str | None = None,
              check: Callable[[], None] | None = None) -> list[float]:
    """Scalar scores of a sequence-classification model (num_labels=1), right-padded batches. ``desc``: a
    progress bar under that name; ``check``: called before each batch (a run's cancel check, which raises)."""
    import torch

    out: list[float] = []
    model.eval()
    bar = progress(len(seqs), desc, unit="seq") if desc else contextlib.nullcontext()
    with torch.no_grad(), bar:
        for b in range(0, len(seqs), batch_size):
            if check is not None:
                check()
            ids, mask = _padded(seqs[b: b + batch_size], pad_id, next(model.parameters()).device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            out.extend(logits[:, 0].float().cpu().tolist())
            if desc:
                bar.update(len(ids))
    return out


def score_pairs(model, chosen: list[list[int]], rejected: list[list[int]], pad_id: int, batch_size: int = 16,
                desc: str | None = None, check: Callable[[], None] | None = None) -> tuple[list[float], list[float]]:
    """Scalar scores of chosen and rejected sequences, a pair's two in one ``[chosen; rejected]`` batch so that
    the prompt they share runs once (tunelab/train/shared_prompt.py; the same scores as :func:`score_ids` of each
    side up to rounding). ``batch_size`` sequences a batch; ``desc``: a progress bar over the pairs; ``check``:
    called before each batch (a run's cancel check, which raises)."""
    import torch

    from tunelab.train.shared_prompt import pairs_once

    rc: list[float] = []
    rr: list[float] = []
    model.eval()
    step = max(1, batch_size // 2)
    bar = progress(len(chosen), desc, unit="pair") if desc else contextlib.nullcontext()
    with torch.no_grad(), bar, pairs_once(model):
        for b in range(0, len(chosen), step):
            if check is not None:
                check()
            c, r = chosen[b: b + step], rejected[b: b + step]
            ids, mask = _padded(c + r, pad_id, next(model.parameters()).device)
            scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu().tolist()
            rc.extend(scores[:len(c)])
            rr.extend(scores[len(c):])
            if desc:
                bar.update(len(c))
    return rc, rr


def pairwise_eval(model, tokenizer, pairs: list[dict], max_length: int, batch_size: int = 16,
                  desc: str | None = None, check: Callable[[], None] | None = None) -> dict:
    """Bradley–Terry view of a reward model on pairs: accuracy (chosen scored above rejected) and mean margin.
    ``desc``: progress bars under that name; ``check``: called between batches (a run's cancel check)."""
    if not pairs:
        return {"pairs": 0, "accuracy": None, "accuracy_ci95": [None, None], "mean_margin": None, "wins": []}
    # one prompt cut per pair, as reward training encodes them (reward._features)
    encoded = [encode_prompt_responses(tokenizer, p["prompt"], [p["chosen"], p["rejected"]], max_length)[0]
               for p in pairs]
    chosen, rejected = [c for c, _ in encoded], [r for _, r in encoded]
    rc, rr = score_pairs(model, chosen, rejected, tokenizer.pad_token_id, batch_size,
                         desc and f"{desc}: chosen and rejected", check)
    margins = [c - r for c, r in zip(rc, rr)]
    # a tie is half right: a constant reward model scores 0.5, not 0
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    acc = sum(wins) / len(wins)
    return {"pairs": len(pairs), "accuracy": round(acc, 4), "accuracy_ci95": mean_ci(wins),
            "mean_margin": round(sum(margins) / len(margins), 4),
            "mean_reward_chosen": round(sum(rc) / len(rc), 4), "mean_reward_rejected": round(sum(rr) / len(rr), 4),
            "wins": wins}


def mean_ci(values: list[float], confidence: float = 0.95) -> list[float | None]:
    """Percentile bootstrap interval of a mean over held-out pairs (tunelab/scoring/stats.py), rounded."""
    lo, hi = bootstrap_ci(mean_statistic(values), confidence=confidence)
    return [None if lo is None else round(lo, 4), None if hi is None else round(hi, 4)]


def paired_gain(before: list[float], after: list[float]) -> dict:
    """after − before on the same held-out pairs: the difference, its paired-bootstrap 95% interval, p."""
    d = paired_bootstrap(mean_statistic(before), mean_statistic(after))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


class RewardScorer:
    """A trained reward model as a reward function: ``scorer(prompts, completions) -> [float]``.

    The same tokenization as reward training (prompt and response tokenized separately, prompt cut
    from the left), so RL optimizes exactly the score that was evaluated. One completion is scored at a
    time, so a prompt too long for ``max_length`` is cut to leave room for that completion alone (in
    training, for the longer answer of the pair): the same text whenever the prompt fits.
    """

    __name__ = "reward_model"

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 16, name: str = "reward_model"):
        self.model, self.tokenizer, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size
        self.__name__ = name

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        seqs = [encode_prompt_response(self.tokenizer, _as_str(p), _as_str(c), self.max_length)[0]
                for p, c in zip(prompts, completions)]
        return score_ids(self.model, seqs, self.tokenizer.pad_token_id, self.batch_size)


def _as_str(x) -> str:
    if isinstance(x, str):
        return x
    return "".join(m.get("content", "") for m in x)  # conversational completions from a trainer


def load_reward_model(ref: str, ws: Workspace):
    """A reward run (folder, id or unique id prefix) or a sequence-classification model folder →
    (RewardScorer, info). A run's adapter is merged into its base: scoring runs a plain model."""
    import transformers

    transformers.logging.set_verbosity_error()
    run_dir = ws.find_run(ref)
    info: dict = {"reward_model": ref}
    if run_dir is not None:
        rcfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        if rcfg.get("recipe") != "reward":
            raise TunelabError(f"reward_model: run {run_dir.name} is a '{rcfg.get('recipe')}' run, not a reward "
                               "model; train one with 'recipe: reward'")
        max_length = int((rcfg.get("data") or {}).get("max_length", 512))
        m = refs.resolve(str(run_dir), ws)
        info.update({"reward_run_id": run_dir.name, "reward_model_path": str(m.tokenizer_path)})
        summary = run_dir / "summary.json"
        trained_on = (json.loads(summary.read_text(encoding="utf-8")).get("data") or {}).get("chat_template") \
            if summary.is_file() else None
        if trained_on:  # how its hh-rlhf transcripts were fed: compare with the prompts it will score
            info["reward_chat_template"] = trained_on
    elif Path(ref).is_dir():
        m, max_length = refs.resolve(ref, ws, runs=False), 512
        info["reward_model_path"] = str(m.path)
    else:
        raise TunelabError(f"reward_model: '{ref}' is neither a run id in {ws.root} nor a model folder")
    model = refs.load(m, task="seq_cls", merge=True, num_labels=1)
    tok, _ = refs.load_tokenizer(m)
    model.config.pad_token_id = tok.pad_token_id
    model.to(refs.eval_device()).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return RewardScorer(model, tok, max_length), info


def warn_if_reward_reads_otherwise(info: dict, chat: ChatChoice) -> None:
    """Say so when a reward run was trained on hh-rlhf transcripts fed one way (chat template or raw text) and is
    about to score prompts fed the other way: its scores are then off its training distribution."""
    theirs = info.get("reward_chat_template")
    if theirs and theirs.startswith("chat template") != chat.use:
        print(f"warning: reward model {info.get('reward_run_id')} was trained on hh-rlhf transcripts as {theirs}; "
              f"this run feeds them as {chat.label} (set data.chat_template to match)")


def load_reward_function(spec: str):
    """``module:function`` (or ``path/to/file.py:function``) → a callable(prompts, completions, **kw) -> [float]."""
    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise TunelabError(f"reward_function: '{spec}' must look like 'package.module:function'")
    try:
        if mod_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if spec_ is None:
                raise ImportError(mod_name)
            mod = importlib.util.module_from_spec(spec_)
            sys.modules[spec_.name] = mod
            spec_.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
        fn = getattr(mod, attr)
    except (ImportError, AttributeError, FileNotFoundError) as e:
        raise TunelabError(f"reward_function: cannot import '{spec}' ({e})") from None
    if not callable(fn):
        raise TunelabError(f"reward_function: '{spec}' is not callable")
    return fn


# ----------------------------------------------------------------------------- policy evaluation


def sample(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
           seed: int, temperature: float = 1.0, check: Callable[[], None] | None = None) -> list[list[int]]:
    """One sampled completion per prompt (pure sampling at ``temperature``: no top-k/top-p, so the
    log-ratio below is an unbiased KL estimate). Completions end at and include EOS when produced.
    ``check``: called before each batch (a run's cancel check, which raises)."""
    import torch

    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    model.eval()
    torch.manual_seed(seed)
    for b in range(0, len(prompt_ids), batch_size):
        if check is not None:
            check()
        ids, mask = _padded(prompt_ids[b: b + batch_size], tokenizer.pad_token_id, next(model.parameters()).device,
                            left=True)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos)
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def completion_logprobs(model, prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int,
                        batch_size: int = 16, desc: str | None = None,
                        check: Callable[[], None] | None = None) -> list[float]:
    """Sum of log p(completion | prompt) under ``model``, one number per pair. ``desc``: a progress bar over the
    pairs under that name; ``check``: called before each batch (a run's cancel check, which raises)."""
    import torch

    out: list[float] = []
    model.eval()
    bar = progress(len(prompt_ids), desc, unit="pair") if desc else contextlib.nullcontext()
    with torch.no_grad(), bar:
        for b in range(0, len(prompt_ids), batch_size):
            if check is not None:
                check()
            ps, cs = prompt_ids[b: b + batch_size], completions[b: b + batch_size]
            ids, mask = _padded([p + c for p, c in zip(ps, cs)], pad_id, next(model.parameters()).device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits.float(), -1).cpu()
            for i, (p, c) in enumerate(zip(ps, cs)):
                if not c:
                    out.append(0.0)
                    continue
                pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
                out.append(float(logp[i, pos, torch.tensor(c)].sum()))
            if desc:
                bar.update(len(ps))
    return out


def paired_completion_logprobs(model, prompt_ids: list[list[int]], chosen: list[list[int]],
                               rejected: list[list[int]], pad_id: int, batch_size: int = 16, desc: str | None = None,
                               check: Callable[[], None] | None = None) -> tuple[list[float], list[float]]:
    """:func:`completion_logprobs` of chosen and of rejected after the same prompts, a pair's two rows in one
    ``[chosen; rejected]`` batch (the shared prompt runs once: tunelab/train/shared_prompt.py) and the LM head
    only at completion positions. ``batch_size`` rows a batch; ``desc``: a progress bar over the pairs."""
    import torch
    import torch.nn.functional as F

    from tunelab.train.shared_prompt import pairs_once

    out_c: list[float] = []
    out_r: list[float] = []
    model.eval()
    parts = _causal_parts(model)
    dev = next(model.parameters()).device
    step = max(1, batch_size // 2)
    bar = progress(len(prompt_ids), desc, unit="pair") if desc else contextlib.nullcontext()
    with torch.no_grad(), bar, pairs_once(model):
        for b in range(0, len(prompt_ids), step):
            if check is not None:
                check()
            ps = prompt_ids[b: b + step]
            rows = [p + c for p, c in zip(ps, chosen[b: b + step])] + [p + r for p, r in zip(ps, rejected[b: b + step])]
            plen = [len(p) for p in ps] * 2
            ids, mask = _padded(rows, pad_id, dev)
            labels = torch.full_like(ids, IGNORE_INDEX)
            for i, (row, n) in enumerate(zip(rows, plen)):
                labels[i, n:len(row)] = ids[i, n:len(row)]
            shift = labels[:, 1:]
            sel = shift != IGNORE_INDEX
            if parts is None:  # prompt-learning adapters: the model's own logits
                h = causal_logits(model, ids, mask)[:, :-1][sel].float()
                tok = -F.cross_entropy(h, shift[sel], reduction="none")
            else:
                dec, head = parts
                hidden = dec(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1][sel]
                tok = -token_nll(head, hidden, shift[sel])
            per = torch.zeros(len(rows), dtype=torch.float64, device=tok.device)
            per.index_add_(0, sel.nonzero()[:, 0], tok.double())
            vals = per.cpu().tolist()
            out_c.extend(vals[:len(ps)])
            out_r.extend(vals[len(ps):])
            if desc:
                bar.update(len(ps))
    return out_c, out_r


def pair_logps(model, tokenizer, pairs: list[dict], max_length: int, batch_size: int = 16, desc: str | None = None,
               check: Callable[[], None] | None = None):
    """log p(chosen + EOS | prompt) and log p(rejected + EOS | prompt) per pair (prompt cut from the left).
    ``desc``: progress bars under that name; ``check``: called between batches (a run's cancel check)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    special = n_special_tokens(tokenizer)
    prompts, chosen, rejected = [], [], []
    for p in pairs:
        c = tokenizer(p["chosen"], add_special_tokens=False)["input_ids"] + eos
        r = tokenizer(p["rejected"], add_special_tokens=False)["input_ids"] + eos
        text, _ = fit_prompt(tokenizer, p["prompt"], prompt_budget(max_length, max(len(c), len(r)), special))
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        room = max(max_length - len(ids), 1)
        prompts.append(ids)
        chosen.append(c[:room])
        rejected.append(r[:room])
    return paired_completion_logprobs(model, prompts, chosen, rejected, tokenizer.pad_token_id, batch_size,
                                      desc and f"{desc}: chosen and rejected", check)


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    budget = max(max_prompt_tokens - n_special_tokens(tokenizer), 1)
    return [tokenizer(fit_prompt(tokenizer, p, budget)[0], add_special_tokens=True)["input_ids"] for p in prompts]


def evaluate_policy(policy, start_model, tokenizer, prompts: list[str], reward_fn, *, samples: int,
                    max_new_tokens: int, max_length: int, batch_size: int, seed: int,
                    check: Callable[[], None] | None = None) -> dict:
    """The aligned policy against its starting model on held-out prompts, judged by ``reward_fn``.

    Both sample ``samples`` completions per prompt with the same seeds. Reports the mean reward of
    each, the win-rate of the policy (its i-th sample against the start's i-th sample on the same
    prompt; ties count half), and KL(policy || start) estimated as the mean over the policy's own
    samples of log p_policy(y|x) − log p_start(y|x) (nats per completion). ``check``: called between
    batches (a run's cancel check, which raises).
    """
    pids = encode_prompts(tokenizer, prompts, max_length - max_new_tokens)
    rows = []
    rewards: dict[str, list[float]] = {"start": [], "policy": []}
    kl_terms: list[float] = []
    for k in range(samples):
        texts = {}
        comp = {}
        for name, m in (("start", start_model), ("policy", policy)):
            comp[name] = sample(m, tokenizer, pids, max_new_tokens, batch_size, seed + k, check=check)
            texts[name] = [tokenizer.decode(c, skip_special_tokens=True) for c in comp[name]]
            rewards[name] += list(map(float, reward_fn(prompts=prompts, completions=texts[name])))
        lp_pol = completion_logprobs(policy, pids, comp["policy"], tokenizer.pad_token_id, batch_size, check=check)
        lp_ref = completion_logprobs(start_model, pids, comp["policy"], tokenizer.pad_token_id, batch_size,
                                     check=check)
        kl_terms += [a - b for a, b in zip(lp_pol, lp_ref)]
        base = len(rewards["start"]) - len(prompts)
        for i, p in enumerate(prompts):
            rows.append({"prompt": p[-300:], "sample": k, "start": texts["start"][i], "policy": texts["policy"][i],
                         "reward_start": rewards["start"][base + i], "reward_policy": rewards["policy"][base + i]})
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards["policy"], rewards["start"])]
    mean = (lambda xs: round(sum(xs) / len(xs), 4) if xs else None)
    return {"prompts": len(prompts), "samples_per_prompt": samples, "max_new_tokens": max_new_tokens,
            "reward_before": mean(rewards["start"]), "reward_after": mean(rewards["policy"]),
            "win_rate": mean(wins), "kl_to_reference": mean(kl_terms), "rows": rows}


def judge_policy(run_dir: Path, policy, start_model, tokenizer, prompts: list[str], judge, ev, *,
                 max_length: int, seed: int, check: Callable[[], None] | None = None) -> dict:
    """:func:`evaluate_policy` with a recipe's ``eval:`` section; the sampled generations go to the run's
    ``eval/generations.jsonl``."""
    res = evaluate_policy(policy, start_model, tokenizer, prompts, judge, samples=ev.samples,
                          max_new_tokens=ev.max_new_tokens, max_length=max_length, batch_size=ev.batch_size, seed=seed,
                          check=check)
    (run_dir / "eval").mkdir(exist_ok=True)
    write_rows(run_dir / "eval" / "generations.jsonl", res.pop("rows"))
    return res


def judge_prompts(held: list, n: int) -> list[str]:
    """Distinct held-out prompts, in order, at most ``n``."""
    seen, out = set(), []
    for x in held:
        p = x["prompt"] if isinstance(x, dict) else x
        if p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) >= n:
            break
    return out
