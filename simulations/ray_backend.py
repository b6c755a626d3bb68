"""Flower's Ray backend, made to survive a site whose worker dies or hangs.

Flower 1.41's simulation engine (``flwr.server.superlink.fleet.vce``) runs
each ClientApp call on an actor of a fixed pool. Two faults outlive the site
that caused them there:

- a worker process that dies hard (``os._exit``, SIGKILL) leaves a dead actor
  in the pool, and every later call on it fails with ``ActorDiedError``;
- a call that never returns keeps one of the engine's threads in ``ray.get``,
  and the engine joins those threads before it returns: the command waits for
  the hung site, long after the server has finished.

Ray's own restart (``max_restarts`` in the actors' options, which the pool
takes from ``client_resources``) does not cure the first: measured here, every
call submitted while the actor restarts fails at once with
``ActorUnavailableError`` ("The actor is restarting"), so honest sites fail
for as long as the restart takes. The engine has no hook for the second.
:func:`resilient_backend` therefore swaps in a subclass of Flower's
``RayBackend`` (its module attribute is what the engine instantiates) that

- replaces an actor whose worker died with a new one (calls submitted to an
  actor being created wait for it, as Ray defines), and fails only the call
  that was running on it;
- waits for each call in short slices: a call past its limit has its actor
  killed and replaced; a call still running once the ServerApp has finished
  has its actor killed, so that the engine can return.

A call given up answers with an error, as a ClientApp that raised would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_WAIT_SLICE_S = 0.25


class SiteCallAbandoned(RuntimeError):
    """A ClientApp call was given up: past its time limit, or the run has ended."""


def _resilient_class(base: type, *, release: threading.Event, call_timeout: float) -> type:
    import ray
    from flwr.common.constant import PARTITION_ID_KEY
    from ray.exceptions import RayActorError

    class ResilientRayBackend(base):  # type: ignore[misc, valid-type]
        """``RayBackend`` whose calls can be given up (see the module docstring)."""

        def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
            if self.pool is None or self.app_fn is None:
                return super().process_message(message, context)
            partition_id = context.node_config[PARTITION_ID_KEY]
            future = self.pool.submit(
                lambda a, a_fn, mssg, cid, state: a.run.remote(a_fn, mssg, cid, state),
                (self.app_fn, message, str(partition_id), context),
            )
            actor = self.pool._future_to_actor[future]
            deadline = time.monotonic() + call_timeout
            while not ray.wait([future], timeout=_WAIT_SLICE_S)[0]:
                ended = release.is_set()
                if ended or time.monotonic() > deadline:
                    self._replace(future, with_new=not ended)
                    why = "the run ended" if ended else f"it ran past {call_timeout:.0f}s"
                    raise SiteCallAbandoned(f"the site's call was stopped: {why} (partition {partition_id})")
            try:
                return self.pool.fetch_result_and_return_actor_to_pool(future)
            except RayActorError:  # the worker died: this call fails, later ones get a new actor
                self._replace(future, with_new=True)
                raise
            except Exception:
                if future in self.pool._future_to_actor:
                    self.pool.add_actor_back_to_pool(future)
                raise

        def _replace(self, future: Any, *, with_new: bool) -> None:
            actor = self.pool._future_to_actor.pop(future)
            ray.kill(actor, no_restart=True)
            if with_new:
                self.pool.pool.append(self.pool.create_actor_fn())
            else:
                self.pool.num_actors -= 1

    return ResilientRayBackend


@contextmanager
def resilient_backend(*, release: threading.Event, call_timeout: float) -> Iterator[None]:
    """Within this block, Flower's simulation engine builds the resilient backend.

    ``release`` is set once the ServerApp has finished: calls still running are
    then stopped. ``call_timeout`` bounds every call (a reply later than the
    round's timeout is dropped by the server anyway).
    """
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    raybackend.RayBackend = _resilient_class(original, release=release, call_timeout=call_timeout)
    try:
        yield
    finally:
        raybackend.RayBackend = original
