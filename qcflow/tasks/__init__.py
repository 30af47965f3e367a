"""Tasks: each module has a plain ``run(cfg) -> dict`` that wires config to objects."""
