"""layerprune."""
