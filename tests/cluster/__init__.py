"""Cluster tests: the cluster configs (cluster/, serve_config.gpu.yaml) and multi-node scenarios."""
