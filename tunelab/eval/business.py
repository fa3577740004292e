"""Business metrics for every report: speed, memory, size, training compute, cost and an ROI estimate.

- Latency: one request at a time (batch 1, greedy), timed with a transformers streamer: the first
  generated token (time to first token) and the whole answer; p50/p95 over the requests.
- Throughput: generated tokens per second of those requests.
- Peak memory: the accelerator's peak allocation (``torch.cuda.max_memory_allocated``) on a GPU;
  on a CPU the process's peak resident set size, which includes Python and every library, so it is
  an upper bound of what the model needs. The peak is reset before each model (``reset_peak_memory``:
  ``torch.cuda.reset_peak_memory_stats``; on Linux ``/proc/self/clear_refs`` and VmHWM), so a model
  measured after another in one process does not inherit its peak; where no reset is possible the
  whole process's peak (``resource.getrusage``) is reported and the report says so.
- Size: parameters × bytes per parameter of the loaded model, and the adapter's files on disk.
- Training compute: device-hours from the run's ``summary.json`` (train_runtime_s × devices) and
  FLOPs ≈ 6 · N · D (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §2.1), with N
  the model's parameters and D the tokens trained on. For an adapter run the backward pass skips the
  frozen weights' gradients, so 6·N·D over-states it by up to a third: the figure is an upper bound.
- Cost: device-hours × price per hour; serving cost per 1k generated tokens = price per hour /
  (3600 × tokens/s) × 1000, at the measured single-request speed (batching would lower it).
- ROI: only answers that are good enough save staff time, so the benefit is monthly volume × months ×
  the measured share of acceptable answers × minutes saved per task / 60 × hourly rate, against
  training cost + serving cost of that volume. The share is human A/B acceptance where it is given
  (``business.acceptance``), else the share of held-out answers whose ``quality_metric`` (per example,
  default ROUGE-L) reaches ``quality_threshold``. A model that fails the task earns no benefit, and
  where no per-answer quality was measured no benefit is credited at all (ROI "—"). Every
  assumption is printed next to the figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field, field_validator

from tunelab._console import progress
from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.models.engine import Engine, GenRequest
from tunelab.models.generation import _prompt_learning
from tunelab.scoring.metrics import mark_verdict
from tunelab.scoring.stats import holm, mean_statistic, paired_bootstrap


class BusinessSection(Strict):
    """The assumptions behind cost and ROI; every one is printed in the report."""

    price_per_hour: float = Field(1.0, ge=0, description="price of one device-hour (training and serving)")
    currency: str = "USD"
    latency_requests: int = Field(8, ge=1, description="single requests timed for latency")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per timed request")
    tasks_per_month: float = Field(10_000, ge=0, description="requests the model would handle per month")
    minutes_saved_per_task: float = Field(2.0, ge=0, description="staff minutes each answered request saves")
    hourly_rate: float = Field(30.0, ge=0, description="cost of one staff hour")
    months: float = Field(12, gt=0, description="horizon of the ROI estimate")
    tokens_per_task: float | None = Field(None, ge=0, description="generated tokens per request "
                                                                  "(default: the measured mean)")
    quality_metric: str = Field("rougeL", description="per-answer score that decides whether an answer is "
                                                      "acceptable (a mean metric of the task: rougeL, accuracy, ...)")
    quality_threshold: float = Field(0.5, description="an answer is acceptable when its quality_metric is at "
                                                      "least this")
    acceptance: dict[str, float] = Field(default_factory=dict, description="measured human acceptance per model "
                                         "name (share 0-1 of answers people accepted, e.g. from a human A/B "
                                         "evaluation); replaces the quality_metric share for that model")

    @field_validator("acceptance")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not 0 <= x <= 1}
        if bad:
            raise ValueError(f"acceptance shares lie between 0 and 1; got {bad}")
        return v


def quality_share(name: str, per_example: list[float] | None, cfg: BusinessSection) -> dict | None:
    """The share of answers good enough to save staff time: human acceptance for ``name`` when given,
    else the share of ``per_example`` quality scores at or above the threshold; None when neither exists."""
    if name in cfg.acceptance:
        return {"share": float(cfg.acceptance[name]), "what": f"human acceptance of {name} (business.acceptance)"}
    if not per_example:
        return None
    met = sum(1 for v in per_example if v is not None and v >= cfg.quality_threshold)
    return {"share": met / len(per_example), "met": met, "n": len(per_example),
            "what": f"held-out answers with {cfg.quality_metric} ≥ {cfg.quality_threshold:g}"}


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def measure_latency(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                    desc: str = "latency timing") -> dict:
    """Time to first token and total latency of single greedy requests, and their tokens/s (one request at a
    time, as a user waits for one answer: not the batched evaluation path). Each request goes through the
    decoding engine that `tunelab serve` answers with (tunelab/models/engine.py), alone in its batch, so the
    figure is what one client of the server would wait on this machine; peft prompt-learning models, which the
    engine does not decode, are timed with transformers' ``generate``."""
    if _prompt_learning(model):
        return _measure_latency_generate(model, tokenizer, prompts, max_new_tokens, desc)
    dev = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    engine = Engine(model, set() if eos is None else {eos}, max_batch_size=1, max_queue=1)
    ttft, total, tokens = [], [], []
    model.eval()
    for p in progress(prompts, f"{desc} ({len(prompts)} single requests)", unit="req"):
        errors: list[str] = []
        req = GenRequest(prompt_ids=list(p), tokenizer=tokenizer, adapter=None, max_tokens=max_new_tokens,
                         on_event=lambda kind, payload: errors.append(payload) if kind == "error" else None)
        _sync(dev)
        t0 = time.perf_counter()
        engine.run([req])
        _sync(dev)
        t1 = time.perf_counter()
        if errors:
            raise TunelabError(f"{desc}: a single request failed: {errors[0]}")
        total.append(t1 - t0)
        ttft.append((req.first_token or t1) - t0)
        tokens.append(len(req.out_ids))
    return _latency_summary(prompts, max_new_tokens, ttft, total, tokens)


