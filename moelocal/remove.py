"""`moelocal rm`: remove a model moelocal made or downloaded, and nothing else.

Removable are a converted model in the data directory (provably one: see convert.check_out), the
embedded default model's installed copy (installed again on next use), and a repository in the
Hugging Face cache (through huggingface_hub's own cache deletion). Any other directory, even
one given by path, is refused: it may be the user's.
"""

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import MoelocalError
from .hub import DEFAULT_MODEL, data_dir, hub_cache_dir
from .model_files import foreign_files


@dataclass
class Removal:
    what: str  # for the confirmation and the report
    size: int  # bytes freed
    run: Callable[[], None]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def removal(model: str) -> Removal:
    models = data_dir() / "models"
    path = Path(model).expanduser()
    local = path if path.exists() or path.is_symlink() else models / model
    if local.exists() or local.is_symlink():
        return data_dir_removal(local, models)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return hub_removal(model)
    raise MoelocalError(f"no model {model} in {models} or in the Hugging Face cache")


def data_dir_removal(path: Path, models: Path) -> Removal:
    from .convert import check_out
    from .embedded_model import checksums

    if path.is_symlink() or path.resolve().parent != models.resolve():
        raise MoelocalError(f"{path} is not a model in moelocal's data directory ({models}); "
                            "rm removes only what moelocal made or downloaded")  # fmt: skip
    if path.name == DEFAULT_MODEL and path.is_dir():
        if foreign := foreign_files(path, checksums()):
            raise MoelocalError(f"{path} holds files moelocal did not write ({', '.join(foreign)})")
    else:
        check_out(path)  # only a provable conversion (or an empty directory) passes
    return Removal(f"{path}", dir_size(path), lambda: shutil.rmtree(path))


def hub_removal(repo_id: str) -> Removal:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(hub_cache_dir()).repos
    except CacheNotFound:
        repos = []
    repo = next((r for r in repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    if repo is None:
        raise MoelocalError(f"no model {repo_id} in the Hugging Face cache ({hub_cache_dir()})")
    strategy = scan_cache_dir(hub_cache_dir()).delete_revisions(
        *(rev.commit_hash for rev in repo.revisions)
    )
    return Removal(f"{repo_id} from the Hugging Face cache ({repo.repo_path})",
                   strategy.expected_freed_size, strategy.execute)  # fmt: skip
