"""The ``adapterfmt`` command line (installed as the ``adapterfmt_cli`` package)."""
