"""The simulated online search environment."""
