"""The Flower simulation engine that ``metafed simulate`` runs in this process.

Flower deprecated ``flwr.simulation.run_simulation`` (1.41, still in 1.42) and
announced its removal in favour of ``flwr run``. ``flwr run``'s own simulation
runtime (the ``flwr-simulation`` process) runs an app through
``flwr.simulation.run_simulation._run_simulation``: the engine both share. A
simulation here binds a resolved :class:`common.config.Config` and Python
callbacks into the apps, which ``flwr run`` cannot carry, so this module calls
that engine directly (no deprecation warning), and falls back to the public
function while it exists. ``tests/flower/test_flower_engine.py`` fails when
Flower removes or renames the engine or the arguments given here: then move
``metafed simulate`` to ``flwr run`` with a local SuperLink (what
``metafed deploy run`` does against a deployed one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

ENGINE_MODULE = "flwr.simulation.run_simulation"
ENGINE_NAME = "_run_simulation"
# The keyword arguments given to the engine (the test checks its signature has them).
ENGINE_ARGUMENTS = ("num_supernodes", "exit_event", "client_app", "server_app", "backend_name",
                    "backend_config", "verbose_logging")


class EngineMissing(RuntimeError):
    """The installed Flower has neither the engine nor the public function."""


def engine() -> Callable[..., Any] | None:
    """Flower's in-process simulation engine, or None when this Flower has none."""
    try:
        module = importlib.import_module(ENGINE_MODULE)
    except ImportError:
        return None
    return getattr(module, ENGINE_NAME, None)


def run_in_process(
    *, server_app: Any, client_app: Any, num_supernodes: int, backend_config: dict[str, Any], verbose: bool
) -> None:
    """Run the apps on ``num_supernodes`` simulated nodes with the Ray backend; raises on failure."""
    run = engine()
    if run is not None:
        from flwr.supercore.telemetry import EventType

        run(
            num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app, server_app=server_app, backend_name="ray", backend_config=backend_config,
            verbose_logging=verbose,
        )
        return
    try:
        from flwr.simulation import run_simulation
    except ImportError:
        raise EngineMissing(
            f"this Flower has neither {ENGINE_MODULE}.{ENGINE_NAME} nor flwr.simulation.run_simulation: "
            "install the Flower version pyproject.toml pins (pip install -e .)"
        ) from None
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                   backend_name="ray", backend_config=backend_config, verbose_logging=verbose)
