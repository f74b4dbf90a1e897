"""Working as a team: DVC's remote on a real S3 server, the MLflow tracking server on PostgreSQL with basic auth.

One set of services for the module (`tools.servers.local_team`: SeaweedFS, PostgreSQL, `mlflow server`, on free
ports, data in temporary folders). Alice's clone runs the demo pipeline (a short training: `SHORT`) against them and
shares it, following the README's "Working as a team" commands (each command run here is checked to be in that
section, as written); Bob clones, pulls, runs an experiment on a branch and shares it; then each takes the other's
adapter with `dvc pull`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_pipeline import clean_env, data_stages_run, dvc, ran_stages, repo, run  # noqa: F401  (the fixtures, reused)

from demo.run import apply_overrides
from finetune.data.files import file_hash
from finetune.tracking.records import MAX_PARAM_VALUE, MAX_RUN_NAME, log_settings, run_name
from tools.servers import BUCKET, Team, free_port, local_team, team_environment

# in every clone's environment, as on a machine with Hub access; made here, so that no file of the project holds it
HF_TOKEN = f"hf_{secrets.token_hex(16)}"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("data/raw", "data/sharegpt", "data/standardized", "data/tokenized", "models/adapter")  # DVC-cached outputs
ADAPTER = "models/adapter/adapter_model.safetensors"
EXPERIMENT, MODEL = "finance-deepseek", "finance-deepseek-adapter"
KEYS = (  # docs/team.md's commands that give a clone the bucket's keys
    'dvc remote modify --local team access_key_id "$AWS_ACCESS_KEY_ID"',
    'dvc remote modify --local team secret_access_key "$AWS_SECRET_ACCESS_KEY"',
)
SHARE = 'git add -A && git commit -m "results" && git push -u origin HEAD'
# the demo's settings with a short training and evaluation: what is shared is under test here, not what is learnt
STEPS = 6
SHORT = {
    "train": {"max_steps": STEPS, "eval_steps": 3, "eval_rows": 8},
    "evaluate": {"max_rows": 8, "num_samples": 2, "max_new_tokens": 4},
    "benchmarks": {"max_new_tokens": 4},
}


def readme_commands(section: str = "Working as a team") -> set[str]:
    """Every command line of the bash blocks of a section of docs/team.md, without trailing comments."""
    text = (ROOT / "docs/team.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = (line for block in re.findall(r"```bash\n(.*?)```", body, re.S) for line in block.splitlines())
    return {re.sub(r"\s+#.*$", "", line).strip() for line in lines if line.strip() and not line.startswith("#")}


README = readme_commands()


def follow(command: str, cwd: Path, env: Mapping[str, str]) -> str:
    """Run one of docs/team.md's team commands as written, in bash; its output."""
    assert command in README, f"not a command of docs/team.md's 'Working as a team': {command}"
    return run(["bash", "-euo", "pipefail", "-c", command], cwd, env)


