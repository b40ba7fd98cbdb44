"""Renderer speed: the demo head at 224x224, B = 1, 8, 32.

Prints, per batch size: rasterize ms per image, full render (rasterize + interpolate + SH +
texture) forward and forward+backward ms per image, and peak memory (CPU: growth of the
resident set during the runs; GPU: torch.cuda.max_memory_allocated). CPU runs use
``--threads`` intra-op threads (default 2). Times are the median and the minimum of
``--reps`` runs after a warm-up; on a shared machine the minimum is the better estimate.

    .venv/bin/python benchmarks/render.py [--device cpu|cuda] [--batch 1 8 32] [--reps 10]
        [--backend auto|torch|numba|...] [--pytorch-ops]

Figures are recorded in docs/renderer.md with the machine they came from.
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set every millisecond (CPU peak memory)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _time(fn, reps: int, device: torch.device) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--pytorch-ops", action="store_true",
                    help="the PyTorch versions of the differentiable ops instead of numba_ops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from recon.config import FaceModelConfig
    from recon.face_model.flame import FLAME
    from recon.face_model.flame_io import load_face_model
    from recon.render import DecaRenderer, numba_ops, rasterize, weak_perspective_project

    pytorch_ops = numba_ops.reference_ops()
    if args.pytorch_ops:
        pytorch_ops.__enter__()  # for the whole run

    assets = load_face_model(FaceModelConfig())
    flame = FLAME(assets).to(device)
    r = DecaRenderer(torch.as_tensor(assets.faces), torch.as_tensor(assets.vt),
                     torch.as_tensor(assets.ft), image_size=args.size, uv_size=256,
                     backend=args.backend).to(device)
    print(f"demo head: {assets.v_template.shape[0]} vertices, {assets.faces.shape[0]} faces; "
          f"{args.size}x{args.size}, uv 256; device {device}"
          + (f", {args.threads} threads" if device.type == "cpu" else "")
          + f"; backend {args.backend}"
          + ("; PyTorch differentiable ops" if args.pytorch_ops else "")
          + f"; median / min of {args.reps} runs, ms per image")
    print(f"{'B':>3} {'rasterize':>16} {'render fwd':>16} {'render fwd+bwd':>16} "
          f"{'peak MiB':>9} {'covered':>8}")
    for B in args.batch:
        g = torch.Generator().manual_seed(B)
        pose = torch.zeros(B, 6)
        pose[:, :3] = (torch.rand(B, 3, generator=g) - 0.5) * torch.tensor([0.4, 1.2, 0.2])
        pose[:, 3] = 0.1 * torch.rand(B, generator=g)
        with torch.no_grad():
            verts = flame(torch.zeros(B, flame.n_shape, device=device),
                          torch.zeros(B, flame.n_exp, device=device), pose.to(device)).vertices
        cam = torch.tensor([[7.5, 0.0, 0.02]], device=device).expand(B, 3)
        albedo = torch.rand(B, 3, 256, 256, generator=g).to(device)
        sh = torch.zeros(B, 9, 3, device=device)
        sh[:, 0] = 3.0
        sh[:, 1:4] = 0.5

        def rast():
            with torch.no_grad():
                return rasterize(weak_perspective_project(verts, cam), r.faces, args.size,
                                 backend=args.backend)

        def forward():
            with torch.no_grad():
                return r.render(verts, weak_perspective_project(verts, cam), albedo, sh)

        def forward_backward():
            v = verts.detach().requires_grad_()
            a = albedo.detach().requires_grad_()
            s = sh.detach().requires_grad_()
            out = r.render(v, weak_perspective_project(v, cam), a, s)
            out["images"].mean().backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            tr = _time(rast, args.reps, device)
            tf = _time(forward, args.reps, device)
            tb = _time(forward_backward, args.reps, device)
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else mem.peak - mem.base) / 2**20
        covered = float((rast().pix_to_face >= 0).float().mean())

        def fmt(t):
            return f"{1e3 * t[0] / B:7.2f} /{1e3 * t[1] / B:7.2f}"

        print(f"{B:>3} {fmt(tr):>16} {fmt(tf):>16} {fmt(tb):>16} {peak:9.0f} {covered:8.2f}")


if __name__ == "__main__":
    main()
