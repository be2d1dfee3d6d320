"""Run the Flower app as simulations: the default run, experiment configs, sweeps."""
