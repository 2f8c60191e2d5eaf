"""k2eg benchmark suite (issue 6); run ``python -m bench --help``."""
