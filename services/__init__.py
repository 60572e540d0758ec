"""Services: run controller, control plane, registry, metrics and the `mtprl` CLI."""
