"""The schema, shipped as package data (``creditgate.migrations``); see ``creditgate.migrator``."""
