#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): run from the repository root on a machine with an NVIDIA
# GPU after `pip install ./runtime ".[test]"` (a CUDA torch, and for TensorRT: tensorrt-cu13,
# cuda-bindings, TensorRT_ROOT with the headers). Arguments go to the script (--out, --budget, --dry-run).
set -uo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
