"""The command line's machinery: options generated from their declarations (TrainConfig for
training, `commands.declarations` for every other command) and parsed back into them, what
the user set, list options, near-miss suggestions, and user errors as one line with exit
status 2. Shared by the `mlexp` CLI and the MLflow Project entry points, so both parse alike."""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import Field, fields
from typing import Any, get_type_hints

import click

from mlexp.config import TrainConfig, base_type, cli_name, config_fields, parse_value
from mlexp.credentials import redact
from mlexp.errors import MlexpError, RunFailed
from mlexp.training.recipes import config_from_user_values

# Every command's context: -h as --help, and help text up to 110 columns wide.
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def config_options(exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Add one option per TrainConfig field (but `exclude`). Values stay text; TrainConfig parses them."""
    return lambda func: _add_config_options(func, exclude)


def _add_config_options(func: Callable, exclude: tuple[str, ...]) -> Callable:
    hints = get_type_hints(TrainConfig)
    for f in reversed([f for f in config_fields() if f.name not in exclude]):
        choices = f.metadata.get("choices")
        help_text = f.metadata["help"] + (f" [{'|'.join(choices)}]" if choices else "")
        if f.default is not None:
            help_text += f" (default: {f.default})"
        if base_type(hints[f.name]) is bool:
            # `--ema` alone means true; `--ema false` is accepted too (that is how MLproject passes it).
            func = click.option(f"--{cli_name(f.name)}", f.name, is_flag=False, flag_value="true", default=None,
                                metavar="[BOOL]", help=help_text)(func)
        elif f.metadata.get("repeatable"):
            func = click.option(f"--{cli_name(f.name)}", f.name, multiple=True, metavar=metavar(f, hints),
                                help=help_text)(func)
        else:
            func = click.option(f"--{cli_name(f.name)}", f.name, default=None, metavar=metavar(f, hints),
                                help=help_text)(func)
    return func


def metavar(f, hints) -> str:
    kind = base_type(hints[f.name])
    return {int: "INT", float: "FLOAT"}.get(kind, "TEXT")


def declared_options(declaration: type) -> Callable[[Callable], Callable]:
    """Add one option per field of a command's declaration (commands.declarations)."""
    own = declaration.__annotations__  # a declaration's own options first, then those it shares (LaunchOptions)
    ordered = sorted(fields(declaration), key=lambda f: f.name not in own)

    def add(func: Callable) -> Callable:
        for f in reversed(ordered):
            func = click.option(f"--{cli_name(f.name)}", f.name, **declared_option_kwargs(f))(func)
        return func
    return add


def declared_option_kwargs(f: Field) -> dict[str, Any]:
    """Click's view of a declared field. Values stay text (None: not given); `parse_options` types them."""
    choices = f.metadata.get("choices")
    help_text = f.metadata["help"] + (f" [{'|'.join(choices)}]" if choices else "")
    if f.default is not None and f.default != ():
        help_text += f" (default: {default_text(f)})"
    kwargs: dict[str, Any] = {"default": None, "metavar": f.metadata["metavar"], "help": help_text}
    if f.metadata["metavar"] == "[BOOL]":
        kwargs.update(is_flag=False, flag_value="true")
    if f.metadata.get("repeatable"):
        kwargs.update(multiple=True, default=())
    return kwargs


def default_text(f: Field) -> str:
    """A declared default as the user types it (and as MLproject shows it)."""
    if isinstance(f.default, bool):
        return "true" if f.default else "false"
    if isinstance(f.default, tuple):
        return ",".join(f.default)
    return "" if f.default is None else str(f.default)


def parse_options(declaration: type, values: dict[str, Any]):
    """The typed declaration from the options' text; a value not given or empty takes its default."""
    hints = get_type_hints(declaration)
    parsed = {}
    for f in fields(declaration):
        raw = values.get(f.name)
        if f.metadata.get("list"):
            names = split_names([raw] if isinstance(raw, str) else raw or ())
            parsed[f.name] = tuple(names) if names else f.default
        elif f.metadata.get("repeatable"):  # each value whole: commas are part of it
            kept = [str(value).strip() for value in ([raw] if isinstance(raw, str) else raw or ())]
            parsed[f.name] = tuple(value for value in kept if value) or f.default
        elif raw is None or raw == "":
            parsed[f.name] = f.default
        else:
            parsed[f.name] = parse_value(f.name, hints[f.name], raw)
            choices = f.metadata.get("choices")
            if choices and parsed[f.name] not in choices:
                raise MlexpError(f"--{cli_name(f.name)} must be {' or '.join(choices)}, got {raw!r}")
    return declaration(**parsed)


def split_names(values) -> list[str]:
    """Repeated options and comma-separated values (the MLproject passes one string) -> names.
    A value written as a JSON list keeps each name whole: `--experiment '["lr=0.1, wd=0", "b"]'`
    names an experiment whose name has a comma in it."""
    names = []
    for value in values:
        text = str(value).strip()
        if text.startswith("["):
            try:
                listed = json.loads(text)
            except ValueError as error:
                raise MlexpError(f"{text!r} starts like a JSON list of names but is not one ({error})") from None
            if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
                raise MlexpError(f"{text!r}: a JSON list of names is a list of strings, e.g. [\"a, b\", \"c\"]")
            names += [name for name in listed if name.strip()]
        else:
            names += [name.strip() for name in text.split(",") if name.strip()]
    return names


def user_values(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user set: an empty value (`--lr ""`, an MLproject parameter left
    empty) means not set, so the --recipe preset or the command's default fills it. A repeatable
    option's values are joined with commas."""
    joined = {name: ",".join(value) if isinstance(value, tuple) else value for name, value in values.items()}
    return {name: value for name, value in joined.items() if value is not None and value != ""}


def build_config(values: dict[str, Any], defaults: dict[str, str] | None = None,
                 world_size: int | None = None) -> TrainConfig:
    """The config from the options the user set, over a command's own `defaults`;
    `world_size`: the processes it trains on (default: this one's, $WORLD_SIZE)."""
    chosen = {**(defaults or {}), **user_values(values)}
    return config_from_user_values(chosen, world_size=world_size or int(os.environ.get("WORLD_SIZE", "1")))


class Commands(click.Group):
    """The command group; a mistyped command gets the near misses, not every command."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            raise click.UsageError(f"no command {name!r}{close_matches(name, self.list_commands(ctx))}", ctx)
        return super().resolve_command(ctx, args)


def one_line(error: BaseException) -> str:
    """A user error as one line (DataLoader workers wrap errors in a traceback text)."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split("MlexpError: ", 1)[-1]
    return " ".join(text.split())


# Options that take a list: `--backbones resnet18 resnet50` means `--backbones resnet18,resnet50`.
LIST_OPTIONS = ("--backbones", "--inits", "--strategies", "--seeds", "--experiment", "--group-by",
                "--strategy-epochs", "--strategy-lr", "--init-epochs", "--init-lr")
# Options whose words make one value: `--pair A B` and `--pair A vs B` mean `--pair 'A vs B'`.
WORDS_OPTIONS = ("--pair",)


REFUSED = re.compile(r"endpoint (?P<endpoint>\S+) failed with error code (?P<code>401|403)")
NEEDED = {"runs/create": "EDIT on the experiment", "experiments/create": "an account that may create experiments",
          "registered-models/create": "an account that may create models", "model-versions/create": "EDIT on the model",
          "runs/log-batch": "EDIT on the experiment", "runs/update": "EDIT on the experiment"}


def refusal(error: BaseException) -> str | None:
    """A tracking server's 401 or 403 (MLflow's authentication app), as one line: who was
    refused what, and which permission that needs. None for any other error."""
    found = REFUSED.search(str(error)) if type(error).__name__ == "MlflowException" else None
    if found is None:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    endpoint = found["endpoint"].split("/mlflow/", 1)[-1]
    if found["code"] == "401":
        return (f"the tracking server did not accept the credentials{f' of user {user!r}' if user else ''} (401, "
                f"{endpoint}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    needed = NEEDED.get(endpoint, "a permission this user lacks")
    return (f"the tracking server refused {endpoint} to {f'user {user!r}' if user else 'this user'} (403 permission "
            f"denied): it needs {needed}; an admin or its owner (MANAGE) can grant it")


def join_list_options(argv: list[str]) -> list[str]:
    """Join the space-separated values of a list option with commas (the users' guides' form),
    and the words of a --pair with spaces."""
    joined: list[str] = []
    separator = None
    for arg in argv:
        if arg.startswith("-"):
            separator = "," if arg in LIST_OPTIONS else " " if arg in WORDS_OPTIONS else None
            joined.append(arg)
        elif separator and joined and not joined[-1].startswith("-"):
            joined[-1] = f"{joined[-1]}{separator}{arg}"
        else:
            joined.append(arg)
    return joined


def close_matches(word: str, choices: list[str]) -> str:
    """"; did you mean X?" for the choices that are near misses of `word`, else ""."""
    close = difflib.get_close_matches(word, choices, n=2, cutoff=0.7)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def usage_line(error: click.UsageError) -> str:
    if isinstance(error, click.NoSuchOption):
        message = f"no such option {error.option_name}{close_matches(error.option_name, error.possibilities or [])}"
    else:
        message = " ".join(error.format_message().split())
    return message + (f" (see `{error.ctx.command_path} --help`)" if error.ctx else "")


@contextmanager
def user_errors():
    """User errors as one line on stderr and exit status 2 (rank 0 speaks for all ranks)."""
    rank = int(os.environ.get("RANK", "0"))
    # MLflow announces schema creation/migration of a fresh SQLite store at INFO: noise for our users.
    for noisy in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        yield
    except (MlexpError, click.UsageError) as error:
        if rank == 0:
            line = usage_line(error) if isinstance(error, click.UsageError) else one_line(error)
            print(f"mlexp: error: {redact(line)}", file=sys.stderr)  # a URI it names keeps its secret
        sys.exit(2)
    except RunFailed as error:  # its status and cause are recorded: the reason in one line, exit 1
        if rank == 0:
            print(f"mlexp: error: {redact(one_line(error))}", file=sys.stderr)
        sys.exit(1)
    except (click.exceptions.Abort, KeyboardInterrupt) as error:
        print(f"mlexp: {'aborted' if isinstance(error, click.exceptions.Abort) else 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:  # noqa: BLE001 - last: of the rest, only a tracking server's refusal is the user's to fix
        line = refusal(error)
        if line is None:
            raise
        if rank == 0:
            print(f"mlexp: error: {redact(line)}", file=sys.stderr)
        sys.exit(2)
