"""The allocator choice for training processes (tunelab/allocator.py): what `auto` and each value of
TUNELAB_ALLOCATOR pick, the environment a re-executed process gets, and which commands re-execute."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tunelab import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


@pytest.fixture
def libs(tmp_path, monkeypatch):
    """A library folder holding what each test puts there; no GPU device."""
    monkeypatch.setattr(allocator, "_gpu_present", lambda: False)
    d = tmp_path / "lib"
    d.mkdir()
    return d


def _put(d: Path, name: str) -> Path:
    p = d / name
    p.write_bytes(b"\x7fELF")
    return p


def test_auto_picks_jemalloc_else_the_c_library(libs):
    assert allocator.choose({}, [libs])[:2] == ("system", None)
    assert "libjemalloc2" in allocator.choose({}, [libs])[2]  # says what to install
    tc = _put(libs, "libtcmalloc_minimal.so.4")
    assert allocator.choose({}, [libs])[:2] == ("system", None)  # tcmalloc only when asked for
    assert allocator.choose({"TUNELAB_ALLOCATOR": "tcmalloc"}, [libs])[:2] == ("tcmalloc", tc)
    je = _put(libs, "libjemalloc.so.2")
    assert allocator.choose({}, [libs])[:2] == ("jemalloc", je)
    assert allocator.choose({"TUNELAB_ALLOCATOR": "auto"}, [libs])[:2] == ("jemalloc", je)


def test_each_setting_is_honoured(libs, tmp_path):
    je = _put(libs, "libjemalloc.so.2")
    for off in ("system", "glibc", "SYSTEM", " none "):
        name, lib, why = allocator.choose({"TUNELAB_ALLOCATOR": off}, [libs])
        assert (name, lib) == ("system", None) and "TUNELAB_ALLOCATOR" in why
    assert allocator.choose({"TUNELAB_ALLOCATOR": "jemalloc"}, [libs])[:2] == ("jemalloc", je)
    name, lib, why = allocator.choose({"TUNELAB_ALLOCATOR": "tcmalloc"}, [libs])  # asked for, not installed
    assert (name, lib) == ("system", None) and "libtcmalloc-minimal4" in why
    custom = _put(tmp_path, "libtcmalloc.so.4")
    assert allocator.choose({"TUNELAB_ALLOCATOR": str(custom)}, [libs])[:2] == ("tcmalloc", custom)
    name, lib, why = allocator.choose({"TUNELAB_ALLOCATOR": str(tmp_path / "missing.so")}, [libs])
    assert lib is None and "neither" in why


def test_auto_leaves_gpu_machines_alone(libs, monkeypatch):
    _put(libs, "libjemalloc.so.2")
    monkeypatch.setattr(allocator, "_gpu_present", lambda: True)
    name, lib, why = allocator.choose({}, [libs])
    assert lib is None and "GPU" in why
    assert allocator.choose({"TUNELAB_ALLOCATOR": "jemalloc"}, [libs])[0] == "jemalloc"  # asked for: given


def test_preload_env_prepends_once_and_marks_the_process(libs):
    je = _put(libs, "libjemalloc.so.2")
    env = allocator.preload_env({"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}, [libs])
    assert env["LD_PRELOAD"] == f"{je} /opt/other.so" and env["PATH"] == "/bin"
    assert env[allocator.CHOSEN] == "jemalloc"
    # no purging between steps, and any free extent may serve a request (else the merged ones pile up)
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1,lg_extent_max_active_fit:20"
    assert allocator.preload_env({"MALLOC_CONF": "narenas:1"}, [libs])["MALLOC_CONF"] == "narenas:1"  # the user's
    tc = allocator.preload_env({"TUNELAB_ALLOCATOR": "tcmalloc"}, [_put(libs, "libtcmalloc.so.4").parent])
    assert "MALLOC_CONF" not in tc and tc[allocator.CHOSEN] == "tcmalloc"
    assert allocator.preload_env(env, [libs]) is None  # the re-executed process does not start over again
    assert allocator.preload_env({"LD_PRELOAD": f"/x.so:{je}"}, [libs]) is None  # already preloaded by the user
    assert allocator.preload_env({"LD_PRELOAD": "/opt/libtcmalloc.so"}, [libs]) is None  # another one: kept
    assert allocator.preload_env({"LD_PRELOAD": "/opt/libmimalloc.so.2"}, [libs]) is None
    assert allocator.preload_env({"TUNELAB_ALLOCATOR": "system"}, [libs]) is None


def test_only_the_commands_that_train_reexecute(libs, monkeypatch):
    je = _put(libs, "libjemalloc.so.2")
    monkeypatch.setattr(allocator, "_dirs", lambda: [libs])
    monkeypatch.delenv(allocator.CHOSEN, raising=False)
    monkeypatch.delenv("TUNELAB_ALLOCATOR", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    for argv in (["tunelab"], ["tunelab", "eval", "RUN"], ["tunelab", "serve", "RUN"], ["tunelab", "train", "--help"],
                 ["tunelab", "data", "prepare", "x.yaml"]):
        allocator.reexec(argv)
    assert calls == []
    given = ["/venv/bin/tunelab", "train", "r.yaml", "--set", "train.max_steps=2"]
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", *given], raising=False)
    allocator.reexec(given)
    (exe, argv, env), = calls  # the same command line, interpreter options included, on this interpreter
    assert exe == sys.executable and argv == [sys.executable, "-X", "utf8", *given]
    assert env["LD_PRELOAD"] == str(je) and env[allocator.CHOSEN] == "jemalloc"
    # main() called in-process with an argv of its own (a notebook, a test, a wrapper), or a script read from
    # stdin: the process's command line is something else, and running it again would not run this command
    for orig, argv in ((["python3", "-m", "pytest", "-q"], ["tunelab", "train", "r.yaml"]),
                       (["python3", "-", "train", "r.yaml"], ["-", "train", "r.yaml"]),
                       (["python3", "wrapper.py"], ["tunelab", "train", "r.yaml"])):
        monkeypatch.setattr(sys, "orig_argv", orig, raising=False)
        allocator.reexec(argv)
    assert len(calls) == 1
    for orig, argv in ((["python3", "-m", "tunelab", "demo"], ["/src/tunelab/__main__.py", "demo"]),
                       (["python3", "-c", "from tunelab.cli import main; main()", "tune", "t.yaml"],
                        ["-c", "tune", "t.yaml"])):
        monkeypatch.setattr(sys, "orig_argv", orig, raising=False)
        allocator.reexec(argv)
        assert calls[-1][1] == [sys.executable, *orig[1:]]
    assert len(calls) == 3
    monkeypatch.setenv("TUNELAB_ALLOCATOR", "system")
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "tunelab", "demo"], raising=False)
    allocator.reexec(["x/__main__.py", "demo"])
    assert len(calls) == 3


def test_without_removes_preloaded_allocators_only():
    env = {"LD_PRELOAD": "/a/libjemalloc.so.2 /b/libfoo.so:/c/libtcmalloc_minimal.so.4", "MALLOC_CONF": "x:1",
           allocator.CHOSEN: "jemalloc", "PATH": "/bin"}
    assert allocator.without(env) == {"LD_PRELOAD": "/b/libfoo.so", "PATH": "/bin"}
    assert allocator.without({"LD_PRELOAD": "/a/libjemalloc.so.2"}) == {}


def test_loaded_and_describe_read_the_process(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.CHOSEN, raising=False)
    assert allocator.loaded() == "system"  # pytest's own process: nothing preloaded
    monkeypatch.setenv("LD_PRELOAD", "/nowhere/libjemalloc.so.2")  # named but not mapped: not the allocator
    assert allocator.loaded() == "system"
    monkeypatch.setenv(allocator.CHOSEN, "jemalloc")  # re-executed for it, and the loader refused it
    assert "preloading jemalloc failed" in allocator.describe()


def test_purge_hands_back_what_jemalloc_kept_without_decay(tmp_path):
    """Without decay jemalloc keeps freed pages resident; the end-of-training release must return them."""
    import subprocess

    env = allocator.preload_env({k: v for k, v in os.environ.items()
                                 if k not in (allocator.CHOSEN, "LD_PRELOAD", "MALLOC_CONF")}
                                | {"TUNELAB_ALLOCATOR": "jemalloc", "OMP_NUM_THREADS": "1"})
    if env is None:
        pytest.skip("jemalloc is not installed here")
    code = (
        "import numpy as np\n"
        "from tunelab import allocator\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "assert allocator.loaded() == 'jemalloc'\n"
        "xs = [np.ones(3_000_000) for _ in range(20)]\n"  # 480 MB in 24 MB blocks
        "del xs\n"
        "kept = rss()\n"
        "allocator.purge()\n"
        "print(kept, rss())\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, after = map(float, out.stdout.split())
    assert kept - after > 300, (kept, after)  # MB handed back
