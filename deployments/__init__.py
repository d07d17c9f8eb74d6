"""raygate's components: one module per deployment, each usable alone."""
