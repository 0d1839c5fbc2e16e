"""Deploying a PSPNet outside PyTorch: exported graphs and the modules written into them."""
