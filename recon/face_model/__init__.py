"""The face model: FLAME's layer (``flame.py``, linear blend skinning in ``lbs.py``), its arrays
(``face_assets.py``), reading FLAME's files (``flame_io.py``), DECA's data folder
(``deca_data.py``) and released weights (``deca_import.py``), the linear albedo
(``albedo.py``) and the built-in procedural ``demo-head`` (``demo_head/``)."""