def _sync(dev) -> None:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize()


def _latency_summary(prompts, max_new_tokens: int, ttft: list[float], total: list[float], tokens: list[int]) -> dict:
    secs = sum(total)
    return {"requests": len(prompts), "max_new_tokens": max_new_tokens,
            "first_token_s": {"p50": percentile(ttft, 50), "p95": percentile(ttft, 95)},
            "total_s": {"p50": percentile(total, 50), "p95": percentile(total, 95)},
            "tokens_per_s": sum(tokens) / secs if secs > 0 else None,
            "mean_generated_tokens": sum(tokens) / len(tokens) if tokens else None,
            "samples_total_s": [round(x, 5) for x in total], "samples_first_token_s": [round(x, 5) for x in ttft]}


def _measure_latency_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, desc: str) -> dict:
    """``measure_latency`` through transformers' ``generate`` (prompt-learning models)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class _Clock(BaseStreamer):
        """Records when the first generated token arrives (generate() first puts the prompt)."""

        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:
                self.first = time.perf_counter()

        def end(self):
            pass

    dev = next(model.parameters()).device
    ttft, total, tokens = [], [], []
    model.eval()
    for p in progress(prompts, f"{desc} ({len(prompts)} single requests)", unit="req"):
        ids = torch.tensor([p], device=dev)
        clock = _Clock()
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, streamer=clock)
        _sync(dev)
        t1 = time.perf_counter()
        total.append(t1 - t0)
        ttft.append((clock.first or t1) - t0)
        new = out[0, ids.shape[1]:].tolist()
        tokens.append(len(new) - (1 if new and new[-1] == tokenizer.eos_token_id else 0))  # as the engine: EOS not counted
    return _latency_summary(prompts, max_new_tokens, ttft, total, tokens)


def reset_peak_memory() -> list[str]:
    """Start a fresh peak for the next measurement, so one model's figure does not carry an earlier
    model's peak in the same process: ``torch.cuda.reset_peak_memory_stats`` on a GPU, and on Linux
    writing 5 to ``/proc/self/clear_refs``, which resets the process's VmHWM (peak RSS) to its current
    RSS (proc(5)). Returns what was reset (``cuda``, ``rss``); an empty list where neither is possible."""
    import torch

    done = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        done.append("cuda")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        done.append("rss")
    except OSError:  # not Linux, or not permitted
        pass
    return done


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory(device, reset: list[str] | None = None, since: str = "the last reset") -> dict:
    """The peak since ``reset_peak_memory()`` (``reset``: what it returned), else the process's whole peak."""
    import torch

    reset = reset or []
    if getattr(device, "type", str(device)) == "cuda":
        what = f"GPU peak allocated since {since}" if "cuda" in reset else \
            "GPU peak allocated over the whole process (could not reset: includes earlier models)"
        return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "what": what, "reset": "cuda" in reset}
    hwm = _vm_hwm() if "rss" in reset else None
    if hwm is not None:
        return {"peak_bytes": hwm, "reset": True,
                "what": f"process peak RSS since {since} (CPU, VmHWM; includes Python and libraries)"}
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_bytes": int(kb * scale), "reset": False,
            "what": "process peak RSS over the whole process (CPU; includes Python, libraries and every model "
                    "measured before this one: the peak could not be reset here)"}


