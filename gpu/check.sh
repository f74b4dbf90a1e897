#!/usr/bin/env bash
# The GPU check: the whole pipeline on the demo's settings, but on CUDA with the real 4-bit path and 8-bit AdamW.
#   bash gpu/check.sh        # on a CUDA PyTorch image, after gpu/bundle.sh made gpu/site.tar.xz here
# DVC need not be installed: demo/run_stages.py runs dvc.yaml's commands in order, in a scratch copy.
# Every step has a time limit; a step that overruns is sent SIGABRT, and faulthandler prints where it hung.
set -euo pipefail
source "$(dirname "$0")/workspace.sh"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU found"
# a first import on a new machine compiles and patches for a while (30-35 s on an H200): print the stacks every 90 s to
# show where it hangs. A dump at 30 s, inside trl's dataclass definitions, once ended in a segfault (2026-12-03).
timeout -s ABRT "${IMPORT_LIMIT:-240}" python -c "import faulthandler, time; faulthandler.dump_traceback_later(90, \
repeat=True); t = time.time(); import unsloth; print(f'import unsloth: {time.time() - t:.0f} s')" 2>&1 | quiet
python -m demo.tiny_model data/sample/finance_instruct_sample.jsonl models/tiny-deepseek 2>&1 | tail -1
timeout -s ABRT "${PIPELINE_LIMIT:-420}" python -m demo.run_stages --set train.optim=adamw_8bit 2>&1 | quiet
cat metrics/tokenize.json metrics/train.json metrics/evaluate.json
# the optional export (merged 16-bit folder) and the generate command, on the adapter just trained
timeout -s ABRT 300 python -m stages.export --adapter models/adapter --out models/merged --metrics metrics/export.json \
  2>&1 | quiet | tail -3
cat metrics/export.json
timeout -s ABRT 300 python -m tools.generate --max-new-tokens 24 "What is a bond?" 2>/dev/null
echo
python -c "
import mlflow
client = mlflow.MlflowClient()
for r in mlflow.search_runs(experiment_names=['finance-deepseek'], output_format='list'):
    print('MLflow run', r.info.status, 'loss points:', len(client.get_metric_history(r.info.run_id, 'loss')))
    print('  system metrics:', sorted(k for k in r.data.metrics if k.startswith('system/')))
    print('  inputs:', [(i.dataset.name, i.dataset.digest) for i in client.get_run(r.info.run_id).inputs.dataset_inputs])
print('registered:', [(v.name, v.version) for v in client.search_model_versions()])
"
