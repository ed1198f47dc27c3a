"""Compatibility checks of pyquant against other toolkits (run in the peer env; see each module)."""
