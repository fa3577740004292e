"""What the reward, DPO and RLHF recipes share: preference pairs and prompts, the starting policy,
reward scoring, policy evaluation against a reward, and the run bookkeeping.

Everything here is plain text in, text out: a prompt string and a response string. Chat
records are rendered with the model's chat template first, so one scoring function serves
reward training, its evaluation, the RL reward and the before/after report alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.workspace import Workspace, write_json

# ----------------------------------------------------------------------------- data


def _text(x, tokenizer, generation_prompt: bool) -> str:
    """A canonical field (string, or list of chat messages) as text."""
    if isinstance(x, str):
        return x
    from tunelab.train.numerics import render

    if generation_prompt:
        return render(tokenizer, x, add_generation_prompt=True)
    return "".join(m["content"] for m in x if m.get("role") == "assistant") or "".join(m["content"] for m in x)


def load_pairs(path: str, tokenizer, rejects: list[dict], limit: int | None = None) -> list[dict]:
    """Preference records → ``{"prompt", "chosen", "rejected"}`` strings; unusable records go to ``rejects``.

    Accepts prompt/chosen/rejected (strings or chat messages) and hh-rlhf whole transcripts,
    which ``data.records`` splits at the last "\\n\\nAssistant:".
    """
    from tunelab.data.formats import BadRecord
    from tunelab.data.readers import read
    from tunelab.data.records import kind, to_canonical

    pairs = []
    for _, line, rec in read(path):
        if limit is not None and len(pairs) >= limit:
            break
        try:
            if isinstance(rec, BadRecord):
                raise rec
            c = to_canonical(rec)
            if kind(c) != "preference":
                raise BadRecord(f"not a preference pair (a {kind(c)} record); need prompt, chosen, rejected")
            pair = {"prompt": _text(c["prompt"], tokenizer, True), "chosen": _text(c["chosen"], tokenizer, False),
                    "rejected": _text(c["rejected"], tokenizer, False)}
            if pair["chosen"] == pair["rejected"]:
                raise BadRecord("chosen and rejected are the same response")
            pairs.append(pair)
        except BadRecord as e:
            rejects.append({"file": str(path), "line": line, "reason": str(e)})
    return pairs


def load_prompts(path: str, tokenizer, rejects: list[dict], limit: int | None = None) -> list[str]:
    """Prompts for RL: from preference pairs, chat/instruction records (the context before the last
    assistant turn), or records with just a ``prompt`` field."""
    from tunelab.data.formats import BadRecord
    from tunelab.data.readers import read
    from tunelab.data.records import kind, to_canonical

    prompts = []
    for _, line, rec in read(path):
        if limit is not None and len(prompts) >= limit:
            break
        try:
            if isinstance(rec, BadRecord):
                raise rec
            if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and not (
                    {"chosen", "completion"} & set(rec)):
                p = rec["prompt"]
            else:
                c = to_canonical(rec)
                k = kind(c)
                if k == "preference":
                    p = _text(c["prompt"], tokenizer, True)
                elif k == "chat":
                    msgs = c["messages"]
                    ctx = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
                    p = _text(ctx, tokenizer, True)
                else:
                    raise BadRecord(f"no prompt in a {k} record")
            if not p.strip():
                raise BadRecord("empty prompt")
            prompts.append(p)
        except BadRecord as e:
            rejects.append({"file": str(path), "line": line, "reason": str(e)})
    return prompts


def split_sets(items: list, data, seed: int, load) -> tuple[list, list, list, str]:
    """(train, validation, held-out, name of the held-out set). Validation comes from ``data.validation``
    or a content-hash split; the held-out report set is ``data.test`` when given, else the validation set."""
    from tunelab.data.loaders import split_validation

    if data.validation:
        train, val = items, load(data.validation)
    elif data.validation_split > 0:
        train, val = split_validation(items, data.validation_split, seed)
    else:
        train, val = items, []
    if data.test:
        held, name = load(data.test), "test"
    else:
        held, name = val, "validation"
    if data.test_limit:
        held = held[: data.test_limit]
    return train, val, held, name


def fit_pairs(tokenizer, pairs: list[dict], max_length: int) -> tuple[list[dict], int]:
    """Cut each prompt from the left so prompt + the longer response fits ``max_length`` tokens
    (trainers that cut from the right would otherwise drop the responses of long prompts)."""
    from tunelab.train.numerics import fit_prompt, n_special_tokens, prompt_budget

    special = n_special_tokens(tokenizer) + 1  # + the EOS the trainer appends
    out, cut = [], 0
    for p in pairs:
        n = max(len(tokenizer(p[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        text, was_cut = fit_prompt(tokenizer, p["prompt"], prompt_budget(max_length, n, special))
        cut += int(was_cut)
        out.append({**p, "prompt": text})
    return out, cut


# ----------------------------------------------------------------------------- models


@dataclass
class Start:
    """A starting point: a model folder, optionally with an adapter, and the run it came from."""

    ref: str
    base_path: Path
    adapter: Path | None = None
    run_id: str | None = None


def find_run(ref: str, ws: Workspace) -> Path | None:
    """A run folder, a run id, or a unique prefix of one (``reward-hh`` for ``reward-hh-20261126-...``);
    None when ``ref`` names no run."""
    p = Path(ref)
    if p.is_dir() and (p / "config.yaml").exists():
        return p.resolve()
    if not ref or "/" in ref or "\\" in ref or p.exists() or not ws.runs_dir.is_dir():
        return None
    if (ws.runs_dir / ref).is_dir():
        return ws.runs_dir / ref
    matches = sorted(d for d in ws.runs_dir.glob(f"{ref}-*") if (d / "config.yaml").exists())
    if len(matches) > 1:
        raise TunelabError(f"'{ref}' matches {len(matches)} runs ({matches[0].name}, ...); give more of the id")
    return matches[0] if matches else None


def resolve_start(ref: str, ws: Workspace) -> Start:
    """A run (id, unique id prefix or folder) → its adapter/ or model/; anything else → ``models.resolve``."""
    from tunelab.models import resolve

    run_dir = find_run(ref, ws)
    if run_dir is None:
        return Start(ref, resolve(ref, ws))
    adapter, full = run_dir / "adapter", run_dir / "model"
    if full.is_dir():
        return Start(ref, full, None, run_dir.name)
    if adapter.is_dir():
        lineage = json.loads((run_dir / "lineage.json").read_text(encoding="utf-8"))
        base = lineage.get("base_model_path") or str(resolve(lineage["base_model"], ws))
        return Start(ref, Path(base), adapter, run_dir.name)
    raise TunelabError(f"run {run_dir.name} has no trained weights (no adapter/ or model/); finish it with "
                       f"'tunelab train --resume {run_dir.name}'")


def eval_device() -> str:
    import torch

    from tunelab.train.distributed import local_device

    return local_device("cuda") if torch.cuda.is_available() else "cpu"


def load_causal(start: Start, trainable_adapter: bool = False, device: str | None = None):
    """The starting policy as a causal LM (float32), with its adapter when it has one."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(start.base_path, dtype=torch.float32)
    if start.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start.adapter, is_trainable=trainable_adapter)
    return model.to(device) if device else model


