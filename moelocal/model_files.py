"""The files of a model directory. Every file moelocal reads for a model is named inside that
directory and resolves inside it, or, for a Hugging Face cache snapshot (whose files are links
into the repository's blobs/), inside that repository's cache folder: a shard name such as
`../../x` or a link to elsewhere never loads weights from outside. And only regular files are
opened: a FIFO or a device in a file's place would block or never end.
"""

from collections.abc import Callable, Container
from pathlib import Path, PurePosixPath

from .errors import MoelocalError

# a model packed by `moelocal convert`
MANIFEST = "moelocal.json"  # format, dtype, quant, each expert's offset and CRC32
RESIDENT = "resident.safetensors"  # the weights that are not routed experts
EXPERTS = "experts.bin"  # one blob per expert, stride bytes apart
PARTIAL = "moelocal.partial"  # a conversion that has not finished


def root(model_dir: Path) -> Path:
    """What the files of model_dir may resolve into."""
    model_dir = Path(model_dir).absolute()
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith(
        ("models--", "datasets--", "spaces--")
    ):
        return model_dir.parent.parent.resolve()
    return model_dir.resolve()


def foreign_files(directory: Path, ours: Container[str] | Callable[[str], bool]) -> list[str]:
    """What in `directory` moelocal did not write: names that are not `ours` (a set of names or
    a test of one), and anything but a regular file under one of our names. The one check before
    replacing or removing a directory moelocal made (a user's work may sit where ours would)."""
    is_ours = ours if callable(ours) else ours.__contains__
    return sorted(p.name for p in Path(directory).iterdir()
                  if not is_ours(p.name) or p.is_symlink() or not p.is_file())  # fmt: skip


def model_file(model_dir: Path, name) -> Path | None:
    """model_dir / name, checked; None when there is no such file."""
    model_dir = Path(model_dir)
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise MoelocalError(f"{model_dir}: file name {name!r} is not a plain name inside the "
                            "model directory")  # fmt: skip
    path = model_dir / name
    if not path.exists() and not path.is_symlink():
        return None
    resolved = path.resolve()
    if not resolved.is_relative_to(root(model_dir)):
        raise MoelocalError(f"{path} resolves to {resolved}, outside the model directory; "
                            "moelocal reads only files inside it")  # fmt: skip
    if not resolved.is_file():
        raise MoelocalError(f"{path}: not a regular file")
    return path
