"""Training: the coarse / detail step objects (``steps``) and what feeds and drives them."""
