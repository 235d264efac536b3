"""Tools off the training path: the benchmark, diagnostics of a trained model."""
