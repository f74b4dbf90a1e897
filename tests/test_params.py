"""The pipeline's files agree with each other: every stage has its script and its params, and they load."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from demo.run import apply_overrides, set_param_flags
from stages import params
from stages.chat import ChatConfig
from stages.evaluate import EvaluateConfig
from stages.export import ExportConfig
from stages.fetch import FetchConfig
from stages.model import ModelConfig
from stages.standardize import StandardizeConfig
from stages.to_sharegpt import ToSharegptConfig
from stages.tracking import TrackingConfig
from stages.train import LoraConfig, TrainConfig

CONFIGS = {
    "fetch": FetchConfig,
    "to_sharegpt": ToSharegptConfig,
    "standardize": StandardizeConfig,
    "model": ModelConfig,
    "chat": ChatConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "tracking": TrackingConfig,
}
STAGES = ["fetch", "to_sharegpt", "standardize", "train", "evaluate"]


def dvc_stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def test_stages_are_the_pipeline_in_order(root: Path) -> None:
    assert list(dvc_stages(root)) == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_stage_has_its_script_params_and_deps(root: Path, stage: str) -> None:
    definition = dvc_stages(root)[stage]
    assert definition["cmd"].startswith(f"python -m stages.{stage} ")
    script = root / "stages" / f"{stage}.py"
    assert f"stages/{stage}.py" in definition["deps"]
    assert stage in definition["params"]
    # every stages/ module the script imports is a dependency, so DVC reruns the stage when it changes
    imported = set(re.findall(r"^from stages(?:\.(\w+))? import (\w+)", script.read_text(), flags=re.M))
    modules = {module or name for module, name in imported}
    for module in modules:
        assert f"stages/{module}.py" in definition["deps"], f"{stage} imports stages/{module}.py"


def test_the_optional_export_stage_has_its_script_params_and_deps(root: Path) -> None:
    (name,) = yaml.safe_load((root / "export/dvc.yaml").read_text())["stages"]
    definition = yaml.safe_load((root / "export/dvc.yaml").read_text())["stages"][name]
    assert name == "export" and definition["wdir"] == ".."  # paths relative to the repo root, like dvc.yaml's
    assert definition["cmd"].startswith("python -m stages.export ") and "export" in definition["params"]
    imported = re.findall(r"^from stages(?:\.(\w+))? import", (root / "stages/export.py").read_text(), flags=re.M)
    assert {f"stages/{m}.py" for m in imported if m} | {"stages/export.py"} <= set(definition["deps"])


@pytest.mark.parametrize("section", list(CONFIGS))
def test_every_params_section_loads(root: Path, section: str) -> None:
    params.load(CONFIGS[section], root / "params.yaml", section)


def test_params_sections_are_the_known_ones(root: Path) -> None:
    assert set(yaml.safe_load((root / "params.yaml").read_text())) == set(CONFIGS)


def test_every_params_key_is_commented(root: Path) -> None:
    for number, line in enumerate((root / "params.yaml").read_text().splitlines(), 1):
        if line.startswith("  ") and ":" in line:
            assert "  # " in line, f"params.yaml:{number} has no comment: {line.strip()}"


def test_demo_overrides_name_real_keys_and_load(root: Path, tmp_path: Path) -> None:
    base = yaml.safe_load((root / "params.yaml").read_text())
    merged = apply_overrides(base, yaml.safe_load((root / "demo" / "params.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merged))
    for section, cls in CONFIGS.items():
        params.load(cls, tmp_path / "params.yaml", section)
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
        (FetchConfig, "fetch", {"eval_size": 0}, "fetch.eval_size must be >= 1"),
        (ModelConfig, "model", {"dtype": "fp8"}, "model.dtype must be one of"),
        (ToSharegptConfig, "to_sharegpt", {"conversation_extension": 0}, "to_sharegpt.conversation_extension"),
        (EvaluateConfig, "evaluate", {"batch_size": 0}, "evaluate.batch_size must be >= 1"),
    ],
)
def test_bad_values_are_named(root: Path, cls: type, section: str, bad: dict, message: str) -> None:
    raw = {**params.read_section(root / "params.yaml", section), **bad}
    with pytest.raises(ValueError, match=re.escape(message)):
        params.build(cls, raw, section)
