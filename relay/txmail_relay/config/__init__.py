"""Live configuration: the snapshot in force and where it comes from (a file or Kubernetes)."""
