//! Kubernetes mode: kube-runtime watchers feeding the index.
