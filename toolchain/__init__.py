"""pocketlm toolchain: the PyTorch side (load, distill, prune, quantize, export)."""
