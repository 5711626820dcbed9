"""``python -m raebench`` (and ``torchrun -m raebench``) runs the CLI."""

from raebench.cli import main

if __name__ == "__main__":
    main()
