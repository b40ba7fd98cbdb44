"""Using a trained model: reconstruct faces from photos (``reconstruct.py``), the optional
test-time fit of the codes (``fitting.py``), animation (``animate.py``) and video frames
(``video.py``)."""
