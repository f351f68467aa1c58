from resonance.cli import app

app(prog_name="resonance")
