"""Parameter-efficient fine-tuning (PEFT): the method choice, applying it to a model, and its report.

Every recipe that tunes a model composes the same pieces (DESIGN principle 5): a top-level
``method:`` (one named choice) and the section of the family that method reads::

    method: dora            # lora | dora | rslora | qlora | prompt_tuning | prefix_tuning | p_tuning | ia3 | full
    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}   # lora, dora, rslora, qlora
    prompt: {num_virtual_tokens: 20, init_text: "Answer the customer:"}   # prompt_tuning, prefix_tuning, p_tuning
    ia3: {target_modules: null, feedforward_modules: null}                # ia3 (null: peft's per-model default)
    qlora: {quant_type: nf4, double_quant: true, compute_dtype: bf16}     # qlora only

A recipe turns its config into a :class:`PeftSection` with :func:`peft_section` and calls
:func:`check_requirements` (before any model is loaded), :func:`load_kwargs` (extra
``from_pretrained`` arguments: 4-bit quantization for QLoRA), :func:`apply_peft` and, once
the adapter is saved, :func:`adapter_report`. The peft library is the engine.

The methods, and the paper each comes from:

- ``lora``: a low-rank update B·A·(alpha/r) beside each chosen linear layer (Hu et al. 2021, arXiv:2106.09685).
- ``dora``: LoRA on the direction plus a learned magnitude per output feature (Liu et al. 2024,
  arXiv:2402.09353): closer to full fine-tuning at low rank; slower steps.
- ``rslora``: LoRA scaled by alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023, arXiv:2312.03732):
  higher ranks keep learning instead of collapsing.
- ``qlora``: LoRA on a frozen base quantized to 4-bit NF4 (Dettmers et al. 2023, arXiv:2305.14314):
  ~4x less memory for the base weights; needs bitsandbytes (on a CUDA GPU, or its slower CPU kernels).
- ``prompt_tuning``: learned embeddings of virtual tokens put before the input (Lester et al. 2021,
  arXiv:2104.08691).
- ``prefix_tuning``: learned keys and values prepended at every layer (Li & Liang 2021, arXiv:2101.00190).
- ``p_tuning``: virtual tokens produced by a small trained MLP (Liu et al. 2021, arXiv:2103.10385).
- ``ia3``: learned vectors rescaling keys, values and feed-forward activations (Liu et al. 2022,
  arXiv:2205.05638): the fewest parameters of all.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.sections import LoraSection

PEFT_METHODS = ("lora", "dora", "rslora", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning", "ia3")
LORA_FAMILY = ("lora", "dora", "rslora", "qlora")
PROMPT_FAMILY = ("prompt_tuning", "prefix_tuning", "p_tuning")
# Methods whose adapter is a change of weights, so it can be folded into the base (merge_and_unload).
# Prompt-family adapters are extra inputs (virtual tokens, key/value prefixes): nothing to fold in.
MERGEABLE = LORA_FAMILY + ("ia3",)

PeftMethod = Literal["lora", "dora", "rslora", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning", "ia3"]
TrainMethod = Literal["lora", "dora", "rslora", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning", "ia3", "full"]

# which recipe section each method reads (the others are ignored, and the run says so)
SECTIONS_USED: dict[str, tuple[str, ...]] = {
    **{m: ("lora",) for m in ("lora", "dora", "rslora")},
    "qlora": ("lora", "qlora"),
    **{m: ("prompt",) for m in PROMPT_FAMILY},
    "ia3": ("ia3",),
    "full": (),
}


class PromptSection(Strict):
    """Prompt-family settings (prompt_tuning, prefix_tuning, p_tuning)."""

    num_virtual_tokens: int = Field(20, ge=1, description="learned tokens (or prefix positions) per sequence")
    init_text: str | None = Field(
        None, description="prompt_tuning: start the virtual tokens from this text's embeddings "
        "(better than random, Lester et al. 2021); repeated/cut to num_virtual_tokens")
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="p_tuning: width of the MLP that makes the virtual tokens; prefix_tuning "
        "with prefix_projection: width of the projection (None: the model's hidden size)")
    prefix_projection: bool = Field(False, description="prefix_tuning: reparametrize the prefixes through an "
                                    "MLP (Li & Liang 2021): more stable, more trainable parameters")


class IA3Section(Strict):
    """IA3 settings; None picks peft's default for the architecture (keys, values, down projection)."""

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = Field(
        None, description="the subset of target_modules whose input (not output) is rescaled")


