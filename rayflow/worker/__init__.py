"""Code that runs inside Ray Train workers; the only place that calls ray.train.* from a worker."""
