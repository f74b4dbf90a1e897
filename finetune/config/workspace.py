"""Whether a stage runs in a DVC experiment's temporary copy, and a local path that the copy lacks, named.

`dvc exp run --queue` and `--temp` run the pipeline in a copy of the commit under `<repo>/.dvc/tmp/exps/`, with
`DVC_ROOT` pointing at the real repository. The copy holds the files git tracks, a new one staged with `git add`
included, as the workspace has them, and what their `.dvc` files and `dvc.lock` name, checked out of DVC's cache
(the demo's `models/tiny-deepseek`: `demo.run.track`). Any other local folder stays behind unless the experiment
was queued with `-C <path>` (`--copy-paths`), and a library that reads `model.model_name` then fails far from the
cause (transformers takes the missing folder for a Hub id: "couldn't connect to huggingface.co").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

COPIES = Path(".dvc", "tmp", "exps")  # where DVC makes the copies, under the real repository


def experiment_copy(environ: Mapping[str, str], cwd: Path) -> Path | None:
    """The real repository when `cwd` is a DVC experiment's temporary copy (queued or `--temp`); else None.

    `experiment_copy({"DVC_ROOT": "/repo"}, Path("/repo/.dvc/tmp/exps/tmpab12"))` -> `Path('/repo')`;
    `experiment_copy({"DVC_ROOT": "/repo"}, Path("/repo"))` -> None.
    """
    if not environ.get("DVC_ROOT"):
        return None
    root = Path(environ["DVC_ROOT"]).resolve()
    return root if cwd.resolve().is_relative_to(root / COPIES) else None


def require_in_copy(value: str, key: str, environ: Mapping[str, str], cwd: Path) -> None:
    """Refuse a relative path `value` (the setting `key`) that this experiment's copy lacks but the real repository
    holds, naming both and the fix; a path found here, a Hub id or a stage run outside a copy passes."""
    root = experiment_copy(environ, cwd)
    if root is None or Path(value).is_absolute() or (cwd / value).exists() or not (root / value).exists():
        return
    raise FileNotFoundError(
        f"{key}: {value} is in the workspace ({root / value}) but not in this experiment's copy ({cwd.resolve()}): "
        f"DVC copies only what git tracks. Track the folder: dvc add {value}, then git add {value}.dvc (staged "
        f"is enough), or queue the experiment with `-C {value}` (dvc exp run --queue/--temp --copy-paths {value})"
    )
