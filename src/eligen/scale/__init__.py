"""Running batch commands on more than one process: the engine options and the Ray Data engine."""
