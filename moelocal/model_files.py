"""The files of a model directory. Every file moelocal reads for a model is named inside that
directory and resolves inside it, or, for a Hugging Face cache snapshot (whose files are links
into the repository's blobs/), inside that repository's cache folder: a shard name such as
`../../x` or a link to elsewhere never loads weights from outside. And only regular files are
opened: a FIFO or a device in a file's place would block or never end.
"""

from pathlib import Path, PurePosixPath

from .errors import MoelocalError


def root(model_dir: Path) -> Path:
    """What the files of model_dir may resolve into."""
    model_dir = Path(model_dir).absolute()
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith(
        ("models--", "datasets--", "spaces--")
    ):
        return model_dir.parent.parent.resolve()
    return model_dir.resolve()


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
