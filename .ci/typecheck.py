"""mypy, with kernels/ checked under the name it is installed as: maskopt.kernels.

pyproject.toml installs the folder kernels/ as the subpackage maskopt.kernels
([tool.setuptools.package-dir]), but mypy names a module after its folder and has no option to
name it otherwise, and cannot see the editable install's import hook either. Plain ``mypy`` would
check kernels/ as a top-level package ``kernels``: ``from maskopt import kernels`` would then find
nothing, and the unrelated PyPI package ``kernels`` would be mistaken for it.

So this runs mypy as its command line does (options and files from [tool.mypy] in pyproject.toml;
arguments as for ``mypy``), only renaming the modules found in kernels/ before the build. It uses
mypy's ``process_options`` and ``run_build``, which are not public API: one reason the lint extra
pins mypy's version.

Usage, from the repository root: ``.venv/bin/python .ci/typecheck.py [mypy arguments]``
"""

from __future__ import annotations

import sys
import time

from mypy import main as mypy_main
from mypy import util
from mypy.fscache import FileSystemCache

FOLDER = "kernels"
INSTALLED_AS = "maskopt.kernels"


def _installed_name(module: str) -> str:
    """``module``'s name once installed (mypy names the modules in kernels/ ``kernels...``)."""
    if module == FOLDER or module.startswith(FOLDER + "."):
        return INSTALLED_AS + module.removeprefix(FOLDER)
    return module


def main(args: list[str]) -> int:
    started = time.time()
    fscache = FileSystemCache()
    sources, options = mypy_main.process_options(args, stdout=sys.stdout, stderr=sys.stderr, fscache=fscache)
    for source in sources:
        source.module = _installed_name(source.module)
    # run_build prints the messages as they come
    _result, messages, blockers = mypy_main.run_build(
        sources, options, fscache, started, sys.stdout, sys.stderr
    )
    n_errors, n_notes, n_files = util.count_stats(messages)
    if options.error_summary:
        formatter = util.FancyFormatter(sys.stdout, sys.stderr, options.hide_error_codes)
        color = options.color_output
        if n_errors:
            print(formatter.format_error(n_errors, n_files, len(sources), blockers=blockers, use_color=color))
        elif n_notes == len(messages):
            print(formatter.format_success(len(sources), use_color=color))
    # mypy's exit codes: 2 for errors that stopped the check, 1 for errors found, 0 for none
    if messages and n_notes < len(messages):
        return 2 if blockers else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
