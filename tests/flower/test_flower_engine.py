"""``metafed simulate`` runs on Flower's in-process engine: this fails when Flower removes or changes it."""

import inspect
import warnings

from simulations import flower_engine


def test_the_engine_flwr_run_uses_is_there_and_takes_what_metafed_gives_it():
    """Flower announced the removal of ``run_simulation``; the engine behind ``flwr run`` stays.

    If this fails, Flower moved its simulation engine: switch ``metafed simulate``
    to ``flwr run`` with a local SuperLink (see simulations/flower_engine.py).
    """
    engine = flower_engine.engine()
    assert engine is not None, f"{flower_engine.ENGINE_MODULE}.{flower_engine.ENGINE_NAME} is gone"
    params = inspect.signature(engine).parameters
    missing = [name for name in flower_engine.ENGINE_ARGUMENTS if name not in params]
    assert not missing, f"the engine no longer takes {missing}"
    # What `flwr run`'s own simulation runtime calls is the same function.
    from flwr.simulation import app as simulation_runtime

    assert simulation_runtime._run_simulation is engine


def test_the_engine_is_not_the_deprecated_entry_point():
    """Calling the engine does not go through ``run_simulation``'s deprecation warning."""
    engine = flower_engine.engine()
    source = inspect.getsource(engine)
    assert "deprecated" not in source.lower()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flower_engine.engine()  # looking it up warns of nothing
