"""infra/: the manifests parse, Ray's own schema accepts the cluster config, every `patchcore` command
they and infra/README.md contain parses with the CLI's own parsers, the RayJob has the safety
settings of the issue, and the Dockerfile installs the project with the README's extras."""

from __future__ import annotations

import copy
import datetime as dt
import re
import shlex
import subprocess
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from jobs import submit

ROOT = Path(__file__).parents[1]
INFRA = ROOT / "infra"
MANIFESTS = ("ray-cluster.yaml", "rayjob.yaml", "nightly-cronjob.yaml")
SEPARATORS = {"&&", "||", "|", ";", "&"}


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((INFRA / name).read_text()) if doc is not None]


def strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def readme_shell_lines(path: Path) -> list[str]:
    """Lines of the ```bash blocks of a Markdown file, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.DOTALL)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def patchcore_commands(text: str) -> list[list[str]]:
    """argv after `patchcore` or `python -m jobs` in one shell line, up to a shell separator."""
    tokens = shlex.split(text, comments=True)
    found = []
    for i, token in enumerate(tokens):
        if token == "patchcore":
            start = i + 1
        elif tokens[i:i + 3] == ["python", "-m", "jobs"]:
            start = i + 3
        else:
            continue
        end = next((j for j in range(start, len(tokens)) if tokens[j] in SEPARATORS), len(tokens))
        if end > start:  # a bare `patchcore` is a name (container, label), not a command
            found.append(tokens[start:end])
    return found


def check_invocation(argv: list[str]) -> str:
    """Parse `patchcore *argv` with the parsers the CLI would use; returns the job's command name.

    A bad command, flag or value fails the test (SystemExit 2 / ValueError with the reason).
    """
    if argv[0] != "submit":
        submit.check_command(argv)
        return argv[0]
    own, command = submit.split_argv(argv[1:])
    args = submit.build_parser().parse_args(own)
    submit.resolve_submission_id(args, dt.date(2026, 1, 2))
    submit.check_command(command)
    return command[0]


def all_commands() -> list[tuple[str, list[str]]]:
    found = [(name, argv) for name in MANIFESTS for doc in load(name) for text in strings(doc)
             for argv in patchcore_commands(text)]
    found += [("README.md", argv) for line in readme_shell_lines(INFRA / "README.md")
              for argv in patchcore_commands(line)]
    return found


def test_every_manifest_parses_as_yaml() -> None:
    kinds = {name: [doc.get("kind") for doc in load(name)] for name in MANIFESTS}
    assert kinds["rayjob.yaml"] == ["ServiceAccount", "RayJob"]
    assert kinds["nightly-cronjob.yaml"] == ["ServiceAccount", "RayCluster", "CronJob"]
    assert "available_node_types" in load("ray-cluster.yaml")[0]


@pytest.mark.parametrize("where, argv", all_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_every_patchcore_command_in_infra_parses_with_the_clis_own_parser(where: str, argv: list[str]) -> None:
    check_invocation(argv)


def test_infra_runs_fit_and_score_and_the_rayjob_scores() -> None:
    by_file: dict[str, set[str]] = {}
    for where, argv in all_commands():
        by_file.setdefault(where, set()).add(check_invocation(argv))
    assert by_file["rayjob.yaml"] == {"score"}
    assert by_file["nightly-cronjob.yaml"] == {"score"}
    assert {"fit", "score"} <= by_file["README.md"]


def test_ray_cluster_config_passes_rays_own_schema_and_its_head_does_no_work() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("ray-cluster.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--num-gpus=0" in head_start
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    cpu = [t for t in workers.values() if t["node_config"]["InstanceType"].startswith(("c", "m"))]
    assert len(gpu) == 1 and gpu[0]["max_workers"] > gpu[0]["min_workers"]  # autoscaling GPUs
    assert gpu[0]["docker"]["worker_image"].endswith(":gpu")
    assert len(cpu) == 1 and cpu[0]["min_workers"] == 0
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())


def test_rayjob_is_a_safe_nightly_run_with_the_submit_commands_id() -> None:
    account, job = load("rayjob.yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1  # safe: outputs are exactly-once, a retry resumes
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # same id per night as `patchcore submit --nightly-id score`, and the RayJob's name
    date = dt.date(2026, 1, 2)
    fill = {"NIGHTLY_DATE": f"{date:%Y%m%d}"}
    assert string.Template(spec["jobId"]).substitute(fill) == submit.nightly_submission_id("score", date)
    assert string.Template(job["metadata"]["name"]).substitute(fill) == submit.nightly_submission_id("score", date)
    # every pod runs as the workload-identity service account and carries no credentials
    annotations = account["metadata"]["annotations"]
    assert any(key in annotations for key in ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account",
                                              "azure.workload.identity/client-id"))
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
        for container in template["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu_groups) == 1 and gpu_groups[0]["maxReplicas"] > gpu_groups[0]["minReplicas"]


def test_no_credentials_in_infra_files() -> None:
    secret = re.compile(r"AKIA[0-9A-Z]{16}|(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN)\s*[:=]")
    for path in sorted(INFRA.iterdir()):
        assert not secret.search(path.read_text()), path.name


def _dockerfile_args(text: str) -> dict[str, str]:
    return {name: shlex.split(value)[0] if value.strip() else ""
            for name, value in re.findall(r"^ARG (\w+)=(.*)$", text, flags=re.MULTILINE)}


def _extras(text: str) -> set[str]:
    return {e.strip() for e in text.split(",") if e.strip()}


def _closure(extras: set[str], optional: dict[str, list[str]]) -> set[str]:
    """Requirement names the extras install, following `patchcore-at-scale[...]` self-references."""
    names: set[str] = set()
    todo = list(extras)
    while todo:
        for text in optional[todo.pop()]:
            req = Requirement(text)
            if req.name == "patchcore-at-scale":
                todo += sorted(req.extras)
            else:
                names.add(req.name)
    return names


def test_every_install_gets_exactly_one_faiss() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = pyproject["optional-dependencies"]
    assert not [r for r in pyproject["dependencies"] if Requirement(r).name.startswith("faiss")]
    faiss_of = {extra: {n for n in _closure({extra}, optional) if n.startswith("faiss")}
                for extra in optional}
    assert faiss_of["cpu"] == {"faiss-cpu"} and faiss_of["gpu"] == {"faiss-gpu-cu12"}
    assert faiss_of["dev"] == {"faiss-cpu"}  # `pip install -e '.[dev]'`: CPU machines and CI
    assert faiss_of["test"] == set()  # `.[gpu,test]` on GPU machines
    assert all(len(found) <= 1 for found in faiss_of.values()), faiss_of


def test_dockerfile_installs_the_project_with_the_readmes_extras_plus_gpu() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(pyproject["optional-dependencies"])
    text = (INFRA / "Dockerfile").read_text()
    args = _dockerfile_args(text)
    cpu, gpu = _extras(args["CPU_EXTRAS"]), _extras(args["GPU_EXTRAS"])
    readme = re.findall(r"pip install -e '\.\[([^\]]*)\]'", (ROOT / "README.md").read_text())
    assert readme, "README.md lost its `pip install -e '.[...]'` line"
    # test tools stay out of the image; `dev` = `cpu` + test tools
    runtime = set().union(*map(_extras, readme)) - {"dev", "test"}
    assert (cpu | gpu) <= declared
    assert runtime <= cpu and "cpu" in cpu and gpu == (cpu - {"cpu"}) | {"gpu"}
    # one pip install, every pin from pyproject.toml; the gpu extra alone brings faiss
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    installs = re.findall(r"pip install ([^;\n\\]*)", code)
    assert installs == ['--no-cache-dir $index "$target"'], installs
    assert "uninstall" not in code
    assert 'target=".[$extras]"' in text and 'target="."' in text
    # the base image's Python satisfies requires-python
    version = args["PYTHON_VERSION"]
    assert f"{version}.0" in SpecifierSet(pyproject["requires-python"])
    # every node must run Ray's job server: ray[default] with the same pin as the rest
    ray = [Requirement(r) for r in pyproject["dependencies"] if Requirement(r).name == "ray"]
    assert len(ray) == 1 and "default" in ray[0].extras, (
        "pyproject.toml must depend on ray[data,default]: the dashboard's job server (and the "
        "`patchcore submit` client) need the `default` extra"
    )


def test_nightly_cronjob_submits_one_incremental_run_a_night_to_the_rayclusters_job_server(
    tmp_path: Path,
) -> None:
    account, cluster, cron = load("nightly-cronjob.yaml")
    spec = cron["spec"]
    assert spec["timeZone"] == "Etc/UTC" and spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5 and spec["schedule"].split()[2:] == ["*", "*", "*"]
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == account["metadata"]["name"]
    (container,) = pod["containers"]
    script = container["args"][0]
    ((where, argv),) = [(w, a) for w, a in all_commands() if w == "nightly-cronjob.yaml"]
    own, command = submit.split_argv(argv[1:])
    args = submit.build_parser().parse_args(own)
    # the submission id is deterministic per night, and the command is an incremental score run
    date = dt.date(2026, 1, 2)
    assert submit.resolve_submission_id(args, date) == submit.nightly_submission_id("screws", date)
    assert args.wait is False and args.working_dir == ""
    assert command[0] == "score" and "--incremental" in command
    # the job server is the RayCluster's head Service, reached with the cluster's token
    assert args.address == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == cluster["metadata"]["name"]
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # bad flags (exit 2) end the Job; the wrapper turns "already submitted tonight" (3) into done
    rules = job["podFailurePolicy"]["rules"]
    assert rules == [{"action": "FailJob",
                      "onExitCodes": {"containerName": "submit", "operator": "In", "values": [2]}}]
    fake = tmp_path / "python"  # stands in for `python -m jobs submit` with a given exit status
    for submit_status, pod_status in ((0, 0), (3, 0), (4, 4), (2, 2)):
        fake.write_text(f"#!/bin/sh\nexit {submit_status}\n")
        fake.chmod(0o755)
        result = subprocess.run(["sh", "-c", script], env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
                                capture_output=True, timeout=30)
        assert result.returncode == pod_status, (submit_status, result.stderr)


def test_cluster_images_keep_idle_task_workers_as_long_as_a_local_ray() -> None:
    from jobs import cluster

    env = re.search(r"RAY_idle_worker_killing_time_threshold_ms=(\d+)", (INFRA / "Dockerfile").read_text())
    assert env and int(env.group(1)) == cluster.IDLE_WORKER_KEEP_MS
