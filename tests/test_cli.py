"""The `patchcore` CLI: every command's --help documents every flag with its default; bad input
gives a usage error (exit status 2) that names the bad value."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs import cli
from jobs import config as _cli

ROOT = Path(__file__).parents[1]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `patchcore *argv` run in this process."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def option_blocks(help_text: str) -> dict[str, str]:
    """`--flag` -> its whole entry (flags + help, whitespace-normalised) in argparse's help."""
    entries: list[list[str]] = []
    for line in help_text.splitlines():
        if line.startswith("  -"):
            entries.append([line])  # "  --seed SEED   help ..." or "  --fast, --no-fast"
        elif entries and line.startswith("    ") and line.strip():
            entries[-1].append(line)  # wrapped help text
        elif entries and entries[-1]:
            entries.append([])  # a blank line or a section title ends the entry
    blocks = {}
    for entry in filter(None, entries):
        head = re.split(r"\s{2,}", entry[0].strip(), maxsplit=1)[0]
        for flag in re.findall(r"(?:^|[\s,])(--?[a-z][\w-]*)", head):
            blocks[flag] = " ".join(" ".join(entry).split())
    return blocks


def available(command: str) -> bool:
    return importlib.util.find_spec(cli.COMMANDS[command][0]) is not None


def help_argv(command: str) -> list[str]:
    return [command, "mvtec", "--help"] if command == "benchmark" else [command, "--help"]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_documents_every_flag_with_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if not available(command):
        pytest.skip(f"module {cli.COMMANDS[command][0]} is not written yet")
    status, out, _ = run_cli(help_argv(command), capsys)
    assert status == 0
    blocks = option_blocks(out)
    flags = [f for f in blocks if f.startswith("--") and f not in ("--help",) and not f.startswith("--no-")]
    assert flags, out
    for flag in flags:
        assert "(default:" in blocks[flag] or "(required)" in blocks[flag], (flag, blocks[flag])


def test_coreset_help_lists_each_config_field_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from jobs.coreset import CoresetConfig

    status, out, _ = run_cli(["coreset", "--help"], capsys)
    assert status == 0
    blocks = option_blocks(out)
    for field in dataclasses.fields(CoresetConfig):
        text = blocks["--" + field.name.replace("_", "-")]
        if field.default is dataclasses.MISSING:
            assert "(required)" in text
        else:
            assert f"(default: {_cli._show(field.default)})" in text, text
    assert "(default: 128)" in blocks["--projection-dim"]
    assert "--no-overwrite" in out  # booleans can be switched both ways


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(["--help"], capsys)
    assert status == 0
    for command in cli.COMMANDS:
        assert re.search(rf"^  {command}\s", out, re.MULTILINE), command


def test_unknown_command_errors_with_the_list_of_commands(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(["fitt", "--train", "x"], capsys)
    assert status == 2
    assert "unknown command 'fitt'" in err and "coreset" in err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_unknown_flag_is_a_usage_error(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    if not available(command):
        pytest.skip(f"module {cli.COMMANDS[command][0]} is not written yet")
    _, out, _ = run_cli(help_argv(command), capsys)
    # give every required flag a value, so that argparse gets to the unknown one
    required = [f for f, text in option_blocks(out).items() if "(required)" in text]
    argv = help_argv(command)[:-1] + [a for f in required for a in (f, "x")] + ["--no-such-flag", "1"]
    status, _, err = run_cli(argv, capsys)
    assert status == 2
    assert "unrecognized arguments: --no-such-flag" in err


CORESET = ["coreset", "--features", "/tmp/f", "--out", "/tmp/b"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
        (["--ratio", "ten"], "argument --ratio: invalid float value: 'ten'"),
        (["--ratio", "0.2", "--size", "10"], "give --ratio or --size, not both"),
        (["--ratio", "1.5"], "--ratio must be in (0, 1], got 1.5"),
        (["--device", "tpu"], "--device must be one of auto, cpu, cuda, got 'tpu'"),
        (["--workers", "-1"], "--workers must be >= 0"),
        (["--storage-options", "[1, 2]"], "--storage-options must be a JSON object"),
        (["--siz", "10"], "unrecognized arguments: --siz"),  # no silent abbreviations
    ],
)
def test_bad_coreset_values_name_the_value_and_the_rule(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli(CORESET + extra, capsys)
    assert status == 2
    assert message in err
    assert err.startswith("usage: patchcore coreset")


def test_missing_required_flags_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(["coreset", "--out", "/tmp/b"], capsys)
    assert status == 2
    assert "the following arguments are required: --features" in err


def test_storage_options_never_echo_their_values(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(CORESET + ["--storage-options", '{"secret": "S3CRET-VALUE"'], capsys)
    assert status == 2 and "S3CRET-VALUE" not in err
    from jobs.coreset import CoresetConfig

    cfg = CoresetConfig(features="f", out="b", storage_options='{"key": "AKIA-ID", "secret": "S3CRET"}')
    logged = _cli.config_json(cfg)
    assert "AKIA-ID" not in logged and "S3CRET" not in logged
    assert json.loads(logged)["storage_options"] == {"key": "<redacted>", "secret": "<redacted>"}
    assert "storage_options" not in _cli.config_dict(cfg)  # nothing of it reaches a manifest


@dataclass(frozen=True)
class Toy:
    """A toy job."""

    name: str = _cli.arg("a name")
    count: int | None = _cli.arg("how many; unset = all", None)
    scale: float = _cli.arg("a factor in %", 0.5)
    fast: bool = _cli.arg("go fast", True)


def test_parse_config_handles_optional_bool_and_defaults() -> None:
    assert _cli.parse_config(Toy, ["--name", "a"]) == Toy(name="a", count=None, scale=0.5, fast=True)
    parsed = _cli.parse_config(Toy, ["--name", "a", "--count", "3", "--scale", "2", "--no-fast"])
    assert parsed == Toy(name="a", count=3, scale=2.0, fast=False)
    text = _cli.build_parser(Toy, prog="toy").format_help()
    assert "a factor in % (default: 0.5)" in text and "(default: unset)" in text
    assert "(default: true)" in text and "a name (required)" in text


def test_unsupported_field_type_is_rejected() -> None:
    @dataclass(frozen=True)
    class Bad:
        layers: tuple[str, ...] = ("a",)

    with pytest.raises(TypeError, match=r"Bad.layers: unsupported CLI type"):
        _cli.build_parser(Bad)


def test_python_dash_m_jobs_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobs", "--help"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "coreset" in result.stdout


def test_missing_bank_is_one_clear_error_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    missing = tmp_path / "no-such-bank"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["score", "--bank", str(missing), "--images", str(images), "--out",
                  str(tmp_path / "out"), "--dry-run"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "patchcore score: error:" in err and str(missing) in err
    assert "Traceback" not in err
