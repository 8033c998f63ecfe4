"""The worker image, built offline from this machine's own Python (`runner images build`).

Its root filesystem is assembled here (the interpreter, the run-time distributions, the project's
packages and the shared libraries they link against) and built `FROM scratch` through the Docker
Engine API, so no registry is needed; it holds no secret and runs as a non-root user.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import io
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROJECT = "runner-orchestrator"
PACKAGES = ("events", "projections", "services", "runner_client")
DEFAULT_IMAGE = "runner-worker:latest"
WORKER_UID = 10001  # the image's `runner` user (a uid of the host's pool may replace it)
VENV = "/opt/venv"
APP = "/app"
WORKDIR = "/work"  # where the worker's own directory is mounted
STDLIB_SKIPPED = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
                  "pydoc_data", "config-3.11-x86_64-linux-gnu"}
LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")
REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")

SOURCE_LABEL = "io.runner.source"  # the digest of what the image was built from

DOCKERFILE = f"""\
FROM scratch
COPY rootfs/ /
ENV PATH={VENV}/bin:/usr/bin PYTHONPATH={APP} PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 HOME=/tmp UV_USE_IO_URING=0
USER {WORKER_UID}:{WORKER_UID}
WORKDIR {WORKDIR}
ENTRYPOINT ["{VENV}/bin/python", "-P", "-m", "services.worker"]
LABEL io.runner.worker="1" {SOURCE_LABEL}="{{digest}}"
"""


def runtime_distributions(root: str = PROJECT) -> list[metadata.Distribution]:
    """`root` and every distribution it needs at run time (its requirements but those of an
    extra, that are installed here), each once."""
    seen: dict[str, metadata.Distribution] = {}
    pending = [root]
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency not installed here
        seen[key] = dist
        for spec in dist.requires or ():
            _, _, marker = spec.partition(";")
            if "extra" not in marker and (name_of := REQUIREMENT_NAME.match(spec)):
                pending.append(name_of.group(1))
    return list(seen.values())


def _files(top: Path, skip: set[str] = frozenset()) -> Iterator[Path]:
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            yield Path(root) / name


def rootfs() -> dict[str, Path]:
    """The image's files: its path → the file of this machine it is a copy of."""
    files: dict[str, Path] = {}
    python = Path(os.path.realpath(sys.executable))
    files[f"/usr/bin/{python.name}"] = python
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _files(stdlib, STDLIB_SKIPPED | {"site-packages", "dist-packages"}):
        files[str(path)] = path
    site = Path(sysconfig.get_paths()["purelib"])
    target_site = f"{VENV}/lib/{stdlib.name}/site-packages"
    for dist in runtime_distributions():
        if dist.metadata["Name"] == PROJECT:
            continue  # installed editable: its packages are copied from the source below
        for entry in dist.files or ():
            path = Path(dist.locate_file(entry))
            if path.is_file() and site in path.parents:
                files[f"{target_site}/{path.relative_to(site)}"] = path
    project = Path(__file__).resolve().parents[2]
    for package in PACKAGES:
        for path in _files(project / package):
            files[f"{APP}/{path.relative_to(project)}"] = path
    for library in shared_libraries([p for p in files.values() if _is_elf(p)]):
        files[str(library)] = Path(os.path.realpath(library))
    return files


def _is_elf(path: Path) -> bool:
    if not (path.suffix == ".so" or ".so." in path.name or path.parent.name == "bin"
            or path.name.startswith("python")):
        return False
    with open(path, "rb") as head:
        return head.read(4) == b"\x7fELF"


def shared_libraries(binaries: list[Path]) -> set[Path]:
    """Every shared library `binaries` load, as this machine's loader resolves them."""
    found: set[Path] = set()
    for start in range(0, len(binaries), 200):
        out = subprocess.run(["ldd", *map(str, binaries[start:start + 200])],
                             capture_output=True, text=True, check=False).stdout
        found.update(Path(m.group(1)) for m in LDD_LINE.finditer(out))
    return found


def source_digest(files: dict[str, Path]) -> str:
    """A digest of `files` (each one's image path, size and modification time): an image built
    from the same files need not be built again."""
    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        stat = path.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def context(files: dict[str, Path]) -> io.BytesIO:
    """The build context: the Dockerfile and `rootfs/` (the files, the venv's shape, /etc's
    users, an empty working directory)."""
    buffer = io.BytesIO()
    python = next(name for name in files if name.startswith("/usr/bin/python"))
    stdlib = Path(sysconfig.get_paths()["stdlib"]).name
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add_bytes(tar, "Dockerfile",
                   DOCKERFILE.replace("{digest}", source_digest(files)).encode())
        for name, path in sorted(files.items()):
            info = tar.gettarinfo(str(path), arcname=f"rootfs{name}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode &= 0o755
            with open(path, "rb") as data:
                tar.addfile(info, data)
        for link, to in ((f"{VENV}/bin/python", python), ("/usr/bin/python3", python),
                         ("/lib64", "usr/lib64"), ("/lib", "usr/lib")):
            if link in ("/lib", "/lib64") and any(n.startswith(link + "/") for n in files):
                continue  # libraries were placed under it as a directory
            info = tarfile.TarInfo(f"rootfs{link}")
            info.type, info.linkname = tarfile.SYMTYPE, to
            tar.addfile(info)
        _add_bytes(tar, f"rootfs{VENV}/pyvenv.cfg",
                   f"home = /usr/bin\ninclude-system-site-packages = false\n"
                   f"version = {sys.version.split()[0]}\n".encode())
        _add_bytes(tar, f"rootfs{VENV}/lib/{stdlib}/site-packages/.keep", b"")
        _add_bytes(tar, "rootfs/etc/passwd",
                   f"root:x:0:0:root:/root:/sbin/nologin\n"
                   f"runner:x:{WORKER_UID}:{WORKER_UID}:runner:/tmp:/sbin/nologin\n"
                   "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n".encode())
        _add_bytes(tar, "rootfs/etc/group",
                   f"root:x:0:\nrunner:x:{WORKER_UID}:\nnogroup:x:65534:\n".encode())
        for directory in ("tmp", WORKDIR.strip("/")):
            info = tarfile.TarInfo(f"rootfs/{directory}")
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
    buffer.seek(0)
    return buffer


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def build(client: Any, tag: str = DEFAULT_IMAGE, *, force: bool = False) -> tuple[str, bool]:
    """Build the worker image as `tag` through `client` (a docker.DockerClient) unless an image
    of that tag was built from the same files (or `force`); returns its id and whether it was
    built now."""
    import docker.errors

    files = rootfs()
    digest = source_digest(files)
    if not force:
        try:
            image = client.images.get(tag)
        except docker.errors.ImageNotFound:
            pass
        else:
            if (image.labels or {}).get(SOURCE_LABEL) == digest:
                return image.id, False
    image, _ = client.images.build(fileobj=context(files), custom_context=True, tag=tag,
                                   rm=True, forcerm=True)
    return image.id, True
