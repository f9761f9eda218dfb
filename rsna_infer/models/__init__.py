"""Model registry: families, manifests, weights, members and the blend."""
