"""The ``cpu`` backend: C++ kernels in ``csrc/energy_cpu.cpp``, JIT-built on first use.

**One build per instruction set.** The kernels use ATen's ``at::vec::Vectorized`` whose width is
fixed when the file is compiled, so the source is built as a separate extension per ISA, the way
torch compiles its own CPU kernels once per capability:

==========  ===========================================================  ===========================
ISA         flags                                                         runs on
==========  ===========================================================  ===========================
default     ``-O3`` (plain C++, the compiler's baseline for the platform)  every CPU
avx2        ``-O3 -mavx2 -mfma -mf16c -DCPU_CAPABILITY_AVX2``              x86-64 with AVX2 + FMA
avx512      ``-O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq ...``        x86-64 with AVX-512 F/BW/VL/DQ
==========  ===========================================================  ===========================

At load the widest ISA the running CPU supports is chosen (``torch.backends.cpu.get_cpu_capability()``
checked against ``/proc/cpuinfo``); ``MINACTION_CPU_ISA=default|avx2|avx512`` forces one, and forcing
an ISA this CPU lacks is an error, never a crash. ``-march=native`` is never used by default, so a
build is valid on every CPU with its ISA. ``MINACTION_CPU_CFLAGS`` replaces the optimisation flags
(``-O3``); a custom-flags build is also keyed by this CPU's model and flags, since such flags may
target this CPU only.

**The build cache.** The extension name is ``minaction_cpu_<isa>_<key>`` where ``key`` hashes the
source, the flags, the ISA, the torch version and the Python version, in ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions/...``). A finished build writes ``minaction_build.json`` next to its
``.so``; when that file matches, the library is loaded directly with ``torch.ops.load_library``,
without taking torch's build lock, so a read-only cache folder works. Otherwise the build runs
(``minaction: building the CPU kernels (first use: a few minutes ...) in <dir>`` is printed once on
stderr). Every build holds an ``fcntl.flock`` on ``lock.owner`` in its folder for as long as it
runs (the kernel drops it when the process dies, even by ``kill -9``, once ninja and its compile jobs,
which inherit it, have exited too; they stop with the process, :func:`minaction.backends.loader.run_build`). So a torch ``lock`` file
found while that flock is free was left by a killed build: it is removed, saying so, and the
build goes on. A build that finds the flock held waits for it, saying so at once, for at most
``MINACTION_BUILD_LOCK_TIMEOUT`` seconds (default 900); then the load fails with an error naming
the file, and the automatic backend choice falls back to ``reference`` with a warning that says
so. Where ``fcntl`` does not exist, a ``lock`` file is waited on the same way.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import ACT_CODES, source_dir  # noqa: F401  (source_dir is part of this module's API)
from .loader import Once, load_extension, load_library

_once = Once()
_state: dict = {}
OPS = None  # torch.ops.minaction once this backend's kernels are loaded (read without a lock: compile traces it)

ISAS = ("default", "avx2", "avx512")
_ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
# /proc/cpuinfo flags each ISA build needs
_ISA_CPU_FLAGS = {"default": set(), "avx2": {"avx2", "fma", "f16c"},
                  "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}}
MARKER = "minaction_build.json"
OWNER = "lock.owner"  # flock-ed by every build for as long as it runs (see the module docstring)
DEFAULT_LOCK_TIMEOUT = 900.0  # a first build on a loaded 2-core machine took 8-9 min


class BuildLockTimeout(RuntimeError):
    """A build lock stayed in place longer than ``MINACTION_BUILD_LOCK_TIMEOUT``."""


def _cpuinfo() -> tuple[str, set]:
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def _cpu_fingerprint() -> str:
    model, flags = _cpuinfo()
    return hashlib.sha1((platform.machine() + model + " ".join(sorted(flags))).encode()).hexdigest()[:8]


def cpu_isa() -> str:
    """The widest ISA build this CPU can run (``default``, ``avx2`` or ``avx512``)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"
    cap = torch.backends.cpu.get_cpu_capability().lower()
    _, flags = _cpuinfo()
    for isa in ("avx512", "avx2"):
        if cap.startswith(isa) and (not flags or _ISA_CPU_FLAGS[isa] <= flags):
            return isa
    if cap.startswith("avx512") and (not flags or _ISA_CPU_FLAGS["avx2"] <= flags):
        return "avx2"
    return "default"


