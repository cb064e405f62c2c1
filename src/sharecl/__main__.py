"""``python -m sharecl`` runs the command line."""

from sharecl.cli import app

if __name__ == "__main__":
    app()
