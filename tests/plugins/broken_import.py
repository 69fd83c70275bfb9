"""A plugin file that fails while being imported."""

raise RuntimeError("this plugin file fails at import")
