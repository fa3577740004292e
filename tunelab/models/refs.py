"""One model reference, one way to load it: used by training, evaluation, serving and export.

A reference is, in this order:
1. a local Hugging Face folder (``config.json`` in it), an export of a run included;
2. a packaged name (``smollm2-135m-instruct``) or a model pulled into the workspace cache;
3. a run: its folder, its id, or a unique prefix of its id (the one rule: ``Workspace.find_run``)
   → its ``model/``, or its ``adapter/`` on the base recorded in its lineage;
4. a hub id (``org/name``), fetched where a network exists.

Custom model code is never run unless asked: every load passes ``trust_remote_code`` explicitly
(False by default, so transformers never asks on a terminal either), and a folder whose
architecture exists only in its own code (``auto_map`` with a model type transformers does not know)
is refused with the option that allows it (``model.trust_remote_code: true``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.models.chat import ensure_chat_template
from tunelab.models.resolve import PACKAGED
from tunelab.models.resolve import resolve as resolve_path
from tunelab.workspace import Workspace

TASKS = {"causal": "AutoModelForCausalLM", "seq_cls": "AutoModelForSequenceClassification",
         "encoder": "AutoModel"}


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: the weights folder, an adapter on it (or None), and the run it came from."""

    ref: str
    path: Path
    adapter: Path | None = None
    run_id: str | None = None
    source: str = "folder"  # folder | packaged | run | hub
    trust_remote_code: bool = False

    @property
    def tokenizer_path(self) -> Path:
        """Where the tokenizer is: a run's adapter folder carries it with the chat template trained on."""
        return self.adapter or self.path

    def describe(self) -> dict:
        return {"ref": self.ref, "path": str(self.path), "adapter": str(self.adapter) if self.adapter else None,
                "run_id": self.run_id, "source": self.source}


def resolve(ref: str, ws: Workspace | None = None, *, trust_remote_code: bool = False,
            runs: bool = True) -> ModelRef:
    """Turn a reference into a :class:`ModelRef` (see the module docstring for the order). A folder with
    code of its own is refused here, before anything is made, unless ``trust_remote_code``."""
    m = _resolve(ref, ws, trust_remote_code, runs)
    check_custom_code(m.path, m.trust_remote_code)
    return m