# where peft keeps an adapter's own weights (the names its state-dict helpers select by)
ADAPTER_PARAM_MARKS = (".lora_", ".ia3_", "prompt_encoder.", ".modules_to_save.")


def model_size(model, adapter_dir: Path | None, adapter_off: bool = False) -> dict:
    """Parameters and bytes of the loaded model; ``adapter_off``: a peft model measured with its adapter
    disabled (the base), so the adapter's own weights, loaded but unused, are not counted."""
    ps = [p for n, p in model.named_parameters()
          if not (adapter_off and any(mark in n for mark in ADAPTER_PARAM_MARKS))]
    params = sum(p.numel() for p in ps)
    nbytes = sum(p.numel() * p.element_size() for p in ps)
    out = {"parameters": int(params), "model_bytes": int(nbytes)}
    if adapter_dir is not None and Path(adapter_dir).is_dir():
        out["adapter_bytes"] = int(sum(f.stat().st_size for f in Path(adapter_dir).rglob("*")
                                       if f.is_file() and f.suffix in (".safetensors", ".bin")))
    return out


def training_compute(run_dir: Path | None, parameters: int | None) -> dict | None:
    """Device-hours and 6·N·D FLOPs from a run's summary.json; None when the model is not a run."""
    if run_dir is None or not (Path(run_dir) / "summary.json").is_file():
        return None
    s = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    runtime = s.get("train_runtime_s")
    dev = s.get("device") if isinstance(s.get("device"), dict) else {}
    n_dev = int(dev.get("world_size") or dev.get("num_devices") or 1)
    tokens = s.get("tokens_seen") or s.get("train_tokens")
    n = s.get("total_params") or parameters
    out = {"run_id": s.get("run_id"), "train_runtime_s": runtime, "devices": n_dev,
           "device": dev.get("device") or dev.get("kind"),
           "device_hours": (runtime * n_dev / 3600) if runtime is not None else None,
           "tokens_trained": tokens, "parameters": n,
           "flops_6nd": 6.0 * n * tokens if (n and tokens) else None,
           "flops_note": "6·N·D (Kaplan et al. 2020); an upper bound for adapter runs"}
    return out


