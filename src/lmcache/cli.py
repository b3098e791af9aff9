"""The `lmcache` command.

Flags are generated from `ServerSettings`, so a new setting appears on the
command line, in the environment (``LMCACHE_<NAME>``) and in ``/status`` at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError

from lmcache import __version__
from lmcache.settings import ServerSettings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = (
            typing.get_args(field.annotation)
            if typing.get_origin(field.annotation) is typing.Literal
            else None
        )
        env = "LMCACHE_" + name.upper()
        help_text = f"{field.description} (default: {field.default}; env: {env})"
        if choices:
            help_text += f"; one of {', '.join(map(str, choices))}"
        # SUPPRESS: only flags the user typed reach the model, so env vars still apply.
        if typing.get_origin(field.annotation) is list:
            help_text = f"{field.description} (env: {env}, a JSON list)"
            parser.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, action="append", type=_json_object,
                help=help_text,
            )  # fmt: skip
            continue
        if field.annotation is bool:  # a switch, as upstream's --disable-metrics
            parser.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, action="store_const", const=True,
                help=f"{field.description} (env: {env}=true)",
            )  # fmt: skip
            continue
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"type\": ...}}', got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcache", description="LMCache KV-cache server")
    parser.add_argument("--version", action="version", version=f"lmcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("server", help="run the cache server (ZMQ + HTTP)")
    _add_settings_flags(server)
    bench = sub.add_parser(
        "bench",
        help="measure store/retrieve, lookups, eviction and L2 against same-run ceilings",
        description="Drive a real `lmcache server` with synthetic engines of a real model's KV "
        "geometry and print every result as a ratio to a ceiling measured in the same run.",
    )
    from lmcache.bench.options import add_arguments  # light: the bench itself loads in main

    add_arguments(bench)
    from lmcache.cli_tools import add_tool_commands  # light: stdlib only until one runs

    add_tool_commands(sub)
    return parser


def settings_from_args(values: dict[str, object]) -> ServerSettings:
    """Build settings from parsed flags and ``LMCACHE_*`` variables.

    A bad value exits 2 (as argparse does) with one line per problem that names the flag,
    or the variable when the value came from the environment; never a traceback.
    """
    try:
        return ServerSettings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = [
            f"{_setting_name(str(err['loc'][0]) if err['loc'] else '?', values)}: {_reason(err)}"
            for err in exc.errors()
        ]
    except SettingsError as exc:  # pydantic-settings could not decode a variable (JSON)
        problems = [_settings_error(exc, values)]
    if len(problems) == 1:
        print(f"lmcache: invalid settings: {problems[0]}", file=sys.stderr)
    else:
        print("lmcache: invalid settings:\n  " + "\n  ".join(problems), file=sys.stderr)
    raise SystemExit(2)


def _setting_name(field: str, values: dict[str, object]) -> str:
    """``--flag``, or ``LMCACHE_FIELD`` when the value came from the environment."""
    env = "LMCACHE_" + field.upper()
    if field not in values and any(key.upper() == env for key in os.environ):
        return env
    return "--" + field.replace("_", "-")


def _reason(err: ErrorDetails) -> str:
    if err["type"] == "list_type":
        return 'must be a JSON list, e.g. \'[{"type": "fs", "path": "/data/kv"}]\''
    if err["type"] == "finite_number":
        return f"must be a finite number, got {err['input']!r}"
    return err["msg"].removeprefix("Value error, ")


def _settings_error(exc: SettingsError, values: dict[str, object]) -> str:
    match = re.search(r'field "(\w+)"', str(exc))
    if match is None:
        return str(exc)
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        return f"{_setting_name(match.group(1), values)}: not valid JSON ({cause})"
    return f"{_setting_name(match.group(1), values)}: {cause or exc}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["server"]:  # upstream LMCache's server flags, mapped or refused
        from lmcache.upstream_flags import translate_or_exit

        argv = ["server", *translate_or_exit(argv[1:])]
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "server":
        from lmcache.server.process import run_server

        return run_server(settings_from_args(args))
    if command == "bench":
        from lmcache.bench.runner import run

        return run(argparse.Namespace(**args))
    from lmcache.cli_tools import run_tool

    return run_tool(command, argparse.Namespace(**args))


if __name__ == "__main__":
    sys.exit(main())
