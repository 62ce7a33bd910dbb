"""The offline bundle: everything a hospital machine without internet needs to install cxrnode.

``cxrnode bundle --out DIR [--cpu|--gpu]`` builds a folder and a ``.tar.gz`` of it (with its
SHA-256 beside it, in ``sha256sum`` format)::

    cxrnode-<version>-<flavour>-cp311-linux_x86_64/
        install.sh               the same as `cxrnode install --bundle <this folder>`
        INSTALL.md               the site-IT guide: install, check, upgrade, remove
        cxrnode.example.toml     documented example configuration (every key)
        BUNDLE.json              what is inside: version, flavour, platform, wheels, models, build id
        SHA256SUMS               checksum of every other file (`sha256sum -c SHA256SUMS`)
        wheelhouse/              cxrnode's wheel + all runtime dependencies, pinned in requirements.txt
        models/                  extra model bundles given with --model (the default one is in the wheel)

The wheelhouse targets Linux x86_64, CPython 3.11 (manylinux wheels only) and includes pip's own
wheel, so the installer needs neither the network nor Debian's python3-venv/ensurepip. The flavour
picks ONNX Runtime: ``gpu`` ships ``onnxruntime-gpu`` (falls back to the CPU provider when CUDA is
missing), ``cpu`` ships the smaller ``onnxruntime``.

Only the standard library is imported at module level: ``install.sh`` runs the installer
straight from the project's wheel, before any dependency is installed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
BUNDLE_FORMAT = 1
PYTHON_VERSION = "3.11"
# manylinux tags the wheelhouse accepts (glibc 2.28 = RHEL 8 / Debian 10 and newer), newest first
PLATFORM_TAGS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)
# the ONNX Runtime of each flavour; a "-headless" flavour ships no PyQt6 (a node without the
# desktop reviewer)
FLAVOURS = {"gpu": "onnxruntime-gpu", "cpu": "onnxruntime",
            "gpu-headless": "onnxruntime-gpu", "cpu-headless": "onnxruntime"}
ORT_NAMES = ("onnxruntime", "onnxruntime-gpu")
#: the GPU flavours ship the CUDA and cuDNN libraries onnxruntime-gpu needs as pip wheels (its
#: ``cuda`` and ``cudnn`` extras), so an offline site needs only the NVIDIA driver; the runtime
#: loads them with ``onnxruntime.preload_dlls()`` (onnx_models.runtime)
GPU_LIBRARY_EXTRAS = "[cuda,cudnn]"

Progress = Callable[[str], None]


class BundleError(RuntimeError):
    """The bundle cannot be built or is not a valid, intact cxrnode bundle."""


def template_text(name: str) -> str:
    """A file of installer/templates, also when running from the wheel (zipimport)."""
    from importlib.resources import files

    return (files("installer") / "templates" / name).read_text(encoding="utf-8")


def say(message: str) -> None:
    print(message, flush=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _req_name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not m:
        raise BundleError(f"cannot read the requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def project_root(source: str | os.PathLike[str] | None = None) -> Path:
    """The cxrnode source tree to bundle (``source`` or the checkout this module lives in)."""
    candidates = [Path(source)] if source else [Path(__file__).resolve().parent.parent]
    for c in candidates:
        pp = c / "pyproject.toml"
        if pp.is_file():
            name = tomllib.loads(pp.read_text(encoding="utf-8")).get("project", {}).get("name")
            if name == "cxrnode":
                return c.resolve()
    where = source or candidates[0]
    raise BundleError(
        f"{where} is not a cxrnode source tree (no pyproject.toml naming project cxrnode); "
        "run `cxrnode bundle` from a checkout of the repository or pass --source DIR"
    )


def runtime_requirements(source: Path, flavour: str) -> tuple[str, list[str]]:
    """(version, runtime requirements with ONNX Runtime chosen by ``flavour``)."""
    if flavour not in FLAVOURS:
        raise BundleError(f"flavour: expected one of {', '.join(FLAVOURS)}, got {flavour!r}")
    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    reqs: list[str] = []
    ort_spec = ""
    # ONNX Runtime comes from the [cpu] / [gpu] extra (or, in older trees, the dependencies)
    for r in [*project.get("dependencies", []), *extras.get(flavour.removesuffix("-headless"), [])]:
        if _req_name(r) in ORT_NAMES:
            ort_spec = ort_spec or r[len(re.match(r"\s*[A-Za-z0-9._-]+", r).group(0)):]  # type: ignore[union-attr]
            continue
        reqs.append(r)
    gpu_libraries = GPU_LIBRARY_EXTRAS if FLAVOURS[flavour] == "onnxruntime-gpu" else ""
    reqs.append(FLAVOURS[flavour] + gpu_libraries + ort_spec)
    if not flavour.endswith("-headless"):
        reqs += [r for r in extras.get("reviewer", []) if r not in reqs]  # the desktop reviewer
    return str(project["version"]), reqs


def _copy_source(source: Path, dest: Path) -> None:
    """Copy the tree to build from: in a git checkout the tracked and not-ignored files only
    (no training runs, caches or local junk); otherwise everything but the usual caches."""
    if (source / ".git").exists() and shutil.which("git"):
        proc = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                              capture_output=True)
        if proc.returncode == 0:
            for rel in filter(None, proc.stdout.decode().split("\0")):
                src = source / rel
                if src.is_file() and not rel.startswith(("tests/", "benchmarks/")):
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest / rel)
            return
    ignore = shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache",
        ".ruff_cache", ".venv", "venv", "tests", "benchmarks", "*.pyc",
    )
    shutil.copytree(source, dest, ignore=ignore, symlinks=False)


def _run(cmd: list[str], what: str, quiet: bool = True) -> None:
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode != 0:
        detail = ((proc.stdout or "") + (proc.stderr or ""))[-3000:] if quiet else ""
        raise BundleError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{detail}")


def _wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def source_revision(source: Path) -> dict[str, object]:
    """The git commit the bundle is built from and whether the tree had local changes
    (recorded in BUNDLE.json for change control)."""
    if not (source / ".git").exists() or not shutil.which("git"):
        return {"commit": "", "dirty": None}
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True)
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def model_bundles(source: Path) -> list[dict[str, object]]:
    """The model bundles shipped in the source tree (inside the wheel), for BUNDLE.json."""
    out: list[dict[str, object]] = []
    root = source / "onnx_models" / "bundles"
    for d in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        files = sorted(f for f in d.rglob("*") if f.is_file())
        out.append({"name": d.name, "files": len(files), "bytes": sum(f.stat().st_size for f in files)})
    return out


@dataclass(frozen=True)
class BuiltBundle:
    folder: Path
    archive: Path | None
    sha256: str
    version: str
    flavour: str


def build_bundle(
    out: str | os.PathLike[str],
    flavour: str = "gpu",
    source: str | os.PathLike[str] | None = None,
    models: Iterable[str | os.PathLike[str]] = (),
    pack: bool = True,
    force: bool = False,
    progress: Progress = say,
) -> BuiltBundle:
    """Build the offline bundle folder (and ``.tar.gz`` + ``.sha256``) under ``out``: the wheels
    of cxrnode and its run-time dependencies for ``flavour``, the model bundles, the installer,
    ``SHA256SUMS`` and ``BUNDLE.json``.

    Parameters
    ----------
    out:
        The folder to build in.
    flavour:
        ``gpu``, ``cpu``, ``gpu-headless`` or ``cpu-headless`` (which ONNX Runtime is packed;
        a headless bundle ships no PyQt6).
    source:
        The project's source tree (``None``: this one).
    models:
        Extra model bundle folders to ship besides ``default``.
    pack:
        Also write the ``.tar.gz`` and its ``.sha256``.
    force:
        Replace an existing bundle folder.
    progress:
        Called with one line per step.

    Returns
    -------
    BuiltBundle
        The folder, the archive, its SHA-256, the version and the flavour.

    Raises
    ------
    BundleError
        The bundle folder exists (without ``force``) or a ``models`` folder is not a model bundle.
    """
    src = project_root(source)
    version, reqs = runtime_requirements(src, flavour)
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"cxrnode-{version}-{flavour}-cp311-linux_x86_64"
    folder = out_dir / name
    if folder.exists():
        if not force:
            raise BundleError(f"{folder} exists; remove it or pass --force")
        shutil.rmtree(folder)
    extra_models = [Path(m).resolve() for m in models]
    for m in extra_models:
        if not (m / "manifest.json").is_file():
            raise BundleError(f"--model {m}: not a model bundle folder (no manifest.json)")
    wheelhouse = folder / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    steps = 6
    revision = source_revision(src)
    if revision["dirty"]:
        progress(f"warning: {src} has uncommitted changes; BUNDLE.json records commit {str(revision['commit'])[:12]} "
                 "as dirty (build releases from a clean checkout)")
    try:
        progress(f"[1/{steps}] building the cxrnode {version} wheel from {src}")
        with tempfile.TemporaryDirectory(prefix="cxrnode-src-") as tmp:
            copy = Path(tmp) / "src"
            _copy_source(src, copy)
            _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(wheelhouse), str(copy)], "building the cxrnode wheel")
        progress(f"[2/{steps}] downloading {len(reqs)} runtime requirements and their dependencies "
                 f"for Linux x86_64 CPython {PYTHON_VERSION} ({FLAVOURS[flavour]})")
        req_in = folder / "requirements.in"
        req_in.write_text("\n".join([*reqs, "pip"]) + "\n", encoding="utf-8")
        cmd = [sys.executable, "-m", "pip", "download", "--progress-bar", "off", "-d", str(wheelhouse),
               "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
               "--abi", "cp311", "--abi", "abi3", "--abi", "none"]
        for tag in PLATFORM_TAGS:
            cmd += ["--platform", tag]
        _run([*cmd, "-r", str(req_in)], "downloading the wheelhouse")
        req_in.unlink()
        wheels = sorted(wheelhouse.glob("*.whl"))
        pins = []
        for w in wheels:
            n, v = _wheel_name_version(w)
            if n not in ("cxrnode", "pip"):
                pins.append(f"{n}=={v}")
        (wheelhouse / "requirements.txt").write_text(
            "# cxrnode runtime dependencies, pinned to the wheels in this folder\n" + "\n".join(pins) + "\n",
            encoding="utf-8",
        )
        progress(f"        {len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 1e6:.0f} MB")

        progress(f"[3/{steps}] adding install.sh, INSTALL.md, the example configuration and model bundles")
        shutil.copy2(TEMPLATES / "install.sh", folder / "install.sh")
        (folder / "install.sh").chmod(0o755)
        shutil.copy2(TEMPLATES / "cxrnode.example.toml", folder / "cxrnode.example.toml")
        shutil.copy2(TEMPLATES / "INSTALL.md", folder / "INSTALL.md")
        for m in extra_models:
            shutil.copytree(m, folder / "models" / m.name)
        info = {
            "format": BUNDLE_FORMAT,
            "name": "cxrnode",
            "version": version,
            "flavour": flavour,
            "onnxruntime": FLAVOURS[flavour],
            "python": f"cp{PYTHON_VERSION.replace('.', '')}",
            "platform": "linux_x86_64",
            "platform_tags": list(PLATFORM_TAGS),
            "build_id": dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8],
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "source": revision,
            "wheels": [w.name for w in wheels],
            "models_in_wheel": model_bundles(src),
            "extra_models": [m.name for m in extra_models],
        }
        (folder / "BUNDLE.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

        progress(f"[4/{steps}] writing SHA256SUMS")
        write_sha256sums(folder)
        archive: Path | None = None
        digest = ""
        if pack:
            archive = out_dir / f"{name}.tar.gz"
            progress(f"[5/{steps}] packing {archive.name}")
            _pack(folder, archive)
            progress(f"[6/{steps}] checksum {archive.name}.sha256")
            digest = sha256_file(archive)
            Path(f"{archive}.sha256").write_text(f"{digest}  {archive.name}\n", encoding="utf-8")
        progress(f"bundle ready: {folder}" + (f"\n              {archive} (sha256 {digest})" if archive else ""))
        return BuiltBundle(folder, archive, digest, version, flavour)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _pack(folder: Path, archive: Path) -> None:
    from tqdm import tqdm  # a runtime dependency; only needed when building

    files = sorted(p for p in folder.rglob("*"))
    total = sum(p.stat().st_size for p in files if p.is_file())
    tmp = archive.with_name(archive.name + ".part")
    with tarfile.open(tmp, "w:gz", compresslevel=1) as tar, tqdm(
        total=total, unit="B", unit_scale=True, desc="packing", disable=None
    ) as bar:
        tar.add(folder, arcname=folder.name, recursive=False)
        for p in files:
            tar.add(p, arcname=str(Path(folder.name) / p.relative_to(folder)), recursive=False)
            if p.is_file():
                bar.update(p.stat().st_size)
    os.replace(tmp, archive)


def write_sha256sums(folder: Path) -> None:
    lines = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "SHA256SUMS":
            lines.append(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")


def verify_folder(folder: Path) -> dict[str, object]:
    """Check an unpacked bundle against its SHA256SUMS.

    Every file must be listed with its digest, and every listed file present: a file that is not
    in the list (an extra wheel that pip would pick up from the wheelhouse, a second cxrnode
    wheel...) is refused, as are symbolic links and listed paths that leave the folder.

    Parameters
    ----------
    folder:
        The unpacked bundle.

    Returns
    -------
    dict[str, object]
        Its ``BUNDLE.json``.

    Raises
    ------
    BundleError
        A file is missing, extra, a link, outside the folder or does not match its digest.
    """
    sums = folder / "SHA256SUMS"
    info_path = folder / "BUNDLE.json"
    if not sums.is_file() or not info_path.is_file():
        raise BundleError(f"{folder}: not a cxrnode bundle (no SHA256SUMS or BUNDLE.json)")
    listed: set[str] = set()
    for line in sums.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BundleError(f"{folder}: SHA256SUMS has a malformed line {line[:200]!r}")
        p = folder / rel
        if p.is_symlink():
            raise BundleError(f"{folder}: {rel} is a symbolic link; a bundle holds plain files only")
        if not p.is_file():
            raise BundleError(f"{folder}: {rel} is missing (the bundle is incomplete; copy it again)")
        if sha256_file(p) != digest:
            raise BundleError(f"{folder}: {rel} does not match its SHA-256 (the bundle is damaged; copy it again)")
        listed.add(Path(rel).as_posix())
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                raise BundleError(f"{folder}: {rel} is a symbolic link; a bundle holds plain files only")
            if name in filenames and rel != "SHA256SUMS" and rel not in listed:
                raise BundleError(f"{folder}: {rel} is not in SHA256SUMS (not part of the bundle as built); "
                                  "remove it or copy the bundle again")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("format") != BUNDLE_FORMAT or info.get("name") != "cxrnode":
        raise BundleError(f"{folder}: BUNDLE.json has format {info.get('format')!r}; this installer reads {BUNDLE_FORMAT}")
    return dict(info)


def _others_can_change(folder: Path) -> str:
    """Why an account other than root could change files of ``folder`` ("" if none could):
    an entry of the tree, or a folder above it, owned by someone else or writable by group or
    others (sticky folders such as /tmp excepted above the bundle)."""
    import stat

    def weak(p: Path, st: os.stat_result, sticky_ok: bool) -> str:
        if st.st_uid != 0:
            return f"{p} is owned by uid {st.st_uid}"
        if st.st_mode & 0o022 and not (sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            return f"{p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        return ""

    for parent in folder.parents:
        if why := weak(parent, os.stat(parent), True):
            return why
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            if why := weak(p, os.lstat(p), False):
                return why
    return ""


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a .tar.gz refusing members that would land outside ``dest`` (or devices, links
    out of the tree). Python before 3.11.4 (Debian 12 ships 3.11.2) has no extraction filters."""
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        root = dest.resolve()
        for m in tar.getmembers():
            target = (root / m.name).resolve()
            if not target.is_relative_to(root) or not (m.isfile() or m.isdir() or m.issym()):
                raise BundleError(f"{archive}: refusing the archive member {m.name!r}")
            if m.issym() and not (target.parent / m.linkname).resolve().is_relative_to(root):
                raise BundleError(f"{archive}: refusing the link {m.name!r} -> {m.linkname!r}")
        tar.extractall(dest)  # noqa: S202 - every member checked above