def chosen_isa() -> str:
    """The ISA build this process loads: ``MINACTION_CPU_ISA`` if set (and runnable here), else :func:`cpu_isa`."""
    want = os.environ.get("MINACTION_CPU_ISA", "").strip().lower()
    best = cpu_isa()
    if want in ("", "auto"):
        return best
    if want not in ISAS:
        raise ValueError(f"MINACTION_CPU_ISA={want!r} is not one of auto, {', '.join(ISAS)}")
    if ISAS.index(want) > ISAS.index(best):
        raise RuntimeError(f"MINACTION_CPU_ISA={want} was requested but this CPU supports at most {best} "
                           f"(torch reports capability {torch.backends.cpu.get_cpu_capability()}); "
                           f"a {want} build would crash here with an illegal instruction")
    return want


def _flags(isa: str) -> list:
    env = os.environ.get("MINACTION_CPU_CFLAGS")
    opt = env.split() if env else ["-O3"]
    return opt + _ISA_FLAGS[isa] + ["-fopenmp"]


def build_spec(isa: str | None = None) -> dict:
    """Name, flags and cache key of the extension build for ``isa`` (default: :func:`chosen_isa`)."""
    isa = isa or chosen_isa()
    src = source_dir() / "energy_cpu.cpp"
    if not src.exists():
        raise FileNotFoundError(f"C++ source not found: {src}")
    flags = _flags(isa)
    h = hashlib.sha1()
    h.update(src.read_bytes())
    # the Python version too: the extension links against libpython's API (a 3.11 build does not load under 3.13),
    # and one cache folder may serve several Pythons with the same torch version
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    h.update(("\0".join(flags) + "\0" + isa + "\0" + torch.__version__ + "\0" + py).encode())
    if os.environ.get("MINACTION_CPU_CFLAGS"):  # custom flags may target this very CPU (-march=native)
        h.update(_cpu_fingerprint().encode())
    key = h.hexdigest()[:12]
    name = f"minaction_cpu_{isa}_{key}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or _default_root())
    return {"isa": isa, "flags": flags, "key": key, "name": name, "source": src, "dir": root / name,
            "so": root / name / f"{name}.so"}


def _default_root() -> str:
    from torch.utils import cpp_extension

    return cpp_extension.get_default_build_root()


def lock_timeout() -> float:
    env = os.environ.get("MINACTION_BUILD_LOCK_TIMEOUT", "").strip()
    if not env:
        return DEFAULT_LOCK_TIMEOUT
    try:
        return float(env)
    except ValueError:
        raise ValueError(f"MINACTION_BUILD_LOCK_TIMEOUT={env!r} is not a number of seconds") from None


def _lock_message(lock: Path, waited: float) -> str:
    return (f"minaction: the C++ build lock {lock} has been held for {waited:.0f} s "
            f"(MINACTION_BUILD_LOCK_TIMEOUT). A build killed mid-way leaves it behind: if no other process "
            f"is building minaction's CPU kernels, delete {lock} (or the whole folder {lock.parent}) and retry")


def wait_for_lock(lock: Path, timeout: float, poll: float = 0.2) -> None:
    """Wait until ``lock`` disappears; raise :class:`BuildLockTimeout` naming it after ``timeout`` s."""
    t0 = time.monotonic()
    while lock.exists():
        waited = time.monotonic() - t0
        if waited >= timeout:
            raise BuildLockTimeout(_lock_message(lock, waited))
        time.sleep(min(poll, max(timeout - waited, 0.01)))


