"""`patchcore submit`: run a `patchcore` command as a job on a Ray cluster (DESIGN.md §5, infra/README.md).

Goes through Ray's job submission API (the head's dashboard, http://HEAD:8265): ships the working
directory, passes only non-secret environment variables (storage credentials come from the
cluster's own identity), and names the job with a deterministic submission id per nightly run, so
that a second trigger of the same night is refused by Ray instead of scoring the archive twice.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import importlib
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jobs import cli, logs
from jobs.config import parse_config, parse_storage_options
from patchcore_core import storage

log = logging.getLogger("jobs.submit")

# Exit statuses (a waited-for job that fails exits with the job's own status, else 1).
EXIT_USAGE = 2
EXIT_DUPLICATE = 3  # the submission id was used before on this cluster: nothing was submitted
EXIT_UNREACHABLE = 4  # no answer from the job server, or it refused our token

# Environment passed to the job when set here: where the storage is, never who we are. Keys,
# secrets and session tokens stay out of the job (Ray stores runtime envs in the cluster's GCS and
# shows them on the dashboard); the cluster reads them from its instance role / workload identity.
PASSTHROUGH_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")

# Never shipped: environments, VCS data, local outputs (gitignore syntax, relative to the
# working directory; Ray also applies the directory's .gitignore).
EXCLUDES = (".git", ".venv", "venv", "outputs", "out", "demo-out", "patchcore-demo",
            "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache", "build")

NOT_SUBMITTABLE = frozenset({"submit"})
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,126}$")


def build_parser() -> argparse.ArgumentParser:
    """Flags of `patchcore submit` itself (the job's command follows `--`).

    Its `--help` documents every flag with its default and the exit statuses; parse errors exit 2.
    """
    parser = argparse.ArgumentParser(
        prog="patchcore submit",
        usage="patchcore submit [flags] -- COMMAND [command flags]",
        description=(
            "Run `patchcore COMMAND ...` as a Ray job on a cluster. The command is checked with "
            "its own parser before anything is sent. Prints the submission id on stdout; job "
            "logs and progress go to stderr. Token-auth clusters (the Ray 2.60 default): set "
            "RAY_AUTH_MODE=token and put the cluster's token in ~/.ray/auth_token or "
            "RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)."
        ),
        epilog=(
            "exit status: 0 submitted (--no-wait) or succeeded; the job's own status (or 1) when "
            f"it failed or was stopped; {EXIT_USAGE} bad flags or command; {EXIT_DUPLICATE} the "
            f"submission id was used before (nothing submitted); {EXIT_UNREACHABLE} the job "
            "server could not be reached or refused the token."
        ),
        # no prefix matching: a job flag put before `--` by mistake (--work for --workers) must
        # be an error, not --working-dir
        allow_abbrev=False,
    )
    parser.add_argument(
        "--address", default=None, metavar="URL",
        help="job server of the cluster, http://HEAD:8265 (default: $RAY_ADDRESS)",
    )
    ids = parser.add_mutually_exclusive_group()
    ids.add_argument(
        "--submission-id", default=None, metavar="ID",
        help="exact submission id; Ray refuses a second job with the same id "
             "(default: unset = a random id from Ray)",
    )
    ids.add_argument(
        "--nightly-id", default=None, metavar="NAME",
        help="submission id patchcore-NAME-YYYYMMDD for the run date: one job per night "
             "(default: unset)",
    )
    parser.add_argument(
        "--date", default=None, metavar="YYYY-MM-DD",
        help="run date of --nightly-id, e.g. for a backfill (default: today in UTC)",
    )
    parser.add_argument(
        "--working-dir", default=".", metavar="DIR",
        help="project folder shipped to the cluster, shadowing the package in the image; '' = "
             "ship nothing and run the image's installed package (default: .)",
    )
    parser.add_argument(
        "--wait", action=argparse.BooleanOptionalAction, default=True,
        help="follow the job's logs until it ends and exit with its status; --no-wait: print the "
             "submission id and return (default: true)",
    )
    parser.add_argument(
        "--poll-interval", type=float, default=5.0, metavar="SECONDS",
        help="seconds between status checks while waiting (default: 5.0)",
    )
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(submit's own flags, the job's command) around the first `--`.

    Without `--` every word is submit's own and the command is empty (check_command refuses it).
    """
    args = list(argv)
    if "--" not in args:
        return args, []
    cut = args.index("--")
    return args[:cut], args[cut + 1:]


def config_class(command: str) -> type:
    """The job-config dataclass that `patchcore COMMAND` parses its flags into.

    Imports the command's module. ValueError for `submit` itself, an unknown command, a missing
    module, or a module without exactly one *Config dataclass of its own.
    """
    if command in NOT_SUBMITTABLE or command not in cli.COMMANDS:
        allowed = sorted(set(cli.COMMANDS) - NOT_SUBMITTABLE)
        raise ValueError(f"cannot submit {command!r}: choose one of {', '.join(allowed)}")
    module_name = cli.COMMANDS[command][0]
    if importlib.util.find_spec(module_name) is None:
        raise ValueError(f"command {command!r} is not available in this installation "
                         f"(module {module_name} is missing)")
    module = importlib.import_module(module_name)
    # found by the one-config-per-job convention (STYLE.md rule 4) rather than a second table
    found = [
        value for value in vars(module).values()
        if isinstance(value, type) and dataclasses.is_dataclass(value)
        and value.__module__ == module_name and value.__name__.endswith("Config")
    ]
    if len(found) != 1:
        raise ValueError(
            f"cannot check `patchcore {command}` before submitting: {module_name} defines "
            f"{len(found)} *Config dataclasses, expected 1; submit it with `ray job submit` instead"
        )
    return found[0]


def check_command(command: Sequence[str]) -> Any:
    """Parse the job's command with that command's own parser; returns its config.

    An unknown command, flag or value exits with status 2 and the command's usage, here, before
    anything reaches the cluster. Credentials in --storage-options are refused (ValueError), as
    is an empty command. Values are checked here, files and folders only on the cluster.
    """
    if not command:
        raise ValueError("give the job's command after `--`, e.g. "
                         "`patchcore submit -- score --bank s3://b/bank --images s3://b/in --out s3://b/out`")
    name, flags = command[0], list(command[1:])
    config = parse_config(config_class(name), flags, prog=f"patchcore {name}")
    check_no_secrets(config)
    return config


def check_no_secrets(config: Any) -> None:
    """ValueError if the config's --storage-options hold credential keys (values never echoed).

    Keys are looked for at any depth (e.g. `client_kwargs`) with storage.is_secret_key; a config
    without a storage_options field passes.
    """
    text = getattr(config, "storage_options", "")
    if not isinstance(text, str) or not text.strip():
        return
    found = sorted(_secret_keys(parse_storage_options(text)))
    if found:
        raise ValueError(
            f"--storage-options holds credentials ({', '.join(found)}); a job's command is stored "
            "by Ray and shown on its dashboard. Hint: give the cluster an instance role or "
            "workload identity (infra/README.md) and pass only non-secret options such as "
            "endpoint_url"
        )


def _secret_keys(options: Any) -> set[str]:
    """Keys anywhere in a nested JSON object that name a credential."""
    if isinstance(options, Mapping):
        found = {k for k in options if storage.is_secret_key(k)}
        for value in options.values():
            found |= _secret_keys(value)
        return found
    if isinstance(options, list):
        return set().union(*(_secret_keys(v) for v in options)) if options else set()
    return set()


def nightly_submission_id(name: str, date: dt.date) -> str:
    """`patchcore-<name>-<YYYYMMDD>`: the same id for every trigger of one night's run.

    ValueError unless `name` is 1-42 lowercase letters, digits or '-', not at either end.
    """
    if not _NAME.match(name):
        raise ValueError(
            f"--nightly-id must be 1-42 lowercase letters, digits or '-' (not at either end), "
            f"got {name!r}; e.g. screws-line3"
        )
    return f"patchcore-{name}-{date:%Y%m%d}"


def resolve_submission_id(args: argparse.Namespace, today: dt.date) -> str | None:
    """The submission id the flags ask for; None = let Ray pick a random one.

    today: the run date when --date is absent (main passes the UTC date). ValueError for --date
    without --nightly-id, a --date that is not YYYY-MM-DD, or a malformed --submission-id.
    """
    if args.date is not None and args.nightly_id is None:
        raise ValueError("--date only applies to --nightly-id")
    if args.nightly_id is not None:
        date = today
        if args.date is not None:
            try:
                date = dt.date.fromisoformat(args.date)
            except ValueError:
                raise ValueError(f"--date must be YYYY-MM-DD, got {args.date!r}") from None
        return nightly_submission_id(args.nightly_id, date)
    if args.submission_id is not None and not _SUBMISSION_ID.match(args.submission_id):
        raise ValueError(
            f"--submission-id must be 1-127 letters, digits, '_', '.' or '-', starting with a "
            f"letter or digit, got {args.submission_id!r}"
        )
    return args.submission_id


def resolve_address(flag: str | None, environ: Mapping[str, str]) -> str:
    """Job server URL from --address or RAY_ADDRESS (the variable `ray job submit` reads too).

    A bare HOST:PORT gets http://; the result has no trailing '/'. ValueError when neither is
    set, or for a scheme other than http(s) (ray:// serves drivers, not job submission).
    """
    address = (flag or environ.get("RAY_ADDRESS", "")).strip()
    if not address:
        raise ValueError(
            "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS. Hint: "
            "`ray dashboard infra/ray-cluster.yaml` or `kubectl port-forward svc/HEAD-svc 8265` "
            "makes it http://127.0.0.1:8265"
        )
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ValueError(
            f"--address must be the job server's http(s)://HOST:8265 URL, got {address!r} "
            "(ray:// and GCS host:6379 addresses are for drivers, not for job submission)"
        )
    return address.rstrip("/")


def auth_headers(environ: Mapping[str, str], home: Path) -> dict[str, str]:
    """Bearer token for a token-auth cluster, found where Ray's own clients look for it.

    Sent when RAY_AUTH_MODE=token (then RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)
    or when RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH are set explicitly; never with
    RAY_AUTH_MODE=disabled. Built here rather than left to Ray so that it does not depend on
    process-wide Ray state (a local `ray.init()` generates and caches its own token).
    FileNotFoundError when RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token in token mode, is missing.
    """
    mode = environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    path_flag = environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if not token and path_flag:
        path = Path(path_flag).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"RAY_AUTH_TOKEN_PATH={path_flag} is not a file; point it at "
                                    "the cluster's token (`ray get-auth-token` on the head prints it)")
        token = path.read_text().strip()
    if not token and mode == "token":
        path = home / ".ray" / "auth_token"
        if not path.is_file():
            raise FileNotFoundError(
                "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or write the cluster's "
                f"token to {path} (`ray get-auth-token` on the head prints it)"
            )
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def runtime_env(working_dir: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """Ray runtime_env of the job: shipped project folder plus the non-secret passthrough vars.

    Keys: working_dir (absolute) and excludes when `working_dir` is not ''; env_vars when any
    PASSTHROUGH_ENV variable is set. ValueError when `working_dir` is not the project root.
    """
    env: dict[str, Any] = {}
    if working_dir:
        root = Path(working_dir).expanduser().resolve()
        # caught here: a wrong folder would only show on the cluster, after the upload
        if not (root / "jobs" / "cli.py").is_file() or not (root / "patchcore_core").is_dir():
            raise ValueError(
                f"--working-dir {working_dir} is not the patchcore project folder (no jobs/cli.py "
                "and patchcore_core/ in it). Hint: run from the repository root, pass its path, "
                "or pass --working-dir '' to run the package installed in the cluster's image"
            )
        env["working_dir"] = str(root)
        env["excludes"] = list(EXCLUDES)
    env_vars = {name: environ[name] for name in PASSTHROUGH_ENV if environ.get(name)}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def entrypoint(command: Sequence[str]) -> str:
    """Shell command the cluster runs. `python -m jobs` (not the `patchcore` script) so that a
    shipped working directory, which Ray puts first on the job's path, wins over the image's copy."""
    return shlex.join(["python", "-m", "jobs", *command])


def submit(client: Any, command: Sequence[str], submission_id: str | None,
           env: dict[str, Any]) -> str:
    """Submit; returns the submission id. RuntimeError('... already exists') on a reused id.

    client: a ray.job_submission.JobSubmissionClient; env: `runtime_env`'s result. The metadata
    (who submitted, which command) shows on the Ray dashboard.
    """
    return client.submit_job(
        entrypoint=entrypoint(command),
        submission_id=submission_id,
        runtime_env=env,
        metadata={"submitted_by": "patchcore submit", "patchcore_command": command[0]},
    )


async def _follow_logs(client: Any, job_id: str) -> None:
    """Copy the job's log stream to stderr until the server closes it (the job ended)."""
    async for chunk in client.tail_job_logs(job_id):
        sys.stderr.write(chunk)
        sys.stderr.flush()


def wait_for(client: Any, job_id: str, *, poll_interval: float, follow_logs: bool = True) -> int:
    """Follow the job to its end; returns 0 on SUCCEEDED, else the driver's exit status or 1.

    Logs go to stderr (follow_logs); then the status is polled every `poll_interval` seconds
    until it is terminal (the log stream may end or drop before the status does).
    """
    if follow_logs:
        import aiohttp  # ray[default]'s HTTP client, which tail_job_logs uses

        try:
            asyncio.run(_follow_logs(client, job_id))
        except (RuntimeError, OSError, aiohttp.ClientError) as err:
            # the log stream dropped (proxy timeout, head restart); the job may still run
            log.warning("lost the log stream of %s (%s); polling its status instead", job_id, err)
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            break
        time.sleep(poll_interval)
    log.info("job %s ended: %s%s", job_id, info.status.value,
             f" ({info.message})" if info.message else "")
    if info.status.value == "SUCCEEDED":
        return 0
    code = info.driver_exit_code  # None when the driver never started
    return code if isinstance(code, int) and code > 0 else 1


def main(argv: Sequence[str] | None = None) -> None:
    """`patchcore submit [flags] -- COMMAND [command flags]`; see `--help` for exit statuses.

    Prints the submission id on stdout. Exits 2 for bad flags or a bad command, 3 when the
    submission id was used before, 4 when the job server is unreachable or refuses the token,
    and, with --wait, with the job's status when it fails.
    """
    own, command = split_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)  # unknown flags before `--` exit 2 here
    logs.setup_logging()
    try:  # every local check before the first request: a bad command never reaches the cluster
        check_command(command)  # exits 2 with the command's own usage on a bad flag or value
        submission_id = resolve_submission_id(args, dt.datetime.now(dt.timezone.utc).date())
        address = resolve_address(args.address, os.environ)
        env = runtime_env(args.working_dir, os.environ)
        headers = auth_headers(os.environ, Path.home())
        if args.poll_interval <= 0:
            raise ValueError(f"--poll-interval must be > 0 seconds, got {args.poll_interval}")
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    log.info("submit %s", json.dumps({
        "address": address, "submission_id": submission_id, "entrypoint": entrypoint(command),
        "working_dir": env.get("working_dir", ""), "env_vars": sorted(env.get("env_vars", {})),
        "token_auth": bool(headers),
    }))

    # Ray's job SDK (requests, pydantic) only once the checks above have passed
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address, headers=headers)
        job_id = submit(client, command, submission_id, env)
    except AuthenticationError as err:
        print(f"patchcore submit: error: {address} refused the request: {err}\nHint: set "
              "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's "
              "token; `ray get-auth-token` on the head prints it", file=sys.stderr)
        raise SystemExit(EXIT_UNREACHABLE) from None
    except ConnectionError as err:
        print(f"patchcore submit: error: no job server at {address}: {err}", file=sys.stderr)
        raise SystemExit(EXIT_UNREACHABLE) from None
    except RuntimeError as err:
        # Ray answers a reused id with HTTP 400 "Job with submission_id ... already exists"
        if "already exists" not in str(err):
            raise
        print(f"patchcore submit: error: submission id {submission_id!r} was already used on this "
              "cluster, so this trigger is a duplicate and nothing was submitted. Check it with "
              f"`ray job status --address {address} {submission_id}`; to rerun after a failure "
              "(outputs resume from their committed shards), pass a new --submission-id",
              file=sys.stderr)
        raise SystemExit(EXIT_DUPLICATE) from None
    print(job_id, flush=True)
    log.info("submitted %s; logs: ray job logs --address %s --follow %s", job_id, address, job_id)
    if args.wait:
        status = wait_for(client, job_id, poll_interval=args.poll_interval)
        if status:
            raise SystemExit(status)


if __name__ == "__main__":
    main()
