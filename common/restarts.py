"""Whether this Ray actor is a restart: arms then resume from their checkpoints."""

from __future__ import annotations

import warnings

import ray


def reconstructed() -> bool:
    """True in an actor that Ray restarted after its process died."""
    with warnings.catch_warnings():
        # Ray 2.60 warns about its own internal use of a deprecated property here.
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.get_runtime_context().was_current_actor_reconstructed
