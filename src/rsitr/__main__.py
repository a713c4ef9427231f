"""``python -m rsitr`` (also what ``torchrun -m rsitr`` runs)."""

from rsitr.cli import main

if __name__ == "__main__":
    main()
