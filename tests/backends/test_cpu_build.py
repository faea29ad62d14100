"""Building and loading the C++ extension: a stale lock must not hang, a finished build loads
without the lock (read-only cache folders), the first build says so once on stderr.

Timeouts here are hang guards, not speed assertions.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import minaction
from minaction.backends import cpu as cpu_backend


@pytest.fixture(scope="module")
def real_build():
    """The build this process uses (built once per test session), to copy into temp caches."""
    ok, why = minaction.backends.select.available("cpu", "cpu")
    if not ok:
        pytest.fail(f"the cpu backend must build on this machine: {why}")
    return cpu_backend._state["spec"]


def _sub(code, env_extra, timeout=600):
    env = dict(os.environ, **env_extra)
    env.pop("MINACTION_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_wait_for_lock_times_out_naming_the_file(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    with pytest.raises(cpu_backend.BuildLockTimeout) as ei:
        cpu_backend.wait_for_lock(lock, timeout=0.3, poll=0.05)
    msg = str(ei.value)
    assert str(lock) in msg and "delete" in msg and "MINACTION_BUILD_LOCK_TIMEOUT" in msg
    lock.unlink()
    cpu_backend.wait_for_lock(lock, timeout=0.3)  # no lock: returns at once


def test_lock_timeout_env(monkeypatch):
    monkeypatch.delenv("MINACTION_BUILD_LOCK_TIMEOUT", raising=False)
    assert cpu_backend.lock_timeout() == cpu_backend.DEFAULT_LOCK_TIMEOUT
    monkeypatch.setenv("MINACTION_BUILD_LOCK_TIMEOUT", "2.5")
    assert cpu_backend.lock_timeout() == 2.5
    monkeypatch.setenv("MINACTION_BUILD_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MINACTION_BUILD_LOCK_TIMEOUT"):
        cpu_backend.lock_timeout()


def test_a_build_in_progress_elsewhere_is_waited_for_then_falls_back_naming_it(tmp_path, monkeypatch):
    """Another process building (it holds the owner flock): the layer waits, says so at once, and after the
    time-out runs on `reference` with a warning that names the lock, instead of waiting for ever (the old
    behaviour: FileBaton.wait without limit)."""
    import fcntl

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    spec = cpu_backend.build_spec()
    spec["dir"].mkdir(parents=True)
    (spec["dir"] / "lock").write_text("")  # the live build's torch baton
    holder = open(spec["dir"] / cpu_backend.OWNER, "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)  # this process plays the other builder
    code = """
        import warnings, torch, minaction
        from minaction.backends import cpu
        spec = cpu.build_spec()
        print("LOCK", spec["dir"] / cpu.OWNER)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            layer = minaction.nn.EnergyLinear(8, 4)
            y = layer(torch.randn(3, 8))
        print("BACKEND", minaction.backends.select.select(torch.device("cpu")))
        for m in w:
            print("WARN", m.message)
    """
    try:
        r = _sub(code, {"TORCH_EXTENSIONS_DIR": str(tmp_path), "MINACTION_BUILD_LOCK_TIMEOUT": "1"}, timeout=300)
    finally:
        holder.close()
    assert r.returncode == 0, r.stderr[-3000:]
    lock = next(line[5:] for line in r.stdout.splitlines() if line.startswith("LOCK "))
    assert "BACKEND reference" in r.stdout
    warn = "\n".join(line for line in r.stdout.splitlines() if line.startswith("WARN"))
    assert lock in warn and "another process" in warn, r.stdout
    assert "building the CPU kernels (first use" not in r.stderr  # nothing was built
    # said at once, not after the wait: a process behind a stale lock printed nothing for 10 minutes
    assert f"waiting for another process's build of the CPU kernels (it holds {lock}" in r.stderr, r.stderr[-2000:]
    assert (spec["dir"] / "lock").exists()  # a live build's baton is left alone


def test_a_lock_left_by_a_killed_build_is_removed_and_the_build_goes_on(tmp_path, monkeypatch, capsys):
    """torch's `lock` baton is a plain file: a build killed mid-way (Ctrl-C, a CI job cancelled) left it, and the
    next process waited 15 minutes and fell back to the slow backend. Every build now holds the owner flock, which
    dies with its process: a `lock` found with the flock free is stale, and is removed."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("MINACTION_BUILD_LOCK_TIMEOUT", "0.5")
    spec = cpu_backend.build_spec()
    spec["dir"].mkdir(parents=True)
    (spec["dir"] / "lock").write_text("")
    seen = []

    def fake_load(name, sources, extra_cflags, build_directory, **kw):
        seen.append(os.path.exists(os.path.join(build_directory, "lock")))

    monkeypatch.setattr(cpu_backend, "load_extension", fake_load)
    cpu_backend._build(spec)
    assert seen == [False]
    assert "left by a build of the CPU kernels that was killed" in capsys.readouterr().err


