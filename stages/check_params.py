"""Stage `check_params`: validate the whole params file before any other stage runs.

DVC tracks every key of params.yaml for this stage (``params: - params.yaml:`` with no keys), so any
edit reruns it and a typo anywhere (``unlearn.lr_typo: 1``, an unknown section) fails the next
``dvc repro`` in one line, even when no stage that reads the misspelt section would rerun. Its output
never changes; ``prepare`` depends on it only so that DVC runs this stage first, and a valid edit
therefore reruns nothing downstream. The typed sections need only the config module; the method and
optimizer argument sections are checked against their registries (``matrix``), which imports torch.
Local files the benchmark reads must lie under ``inputs/``, a dep of ``prepare``, so that an edit to
a forget set reruns what it affects (``config.check_inputs_versioned``); a stage run by hand, without
this check, accepts any path.
"""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnflow import cli
from unlearnflow.config import (
    BenchmarkConfig,
    UnlearnConfig,
    check_inputs_versioned,
    parse_section,
    validate_params,
)
from unlearnflow.io import write_json
from unlearnflow.matrix import check_unlearn_matrix

app = cli.stage_app(__doc__)


@app.command()
def main(
    out: Path = typer.Option(..., help="marker file written when the params are valid (a DVC out)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Check every section and key of PARAMS against the typed config; write OUT if all are valid."""
    with cli.user_errors():
        out.unlink(missing_ok=True)  # the marker vouches for the current file only
        raw = validate_params(params)
        # DVC runs every stage in the project root: relative paths in params are relative to it.
        check_inputs_versioned(
            parse_section(raw.get("benchmark") or {}, "benchmark", BenchmarkConfig), Path.cwd()
        )
        check_unlearn_matrix(parse_section(raw.get("unlearn") or {}, "unlearn", UnlearnConfig))
        # Constant content: the hash prepare depends on must not change when a param does.
        write_json(out, {"params": "valid"})


if __name__ == "__main__":
    app()
