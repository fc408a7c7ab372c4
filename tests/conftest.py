import os
import signal
import warnings

import pytest
from tiny import save_tiny

warnings.filterwarnings("ignore", category=UserWarning)

# the Ctrl-C tests send SIGINT, to this process and to commands they start: also where pytest runs
# as a shell's background job, which ignores SIGINT (an ignored signal stays ignored in a child;
# a handled one is reset to the default when the child starts)
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def moelocal_home(tmp_path_factory):
    """Keep the embedded default model and any data of the tests out of the user's directories."""
    home = tmp_path_factory.mktemp("moelocal_home")
    os.environ["MOELOCAL_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return home


@pytest.fixture(scope="session")
def random_model(tmp_path_factory):
    """A random-weight Mixtral with the default model's chat template: its replies run on to the
    token limit (the trained default model's end at EOS)."""
    from moelocal.synthetic import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("random") / "small")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, **overrides) -> (checkpoint dir, reference transformers model), made once each."""
    made = {}

    def make(arch: str, seed: int = 0, **overrides):
        key = (arch, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(arch)
            save_tiny(path, arch, seed, **overrides)
            from tiny import reference

            made[key] = (path, reference(path))
        return made[key]

    return make
