"""The bodies of the run-time commands (train, generate, verify); ``resonance.cli`` wires them to typer."""
