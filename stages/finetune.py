"""Stage `finetune`: train the target (all trained authors) or the oracle (without the forget authors)."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnflow import cli, modeling, tracking
from unlearnflow.config import ComputeConfig, FinetuneConfig, ModelConfig, TrackingConfig, load_section
from unlearnflow.data import splits as split_io
from unlearnflow.data.tokenize import PromptFormat, training_examples
from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import atomic_dir, link_or_copy_tree, write_json, write_jsonl

app = cli.stage_app(__doc__)
ROLES = ("target", "oracle")


@app.command()
def main(
    role: str = typer.Argument(..., help="target | oracle"),
    splits: Path = typer.Option(..., help="directory written by `prepare`"),
    out: Path = typer.Option(..., help="model directory to write (Hugging Face layout)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Fine-tune ROLE's model on its training rows, or adopt a ready checkpoint given in params."""
    # The training loop and the methods import torch: here, not above, so that --help costs none.
    from unlearnflow import train
    from unlearnflow.methods import build_method

    with cli.user_errors():
        if role not in ROLES:
            raise UnlearnflowError(f"role must be one of {ROLES}, got {role!r}")
        model_cfg = load_section(params, "model", ModelConfig)
        cfg = load_section(params, "finetune", FinetuneConfig)
        device = modeling.pick_device(load_section(params, "compute", ComputeConfig).device)
        max_mb = load_section(params, "tracking", TrackingConfig).artifact_max_mb
        logged = {"model": model_cfg.model_dump(), "finetune": cfg.model_dump()}
        with tracking.stage_run(
            "finetune",
            role,
            experiment=cli.experiment_name(params),
            params=logged,
            upstream=[splits / "run.json"],
        ) as run:
            ready = getattr(model_cfg, role)
            if ready is not None:
                # A ready checkpoint (e.g. a published TOFU target and its retain model): adopt it as is.
                modeling.check_checkpoint_dir(ready)
                with atomic_dir(out) as tmp:
                    link_or_copy_tree(Path(ready), tmp)
                    run.write_manifest(tmp / "run.json")
                run.set_tags({"finetune.source": str(ready)})
                return
            layout = split_io.read_layout(splits)
            if model_cfg.base == "scratch":
                data = split_io.read_splits(splits)
                corpus = split_io.corpus_texts(data, layout)
                tok = modeling.train_bpe_tokenizer(corpus, model_cfg.scratch.vocab_size)
                model = modeling.build_scratch(tok, model_cfg, seed=cfg.seed)
            else:
                data = split_io.read_splits(splits, layout.train[role])
                tok = modeling.load_tokenizer(model_cfg.base, trust_remote_code=model_cfg.trust_remote_code)
                model = modeling.load_model(model_cfg.base, trust_remote_code=model_cfg.trust_remote_code)
            encoded = [
                ex
                for name in layout.train[role]
                for ex in training_examples(
                    tok,
                    data[name],
                    layout.info[name].kind,
                    max_length=model_cfg.max_length,
                    fmt=PromptFormat(**model_cfg.prompt_kwargs()),
                    split=name,
                )
            ]
            for name in layout.train[role]:
                run.log_dataset(splits / f"{name}.jsonl", name=name, context=f"finetune-{role}")
            run.log_metrics(
                {"n_parameters": float(modeling.count_parameters(model)), "n_train": float(len(encoded))}
            )
            result = train.run(
                model,
                build_method("sft", key="finetune"),
                "adamw",
                {"train": encoded},
                cfg,
                pad_token_id=tok.pad_token_id,
                device=device,
                on_log=run.log_metrics,
                desc=f"finetune {role}",
            )
            with atomic_dir(out) as tmp:
                modeling.save_pretrained(model, tok, tmp)
                write_jsonl(tmp / "steps.jsonl", result.rows)
                write_json(tmp / "health.json", {"flags": result.health})
                run.write_manifest(tmp / "run.json")
            run.log_health(result.health)
            run.log_metrics({"final_loss": result.rows[-1]["loss"], "wall_time_s": result.wall_time})
            run.log_checkpoint(out, max_mb)


if __name__ == "__main__":
    app()
