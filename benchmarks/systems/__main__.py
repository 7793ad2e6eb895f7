"""``python -m benchmarks.systems`` (from the repository root); the sections are described in
``benchmarks/systems/__init__.py``, the flags by ``--help``."""

from benchmarks.systems.cli import main

if __name__ == "__main__":
    main()
