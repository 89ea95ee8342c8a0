#!/bin/bash
# The GPU evidence of docs/findings.md in one device call: the fault lab and the twins on the GPU,
# tarred into $OUT (at most 8 files come back). Usage: bash scripts/gpu_evidence.sh [lab-seconds] [twin-seconds]
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/ev; rm -rf $W; mkdir -p $W
LAB=${1:-270}; TWINS=${2:-150}; COMPILE=${3:-0}
{
python3 -c 'import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name(0), hasattr(torch.cuda, "get_per_process_memory_fraction"))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
timeout $LAB python3 -m kvscope lab --device cuda -o $W/lab --new-tokens 128 --prompt-tokens 64,200,400 \
  $(for s in $(python3 -c 'from kvscope.lab import scenario_names; print(" ".join(n for n in scenario_names() if n != "static_compiled"))'); do echo -s $s; done)
echo "lab rc=$? in $(( $(date +%s) - start )) s"; start=$(date +%s)
timeout $TWINS python3 scripts/record_twins.py $W/twins --new 192 --prompts 64,1100
echo "twins rc=$? in $(( $(date +%s) - start )) s"; start=$(date +%s)
if [ "$COMPILE" -gt 0 ]; then
  timeout $COMPILE python3 -m kvscope lab --device cuda -o $W/compiled --new-tokens 64 --prompt-tokens 64,64 -s static_compiled
  echo "static_compiled rc=$? in $(( $(date +%s) - start )) s"
fi
python3 -m pytest -q -p no:cacheprovider tests/recorder/test_memory_limit.py 2>&1 | tail -3
} > $OUT/log.txt 2>&1
cd $W && for d in */; do tar czf "$OUT/${d%/}.tgz" "${d%/}"; done; ls -la $OUT >> $OUT/log.txt
