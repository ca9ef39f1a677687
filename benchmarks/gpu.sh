#!/usr/bin/env bash
# The speed part of the benchmark suite on one GPU, in at most 8 minutes, compilation included:
# full-size tasks (MLP 784-1024-1024-10, VGG conv 32,64 + dense 128, CIFAR-10 VGG-5), every
# algorithm and the hand-written reference, median step times, ratios to backprop, memory; then
# the step-parity experiment (pcjax vs the hand-written reference, MLP and CNN).
# Needs jax with CUDA, optax and equinox in the environment; pcjax itself is imported from this
# checkout. Results: $OUT (default benchmarks/results)/suite-speed.json and step-gpu.json;
# render them with `python benchmarks/report.py FILE`.
#
#   bash benchmarks/gpu.sh [extra suite arguments, e.g. --tasks mlp_mnist,cnn_mnist]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results}"
python -c "import jax; print('devices:', jax.devices())"
timeout 400 python benchmarks/run.py suite --speed-only --peers none --repeats 20 \
  --out "$out/suite-speed.json" "$@"
timeout 80 python benchmarks/run.py step --quick --repeats 20 --out "$out/step-gpu.json"
