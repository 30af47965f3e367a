"""`python -m qcflow` entry point: everything happens in :func:`qcflow.cli.main`."""

from qcflow.cli import main

if __name__ == "__main__":
    main()
