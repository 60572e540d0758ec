"""This process's own local Ray instance, whatever other clusters this machine has recorded.

``ray.init()`` without an address joins the cluster named by ``RAY_ADDRESS`` or by
``<tmp>/ray/ray_current_cluster``, the file the last ``ray start --head`` (or a
``ray.cluster_utils.Cluster``) wrote. A head killed before ``ray stop`` leaves that file behind, and
``ray.init(num_cpus=...)`` then fails with "When connecting to an existing cluster, num_cpus and
num_gpus must not be provided" (every Ray test of one CI run did, after a test cluster on the same
machine was killed). Commands whose help says "default: start a local one" mean exactly that, so
they pass ``address="local"``, which Ray documents as "start a new local Ray instance, even if there
is already an existing local Ray instance".
"""

from __future__ import annotations

import os
from typing import Any


def default_local_cpus() -> int:
    """Logical CPUs of a local instance: the run's actors share this machine's cores (each actor
    asks for 1 CPU; the spec's ``resources`` decides how they share the real ones)."""
    return max(8, os.cpu_count() or 1)


def start_local_ray(num_cpus: int | None = None, *, verbose: bool = False, **kwargs: Any) -> None:
    """``ray.init`` a new local instance with ``num_cpus`` logical CPUs (default
    `default_local_cpus`), no dashboard, and Ray's logs on this console only when ``verbose``."""
    import ray

    opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose, "configure_logging": verbose}
    ray.init(address="local", num_cpus=default_local_cpus() if num_cpus is None else num_cpus, **{**opts, **kwargs})
