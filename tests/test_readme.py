"""The README is run, not only read: every Python snippet executes as printed, every command line
of an entry point composes with the real Hydra config, and every `make` target it names exists.

A snippet that needs what a test machine lacks (a GPU, a data set on disk) is preceded in the
README by ``<!-- readme-test: skip: <why> -->``; the reason is required and shown by pytest. A
snippet that is a file the user writes is preceded by ``<!-- readme-file: <path> -->``: the
commands are composed (and the "Compare your own norm" walkthrough run) next to those files.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, open_dict
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from cli import REPO_ROOT, offline_env
from normlab.collect.__main__ import parse_arguments
from normlab.norm import NORMS

README = REPO_ROOT / "README.md"
CONFIG_DIR = REPO_ROOT / "conf"
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip:\s*(?P<why>\S.*?)\s*-->")
FILE_MARK = re.compile(r"<!--\s*readme-file:\s*(?P<path>\S+)\s*-->")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
# The config each entry point composes (its @hydra.main config_name).
ENTRY_CONFIGS = {"train": "config", "eval": "eval", "export": "export"}
PLACEHOLDER = re.compile(r"<[a-z][\w ]*>")
ENTRY_COMMAND = re.compile(r"^(?:\S*python3?|normlab-train)\s+(?:-m\s+)?normlab\.(\w+)\s*(.*)$")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int
    text: str
    skip_reason: str | None
    file: str | None = None


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    lines = README.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        previous = lines[index - 1] if index else ""
        skip = SKIP_MARK.search(previous)
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        text = "\n".join(lines[index + 1 : end]) + "\n"
        file = FILE_MARK.search(previous)
        blocks.append(
            Block(
                opening["lang"],
                index + 1,
                text,
                skip["why"] if skip else None,
                file["path"] if file else None,
            )
        )
        index = end + 1
    return blocks


def write_readme_files(directory: Path) -> list[Path]:
    """The files the README has the user write (``readme-file`` blocks), under ``directory``."""
    written = []
    for block in readme_blocks():
        if block.file:
            path = directory / block.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text)
            written.append(path)
    return written


def _python_blocks() -> list[Block]:
    return [block for block in readme_blocks() if block.lang == "python"]


def _shell_lines() -> Iterator[tuple[int, str]]:
    """Each command of the README's bash blocks, continuation lines joined, comments dropped."""
    for block in readme_blocks():
        if block.lang != "bash":
            continue
        pending, start = "", block.line
        for offset, raw in enumerate(block.text.splitlines(), start=1):
            line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if not pending:
                start = block.line + offset
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command:
                yield start, command


def _entry_commands() -> list[tuple[int, str, list[str]]]:
    commands = []
    for line, command in _shell_lines():
        match = ENTRY_COMMAND.match(command)
        if match:
            # `<timestamp>` and the like stand for a value the user fills in.
            arguments = PLACEHOLDER.sub("x", match[2])
            commands.append((line, match[1], shlex.split(arguments)))
    return commands


def _make_targets_named() -> set[str]:
    """`make <target>` wherever the README names one: command lines and inline code (a pattern
    such as `make study-<name>` or `make study-*` names none)."""
    text = README.read_text()
    code = [command for _, command in _shell_lines()] + re.findall(r"`([^`\n]+)`", text)
    return {
        target
        for snippet in code
        for target in re.findall(r"(?:^|[\s(])make ([a-z][a-z0-9-]*[a-z0-9])(?![\w<*-])", snippet)
    }


def _makefile_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, flags=re.MULTILINE))


def _is_group(key: str) -> bool:
    """``norm`` or ``hydra/launcher`` choose a config file; ``data.batch_size`` sets a value."""
    name = key.removeprefix("+").removeprefix("~")
    return "." not in name and ((CONFIG_DIR / name).is_dir() or "/" in name)


