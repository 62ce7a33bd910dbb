"""The systemd unit of the node and the reviewer's launcher, rendered from ``templates/``.

The CPU flavour's unit hides all devices (``PrivateDevices=yes``). The GPU flavour's unit must
let the service open the NVIDIA devices, or ONNX Runtime silently falls back to the CPU under
systemd while ``cxrnode doctor`` (run outside the unit) reports a GPU: it keeps a closed device
policy and allows only the NVIDIA character devices (``DeviceAllow=char-nvidia-frontend``,
``char-nvidia-uvm``, ``char-nvidia-caps``; /dev/null, zero, random... stay allowed by
``DevicePolicy=closed``).
"""

from __future__ import annotations

import string
import subprocess
from pathlib import Path

from installer.bundle import template_text


def render_template(name: str, **values: str) -> str:
    return string.Template(template_text(name)).substitute(values)


#: resource ceilings of the unit (MemoryHigh throttles, MemoryMax kills; TasksMax counts threads).
#: The node measures ~150-300 MB RSS (README); a study's pixels and the model add a few hundred MB.
UNIT_MEMORY_HIGH = "3G"


UNIT_MEMORY_MAX = "4G"


UNIT_TASKS_MAX = 512


#: the device lines of the unit, by whether the flavour uses a GPU
CPU_DEVICES = "PrivateDevices=yes"
GPU_DEVICES = "\n".join([
    "# GPU flavour: the NVIDIA devices only (DevicePolicy=closed keeps /dev/null, zero, random...)",
    "PrivateDevices=no",
    "DevicePolicy=closed",
    "DeviceAllow=char-nvidia-frontend rw",
    "DeviceAllow=char-nvidia-uvm rw",
    "DeviceAllow=char-nvidia-caps rw",
])


def uses_gpu(flavour: str) -> bool:
    """True for the bundle flavours that ship ``onnxruntime-gpu`` (``gpu``, ``gpu-headless``)."""
    return flavour.removesuffix("-headless") == "gpu"


def render_unit(bin_path: Path, config: Path, storage: Path, user: str, port: int, flavour: str = "cpu") -> str:
    """The text of ``cxrnode.service`` for this installation.

    Parameters
    ----------
    bin_path:
        The installed ``cxrnode`` command.
    config:
        The configuration file.
    storage:
        The storage folder (the only place the service may write).
    user:
        The service account.
    port:
        The DICOM port (below 1024 needs ``CAP_NET_BIND_SERVICE``).
    flavour:
        The bundle's flavour: a GPU flavour makes the NVIDIA devices reachable.

    Returns
    -------
    str
        The unit file's text.
    """
    caps = "CAP_NET_BIND_SERVICE" if port and port < 1024 else ""
    return render_template("cxrnode.service", bin=str(bin_path), config=str(config), storage_dir=str(storage),
                           user=user, group=user, capabilities=caps, memory_high=UNIT_MEMORY_HIGH,
                           memory_max=UNIT_MEMORY_MAX, tasks_max=str(UNIT_TASKS_MAX),
                           devices=GPU_DEVICES if uses_gpu(flavour) else CPU_DEVICES)


def systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args], check=True)