def test_the_build_key_names_the_python_version(monkeypatch):
    """The extension links against the Python API: a build made under one Python must not be loaded by
    another (a 3.11 build under 3.13 failed with an undefined symbol, and its marker kept it from rebuilding)."""
    import types

    key = cpu_backend.build_spec("default")["key"]
    fake = types.SimpleNamespace(version_info=(3, 99, 0), stderr=sys.stderr)
    monkeypatch.setattr(cpu_backend, "sys", fake)
    assert cpu_backend.build_spec("default")["key"] != key


def test_ninja_of_an_unactivated_environment_is_found(monkeypatch):
    """`.venv/bin/python` without activation: pip's ninja is in .venv/bin, which is not on PATH, and torch
    refused to build ("Ninja is required"). The build puts that folder on PATH first."""
    import os

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setenv("PATH", "/nonexistent")
    cpu_backend._ninja_on_path()
    parts = os.environ["PATH"].split(os.pathsep)
    assert os.path.dirname(sys.executable) in parts and parts[-1] == "/nonexistent"
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("PATH", "/nonexistent")
    cpu_backend._ninja_on_path()
    assert os.environ["PATH"] == "/nonexistent"  # a ninja on PATH: untouched


def test_an_unwritable_build_folder_names_torch_extensions_dir(tmp_path, monkeypatch):
    spec = cpu_backend.build_spec("default")
    blocker = tmp_path / "file"
    blocker.write_text("")
    spec = {**spec, "dir": blocker / "sub"}  # a folder under a regular file: mkdir fails for any user
    with pytest.raises(OSError, match="TORCH_EXTENSIONS_DIR"):
        cpu_backend._build(spec)


def test_lock_taken_during_the_build_call_also_times_out(tmp_path, monkeypatch):
    """The lock may appear between our check and torch's: torch's own wait gets the time-out too."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("MINACTION_BUILD_LOCK_TIMEOUT", "0.5")
    spec = cpu_backend.build_spec()

    def fake_load(name, sources, extra_cflags, build_directory, **kw):
        lock = os.path.join(build_directory, "lock")
        open(lock, "w").close()  # another process "holds" it
        cpp_extension.FileBaton(lock).wait()  # what _jit_compile does when try_acquire fails
        raise AssertionError("the wait should have timed out")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    original = cpp_extension.FileBaton
    with pytest.raises(cpu_backend.BuildLockTimeout, match="lock"):
        cpu_backend._build(spec)
    assert cpp_extension.FileBaton is original  # restored


def _copy_build(spec, root: Path) -> Path:
    dst = root / spec["name"]
    shutil.copytree(spec["dir"], dst, ignore=shutil.ignore_patterns("lock"))
    return dst


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_built_says_whether_a_build_is_there_without_building(tmp_path, monkeypatch):
    """The study's forkserver loads the kernels only if they are built (the driver builds them after its data
    check): built() answers from the build marker, and neither builds nor locks."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_backend.built() is False
    assert list(tmp_path.iterdir()) == []  # nothing built, no lock
    spec = cpu_backend.build_spec()
    spec["dir"].mkdir()
    spec["so"].write_bytes(b"")
    (spec["dir"] / cpu_backend.MARKER).write_text(json.dumps({"name": spec["name"], "key": spec["key"]}))
    assert cpu_backend.built() is True


