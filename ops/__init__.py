"""Hand-written CPU kernels, each behind ``ops.kernels`` (one switch, off by default) and a plain-PyTorch fallback;
the only package that calls private ``torch._C`` or ``torch.ops`` functions."""
