"""The Flower ServerApp: initial adapter, strategy run, global evaluation, results."""