def open_bundle(path: str | os.PathLike[str], workdir: Path, progress: Progress = say) -> tuple[Path, dict[str, object]]:
    """An unpacked, verified bundle folder for ``path``. A folder others can change is copied
    first when run as root (what pip installs must be what was verified).

    Parameters
    ----------
    path:
        A bundle folder or a ``.tar.gz`` (checked against the ``.sha256`` beside it, if any).
    workdir:
        Where to unpack (or copy).
    progress:
        Called with one line per step.

    Returns
    -------
    tuple[pathlib.Path, dict]
        The verified folder and its ``BUNDLE.json``.

    Raises
    ------
    BundleError
        Not found, not a folder or ``.tar.gz``, a damaged archive, or a folder that does not
        verify (:func:`verify_folder`).
    """
    p = Path(path).resolve()
    if p.is_dir():
        if os.geteuid() == 0 and (why := _others_can_change(p)):
            # what pip installs later must be what was verified: take a private copy first
            progress(f"note: {why}; installing from a private copy of the bundle")
            copy = workdir / p.name
            shutil.copytree(p, copy, symlinks=True)
            return copy, verify_folder(copy)
        return p, verify_folder(p)
    if not p.is_file():
        raise BundleError(f"bundle {p}: not found")
    if not p.name.endswith((".tar.gz", ".tgz")):
        raise BundleError(f"bundle {p}: expected a bundle folder or a .tar.gz")
    side = Path(f"{p}.sha256")
    if side.is_file():
        expected = side.read_text(encoding="utf-8").split()[0]
        progress(f"checking {p.name} against {side.name}")
        if sha256_file(p) != expected:
            raise BundleError(f"bundle {p}: SHA-256 does not match {side.name} (damaged copy)")
    else:
        progress(f"note: no {side.name} beside the archive; checking the files inside only")
    progress(f"unpacking {p.name}")
    safe_extract(p, workdir)
    tops = [d for d in workdir.iterdir() if d.is_dir()]
    if len(tops) != 1:
        raise BundleError(f"bundle {p}: expected one top-level folder in the archive")
    return tops[0], verify_folder(tops[0])
