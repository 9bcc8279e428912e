"""Errors that retrying cannot fix.

A run that meets one of these stops at once with its message: a Ray worker reports it and returns, and the
driver raises :class:`RunAborted`, so ``ray.max_failures`` is spent only on what a restart can cure (a
lost worker or node). Leaf module: imported by config, data and train alike.
"""

from __future__ import annotations


class DeterministicError(RuntimeError):
    """The same inputs fail the same way on every attempt."""


class ConfigError(DeterministicError, ValueError):
    """A run config that cannot work; the message names the key and the fix."""


class BadDataError(DeterministicError):
    """More unreadable samples than ``data.max_skip_rate`` allows."""


class CannotBatchError(DeterministicError):
    """A reader's share of an epoch holds fewer than P classes with K images: no batch can be formed."""


class NonFiniteLossError(DeterministicError):
    """``train.nan_abort_after`` consecutive non-finite losses."""


class NonFiniteWeightsError(DeterministicError):
    """Weights that are not finite when a checkpoint or the export is due (non-finite gradients)."""


class RunAborted(DeterministicError):
    """A run stopped by a :class:`DeterministicError` on one or more workers (the message says which)."""


class ClusterResourcesError(DeterministicError):
    """The Ray cluster could not host the run's workers for ``ray.resources_timeout_s`` (a node lost and not
    back, too few nodes for the placement strategy): a restart of the workers cannot fix it."""


class StorageUnavailable(OSError):
    """Samples skipped past ``data.max_skip_rate`` mostly because the storage did not answer, retries spent
    (a store's outage, not bad data): not deterministic, so Ray restarts the workers from the last checkpoint,
    and the same command resumes once the storage answers."""
