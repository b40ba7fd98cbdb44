"""DECA's released weights: a file of DECA's structure (random values, DECA's key names and
shapes as its module definitions give them, tabled below) imported by `wildface model
import-deca`, then checked against independent computations: torchvision's ResNet50 + the MLP
by hand for the encoders, the generator by hand with F.* ops (eps 0.8 included), and the
imported model run by reconstruct and by `train --init-from`."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from typer.testing import CliRunner

from flows.cli.main import app
from recon.face_model.deca_import import DecaCheckpointError, load_deca_weights, read_deca_checkpoint
from recon.inference.reconstruct import load_model, write_face
from recon.training.checkpoint import load_checkpoint

# DECA's decalib/models/resnet.py: ResNet(Bottleneck, [3, 4, 6, 3]); per stage (name, blocks,
# planes, stride); Bottleneck: conv1 1x1 in->planes, conv2 3x3 planes->planes (stride),
# conv3 1x1 planes->4 planes, bn1-3; the first block of a stage has downsample = (conv 1x1
# in->4 planes with the stride, BatchNorm). No fc (commented out in DECA).
RESNET50_STAGES = (("layer1", 3, 64, 1), ("layer2", 4, 128, 2), ("layer3", 6, 256, 2),
                   ("layer4", 3, 512, 2))
# decalib/models/encoders.py: layers = Sequential(Linear(2048, 1024), ReLU, Linear(1024, out)).
# decalib/deca.py: E_flame out = 100 + 50 + 50 + 6 + 3 + 27; E_detail out = n_detail = 128.
N_CODE, N_DETAIL, N_EXP = 236, 128, 50
# decalib/models/decoders.py Generator(latent_dim = 128 + 50 + 3): l1 = Sequential(Linear(latent,
# 128 * 8 * 8)); conv_blocks: 0 BatchNorm2d(128); then per block (Upsample, Conv2d 3x3,
# BatchNorm2d(c_out, 0.8), LeakyReLU(0.2)) at indices 1-4, 5-8, 9-12, 13-16, 17-20; 21 Conv2d(16,
# 1, 3); 22 Tanh; output x out_scale (0.01).
GENERATOR_CONVS = ((2, 128, 128), (6, 128, 64), (10, 64, 64), (14, 64, 32), (18, 32, 16),
                   (21, 16, 1))
GENERATOR_BNS = ((0, 128), (3, 128), (7, 64), (11, 64), (15, 32), (19, 16))
DECA_EPS = 0.8


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def resnet50_keys() -> dict[str, tuple[int, ...]]:
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for stage, blocks, planes, _ in RESNET50_STAGES:
        for b in range(blocks):
            p = f"{stage}.{b}"
            keys |= {f"{p}.conv1.weight": (planes, inplanes, 1, 1), **_bn(f"{p}.bn1", planes),
                     f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes),
                     f"{p}.conv3.weight": (4 * planes, planes, 1, 1),
                     **_bn(f"{p}.bn3", 4 * planes)}
            if b == 0:
                keys |= {f"{p}.downsample.0.weight": (4 * planes, inplanes, 1, 1),
                         **_bn(f"{p}.downsample.1", 4 * planes)}
            inplanes = 4 * planes
    return keys


def encoder_keys(out: int) -> dict[str, tuple[int, ...]]:
    return {**{f"encoder.{k}": s for k, s in resnet50_keys().items()},
            "layers.0.weight": (1024, 2048), "layers.0.bias": (1024,),
            "layers.2.weight": (out, 1024), "layers.2.bias": (out,)}


def generator_keys() -> dict[str, tuple[int, ...]]:
    keys = {"l1.0.weight": (128 * 64, 3 + N_EXP + N_DETAIL), "l1.0.bias": (128 * 64,)}
    for i, c_in, c_out in GENERATOR_CONVS:
        keys |= {f"conv_blocks.{i}.weight": (c_out, c_in, 3, 3), f"conv_blocks.{i}.bias": (c_out,)}
    for i, c in GENERATOR_BNS:
        keys |= _bn(f"conv_blocks.{i}", c)
    return keys


def random_state(table: dict[str, tuple[int, ...]], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Values of realistic ranges: He-scaled weights, batch-norm statistics away from (0, 1)
    (so that eps matters), small output layers (codes of order 1, an unsaturated tanh)."""
    state = {}
    for k, shape in table.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) * 2 + 0.05
        elif k.endswith("running_mean"):
            state[k] = torch.randn(shape, generator=g) * 0.3
        elif len(shape) == 1:  # biases, and batch-norm scales (the only 1-d weights)
            state[k] = float(k.endswith("weight")) + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    for k, factor in (("layers.2.weight", 0.02), ("conv_blocks.21.weight", 0.05)):
        if k in state:
            state[k] = state[k] * factor
    for k in [k for k in state if k.endswith("bn3.weight")]:  # keep 16 residual blocks tame
        state[k] = state[k] * 0.2
    return state


