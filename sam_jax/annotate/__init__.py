"""`sam-jax annotate`: the data engine's model-assisted manual and semi-automatic stages (work in
progress: the annotation store is here; the web app follows)."""
