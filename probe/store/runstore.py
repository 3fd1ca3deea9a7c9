"""The run store: :class:`RunStore`, one catalog plus files under a runs root (see :mod:`probe.store`),
made of its sections: runs, metrics and checkpoints (:mod:`probe.store.runs`), probe results
(:mod:`probe.store.probes`) and findings (:mod:`probe.store.findings`), on the catalog
(:mod:`probe.store.catalog`) and the files of the root (:mod:`probe.store.files`)."""
from __future__ import annotations

import functools
import os
from typing import Any

from probe.store.findings import FindingsMixin
from probe.store.probes import ProbesMixin
from probe.store.rebuild import rebuild_catalog as rebuild_from_files

__all__ = ["RunStore", "rebuild_catalog"]


class RunStore(ProbesMixin, FindingsMixin):
    """Runs, per-epoch metrics, checkpoints and probe results under one runs root.

    ``RunStore(root)`` checks at once that the root is a writable folder (creating it if needed)
    and that ``catalog.sqlite`` is an SQLite catalog this code understands, creating or migrating
    it; otherwise it raises :class:`~probe.errors.StoreError`. It also removes temp files left by
    writers that died. ``root=None`` means :func:`resolve_runs_root` (``$PROBE_RUNS`` or ``./runs``).

    ``readonly=True`` opens the catalog read-only (``mode=ro``, or ``immutable=1`` on a folder it
    cannot write while no writer has the catalog open) and creates, migrates and removes nothing;
    a root without a catalog reads as an empty store, a catalog of an older schema version as it
    is (what that version lacks, e.g. the findings, reads as empty). Every write then raises
    StoreError.

    ``skipped`` holds one line per damaged row that the last listing (:meth:`list_runs`,
    :meth:`list_probes`, :meth:`list_checkpoints`, :meth:`get_metrics`, :meth:`list_findings`)
    left out; ``damaged`` the same rows' identifying values as stored (id, epoch, ...) with that
    line, so that a listing can show them as damaged rather than leave them out.

    The object can be pickled (e.g. passed to a spawned process); the copy re-opens the catalog.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, readonly: bool = False):
        self._attach(root, readonly)
        self._open_catalog()
        if not self.readonly:
            self._keep_reserve()

    def __reduce__(self):
        return (functools.partial(type(self), readonly=self.readonly), (str(self.root),))

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r}{', readonly=True' if self.readonly else ''})"

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- rebuilding the catalog ----------------------------------------------------------------

    @classmethod
    def rebuild_catalog(cls, root: str | os.PathLike | None = None) -> dict[str, Any]:
        """Rebuild ``catalog.sqlite`` from the run folders and probe sidecars; see
        :func:`probe.store.rebuild.rebuild_catalog` (the old catalog is moved aside, never deleted)."""
        return rebuild_from_files(root)


rebuild_catalog = RunStore.rebuild_catalog
