"""The registry: etcd access, leases, and the watch that feeds the catalog."""
