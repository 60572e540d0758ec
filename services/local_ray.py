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


def start_local_ray(num_cpus: int | None = None, *, verbose: bool = False) -> None:
    """``ray.init`` a new local instance with ``num_cpus`` logical CPUs, no dashboard, and Ray's logs
    on this console only when ``verbose``. The default, at least 8: the run's actors (1 CPU each)
    share this machine's cores; the spec's ``resources`` decides how they share the real ones."""
    import ray

    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1) if num_cpus is None else num_cpus,
             include_dashboard=False, log_to_driver=verbose, configure_logging=verbose)
