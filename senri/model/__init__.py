"""The model: configuration, memory kernels beside their reference, cache, Senri layers, conversion, shipped memories."""
