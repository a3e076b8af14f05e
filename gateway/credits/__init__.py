"""The Credits page (``/credits``): its templates, static files and the one catalog of the
strings a user reads (``strings.json``)."""
