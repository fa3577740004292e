"""Where runs, datasets, models and the catalog live.

The workspace is a folder (default ``./tunelab-workspace``, or ``$TUNELAB_WORKSPACE``,
or ``--workspace``) holding ``tunelab.db`` (the catalog), ``models/`` (the model cache),
``runs/`` and ``datasets/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DIRNAME = "tunelab-workspace"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> "Workspace":
        root = Path(path or os.environ.get("TUNELAB_WORKSPACE") or DEFAULT_DIRNAME).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def db_path(self) -> Path:
        return self.root / "tunelab.db"

    def catalog(self):
        from tunelab.catalog import Catalog

        return Catalog(self.db_path)

    def new_run_dir(self, kind: str, name: str | None = None) -> tuple[str, Path]:
        """A fresh, unique run id and its directory: ``<kind>-<name>-YYYYmmdd-HHMMSS-xxxx``."""
        fixed = os.environ.get("TUNELAB_RUN_ID")  # a distributed run: the launcher made the id (train/distributed.py)
        if fixed and fixed.startswith(f"{kind}-"):
            d = self.runs_dir / fixed
            d.mkdir(parents=True, exist_ok=True)
            return fixed, d
        stamp = time.strftime("%Y%m%d-%H%M%S")
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in (name or "")).strip("-")[:40]
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        while True:  # mkdir is atomic: of two processes drawing the same id, one gets it, the other redraws
            run_id = "-".join(p for p in (kind, slug, stamp, secrets.token_hex(2)) if p)
            d = self.runs_dir / run_id
            try:
                d.mkdir(exist_ok=False)
                return run_id, d
            except FileExistsError:
                continue

    def run_dir(self, ref: str) -> Path:
        """A run directory from an id, a unique id prefix, or a path."""
        from tunelab.errors import TunelabError

        p = Path(ref)
        if p.is_dir() and (p / "config.yaml").exists():
            return p.resolve()
        exact = self.runs_dir / ref
        if exact.is_dir():
            return exact
        matches = sorted(self.runs_dir.glob(f"{ref}*")) if self.runs_dir.is_dir() else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise TunelabError(f"no run '{ref}' in {self.root}; see 'tunelab runs list'")
        raise TunelabError(f"'{ref}' matches {len(matches)} runs; give more of the id")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (tmp file + rename) so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
    return rows
