"""`python -m sdopt` = the `sdopt` command."""

from sdopt.cli import app

app(prog_name="sdopt")