def costs(latency: dict, compute: dict | None, cfg: BusinessSection, quality: dict | None = None) -> dict:
    """Training cost, serving cost per 1k tokens and the ROI estimate, with the assumptions used.
    ``quality``: ``quality_share``'s answer; without it no benefit is credited (benefit and ROI None)."""
    tps = latency.get("tokens_per_s")
    per_1k = cfg.price_per_hour / (3600 * tps) * 1000 if tps else None
    train_hours = compute.get("device_hours") if compute else None
    train_cost = train_hours * cfg.price_per_hour if train_hours is not None else 0.0
    tokens_per_task = cfg.tokens_per_task if cfg.tokens_per_task is not None else (
        latency.get("mean_generated_tokens") or 0.0)
    volume = cfg.tasks_per_month * cfg.months
    serving = volume * tokens_per_task / 1000 * per_1k if per_1k is not None else None
    share = quality["share"] if quality else None
    benefit = volume * share * cfg.minutes_saved_per_task / 60 * cfg.hourly_rate if share is not None else None
    spend = train_cost + (serving or 0.0)
    roi = (benefit - spend) / spend if spend > 0 and benefit is not None else None
    return {
        "currency": cfg.currency,
        "training_cost": train_cost,
        "serving_cost_per_1k_tokens": per_1k,
        "serving_cost": serving,
        "acceptable_share": share,
        "benefit": benefit,
        "net": benefit - spend if benefit is not None else None,
        "roi": roi,
        "assumptions": {
            "price_per_hour": cfg.price_per_hour, "tasks_per_month": cfg.tasks_per_month,
            "minutes_saved_per_task": cfg.minutes_saved_per_task, "hourly_rate": cfg.hourly_rate,
            "months": cfg.months, "tokens_per_task": tokens_per_task,
            "acceptable_answers": quality["what"] if quality else
            "not measured: no benefit credited (no per-answer quality score and no business.acceptance)",
            "serving_speed": "single requests at the measured tokens/s (no batching)",
            "training_cost": "device-hours of the run × price per hour" if compute else
            "no training run behind this model: 0",
            "formula": "ROI = (volume × acceptable share × minutes saved / 60 × hourly rate − training − serving) "
                       "/ (training + serving)",
        },
    }


def business_metrics(model, tokenizer, prompts: list[list[int]], cfg: BusinessSection, *,
                     adapter_dir: Path | None = None, run_dir: Path | None = None,
                     peak_reset: list[str] | None = None, quality: dict | None = None, name: str = "",
                     adapter_off: bool = False) -> dict:
    """Everything above for one loaded model; ``prompts`` are token ids (the first few are timed).

    ``peak_reset``: what ``reset_peak_memory()`` reset before the model was loaded (the peak then covers
    loading, evaluating and timing it); None resets here, so the peak covers the timed requests.
    ``quality``: the model's share of acceptable answers (``quality_share``), which the ROI's benefit needs.
    ``adapter_off``: a peft model timed with its adapter disabled (the base): its size leaves the adapter out."""
    dev = next(model.parameters()).device
    since = "this model was loaded"
    if peak_reset is None:
        peak_reset, since = reset_peak_memory(), "the latency measurement began"
    lat = measure_latency(model, tokenizer, prompts[: cfg.latency_requests], cfg.max_new_tokens,
                          desc=f"latency timing{' ' + name if name else ''}")
    size = model_size(model, adapter_dir, adapter_off)
    compute = training_compute(run_dir, size["parameters"])
    return {"latency": lat, "memory": peak_memory(dev, peak_reset, since), "size": size, "training": compute,
            "cost": costs(lat, compute, cfg, quality), "device": str(dev)}