def digests(clone: Path) -> dict[str, str]:
    """SHA-256 of every file of the DVC-cached outputs."""
    files = sorted(path for folder in SHARED for path in (clone / folder).rglob("*") if path.is_file())
    return {str(path.relative_to(clone)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def wipe(clone: Path) -> None:
    """Delete DVC's cache and every cached output: only git's files are left."""
    for folder in (".dvc/cache", *SHARED):
        shutil.rmtree(clone / folder)


@dataclass
class Engineer:
    name: str
    clone: Path
    env: dict[str, str]  # the team's stores and this engineer's MLflow user
    log: list[tuple[str, str]] = field(default_factory=list)  # (command, what it printed), for the secrets test

    def follow(self, *commands: str) -> str:
        """Run docs/team.md's commands in this clone, in order; the last one's output."""
        for command in commands:
            self.log.append((command, follow(command, self.clone, self.env)))
        return self.log[-1][1]

    def dvc(self, *args: str) -> str:
        self.log.append((f"dvc {' '.join(args)}", dvc(*args, cwd=self.clone, env=self.env)))
        return self.log[-1][1]

    def said(self, command: str) -> str:
        """What the last run of `command` printed."""
        return next(output for done, output in reversed(self.log) if done == command)


def api(
    team: Team, endpoint: str, auth: tuple[str, str] | None, body: dict[str, Any] | None = None, **query: Any
) -> Any:
    """The tracking server's REST API as `auth` (user, password) or anonymously: GET with `query`, or POST `body`;
    the JSON answer."""
    request = urllib.request.Request(
        f"{team.mlflow_url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    """SeaweedFS, PostgreSQL and the MLflow server; one that cannot start fails the tests with its log."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # MLflow's GenAI job runner: 8 processes unused
        with local_team(tmp_path_factory.mktemp("team"), free_port(), free_port()) as running:
            yield running


@pytest.fixture(scope="module")
def users(team: Team) -> dict[str, str]:
    """Alice and Bob, added by the admin with docs/team.md's command; their passwords."""
    passwords = {"alice": "alice-" + hashlib.sha256(b"a").hexdigest()[:16], "bob": "bob-" + "5e1f" * 5}
    admin = {"MLFLOW_TRACKING_URI": team.mlflow_url, "MLFLOW_TRACKING_USERNAME": team.admin[0]}
    for name, password in passwords.items():
        command = [sys.executable, "-m", "tools.servers", "add-user", name]
        env = clean_env() | admin | {"MLFLOW_TRACKING_PASSWORD": team.admin[1]}
        subprocess.run(command, cwd=ROOT, env=env, input=password + "\n", text=True, check=True, capture_output=True)
    return passwords


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The team's git server: a bare repository."""
    origin = tmp_path_factory.mktemp("origin") / "finance.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], origin.parent)
    return origin


@pytest.fixture(scope="module")
def alice(repo: Path, origin: Path, team: Team, users: dict[str, str]) -> Engineer:  # noqa: F811
    """The project's first clone: the remote set up once, the demo pipeline run on the team's stores, shared."""
    alice = Engineer("alice", repo, team_environment(team, "alice", users["alice"]) | {"HF_TOKEN": HF_TOKEN})
    params = apply_overrides(yaml.safe_load((repo / "params.yaml").read_text()), SHORT)  # an unknown key refused
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "the team's settings: a short training and evaluation"], repo)
    run(["git", "branch", "-M", "main"], repo)
    run(["git", "remote", "add", "origin", str(origin)], repo)
    alice.follow(
        "dvc remote add -d team s3://finance-deepseek/dvc",
        'dvc remote modify team endpointurl "$S3_ENDPOINT"',
        'git add .dvc/config && git commit -m "DVC remote: the team\'s bucket" && git push -u origin HEAD',
        *KEYS,
    )
    alice.dvc("repro")
    alice.follow("dvc push", SHARE)
    return alice


@pytest.fixture(scope="module")
def bob(
    alice: Engineer, origin: Path, team: Team, users: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Engineer:
    """A second clone: takes Alice's results, runs `lora.r=8` on a branch of its own and shares it."""
    clone = tmp_path_factory.mktemp("bob") / "finance"
    run(["git", "clone", "-q", str(origin), str(clone)], clone.parent)
    run(["git", "config", "user.name", "Bob"], clone)
    run(["git", "config", "user.email", "bob@example.com"], clone)
    bob = Engineer("bob", clone, team_environment(team, "bob", users["bob"]) | {"HF_TOKEN": HF_TOKEN})
    bob.follow(*KEYS, "git pull && dvc pull dvc.yaml")
    # the demo's tiny model is built, not versioned (`make demo` builds it): Alice's build, the same files
    shutil.copytree(alice.clone / "models/tiny-deepseek", clone / "models/tiny-deepseek")
    bob.dvc("repro", "--dry")
    bob.follow("git checkout -b rank-8", "dvc exp run -S lora.r=8", "dvc push", SHARE)
    return bob


def training_runs(team: Team, auth: tuple[str, str]) -> list[dict[str, Any]]:
    """The runs of the shared experiment that trained an adapter, oldest first, as the REST API gives them."""
    experiment = api(team, "experiments/get-by-name", auth, experiment_name=EXPERIMENT)["experiment"]
    search = {"experiment_ids": [experiment["experiment_id"]], "order_by": ["attributes.start_time ASC"]}
    found = api(team, "runs/search", auth, search)
    return [r for r in found["runs"] if any(t["key"] == "adapter_sha256" for t in r["data"].get("tags", []))]


def test_a_request_without_a_valid_user_is_refused(team: Team, users: dict[str, str]) -> None:
    for auth in (None, ("alice", "not-her-password"), ("mallory", users["alice"])):
        with pytest.raises(urllib.error.HTTPError) as refused:
            api(team, "experiments/search", auth, max_results=1)
        assert refused.value.code == 401, auth
    # a valid user's request is answered: the experiment that MLflow makes in a new store, id 0
    found = api(team, "experiments/search", ("alice", users["alice"]), max_results=1, filter="name = 'Default'")
    assert [(e["experiment_id"], e["name"]) for e in found["experiments"]] == [("0", "Default")], found


def test_the_run_on_the_server_has_params_step_metrics_inputs_evaluation_adapter_and_version(
    team: Team, alice: Engineer, users: dict[str, str]
) -> None:
    auth = ("alice", users["alice"])
    (run_,) = training_runs(team, auth)
    info, data = run_["info"], run_["data"]
    # make mlflow-ui with the server as the store: the server's own runs page, no local UI started (a hang)
    shown = alice.follow("python -m tools.mlflow_ui")
    assert f"{team.mlflow_url}/#/experiments/{info['experiment_id']}/runs?viewStateShareKey=lora-and-results" in shown
    assert info["status"] == "FINISHED" and info["user_id"] == "alice"
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["lora.r"] == "4" and params["train.max_steps"] == str(STEPS)
    history = api(team, "metrics/get-history", auth, run_id=info["run_id"], metric_key="loss")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, STEPS + 1))
    lock = (alice.clone / "dvc.lock").read_text()
    inputs = {i["dataset"]["name"]: i["dataset"]["digest"] for i in run_["inputs"]["dataset_inputs"]}
    assert inputs == {
        f"tokenized/{n}": file_hash(alice.clone / "data/tokenized" / n) for n in ("train.arrow", "eval.arrow")
    }
    metrics = {m["key"]: m["value"] for m in data["metrics"]}
    evaluation = json.loads((alice.clone / "metrics/evaluate.json").read_text())
    assert metrics["evaluate/tuned_loss"] == pytest.approx(evaluation["tuned_loss"])
    assert {"evaluate/base_loss", "evaluate/tuned_rouge_l", "train/train_loss"} <= set(metrics)
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["dvc_lock.data/tokenized"] in lock

    # the adapter: listed by the server, its bytes in the bucket, under mlflow/
    listed = api(team, "artifacts/list", auth, run_id=info["run_id"], path="adapter")["files"]
    assert "adapter/adapter_model.safetensors" in {f["path"] for f in listed}
    assert info["artifact_uri"].startswith("mlflow-artifacts:/")
    keys = [o["Key"] for o in team.s3.client().list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])]
    (key,) = [k for k in keys if info["run_id"] in k and k.endswith("adapter/adapter_model.safetensors")]
    stored = team.s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert stored == (alice.clone / ADAPTER).read_bytes()

    versions = api(team, "model-versions/search", auth, filter=f"name = '{MODEL}'")["model_versions"]
    assert [v["run_id"] for v in versions] == [info["run_id"]]
    assert versions[0]["source"].endswith("/adapter")


