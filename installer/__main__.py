"""`python -m installer ...` runs the `delta-mem-mlx` command line (the supervisors use this form)."""

from installer.cli import main

if __name__ == "__main__":
    main()
