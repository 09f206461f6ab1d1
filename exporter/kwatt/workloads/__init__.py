"""Readers of who runs on the node: cgroups, Kubernetes pod metadata, kubelet PodResources."""
