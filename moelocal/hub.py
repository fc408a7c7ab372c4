"""Where models are: a local directory, moelocal's data directory, or the local Hugging Face cache.

Nothing here touches the network; downloading is `moelocal pull`'s job.
"""

import os
from pathlib import Path

from .errors import MoelocalError

DEFAULT_MODEL = "default"


def data_dir() -> Path:
    """$MOELOCAL_HOME, else cache/ in a source checkout, else the user's cache directory."""
    if os.environ.get("MOELOCAL_HOME"):
        return Path(os.environ["MOELOCAL_HOME"]).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "cache").is_dir():
        return checkout / "cache"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "moelocal"


def default_model_dir() -> Path:
    """The embedded default model, created on first use (random weights, a second or two)."""
    path = data_dir() / "models" / DEFAULT_MODEL
    if not (path / "config.json").is_file():
        from .synthetic import make_checkpoint

        make_checkpoint(path, "default", seed=0, replace=False)
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MoelocalError(f"{path} is a file; MODEL is a model directory or a hub id")
        return path
    in_data_dir = data_dir() / "models" / str(model)
    if (in_data_dir / "config.json").is_file():
        return in_data_dir
    name = str(model)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return cached_snapshot(name)
    raise MoelocalError(f"model directory not found: {model}")


def hub_cache_dir() -> Path:
    """The Hugging Face cache, read from the environment at each call (huggingface_hub reads it
    once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True
        )
        return Path(path)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        raise MoelocalError(
            f"model '{repo_id}' is not a local directory nor in the Hugging Face cache; "
            f"download it with: moelocal pull {repo_id}"
        ) from None
