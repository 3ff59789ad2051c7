"""What a version of an adapter is to its tenant: ``prod``, ``retired`` or ``candidate``.

* ``prod``: the ``prod`` alias points at it now (what ``name`` and ``name@prod`` serve);
* ``retired``: it was ``prod`` once and a promotion or rollback has moved ``prod`` away
  (``rollback`` walks back through these);
* ``candidate``: never ``prod`` so far: a new version the gate kept out, or one imported or
  promoted with ``never``; ``promote`` makes it ``prod``.

Derived from the aliases and the ``prod`` alias's history each time a version is shown, so it
cannot disagree with what is served.
"""

from __future__ import annotations

from collections.abc import Collection

PROD, RETIRED, CANDIDATE = "prod", "retired", "candidate"
STATUSES = (PROD, RETIRED, CANDIDATE)


def version_status(version: int, prod: int | None, ever_prod: Collection[int] = ()) -> str:
    """The status of ``version``, given the version ``prod`` points at now (None: no prod) and
    every version ``prod`` has pointed at (``Registry.alias_versions``)."""
    if version == prod:
        return PROD
    return RETIRED if version in ever_prod else CANDIDATE
