"""Several hosts on one storage folder and one database (issue 16): per-host spool folders,
``cxrnode migrate`` under an advisory lock, ``cxrnode worker`` processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import ConfigError

# -- 1. each host spools into storage_dir/tmp/<host id> and cleans only that ------------------


def test_second_host_leaves_first_hosts_spool_alone(make_config: Any, start_node: Any, tmp_path: Path) -> None:
    a = start_node(make_config(node={"host_id": "host-a"}), job_handler=lambda ctx: None)
    assert a.store.tmp_dir == a.store.root / "tmp" / "host-a"
    in_flight = a.store.new_spool()  # host A is receiving an instance right now
    in_flight.write(b"\0" * 128 + b"DICM" + b"x" * 4096)
    stale = a.store.root / "tmp" / "host-b" / "left-by-a-crash"  # host B's own leftover
    stale.parent.mkdir()
    stale.write_bytes(b"partial")

    b = start_node(make_config(node={"host_id": "host-b"}), job_handler=lambda ctx: None)
    assert b.store.root == a.store.root and b.store.tmp_dir == a.store.root / "tmp" / "host-b"
    assert Path(in_flight.name).exists(), "starting host B deleted host A's spool file in flight"
    assert not stale.exists(), "host B did not clean its own spool"
    size, _sha = a.store.commit_spool(in_flight, "instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    assert size == 128 + 4 + 4096 and a.store.abspath("instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm").exists()

    # host A restarting cleans its own folder again (a crash's leftovers), not host B's
    b_in_flight = b.store.new_spool()
    b_in_flight.write(b"y" * 100)
    a_left = a.store.new_spool()
    a_left.write(b"z")
    a.stop(grace_s=5.0)
    a.start()
    assert not Path(a_left.name).exists() and Path(b_in_flight.name).exists()
    b_in_flight.discard()


@pytest.mark.parametrize("bad", ["..", "a/b", "host id", "x" * 65, "h\t"])
def test_host_id_is_a_safe_folder_name(make_config: Any, bad: str) -> None:
    with pytest.raises(ConfigError, match="node.host_id"):
        make_config(node={"host_id": bad})


def test_default_host_id_is_the_host_name(make_config: Any) -> None:
    import socket

    cfg = make_config()
    assert cfg.node.host_id == "" and cfg.node.resolved_host_id() == socket.gethostname().split(".")[0]



