"""What every objective shares: backbone, sampler, kernels, metrics, callbacks."""
