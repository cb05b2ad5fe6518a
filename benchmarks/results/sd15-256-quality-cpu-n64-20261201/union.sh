#!/bin/bash
# sd15 N=64 quality set = harness run seeds 0..31 (sd15-256-quality-cpu-n32-20261201) + harness run seeds 32..63
# (--seed 32 --quality 32): image i depends only on (prompt i mod 32, seed i), so the union is the N=64 set.
set -euo pipefail
A=/work/wt-quality-record/benchmarks/results/sd15-256-quality-cpu-n32-20261201/quality
B=/tmp/integ/sd15-256-quality-cpu-seed32/quality
U=/tmp/integ/n64
OUT=/work/main/benchmarks/results/sd15-256-quality-cpu-n64-20261201
rm -rf $U; mkdir -p $U $OUT
for b in torch onnxruntime onnxruntime-fast; do
  mkdir -p $U/$b
  for i in $(seq 0 31); do
    cp $A/$b/$(printf %05d $i).png $U/$b/$(printf %05d $i).png
    cp $B/$b/$(printf %05d $i).png $U/$b/$(printf %05d $((i+32))).png
  done
done
cd /work/main
for b in onnxruntime onnxruntime-fast; do
  PYTHONPATH=/work/main .venv/bin/python -m sdopt eval $U/$b --ref-images $U/torch --paired --json $OUT/eval-$b.json 2>&1 | tee $OUT/eval-$b.txt
done
