"""Batched decoding of token-id prompts: the one generation path behind training reports
(distillation's teacher answers and held-out comparison) and evaluation (``tunelab eval``,
suites) alike, so a "greedy answer" means the same thing wherever it is scored.

``generate`` decodes through the continuous-batching engine that ``tunelab serve`` uses
(tunelab/models/engine.py), in the calling thread: at most ``batch_size`` answers decode together,
each prompt is prefilled once with no padding, a finished answer leaves the batch at once and the
next prompt takes its place, and only the last position's logits are computed. A padded
``model.generate`` batch instead runs until its longest answer ends, every row paying for the
longest prompt's padding and for the rows that already stopped. Greedy answers are the same token
for token (tests/unit/test_generation_engine.py); bench/eval_speed.py measures the speed-up.
"""

from __future__ import annotations

import logging
import time

from tunelab._console import progress
from tunelab.errors import TunelabError
from tunelab.models.engine import Engine, GenRequest

log = logging.getLogger("tunelab.generation")


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             desc: str = "generate", sampling=None, prefill_batch: int | None = None) -> tuple[list[str], list[dict]]:
    """Greedy decoding (or ``sampling.do_sample`` with its temperature/top_p/seed: request ``i`` samples
    from its own generator seeded ``seed + i``, so a sample does not depend on the batch it lands in).
    Returns texts and per-example stats (``new_tokens``; ``latency_s`` from the start of the call to the
    answer's end). The progress bar advances as each answer ends."""
    if not prompts:
        return [], []
    if _prompt_learning(model):  # virtual tokens before every prompt: peft's own generate places them
        return generate_padded(model, tokenizer, prompts, max_new_tokens, batch_size, desc, sampling)
    eos = tokenizer.eos_token_id
    # Prompts that are admitted together are prefilled in one left-padded forward (``prefill_batch``, default the
    # whole batch), and they go in shortest first so that those admitted together are of similar lengths: one
    # forward over many prompts uses the CPU's matrix units far better than one per prompt (at batch 20 on
    # SmolLM2, prefilling one prompt at a time took half the decoding time), while the padding stays small.
    engine = Engine(model, set() if eos is None else {eos}, max_batch_size=batch_size, max_queue=len(prompts),
                    prefill_batch=prefill_batch or batch_size)
    do_sample = sampling is not None and sampling.do_sample
    errors: dict[int, str] = {}
    model.eval()
    t0 = time.perf_counter()
    with progress(len(prompts), desc) as bar:
        def on_event(i):
            def _event(kind, payload):
                if kind == "error":
                    errors[i] = payload
                if kind in ("done", "error"):
                    bar.update(1)
            return _event

        reqs = [GenRequest(prompt_ids=list(p), tokenizer=tokenizer, on_event=on_event(i), adapter=None,
                           max_tokens=max_new_tokens,
                           temperature=sampling.temperature if do_sample else 0.0,
                           top_p=sampling.top_p if do_sample else 1.0,
                           seed=sampling.seed + i if do_sample else None)
                for i, p in enumerate(prompts)]
        engine.run(sorted(reqs, key=lambda r: len(r.prompt_ids)))
    if errors:
        first = errors[min(errors)]
        if len(errors) == len(prompts) and "DynamicCache" in first:  # a cache the engine cannot batch
            log.warning("%s: %s; decoding with padded batches instead", desc, first)
            return generate_padded(model, tokenizer, prompts, max_new_tokens, batch_size, desc, sampling)
        raise TunelabError(f"{desc}: {len(errors)} of {len(prompts)} answers failed; the first: {first}")
    texts = [r.text.strip() for r in reqs]
    stats = [{"new_tokens": len(r.out_ids), "latency_s": round(r.finished - t0, 4)} for r in reqs]
    return texts, stats


def _prompt_learning(model) -> bool:
    """A peft prompt-learning model (prompt, prefix or p-tuning): it adds virtual tokens (or past key values) to
    every forward, which the engine's own KV cache does not know about."""
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def generate_padded(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                    desc: str = "generate", sampling=None) -> tuple[list[str], list[dict]]:
    """The previous loop, kept as the reference the engine is tested and benchmarked against
    (tests/unit/test_generation_engine.py, bench/eval_speed.py): transformers' ``generate`` on left-padded
    batches of prompts sorted by length; a batch runs until its longest answer ends.
    Greedy decoding (or ``sampling.do_sample`` with its temperature/top_p/seed).
    Returns texts and per-example timing/token counts."""
    import torch
    from tqdm.auto import tqdm

    mode = {"do_sample": False, "num_beams": 1}
    if sampling is not None and sampling.do_sample:
        mode = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        torch.manual_seed(sampling.seed)

    pad = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    out_text: dict[int, str] = {}
    out_stat: dict[int, dict] = {}
    model.eval()
    with tqdm(total=len(prompts), desc=desc, unit="ex", dynamic_ncols=True) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            n = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), n), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), n), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, n - len(p):] = torch.tensor(p)
                mask[row, n - len(p):] = 1
            t0 = time.perf_counter()
            with torch.no_grad():
                dev = next(model.parameters()).device
                gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                     **mode, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id)
            dt = time.perf_counter() - t0
            for row, i in enumerate(idx):
                new = gen[row, n:].tolist()
                if tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id)]
                out_text[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
                out_stat[i] = {"new_tokens": len(new), "batch_time_s": round(dt, 4)}
            bar.update(len(idx))
    texts = [out_text[i] for i in range(len(prompts))]
    stats = [out_stat[i] for i in range(len(prompts))]
    return texts, stats
