"""Test helpers that ship with the package (usable from subprocess runs through the CLI)."""
