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
    """The embedded default model, installed on first use and checked at every use."""
    from .embedded_model import installed

    return installed(data_dir() / "models" / DEFAULT_MODEL)


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


# the files moelocal reads; everything else in a repository (pickles, GGUF, ONNX) stays remote
PULL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]


def files_to_pull(files) -> dict[str, int]:
    """(name, size) of a repository's files -> those moelocal reads: top-level files matching
    PULL_PATTERNS (a sub-folder such as original/ holds another copy of the weights)."""
    from fnmatch import fnmatch

    return {name: size for name, size in files
            if "/" not in name and any(fnmatch(name, p) for p in PULL_PATTERNS)}  # fmt: skip


def check_free_space(directory: Path, needed: int, doing: str):
    """Refuse to start writing what cannot fit: a full disk found half way wastes the wait."""
    import shutil

    directory = next((p for p in (directory, *directory.parents) if p.exists()), directory)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise MoelocalError(f"{doing} needs {needed / 1e9:.2f} GB in {directory}; "
                            f"{free / 1e9:.2f} GB are free")  # fmt: skip


def pull(repo_id: str, revision: str | None = None) -> Path:
    """Download what moelocal needs of a hub repository into the Hugging Face cache (resumable)."""
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        patterns = PULL_PATTERNS
        if not offline:  # only the top-level files moelocal reads, if they fit on the disk
            from huggingface_hub import HfApi, try_to_load_from_cache

            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            files = files_to_pull((s.rfilename, s.size or 0) for s in info.siblings or [])
            missing = sum(size for name, size in files.items() if not isinstance(
                try_to_load_from_cache(repo_id, name, hub_cache_dir(), revision), str))  # fmt: skip
            check_free_space(hub_cache_dir(), missing, f"pulling {where}")
            patterns = sorted(files)
        path = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=hub_cache_dir(), allow_patterns=patterns,
            local_files_only=offline,
        ))  # fmt: skip
    except hf.HFValidationError:
        raise MoelocalError(f"'{repo_id}' is not a hub repository id (owner/name)") from None
    except hf.GatedRepoError:
        raise MoelocalError(
            f"{repo_id} is gated: accept its terms on the hub and set HF_TOKEN"
        ) from None
    except hf.RepositoryNotFoundError:
        raise MoelocalError(f"no repository {repo_id} on the hub (private? set HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise MoelocalError(f"{repo_id} has no revision {revision}") from None
    except hf.LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        raise MoelocalError(f"{reason} and {where} is not in the local cache") from None
    except (hf.HfHubHTTPError, OSError) as e:
        raise MoelocalError(f"download of {where} failed: {str(e).splitlines()[0]}") from None
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise MoelocalError(f"{where} has no config.json and safetensors weights to run")
    return path


def describe(model_dir: Path, name: str, source: str) -> dict | None:
    """One row of `moelocal list`: None for a model of a family moelocal does not run, a row
    with `broken` (what is wrong) for one that cannot be read."""
    try:
        return describe_model(model_dir, name, source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError,
            MoelocalError) as e:  # fmt: skip
        return {"name": name, "source": source, "broken": str(e), "path": str(model_dir)}


def describe_model(model_dir: Path, name: str, source: str) -> dict | None:
    import json

    from .config import read_config_json
    from .model_files import model_file
    from .models import FAMILIES

    raw = read_config_json(model_dir)
    if raw.get("model_type") not in FAMILIES:
        return None
    cfg = FAMILIES[raw["model_type"]].read_config(raw)
    quant = (raw.get("quantization_config") or {}).get("quant_method") or cfg.torch_dtype or "-"
    manifest = model_file(model_dir, "moelocal.json")
    if manifest is not None:  # converted by moelocal
        quant = json.loads(manifest.read_text()).get("quant", quant)
    weights = [*model_dir.glob("*.safetensors"), *model_dir.glob("experts.bin")]
    return {
        "name": name,
        "source": source,
        "architecture": cfg.model_type,
        "size_bytes": sum(p.stat().st_size for p in weights),
        "experts": cfg.num_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "layers": cfg.num_hidden_layers,
        "quantization": quant,
        "path": str(model_dir),
    }


def local_models() -> list[dict]:
    """Supported MoE models in moelocal's data directory and in the Hugging Face cache."""
    rows = []
    for config in sorted((data_dir() / "models").glob("*/config.json")):
        if config.parent.name.startswith("."):  # a conversion or install in progress
            continue
        rows.append(describe(config.parent, config.parent.name, "moelocal"))
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(hub_cache_dir()).repos
    except CacheNotFound:
        repos = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        rows.append(describe(newest.snapshot_path, repo.repo_id, "hf cache"))
    return [row for row in rows if row is not None]
