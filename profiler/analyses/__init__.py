"""The built-in analyses, one module each, registered as ``analysis`` plugins through entry points."""
