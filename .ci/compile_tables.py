#!/usr/bin/env python3
"""Compile every rendered table (``*.tex`` under the given files/directories) in a minimal LaTeX document.

Each table states the packages it needs in a header comment (``% Needs: \\usepackage{booktabs} ...``, written by
greg/templates/table.tex.j2 and ``greg dg table``); the document loads exactly those, so a table that needs an
undeclared package fails here as it would in a paper. Exit 0: all compiled; 1: a table failed (its first LaTeX
error is printed); 2: no LaTeX engine, or no table found.

    python .ci/compile_tables.py results/smoke/tables [--engine pdflatex]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NEEDS = re.compile(r"\\usepackage(?:\[[^\]]*\])?\{[^}]+\}")


def preamble(tex: str) -> list[str]:
    """The ``\\usepackage`` lines of the table's ``% Needs:`` header comments."""
    lines = [ln for ln in tex.splitlines()[:10] if ln.startswith("% Needs:")]
    return [m for ln in lines for m in NEEDS.findall(ln)]


def compile_table(path: Path, engine: str, timeout: float = 120) -> str | None:
    """None when ``path`` compiles, else its first LaTeX error (and the line after it)."""
    tex = path.read_text(encoding="utf-8")
    packages = preamble(tex)
    if not packages:
        return "no '% Needs: \\usepackage{...}' header comment"
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "doc.tex"
        shutil.copy(path, Path(tmp) / "table.tex")
        doc.write_text("\\documentclass{article}\n" + "\n".join(packages)
                       + "\n\\begin{document}\n\\input{table.tex}\n\\end{document}\n", encoding="utf-8")
        r = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp,
                           capture_output=True, text=True, timeout=timeout, errors="replace")
        if r.returncode == 0 and (Path(tmp) / "doc.pdf").is_file():
            return None
        out = r.stdout.splitlines()
        err = next((i for i, ln in enumerate(out) if ln.startswith("!")), None)
        return " | ".join(out[err:err + 3]) if err is not None else f"{engine} exit {r.returncode}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="table .tex files or directories holding them")
    p.add_argument("--engine", default="pdflatex", help="LaTeX engine on PATH")
    args = p.parse_args(argv)
    if shutil.which(args.engine) is None:
        print(f"compile_tables: {args.engine} not found (Debian: apt-get install texlive-latex-recommended)",
              file=sys.stderr)
        return 2
    files = sorted({f for q in args.paths for f in ([q] if q.is_file() else q.glob("*.tex"))})
    if not files:
        print(f"compile_tables: no .tex file under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    failed = 0
    for f in files:
        error = compile_table(f, args.engine)
        if error:
            failed += 1
            print(f"FAIL {f}: {error}", file=sys.stderr)
    print(f"compile_tables: {len(files) - failed}/{len(files)} tables compile with {args.engine}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