def load_tokenizer(start: Start):
    from transformers import AutoTokenizer

    from tunelab.train.numerics import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(start.adapter or start.base_path)
    added = ensure_chat_template(tok)
    return tok, added


def adapter_config(method: str, lora, task_type: str):
    """The peft config of a LoRA-family method (lora | dora | rslora), via tunelab/train/peft.py."""
    from tunelab.train.peft import PeftSection, peft_config

    return peft_config(PeftSection(method=method, lora=lora), task_type)


# ----------------------------------------------------------------------------- reward scoring


def score_ids(model, seqs: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """Scalar scores of a sequence-classification model (num_labels=1), right-padded batches."""
    import torch

    out: list[float] = []
    model.eval()
    with torch.no_grad():
        for b in range(0, len(seqs), batch_size):
            chunk = seqs[b: b + batch_size]
            n = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            dev = next(model.parameters()).device
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            out.extend(logits[:, 0].float().cpu().tolist())
    return out


def pairwise_eval(model, tokenizer, pairs: list[dict], max_length: int, batch_size: int = 16) -> dict:
    """Bradley–Terry view of a reward model on pairs: accuracy (chosen scored above rejected) and mean margin."""
    from tunelab.train.numerics import encode_prompt_response

    if not pairs:
        return {"pairs": 0, "accuracy": None, "mean_margin": None}
    chosen = [encode_prompt_response(tokenizer, p["prompt"], p["chosen"], max_length)[0] for p in pairs]
    rejected = [encode_prompt_response(tokenizer, p["prompt"], p["rejected"], max_length)[0] for p in pairs]
    rc = score_ids(model, chosen, tokenizer.pad_token_id, batch_size)
    rr = score_ids(model, rejected, tokenizer.pad_token_id, batch_size)
    margins = [c - r for c, r in zip(rc, rr)]
    # a tie is half right: a constant reward model scores 0.5, not 0
    acc = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    return {"pairs": len(pairs), "accuracy": round(acc, 4), "mean_margin": round(sum(margins) / len(margins), 4),
            "mean_reward_chosen": round(sum(rc) / len(rc), 4), "mean_reward_rejected": round(sum(rr) / len(rr), 4)}


class RewardScorer:
    """A trained reward model as a reward function: ``scorer(prompts, completions) -> [float]``.

    The same tokenization as reward training (prompt and response tokenized separately, prompt cut
    from the left), so RL optimizes exactly the score that was evaluated.
    """

    __name__ = "reward_model"

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 16, name: str = "reward_model"):
        self.model, self.tokenizer, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size
        self.__name__ = name

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        from tunelab.train.numerics import encode_prompt_response

        seqs = [encode_prompt_response(self.tokenizer, _as_str(p), _as_str(c), self.max_length)[0]
                for p, c in zip(prompts, completions)]
        return score_ids(self.model, seqs, self.tokenizer.pad_token_id, self.batch_size)


