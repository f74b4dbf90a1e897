# Sourced by gpu/check.sh and gpu/nodes.sh: unpack the bundled packages, copy the project into a scratch folder
# and enter it, with a `python` that prints its stacks when a time limit sends it SIGABRT.
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
site=${SITE:-/tmp/site}
[ -d "$site/unsloth" ] || { mkdir -p "$site" && tar -xJf "$src/gpu/site.tar.xz" -C "$site"; }
work=$(mktemp -d)
cp -r "$src/dvc.yaml" "$src/params.yaml" "$src/stages" "$src/finetune" "$src/tools" "$src/demo" "$src/perf" "$src/data" "$work/"
cd "$work"
mkdir bin
printf '#!/bin/sh\nexec %s -X faulthandler "$@"\n' "$(command -v python3)" > bin/python
chmod +x bin/python
export PATH="$work/bin:$PATH" PYTHONPATH="$site:$work" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_ENABLE_LOGGING=1
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
quiet() { grep --line-buffered -vE 'it/s\]|examples/s\]|s/it\]|_pytree|Warning' || true; }
