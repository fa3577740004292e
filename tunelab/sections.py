"""Config sections shared by recipes (DESIGN principle 5): model, data, lora, train, eval."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config import Strict


class ModelSection(Strict):
    name: str = Field(description="packaged name, local HF folder or hub id")
    trust_remote_code: bool = Field(False, description="run Python code shipped inside the model folder (auto_map); "
                                                       "off: such a folder is refused (tunelab/models/refs.py)")


class ChatDataSection(Strict):
    train: str = Field(description="training file (.jsonl, .jsonl.gz, .json, .csv)")
    validation: str | None = Field(None, description="validation file; or use validation_split")
    validation_split: float = Field(0.0, ge=0.0, lt=0.5, description="share of train held out by content hash")
    test: str | None = Field(None, description="held-out test file for tunelab eval")
    format: Literal["auto", "alpaca", "prompt_completion", "messages"] = "auto"
    system_prompt: str | None = Field(None, description="system message put before each chat that has none")
    max_length: int = Field(512, ge=8, description="tokens; longer examples are truncated and counted")
    limit: int | None = Field(None, ge=1, description="use only the first N training records")


class TextDataSection(Strict):
    """Raw text for pretraining / continued pretraining, packed into fixed blocks."""

    files: list[str] = Field(min_length=1, description="text files, folders of .txt/.md, or JSONL/JSON/CSV/Parquet "
                                                       "records with text (chat records are joined into text)")
    text_unit: Literal["document", "paragraph"] = Field(
        "document", description="one document per file/record, or per paragraph (split on blank lines)")
    heldout_share: float = Field(0.05, gt=0.0, lt=0.5, description="share of documents held out by content hash "
                                                                   "for perplexity")
    block_size: int | None = Field(None, ge=8, description="tokens per packed block; default: the model's context")
    limit: int | None = Field(None, ge=1, description="use only the first N documents")
    max_eval_blocks: int | None = Field(256, ge=1, description="held-out blocks scored (the same before and after)")


class LoraSection(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    last_layers: int | None = Field(
        None, ge=1, description="adapt only the last N transformer layers (None: all). The backward pass then "
                                "stops below them: with N of L layers it costs ~N/L of the full one (docs/methods/"
                                "peft.md); fewer layers can learn less, so measure the quality")


class TrainSection(Strict):
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps (overrides epochs)")
    batch_size: int = Field(8, ge=1, description="examples per device per optimizer step (times grad_accum)")
    grad_accum: int = Field(1, ge=1)
    micro_batch_size: int | None = Field(
        None, ge=1, description="SFT: examples per forward/backward pass, a divisor of batch_size (the rest is "
                                "accumulated: the same examples and loss per optimizer step); None: the largest "
                                "that fits train.memory_budget_gb (tunelab/train/memory.py)")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="SFT: peak memory the run should fit in, GB (CPU: the process's resident memory); "
                                "micro-batch and gradient checkpointing are chosen to fit it where not set. "
                                "None: half the machine's RAM (at most what is available at the start), or 90% of "
                                "the GPU's memory")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    eval_every: int = Field(50, ge=1, description="steps between validation passes (and checkpoints)")
    early_stopping_patience: int | None = Field(3, ge=1, description="stop after N evals without improvement")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (the best one is always kept)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool | None = Field(
        None, description="None: chosen per device (off on CPU; SFT: on where train.memory_budget_gb needs it)")
    group_by_length: bool = Field(True, description="batch similar lengths together: less padding")
    padding_free: bool | Literal["auto"] = Field(
        "auto", description="SFT: one unpadded row per batch with per-example position ids (no attention across "
                            "examples); auto: on where faster, a GPU with flash attention (tunelab/train/device.py)")
    report_to: list[Literal["mlflow", "tensorboard"]] = Field(
        default_factory=list, description="also log the training metrics to MLflow (a local file store in "
        "<run>/mlruns, or the server in MLFLOW_TRACKING_URI when that is set) and/or TensorBoard (event files in "
        "<run>/tensorboard); metrics.jsonl is always written. Needs the 'tracking' extra")
    speedups: Literal["auto", "off"] = Field(
        "auto", description="auto: the measured CPU speed-ups where they apply (fused response-only loss, fast "
                            "LoRA dropout, and under CPU bf16 a bf16 frozen base; docs/methods/speed.md); off: the "
                            "plain Trainer/TRL computation, e.g. to compare. The choice is recorded in summary.json")
    threads: int | None = Field(None, ge=1, description="CPU threads torch computes with (torch.set_num_threads); "
                                                        "default: torch's choice, one per core. Set it below the "
                                                        "core count on a machine other jobs share")

    @model_validator(mode="after")
    def _micro_batch_divides(self):
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"train.micro_batch_size {self.micro_batch_size} must divide train.batch_size "
                             f"{self.batch_size}: set it to one of "
                             f"{[d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]}")
        return self

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, v: list[str]) -> list[str]:
        import importlib.util

        need = {"mlflow": ("mlflow",), "tensorboard": ("tensorboardX", "tensorboard")}
        missing = [x for x in dict.fromkeys(v) if not any(importlib.util.find_spec(m) for m in need[x])]
        if missing:
            raise ValueError(f"{', '.join(missing)} is not installed: pip install 'tunelab[tracking]'")
        return list(dict.fromkeys(v))


class GenerationSection(Strict):
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1, description="evaluate on the first N test records")


class PreferenceDataSection(Strict):
    """Preference pairs {prompt, chosen, rejected} (or hh-rlhf whole transcripts) for reward, DPO and RLHF."""

    train: str = Field(description="file of preference pairs (.jsonl, .json, .csv, .parquet)")
    validation: str | None = Field(None, description="validation pairs; or use validation_split")
    validation_split: float = Field(0.1, ge=0.0, lt=0.5, description="share of train held out by content hash")
    test: str | None = Field(None, description="held-out pairs for the before/after report (default: validation)")
    test_split: float = Field(0.0, ge=0.0, lt=0.5, description="share of train held out by content hash for the "
                              "before/after report: never trained on, nor used for validation or early stopping")
    max_length: int = Field(512, ge=8, description="tokens of prompt + response; the prompt is cut from the left")
    chat_template: bool | Literal["auto"] = Field(
        "auto", description="hh-rlhf transcripts (\"\\n\\nHuman: ...\\n\\nAssistant:\" text): true: parsed into "
                            "chat turns and rendered with the model's chat template (tunelab's plain one where it "
                            "has none), the answers without their leading space; false: fed as the raw text; auto: "
                            "the template where the model's tokenizer has its own (a chat model), the raw text "
                            "where it has none (a base model). Prompts given as chat messages always use the "
                            "template. What was used is recorded in summary.json (data.chat_template)")
    limit: int | None = Field(None, ge=1, description="use only the first N training pairs (after test_split)")
    test_limit: int | None = Field(None, ge=1, description="report on the first N held-out pairs")


class PolicyEvalSection(Strict):
    """The aligned policy against its starting model on held-out prompts, judged by a reward."""

    reward_model: str | None = Field(None, description="reward run id or folder that judges (DPO: optional)")
    prompts: int = Field(64, ge=1, description="held-out prompts used")
    samples: int = Field(2, ge=1, description="sampled completions per prompt and model")
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)


# train options only the SFT recipe reads: padding-free batches, and the memory plan (micro-batch × accumulation
# chosen to fit a budget, tunelab/train/memory.py); every other recipe refuses them when set
SFT_ONLY_TRAIN = ("padding_free", "micro_batch_size", "memory_budget_gb")


def refuse_unread(section, path: str, recipe: str, fields: tuple[str, ...]) -> None:
    """Raise (inside a pydantic validator) when a recipe's section sets options that recipe does not read,
    instead of ignoring them silently: ``train.padding_free`` in a DPO recipe, say.

    An option at its default value is accepted: a run's stored config.yaml lists every field, defaults
    included, and ``--resume`` validates it again."""
    fields_info = type(section).model_fields
    unread = [f for f in fields if getattr(section, f) != fields_info[f].get_default(call_default_factory=True)]
    if unread:
        raise ValueError("; ".join(f"{path}.{f}: the {recipe} recipe does not read this option; remove it"
                                   for f in unread))
