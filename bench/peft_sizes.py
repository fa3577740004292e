"""Trainable parameters and adapter size on disk for every PEFT method, against full fine-tuning.

    python bench/peft_sizes.py ../shared/models/stories260K [more model folders or packaged names ...]

No training: each adapter is created with tunelab's defaults (lora: r=8, alpha=16, all-linear;
prompt methods: 20 virtual tokens; ia3: peft's per-model targets), saved, and measured with
``tunelab.train.peft.adapter_report``. The baseline is full fine-tuning of the same model
(every parameter trainable; the saved fp32 model). QLoRA is LoRA on a 4-bit base: the same
adapter as ``lora``, so it is not measured separately (it needs a CUDA GPU).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(models: list[str]) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from tunelab.models import resolve
    from tunelab.train.peft import PeftSection, adapter_report, apply_peft
    from tunelab.workspace import Workspace

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ws = Workspace.resolve()
    methods = ["lora", "dora", "rslora", "prompt_tuning", "prefix_tuning", "p_tuning", "ia3"]
    for name in models:
        path = resolve(name, ws) if not Path(name).is_dir() else Path(name)
        with tempfile.TemporaryDirectory() as tmp:
            base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            base.save_pretrained(Path(tmp) / "full")
            full = adapter_report(base, Path(tmp) / "full")
            print(f"\n{Path(str(path)).name}: {full['total_params']:,} parameters, full fine-tuning saves "
                  f"{full['adapter_bytes']:,} bytes")
            print(f"| method | trainable params | % of model | adapter on disk | vs full model file |")
            print("|---|---:|---:|---:|---:|")
            print(f"| full | {full['trainable_params']:,} | 100% | {full['adapter_bytes']:,} B | 1 |")
            for m in methods:
                model = apply_peft(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                   PeftSection(method=m), tokenizer_path=str(path))
                out = Path(tmp) / m
                model.save_pretrained(out)
                r = adapter_report(model, out)
                print(f"| {m} | {r['trainable_params']:,} | {r['trainable_percent']:.3g}% | "
                      f"{r['adapter_bytes']:,} B | 1/{full['adapter_bytes'] / r['adapter_bytes']:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
