"""The local run: a real control plane (etcd + kube-apiserver), PostgreSQL and stripe-mock on one machine."""
