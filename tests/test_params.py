"""The pipeline's files agree with each other: every stage has its script and its params, and they load."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from examples import tiny_training

from demo.run import apply_overrides, set_param_flags
from finetune.config import cli, params
from finetune.data.cleaning import FetchConfig
from finetune.data.conversion import ToSharegptConfig
from finetune.evaluation.base_vs_tuned import EvaluateConfig
from finetune.evaluation.benchmark_sets import PRESETS
from finetune.model.load import ModelConfig
from finetune.tracking.store import TrackingConfig
from finetune.training.config import LoraConfig, TrainConfig, check_schedule
from finetune.training.distributed import World
from stages.export import ExportConfig
from tools.deps import imported_files, project_imports, stage_definitions
from tools.params_schema import SECTIONS, params_schema, rendered

CONFIGS = SECTIONS  # params.yaml's sections and the config each loads into (tools/params_schema.py)
STAGES = ["fetch", "to_sharegpt", "standardize", "tokenize", "train", "benchmarks", "evaluate"]


def dvc_stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def test_stages_are_the_pipeline_in_order(root: Path) -> None:
    assert list(dvc_stages(root)) == STAGES


@pytest.mark.parametrize("stage", [*STAGES, "export"])
def test_each_stage_depends_on_exactly_the_project_files_it_imports(root: Path, stage: str) -> None:
    definition = stage_definitions(root)[stage]
    module = definition["cmd"].split()[2]
    assert definition["cmd"].startswith(f"python -m stages.{stage} ") and module == f"stages.{stage}"
    assert stage in definition["params"]  # its own section
    listed = {dep for dep in definition["deps"] if dep.endswith(".py")}
    assert listed == imported_files(root, module), f"{stage}: deps in dvc.yaml vs. what it imports"


def test_the_data_stages_read_no_model_tokenizer_or_tracking_code(root: Path) -> None:
    for stage in ("fetch", "to_sharegpt", "standardize", "benchmarks"):
        files = imported_files(root, f"stages.{stage}")
        assert not any(f.startswith(("finetune/model/", "finetune/tokens/", "finetune/tracking/")) for f in files)
        assert not any(str(p).startswith(("model", "chat")) for p in dvc_stages(root)[stage]["params"]), stage


def test_the_import_walk_follows_imports_inside_functions(tmp_path: Path) -> None:
    (tmp_path / "stages").mkdir()
    (tmp_path / "finetune/lib").mkdir(parents=True)
    (tmp_path / "stages/a.py").write_text("from finetune.lib import b\n")
    (tmp_path / "finetune/lib/b.py").write_text("def f():\n    from stages.c import g\n")
    (tmp_path / "stages/c.py").write_text("import json\n")
    assert imported_files(tmp_path, "stages.a") == {"stages/a.py", "finetune/lib/b.py", "stages/c.py"}


def test_stages_holds_the_stages_alone_and_the_library_imports_none(root: Path) -> None:
    scripts = {path.stem for path in (root / "stages").glob("*.py")} - {"__init__"}
    assert scripts == set(stage_definitions(root))
    for path in (root / "finetune").rglob("*.py"):
        imported = project_imports(root, path)
        assert not any(f.startswith(("stages/", "tools/", "perf/")) for f in imported), path
        if path.name == "__init__.py":  # a docstring at most: importing a package runs nothing
            body = ast.parse(path.read_text(encoding="utf-8")).body
            assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body), path


def test_the_optional_export_stage_runs_from_the_repo_root(root: Path) -> None:
    definition = yaml.safe_load((root / "export/dvc.yaml").read_text())["stages"]["export"]
    assert definition["wdir"] == ".."  # paths relative to the repo root, like dvc.yaml's


def test_a_stages_command_line_freezes_its_objects_before_the_other_exit_handlers_run(root: Path) -> None:
    # so that the interpreter's last collections skip them (~3 s of a demo stage) while the handlers still run
    code = (
        "import atexit, gc, sys\n"
        "from finetune.config import cli\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "sys.argv = ['stage', '--out', 'x']\n"
        "print(cli.arguments('A stage.', out='a folder'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert "'out': PosixPath('x')" in out and out.rstrip().endswith("frozen at exit: True"), out


def assert_loaded_as_written(config: object, written: dict, section: str) -> None:
    """Each key of a params file's section reaches its config's field with the value the file gives it; a benchmark
    preset (benchmarks.sets) reaches it as its preset's settings, label values as text, under the preset's name."""
    for key, value in written.items():
        loaded = getattr(config, key)
        if (section, key) != ("benchmarks", "sets"):
            if type(value) is int and type(loaded) is float:  # an integer where a number is asked for (conform)
                value = float(value)
            assert (loaded, type(loaded)) == (value, type(value)), f"{section}.{key}: {loaded!r}, written {value!r}"
            continue
        assert [bench.name for bench in loaded] == [entry.get("preset", entry.get("name")) for entry in value]
        for bench, entry in zip(loaded, value, strict=True):
            fields = {**PRESETS.get(entry.get("preset"), {}), **{k: v for k, v in entry.items() if k != "preset"}}
            if fields.get("label_map") is not None:
                fields["label_map"] = {str(label): word for label, word in fields["label_map"].items()}
            assert {field: getattr(bench, field) for field in fields} == fields, f"{section}.{key}: {bench.name}"


@pytest.mark.parametrize("section", list(CONFIGS))
def test_every_params_section_loads_as_written(root: Path, section: str) -> None:
    written = yaml.safe_load((root / "params.yaml").read_text())[section]
    assert_loaded_as_written(params.load(CONFIGS[section], root / "params.yaml", section), written, section)


def test_params_sections_are_the_known_ones(root: Path) -> None:
    assert set(yaml.safe_load((root / "params.yaml").read_text())) == set(CONFIGS)


def test_every_params_key_is_commented(root: Path) -> None:
    for number, line in enumerate((root / "params.yaml").read_text().splitlines(), 1):
        if line.startswith("  ") and ":" in line:
            assert "  # " in line, f"params.yaml:{number} has no comment: {line.strip()}"


def test_params_schema_json_is_what_the_configs_give(root: Path) -> None:
    assert (root / "params.schema.json").read_text(encoding="utf-8") == rendered(), "run python -m tools.params_schema"
    assert (root / "params.yaml").read_text().startswith("# yaml-language-server: $schema=params.schema.json\n")


def test_params_yaml_and_the_demo_settings_match_the_schema(root: Path) -> None:
    schema = params_schema()
    base = yaml.safe_load((root / "params.yaml").read_text())
    jsonschema.validate(base, schema)
    jsonschema.validate(apply_overrides(base, yaml.safe_load((root / "demo/params.yaml").read_text())), schema)
    for section in schema["properties"].values():
        assert all(key["description"] for key in section["properties"].values()), section


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"lora": {"rank": 8}}, ["lora"]),  # an unknown key
        ({"train": {"max_steps": "many"}}, ["train", "max_steps"]),  # a wrong type
        ({"benchmarks": {"sets": [{"preset": "nope"}]}}, ["benchmarks", "sets", 0, "preset"]),
        ({"lora": None}, ["lora"]),  # a bare section of a config with a required key (lora.r)
        ({"tokenize": None}, None),  # one of defaults alone: as the stages load it
    ],
)
def test_the_schema_flags_what_the_stages_refuse(root: Path, change: dict, path: list | None) -> None:
    params_file = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in change.items():
        params_file[section] = None if values is None else params_file[section] | values
    errors = list(jsonschema.Draft202012Validator(params_schema()).iter_errors(params_file))
    expected = [] if path is None else [path]
    assert [list(error.absolute_path) for error in errors] == expected, [error.message for error in errors]


def test_demo_overrides_name_real_keys_and_load(root: Path, tmp_path: Path) -> None:
    base = yaml.safe_load((root / "params.yaml").read_text())
    merged = apply_overrides(base, yaml.safe_load((root / "demo" / "params.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merged))
    for section, cls in CONFIGS.items():
        assert_loaded_as_written(params.load(cls, tmp_path / "params.yaml", section), merged[section], section)
    assert merged["model"]["model_name"] == "models/tiny-deepseek"
    assert base["model"]["model_name"] == "unsloth/DeepSeek-R1-Distill-Llama-8B"


def test_demo_override_of_unknown_key_is_refused() -> None:
    with pytest.raises(KeyError, match="lora.rank is not a key"):
        apply_overrides({"lora": {"r": 4}}, {"lora": {"rank": 8}})


def test_set_param_flags_are_dvc_syntax() -> None:
    flags = set_param_flags({"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "fetch": {"revision": None}})
    assert flags == ["-S", "lora.r=8", "-S", "lora.target_modules=[q_proj, v_proj]", "-S", "fetch.revision=null"]


@dataclass(frozen=True)
class Example:
    rate: float
    steps: int = 1


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"ex\.rat is not a known key"):
        params.build(Example, {"rat": 1.0}, "ex")


def test_a_key_of_an_earlier_params_file_says_where_it_moved_or_why_it_went() -> None:
    with pytest.raises(ValueError, match=r"evaluate\.benchmarks is not a known key \(it moved to benchmarks\.sets\)"):
        params.build(EvaluateConfig, {"benchmarks": []}, "evaluate")
    with pytest.raises(ValueError, match=r"export\.max_shard_size is not a known key \(removed: unsloth's merge"):
        params.build(ExportConfig, {"max_shard_size": "5GB"}, "export")


def test_missing_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"ex\.rate is required"):
        params.build(Example, {"steps": 2}, "ex")


def test_missing_section_is_named(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("fetch: {}\n")
    with pytest.raises(ValueError, match="section 'lora' is missing"):
        params.read_section(tmp_path / "params.yaml", "lora")


@pytest.mark.parametrize(
    ("cls", "section", "bad", "message"),
    [
        (LoraConfig, "lora", {"r": 0}, "lora.r must be >= 1, got 0"),
        (LoraConfig, "lora", {"bias": "some"}, "lora.bias must be"),
        (TrainConfig, "train", {"learning_rate": -1.0}, "train.learning_rate must be > 0, got -1.0"),
        (TrainConfig, "train", {"learning_rate": float("inf")}, "train.learning_rate must be a finite number, got inf"),
        (TrainConfig, "train", {"weight_decay": -0.01}, "train.weight_decay must be >= 0, got -0.01"),
        (TrainConfig, "train", {"warmup_steps": -1}, "train.warmup_steps must be >= 0, got -1"),
        (TrainConfig, "train", {"seed": 2**32}, "train.seed must be in [0, 2**32 - 1] (numpy's seeds), got 4294967296"),
        (
            TrainConfig,
            "train",
            {"max_steps": 5, "logging_steps": 10},
            "train.logging_steps (10) is above train.max_steps (5): no training loss would be logged",
        ),
        (LoraConfig, "lora", {"loftq_config": {"loftq_bits": 4}}, "lora.loftq_config has no effect here (LoftQ needs"),
        (TrackingConfig, "tracking", {"registered_model": "team/a"}, "tracking.registered_model must hold no '/'"),
        (TrackingConfig, "tracking", {"registered_model": "it's"}, 'got "it\'s"'),
        (TrackingConfig, "tracking", {"registered_model": "trail\\"}, "no '/', ':', quote or backslash"),
        (TrackingConfig, "tracking", {"registered_model": ".."}, "not be '.' or '..' (MLflow's model names), got '..'"),
        (FetchConfig, "fetch", {"eval_size": 0}, "fetch.eval_size must be >= 1"),
        (ModelConfig, "model", {"dtype": "fp8"}, "model.dtype must be one of"),
        (ToSharegptConfig, "to_sharegpt", {"conversation_extension": 0}, "to_sharegpt.conversation_extension"),
        (EvaluateConfig, "evaluate", {"batch_tokens": 0}, "evaluate.batch_tokens must be >= 1"),
    ],
)
def test_bad_values_are_named(root: Path, cls: type, section: str, bad: dict, message: str) -> None:
    raw = {**params.read_section(root / "params.yaml", section), **bad}
    with pytest.raises(ValueError, match=re.escape(message)):
        params.build(cls, raw, section)


@pytest.mark.parametrize(
    ("cls", "section", "bad", "message"),
    [
        (LoraConfig, "lora", {"r": "abc"}, "lora.r must be an integer, got 'abc' (str)"),
        (LoraConfig, "lora", {"r": "8"}, "lora.r must be an integer, got '8' (str)"),
        (LoraConfig, "lora", {"r": 4.5}, "lora.r must be an integer, got 4.5 (float)"),
        (LoraConfig, "lora", {"r": True}, "lora.r must be an integer, got True (bool)"),
        (LoraConfig, "lora", {"target_modules": "q_proj"}, "lora.target_modules must be a list, each text"),
        (LoraConfig, "lora", {"target_modules": ["q_proj", 3]}, "lora.target_modules[1] must be text, got 3"),
        (FetchConfig, "fetch", {"eval_size": "ten"}, "fetch.eval_size must be an integer, got 'ten' (str)"),
        (TrainConfig, "train", {"learning_rate": "fast"}, "train.learning_rate must be a number, got 'fast'"),
        (TrainConfig, "train", {"eval_steps": "often"}, "train.eval_steps must be an integer or null, got 'often'"),
        (ModelConfig, "model", {"load_in_4bit": "yes"}, "model.load_in_4bit must be"),
    ],
)
def test_wrong_types_are_named_with_the_expected_type(
    root: Path, cls: type, section: str, bad: dict, message: str
) -> None:
    raw = {**params.read_section(root / "params.yaml", section), **bad}
    with pytest.raises(ValueError, match=re.escape(message)):
        params.build(cls, raw, section)


def test_a_number_written_as_1e_4_is_read_as_the_number(root: Path, tmp_path: Path) -> None:
    text = (root / "params.yaml").read_text().replace("learning_rate: 2.0e-4", "learning_rate: 1e-4")
    (tmp_path / "params.yaml").write_text(text)
    assert yaml.safe_load(text)["train"]["learning_rate"] == "1e-4"  # YAML 1.1 leaves it text
    assert params.load(TrainConfig, tmp_path / "params.yaml", "train").learning_rate == 1e-4


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (  # a key given twice in a section
            "  over_length: truncate  #",
            "  over_length: drop  # once\n  over_length: truncate  #",
            "line 33: tokenize.over_length is given twice",
        ),
        (
            "\nmodel:\n",
            "\ntokenize:  # again\n  over_length: drop  # twice\n\nmodel:\n",
            "line 34: tokenize is given twice",
        ),
        (  # in a mapping inside a list
            "{preset: tfns}",
            "{preset: tfns, split: test, split: train}",
            "benchmarks.sets[2].split is given twice",
        ),
    ],
)
def test_a_key_given_twice_is_refused_naming_its_path_and_line(
    root: Path, tmp_path: Path, old: str, new: str, message: str
) -> None:
    text = (root / "params.yaml").read_text(encoding="utf-8")
    assert text.count(old) == 1
    (tmp_path / "params.yaml").write_text(text.replace(old, new), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        params.read_section(tmp_path / "params.yaml", "fetch")


def test_a_key_given_twice_is_named_with_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("lora:\n  r: 8\n  r: 16\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'params.yaml'))} line 3: lora.r is given twice$"):
        params.read_section(tmp_path / "params.yaml", "lora")


def test_keys_after_a_yaml_merge_override_it_without_being_refused(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("base: &base {r: 8, alpha: 16}\nlora:\n  <<: *base\n  r: 4\n")
    assert params.read_section(tmp_path / "params.yaml", "lora") == {"r": 4, "alpha": 16}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- lora\n- train\n", "params.yaml must be a mapping of sections, got list"),
        ("lora: [8]\n", "params.yaml: section 'lora' must be a mapping, got list"),
        ("lora: 8\n", "params.yaml: section 'lora' must be a mapping, got int"),
        ("", "params.yaml: section 'lora' is missing"),
    ],
)
def test_a_params_file_of_the_wrong_shape_is_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "params.yaml").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{re.escape(message)}$"):
        params.read_section(tmp_path / "params.yaml", "lora")


def test_a_section_with_no_keys_takes_every_default_or_names_the_first_required_key(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("tokenize:  # every key has a default\nlora:\n", encoding="utf-8")
    assert params.load(CONFIGS["tokenize"], tmp_path / "params.yaml", "tokenize") == CONFIGS["tokenize"]()
    with pytest.raises(ValueError, match=r"^lora\.r is required$"):
        params.load(LoraConfig, tmp_path / "params.yaml", "lora")


def test_a_schedule_transformers_cannot_run_so_is_refused_by_name() -> None:
    check_schedule(tiny_training(lr_scheduler_type="cosine"))
    check_schedule(tiny_training(lr_scheduler_type="reduce_lr_on_plateau", eval_steps=5))
    with pytest.raises(ValueError, match=r"^train.lr_scheduler_type 'cosine_with_min_lr' needs a minimum rate"):
        check_schedule(tiny_training(lr_scheduler_type="cosine_with_min_lr"))
    with pytest.raises(ValueError, match=r"^train.lr_scheduler_type 'cosin' is not one of transformers': linear, cos"):
        check_schedule(tiny_training(lr_scheduler_type="cosin"))
    with pytest.raises(ValueError, match="reduce_lr_on_plateau steps on the held-out loss: set train.eval_steps$"):
        check_schedule(tiny_training(lr_scheduler_type="reduce_lr_on_plateau"))


def caught(call: Callable[[], object]) -> tuple[type[BaseException], BaseException, Any]:
    try:
        call()
    except Exception:
        return sys.exc_info()
    raise AssertionError("it raised nothing")


def test_a_refused_setting_is_one_line_and_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.delenv("FINETUNE_TRACEBACK", raising=False)
    cli.brief_errors("train")
    sys.excepthook(*caught(lambda: params.require(False, "lora.r must be >= 1, got -1")))
    assert capsys.readouterr().err == "train: error: lora.r must be >= 1, got -1\n"
    # a ValueError that Python raised inside our code (int() of a bad environment value) is a bug: its traceback
    sys.excepthook(*caught(lambda: World.from_environ({"RANK": "0,1"})))
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "finetune/training/distributed.py" in err and "train: error" not in err
    monkeypatch.setenv("FINETUNE_TRACEBACK", "1")  # every traceback, when asked
    sys.excepthook(*caught(lambda: params.require(False, "lora.r must be >= 1, got -1")))
    assert capsys.readouterr().err.startswith("Traceback")


def test_the_demos_set_param_flags_read_by_dvc_give_the_demos_params(root: Path, tmp_path: Path) -> None:
    """`make demo` passes its overrides to `dvc exp run` as `-S` flags: DVC's own parser of them (Hydra's grammar)
    reads back every value, the list of benchmark sets included, as `apply_overrides` merges it."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    base = yaml.safe_load((root / "params.yaml").read_text())
    overrides = yaml.safe_load((root / "demo" / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base))
    flags = set_param_flags(overrides)
    dvc_apply_overrides(tmp_path / "params.yaml", flags[1::2])  # the values after each -S
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == apply_overrides(base, overrides)
    assert any(flag.startswith("benchmarks.sets=[{") for flag in flags)  # a list of mappings among them