def speed_differences(base: dict, tuned: dict, *, n_resamples: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """tuned − base of the per-request latencies (total and first token), timed on the same prompts: a paired
    bootstrap per figure, Holm-adjusted over the two, with the verdict (lower is better; tunelab/scoring/metrics.py)."""
    alpha = 1 - confidence
    out = {}
    for name, key in (("latency_total_s", "samples_total_s"), ("latency_first_token_s", "samples_first_token_s")):
        a, b = base["latency"].get(key) or [], tuned["latency"].get(key) or []
        if a and len(a) == len(b):
            out[name] = paired_bootstrap(mean_statistic(a), mean_statistic(b), n_resamples=n_resamples, seed=seed,
                                         confidence=confidence)
    names = list(out)
    for k, adj in zip(names, holm([out[k]["p_value"] for k in names], alpha)):
        out[k]["p_value_adjusted"] = adj
        out[k]["significant"] = adj is not None and adj < alpha
        mark_verdict(k, out[k], None if adj is None else out[k]["significant"])
    return out


def describe_speed(diffs: dict, a: str = "base", b: str = "tuned") -> list[str]:
    """``speed_differences`` as printable lines: 'slower'/'faster' only where the paired test says so."""
    words = {"better": "faster", "worse": "slower", "no significant difference": "no significant difference",
             "not tested": "not tested"}
    out = []
    for k, d in diffs.items():
        ci = "" if d.get("ci_low") is None else f" [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"
        pa = "—" if d.get("p_value_adjusted") is None else f"{d['p_value_adjusted']:.3g}"
        what = "total latency per request" if k == "latency_total_s" else "time to first token"
        out.append(f"{b} vs {a}, {what}: {d['difference']:+.4g} s{ci} (paired bootstrap over the same requests, "
                   f"Holm p={pa}): {words.get(d['verdict'], d['verdict'])}")
    return out


def describe(b: dict) -> list[str]:
    """The figures and their assumptions as printable lines."""
    lat, c = b["latency"], b["cost"]
    cur = c["currency"]

    def f(x, fmt="{:.4g}"):
        return "—" if x is None else fmt.format(x)

    lines = [
        f"latency (batch 1, {lat['requests']} requests, ≤{lat['max_new_tokens']} new tokens): first token p50 "
        f"{f(lat['first_token_s']['p50'])} s, p95 {f(lat['first_token_s']['p95'])} s; total p50 "
        f"{f(lat['total_s']['p50'])} s, p95 {f(lat['total_s']['p95'])} s; {f(lat['tokens_per_s'])} tokens/s",
        f"peak memory {b['memory']['peak_bytes'] / 2**20:,.0f} MiB ({b['memory']['what']}); model "
        f"{b['size']['model_bytes'] / 2**20:,.1f} MiB ({b['size']['parameters']:,} parameters)"
        + (f"; adapter {b['size']['adapter_bytes'] / 2**20:,.2f} MiB" if "adapter_bytes" in b["size"] else ""),
    ]
    t = b.get("training")
    if t:
        lines.append(f"training: {f(t['device_hours'])} device-hours on {t['devices']} device(s), "
                     f"{f(t['flops_6nd'], '{:.3g}')} FLOPs ({t['flops_note']})")
    a = c["assumptions"]
    lines += [
        f"cost at {a['price_per_hour']} {cur}/device-hour: training {f(c['training_cost'])} {cur}; serving "
        f"{f(c['serving_cost_per_1k_tokens'])} {cur} per 1k generated tokens",
        f"ROI over {a['months']:g} months: {a['tasks_per_month']:,.0f} tasks/month × "
        f"{f(c.get('acceptable_share'), '{:.0%}')} acceptable answers ({a.get('acceptable_answers', '—')}) × "
        f"{a['minutes_saved_per_task']:g} min saved × {a['hourly_rate']:g} {cur}/h = {f(c['benefit'], '{:,.0f}')} "
        f"{cur} benefit against {f(c['training_cost'] + (c['serving_cost'] or 0), '{:,.2f}')} {cur} training + "
        f"serving ({a['tokens_per_task']:.0f} tokens/task) → ROI {f(c['roi'], '{:,.1f}')}×",
    ]
    return lines
