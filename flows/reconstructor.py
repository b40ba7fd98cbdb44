"""The registered wildface model: the full DECA reconstructor (coarse + detail) as an MLflow
pyfunc, logged "from code" (:func:`flows.registry.log_reconstructor` passes this file; MLflow
runs it at load time and takes the model given to ``set_model``), so no pickled object is stored.

Load it with ``mlflow.pyfunc.load_model("models:/wildface-deca@challenger")`` (wildface must be
installed where it loads) and call ``predict(images)``. It runs on the GPU when the loading
process sees one; ``load_model(uri, model_config={"device": "cpu"})`` (or ``cuda:N``; for
``mlflow models serve`` the environment variable ``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device":
"cpu"}'``) chooses.

Trust: loaded the MLflow way, the copy of this file in the artifact store is executed, and the
artifact store is not authenticated. wildface itself never does that: ``wildface
reconstruct`` / ``evaluate`` / the pipeline load registered models with
:func:`flows.registry.resolve_model`, which checks every file (this one included) against the
sha256 recorded in the version's ``sha256.*`` tags and reads the weights only. Whoever loads
the pyfunc should run ``resolve_model`` on the URI first and load the checked folder it
returns (``mlflow.pyfunc.load_model(str(files.checkpoint.parents[1]))``).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import mlflow
import numpy as np

with warnings.catch_warnings():
    # MLflow asks for list[...] type hints on predict; this model takes one array of images.
    warnings.simplefilter("ignore", UserWarning)

    class Reconstructor(mlflow.pyfunc.PythonModel):
        """The full DECA reconstructor (coarse + detail) as an MLflow pyfunc.

        Artifacts: ``checkpoint`` (the detail-stage checkpoint: every network), ``coarse_checkpoint``
        (the coarse stage's, to start a new detail stage from), ``config`` (the resolved config,
        JSON) and ``face_model`` (the face model's cached arrays, ``.npz``).

        ``predict(model_input)``: images as an array (B, H, W, 3) or (H, W, 3), uint8 or float in
        [0, 1], face crops as the preprocessing writes them (resized to ``model.image_size``), or
        ``{"images": array}``. Returns a dict of numpy arrays: the codes (``shape``, ``exp``,
        ``pose``, ``cam``, ``tex``, ``light``, ``detail``), the posed coarse mesh ``vertices``
        (B, V, 3) with ``faces`` (F, 3), the identity's ``neutral_vertices`` (B, V, 3) (what NoW
        evaluates), ``landmarks2d`` (B, 68, 2), ``landmarks3d`` (B, 68, 3) and the detailed surface
        as a UV position map ``detail_vertices`` (B, 3, S, S).
        """

        def load_context(self, context) -> None:
            from flows.registry import ModelFiles, load_model
            from recon.devices import set_cpu_threads

            config = context.model_config or {}
            files = ModelFiles(checkpoint=Path(context.artifacts["checkpoint"]),
                               face_model=Path(context.artifacts["face_model"]),
                               config_json=Path(context.artifacts["config"]).read_text())
            recon = load_model(files, device=config.get("device", "auto"))
            if recon.device.type == "cpu":
                set_cpu_threads()
            self.recon = recon  # reconstructs as `wildface reconstruct` does (model.refine)
            self.model = recon.model

        def _images(self, model_input):
            import torch
            import torch.nn.functional as F

            if isinstance(model_input, Mapping):
                model_input = model_input["images"]
            arr = np.asarray(model_input)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(f"expected images (B, H, W, 3) or (H, W, 3), got {arr.shape}")
            x = torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2)
            if arr.dtype == np.uint8:
                x = x / 255.0
            size = self.model.image_size
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=True)
            return x.clamp(0, 1).to(self.model.device)

        def predict(self, context, model_input, params=None):  # noqa: ANN001 - any array input
            import torch

            with torch.no_grad():
                rec = self.recon.reconstruct(self._images(model_input), render=False)
                neutral = self.model.neutral(rec.codes.shape).vertices
            out = {k: v.cpu().numpy() for k, v in rec.codes.as_dict().items() if v is not None}
            out.update(vertices=rec.vertices.cpu().numpy(),
                       faces=self.model.flame.faces.cpu().numpy(),
                       neutral_vertices=neutral.cpu().numpy(),
                       landmarks2d=rec.landmarks2d.cpu().numpy(),
                       landmarks3d=rec.landmarks3d.cpu().numpy(),
                       detail_vertices=rec.uv_detail_vertices.cpu().numpy())
            return out

    mlflow.models.set_model(Reconstructor())
