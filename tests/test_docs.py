"""The docs cannot rot: every `mnist-ray` command line in the README and docs/ parses with the
real command-line parser, and the quick start is what `make` and CI actually run."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from mnist_ray import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# `ray job submit ... -- python jobs/infer.py FLAGS` takes the flags of `mnist-ray infer`.
JOB = re.compile(r"python jobs/(\w+)\.py\s*(.*)$")


def _command_lines(text: str) -> list[tuple[str, bool]]:
    """(line, whole) of `mnist-ray ...` in fenced blocks (continuations joined, whole command
    lines) and in inline code (prose may name a flag without its value)."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\$ ", "", line.strip())
            job = JOB.search(line)
            if job:
                found.append((f"mnist-ray {job.group(1)} {job.group(2)}", True))
            elif line.startswith("mnist-ray "):
                found.append((line, True))
    found += [(span, False) for span in INLINE.findall(text) if span.startswith("mnist-ray ")]
    return found


def _invocations(path: Path) -> list[tuple[str, list[str], bool]]:
    """(command, arguments, whole) of every documented invocation; printed output skipped."""
    out = []
    for line, whole in _command_lines(path.read_text()):
        tokens = shlex.split(line, comments=True)
        if len(tokens) < 2 or tokens[1].endswith(":") or tokens[1].isupper() or tokens[1].startswith("-"):
            continue  # printed output (`mnist-ray infer: error: ...`), `mnist-ray COMMAND`, `--help`
        args = [t.strip("[]") for t in tokens[2:] if t not in ("...", "[", "]")]
        # Placeholders (`--trials N`, `--output DIR`, `IMAGE...`) stand for a value of any type.
        args = ["1" if re.fullmatch(r"[A-Z][A-Z_]*(\.\.\.)?", a) else a for a in args if a]
        out.append((tokens[1], args, whole))
    return out


def test_the_docs_show_commands():
    readme = _invocations(ROOT / "README.md")
    assert {name for name, _, whole in readme if whole} >= set(cli.COMMANDS) - {"serve"}  # one example per command


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_documented_command_and_flag_exists(path):
    for name, args, whole in _invocations(path):
        assert name in cli.COMMANDS, f"{path.name}: `mnist-ray {name}` is not a command"
        parser, _, _ = cli.command_parser(name)
        if not whole or "--help" in args:
            known = {o for a in parser._actions for o in a.option_strings}
            unknown = [a for a in args if a.startswith("--") and a.split("=")[0] not in known]
            assert not unknown, f"{path.name}: `mnist-ray {name}` has no {unknown}"
            continue
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{path.name}: `mnist-ray {name} {' '.join(args)}` does not parse")


def test_every_flag_named_in_the_readme_exists():
    flags = set()
    for name in cli.COMMANDS:
        parser, _, _ = cli.command_parser(name)
        flags.update(o for a in parser._actions for o in a.option_strings)
    ray_flags = {"--runtime-env", "--runtime-env-json", "--address", "--head"}  # Ray's own commands
    named = {m for span in INLINE.findall((ROOT / "README.md").read_text())
             for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span)}
    assert named - flags - ray_flags == set()


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = FENCE.search(section).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_quick_start_is_what_make_and_ci_run():
    commands = _quick_start_commands()
    assert commands == [["make", "quickstart"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text()
    for _, target in commands:
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), target
    assert re.search(r"^\s*make test\s*$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    # The command the README says `make quickstart` runs is the Makefile's recipe, and it parses.
    recipe = re.search(r"^quickstart:.*\n\t\$\(BIN\)/(mnist-ray .*)$", makefile, re.MULTILINE).group(1)
    out = re.search(r"^OUT\s*\?=\s*(\S+)", makefile, re.MULTILINE).group(1)
    recipe = recipe.replace("$(OUT)", out)
    assert f"`{recipe}`" in (ROOT / "README.md").read_text()
    tokens = shlex.split(recipe)
    cli.command_parser(tokens[1])[0].parse_args(tokens[2:])


def test_no_tracked_text_points_outside_the_repository():
    outside = ".." + "/shared"  # the folder beside the repo that a clone elsewhere does not have
    for path in [*DOCS, ROOT / "Makefile", *ROOT.glob("mnist_ray/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        assert outside not in path.read_text(), path


def _modules() -> dict[str, str]:
    """Every module of the package by its path (`mnist_ray/inputs/datasets.py`): its dotted name."""
    return {str(p.relative_to(ROOT)): ".".join(p.relative_to(ROOT).with_suffix("").parts)
            for p in sorted((ROOT / "mnist_ray").rglob("*.py")) if p.name != "__init__.py"}


def test_the_module_map_lists_every_module_and_only_modules_that_exist():
    text = (ROOT / "docs" / "modules.md").read_text()
    listed = set(re.findall(r"`(mnist_ray/[\w/]+\.py)`", text))
    assert set(_modules()) - listed == set(), "modules missing from docs/modules.md"
    assert listed - set(_modules()) == set(), "docs/modules.md names modules that do not exist"


# Spans shaped like `module.name` that name another library's API, not one of ours.
OTHER_LIBRARIES = {"datasets.load_dataset", "serve.start"}


def test_every_module_attribute_the_docs_name_exists():
    by_name: dict[str, list[str]] = {}
    for dotted in _modules().values():
        by_name.setdefault(dotted.rsplit(".", 1)[1], []).append(dotted)
    missing = []
    for path in DOCS:
        for span in INLINE.findall(path.read_text()):
            m = re.fullmatch(r"(\w+)\.([A-Za-z_]\w*)(?:\.\w+)?(?:\(.*\))?", span)
            if not m or m.group(1) not in by_name or m.group(2) in ("py", "md", "yaml", "json"):
                continue
            if f"{m.group(1)}.{m.group(2)}" in OTHER_LIBRARIES:
                continue
            if not any(hasattr(importlib.import_module(d), m.group(2)) for d in by_name[m.group(1)]):
                missing.append(f"{path.name}: `{span}`")
    assert missing == []
