#!/usr/bin/env bash
# Sets up moelocal in .venv and runs it once on the embedded default model.
# torch comes first and pinned: on this kind of machine `torch==2.13.0` is a local CPU wheel, while a
# bare `torch` (or bitsandbytes pulling it in) would download a multi-GB CUDA build.
# Elsewhere, set TORCH_SPEC (e.g. TORCH_SPEC="torch>=2.5") to let pip pick your build.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/moelocal generate --prompt "Tell me about mixtures of experts." --max-new-tokens 48
