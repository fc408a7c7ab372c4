"""The embedded default model: shipped inside the package (moelocal/data/default), installed into
the data directory on first use, and checked against its SHA-256 sums at every use, so that a
damaged copy is installed again, never run. Trained by scripts/train_default.py.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from .errors import MoelocalError, reason
from .model_files import foreign_files

SOURCE = Path(__file__).resolve().parent / "data" / "default"
SUMS = "SHA256SUMS.json"  # {file name: sha256}, beside the shipped files


def checksums() -> dict[str, str]:
    try:
        return json.loads((SOURCE / SUMS).read_text())
    except (OSError, ValueError) as e:
        raise MoelocalError(f"the default model shipped with moelocal is missing or damaged "
                            f"({SOURCE / SUMS}: {e}); reinstall moelocal") from None  # fmt: skip


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def damaged(directory: Path, sums: dict[str, str]) -> list[str]:
    """The files of `sums` that are missing from directory or differ from their sum."""
    bad = []
    for name, digest in sums.items():
        path = directory / name
        if not path.is_file() or path.is_symlink() or sha256(path) != digest:
            bad.append(name)
    return bad


def installed(path: Path) -> Path:
    """The default model at `path`, installed (again) first if it is missing or damaged."""
    sums = checksums()
    bad = damaged(path, sums) if path.is_dir() and not path.is_symlink() else None
    if bad == []:
        return path
    if bad:  # damaged, or left by an older moelocal
        changed = ", ".join(bad)
        print(f"moelocal: installing the default model in {path} again ({changed} missing or "
              "changed)", file=sys.stderr)  # fmt: skip
    try:
        install(path, sums)
    except OSError as e:
        raise MoelocalError(f"cannot install the default model in {path}: {reason(e)}") from None
    return path


def install(path: Path, sums: dict[str, str]):
    """Copy the shipped files next to `path`, check the copy, then swap it in. What is at `path`
    is replaced only when every file there is one this model consists of (an earlier or damaged
    install); anything else there is the user's, and is refused, never removed."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise MoelocalError(f"{path} is not a directory moelocal made; move it away to install "
                            "the default model")  # fmt: skip
    if path.is_dir():
        if foreign := foreign_files(path, sums):
            raise MoelocalError(
                f"{path} holds files that are not the default model's "
                f"({', '.join(foreign)}); move them away to install it"
            )
    if bad := damaged(SOURCE, sums):
        raise MoelocalError(f"the default model shipped with moelocal is damaged "
                            f"({', '.join(bad)} in {SOURCE}); reinstall moelocal")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.install-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover
    tmp.mkdir()
    try:
        for name in sums:
            shutil.copyfile(SOURCE / name, tmp / name)
        if bad := damaged(tmp, sums):
            raise MoelocalError(f"copying the default model to {tmp} damaged {', '.join(bad)}; "
                                "check the disk")  # fmt: skip
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.is_dir():
            path.rename(old)
        try:
            tmp.rename(path)
        except OSError:
            if not (path.is_dir() and not damaged(path, sums)):
                raise  # not another process's finished install
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
