#!/usr/bin/env bash
# GPU checks in one command (about 10 minutes on one H100/H200-class card):
# the scorer benchmark in bf16 and fp32, a full Flickr30K-sized evaluation
# (1,000 images x 5,000 captions, paper sizes) on synthetic features, and the
# paper-size search benchmark.
#   bash benchmarks/gpu.sh            (expects the package importable: make install, or PYTHONPATH=src)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" benchmarks/scorer.py --device cuda --dtype bfloat16 --images 256 --captions 1280 --loop-captions 200
"$PY" benchmarks/scorer.py --device cuda --dtype float32 --images 256 --captions 1280 --loop-captions 200
"$PY" benchmarks/eval_memory.py --device cuda --captions 5000
# Paper-size search (issue "search at paper size"): encoding rate, two-stage text-query
# latency over 10K and 100K images (pq codes on disk, ~22 GB written then deleted).
"$PY" benchmarks/paper_scale.py --device cuda --galleries 10000 100000 --encode-batch 32 --out /tmp/hat-paper-scale