def _as_str(x) -> str:
    if isinstance(x, str):
        return x
    return "".join(m.get("content", "") for m in x)  # conversational completions from a trainer


def load_reward_model(ref: str, ws: Workspace):
    """A reward run (id or folder) or a sequence-classification model folder → (RewardScorer, info)."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.train.numerics import ensure_chat_template

    transformers.logging.set_verbosity_error()
    p = Path(ref)
    run_dir = find_run(ref, ws)
    info: dict = {"reward_model": ref}
    if run_dir is not None:
        import yaml

        rcfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        if rcfg.get("recipe") != "reward":
            raise TunelabError(f"reward_model: run {run_dir.name} is a '{rcfg.get('recipe')}' run, not a reward "
                               "model; train one with 'recipe: reward'")
        max_length = int(rcfg.get("data", {}).get("max_length", 512))
        adapter, full = run_dir / "adapter", run_dir / "model"
        if full.is_dir():
            model = AutoModelForSequenceClassification.from_pretrained(full, num_labels=1, dtype=torch.float32)
            tok_dir = full
        elif adapter.is_dir():
            from peft import PeftModel

            lineage = json.loads((run_dir / "lineage.json").read_text(encoding="utf-8"))
            base = AutoModelForSequenceClassification.from_pretrained(lineage["base_model_path"], num_labels=1,
                                                                      dtype=torch.float32)
            model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            tok_dir = adapter
        else:
            raise TunelabError(f"reward run {run_dir.name} has no trained weights yet")
        info.update({"reward_run_id": run_dir.name, "reward_model_path": str(tok_dir)})
    else:
        folder = p if p.is_dir() else None
        if folder is None:
            raise TunelabError(f"reward_model: '{ref}' is neither a run id in {ws.root} nor a model folder")
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        tok_dir, max_length = folder, 512
        info["reward_model_path"] = str(folder.resolve())
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ensure_chat_template(tok)
    model.config.pad_token_id = tok.pad_token_id
    model.to(eval_device()).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return RewardScorer(model, tok, max_length), info


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


def _left_pad(seqs: list[list[int]], pad: int):
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s)
        mask[i, n - len(s):] = 1
    return ids, mask


def sample(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
           seed: int, temperature: float = 1.0) -> list[list[int]]:
    """One sampled completion per prompt (pure sampling at ``temperature``: no top-k/top-p, so the
    log-ratio below is an unbiased KL estimate). Completions end at and include EOS when produced."""
    import torch

    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    model.eval()
    torch.manual_seed(seed)
    for b in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[b: b + batch_size]
        ids, mask = _left_pad(chunk, tokenizer.pad_token_id)
        dev = next(model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos)
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def completion_logprobs(model, prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int,
                        batch_size: int = 16) -> list[float]:
    """Sum of log p(completion | prompt) under ``model``, one number per pair."""
    import torch

    out: list[float] = []
    model.eval()
    with torch.no_grad():
        for b in range(0, len(prompt_ids), batch_size):
            ps, cs = prompt_ids[b: b + batch_size], completions[b: b + batch_size]
            seqs = [p + c for p, c in zip(ps, cs)]
            n = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), n), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            dev = next(model.parameters()).device
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            logp = torch.log_softmax(logits.float(), -1).cpu()
            for i, (p, c) in enumerate(zip(ps, cs)):
                if not c:
                    out.append(0.0)
                    continue
                pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
                out.append(float(logp[i, pos, torch.tensor(c)].sum()))
    return out


def pair_logps(model, tokenizer, pairs: list[dict], max_length: int, batch_size: int = 16):
    """log p(chosen + EOS | prompt) and log p(rejected + EOS | prompt) per pair (prompt cut from the left)."""
    from tunelab.train.numerics import fit_prompt, n_special_tokens, prompt_budget

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
    pad = tokenizer.pad_token_id
    return (completion_logprobs(model, prompts, chosen, pad, batch_size),
            completion_logprobs(model, prompts, rejected, pad, batch_size))


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    from tunelab.train.numerics import fit_prompt, n_special_tokens

    budget = max(max_prompt_tokens - n_special_tokens(tokenizer), 1)
    return [tokenizer(fit_prompt(tokenizer, p, budget)[0], add_special_tokens=True)["input_ids"] for p in prompts]


def evaluate_policy(policy, start_model, tokenizer, prompts: list[str], reward_fn, *, samples: int,
                    max_new_tokens: int, max_length: int, batch_size: int, seed: int) -> dict:
    """The aligned policy against its starting model on held-out prompts, judged by ``reward_fn``.

    Both sample ``samples`` completions per prompt with the same seeds. Reports the mean reward of
    each, the win-rate of the policy (its i-th sample against the start's i-th sample on the same
    prompt; ties count half), and KL(policy || start) estimated as the mean over the policy's own
    samples of log p_policy(y|x) − log p_start(y|x) (nats per completion).
    """
    pids = encode_prompts(tokenizer, prompts, max_length - max_new_tokens)
    rows = []
    rewards: dict[str, list[float]] = {"start": [], "policy": []}
    kl_terms: list[float] = []
    for k in range(samples):
        texts = {}
        comp = {}
        for name, m in (("start", start_model), ("policy", policy)):
            comp[name] = sample(m, tokenizer, pids, max_new_tokens, batch_size, seed + k)
            texts[name] = [tokenizer.decode(c, skip_special_tokens=True) for c in comp[name]]
            rewards[name] += list(map(float, reward_fn(prompts=prompts, completions=texts[name])))
        lp_pol = completion_logprobs(policy, pids, comp["policy"], tokenizer.pad_token_id, batch_size)
        lp_ref = completion_logprobs(start_model, pids, comp["policy"], tokenizer.pad_token_id, batch_size)
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


# ----------------------------------------------------------------------------- run bookkeeping


def absolute_data(cfg):
    """The config with absolute data paths, so evaluation and --resume work from any directory."""
    d = cfg.data
    return cfg.model_copy(update={"data": d.model_copy(update={
        k: str(Path(getattr(d, k)).resolve()) for k in ("train", "validation", "test") if getattr(d, k)})})


def trainer_args(t, dplan, out_dir: Path, has_val: bool, total_steps: int, *, metric: str = "eval_loss",
                 greater_is_better: bool = False) -> dict:
    """TrainingArguments fields shared by tunelab's TRL-engined recipes (TRL's own defaults — bf16 on,
    gradient checkpointing on — are replaced by the per-device plan)."""
    return dict(
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
        gradient_checkpointing=dplan.gradient_checkpointing,
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
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_only_model=False,
    )


def save_output(model, tokenizer, run_dir: Path, lora: bool) -> Path:
    """Write the trained adapter (only the trained one, not a frozen reference copy) or model, atomically."""
    out_dir = run_dir / ("adapter" if lora else "model")
    tmp = run_dir / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora and hasattr(model, "peft_config"):
        model.save_pretrained(tmp, selected_adapters=["default"])
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def train_rows(log_history: list[dict]) -> list[dict]:
    return [r for r in log_history if "loss" in r and not any(k.startswith("eval_") for k in r)]


def write_rejects(run_dir: Path, rejects: list[dict]) -> None:
    write_rows(run_dir / "rejects.jsonl", rejects)


def start_record(run_dir: Path, lineage: dict) -> None:
    from tunelab.environment import capture

    write_json(run_dir / "lineage.json", lineage)
    write_json(run_dir / "environment.json", capture())


def policy_for_training(start: Start, method: str, lora):
    """(model, peft_config) for a TRL trainer. A fresh adapter on a model folder: the reference is the
    folder's model (adapter disabled). Starting from a run with an adapter: that adapter keeps training
    (whatever its method) and TRL keeps a frozen copy as the reference. Full: the reference is the folder's
    model too (a second copy)."""
    model = load_causal(start, trainable_adapter=True)
    if start.adapter is not None:
        if method == "full":
            raise TunelabError(f"model.name: run {start.run_id} holds an adapter; use an adapter method (the run's "
                               "adapter keeps training) or start from a merged model folder (tunelab export --merge)")
        return model, None
    return model, (adapter_config(method, lora, "CAUSAL_LM") if method != "full" else None)


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


def load_trained(start: Start, out_dir: Path, lora: bool):
    """The saved policy, reloaded in float32 from disk: evaluation sees exactly the artifact (and not
    the trainer's model, whose forward accelerate wraps in mixed-precision autocast)."""
    return load_causal(Start(start.ref, start.base_path, out_dir) if lora else Start(start.ref, out_dir),
                       device=eval_device())