def test_push_then_pull_into_an_empty_cache_gives_the_same_bytes_and_repro_runs_nothing(alice: Engineer) -> None:
    clone, before = alice.clone, digests(alice.clone)
    assert ADAPTER in before and "data/tokenized/train.arrow" in before
    wipe(clone)
    assert not (clone / ADAPTER).exists()
    alice.follow("git pull && dvc pull dvc.yaml")
    assert digests(clone) == before
    output = alice.dvc("repro")
    assert ran_stages(output) == set() and "Data and pipelines are up to date" in output


def test_two_clones_share_one_experiment_and_pull_each_others_adapters(
    team: Team, alice: Engineer, bob: Engineer, users: dict[str, str]
) -> None:
    alices = digests(alice.clone)
    # Bob's fresh clone had nothing to run after its pull; his experiment reran train and evaluate only
    assert "Data and pipelines are up to date" in bob.said("dvc repro --dry")
    assert ran_stages(bob.said("dvc exp run -S lora.r=8")) == {"train", "evaluate"}
    bobs = digests(bob.clone)
    assert bobs[ADAPTER] != alices[ADAPTER]
    assert {k: v for k, v in bobs.items() if k.startswith("data/")} == {
        k: v for k, v in alices.items() if k.startswith("data/")
    }

    # one experiment on the server, both runs in it, each by its engineer, both adapters registered
    runs = training_runs(team, ("bob", users["bob"]))
    assert [r["info"]["user_id"] for r in runs] == ["alice", "bob"]
    assert [{p["key"]: p["value"] for p in r["data"]["params"]}["lora.r"] for r in runs] == ["4", "8"]
    versions = api(team, "model-versions/search", ("alice", users["alice"]), filter=f"name = '{MODEL}'")
    assert {v["run_id"] for v in versions["model_versions"]} == {r["info"]["run_id"] for r in runs}

    # either clone, from an empty cache, gets either adapter with `dvc pull`
    wipe(alice.clone)
    alice.follow("git fetch && git checkout rank-8 && dvc pull dvc.yaml")
    assert digests(alice.clone) == bobs
    wipe(bob.clone)
    bob.follow("git checkout main && dvc pull dvc.yaml")
    assert digests(bob.clone) == alices
    assert ran_stages(bob.dvc("repro")) == set()


