"""The composition root: the ``creditgate`` command line (``cli``), ``serve`` (both services
in one process) and the migration runner (``migrator``; the SQL ships as
``creditgate.migrations``)."""
