"""Every command the docs show is one the product accepts.

The code blocks of README.md and docs/*.md are read; each ``wildface ...`` line is checked
against the real command tree (:mod:`cli_commands`): the command path exists, every option
exists, an option that takes a value has one, required options and arguments are present.
Each ``prefect deployment run 'FLOW/NAME' -p k=v`` line is checked against prefect.yaml: the
deployment exists and every parameter is one its flow function takes. Nothing is run.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from cli_commands import (ROOT, cli_problems, deployment_problems, deployments,
                          model_uri_problems, words_of)
from flows.cli.main import app

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, logical line, whole command?) of the fenced code blocks, continuations
    joined (whole commands), and of the inline code spans of the prose (which may name a
    command without all it needs: ``wildface reconstruct``)."""
    out, in_block, pending, start = [], False, "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            out += [(no, span, False) for span in re.findall(r"`([^`]+)`", raw)]
            continue
        line = raw.strip()
        if not pending:
            start = no
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line, True))
        pending = ""
    return out


def documented(program: str) -> list[tuple[str, list[str], bool]]:
    found = []
    for path in DOCS:
        for no, line, whole in code_lines(path):
            words = words_of(line, program)
            if words is not None:
                found.append((f"{path.relative_to(ROOT)}:{no}", words, whole))
    return found



WILDFACE = documented("wildface")
PREFECT = documented("prefect")


def test_the_docs_show_commands():
    assert len(WILDFACE) > 30 and len(PREFECT) >= 3


@pytest.mark.parametrize("where,words,whole", WILDFACE, ids=[w for w, *_ in WILDFACE])
def test_wildface_command_exists(where, words, whole):
    assert cli_problems(words, whole) + model_uri_problems(words) == [], \
        f"{where}: wildface {' '.join(words)}"


@pytest.mark.parametrize("where,words,whole", PREFECT, ids=[w for w, *_ in PREFECT])
def test_prefect_deployment_exists(where, words, whole):
    known = deployments() | deployments(ROOT / "infra/deploy/prefect/cluster-deployments.yaml")
    problems = deployment_problems(words, known) + model_uri_problems(words)
    assert problems == [], f"{where}: prefect {' '.join(words)}"


def test_every_config_command_takes_overrides():
    """README: every command that takes --config also takes --set."""
    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path, {o for p in cmd.params for o in getattr(p, "opts", [])}

    missing = [" ".join(path) for path, opts in walk(typer.main.get_command(app), ["wildface"])
               if "--config" in opts and "--set" not in opts]
    assert missing == []


def test_the_checker_flags_what_is_wrong():
    """The checker itself, on lines that are wrong in each way it knows."""
    assert cli_problems(["services", "up", "--s3"]) == []
    assert words_of("wildface services up [--s3] [--nope N]  # start", "wildface") == [
        "services", "up", "--s3", "--nope", "N"]
    assert cli_problems(["nope"]) == ["no command 'wildface nope'"]
    assert cli_problems(["services", "up", "--nope"]) == ["wildface services up: no option --nope"]
    assert any("missing" in p for p in cli_problems(["render"]))
    assert cli_problems(["render"], whole=False) == []
    assert cli_problems(["preprocess", "s3://b/photos", "s3://b/data"], whole=False)
    assert cli_problems(["train", "--coarse-checkpoint", "s3://b/k"], whole=False)
    assert model_uri_problems(["models:/wildface@champion"])
    assert model_uri_problems(["models:/wildface-deca@champion"]) == []
    known = deployments()
    assert "pipeline/default" in known and "input" in known["pipeline/default"]
    assert deployment_problems(["deployment", "run", "nope/default"], known)
    assert deployment_problems(["deployment", "run", "pipeline/default", "-p", "nope=1"], known)
