"""One base model in memory, any number of named LoRA adapters on it.

Clients pick what answers by the request's ``model`` field: the base model's name or an
adapter's. Adapters are loaded and unloaded while the server runs (peft ``load_adapter`` /
``delete_adapter``), under the batching engine's lock, so no step sees a half-loaded adapter.
Each served name keeps its own tokenizer, because a tuned run stores the chat template it was
trained with next to its adapter.

Only LoRA-family adapters (LoRA, rsLoRA) can be mixed in one batch (peft "mixed adapter
batches"); other adapter kinds are refused at load time with the reason.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.models.engine import BASE, AdapterBusy
from tunelab.workspace import Workspace

DEMO_RUN_PREFIX = "sft-support-demo-"  # `tunelab demo` trains recipe name "support-demo" (resources/demo_sft_support.yaml)


class UnknownModel(TunelabError):
    pass


@dataclass
class Served:
    """A name clients can ask for: the base model, or one adapter on it."""

    name: str
    adapter: str  # peft adapter name in the model, or BASE
    tokenizer: Any
    path: str
    run_id: str | None = None

    def card(self, owner: str) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": owner,
                "kind": "base" if self.adapter == BASE else "adapter", "path": self.path, "run_id": self.run_id}


@dataclass
class Target:
    """What ``tunelab serve MODEL`` resolved to: a base folder and maybe the run's adapter."""

    name: str  # what clients call it
    base_path: Path
    base_name: str
    adapter: Path | None = None
    run_id: str | None = None


def resolve_target(ref: str, ws: Workspace, name: str | None = None) -> Target:
    """A run id (or prefix, or folder), a model folder, an adapter folder, or a packaged name → what to serve."""
    import json

    folder = Path(ref).expanduser()
    if (folder / "adapter_config.json").is_file():  # a bare peft adapter folder: its config names the base
        base_ref = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        base = refs.resolve(base_ref, ws, runs=False).path
        return Target(name or folder.name, base, Path(base_ref).name, folder.resolve())
    start = refs.resolve(ref, ws)
    if start.run_id is None:
        base_name = name or (Path(ref).name if Path(ref).exists() else ref)
        return Target(base_name, start.path, base_name)
    base_name = _base_name(ws.runs_dir / start.run_id if (ws.runs_dir / start.run_id).is_dir() else Path(ref))
    if start.adapter is None:  # a run that trained the whole model: serve it as a base
        return Target(name or start.run_id, start.path, name or start.run_id, run_id=start.run_id)
    return Target(name or start.run_id, start.path, base_name, start.adapter, start.run_id)


def _base_name(run_dir: Path) -> str:
    import json

    lineage = run_dir / "lineage.json"
    if lineage.is_file():
        return str(json.loads(lineage.read_text(encoding="utf-8")).get("base_model") or "base")
    return "base"


def newest_demo_run(ws: Workspace) -> str:
    """The id of the newest `tunelab demo` run with a trained adapter in the workspace."""
    runs = sorted(d for d in ws.runs_dir.glob(DEMO_RUN_PREFIX + "*") if (d / "adapter").is_dir()) \
        if ws.runs_dir.is_dir() else []
    if not runs:
        raise TunelabError(f"no demo run with an adapter in {ws.root}; run 'tunelab demo' first "
                           "(or give a run id, a model folder or a packaged model name)")
    return max(runs, key=lambda d: d.stat().st_mtime).name


def load_tokenizer(path: Path):
    """A tokenizer folder's tokenizer with a chat template (models.refs: no custom code runs)."""
    return refs.load_tokenizer(refs.ModelRef(str(path), Path(path)))[0]


class Registry:
    """The base model and its adapters, by the names clients use."""

    def __init__(self, base_path: Path, base_name: str, *, device: str = "cpu", dtype: str = "float32"):
        self.model = refs.load(refs.ModelRef(str(base_path), Path(base_path)), dtype=dtype, device=device).eval()
        self.base_path = Path(base_path)
        tok = load_tokenizer(base_path)
        self.base_vocab = len(tok)
        self.models: dict[str, Served] = {base_name: Served(base_name, BASE, tok, str(base_path))}
        self.base_name = base_name
        self.lock = threading.RLock()  # the engine's step lock; set by the server to the engine's
        self.engine = None  # set by the server: its model is swapped when peft first wraps the base
        self._counter = 0

    def get(self, name: str) -> Served:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(f"model '{name}' is not served here; available: {', '.join(self.models)}") from None

    def eos_ids(self) -> set[int]:
        ids = set()
        for src in (self.model.generation_config.eos_token_id, self.models[self.base_name].tokenizer.eos_token_id):
            ids |= set(src if isinstance(src, (list, tuple)) else [src] if src is not None else [])
        return ids

    def add(self, name: str, path: str | Path, run_id: str | None = None) -> Served:
        """Load a LoRA adapter folder (or a run's adapter/) under ``name``."""
        import json

        path = Path(path)
        if (path / "adapter").is_dir() and not (path / "adapter_config.json").is_file():
            path = path / "adapter"
        if not name or name in self.models:
            raise TunelabError(f"model name '{name}' is empty or already served; unload it first")
        cfg_file = path / "adapter_config.json"
        if not cfg_file.is_file():
            raise TunelabError(f"'{path}' is not a peft adapter folder (no adapter_config.json)")
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TunelabError(f"'{cfg_file}' cannot be read as JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise TunelabError(f"'{cfg_file}' is not a JSON object")
        if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
            kind = "DoRA" if cfg.get("use_dora") else cfg.get("peft_type")
            raise TunelabError(f"adapter '{name}' is {kind}; only LoRA adapters can share a batch "
                               "(merge it with 'tunelab export --merge' and serve the folder instead)")
        tok = load_tokenizer(path) if (path / "tokenizer_config.json").is_file() else self.models[self.base_name].tokenizer
        if len(tok) != self.base_vocab:
            raise TunelabError(f"adapter '{name}' has a tokenizer of {len(tok)} tokens; the base has {self.base_vocab}")
        self._counter += 1
        internal = f"adapter_{self._counter}"  # peft names become module keys: no dots, no user text
        with self.lock:
            if hasattr(self.model, "peft_config"):
                try:
                    self.model.load_adapter(str(path), adapter_name=internal)
                except Exception as e:  # weights that do not load: leave no half-injected adapter behind
                    if internal in self.model.peft_config:
                        self.model.delete_adapter(internal)
                    raise TunelabError(f"cannot load the adapter in '{path}': {type(e).__name__}: {e}") from None
            else:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=internal).eval()
                if self.engine is not None:
                    self.engine.model = self.model
        served = Served(name, internal, tok, str(path), run_id)
        self.models = {**self.models, name: served}  # a new dict: request handlers read it concurrently
        return served

    def remove(self, name: str) -> None:
        served = self.get(name)
        if served.adapter == BASE:
            raise TunelabError(f"'{name}' is the base model; it cannot be unloaded")

        with self.lock:  # the engine is between steps
            if self.engine is not None:
                try:  # refuses new requests for it from here on, atomically with the busy check
                    self.engine.retire(served.adapter)
                except AdapterBusy:
                    raise TunelabError(f"adapter '{name}' has requests queued or in flight; retry when they "
                                       "finish") from None
            try:
                self.model.delete_adapter(served.adapter)
            except Exception:
                if self.engine is not None:
                    self.engine.unretire(served.adapter)
                raise
            # a new dict, not a mutation: request handlers read the names concurrently
            self.models = {k: v for k, v in self.models.items() if k != name}