@pytest.fixture(scope="module")
def deca_file(tmp_path_factory):
    """A file of deca_model.tar's structure, as DECA's trainer writes it (with its optimiser
    state and step, which the import leaves out)."""
    g = torch.Generator().manual_seed(0)
    ckpt = {"E_flame": random_state(encoder_keys(N_CODE), g),
            "E_detail": random_state(encoder_keys(N_DETAIL), g),
            "D_detail": random_state(generator_keys(), g),
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "global_step": 1000, "batch_size": 8}
    path = tmp_path_factory.mktemp("deca") / "deca_model.tar"
    torch.save(ckpt, path)
    return path, ckpt


@pytest.fixture(scope="module")
def imported(deca_file, tmp_path_factory):
    """`wildface model import-deca` on the demo head (it has DECA's 100 / 50 / 50 components)."""
    out = tmp_path_factory.mktemp("imported") / "deca.pt"
    res = CliRunner().invoke(app, ["model", "import-deca", str(deca_file[0]),
                                   "--face-model", "demo-head", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def reconstructor(imported):
    return load_model(imported)


@pytest.fixture(scope="module")
def model(reconstructor):
    return reconstructor.model


@pytest.fixture(scope="module")
def crops():
    return torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def codes(model, crops):
    with torch.no_grad():
        return model.encode(crops, with_detail=True)


def test_every_tensor_lands(deca_file, imported):
    _, deca = deca_file
    state = load_checkpoint(imported)["model"]
    config = json.loads(load_checkpoint(imported)["config"])
    assert config["model"]["architecture"] == "deca"
    prefixes = {"E_flame": "coarse_encoder.", "E_detail": "detail_encoder.",
                "D_detail": "detail_decoder."}
    for part, prefix in prefixes.items():
        ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        assert set(ours) == set(deca[part]), part  # nothing missing, nothing extra
        for k, v in deca[part].items():
            assert torch.equal(ours[k], v), f"{part}.{k}"


def test_encoders_equal_torchvision_resnet50_and_the_mlp_by_hand(deca_file, codes, crops):
    _, deca = deca_file
    with torch.no_grad():
        for part, ours in (("E_flame", None), ("E_detail", codes.detail)):
            state = deca[part]
            net = torchvision.models.resnet50(weights=None).eval()
            missing, unexpected = net.load_state_dict(
                {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")},
                strict=False)
            assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
            net.fc = torch.nn.Identity()

            def reference(images):
                hidden = F.relu(net(images) @ state["layers.0.weight"].T + state["layers.0.bias"])
                return hidden @ state["layers.2.weight"].T + state["layers.2.bias"]

            flat = reference(crops)  # DECA's input: the [0, 1] crop as it is
            if ours is None:
                # DECA's layout: shape 100 | tex 50 | exp 50 | pose 6 | cam 3 | light 27 (9 x 3)
                edges = [0, 100, 150, 200, 206, 209, 236]
                ref = dict(zip(("shape", "tex", "exp", "pose", "cam", "light"),
                               (flat[:, a:b] for a, b in zip(edges, edges[1:]))))
                ref["light"] = ref["light"].reshape(-1, 9, 3)
                for name, value in ref.items():
                    torch.testing.assert_close(getattr(codes, name), value, rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(ours, flat, rtol=1e-4, atol=1e-5)
                # ImageNet normalisation would be another function: the check can tell
                mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
                std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
                assert (reference((crops - mean) / std) - flat).abs().max() > 1e-2


def generator_by_hand(state: dict[str, torch.Tensor], z: torch.Tensor, eps: float,
                      blocks: int = 5) -> torch.Tensor:
    """DECA's Generator with F.* ops: z (B, 181) -> the map after ``blocks`` blocks, and for
    blocks = 5 the output tanh(conv) x 0.01 (B, 1, 256, 256)."""

    def bn(x, i, e):
        p = f"conv_blocks.{i}"
        return F.batch_norm(x, state[f"{p}.running_mean"], state[f"{p}.running_var"],
                            state[f"{p}.weight"], state[f"{p}.bias"], False, 0.0, e)

    x = (z @ state["l1.0.weight"].T + state["l1.0.bias"]).view(-1, 128, 8, 8)
    x = bn(x, 0, 1e-5)  # the leading BatchNorm2d(128): default eps
    for i, _, _ in GENERATOR_CONVS[:blocks]:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.conv2d(x, state[f"conv_blocks.{i}.weight"], state[f"conv_blocks.{i}.bias"],
                     padding=1)
        x = F.leaky_relu(bn(x, i + 1, eps), 0.2)
    if blocks < 5:
        return x
    out = F.conv2d(x, state["conv_blocks.21.weight"], state["conv_blocks.21.bias"], padding=1)
    return torch.tanh(out) * 0.01


def test_detail_generator_first_block_and_output_by_hand(deca_file, model):
    state = deca_file[1]["D_detail"]
    z = torch.randn(3, 3 + N_EXP + N_DETAIL, generator=torch.Generator().manual_seed(2))
    dec = model.detail_decoder
    with torch.no_grad():
        x = dec.l1(z).view(-1, 128, 8, 8)
        first = dec.conv_blocks[:5](x)
        torch.testing.assert_close(first, generator_by_hand(state, z, DECA_EPS, blocks=1),
                                   rtol=1e-5, atol=1e-6)
        # batch norm's default eps gives another function: the check above can tell
        assert (generator_by_hand(state, z, 1e-5, blocks=1) - first).abs().max() > 1e-2
        uv_z = dec(z[:, :3], z[:, 3:53], z[:, 53:])
    assert uv_z.shape == (3, 1, 256, 256)
    torch.testing.assert_close(uv_z, generator_by_hand(state, z, DECA_EPS), rtol=1e-5, atol=1e-7)
    assert 1e-4 < float(uv_z.abs().max()) < 0.0099  # neither flat nor saturated


def test_decode_feeds_jaw_exp_detail(deca_file, model, codes):
    """DECA's decoder input: pose[:, 3:] (jaw) | exp | detail."""
    with torch.no_grad():
        rec = model.decode(codes, render=False)
    z = torch.cat([codes.pose[:, 3:], codes.exp, codes.detail], 1)
    torch.testing.assert_close(rec.uv_displacement, generator_by_hand(deca_file[1]["D_detail"],
                                                                      z, DECA_EPS),
                               rtol=1e-5, atol=1e-7)


def test_reconstruct_runs_on_the_imported_model(reconstructor, crops, tmp_path):
    rec = reconstructor.reconstruct(crops)
    out = write_face(tmp_path / "face", reconstructor, rec, 0, crops[0])
    params = json.loads((out / "params.json").read_text())
    sizes = {k: torch.tensor(v).numel() for k, v in params["codes"].items()}
    assert sizes == {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27,
                     "detail": 128}
    assert torch.isfinite(rec.vertices).all() and (out / "detail.obj").is_file()


def test_train_init_from_starts_from_the_imported_weights(imported, tmp_path, monkeypatch):
    from recon.training.trainer import Trainer
    from tests.reconstruct_fixtures import make_synth

    started = []
    run = Trainer.run

    def record(self, steps=None):
        started.append({k: v.clone() for k, v in self.model.state_dict().items()
                        if torch.is_tensor(v)})
        return run(self, steps)

    monkeypatch.setattr(Trainer, "run", record)
    synth = make_synth(tmp_path / "synth", identities=2, images=1, size=64)
    # no --set model.*: the run takes the checkpoint's network and face-model sections
    res = CliRunner().invoke(app, [
        "train", "--stage", "coarse", "--data", str(synth), "--out", str(tmp_path / "run"),
        "--init-from", str(imported), "--set", "train.steps=0", "--set", "loss.identity=0",
        "--set", "train.identities_per_batch=2", "--set", "train.images_per_identity=1",
        "--device", "cpu"])
    assert res.exit_code == 0, res.output
    imported_state = load_checkpoint(imported)["model"]
    assert set(started[0]) == {k for k, v in imported_state.items() if torch.is_tensor(v)}
    assert all(torch.equal(v, imported_state[k]) for k, v in started[0].items())


class Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_refuses_a_file_that_needs_unpickling(tmp_path, capfd):
    bad = tmp_path / "deca_model.tar"
    torch.save({"E_flame": Evil(), "E_detail": {}, "D_detail": {}}, bad)
    out = tmp_path / "out.pt"
    res = CliRunner().invoke(app, ["model", "import-deca", str(bad), "--face-model",
                                   "demo-head", "--out", str(out)])
    assert res.exit_code == 2 and "weights-only" in res.output
    assert not out.exists() and "executed" not in capfd.readouterr().out
    with pytest.raises(DecaCheckpointError, match="weights-only"):
        read_deca_checkpoint(bad)
    assert "executed" not in capfd.readouterr().out


def test_refuses_missing_unexpected_and_misshapen_tensors(deca_file, model, tmp_path):
    _, deca = deca_file
    parts = {k: deca[k] for k in ("E_flame", "E_detail", "D_detail")}
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    cases = {
        "layer3.2.conv2": {**parts, "E_detail": {k: v for k, v in deca["E_detail"].items()
                                                 if k != "encoder.layer3.2.conv2.weight"}},
        "conv_blocks.22": {**parts, "D_detail": {**deca["D_detail"], "conv_blocks.22.weight":
                                                 torch.zeros(1)}},
        "conv1.weight (64, 3, 5, 5)": {**parts, "D_detail": {**deca["D_detail"]}, "E_flame": {
            **deca["E_flame"], "encoder.conv1.weight": torch.zeros(64, 3, 5, 5)}},
    }
    marker = {"E_flame": "layers.0.bias", "E_detail": "layers.0.bias", "D_detail": "l1.0.bias"}
    for needle, bad in cases.items():
        # the good parts are marked as other weights: a refusal must copy none of them
        bad = {k: v if v is not parts[k] else {**v, marker[k]: v[marker[k]] + 1.0}
               for k, v in bad.items()}
        with pytest.raises(DecaCheckpointError, match=re.escape(needle)):
            load_deca_weights(model, bad)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    no_decoder = tmp_path / "no_decoder.tar"
    torch.save({"E_flame": {}, "E_detail": {}}, no_decoder)
    with pytest.raises(DecaCheckpointError, match="D_detail"):
        read_deca_checkpoint(no_decoder)


def test_refuses_a_face_model_too_small_for_decas_codes(deca_file, tmp_path):
    from tests.tiny_face_model import tiny_face_assets

    small = tiny_face_assets().save_npz(tmp_path / "small.npz")
    out = tmp_path / "out.pt"
    res = CliRunner().invoke(app, ["model", "import-deca", str(deca_file[0]), "--face-model",
                                   str(small), "--out", str(out)])
    assert res.exit_code == 2 and "too few components" in res.output, res.output
    assert not out.exists()


def test_a_wildface_model_refuses_decas_weights(imported):
    from recon.config import FaceModelConfig, NetworkConfig
    from recon.deca import DECA

    small = DECA(FaceModelConfig(), NetworkConfig(backbone="resnet18", hidden=32, image_size=64,
                                                  uv_size=32))
    with pytest.raises(ValueError, match="architecture: checkpoint 'deca' vs model 'wildface'"):
        small.load_state_dict(load_checkpoint(imported)["model"])
