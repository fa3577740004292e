"""Batched decoding of token-id prompts: the one generation loop behind training reports
(distillation's teacher answers and held-out comparison) and evaluation (``tunelab eval``,
suites) alike, so a "greedy answer" means the same thing wherever it is scored."""

from __future__ import annotations

import time


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             desc: str = "generate", sampling=None) -> tuple[list[str], list[dict]]:
    """Greedy decoding (or ``sampling.do_sample`` with its temperature/top_p/seed), left-padded batches.
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
