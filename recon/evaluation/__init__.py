"""NoW benchmark protocol: I/O, exact scan-to-mesh distances, alignment, metrics."""