def _override_variants(arguments: list[str]) -> Iterator[list[str]]:
    """The overrides to compose for a command line. A multirun sweeping a config group
    (``norm=bn,gn``) is checked one option at a time, each with the first value of every other
    sweep; a sweep of plain values (``data.batch_size=2,8``) composes alike for all, so only its
    first value is."""
    overrides = [arg for arg in arguments if arg not in ("-m", "--multirun")]
    overrides = [arg for arg in overrides if not arg.startswith("--")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for text, override in zip(overrides, parsed, strict=True):
        if override.is_sweep_override():
            key = override.get_key_element()
            values = [f"{key}={value}" for value in override.sweep_string_iterator()]
            choices.append(values if _is_group(key) else values[:1])
        else:
            choices.append([text])
    firsts = [values[0] for values in choices]
    yield firsts
    for position, values in enumerate(choices):
        for value in values[1:]:
            yield [*firsts[:position], value, *firsts[position + 1 :]]


def _compose_and_resolve(config_name: str, overrides: list[str], tmp_path: Path) -> None:
    cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    # The job gets the config without its hydra node; its interpolations (${hydra:...} included)
    # must resolve, except into a ??? value the run fills in (model.num_classes from the data).
    with open_dict(cfg):
        del cfg["hydra"]
    _resolve_all(cfg)


def _resolve_all(node: DictConfig | ListConfig) -> None:
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        try:
            value = node[key]
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            continue
        if isinstance(value, DictConfig | ListConfig):
            _resolve_all(value)


@pytest.mark.parametrize("block", _python_blocks(), ids=lambda block: f"README.md:{block.line}")
def test_python_snippet_runs_as_printed(block: Block, tmp_path, monkeypatch):
    if block.skip_reason:
        pytest.skip(block.skip_reason)
    monkeypatch.chdir(tmp_path)
    # A snippet may register a norm; other tests in this process iterate over the registry.
    registered = dict(NORMS)
    try:
        exec(compile(block.text, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
    finally:
        NORMS.clear()
        NORMS.update(registered)


def test_readme_has_snippets_and_commands():
    assert len(_python_blocks()) >= 3
    assert len(_entry_commands()) >= 10


def test_every_entry_point_command_composes(tmp_path, monkeypatch):
    failures = []
    # Commands that name the README's own files (hydra.searchpath=[file://my_conf]) run next to
    # them.
    write_readme_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    # One initialisation for every command: scanning conf/ again per compose is most of the cost.
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for line, entry, arguments in _entry_commands():
            if entry == "collect":  # not Hydra: its own arguments must parse
                try:
                    parse_arguments(arguments)
                except SystemExit:
                    failures.append(f"README.md:{line}: normlab.collect {arguments} do not parse")
                continue
            if entry not in ENTRY_CONFIGS:
                failures.append(f"README.md:{line}: normlab.{entry} is not an entry point")
                continue
            for overrides in _override_variants(arguments):
                try:
                    _compose_and_resolve(ENTRY_CONFIGS[entry], overrides, tmp_path)
                except Exception as error:  # every failing command is listed, not the first only
                    failures.append(f"README.md:{line}: normlab.{entry} {overrides}: {error}")
    GlobalHydra.instance().clear()
    assert not failures, "\n".join(failures)


def test_commands_use_the_venv_python():
    """A bare `python` may not be the one `make install` set up, or may lack normlab."""
    bare = [
        f"README.md:{line}: {command}"
        for line, command in _shell_lines()
        if re.match(r"(?:python3?|pip)\b", command)
    ]
    assert not bare, "\n".join(bare)


def test_every_make_target_named_exists():
    missing = sorted(_make_targets_named() - _makefile_targets())
    assert not missing, f"README names make targets the Makefile lacks: {missing}"


def test_sweep_variants_vary_one_value_at_a_time():
    arguments = ["-m", "norm=bn,gn", "model=densenet_bc_40,convnext_atto", "data.batch_size=2,8"]
    assert list(_override_variants(arguments)) == [
        ["norm=bn", "model=densenet_bc_40", "data.batch_size=2"],
        ["norm=gn", "model=densenet_bc_40", "data.batch_size=2"],
        ["norm=bn", "model=convnext_atto", "data.batch_size=2"],
    ]


def _section_commands(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.index("\n## ", start + 1)
    first, last = text[:start].count("\n") + 1, text[:end].count("\n") + 1
    return [command for line, command in _shell_lines() if first < line < last]


# What shrinks the walkthrough's runs to a few batches each: the commands, files and table are
# the README's.
TINY = (
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
)


@pytest.mark.slow
def test_compare_your_own_norm_walkthrough_runs(tmp_path):
    """Register a norm from the user's own module and config folder, sweep it against bn with
    seeds at two batches, and tabulate the sweeps: the README's commands as printed."""
    assert [path.name for path in write_readme_files(tmp_path)] == ["my_norms.py", "gn4.yaml"]
    commands = _section_commands("## Compare your own norm")
    assert len(commands) == 3
    output = ""
    for command in commands:
        arguments = shlex.split(command)
        assert arguments[0] == ".venv/bin/python"
        if arguments[2] == "normlab.train":
            arguments += TINY
        result = subprocess.run(
            [sys.executable, *arguments[1:]],
            cwd=tmp_path,
            env=offline_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        output = result.stdout
    lines = output.splitlines()
    assert lines[0].startswith("| norm.name | data.batch_size | n | test/acc mean ± std |")
    assert [line.split(" | ")[:3] for line in lines[2:6]] == [
        ["| bn", "2", "3"],
        ["| gn4", "2", "3"],
        ["| bn", "32", "3"],
        ["| gn4", "32", "3"],
    ]
    assert all("[95 % CI " in lines[i] for i in (3, 5))
    assert "Not in the table" not in output