def test_existing_build_loads_without_lock_or_writes(real_build, tmp_path):
    """A cache folder we cannot write to (simulated: tests run as root, which ignores permission
    bits, so every write path is made to fail) that holds a finished build for this exact source,
    flags and ISA: the kernels load from it; the lock is never taken, nothing is written."""
    folder = _copy_build(real_build, tmp_path)
    for p in folder.rglob("*"):
        p.chmod(0o444 if p.is_file() else 0o555)
    folder.chmod(0o555)
    before = _snapshot(tmp_path)
    code = """
        import os, torch, minaction
        from torch.utils import cpp_extension, file_baton
        def refuse(*a, **k):
            raise PermissionError("read-only cache folder: no build, no lock")
        cpp_extension.load = refuse
        file_baton.FileBaton.try_acquire = refuse
        cpp_extension.FileBaton.try_acquire = refuse
        real_open = os.open
        def ro_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(f"read-only: {path}")
            return real_open(path, flags, *a, **k)
        os.open = ro_open
        x = torch.randn(3, 8)
        layer = minaction.nn.EnergyLinear(8, 4)
        layer(x)
        print("BACKEND", minaction.backends.select.select(torch.device("cpu")))
        from minaction.backends import cpu
        print("ISA", cpu.loaded_isa())
    """
    try:
        r = _sub(code, {"TORCH_EXTENSIONS_DIR": str(tmp_path)}, timeout=300)
    finally:
        folder.chmod(0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "BACKEND cpu" in r.stdout, r.stdout + r.stderr[-2000:]
    assert f"ISA {real_build['isa']}" in r.stdout
    assert "building the CPU kernels" not in r.stderr
    assert _snapshot(tmp_path) == before  # no lock file, no marker rewrite, nothing


def test_incomplete_build_is_not_loaded_directly(real_build, tmp_path, monkeypatch):
    """A .so without the completion marker (a build killed before it finished) goes through the
    locked build path, which says it is building, once."""
    folder = _copy_build(real_build, tmp_path)
    (folder / cpu_backend.MARKER).unlink()
    code = """
        import torch, minaction
        from torch.utils import cpp_extension
        from minaction.backends import cpu
        calls = []
        real = cpp_extension.load
        def counting_load(*a, **k):
            calls.append(1)
            return real(*a, **k)  # ninja finds the objects up to date only if sources match; fine either way
        cpp_extension.load = counting_load
        cpu.load()
        print("CALLS", len(calls))
    """
    r = _sub(code, {"TORCH_EXTENSIONS_DIR": str(tmp_path)}, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CALLS 1" in r.stdout
    assert r.stderr.count("minaction: building the CPU kernels (first use: a few minutes") == 1
    assert str(folder) in r.stderr
    assert (folder / cpu_backend.MARKER).exists()
    # and the next process loads it directly, silently
    r2 = _sub(code, {"TORCH_EXTENSIONS_DIR": str(tmp_path)}, timeout=300)
    assert r2.returncode == 0 and "CALLS 0" in r2.stdout and "building" not in r2.stderr


def test_once_loader_runs_once_and_remembers_a_failure():
    from minaction.backends.loader import Once

    calls = []

    def ok():
        calls.append(1)
        return "ops"

    once = Once()
    assert once(ok) == "ops" and once(ok) == "ops" and len(calls) == 1

    def bad():
        calls.append(2)
        raise RuntimeError("build failed")

    failing = Once()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="build failed"):
            failing(bad)
    assert calls.count(2) == 1  # a failed build is not retried in the same process


@pytest.mark.parametrize("isa", cpu_backend.ISAS)
def test_every_isa_build_compiles_on_any_cpu(isa):
    """Every ISA variant of the C++ source compiles here, whether or not this CPU could run it: the
    AVX-512 build was once broken (a missing include that AVX2's headers happened to pull in) and no
    AVX2 machine noticed, because a build it cannot run was never attempted. ``-fsyntax-only``
    instantiates every template the dispatch reaches, which is where such errors live."""
    import shutil
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    spec = cpu_backend.build_spec(isa)
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-fPIC", "-DTORCH_EXTENSION_NAME=minaction_isa_check",
           "-DTORCH_API_INCLUDE_EXTENSION_H"] + [f"-isystem{p}" for p in include_paths()] + \
          [f"-isystem{sysconfig.get_paths()['include']}"] + spec["flags"] + [str(spec["source"])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)  # hang guard only
    assert r.returncode == 0, f"the {isa} build does not compile:\n" + r.stderr[-4000:]


