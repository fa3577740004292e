"""The memory allocator a training process runs on: jemalloc or tcmalloc preloaded on CPU machines.

Why: CPU training allocates and frees many large per-layer temporaries (norms, rotary embeddings,
projections) whose sizes differ from layer to layer. glibc's malloc keeps the holes they leave and
later requests do not fill them: in fp32 LoRA SFT of SmolLM2-135M, ``mallinfo2()`` at the end of the
forward pass counted a 1.65 GB heap of which 0.58 GB was free (docs/methods/sft.md). The same run
started with jemalloc or tcmalloc preloaded peaked at 2.05 GB instead of 2.57 GB (BENCHMARKS.md).
An allocator cannot be swapped inside a running process, so ``tunelab train``, ``tunelab tune`` and
``tunelab demo`` re-execute themselves once, at start, with ``LD_PRELOAD`` naming the library; data
parallel ranks and platform jobs inherit it. PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``)
does the same.

``TUNELAB_ALLOCATOR`` chooses: ``auto`` (default: jemalloc when the machine has it and no GPU device is
present, without time-based purging; otherwise the C library's), ``system`` (never preload), ``jemalloc``,
``tcmalloc``, or a path to a malloc library. Named ones that are not installed are reported and the C
library's allocator is used. Linux only (``LD_PRELOAD``). This module imports no torch: it runs before.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from pathlib import Path

ENV = "TUNELAB_ALLOCATOR"
CHOSEN = "TUNELAB_ALLOCATOR_CHOSEN"  # set in the re-executed process: never re-execute twice
COMMANDS = ("train", "tune", "demo")
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # the commands that train
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}


def _dirs() -> list[Path]:
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    out = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        out.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    for base in ("/usr/lib", "/lib", "/usr/local/lib"):
        if arch:
            out.append(Path(base) / arch)
        out.append(Path(base))
    out += [Path("/usr/lib64"), Path("/lib64")]
    return out


def find(name: str, dirs: list[Path] | None = None) -> Path | None:
    """The first installed library file for ``name`` (``jemalloc``/``tcmalloc``), or None."""
    for d in dirs if dirs is not None else _dirs():
        for lib in LIBRARIES[name]:
            p = d / lib
            if p.is_file():
                return p
    return None


def _gpu_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def choose(env: dict | None = None, dirs: list[Path] | None = None) -> tuple[str, Path | None, str]:
    """(allocator name, library to preload or None, why) for this machine and ``TUNELAB_ALLOCATOR``."""
    env = os.environ if env is None else env
    want = (env.get(ENV) or "auto").strip()
    if not sys.platform.startswith("linux"):
        return "system", None, "preloading an allocator is supported on Linux only"
    if want.lower() in ("system", "glibc", "libc", "none", "off"):
        return "system", None, f"{ENV}={want}"
    if want.lower() in LIBRARIES:
        lib = find(want.lower(), dirs)
        if lib is None:
            return "system", None, (f"{ENV}={want} but no {want} library was found (Debian/Ubuntu: apt-get install "
                                    f"{'libjemalloc2' if want.lower() == 'jemalloc' else 'libtcmalloc-minimal4'})")
        return want.lower(), lib, f"{ENV}={want}"
    if want.lower() != "auto":
        p = Path(want).expanduser()
        if not p.is_file():
            return "system", None, f"{ENV}={want} is neither auto, system, jemalloc, tcmalloc nor a library file"
        return _name_of(str(p)), p, f"{ENV}={want}"
    if _gpu_present():
        return "system", None, "a GPU is present (the preloaded allocator is a CPU-training default)"
    lib = find("jemalloc", dirs)  # tcmalloc only when asked for: it kept the same memory but ran slower
    if lib is not None:
        return "jemalloc", lib, "auto: installed on this machine"
    return "system", None, "auto: jemalloc is not installed (Debian/Ubuntu: apt-get install libjemalloc2)"


def _name_of(path: str) -> str:
    base = os.path.basename(path)
    for name in LIBRARIES:
        if name in base:
            return name
    return base


def preload_env(env: dict | None = None, dirs: list[Path] | None = None) -> dict | None:
    """The environment to re-execute with, or None when nothing is to be preloaded (or it already is)."""
    env = dict(os.environ if env is None else env)
    if env.get(CHOSEN):
        return None
    name, lib, why = choose(env, dirs)
    if lib is None:
        return None
    current = env.get("LD_PRELOAD", "")
    if str(lib) in current.replace(":", " ").split():
        return None
    env["LD_PRELOAD"] = f"{lib} {current}".strip() if current else str(lib)
    env[CHOSEN] = name
    if name == "jemalloc":
        # no time-based purging while training: with jemalloc's default 10-second decay the pages of freed
        # temporaries went back to the OS and were faulted in again every step (13% slower than glibc in fp32
        # SFT; without decay glibc's speed at 2.09 GB instead of 2.56, BENCHMARKS.md). The memory freed at the end of training is
        # purged explicitly (purge(), from release_freed_memory). A MALLOC_CONF of the user's is kept.
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def reexec(argv: list[str]) -> None:
    """Re-execute this command line with the chosen allocator preloaded, for the commands that train.
    Returns without doing anything when there is nothing to preload; otherwise does not return."""
    if len(argv) < 2 or argv[1] not in COMMANDS or any(a in ("--help", "-h") for a in argv[2:]):
        return
    env = preload_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # the command line as it was given, interpreter options and how tunelab was named (console script, -m) included
    again = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, "-m", "tunelab", *argv[1:]])[1:]]
    try:
        os.execve(sys.executable, again, env)
    except OSError:  # could not re-execute: go on under the C library's allocator
        return


def loaded() -> str:
    """The allocator this process runs on: ``jemalloc``, ``tcmalloc``, or ``system`` (the C library's)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in LIBRARIES:
        if f"lib{name}" in maps:
            return name
    return "system"


def describe() -> str:
    """One line for the console: what this process runs on and how to change it."""
    now = loaded()
    if now != "system":
        return f"memory allocator: {now} (preloaded; {ENV}=system for the C library's)"
    name, lib, why = choose()
    if lib is not None and not os.environ.get(CHOSEN):  # e.g. training called from Python, not the CLI
        why = f"{name} is installed but this process did not start with it: LD_PRELOAD={lib}"
    return f"memory allocator: the C library's ({why})"


def purge() -> None:
    """Return the preloaded allocator's freed pages to the operating system (jemalloc: purge every arena;
    tcmalloc: release the free page heap). Nothing under the C library's (``release_freed_memory`` trims)."""
    import ctypes

    now = loaded()
    try:
        lib = ctypes.CDLL(None)
        if now == "jemalloc":
            lib.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))  # 4096: MALLCTL_ARENAS_ALL
        elif now == "tcmalloc":
            lib.MallocExtension_ReleaseFreeMemory()
    except (OSError, AttributeError):
        pass
