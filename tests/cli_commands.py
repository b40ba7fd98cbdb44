"""Checks of a written command line against the real command tree (click's, built by
typer) and of a Prefect deployment run against a prefect.yaml, without running anything:
used by the docs test and the deploy-files test."""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import typer
import yaml

from flows.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
SHELL_ENDS = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&"}


def words_of(line: str, program: str) -> list[str] | None:
    """The arguments after ``program`` when the line runs it (after ``$ `` and VAR=value
    prefixes), up to a comment or a shell operator; None when it does not."""
    line = line.removeprefix("$ ")
    # Usage notation: an optional group [A | B] is checked as its first alternative A.
    line = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split(" | ")[0], line)
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]
    if not tokens or Path(tokens[0]).name != program:
        return None
    words = []
    for tok in tokens[1:]:
        if tok in SHELL_ENDS:
            break
        words.append(tok)
    return words


def cli_problems(words: list[str], whole: bool = True) -> list[str]:
    """What is wrong with ``wildface WORDS`` according to the command tree; required options
    and arguments only for a ``whole`` command."""
    cmd = typer.main.get_command(app)  # typer's own click: duck-typed below
    path = ["wildface"]
    words = list(words)
    while hasattr(cmd, "commands"):
        if not words or words[0] in ("--help", "-h"):
            return []
        name = words.pop(0)
        sub = cmd.commands.get(name)
        if sub is None:
            return [f"no command {' '.join(path + [name])!r}"]
        cmd, path = sub, path + [name]
    problems: list[str] = []
    options = {o: p for p in cmd.params if p.param_type_name == "option"
               for o in (*p.opts, *p.secondary_opts)}
    given: set[str] = set()
    positional: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        i += 1
        if w == "--help":
            return []
        if w == "...":
            continue
        if w.startswith("--") and "/" in w and "=" not in w:  # a --flag/--no-flag pair
            for flag in w.split("/"):
                if flag not in options:
                    problems.append(f"{' '.join(path)}: no option {flag}")
                else:
                    given.add(options[flag].name)
            continue
        if w.startswith("-") and w != "-":
            name, has_value = (w.split("=", 1)[0], True) if "=" in w else (w, False)
            opt = options.get(name)
            if opt is None:
                problems.append(f"{' '.join(path)}: no option {name}")
                continue
            given.add(opt.name)
            value = w.split("=", 1)[1] if has_value else None
            if not (opt.is_flag or opt.count) and not has_value:
                if i >= len(words) or (words[i].startswith("--") and words[i] in options):
                    if whole:  # prose may name an option alone: `wildface train --out`
                        problems.append(f"{' '.join(path)}: {name} needs a value")
                else:
                    value = words[i]
                i += 1
            annotation = str(getattr(getattr(opt, "type_descriptor", None), "annotation", ""))
            if value and "://" in value and "Path" in annotation:
                problems.append(f"{' '.join(path)}: {name} takes a local path, not {value}")
        else:
            positional.append(w)
    args = [p for p in cmd.params if p.param_type_name == "argument"]
    if not any(a.nargs == -1 for a in args) and len(positional) > len(args):
        problems.append(f"{' '.join(path)}: unexpected arguments {positional[len(args):]}")
    if not whole:
        return problems
    for p in cmd.params:
        if p.param_type_name == "option" and p.required and p.name not in given:
            problems.append(f"{' '.join(path)}: missing required option {p.opts[0]}")
    needed = sum(1 for a in args if a.required and a.nargs != -1) + \
        sum(1 for a in args if a.required and a.nargs == -1)
    if len(positional) < needed:
        problems.append(f"{' '.join(path)}: missing arguments "
                        f"({len(positional)} given, {needed} required)")
    return problems


def model_uri_problems(words: list[str]) -> list[str]:
    """``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` must name the registered model
    and an alias the product gives."""
    from infra.config import TrackingConfig
    from recon.evaluation.config import PromotionConfig

    name = TrackingConfig().registered_model
    aliases = {TrackingConfig().alias, PromotionConfig().champion_alias}
    problems = []
    for w in words:
        m = re.search(r"models:/([^@/\s]+)(?:@([^\s/]+)|/\S+)?", w)
        if m and not m.group(1).startswith("m-") and m.group(1) != "NAME":
            if m.group(1) != name:
                problems.append(f"{w}: the registered model is {name!r}")
            if m.group(2) and m.group(2) not in aliases and m.group(2) != "ALIAS":
                problems.append(f"{w}: no alias {m.group(2)!r} (given: {sorted(aliases)})")
    return problems


def flow_parameters(entrypoint: str) -> tuple[str, set[str]]:
    """``file.py:function`` -> (the flow's name, the parameters its function takes), read
    with ``ast`` (the flow is not imported)."""
    file, func = entrypoint.split(":")
    tree = ast.parse((ROOT / file).read_text())
    fn = next(n for n in ast.walk(tree)
              if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == func)
    flow_name = func.replace("_", "-")
    for deco in fn.decorator_list:
        if isinstance(deco, ast.Call):
            for kw in deco.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    flow_name = kw.value.value
    return flow_name, {a.arg for a in fn.args.args + fn.args.kwonlyargs}


def deployments(prefect_file: Path = ROOT / "prefect.yaml") -> dict[str, set[str]]:
    """'flow-name/deployment-name' -> the parameters its flow function takes."""
    spec = yaml.safe_load(prefect_file.read_text())
    out = {}
    for dep in spec["deployments"]:
        flow_name, params = flow_parameters(dep["entrypoint"])
        out[f"{flow_name}/{dep['name']}"] = params
    return out


def deployment_problems(words: list[str], known: dict[str, set[str]]) -> list[str]:
    """What is wrong with ``prefect deployment run NAME -p k=v ...`` given ``known``
    (:func:`deployments`)."""
    if words[:2] != ["deployment", "run"] or len(words) == 2:
        return []
    rest = words[2:]
    problems = []
    name = next((w for i, w in enumerate(rest) if not w.startswith("-") and
                 (i == 0 or rest[i - 1] not in ("-p", "--param", "--params"))), None)
    if name is None or name not in known:
        return [f"no deployment {name!r} in prefect.yaml (known: {sorted(known)})"]
    for i, w in enumerate(rest):
        if w in ("-p", "--param") and i + 1 < len(rest):
            key = rest[i + 1].split("=", 1)[0]
            if key not in known[name]:
                problems.append(f"{name}: no parameter {key!r} (takes {sorted(known[name])})")
    return problems
