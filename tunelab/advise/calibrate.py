"""``tunelab estimate --device cpu --calibrate``: time a few training steps here, so the time estimate
rests on this machine's measured training rate instead of a default from another machine.

The steps train a randomly initialised Llama of the estimated model's layer shape (hidden size,
MLP width, heads; nothing is downloaded) with the estimate's method (LoRA through peft, or full;
QLoRA is timed as LoRA, since its 4-bit kernels are not what a CPU trains with) and the precision
training would pick here (``train.device.cpu_precision``), AdamW, one warm-up step and then up to 3 timed
ones. A large model is cut to fit a calibration budget (fewer decoder layers, at most 32k vocabulary):
what is measured is a rate, FLOP/s counted the estimator's way (4·N per token for PEFT, 6·N for full,
N of the model that ran), which the estimate then applies to the full model's FLOPs.

It is a plain PyTorch loop, not the SFT recipe: the recipe's response-only loss and its CPU speed-ups
under bf16 are not in it, so on a machine where those apply the recipe runs somewhat faster.
"""

from __future__ import annotations

import time

from tunelab.advise.estimate import EstimateConfig, Shape, param_counts, resolve_precision
from tunelab.errors import TunelabError

# Calibration stays small: at most this many parameters (the layers are cut, never the widths) and this
# many tokens a step, so it answers in seconds for a 135M model on 2 cores.
MAX_PARAMS = 200e6
MAX_VOCAB = 32768
MAX_TOKENS = 512


def calibration_shape(s: Shape) -> Shape:
    """The model itself when it fits MAX_PARAMS; else its widths, at most MAX_VOCAB and as many decoder layers as fit
    (at least one)."""
    if param_counts(s)["total"] <= MAX_PARAMS:
        return s
    vocab = min(s.vocab, MAX_VOCAB)
    one = Shape(vocab, s.hidden, s.intermediate, 1, s.heads, s.kv_heads, s.tied, s.head_dim)
    pc = param_counts(one)
    fixed = pc["total"] - pc["per_layer_linear"] - 2 * s.hidden
    per_layer = pc["per_layer_linear"] + 2 * s.hidden
    layers = max(1, min(s.layers, int((MAX_PARAMS - fixed) // per_layer)))
    return Shape(vocab, s.hidden, s.intermediate, layers, s.heads, s.kv_heads, s.tied, s.head_dim)


def calibrate_cpu(cfg: EstimateConfig, shape: Shape, steps: int = 3, budget_s: float = 30.0, seed: int = 0) -> dict:
    """Tokens/s and achieved training FLOP/s of up to ``steps`` timed optimizer steps on this CPU.

    Timing stops early once ``budget_s`` seconds of timed steps have passed (at least one step is timed), so a
    busy or slow machine answers in bounded time; ``steps`` in the result says how many were timed.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    precision, why = resolve_precision(cfg.model_copy(update={"device": "cpu"}))
    s = calibration_shape(shape)
    if param_counts(s)["total"] > 3 * MAX_PARAMS:
        raise TunelabError(f"{cfg.model} is too large to calibrate here: even one decoder layer makes a "
                           f"{param_counts(s)['total'] / 1e9:.2g}B-parameter model; calibrate a smaller model of the "
                           f"family and scale its tokens/s by the parameter ratio, or drop --calibrate")
    seq = min(cfg.seq_len, MAX_TOKENS)
    batch = max(1, min(cfg.batch_size, MAX_TOKENS // seq))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.hd, tie_word_embeddings=s.tied,
        max_position_embeddings=max(seq, 128)))
    model.config.use_cache = False
    timed_method = "full" if cfg.method == "full" else "lora"
    if timed_method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=cfg.lora_dropout,
                                                 target_modules=cfg.lora_targets, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, s.vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: first-call allocations and kernel selection
    t = time.perf_counter()
    done = 0
    while done < steps and (done == 0 or time.perf_counter() - t < budget_s):
        step()
        done += 1
    seconds = time.perf_counter() - t
    tokens = done * batch * seq
    n = param_counts(s)["total"]
    per_token = 6 if timed_method == "full" else 4
    return {"tokens_per_s": tokens / seconds, "achieved_flops": per_token * n * tokens / seconds,
            "seconds": seconds, "steps": done, "batch": batch, "seq_len": seq, "layers": s.layers,
            "of_layers": shape.layers, "vocab": s.vocab, "params": n, "method": timed_method,
            "precision": precision, "precision_why": why, "threads": torch.get_num_threads()}
