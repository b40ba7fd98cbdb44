"""``wildface train``: one DECA stage, single process (CPU or one GPU), with resume."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _init_sections(init_from: Optional[Path]) -> list[str]:
    """The ``model`` and ``face_model`` sections recorded in ``init_from`` as overrides (the
    run's networks must be the checkpoint's; ``--set`` comes after them)."""
    if init_from is None:
        return []
    import json

    import yaml

    from recon.training.checkpoint import CheckpointError, load_checkpoint

    try:
        tree = json.loads(load_checkpoint(init_from)["config"])
    except (CheckpointError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="--init-from") from None
    return [f"{k}={yaml.safe_dump(tree[k], default_flow_style=True).strip()}"
            for k in ("model", "face_model") if k in tree]


def train(
    stage: str = typer.Option(..., "--stage", help="coarse | detail"),
    data: str = typer.Option(..., "--data", help="preprocessing output (shards/ + "
                             "identities.json) or a `wildface synth` folder"),
    out: Path = typer.Option(..., "--out", help="run folder: checkpoints/, <stage>-log.jsonl"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config file or name "
                                         "in configs/ (e.g. demo, paper)"),
    coarse_checkpoint: Optional[Path] = typer.Option(
        None, "--coarse-checkpoint", help="detail stage: the coarse checkpoint to start from"),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="a wildface checkpoint (e.g. from `wildface model "
        "import-deca`) whose networks a fresh run starts from; the run takes its model and "
        "face_model sections"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="key.sub=value override, "
                                                  "e.g. --set train.steps=100"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N "
                                         "(default auto: cuda if available)"),
    log_every: int = typer.Option(10, "--log-every", min=1, help="print the progress line (rate, ETA, loss) every N steps"),
    use_ray: bool = typer.Option(False, "--ray", help="run the stage as a Ray Train job "
                                 "(ray.* config: workers, CPU/GPU, storage, cluster address), "
                                 "tracked in MLflow (tracking.*); see docs/training-at-scale.md"),
) -> None:
    """Train the coarse or the detail stage. Resumes from the latest checkpoint of the stage
    in OUT/checkpoints if there is one; writes a checkpoint every train.checkpoint_every
    steps and at the end."""
    if stage not in ("coarse", "detail"):
        raise typer.BadParameter("--stage must be coarse or detail")
    if use_ray and init_from is not None:
        raise typer.BadParameter("--init-from is for single-process runs, not --ray")
    from contextlib import ExitStack

    from infra.storage import OutputLocked, configure, output_lock

    with ExitStack() as held:
        try:
            held.enter_context(output_lock(out))
        except OutputLocked as err:  # another run writes this folder
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        if use_ray:
            from flows.cli.options import load_config_or_exit

            load_config_or_exit(config, overrides)  # a mistake: one line here, not in a worker
            from flows.train import train_with_ray

            train_with_ray(stage, data, out, config, list(overrides or []),
                           None if coarse_checkpoint is None else str(coarse_checkpoint))
            return
        from flows.cli.options import load_config_or_exit
        from flows.config import with_stage_weights
        from flows.samples import rank_store
        from recon.devices import pick_device, set_cpu_threads
        from recon.training.steps import NonFiniteTraining
        from recon.training.trainer import JsonlLog, ProgressLog, Trainer, TrainerCallback

        cfg = load_config_or_exit(config, _init_sections(init_from) + list(overrides or []))
        cfg = with_stage_weights(cfg, stage)
        configure(cfg.storage)  # s3:// data is read with the configured endpoint
        try:
            dev = pick_device(device)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--device") from None
        if dev.type == "cpu":
            set_cpu_threads()
        n_ids, _ = cfg.train.batch_shape(stage)
        store, _ = rank_store(str(data), 0, 1, n_ids, cfg.data.cache_dir)
        typer.echo(f"{len(store)} training images of {len(store.identities)} identities")

        class Printer(TrainerCallback):
            def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
                typer.echo(f"checkpoint {path}")

        trainer = Trainer(cfg, stage, out, store, device=dev,
                          coarse_checkpoint=coarse_checkpoint, init_from=init_from,
                          callbacks=[ProgressLog(stage, cfg.train.steps, every_steps=log_every),
                                     Printer(), JsonlLog(Path(out) / f"{stage}-log.jsonl")])
        if trainer.resumed_from is not None:
            typer.echo(f"resuming at step {trainer.resumed_from}")
        try:
            result = trainer.run()
        except NonFiniteTraining as err:  # a diverged run fails; its last checkpoint is finite
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"{stage}: {result.step} steps, {result.skipped} skipped, "
                   f"checkpoint {result.checkpoint}")
