"""Text that reaches a ``.tex`` file: escaping, names, and the template environment.

Every string from a config, a results file or the command line (captions, row / group / column labels,
algorithm and dataset names) is plain text: :func:`escape` turns each LaTeX special character into the
command that prints it, so no input can add markup (``\\input{...}``) or break the document. Table names go
into ``\\label`` and a ``%`` comment unescaped, so they must match :data:`NAME_PATTERN` (:func:`check_name`).
Templates are rendered in Jinja's sandboxed environment: a user's ``--template`` cannot reach Python
internals (``os.system`` through object attributes).
"""

from __future__ import annotations

import re
from typing import Any

from greg.errors import ReportError

# A table name: a \label key, a Snakemake rule name and a file stem at once.
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
    ">": r"\textgreater{}", "|": r"\textbar{}", "±": r"$\pm$", "\n": " ", "\r": " ", "\t": " ",
}
_SPECIAL_RE = re.compile("|".join(re.escape(c) for c in _SPECIAL))


def escape(text: Any) -> str:
    """``text`` as LaTeX that prints it verbatim (line breaks become spaces)."""
    return _SPECIAL_RE.sub(lambda m: _SPECIAL[m.group()], str(text))


def check_name(name: Any, what: str = "table name") -> str:
    """``name`` if it matches :data:`NAME_PATTERN`, else a ReportError naming it and the pattern."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ReportError(f"{what} {str(name)[:80]!r}: expected letters, digits and '_' (not starting with a "
                          "digit)")
    return name


def environment() -> Any:
    """A sandboxed jinja2 environment with ``<% %>`` / ``<< >>`` delimiters (LaTeX braces need no escaping)
    and the ``tex`` filter (:func:`escape`)."""
    import jinja2  # only rendering needs it
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(
        block_start_string="<%", block_end_string="%>", variable_start_string="<<", variable_end_string=">>",
        comment_start_string="<#", comment_end_string="#>", trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
    )
    env.filters["tex"] = escape
    return env


def render_template(source: str, origin: str, **context: Any) -> str:
    """Render a template's text; a sandbox violation or a template error is a ReportError naming ``origin``."""
    import jinja2
    from jinja2.sandbox import SecurityError

    try:
        return environment().from_string(source).render(**context)
    except SecurityError as e:
        raise ReportError(f"{origin}: refused by the template sandbox: {e}") from None
    except jinja2.TemplateError as e:
        raise ReportError(f"{origin}: template error: {e}") from None
