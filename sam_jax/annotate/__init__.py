"""`sam-jax annotate`: the data engine's model-assisted manual and semi-automatic stages as a
local web app. `store.py` keeps the accepted objects (SA-1B files, merged and written
atomically), `session.py` the model (embeddings, one decode per click), `server.py` the
Starlette API and `static/` the canvas front end; `stats.py` measures a stage."""
