"""An example third-party fedge plugin package."""
