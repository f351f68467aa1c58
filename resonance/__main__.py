from resonance.cli import entry

entry()