def _marker_ok(spec: dict) -> bool:
    try:
        data = json.loads((spec["dir"] / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return data.get("name") == spec["name"] and data.get("key") == spec["key"] and spec["so"].is_file()


def _say_building(spec: dict) -> None:
    if not _state.get("announced"):
        _state["announced"] = True
        print(f"minaction: building the CPU kernels (first use: a few minutes; 3-10 min on 2 cores, longer under "
              f"load) in {spec['dir']}", file=sys.stderr, flush=True)


def _hold_owner(spec: dict, timeout: float):
    """The open ``lock.owner`` file of the build folder with an exclusive ``flock`` on it, taken within
    ``timeout`` seconds (saying at once when another process holds it); None where there is no fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    path = spec["dir"] / OWNER
    f = open(path, "a+")
    t0 = time.monotonic()
    said = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            waited = time.monotonic() - t0
            if not said:
                said = True
                print(f"minaction: waiting for another process's build of the CPU kernels (it holds {path}; at "
                      f"most {timeout:.0f} s, MINACTION_BUILD_LOCK_TIMEOUT)", file=sys.stderr, flush=True)
            if waited >= timeout:
                f.close()
                raise BuildLockTimeout(
                    f"minaction: another process has been building the CPU kernels for {waited:.0f} s (it holds "
                    f"the flock on {path}; MINACTION_BUILD_LOCK_TIMEOUT): wait for it to finish, or raise the "
                    f"time-out") from None
            time.sleep(min(0.2, max(timeout - waited, 0.01)))


def _build(spec: dict) -> None:
    """Build with ``torch.utils.cpp_extension`` (ninja) while holding the folder's owner flock; a
    torch ``lock`` left by a killed build is removed, and no lock is waited on for ever."""
    timeout = lock_timeout()
    try:
        spec["dir"].mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the CPU kernels' build folder {spec['dir']} ({exc.strerror or exc}): set "
                      f"TORCH_EXTENSIONS_DIR to a writable folder") from None
    owner = _hold_owner(spec, timeout)
    try:
        if owner is not None and _marker_ok(spec):  # another process built it while we waited
            load_library(spec["so"])
            return
        _build_locked(spec, timeout, stale_ok=owner is not None, owner=owner)
    finally:
        if owner is not None:
            owner.close()  # releases the flock


def _build_locked(spec: dict, timeout: float, stale_ok: bool, owner=None) -> None:
    from torch.utils import cpp_extension

    lock = spec["dir"] / "lock"
    if lock.exists() and stale_ok:  # every live build holds the owner flock, which we hold: a killed build left it
        print(f"minaction: removing {lock}, left by a build of the CPU kernels that was killed", file=sys.stderr,
              flush=True)
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
    if lock.exists():
        print(f"minaction: waiting for another process's build of the CPU kernels (lock {lock}; at most "
              f"{timeout:.0f} s, MINACTION_BUILD_LOCK_TIMEOUT; if no other process is building, a killed build "
              f"left it: delete it)", file=sys.stderr, flush=True)
    wait_for_lock(lock, timeout)
    _say_building(spec)
    _ninja_on_path()
    # cpp_extension waits on its lock without a limit; give the baton it creates our time-out
    base = getattr(cpp_extension, "FileBaton", None)
    patched = False
    if base is not None:
        class _TimedBaton(base):
            def wait(self):
                wait_for_lock(Path(self.lock_file_path), timeout)

        cpp_extension.FileBaton = _TimedBaton
        patched = True
    try:
        # ninja and its compile jobs inherit the owner flock: a next build waits until the last of them has exited
        # (they stop with this process: loader.run_build), never starting a second ninja in the folder
        load_extension(spec["name"], [spec["source"]], extra_cflags=spec["flags"], build_directory=str(spec["dir"]),
                       keep_fds=(owner.fileno(),) if owner is not None else ())
    finally:
        if patched:
            cpp_extension.FileBaton = base
    try:
        (spec["dir"] / MARKER).write_text(json.dumps({"name": spec["name"], "key": spec["key"],
                                                      "isa": spec["isa"], "flags": spec["flags"],
                                                      "torch": torch.__version__}))
    except OSError:
        pass


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH. pip installs it into the environment's ``bin`` folder, which is not on
    PATH when the environment is not activated (``.venv/bin/python ...``, as the README runs it): put that folder
    (and the ninja package's own) on PATH for the build, where no ninja is found otherwise."""
    from torch.utils import cpp_extension

    if cpp_extension.is_ninja_available():
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package: its BIN_DIR holds the binary

        dirs.insert(0, str(getattr(ninja, "BIN_DIR", "")))
    except ImportError:
        pass
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d] + [os.environ.get("PATH", "")])


