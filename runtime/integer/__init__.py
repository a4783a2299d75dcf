"""Integer-only inference (Jacob et al. 2018): the exact integer semantics, defined once in numpy."""
