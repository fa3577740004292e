"""A model folder that ships its own code (auto_map) is refused, on a terminal too: no "[y/N]" prompt, and
the folder's code never runs unless the recipe sets model.trust_remote_code."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_color_data

ROOT = Path(__file__).resolve().parents[2]


def _evil_folder(tmp_path: Path, tiny_model: Path, marker: Path) -> Path:
    d = tmp_path / "evil"
    d.mkdir()
    for f in tiny_model.iterdir():
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg.update({"model_type": "evilllama", "architectures": ["EvilForCausalLM"],
                "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                             "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}})
    (d / "config.json").write_text(json.dumps(cfg))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (d / "configuration_evil.py").write_text(
        code + "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evilllama'\n")
    (d / "modeling_evil.py").write_text(
        code + "from transformers import LlamaForCausalLM\nfrom .configuration_evil import EvilConfig\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return d


def _run_on_terminal(args: list[str], cwd: Path, timeout: float = 240) -> tuple[int, str]:
    """Run the CLI with its stdin/stdout on a pseudo-terminal, answering 'y' up front: a prompt that
    reads it would run the folder's code."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", *args], cwd=cwd, stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    os.write(master, b"y\n")
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    try:
        proc.wait(timeout=max(deadline - time.time(), 5))
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command hung on the terminal (a prompt?): " + out.decode(errors="replace")[-2000:])
    os.close(master)
    return proc.wait(), out.decode(errors="replace")


def test_custom_code_folder_is_refused_without_a_prompt(tmp_path, tiny_model):
    marker = tmp_path / "marker.txt"
    folder = _evil_folder(tmp_path, tiny_model, marker)
    data = write_color_data(tmp_path / "train.jsonl", 20)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"recipe": "sft", "model": {"name": str(folder)}, "data": {"train": str(data)},
                                      "train": {"max_steps": 1}}))
    code, out = _run_on_terminal(["train", str(recipe), "-w", str(tmp_path / "ws")], tmp_path)
    assert code != 0
    assert "[y/N]" not in out and "Do you wish" not in out
    assert "model.trust_remote_code: true" in out
    assert "Traceback" not in out
    assert not marker.exists(), "the model folder's code ran"
    assert not (tmp_path / "ws" / "runs").exists() or not any((tmp_path / "ws" / "runs").iterdir())


def test_refs_refuse_and_allow_custom_code(tmp_path, tiny_model):
    from tunelab.errors import TunelabError
    from tunelab.models import refs

    marker = tmp_path / "marker.txt"
    folder = _evil_folder(tmp_path, tiny_model, marker)
    with pytest.raises(TunelabError, match="trust_remote_code"):
        refs.resolve(str(folder))
    unchecked = refs.ModelRef(str(folder), folder)  # made by hand: load checks again
    with pytest.raises(TunelabError, match="trust_remote_code"):
        refs.load(unchecked)
    with pytest.raises(TunelabError, match="trust_remote_code"):
        refs.load_tokenizer(unchecked)
    assert not marker.exists()
    # the explicit, documented option loads it (and so runs its code: that is what the option means)
    model = refs.load(refs.resolve(str(folder), trust_remote_code=True))
    assert type(model).__name__ == "EvilForCausalLM" and marker.exists()


def test_every_transformers_load_says_trust_remote_code():
    """A static check: each ``from_pretrained`` call in tunelab passes trust_remote_code (peft adapters,
    which have no code of their own, excepted), so no path can fall back to transformers' prompt."""
    import ast

    missing = []
    for p in (ROOT / "tunelab").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "from_pretrained":
                owner = ast.unparse(node.func.value)
                if owner == "PeftModel" or any(k.arg == "trust_remote_code" for k in node.keywords):
                    continue
                if any(k.arg is None for k in node.keywords):  # **kwargs: checked where they are built
                    continue
                missing.append(f"{p.relative_to(ROOT)}:{node.lineno}: {owner}.from_pretrained")
    assert not missing, "\n".join(missing)