def test_no_secret_reaches_git_dvc_lock_params_mlflow_or_a_log(
    team: Team, users: dict[str, str], alice: Engineer, bob: Engineer, origin: Path
) -> None:
    planted = {
        "bucket secret key": team.s3.secret_key,
        "alice's password": users["alice"],
        "bob's password": users["bob"],
        "admin password": team.admin[1],
        "PostgreSQL password": team.postgres.password,
        "Hugging Face token": HF_TOKEN,
    }
    history = run(["git", "log", "-p", "--all"], origin)
    places = {"git history": history, "server logs": "".join(s.log_tail(10**7) for s in team.services)}
    for engineer in (alice, bob):
        places[f"{engineer.name}'s command output"] = "\n".join(output for _, output in engineer.log)
        for name in ("dvc.lock", "params.yaml", ".dvc/config"):
            places[f"{engineer.name}'s {name}"] = (engineer.clone / name).read_text()
    for run_ in training_runs(team, ("alice", users["alice"])):
        data = run_["data"]
        places[f"run {run_['info']['run_name']}"] = json.dumps([data["params"], data["tags"]])
    for what, text in places.items():
        for secret_name, secret in planted.items():
            assert secret not in text, f"the {secret_name} is in the {what}"
    for engineer in (alice, bob):  # the token is in no file of the clones (data, adapter, metrics, DVC's cache)
        for path in engineer.clone.rglob("*"):
            assert not path.is_file() or HF_TOKEN.encode() not in path.read_bytes(), path
    # the keys are where docs/team.md put them: a file git ignores
    assert team.s3.secret_key in (alice.clone / ".dvc/config.local").read_text()
    assert run(["git", "check-ignore", ".dvc/config.local"], alice.clone).strip() == ".dvc/config.local"


def test_values_that_sqlite_takes_and_postgres_refuses_are_shortened_first(team: Team, users: dict[str, str]) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    template = "{% for m in messages %}\x00" + "x" * 7000  # a NUL and a very long value, as a chat.template might be
    name = run_name({"DVC_EXP_NAME": "e" * 300}, "0a1b2c3")
    env = team_environment(team, "alice", users["alice"])
    with pytest.MonkeyPatch.context() as patch:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            patch.setenv(key, env[key])
        mlflow.set_tracking_uri(team.mlflow_url)
        experiment = mlflow.set_experiment("storable")
        with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=name) as run_:
            with pytest.raises(MlflowException, match="NUL"):  # as they are: PostgreSQL refuses the value
                mlflow.log_param("chat.template", template)
            log_settings({"chat.template": template}, {"note": "a\x00b"})
        logged = mlflow.get_run(run_.info.run_id)
    assert len(name) == MAX_RUN_NAME and logged.info.run_name == name
    value = logged.data.params["chat.template"]
    assert len(value) == MAX_PARAM_VALUE and value.startswith("{% for m in messages %}\\x00xxx")
    assert f"{len(template) + 3} chars, sha256" in value  # the NUL written as 4 characters
    assert logged.data.tags["note"] == "a\\x00b"
