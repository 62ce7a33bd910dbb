"""Site installation and operations: the ``cxrnode`` command line entry point, the offline
bundle, install/upgrade/uninstall with a hardened systemd unit, and ``cxrnode doctor``.
Reads the other packages; changes none of them.
"""
