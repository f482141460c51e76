"""The `patchcore` command: dispatches `patchcore COMMAND ...` to `jobs.COMMAND.main(argv)` (DESIGN.md §5).

Owns the command table and the top-level usage. Must not parse a command's flags (each job's
`parse_config` does) or import a job module before its command is chosen (most import torch or
Ray).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

# command -> (module whose `main(argv)` runs it, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("jobs.fit", "extract features and select a coreset bank in one job"),
    "extract": ("jobs.extract", "extract patch features into a sharded Parquet feature store"),
    "coreset": ("jobs.coreset", "select a coreset memory bank from a feature store"),
    "score": ("jobs.score", "score images with a bank: scores, anomaly maps, masks"),
    "evaluate": ("jobs.evaluate", "image AUROC, pixel AUROC and PRO of scored results"),
    "demo": ("jobs.demo", "make demo data, fit, score and evaluate on this machine"),
    "benchmark": ("jobs.benchmark", "run a benchmark suite (e.g. `benchmark mvtec`)"),
    "submit": ("jobs.submit", "run a patchcore command as a job on a Ray cluster (infra/README.md)"),
}


def usage() -> str:
    """Top-level help: a line per command of COMMANDS, then where flags and the cluster come from."""
    lines = ["usage: patchcore COMMAND [--help] [flags]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += [
        "",
        "`patchcore COMMAND --help` lists the command's flags and defaults.",
        "RAY_ADDRESS set: run on that Ray cluster; unset: start a local Ray for the run.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run `patchcore COMMAND [flags]` by calling that command module's `main(flags)`.

    argv: the words after `patchcore` (default sys.argv[1:]). Exits 0 after `--help`; 2 with the
    usage on stderr when the command is missing, unknown or not installed; 1 with one
    `patchcore COMMAND: error: ...` line when the job raises ValueError, TypeError,
    FileNotFoundError or FileExistsError (bad input). The job's own exits (status 2 for a flag
    error or more failed inputs than --max-failures) pass through unchanged.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    if args[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0)
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"\npatchcore: error: unknown command {command!r}; choose one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    module_name = COMMANDS[command][0]
    # find_spec, not a failed import: only a missing job module is an installation problem; an
    # ImportError raised inside the module (a broken dependency) keeps its traceback.
    if importlib.util.find_spec(module_name) is None:
        print(f"patchcore: error: command {command!r} is not available in this installation "
              f"(module {module_name} is missing); reinstall with `pip install -e .`", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(module_name)  # only the chosen job's dependencies load
    try:
        module.main(rest)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        # Bad user input (values, files, layouts): one clear line instead of a traceback.
        print(f"patchcore {command}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from error


if __name__ == "__main__":
    main()
