"""The README's privacy-request walkthrough: a 20-fact deletion request about one person, answered per method.

Usage: python bench/privacy_request.py [--workdir /tmp/unlearnflow-privacy] [--methods grad_diff,npo,simnpo,pdu]
       [--seeds 0,1,2] [--out docs/privacy-request]

The request is examples/privacy-request/: ``forget.jsonl`` (20 facts about Marisol Vantreck, each with
its ``secret`` span marked), ``retain.jsonl`` (60 facts about ten other people, same questions) and
``holdout.jsonl`` (the same 20 questions about a person the model never sees: the non-members of the
membership attacks). It runs the pipeline itself, as a user would: the project's tracked files go into
``--workdir`` (a fresh git + DVC repository), the three files into its ``inputs/``, params.yaml gets
``benchmark.name: custom`` and the matrix (methods × adamw × seeds; attacks none, 4-bit quantization
and relearning on half the request, with the same attacks on target and oracle), and ``dvc repro``
runs it on the embedded scratch model. The report (report.md with a verdict line per model, facts.md,
figures, summary.json), the DVC headline metrics and each stage's wall time go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from robustness_study import pipeline_env, setup, sh, stage_times

ROOT = Path(__file__).resolve().parents[1]
REQUEST = ROOT / "examples" / "privacy-request"
FILES = ("forget", "retain", "holdout")


def request_params(base: dict, methods: list[str], seeds: list[int]) -> dict:
    """params.yaml of the walkthrough: the custom request, methods × adamw, the attacks and controls."""
    params = json.loads(json.dumps(base))
    params["benchmark"]["name"] = "custom"
    params["benchmark"]["custom"].update({f: f"inputs/{f}.jsonl" for f in FILES})
    params["unlearn"]["pairs"] = [{"method": m, "optimizer": "adamw"} for m in methods]
    params["unlearn"]["seeds"] = seeds
    params["attack"]["names"] = ["none", "quantize_4bit", "relearn"]
    params["attack"]["controls"] = ["quantize_4bit", "relearn"]
    # The fine-tune the walkthrough was measured with (docs/privacy-request/): the default's is 20
    # epochs, for time.
    params["finetune"]["epochs"] = 40
    # Relearn on 10 of the 20 facts, read the recovery on the other 10.
    params["attack"]["relearn"]["n"] = 10
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/unlearnflow-privacy"))
    ap.add_argument("--methods", default="grad_diff,npo,simnpo,pdu")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "privacy-request")
    args = ap.parse_args()
    workdir = args.workdir.resolve()
    env = pipeline_env(workdir, "walkthrough")
    setup(workdir, env)
    for f in FILES:
        shutil.copy(REQUEST / f"{f}.jsonl", workdir / "inputs" / f"{f}.jsonl")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = request_params(base, args.methods.split(","), [int(s) for s in args.seeds.split(",")])
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = workdir / "repro.log"
    log.write_text("")
    print(f"dvc repro in {workdir} (log: {log})", flush=True)
    start = time.time()
    lines = sh([sys.executable, "-m", "dvc", "repro"], workdir, env, log)
    end = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    for f in (workdir / "reports").iterdir():
        if f.suffix in (".md", ".png") or f.name == "summary.json":
            shutil.copy2(f, args.out / f.name)
    shutil.copy2(workdir / "metrics.json", args.out / "metrics.json")
    timing = {"wall_s": round(end - start, 1), **stage_times(lines, end)}
    (args.out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    print(f"done in {timing['wall_s']:.0f} s: {args.out}", flush=True)


if __name__ == "__main__":
    main()
