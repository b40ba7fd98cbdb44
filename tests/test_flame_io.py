"""Loading FLAME-structured files safely: chumpy stand-ins, scipy.sparse, latin1 pickles,
the landmark-embedding .npy with torch tensors; malicious pickles are refused unexecuted."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recon.config import FaceModelConfig
from recon.face_model.face_assets import FaceModelAssets, FaceModelFormatError
from recon.face_model.flame import FLAME
from recon.face_model.flame_io import (
    convert,
    load_face_model,
    load_flame,
    load_flame_pickle,
    load_landmark_embedding,
)
from recon.formats.safe_pickle import UnsafePickleError, safe_loads


@pytest.fixture(scope="module")
def demo():
    return load_face_model("demo-head")


@pytest.fixture
def fake_chumpy(monkeypatch):
    """A throwaway ``chumpy.ch.Ch`` so the test can write pickles with FLAME's structure:
    like chumpy under Python 2, it pickles as ``copyreg._reconstructor(Ch, object, None)``
    followed by a state dict holding the array in ``x``."""
    import copyreg

    ch_mod = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x

        def __reduce_ex__(self, protocol):
            return (copyreg._reconstructor, (Ch, object, None), {"x": self.x, "_cache": {}})

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch_mod.Ch = Ch
    pkg = types.ModuleType("chumpy")
    pkg.ch = ch_mod
    monkeypatch.setitem(sys.modules, "chumpy", pkg)
    monkeypatch.setitem(sys.modules, "chumpy.ch", ch_mod)
    return Ch


def flame_dict(demo, Ch):
    """FLAME 2020's keys and container types, filled with the demo head's arrays."""
    S = demo.n_shape_total
    shapedirs = np.concatenate([demo.shapedirs[:, :, :300], demo.shapedirs[:, :, S : S + 100]], 2).astype(np.float64)
    return {
        "v_template": demo.v_template.astype(np.float64),
        "f": demo.faces.astype(np.uint32),
        "shapedirs": Ch(shapedirs),
        "posedirs": demo.posedirs.astype(np.float64),
        "J_regressor": sp.csc_matrix(demo.J_regressor.astype(np.float64)),
        "weights": Ch(demo.weights.astype(np.float64)),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
        "J": Ch(demo.J_regressor @ demo.v_template),
    }


def write_flame_pickle(path, demo, Ch):
    with open(path, "wb") as fh:
        pickle.dump(flame_dict(demo, Ch), fh, protocol=2)


def write_landmark_npy(path, demo):
    emb = {
        "static_lmk_faces_idx": torch.tensor(demo.static_lmk_faces_idx),
        "static_lmk_bary_coords": torch.tensor(demo.static_lmk_bary_coords),
        "dynamic_lmk_faces_idx": torch.tensor(demo.dynamic_lmk_faces_idx),
        "dynamic_lmk_bary_coords": torch.tensor(demo.dynamic_lmk_bary_coords),
        "full_lmk_faces_idx": demo.full_lmk_faces_idx[None].astype(np.int64),  # (1, 68) numpy
        "full_lmk_bary_coords": demo.full_lmk_bary_coords[None],
    }
    np.save(path, emb, allow_pickle=True)  # how DECA's landmark_embedding.npy was written


def test_load_flame_structured_pickle(tmp_path, demo, fake_chumpy):
    pkl, npy = tmp_path / "generic_model.pkl", tmp_path / "landmark_embedding.npy"
    write_flame_pickle(pkl, demo, fake_chumpy)
    write_landmark_npy(npy, demo)
    raw = load_flame_pickle(pkl)
    assert isinstance(raw["shapedirs"], np.ndarray) and raw["shapedirs"].shape == (demo.n_vertices, 3, 400)
    assert sp.issparse(raw["J_regressor"]) and raw["J_regressor"].shape == (5, demo.n_vertices)
    emb = load_landmark_embedding(npy)
    assert emb["full_lmk_faces_idx"].shape == (68,) and emb["dynamic_lmk_bary_coords"].shape == (79, 17, 3)
    np.testing.assert_array_equal(emb["dynamic_lmk_faces_idx"], demo.dynamic_lmk_faces_idx)

    # FLAME_masks.pkl (region -> vertex ids) and FLAME_texture.npz (0..255, with vt/ft).
    mask_path = tmp_path / "FLAME_masks.pkl"
    mask_path.write_bytes(pickle.dumps({"face": np.arange(100), "left_eyeball": np.arange(100, 120)}, protocol=2))
    tex_path = tmp_path / "FLAME_texture.npz"
    rng = np.random.default_rng(0)
    np.savez(tex_path, mean=np.full((32, 32, 3), 200.0), tex_dir=rng.normal(size=(32, 32, 3, 5)) * 10,
             vt=demo.vt, ft=demo.ft)
    assets = load_flame(pkl, masks=mask_path, texture=tex_path)  # embedding found next to the pkl
    assert assets.name == "flame" and (assets.n_shape_total, assets.n_exp_total) == (300, 100)
    assert list(assets.parents) == [-1, 0, 1, 1, 1]
    np.testing.assert_allclose(assets.J_regressor, demo.J_regressor, atol=1e-7)
    np.testing.assert_array_equal(assets.masks["face"], np.arange(100))
    assert assets.albedo_mean.shape == (256, 256, 3) and assets.albedo_basis.shape == (256, 256, 3, 5)
    np.testing.assert_allclose(assets.albedo_mean, 200 / 255, atol=1e-5)
    np.testing.assert_array_equal(assets.ft, demo.ft)
    # The loaded model poses exactly like the demo head it was built from.
    a = FLAME(assets, 20, 10)
    b = FLAME(demo, 20, 10)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 20, generator=g), torch.randn(2, 10, generator=g), torch.randn(2, 6, generator=g) * 0.2)
    oa, ob = a(*args), b(*args)
    torch.testing.assert_close(oa.vertices, ob.vertices, atol=1e-6, rtol=0)
    torch.testing.assert_close(oa.landmarks2d, ob.landmarks2d, atol=1e-6, rtol=0)

    # Convert to the cache and load it through the config.
    out = convert(pkl, tmp_path / "flame.npz", landmarks=npy)
    cached = load_face_model(FaceModelConfig(path=str(out)))
    np.testing.assert_array_equal(cached.shapedirs, assets.shapedirs)
    # Without texture files: fallback flat albedo with >= 50 components, a generated UV layout.
    assert cached.albedo_basis.shape[-1] >= 50 and np.ptp(cached.albedo_mean.reshape(-1, 3), axis=0).max() < 1e-6
    assert cached.vt.shape == (demo.n_vertices, 2) and 0 <= cached.vt.min() and cached.vt.max() <= 1
    via_pkl = load_face_model(FaceModelConfig(path=str(pkl), landmarks=str(npy)))
    assert via_pkl.n_vertices == demo.n_vertices


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"v_template": _Evil(f"touch {marker}")}, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"(posix|os|nt)\.system"):
        safe_loads(payload)
    assert not marker.exists()
    src = tmp_path / "evil.pkl"
    src.write_bytes(payload)
    dst = tmp_path / "out.npz"
    with pytest.raises(UnsafePickleError):
        convert(src, dst)
    assert not marker.exists() and not dst.exists()
    assert list(tmp_path.iterdir()) == [src]  # no temp files left either


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(__import__("builtins").eval, protocol=2),  # a bare global
        b"cbuiltins\nexec\n(S'1'\ntR.",  # exec via REDUCE
        b"ccopyreg\n_reconstructor\n(cos\n_wrap_close\ncbuiltins\nobject\nNtR.",  # reconstructor of a foreign class
        b"cnumpy.core.multiarray\n_reconstruct\n(csubprocess\nPopen\n(I0\ntS'b'\ntR.",
        b"c_codecs\nencode\n(S'x'\nS'idna'\ntR.",  # codec lookup by name
    ],
)
def test_other_gadgets_refused(payload):
    with pytest.raises(UnsafePickleError):
        safe_loads(payload)


def test_npz_cache_refuses_pickled_objects(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, v_template=np.array([_Evil("true")], dtype=object))
    with pytest.raises(FaceModelFormatError, match="bad.npz: not a readable .npz"):
        FaceModelAssets.load_npz(bad)


def test_missing_landmarks_is_a_clear_error(tmp_path, demo, fake_chumpy):
    pkl = tmp_path / "m.pkl"
    write_flame_pickle(pkl, demo, fake_chumpy)
    with pytest.raises(Exception, match="landmark embedding"):
        load_flame(pkl)


# ------------------------------------------------------------------------- memory bombs
def _memo_dag(depth: int) -> bytes:
    """l0 = []; l_i = [l_(i-1), l_(i-1)] through the memo: 8 bytes a level, 2^depth lists
    once a loader copies each reference (the 220-byte bomb)."""
    p = b"\x80\x02]q\x00"  # PROTO 2, EMPTY_LIST, BINPUT 0
    for i in range(1, depth):
        p += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i])  # MARK GET GET LIST PUT
    return p + b"."


def _torch_legacy_storage(numel: int) -> bytes:
    """A storage in torch's legacy format (what ``torch.save(..., _use_new_zipfile_
    serialization=False)`` writes and ``torch.storage._load_from_bytes`` reads): magic,
    protocol, system info, then a pickle whose persistent id declares ``numel`` -- which
    torch allocates before reading -- while holding the bytes of one float."""

    class Declaring(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj == "s" else None

    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                   "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, buf, protocol=2)
    Declaring(buf, protocol=2).dump("s")
    pickle.dump(["0"], buf, protocol=2)
    buf.write((1).to_bytes(8, "little") + b"\0" * 4)
    return buf.getvalue()


class _StorageBomb:
    def __reduce__(self):
        return (torch.storage._load_from_bytes, (_torch_legacy_storage(10**10),))


def _bombs() -> dict[str, bytes]:
    reconstruct = b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I3000000000\ntS'b'\ntR."
    obj_array = (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I400000000\nt"
                 b"cnumpy\ndtype\n(S'O8'\nI0\nI1\ntRtR.")
    self_ref: list = []
    self_ref.append(self_ref)
    return {
        "memo_dag": _memo_dag(27),
        "numpy_shape": reconstruct,
        "object_array": obj_array,
        "ndarray_called": b"cnumpy\nndarray\n(I3000000000\ntR.",
        "tensor_called": b"ctorch\nTensor\n(I3000000000\ntR.",
        # A zero-stride view: 4 bytes of storage, 40 GB once a consumer densifies it.
        "tensor_view": pickle.dumps({"v_template": torch.zeros(1).expand(10**5, 10**5)}, protocol=2),
        "torch_storage": pickle.dumps(_StorageBomb(), protocol=2),
        "deep_nesting": b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".",
        "self_reference": pickle.dumps(self_ref, protocol=2),
        # BINBYTES8 of 1 TiB: Python's unpickler allocates the length before reading.
        "declared_length": b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"x" * 10 + b".",
    }


_LOAD_UNDER_LIMIT = r"""
import json, resource, sys, time
import torch
from recon.face_model.flame_io import load_flame_pickle
from recon.formats.safe_pickle import UnsafePickleError
# 2 GiB of address space beyond what the interpreter and torch already map.
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))
out = {}
for path in sys.argv[1:]:
    t = time.perf_counter()
    try:
        load_flame_pickle(path)
        out[path] = ["loaded", ""]
    except UnsafePickleError as e:  # PickleLimitError is one
        out[path] = [type(e).__name__, str(e)]
    except BaseException as e:
        out[path] = [type(e).__name__, str(e)[:200]]
    out[path].append(time.perf_counter() - t)