def _load():
    global OPS
    spec = build_spec()
    if _marker_ok(spec):
        load_library(spec["so"])  # a finished build: no lock, works read-only
    else:
        _build(spec)
    _state["spec"] = spec
    OPS = torch.ops.minaction
    return OPS


def built() -> bool:
    """Whether the extension this process would load is built already (nothing is built or loaded here)."""
    try:
        return _marker_ok(build_spec())
    except Exception:  # noqa: BLE001 - no source, an unreadable cache: not built
        return False


def load():
    """Build (once) and load the C++ extension; return ``torch.ops.minaction`` (whose CPU kernels it holds).
    A failure is remembered: one failed build is not retried in this process."""
    return OPS if OPS is not None else _once(_load)


def loaded_isa() -> str | None:
    """The ISA of the loaded build (asked from the library itself), or None before :func:`load`."""
    if OPS is None:
        return None
    fn = ctypes.CDLL(str(_state["spec"]["so"])).minaction_cpu_isa
    fn.restype = ctypes.c_char_p
    return fn().decode().lower()


def available(device: torch.device):
    if device.type != "cpu":
        return False, f"the C++ backend runs on CPU tensors only, not {device.type}"
    try:
        load()
    except Exception as exc:
        return False, f"the C++ extension could not be built or loaded ({type(exc).__name__}: {exc})"
    return True, f"C++ extension built and loaded ({_state['spec']['isa']} build)"


# ----------------------------------------------------------------------------- backend primitives
def linear_forward(x, w, b, act, p, scale, keep_z):
    y, z, e = load().linear_fwd(x, w, b, ACT_CODES[act], p, scale, keep_z)
    return y, z, e


def linear_backward(gy, ge, x, w, y, z, act, p, scale, need_x, need_w, need_b):
    return load().linear_bwd(gy, ge, x, w, y, z, ACT_CODES[act], p, scale, need_x, need_w, need_b)


def act_forward(z, act, p, scale, keep_z):
    return load().act_fwd(z, ACT_CODES[act], p, scale, keep_z)


def act_backward(gy, ge, y, z, act, p, scale):
    return load().act_bwd(gy, ge, y, z, ACT_CODES[act], p, scale)


def layer(x, w, b, act, p, unit_scale, penalty=0.0):
    """The whole layer, ``minaction::layer`` (one C++ op with a C++ autograd formula; its backward
    adds ``penalty * dE/d(inputs)`` itself). ``unit_scale`` is 1, or 1/N for the mean over units:
    the op divides by the rows (``x``'s ``M``) itself."""
    return (OPS if OPS is not None else load()).layer(x, w, b, ACT_CODES[act], p, unit_scale, penalty)


def epilogue_pool2(z, act, p, mean, groups, dims, penalty=0.0):
    """``epilogue`` followed by ``max_pool2`` over the last ``dims`` dims, one C++ op
    (``minaction::epilogue_pool2``, float32/float64): returns the pooled activation and ``e``."""
    return (OPS if OPS is not None else load()).epilogue_pool2(z, ACT_CODES[act], p, mean, groups, dims, penalty)


def conv_pool2(x, w, b, act, p, mean, penalty=0.0):
    """A CNN's first image block, ``minaction::conv_pool2`` (one C++ op with a C++ autograd formula):
    conv2d of one input channel (padding k // 2), the activation, its energy and a max-pool by 2."""
    return (OPS if OPS is not None else load()).conv_pool2(x, w, b, ACT_CODES[act], p, mean, penalty)


def epilogue(z, act, p, mean, groups, penalty=0.0):
    """``activation_energy``'s epilogue, ``minaction::epilogue`` (one C++ op with a C++ autograd
    formula): ``z [B, ...]`` (``groups`` 0, ``e`` 0-dim) or ``[G, B, ...]`` (``groups`` G, ``e [G]``);
    its backward adds ``penalty`` to each energy's gradient."""
    return (OPS if OPS is not None else load()).epilogue(z, ACT_CODES[act], p, mean, groups, penalty)
