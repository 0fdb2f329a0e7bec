"""fedge's command line (Typer); command groups are found through the ``fedge.commands`` entry points."""
