"""Integrations with other trainers (optional extras): `diagnose.integrations.trl` needs ``[trl]``."""