class QuantSection(Strict):
    """QLoRA's 4-bit base (bitsandbytes)."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="nf4: normal-float 4-bit (QLoRA paper)")
    double_quant: bool = Field(True, description="quantize the quantization constants too (~0.4 bit/param saved)")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


class PeftSection(Strict):
    """One adapter: the method and the settings of its family."""

    method: PeftMethod = "lora"
    lora: LoraSection = LoraSection()
    prompt: PromptSection = PromptSection()
    ia3: IA3Section = IA3Section()
    qlora: QuantSection = QuantSection()


def peft_section(cfg: Any) -> PeftSection:
    """The :class:`PeftSection` of a recipe config with ``method`` and (some of) ``lora/prompt/ia3/qlora``."""
    if cfg.method not in PEFT_METHODS:
        raise TunelabError(f"method '{cfg.method}' is not a PEFT method ({', '.join(PEFT_METHODS)})")
    parts = {k: getattr(cfg, k) for k in ("lora", "prompt", "ia3", "qlora") if getattr(cfg, k, None) is not None}
    return PeftSection(method=cfg.method, **parts)


def ignored_sections(cfg: Any) -> list[str]:
    """Sections of the recipe, set away from their defaults, that its method does not read (a run says so).

    Not an error: one recipe can try several methods with ``--set method=...``.
    """
    defaults = {"lora": LoraSection(), "prompt": PromptSection(), "ia3": IA3Section(), "qlora": QuantSection()}
    used = SECTIONS_USED.get(cfg.method, ())
    return [s for s, d in defaults.items() if s not in used and getattr(cfg, s, d) != d]


def check_requirements(section: PeftSection) -> None:
    """Fail early, in one line, when this machine cannot run the method (call before loading a model)."""
    if section.method != "qlora":
        return
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunelabError("method qlora needs the bitsandbytes package (pip install 'tunelab[qlora]'); without it "
                           "use method: lora (the same adapter on an unquantized base)")
    if not torch.cuda.is_available():
        from importlib.metadata import version

        have = version("bitsandbytes")
        if tuple(int(x) for x in have.split(".")[:2] if x.isdigit()) < BNB_CPU:
            raise TunelabError(f"method qlora without a CUDA GPU needs bitsandbytes >= {'.'.join(map(str, BNB_CPU))} "
                               f"(its CPU 4-bit kernels; installed: {have}); or use method: lora")
        print("note: qlora on CPU runs bitsandbytes' CPU 4-bit kernels: it saves memory but is several times "
              "slower than lora here (a GPU is where QLoRA pays off)", flush=True)


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BNB_CPU = (0, 46)  # first bitsandbytes with 4-bit on CPU (its multi-backend release)


def load_kwargs(section: PeftSection) -> dict:
    """Extra ``from_pretrained`` arguments the method needs (QLoRA: a 4-bit quantized base on GPU 0, else CPU)."""
    if section.method != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, _DTYPES[section.qlora.compute_dtype])
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=section.qlora.quant_type,
        bnb_4bit_use_double_quant=section.qlora.double_quant, bnb_4bit_compute_dtype=dtype),
        "dtype": dtype, "device_map": {"": 0 if torch.cuda.is_available() else "cpu"}}


def layer_count(model) -> int | None:
    """The number of transformer layers of a (PEFT-wrapped or not) model, from its config; None if unknown."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def _is_linear(m) -> bool:
    """torch.nn.Linear and its subclasses (bitsandbytes' 4/8-bit layers), and GPT-2's Conv1D (peft's all-linear)."""
    import torch

    return isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"


def _layer_list(model, n_layers: int) -> str:
    """The name of the model's stack of ``n_layers`` transformer layers (a ModuleList); of several that long, the
    language model's (a vision tower's stack of the same length is not it)."""
    import torch

    found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if not found:
        raise TunelabError(f"lora.last_layers: found no stack of {n_layers} layers in this model; remove "
                           f"lora.last_layers to adapt every layer")
    text = [f for f in found if "language_model" in f or "decoder" in f or "text" in f]
    plain = [f for f in found if not any(w in f for w in ("vision", "visual", "image", "audio", "encoder"))]
    return (text or plain or found)[0]


def last_layers(lora: LoraSection, model, targets: list[str] | str | None = None) -> dict:
    """peft's ``target_modules`` for ``lora.last_layers``: the full names of the targeted linear layers inside the
    last N layers of the model's layer stack (the text decoder's in a multimodal model). ``targets``: the recipe's
    list (short names such as ``q_proj``, or full names) or 'all-linear' (every linear layer in those layers;
    heads and the LM head sit outside them), default ``lora.target_modules``. Full names, not peft's
    ``layers_to_transform``: peft matches an exact full name before it looks at the layer index."""
    n_layers = layer_count(model) if model is not None else None
    if n_layers is None:
        raise TunelabError("lora.last_layers: cannot read this model's layer count from its config; "
                           "remove lora.last_layers to adapt every layer")
    n = lora.last_layers
    if n > n_layers:
        raise TunelabError(f"lora.last_layers is {n} but the model has {n_layers} layers; use at most "
                           f"{n_layers} (or remove it: every layer)")
    targets = lora.target_modules if targets is None else targets
    if isinstance(targets, str) and targets != "all-linear":
        raise TunelabError(f"lora.last_layers needs lora.target_modules as a list of names or 'all-linear', not "
                           f"the pattern {targets!r} (peft cannot restrict a pattern to some layers)")
    stack = _layer_list(model, n_layers)
    keep = tuple(f"{stack}.{i}." for i in range(n_layers - n, n_layers))
    names = []
    for name, m in model.named_modules():
        if not name.startswith(keep) or not _is_linear(m) or ".lora_" in name:
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        raise TunelabError(f"lora.last_layers: no layer named in lora.target_modules ({targets}) inside the last "
                           f"{n} layers ({stack}.{n_layers - n} to {stack}.{n_layers - 1})")
    return {"target_modules": names}


