"""Gradient worker: a data-parallel replica that turns parameter versions into gradients."""
