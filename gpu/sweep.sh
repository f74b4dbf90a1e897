#!/usr/bin/env bash
# The sweep check: two experiments of `train.devices: 1` on the demo's settings, started at once, lease the GPUs. On
# one GPU the second waits for the first's lease and trains after it; on two they train at once, one per GPU, and a
# third trained alone first gives the one-GPU speed they are compared with. For each: the GPU it leased (the MLflow
# tag fit.gpus), when it waited, got its GPU and finished, its run's status and tokens/s.
#   bash gpu/sweep.sh        # on a CUDA PyTorch image, after gpu/bundle.sh made gpu/site.tar.xz here
# With DVC and git on the machine the two are queued (`dvc exp run --queue`, `dvc queue start -j 2`, as in
# docs/experiments.md's sweep); without DVC (gpu/bundle.sh packs none) they run as DVC's queue workers run them:
# dvc.yaml's train command, each in its own copy under .dvc/tmp/exps/ with DVC's DVC_ROOT and DVC_EXP_NAME (DVC=no
# picks this way anyway).
# STEPS=300 training steps each by default.
set -euo pipefail
source "$(dirname "$0")/workspace.sh"

nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || echo "no GPU found"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
python -m demo.tiny_model data/sample/finance_instruct_sample.jsonl models/tiny-deepseek 2>&1 | tail -1
settings=(--set train.optim=adamw_8bit --set train.devices=1 --set "train.max_steps=${STEPS:-300}")
settings+=(--set train.eval_steps=null --set train.save_steps=null)
timeout -s ABRT 300 python -m demo.run_stages "${settings[@]}" --until tokenize 2>&1 | quiet
train=$(python -c "import yaml; print(yaml.safe_load(open('dvc.yaml'))['stages']['train']['cmd'])")
dvc_here=${DVC:-$(python -m dvc --version >/dev/null 2>&1 && command -v git >/dev/null && echo yes || echo no)}
echo "GPUs: $gpus; DVC and git here: $dvc_here"

copy() {  # name lora.r: the train stage's command in an experiment's copy of the workspace, as a queue worker runs it
  local name=$1 folder=$work/.dvc/tmp/exps/$1
  mkdir -p "$folder"
  cp -r "$work/dvc.yaml" "$work/stages" "$work/finetune" "$work/data" "$work/models" "$folder/"
  python -c "import sys, yaml; p = yaml.safe_load(open('params.yaml')); p['lora']['r'] = int(sys.argv[2]); \
yaml.safe_dump(p, open(sys.argv[1], 'w'), sort_keys=False)" "$folder/params.yaml" "$2"
  (cd "$folder" && DVC_ROOT=$work DVC_EXP_NAME=$name DVC_EXP_BASELINE_REV=0000000 timeout -s ABRT 900 sh -c "$train" \
    > "$work/$name.log" 2>&1)
}

if [ "$dvc_here" = yes ]; then  # before any copy: dvc init refuses a .dvc/ folder that exists
  git init -q && git config user.name sweep && git config user.email sweep@example.com && dvc init -q
  cp "$src/.gitignore" . && printf '/bin/\n/*.log\n' >> .gitignore  # the tiny model stays out of git: -C copies it
  dvc commit -q -f -d tokenize  # the data stages' outputs, as the commit's
  git add -A && git commit -qm "demo settings, data stages run"
fi
if [ "$gpus" -gt 1 ]; then copy alone 4; fi  # the one-GPU speed
if [ "$dvc_here" = yes ]; then
  for name in first second; do
    dvc exp run --queue -n "$name" -S lora.r=$([ $name = first ] && echo 8 || echo 16) -C models/tiny-deepseek train
  done
  dvc queue start -j 2
  python -c "import time; from pathlib import Path; from finetune.training.leases import running_workers
time.sleep(5)
while running_workers(Path('.')): time.sleep(2)"
  dvc queue status
  for name in first second; do dvc queue logs "$name" > "$work/$name.log" 2>&1 || true; done
else
  copy first 8 &
  copy second 16 &
  status=0
  wait %1 || status=$?
  wait %2 || status=$?
  [ "$status" = 0 ] || { tail -n 30 "$work"/first.log "$work"/second.log; exit "$status"; }
fi
for name in first second; do
  echo "== $name: its lease and its training"
  grep -aE "finetune.training.leases|sweep|train: (config|fitted|run )" "$work/$name.log" | cut -c1-220
done
python -c "
import datetime, mlflow
def at(ms): return datetime.datetime.fromtimestamp(ms / 1000).strftime('%H:%M:%S.%f')[:-4] if ms else '-'
runs = mlflow.search_runs(experiment_names=['finance-deepseek'], order_by=['attributes.start_time ASC'],
                          output_format='list')
speed = {r.info.run_name: r.data.metrics.get('train/tokens_per_second', float('nan')) for r in runs}
for r in runs:
    print(f'MLflow run {r.info.run_name}: {r.info.status}, GPU {r.data.tags.get(\"fit.gpus\")}, trained from',
          f'{at(r.info.start_time)} to {at(r.info.end_time)}, {speed[r.info.run_name]:,.0f} tokens/s',
          f'({speed[r.info.run_name] / speed[\"alone\"]:.1%} of alone)' if 'alone' in speed else '')
first, second = (next(r for r in runs if r.info.run_name == n) for n in ('first', 'second'))
one_after_other = second.info.start_time >= first.info.end_time or first.info.start_time >= second.info.end_time
print('the two trained', 'one after the other' if one_after_other else 'at the same time',
      'on GPU(s)', first.data.tags.get('fit.gpus'), 'and', second.data.tags.get('fit.gpus'))
"
