"""Export a trained run: the adapter alone, or the adapter merged into the base as a plain HF model.

    tunelab export RUN_ID                 # the adapter (PEFT format) + tokenizer, to serve as base + adapter
    tunelab export RUN_ID --merge         # base with the adapter folded in: one safetensors model, no peft needed
    tunelab export RUN_ID --merge --dtype bf16 --out path/to/folder

Merging folds a weight update into the base weights (W + ΔW), so it exists for LoRA, DoRA,
rsLoRA, QLoRA and IA3 (peft's ``merge_and_unload``). Prompt tuning, prefix tuning and
P-tuning learn extra inputs, not weights: they cannot be merged, and say so. A QLoRA adapter
merges into the unquantized base (the standard practice: 4-bit weights cannot hold the sum).

Before writing, the merged model is checked against the run's ``probe.safetensors`` (the
trained model's logits on one input); the largest difference is stored in ``export.json``.
Each export is a catalog row (kind ``export``) whose parent is the run.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.workspace import Workspace, umask_modes, write_json

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MERGEABLE_PEFT_TYPES = {"LORA", "IA3"}  # DoRA and rsLoRA are LoRA with options; QLoRA is LoRA on a 4-bit base
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "FEATURE_EXTRACTION": "AutoModel", None: "AutoModelForCausalLM"}
# A merge is checked against probe.safetensors. (W + BA)x and Wx + B(Ax) round differently: fp32
# merges agree to ~1e-5 of the largest logit (measured on tiny Llamas: 2-3e-5 for logits of ~10).
PROBE_RELATIVE_TOLERANCE = 1e-4


def merge_adapter(base_path: str | Path, adapter_dir: str | Path, dtype: str = "fp32",
                  trust_remote_code: bool = False):
    """Load the base, apply the adapter, fold it in; returns a plain transformers model (no peft)."""
    import torch
    import transformers
    from peft import PeftModel

    acfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    peft_type = acfg.get("peft_type")
    if peft_type not in MERGEABLE_PEFT_TYPES:
        kind = str(peft_type or "unknown").lower()
        raise TunelabError(f"a {kind} adapter cannot be merged into the base: it learns extra inputs (virtual "
                           "tokens or key/value prefixes), not a weight update; export the adapter alone "
                           "(tunelab export RUN without --merge) and serve it with the base model")
    if dtype not in DTYPES:
        raise TunelabError(f"dtype must be one of {', '.join(DTYPES)} (got '{dtype}')")
    auto = getattr(transformers, AUTO_CLASSES.get(acfg.get("task_type"), "AutoModelForCausalLM"))
    # merge in fp32 (the sum W + BA is exact enough there); cast only when saving
    refs.check_custom_code(Path(base_path), trust_remote_code)
    base = auto.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def probe_difference(model, probe_path: Path) -> tuple[float, float] | None:
    """(max |logit difference| between ``model`` and the run's probe, max |probe logit|); None without a probe."""
    if not probe_path.is_file():
        return None
    import torch
    from safetensors.torch import load_file

    probe = load_file(str(probe_path))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"][None]).logits[0, -probe["logits"].shape[0]:].float()
    return float((logits - probe["logits"]).abs().max()), float(probe["logits"].abs().max())


def export_run(ref: str, ws: Workspace, merge: bool = False, out: str | Path | None = None,
               dtype: str = "fp32") -> dict:
    """Export a run's trained weights; returns what ``export.json`` records (with ``path``)."""
    import yaml

    run_dir = ws.run_dir(ref)
    run_id = run_dir.name
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    adapter, full = run_dir / "adapter", run_dir / "model"
    if not adapter.is_dir() and not full.is_dir():
        raise TunelabError(f"run {run_id} has no trained weights yet (no adapter/ or model/); finish it with "
                           f"'tunelab train --resume {run_id}'")
    if dtype not in DTYPES:
        raise TunelabError(f"--dtype must be one of {', '.join(DTYPES)} (got '{dtype}')")
    if full.is_dir() and merge:
        raise TunelabError(f"run {run_id} is a full fine-tune: its model/ is already a complete model, there is "
                           "no adapter to merge; export it without --merge")

    what = "merged" if merge else ("adapter" if adapter.is_dir() else "model")
    dest = Path(out).resolve() if out else run_dir / "export" / what
    if dest.exists() and any(dest.iterdir()) and not (dest / "export.json").is_file():
        raise TunelabError(f"{dest} exists and is not a tunelab export; choose another --out or remove it")
    base_name = (cfg.get("model") or {}).get("name")
    info = {"run_id": run_id, "method": cfg.get("method"), "base_model": base_name, "kind": what,
            "merged": merge, "dtype": dtype if merge else "as trained", "probe_max_abs_diff": None}

    tmp = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        if merge:
            import torch

            m = refs.resolve(str(run_dir), ws)  # the base the adapter sits on, from the run's lineage
            model = merge_adapter(m.path, adapter, dtype, m.trust_remote_code)
            probe = probe_difference(model, run_dir / "probe.safetensors")
            if probe is not None:
                diff, scale = probe
                info["probe_max_abs_diff"] = diff
                if cfg.get("method") == "qlora":
                    # trained on the 4-bit base, merged into the full-precision one: the difference is the
                    # base's quantization error, not a bad merge; record it and say so
                    info["note"] = ("QLoRA adapter merged into the unquantized base; probe_max_abs_diff is the "
                                    "4-bit quantization error of the base, not a merge error")
                    print(f"note: {info['note']} (max |logit diff| {diff:.3g} for logits up to {scale:.3g})")
                elif diff > PROBE_RELATIVE_TOLERANCE * max(scale, 1.0):
                    raise TunelabError(f"the merged model does not reproduce the trained one (max |logit diff| "
                                       f"{diff:.3g} for logits up to {scale:.3g}); export the adapter alone instead")
            model.to(getattr(torch, DTYPES[dtype])).save_pretrained(tmp)  # safetensors
            refs.load_tokenizer(m, chat_template=False)[0].save_pretrained(tmp)  # with the training chat template
        else:
            shutil.copytree(adapter if adapter.is_dir() else full, tmp)
        info["files"] = sorted(p.name for p in tmp.iterdir())
        info["weights_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix in (".safetensors", ".bin"))
        write_json(tmp / "export.json", info)
        umask_modes(tmp)  # safetensors writes 0600; an export is for others to read
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    export_id = f"export-{run_id}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    cat = ws.catalog()
    cat.add_run(id=export_id, kind="export", dir=dest, parent_id=run_id, base_model=base_name, status="completed",
                config={"merge": merge, "dtype": info["dtype"], "out": str(dest)})
    cat.update_run(export_id, metrics={k: info[k] for k in ("weights_bytes", "probe_max_abs_diff")})
    return {**info, "export_id": export_id, "path": str(dest)}
