#!/bin/bash
# The fault lab on the GPU in other twins than gpt-oss-20b, in one device call, tarred into $OUT.
# Usage: bash scripts/gpu_lab_twins.sh SECONDS TWIN[:PROMPTS[:NEW[:SCENARIO,...]]] ...
#   e.g. pythia-1.4b gemma-3-4b:1000,1100:64 gpt-oss-20b:::dead_head,healthy_dynamic
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/labtwins; rm -rf $W; mkdir -p $W
LIMIT=$1; shift
{
python3 -c 'import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))'
for spec in "$@"; do
  IFS=: read -r twin prompts new only <<< "$spec"
  start=$(date +%s)
  timeout $LIMIT python3 -m kvscope lab --device cuda --twin "$twin" -o $W/$twin \
    ${prompts:+--prompt-tokens $prompts} ${new:+--new-tokens $new} \
    $(for s in ${only//,/ }; do echo -s $s; done) 2>&1 | grep -v '^kvscope: recorded'
  echo "$twin rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
done
} > $OUT/log.txt 2>&1
cd $W && for d in */; do tar czf "$OUT/lab-${d%/}.tgz" "${d%/}"; done; ls -la $OUT >> $OUT/log.txt
