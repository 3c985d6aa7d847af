"""Prefect flows (installed as ``alphaspin.flows``): wiring only, plus the command line above them."""
