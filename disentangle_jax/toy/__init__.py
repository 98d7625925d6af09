"""The toy world: a procedural scene renderer, small SD-family models trained on it, a judge."""
