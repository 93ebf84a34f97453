"""Coupling groups: which channel dimensions must be pruned together."""
