"""Run one stage script up to its first real work, and record when that moment came.

Usage (by ``bench/startup.py``, not by hand):
    python bench/_first_work.py STAMP STAGE_SCRIPT MODULE:ATTR[,MODULE:ATTR…] -- STAGE ARGS…

The stage module is loaded from its file as DVC's ``python stages/X.py`` would load it; then each
named function (``stage:build_benchmark`` in the stage's own namespace, or
``unlearnflow.modeling:load_tokenizer`` in a library module) is replaced by a hook, and the stage's
Typer app is called with the given arguments. The first hook to be called writes ``time.time()``
to STAMP and stops the stage, so nothing is read or written; the stage's MLflow run, if it started,
ends FAILED in the bench's own tracking store. No timing code lives in the library itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path


class FirstWork(BaseException):
    """Raised by the hook: a BaseException, so that no ``except Exception`` in the stage swallows it."""


def main() -> None:
    stamp, script, hooks, sep, *stage_args = sys.argv[1:]
    assert sep == "--", "usage: _first_work.py STAMP SCRIPT HOOKS -- ARGS"
    spec = importlib.util.spec_from_file_location(f"stage_{Path(script).stem}", script)
    assert spec is not None and spec.loader is not None
    stage = importlib.util.module_from_spec(spec)
    sys.argv = [script, *stage_args]
    spec.loader.exec_module(stage)

    def hook(*args: object, **kwargs: object) -> None:
        Path(stamp).write_text(f"{time.time():.6f}\n")
        raise FirstWork

    for target in hooks.split(","):
        where, attr = target.split(":")
        module = stage if where == "stage" else importlib.import_module(where)
        original = getattr(module, attr, None)
        if original is None:
            continue  # not in this version of the stage: another hook may still fire
        setattr(module, attr, hook)
        for name, value in vars(stage).items():  # a `from module import attr` in the stage
            if value is original:
                setattr(stage, name, hook)
    try:
        stage.app(args=stage_args, prog_name=Path(script).name)
    except FirstWork:
        sys.exit(0)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    sys.exit(f"{script}: ran to the end without calling any of {hooks}")


if __name__ == "__main__":
    main()
