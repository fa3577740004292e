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

from tunelab.catalog import Catalog
from tunelab.errors import TunelabError

DEFAULT_DIRNAME = "tunelab-workspace"
CANCEL_FILE = "CANCEL"  # in a run folder: stop at the next step with a checkpoint (tunelab/train/_run.py)


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
        return Catalog(self.db_path)

    def new_run_dir(self, kind: str, name: str | None = None) -> tuple[str, Path]:
        """A fresh, unique run id and its directory: ``<kind>-<name>-YYYYmmdd-HHMMSS-xxxx``."""
        # an id drawn by someone else: the --nproc launcher (train/distributed.py) or a job queue
        fixed = os.environ.get("TUNELAB_RUN_ID")
        if fixed and fixed.startswith(f"{kind}-"):
            d = self.runs_dir / fixed
            d.mkdir(parents=True, exist_ok=True)
            return fixed, d
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        while True:  # mkdir is atomic: of two processes drawing the same id, one gets it, the other redraws
            run_id = self.draw_run_id(kind, name)
            d = self.runs_dir / run_id
            try:
                d.mkdir(exist_ok=False)
                return run_id, d
            except FileExistsError:
                continue

    @staticmethod
    def draw_run_id(kind: str, name: str | None = None) -> str:
        """A new run id ``<kind>-<name>-YYYYmmdd-HHMMSS-xxxx`` (no folder made: ``new_run_dir`` claims one)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in (name or "")).strip("-")[:40]
        return "-".join(p for p in (kind, slug, stamp, secrets.token_hex(2)) if p)

    def find_run(self, ref: str) -> Path | None:
        """The one rule that turns a reference into a run folder: a run folder path, a run id, or a
        unique prefix of one (``reward-hh`` for ``reward-hh-20261126-...``). None when ``ref`` names no
        run; an error when a prefix names several."""
        ref = str(ref)
        p = Path(ref).expanduser()
        if p.is_dir() and (p / "config.yaml").is_file():
            return p.resolve()
        if not ref or "/" in ref or "\\" in ref or ref in (".", "..") or not self.runs_dir.is_dir():
            return None
        if (self.runs_dir / ref / "config.yaml").is_file():
            return self.runs_dir / ref
        matches = sorted(d for d in self.runs_dir.glob(f"{glob_escape(ref)}*") if (d / "config.yaml").is_file())
        if len(matches) > 1:
            raise TunelabError(f"'{ref}' matches {len(matches)} runs ({matches[0].name}, {matches[1].name}, ...); "
                               "give more of the id")
        return matches[0] if matches else None

    def run_dir(self, ref: str) -> Path:
        """A run directory from an id, a unique id prefix, or a path (an error when there is none)."""
        d = self.find_run(ref)
        if d is None:
            raise TunelabError(f"no run '{ref}' in {self.root}; see 'tunelab runs list'")
        return d

    def request_cancel(self, ref: str) -> Path:
        """Ask a running run to stop at its next step (it saves a checkpoint and ends ``cancelled``)."""
        d = self.run_dir(ref)
        (d / CANCEL_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"), encoding="utf-8")
        return d


def glob_escape(s: str) -> str:
    """``s`` with glob's special characters taken literally."""
    import glob

    return glob.escape(s)


def umask_modes(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes the user's umask asks for.

    Some writers create files 0600 whatever the umask (safetensors' ``save_file``; ``tempfile.mkdtemp``
    folders are 0700): exported models and probes must be readable by the group like any file the user
    writes."""
    mask = os.umask(0)
    os.umask(mask)
    p = Path(path)
    for q in [p, *(p.rglob("*") if p.is_dir() else [])]:
        if q.is_symlink():
            continue
        os.chmod(q, (0o777 if q.is_dir() else 0o666) & ~mask)


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
