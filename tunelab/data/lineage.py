"""Dataset identity and lineage, from content (DESIGN principle 8): an id is a hash of the input
files' sha256 and the config that reads them, never of hand-picked fields.

- prepared versions (``tunelab data prepare``): ``ds-<name>-<hash>`` of the raw files, steps, split and
  selection (``data/prepare.py`` builds the blob with :func:`content_hash`); a training run that reads a
  prepared version continues the lineage to its raw files through the version's manifest.json;
- training files named directly in a recipe (``data.train/validation/test``): :func:`file_lineage`;
- raw text corpora for pre-training and CPT (files and folders of text): :func:`text_lineage`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunelab.data.readers import TEXT_SUFFIXES
from tunelab.errors import TunelabError
from tunelab.workspace import sha256_file

SPLIT_FIELDS = ("train", "validation", "test")


def content_hash(obj) -> str:
    """16 hex characters of the sha256 of ``obj`` as canonical JSON."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_lineage(data) -> dict:
    """Lineage of a recipe's ``data:`` section with ``train``/``validation``/``test`` files: the dataset id
    (file hashes + the rest of the section), each file's path and sha256, and, for a version made by
    ``tunelab data prepare``, its id and raw sources. A missing file is an error naming every one."""
    files = {k: getattr(data, k) for k in SPLIT_FIELDS if getattr(data, k, None)}
    missing = [f"data.{k}: file not found: {v}" for k, v in files.items() if not Path(v).is_file()]
    if missing:
        raise TunelabError("; ".join(missing))
    hashes = {k: {"path": str(Path(v).resolve()), "sha256": sha256_file(v)} for k, v in files.items()}
    config = data.model_dump(mode="json", exclude=set(SPLIT_FIELDS))
    out = {"dataset_id": "ds-" + content_hash({"files": {k: v["sha256"] for k, v in hashes.items()},
                                               "config": config}),
           "files": hashes}
    manifest = Path(data.train).parent / "manifest.json"
    if manifest.is_file():  # a prepared version: lineage continues to its raw files
        m = json.loads(manifest.read_text(encoding="utf-8"))
        out.update({"dataset_id": m.get("dataset_id", out["dataset_id"]), "dataset_version": str(manifest.parent),
                    "dataset_sources": m.get("sources", [])})
    return out


def expand_files(files: list[str], field: str) -> list[Path]:
    """The files behind ``files`` (folders: their text files, recursively, sorted). Missing ones are one error."""
    missing = [f"{field}: not found: {f}" for f in files if not Path(f).exists()]
    if missing:
        raise TunelabError("; ".join(missing))
    out: list[Path] = []
    for f in map(Path, files):
        if f.is_dir():
            found = sorted(p for p in f.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise TunelabError(f"{field}: folder {f} has no .txt/.md files")
            out += found
        else:
            out.append(f)
    return out


def text_lineage(sections: dict) -> dict:
    """Lineage of raw-text sections (``files:`` lists): the dataset id from every file's content plus each
    section's config, and each file's path and sha256."""
    files, configs = {}, {}
    for name, sec in sections.items():
        for p in expand_files(sec.files, f"{name}.files"):
            files[str(p.resolve())] = sha256_file(p)
        configs[name] = sec.model_dump(mode="json", exclude={"files"})
    return {"dataset_id": "ds-" + content_hash({"files": sorted(files.values()), "config": configs}),
            "files": [{"path": p, "sha256": h} for p, h in files.items()]}


def absolute_paths(section):
    """A data section with absolute file paths (``train``/``validation``/``test`` or ``files``), so a
    stored config works from any directory (evaluation, ``--resume``, a job worker)."""
    update = {k: str(Path(getattr(section, k)).resolve()) for k in SPLIT_FIELDS if getattr(section, k, None)}
    if isinstance(getattr(section, "files", None), list):
        update["files"] = [str(Path(f).resolve()) for f in section.files]
    return section.model_copy(update=update)
