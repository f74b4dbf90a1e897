"""The library the pipeline's stages share, a folder per concern.

    config/      params.yaml sections as typed configs, their JSON Schema, the stages' command line
    data/        files, the worker pool, local-or-Hub sources, fetch's cleaning, ShareGPT conversion helpers
    tokens/      how a conversation becomes text and token ids
    model/       loading the base (and adapter), the speed patch, the `auto` settings for the machine
    training/    the SFTTrainer, its callbacks, checkpoints, failures, several processes, the adapter
    tracking/    the MLflow store, the runs, the UI's view
    evaluation/  likelihood, answers, scores, label-set benchmarks, contamination

Nothing here imports a stage (`stages/`), a tool (`tools/`) or a speed script (`perf/`). A stage's `deps` in
`dvc.yaml` list exactly the files of this package that it imports, so a file is kept to one job: editing it reruns
only the stages that use that job.
"""
