#!/usr/bin/env bash
# Several machines, shown on one with two GPUs: two torchrun agents of one GPU each (CUDA_VISIBLE_DEVICES), each in
# its own copy of the workspace as on two machines, run the train stage's command from dvc.yaml unchanged and meet
# at a c10d rendezvous on 127.0.0.1, as docs/gpus.md's "Several machines" section runs them.
#   bash gpu/nodes.sh        # on a 2-GPU CUDA machine, after gpu/bundle.sh made gpu/site.tar.xz here
set -euo pipefail
source "$(dirname "$0")/workspace.sh"

nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python -m demo.tiny_model data/sample/finance_instruct_sample.jsonl models/tiny-deepseek 2>&1 | tail -1
timeout -s ABRT 300 python -m demo.run_stages --set train.optim=adamw_8bit --until tokenize 2>&1 | quiet
train=$(python -c "import yaml; print(yaml.safe_load(open('dvc.yaml'))['stages']['train']['cmd'])")
port=$(python -c "from tools.servers import free_port; print(free_port())")
export PET_NNODES=2 PET_RDZV_ENDPOINT="127.0.0.1:$port" PET_RDZV_ID=two-nodes
for node in 0 1; do
  cp -r "$work" "$work.node$node"
  (cd "$work.node$node" && CUDA_VISIBLE_DEVICES=$node timeout -s ABRT 300 sh -c "$train" > train.log 2>&1) &
done
status=0
wait %1 || status=$?
wait %2 || status=$?
for node in 0 1; do
  echo "node $node: adapter written: $([ -d "$work.node$node/models/adapter" ] && echo yes || echo no)"
  grep -E "world|processes|train_loss|Error" "$work.node$node/train.log" | grep -v Warning | tail -4
done
cat "$work".node*/metrics/train.json 2>/dev/null
python -c "
import mlflow
client = mlflow.MlflowClient()
for r in mlflow.search_runs(experiment_names=['finance-deepseek'], output_format='list'):
    gpus = sorted({k[: k.index('gpu_') + 4] + k[k.index('gpu_') + 4 :].split('_')[0] for k in r.data.metrics if '/gpu_' in k})
    print('MLflow run', r.info.status, 'world_size', r.data.tags.get('world_size'), 'loss points:',
          len(client.get_metric_history(r.info.run_id, 'loss')), 'GPUs in system metrics:', gpus)
"
exit $status