print(json.dumps(out))
"""


def test_memory_bombs_refused_with_bounded_memory(tmp_path):
    """Each bomb, loaded in a child with 2 GiB of address space to spare, ends with our
    error naming the declared size -- not MemoryError, a kill or minutes of growth."""
    bombs = _bombs()
    paths = []
    for name, data in bombs.items():
        paths.append(tmp_path / f"{name}.pkl")
        paths[-1].write_bytes(data)
    # The bombs themselves are tiny: the budget relative to the file decides.
    assert len(bombs["memo_dag"]) < 250 and len(bombs["numpy_shape"]) < 100
    proc = subprocess.run([sys.executable, "-c", _LOAD_UNDER_LIMIT, *map(str, paths)],
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {os.path.basename(k)[:-4]: v for k, v in json.loads(proc.stdout).items()}
    assert set(results) == set(bombs)
    expected = {"memo_dag": "expand to over", "numpy_shape": "declares 3,000,000,000 bytes",
                "object_array": "declares 3,200,000,000 bytes", "ndarray_called": "refusing to call",
                "tensor_called": "refusing to call", "tensor_view": "declares 40,000,000,000 bytes",
                "torch_storage": "declares 40,000,000,000 bytes", "deep_nesting": "nested deeper",
                "self_reference": "holds itself", "declared_length": "more bytes than the file holds"}
    for name, (kind, message, seconds) in results.items():
        want = "UnsafePickleError" if name.endswith("_called") else "PickleLimitError"
        assert kind == want and expected[name] in message, (name, kind, message)
        assert "out of memory" not in message
        assert seconds < 5.0, (name, seconds)  # refused before growing, not after a long climb


def test_real_files_fit_the_budget(tmp_path, demo, fake_chumpy):
    """A FLAME-shaped pickle, its landmark embedding with torch tensors and a masks file whose
    arrays are shared by two regions all load; sharing stays shared."""
    pkl = tmp_path / "generic_model.pkl"
    write_flame_pickle(pkl, demo, fake_chumpy)
    assert load_flame_pickle(pkl)["shapedirs"].shape == (demo.n_vertices, 3, 400)
    npy = tmp_path / "landmark_embedding.npy"
    write_landmark_npy(npy, demo)
    assert load_landmark_embedding(npy)["dynamic_lmk_bary_coords"].shape == (79, 17, 3)
    ids = np.arange(50)
    loaded = safe_loads(pickle.dumps({"face": ids, "nose": ids}, protocol=2))
    assert loaded["face"] is loaded["nose"]


def test_npy_header_larger_than_its_data_is_refused(tmp_path):
    bad = tmp_path / "landmark_embedding.npy"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)})
    bad.write_bytes(buf.getvalue() + b"\0" * 64)
    with pytest.raises(Exception, match="declares 8,000,000,000 bytes"):
        load_landmark_embedding(bad)
