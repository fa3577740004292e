"""The memory allocator a training process runs on: jemalloc preloaded on CPU machines that have it.

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
COMMANDS = ("train", "tune", "demo")  # the commands that train
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,lg_extent_max_active_fit:20"  # why: preload_env
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}


def _dirs() -> list[Path]:
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    out = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        out.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    if arch:  # Debian/Ubuntu
        out += [Path(base) / arch for base in ("/usr/lib", "/lib", "/usr/local/lib")]
    # 64-bit folders before /usr/lib, which holds the 32-bit libraries on multilib Fedora/RHEL
    out += [Path("/usr/lib64"), Path("/lib64"), Path("/usr/local/lib64"), Path("/usr/lib"), Path("/lib"),
            Path("/usr/local/lib")]
    return out


def find(name: str, dirs: list[Path] | None = None) -> Path | None:
    """The first installed library file for ``name`` (``jemalloc``/``tcmalloc``), or None."""
    for d in dirs if dirs is not None else _dirs():
        for lib in LIBRARIES[name]:
            p = d / lib
            if p.is_file():
                return p
    return None


def _preloaded(env) -> list[str]:
    """LD_PRELOAD's entries (the loader takes spaces or colons between them)."""
    return env.get("LD_PRELOAD", "").replace(":", " ").split()


def _is_allocator(entry: str) -> bool:
    return "malloc" in os.path.basename(entry)  # libjemalloc, libtcmalloc, libmimalloc, ...


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
        p = Path(want).expanduser().resolve()
        if not p.is_file():
            return "system", None, f"{ENV}={want} is neither auto, system, jemalloc, tcmalloc nor a library file"
        if any(c in str(p) for c in " :"):
            return "system", None, f"{ENV}={want}: LD_PRELOAD cannot name a path with a space or a colon"
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
    if any(map(_is_allocator, _preloaded(env))):
        return None  # an allocator the user preloaded (this one included) is kept
    env["LD_PRELOAD"] = f"{lib} {current}".strip() if current else str(lib)
    env[CHOSEN] = name
    if name == "jemalloc":
        # no time-based purging while training: with jemalloc's default 10-second decay the pages of freed
        # temporaries went back to the OS and were faulted in again every step (13% slower than glibc in fp32
        # SFT; without decay glibc's speed at 2.09 GB instead of 2.56, BENCHMARKS.md). The memory freed at the
        # end of training is purged explicitly (purge(), from release_freed_memory). Never purged, freed blocks
        # merge into ever larger free extents, and jemalloc does not split one more than 2^6 = 64 times the size
        # asked for (lg_extent_max_active_fit), so it mapped new memory instead: the demo's SFT at learning rate
        # 8e-4 grew 1.5 -> 5.9 GB resident by step 53 with 1.5 GB in use; 2^20 lets any free extent serve (2.6 GB
        # peak over 70 steps; BENCHMARKS.md). A user's MALLOC_CONF is kept.
        if not env.get("MALLOC_CONF"):
            env["MALLOC_CONF"] = JEMALLOC_CONF
    return env


def without(env: dict) -> dict:
    """``env`` with no preloaded allocator: LD_PRELOAD's malloc libraries, MALLOC_CONF and the re-execution mark
    removed (a baseline measured on the C library's malloc whatever the caller was started with)."""
    out = {k: v for k, v in env.items() if k not in (CHOSEN, "MALLOC_CONF", "LD_PRELOAD")}
    rest = [e for e in _preloaded(env) if not _is_allocator(e)]
    if rest:
        out["LD_PRELOAD"] = " ".join(rest)
    return out


def reexec(argv: list[str]) -> None:
    """Re-execute this command line with the chosen allocator preloaded, for the commands that train.
    Returns without doing anything when there is nothing to preload; otherwise does not return."""
    if len(argv) < 2 or argv[1] not in COMMANDS or any(a in ("--help", "-h") for a in argv[2:]):
        return
    # the command line as it was given (interpreter options, console script or -m or -c), but only when it is
    # this one: main() called in-process with its own argv (a notebook, a test, a wrapper script) or a script
    # read from stdin would run something else, or nothing, again
    orig = list(sys.orig_argv)
    if len(orig) < len(argv) or orig[len(orig) - len(argv) + 1:] != argv[1:] or (len(orig) > 1 and orig[1] == "-"):
        return
    env = preload_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    again = [sys.executable, *orig[1:]]
    try:
        os.execve(sys.executable, again, env)
    except OSError:  # could not re-execute: go on under the C library's allocator
        return


def loaded() -> str:
    """The allocator this process runs on: ``jemalloc``, ``tcmalloc``, another preloaded library's file name,
    or ``system`` (the C library's). A library counts when LD_PRELOAD names it and it is mapped into the process
    (a jemalloc pulled in as some package's dependency is not the process's malloc)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for entry in _preloaded(os.environ):
        base = os.path.basename(entry)
        if base and base in maps:
            return _name_of(base)
    return "system"


def describe() -> str:
    """One line for the console: what this process runs on and how to change it."""
    now = loaded()
    if now != "system":
        return f"memory allocator: {now} (preloaded; {ENV}=system for the C library's)"
    name, lib, why = choose()
    if os.environ.get(CHOSEN):  # chosen and re-executed, yet not mapped: the loader refused it
        return f"memory allocator: the C library's (preloading {os.environ[CHOSEN]} failed; see the loader's message)"
    if lib is not None:  # e.g. training called from Python, not the CLI
        why = f"{name} is installed but this process did not start with it: LD_PRELOAD={lib}"
    return f"memory allocator: the C library's ({why})"


def purge() -> bool:
    """Return the preloaded allocator's freed pages to the operating system (jemalloc: purge every arena;
    tcmalloc: release the free page heap). False under the C library's malloc, which the caller trims itself
    (``release_freed_memory``)."""
    import ctypes

    now = loaded()
    if now == "system":
        return False
    try:
        lib = ctypes.CDLL(None)
        if now == "jemalloc":
            mallctl = lib.mallctl
            mallctl.restype = ctypes.c_int
            mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            mallctl(b"thread.tcache.flush", None, None, None, 0)  # this thread's cached blocks first
            mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096: MALLCTL_ARENAS_ALL (jemalloc >= 4)
        elif now == "tcmalloc":
            lib.MallocExtension_ReleaseFreeMemory()
    except (OSError, AttributeError):
        pass
    return True
