#!/usr/bin/env bash
# (A record of how benchmarks/results/main_job/rows.jsonl was timed; the paths are the measuring machine's.)
# Interleaved timing of the README's main job: new code first run, new second run (same cache), old code first run.
set -u
base=$HOME/.cache/prunekit
out=/work/scratch/mainjob_timing.jsonl
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for r in 1 2 3; do
  for who in new old; do
    dir=/work/scratch/mj/$who-$r; rm -rf $dir; mkdir -p $dir/cache $dir/cwd
    ln -s $base/models $dir/cache/models; ln -s $base/zero_shot $dir/cache/zero_shot
    [ $who = new ] && cp -r $base/tokens $dir/cache/tokens   # the new set-up tokenizes the corpora
    bin=/work/main/.venv/bin/prunekit; [ $who = old ] && bin=/work/wt-old8/.venv/bin/prunekit
    runs="first"; [ $who = new ] && runs="first second"; [ $who = new ] && [ $r = 1 ] && runs="first second refit"
    for run in $runs; do
      l0=$(cut -d' ' -f1 /proc/loadavg); s=$(date +%s.%N)
      extra=""; [ $run = refit ] && extra="--repair refit"
      (cd $dir/cwd && PRUNEKIT_CACHE=$dir/cache $bin run --method moreau-gs --overwrite $extra > $dir/$run.log 2>&1); rc=$?
      e=$(date +%s.%N); l1=$(cut -d' ' -f1 /proc/loadavg)
      echo "{\"round\": $r, \"code\": \"$who\", \"run\": \"$run\", \"rc\": $rc, \"seconds\": $(echo "$e - $s" | bc), \"load_start\": $l0, \"load_end\": $l1}" | tee -a $out
    done
  done
done