# ----------------------------------------------------------------------------- the build tool dies with its driver
HANG_GUARD = 300  # seconds: a guard against a hang only


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has stopped running
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait(cond, what):
    import time

    end = time.monotonic() + HANG_GUARD
    while not cond():
        assert time.monotonic() < end, f"hang guard: {what}"
        time.sleep(0.05)


def _ninja_driver(tmp_path):
    """A folder whose build.ninja runs one job that records its pid, its parent's (ninja) and what its fd
    KEEP_FD is, then waits for ever; and a driver process that runs ninja there through run_build, holding
    a file open as keep_fds, and stops on SIGTERM by raising (as the `minaction` command does)."""
    if not sys.platform.startswith("linux") or shutil.which("ninja") is None:
        pytest.skip("needs Linux and ninja")
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent("""
        import json, os, sys, threading
        fd = int(os.environ["KEEP_FD"])
        try:
            kept = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            kept = None
        tmp = sys.argv[1] + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "ninja": os.getppid(), "kept": kept}, f)
        os.replace(tmp, sys.argv[1])  # the event the test waits on
        threading.Event().wait()  # a compile that takes for ever
    """))
    (tmp_path / "build.ninja").write_text(f"rule job\n  command = {sys.executable} {job} {tmp_path / 'started'}\n"
                                          f"build out.txt: job\n")
    driver = textwrap.dedent("""
        import fcntl, os, signal, subprocess, sys
        from minaction.backends.loader import run_build

        def stop(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, stop)
        lock = open(sys.argv[2], "a+")
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.environ["KEEP_FD"] = str(lock.fileno())
        try:
            run_build(["ninja"], cwd=sys.argv[1], check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      keep_fds=(lock.fileno(),))
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver, str(tmp_path), str(tmp_path / "lock.owner")],
                            stderr=subprocess.PIPE, start_new_session=True)
    started = tmp_path / "started"
    _wait(lambda: started.exists() or proc.poll() is not None, "the job did not start")
    assert started.exists(), proc.stderr.read().decode()[-2000:]
    return proc, json.loads(started.read_text())


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_killed_driver_leaves_no_build_running(tmp_path, how):
    """Killing the driver during the first build left ninja's compile jobs running (SIGTERM: subprocess.run
    SIGKILLed ninja alone, and its jobs, each in a process group of its own, went on) or ninja itself (kill -9),
    and the next run started a second build in the same folder. Now ninja gets SIGTERM (passed on to its jobs)
    when the driver stops or dies, and the jobs hold the build folder's lock (keep_fds) while they run."""
    import signal

    proc, info = _ninja_driver(tmp_path)
    try:
        assert info["kept"] == str(tmp_path / "lock.owner")  # the lock's fd reached the compile job
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(HANG_GUARD)
        assert proc.returncode == (130 if how == "SIGTERM" else -signal.SIGKILL), proc.stderr.read()[-2000:]
        _wait(lambda: _gone(info["ninja"]), "ninja outlived its driver")
        _wait(lambda: _gone(info["pid"]), "the compile job outlived its driver")
    finally:
        for pid in (info["pid"], info["ninja"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_gelu_table_in_the_source_is_what_its_generator_writes():
    """The AVX-512 build's kPhiTab (csrc/energy_cpu.cpp) is regenerated by csrc/tools/phi_table.py, and its
    float evaluation stays within 1 ulp of 0.5 of the normal CDF."""
    pytest.importorskip("scipy")
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("phi_table", root / "csrc" / "tools" / "phi_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = mod.coefficients()
    src = (root / "csrc" / "energy_cpu.cpp").read_text()
    start = src.index("kPhiTab[6][16] = {\n") + len("kPhiTab[6][16] = {\n")
    assert src[start:].split("\n")[:6] == mod.rows(table)
    assert mod.max_error(table) < 6e-8
