"""Example workflows."""
