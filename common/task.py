"""Everything a site or the server needs from the engine, given a :class:`Config`.

This is the one object the Flower adapters (``client/``, ``server/``) and the
plain-PyTorch runners use: it builds the model and picks the algorithm once,
loads site directories, draws episodes and runs the algorithm's pure
functions. No Flower imports here.
"""

from __future__ import annotations

# Implemented below the interface: see Task.
