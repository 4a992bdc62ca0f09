"""``greg`` command line: one sub-command per pipeline stage.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported lazily so ``greg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys

# Help of every --device flag; here (not in greg.device) so that commands without torch can show it.
DEVICE_HELP = "auto (CUDA if available, else CPU), cpu, cuda or cuda:N"

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("greg.train", "train a model (CE pretraining, fine-tuning, GReg/GReg+, baselines); resumes"),
    "evaluate": ("greg.evaluate", "score ID and OOD test sets with a detector; write scores and metrics"),
    "data": ("greg.data.cli", "download / verify / list datasets"),
    "report": ("greg.report", "aggregate metrics over seeds into LaTeX/CSV tables and figures"),
    "dg": ("greg.dg.cli", "domain generalization (Hessian alignment) experiments"),
}


def _has_default(action: argparse.Action) -> bool:
    # identity, not ==: a default of 0 is a default; None / a store_true's False are none
    return not any(action.default is x for x in (None, False, argparse.SUPPRESS))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (unless the text already states one, or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not _has_default(action) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and _has_default(action):
            action = copy.copy(action)  # argparse prints nothing for help=None: show the default at least
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """HelpFormatter for ``parser`` and every sub-command parser below it (greg report table, greg dg run...)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _use_formatter(sub)


# Flags that name a file or directory greg writes: an empty value (``--out "$UNSET"``) would mean the working
# directory (type=Path turns '' into '.'), whose files a run would then overwrite.
OUTPUT_FLAGS = ("--out", "--tex", "--csv", "--md", "--npz", "--vs-paper-tex")


def _empty_output_flag(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in OUTPUT_FLAGS and (value if eq else (argv[i + 1] if i + 1 < len(argv) else "x")).strip() == "":
            return flag
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from greg import __version__
    from greg.errors import EXIT_INTERRUPTED, EXIT_STATUS_HELP

    parser = argparse.ArgumentParser(prog="greg", description=__doc__.splitlines()[0], epilog=EXIT_STATUS_HELP)
    parser.add_argument("--version", action="version", version=f"greg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = {}
    # Only import the module that is asked for; list the others by their help text.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (mod_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == wanted:
            mod = importlib.import_module(mod_name)
            mod.add_arguments(p)
            _use_formatter(p)
            modules[name] = mod
    args = parser.parse_args(argv)
    empty = _empty_output_flag(argv)
    if empty:
        from greg.errors import EXIT_INPUT

        print(f"greg {args.command}: {empty} is empty: name the output (an unset shell variable?)", file=sys.stderr)
        return EXIT_INPUT
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