def _resolve(ref: str, ws: Workspace | None, trust_remote_code: bool, runs: bool) -> ModelRef:
    ref = str(ref)
    p = Path(ref).expanduser()
    if (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        return ModelRef(ref, p.resolve(), source="folder", trust_remote_code=trust_remote_code)
    ws = ws or Workspace.resolve()  # only now: a folder needs no workspace (none is made in the current directory)
    if ref.lower() in PACKAGED or (ws.models_dir / ref / "config.json").is_file():
        return ModelRef(ref, resolve_path(ref, ws), source="packaged", trust_remote_code=trust_remote_code)
    run_dir = ws.find_run(ref) if runs else None
    if run_dir is not None:
        return _from_run(ref, run_dir, ws, trust_remote_code)
    path = resolve_path(ref, ws)  # a hub id, or a one-line error naming what a reference may be
    return ModelRef(ref, path, source="hub", trust_remote_code=trust_remote_code)


def _from_run(ref: str, run_dir: Path, ws: Workspace, trust_remote_code: bool) -> ModelRef:
    trust = trust_remote_code or _run_trusts_code(run_dir)
    if (run_dir / "model" / "config.json").is_file():
        return ModelRef(ref, run_dir / "model", None, run_dir.name, "run", trust)
    if (run_dir / "adapter").is_dir():
        lineage = json.loads((run_dir / "lineage.json").read_text(encoding="utf-8"))
        base = Path(lineage.get("base_model_path") or "")
        if not (base / "config.json").is_file():
            base = resolve_path(lineage.get("base_model") or "", ws)
        return ModelRef(ref, base, run_dir / "adapter", run_dir.name, "run", trust)
    raise TunelabError(f"run {run_dir.name} has no trained weights (no model/ or adapter/); finish it with "
                       f"'tunelab train --resume {run_dir.name}'")


def _run_trusts_code(run_dir: Path) -> bool:
    """A run trained with ``model.trust_remote_code: true`` keeps that permission for its own model."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False
    return any(isinstance(cfg.get(k), dict) and cfg[k].get("trust_remote_code") is True
               for k in ("model", "student", "teacher"))


def check_custom_code(path: Path, allowed: bool) -> None:
    """Refuse a folder whose architecture exists only in its own Python code, unless ``allowed``."""
    if allowed:
        return
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers will say what is wrong with the folder
    if not cfg.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if cfg.get("model_type") in CONFIG_MAPPING:
        return  # transformers has the architecture itself; the folder's own code is not used
    raise TunelabError(f"model folder {path} ships its own Python code (auto_map in config.json, model type "
                       f"'{cfg.get('model_type')}'); tunelab does not run a model's code unless you allow it: set "
                       "model.trust_remote_code: true in the recipe (read the code first)")


def load(m: ModelRef | str, ws: Workspace | None = None, *, task: str = "causal", trainable: bool = False,
         merge: bool = False, device: str | None = None, dtype="float32", **kw):
    """Load a reference as a transformers model (fp32 by default), with its adapter when it has one.

    ``trainable``: the adapter keeps training; ``merge``: the adapter is folded into the base (a plain
    transformers model comes back). ``kw`` go to ``from_pretrained`` (``num_labels``, quantization, ...).
    """
    import torch
    import transformers

    m = m if isinstance(m, ModelRef) else resolve(m, ws)
    check_custom_code(m.path, m.trust_remote_code)
    auto = getattr(transformers, TASKS[task])
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = auto.from_pretrained(m.path, dtype=dtype, trust_remote_code=m.trust_remote_code, **kw)
    if m.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, m.adapter, is_trainable=trainable)
        if merge and not trainable:
            model = model.merge_and_unload()
    return model.to(device) if device else model


def adapter_kind(model) -> str | None:
    """The adapter method of a peft model as tunelab names it (lora, dora, rslora, ia3, prompt_tuning, ...);
    None for a plain transformers model."""
    cfg = getattr(model, "active_peft_config", None) if hasattr(model, "peft_config") else None
    if cfg is None:
        return None
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type)).lower()
    if kind == "lora":
        return "dora" if getattr(cfg, "use_dora", False) else "rslora" if getattr(cfg, "use_rslora", False) else "lora"
    return kind


def lora_merge_blocker(model) -> str | None:
    """Why the adapter of ``model`` (a peft model) cannot be folded into its base weights exactly; None when it
    can. Only a single LoRA adapter (DoRA and rsLoRA included) on an unquantized base whose adapted weights are
    its own (not tied to another layer's) qualifies: prompt-family adapters learn extra inputs, a quantized base
    cannot hold W + BA without rounding it to its own grid, a tied weight would carry the update into the layer
    it is tied to, and peft refuses the rest (replicated layers, GPTQ) itself."""
    kind = adapter_kind(model)
    if kind is None:
        return "no adapter (a full fine-tune or a base model)"
    if kind not in ("lora", "dora", "rslora"):
        return (f"a {kind} adapter learns extra inputs, not a weight update: nothing to fold in"
                if kind in ("prompt_tuning", "prefix_tuning", "p_tuning") else
                f"a {kind} adapter: only LoRA adapters are merged for scoring")
    if len(model.peft_config) != 1:
        return f"{len(model.peft_config)} adapters loaded: only a single adapter is merged"
    cfg = model.active_peft_config
    if getattr(cfg, "alora_invocation_tokens", None):
        return "an activated LoRA (aLoRA) applies only after its invocation tokens: merging would apply it everywhere"
    base = model.get_base_model()
    qcfg = getattr(getattr(base, "config", None), "quantization_config", None)
    if (getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False) or qcfg
            or getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
        method = getattr(method, "value", method)
        return (f"the base is quantized{f' ({method})' if method else ''}: merging would round the update to the "
                "quantized weights, so the scores would not be the adapter's")
    owners: dict[int, set[str]] = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        owners.setdefault(p.data_ptr(), set()).add(name.rpartition(".")[0])
    for target in getattr(model.base_model, "targeted_module_names", []):
        w = getattr(base.get_submodule(target).get_base_layer(), "weight", None)
        tied = sorted(o for o in owners.get(w.data_ptr(), ()) if not o.startswith(target)) if w is not None else []
        if tied:
            return (f"the adapter changes {target}, whose weight is tied to {tied[0]}: merging would change that "
                    "layer too")
    check = getattr(model.base_model, "_check_merge_allowed", None)  # what merge_and_unload checks first
    try:
        if check is not None:
            check()
    except ValueError as e:  # peft's own refusals (replicated layers, GPTQ)
        return f"peft cannot merge it: {e}"
    return None


def load_tokenizer(m: ModelRef | str, ws: Workspace | None = None, *, chat_template: bool = True):
    """The reference's tokenizer (a run's own, with the chat template it trained on); returns
    ``(tokenizer, template_added)`` where ``template_added`` says tunelab's plain template was added."""
    from transformers import AutoTokenizer

    m = m if isinstance(m, ModelRef) else resolve(m, ws)
    check_custom_code(m.path, m.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(m.tokenizer_path, trust_remote_code=m.trust_remote_code)
    added = False
    if chat_template:
        added = ensure_chat_template(tok)
    return tok, added


def eval_device() -> str:
    """Where evaluation runs: this rank's GPU when there is one, else the CPU."""
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "cuda"
