"""Paired image–report data: the manifest format, dataset adapters and the synthetic corpus."""
