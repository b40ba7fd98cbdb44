"""File formats and writing: the restricted unpickler (``safe_pickle.py``), atomic writers and the
check of outside names (``files.py``), OBJ/PLY meshes (``mesh_io.py``), iBUG ``.pts``
landmarks (``landmarks_io.py``), the annotation files beside a photo (``sidecars.py``) and the
check of a pretrained weights file (``weights_file.py``)."""
