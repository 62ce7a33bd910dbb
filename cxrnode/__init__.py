"""``python -m cxrnode``: the ``cxrnode`` command (:mod:`installer.cli`) for environments where the
console script is not on PATH."""
