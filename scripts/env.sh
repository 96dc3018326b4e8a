# Environment shared by every selfplay script: source it, do not run it.
# Everything lives in a cache outside the clone so that a fresh clone reuses it.
export SELFPLAY_CACHE="${SELFPLAY_CACHE:-$HOME/.cache/selfplay}"
export VIRTUAL_ENV="$SELFPLAY_CACHE/venv"
export PATH="$VIRTUAL_ENV/bin:$HOME/.cargo/bin:$PATH"
export SELFPLAY_PYTHON="$VIRTUAL_ENV/bin/python"
# tch builds against the PyTorch wheel in the venv (torch 2.11.0 for tch 0.24.0).
export LIBTORCH_USE_PYTORCH=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SELFPLAY_CACHE/target}"
# No venv yet (a brand-new machine): nothing to add. Must not fail under `set -euo pipefail`.
_torch_lib=""
for _d in "$VIRTUAL_ENV"/lib/python3*/site-packages/torch/lib; do
  if [ -d "$_d" ]; then _torch_lib="$_d"; break; fi
done
unset _d
if [ -n "$_torch_lib" ]; then
  export LD_LIBRARY_PATH="$_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
unset _torch_lib
export SELFPLAY_GGUF="$SELFPLAY_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
export SELFPLAY_MODEL="${SELFPLAY_MODEL:-$SELFPLAY_CACHE/models/SmolLM2-135M-Instruct}"
export SELFPLAY_DATA="${SELFPLAY_DATA:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/data}"
# libtorch's OpenMP threads wait for work passively instead of spinning: on a machine whose
# cores are shared (other jobs, or the learner and actors of `selfplay train` in one process)
# spinning threads steal the cores the working ones need. Measured on the 2-core AMD EPYC VM
# with two other processes busy: 24 generated tokens on SmolLM2 took 8.2-10.9 s spinning and
# 1.6-2.1 s passive. Set OMP_WAIT_POLICY=ACTIVE to go back.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