def peft_config(section: PeftSection, task_type: str = "CAUSAL_LM", tokenizer_path: str | None = None,
                model=None, **extra):
    """The peft library's config object for ``section``; ``extra`` sets or overrides fields of it (a recipe's
    own ``target_modules`` list, ``modules_to_save`` for a head trained in full). ``model`` (the model the
    adapter goes on) is read only by ``lora.last_layers``."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    m = section.method
    p = section.prompt
    if m in LORA_FAMILY:
        lo = section.lora
        cls, kw = LoraConfig, dict(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                   target_modules=lo.target_modules, use_dora=m == "dora", use_rslora=m == "rslora")
        if lo.last_layers is not None:  # a recipe's own target list (extra) is restricted too
            kw.update(last_layers(lo, model, extra.pop("target_modules", None)))
    elif m == "ia3":
        cls, kw = IA3Config, dict(target_modules=section.ia3.target_modules,
                                  feedforward_modules=section.ia3.feedforward_modules)
    elif m == "prompt_tuning":
        cls, kw = PromptTuningConfig, dict(num_virtual_tokens=p.num_virtual_tokens)
        if p.init_text:
            if not tokenizer_path:
                raise TunelabError("prompt.init_text needs the model's tokenizer: pass tokenizer_path to apply_peft")
            kw.update(prompt_tuning_init="TEXT", prompt_tuning_init_text=p.init_text,
                      tokenizer_name_or_path=tokenizer_path)
    elif m in ("prefix_tuning", "p_tuning"):
        kw = dict(num_virtual_tokens=p.num_virtual_tokens)
        if p.encoder_hidden_size:
            kw["encoder_hidden_size"] = p.encoder_hidden_size
        if m == "prefix_tuning":
            cls = PrefixTuningConfig
            kw["prefix_projection"] = p.prefix_projection
        else:
            cls = PromptEncoderConfig
            kw["encoder_reparameterization_type"] = "MLP"
    else:
        raise TunelabError(f"unknown PEFT method '{m}'; known: {', '.join(PEFT_METHODS)}")
    return cls(**{**kw, "task_type": task_type, **extra})


def apply_peft(model, section: PeftSection, task_type: str = "CAUSAL_LM", tokenizer_path: str | None = None,
               **extra):
    """Wrap ``model`` (loaded with :func:`load_kwargs`) in the adapter ``section`` describes; returns a PeftModel.

    ``task_type`` is peft's: CAUSAL_LM, SEQ_CLS, TOKEN_CLS, SEQ_2_SEQ_LM, FEATURE_EXTRACTION.
    ``tokenizer_path`` (default: the model's own folder) is read only by ``prompt.init_text``.
    ``extra``: fields of the peft config to set or override (:func:`peft_config`).
    """
    from peft import get_peft_model

    if section.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # fp32 norms and an input that requires grad; gradient checkpointing stays the recipe's choice
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _cpu_4bit_inference_guard(model)
    path = tokenizer_path or getattr(model, "name_or_path", None) or None
    return get_peft_model(model, peft_config(section, task_type, path, model=model, **extra))


def _cpu_4bit_inference_guard(model) -> None:
    """bitsandbytes 0.50 repacks a CPU 4-bit weight for inference (eval mode, no grad) on AVX512-bf16 CPUs, and
    fails ("shape ... is invalid") when in_features is not a multiple of the 64-weight quantization block
    (e.g. an MLP of width 1376). Those layers keep the generic 4-bit path, which handles any width."""
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if getattr(m, "support_avx512bf16_for_cpu", False) and qs is not None and m.in_features % qs.blocksize:
            m.support_avx512bf16_for_cpu = False


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights counted as the parameters they stand for."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return tuple(int(x) for x in model.get_nb_trainable_parameters())
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def weights_bytes(saved_dir: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) in a saved adapter or model folder."""
    d = Path(saved_dir)
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))


def adapter_report(model, saved_dir: str | Path | None = None) -> dict:
    """Trainable and total parameters, the trainable share in percent, and the saved weights' size in bytes.

    For prompt-family methods the saved adapter holds the final virtual-token embeddings, not the
    encoder that made them, so p_tuning and projected prefix_tuning save less than they train.
    """
    trainable, total = count_parameters(model)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / max(total, 1), 4),
            "adapter_bytes": weights_bytes(saved_dir) if saved_dir is not None else None}


def virtual_tokens(model) -> int:
    """How many positions a PEFT prompt-learning model prepends to its input (0 for anything else).

    prompt_tuning and p_tuning prepend virtual-token embeddings, so the logits are longer than the
    input; prefix_tuning passes its prefixes as past keys/values and adds no logit positions.
    """
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not getattr(cfg, "is_prompt_learning", False):
        return 0
    if str(getattr(cfg.peft_type, "value", cfg.peft_type)) == "PREFIX_TUNING":
        return 0
    return int(cfg.num_virtual_tokens) * int(getattr(cfg, "num_transformer_submodules", None) or 1)
