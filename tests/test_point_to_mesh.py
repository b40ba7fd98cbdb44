"""Exact point-to-triangle distances against an independent brute-force computation."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import ConvexHull

from recon.evaluation.point_to_mesh import MeshDistance, point_to_mesh_distance


def _segment_dist(p, a, b):
    """p (P,1,3), a/b (1,F,3) -> (P,F) distance to segments."""
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-300), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def brute_force(points, verts, faces):
    """Every point against every triangle: plane projection if it falls inside the
    triangle, else the nearest of the three edges. Returns (P,) distances, (P,F) all."""
    p = points[:, None, :]
    a, b, c = (verts[faces[:, k]][None] for k in range(3))
    n = np.cross(b - a, c - a)
    n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    h = ((p - a) * n).sum(-1)
    q = p - h[..., None] * n
    # barycentrics of the projection by areas
    def area(x, y, z):
        return (np.cross(y - x, z - x) * n).sum(-1)
    full = area(a, b, c)
    u, v, w = area(q, b, c) / full, area(a, q, c) / full, area(a, b, q) / full
    inside = (u >= 0) & (v >= 0) & (w >= 0)
    edge = np.minimum(np.minimum(_segment_dist(p, a, b), _segment_dist(p, b, c)), _segment_dist(p, c, a))
    all_d = np.where(inside, np.abs(h), edge)
    return all_d.min(axis=1), all_d


def _regions(bary, eps=1e-9):
    vertex = bary.max(axis=1) > 1 - eps
    edge = ~vertex & (bary.min(axis=1) < eps)
    face = ~vertex & ~edge
    return vertex, edge, face


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_triangle_soup_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_tri = 60
    verts = rng.uniform(-1, 1, size=(3 * n_tri, 3))
    faces = np.arange(3 * n_tri).reshape(-1, 3)
    # points near random triangles (face regions) and scattered around (vertex/edge regions)
    f = rng.integers(0, n_tri, 200)
    w = rng.dirichlet([1, 1, 1], 200)
    near = np.einsum("ij,ijk->ik", w, verts[faces[f]]) + rng.normal(scale=0.02, size=(200, 3))
    far = rng.uniform(-2, 2, size=(300, 3))
    points = np.concatenate([near, far])

    res = point_to_mesh_distance(points, verts, faces)
    expected, all_d = brute_force(points, verts, faces)
    np.testing.assert_allclose(res.distances, expected, rtol=1e-9, atol=1e-12)
    # the reported face and closest point are consistent with the distance
    np.testing.assert_allclose(all_d[np.arange(len(points)), res.faces], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(points - res.points, axis=1), expected, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(res.bary.sum(axis=1), 1.0, atol=1e-9)
    assert (res.bary > -1e-9).all()
    vertex, edge, face = _regions(res.bary)
    assert vertex.sum() > 10 and edge.sum() > 10 and face.sum() > 10, (vertex.sum(), edge.sum(), face.sum())


def test_closed_mesh_outward_offsets_are_exact():
    # On a convex polyhedron a point moved outward from a face interior along that face's
    # normal by d is exactly d from the surface.
    rng = np.random.default_rng(3)
    u = rng.normal(size=(400, 3))
    hull = ConvexHull(u / np.linalg.norm(u, axis=1, keepdims=True) * [40.0, 55.0, 50.0])
    verts, faces = hull.points, hull.simplices
    f = rng.integers(0, len(faces), 5000)
    w = rng.dirichlet([2, 2, 2], 5000)
    base = np.einsum("ij,ijk->ik", w, verts[faces[f]])
    normals = hull.equations[f, :3]  # outward unit normals
    d = rng.uniform(0, 3, 5000)
    res = MeshDistance(verts, faces).query(base + d[:, None] * normals)
    np.testing.assert_allclose(res.distances, d, atol=1e-9)
    np.testing.assert_allclose(res.points, base, atol=1e-8)


def test_degenerate_faces_count_as_segments_and_errors_are_clear():
    verts = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0.0]])
    faces = np.array([[0, 1, 2], [0, 1, 3]])  # the first has zero area: a segment
    points = np.array([[0.25, 0.25, 2.0], [2.5, 1.0, 0.0]])
    res = point_to_mesh_distance(points, verts, faces)
    np.testing.assert_allclose(res.distances, [2.0, np.hypot(0.5, 1.0)])
    assert res.faces[1] == 0 and np.isfinite(res.bary).all()
    np.testing.assert_allclose(res.points[1], [2.0, 0.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        MeshDistance(verts, np.array([[0, 1, 7]]))
    with pytest.raises(ValueError, match="points"):
        MeshDistance(verts, faces).query(np.zeros((4, 2)))
