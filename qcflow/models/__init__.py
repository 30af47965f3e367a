"""Networks, losses and flows."""
