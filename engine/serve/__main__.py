"""`python -m engine.serve --model tiny --port 8000`: see engine/serve/cli.py."""

from engine.serve.cli import main

if __name__ == "__main__":  # tensor-parallel workers are spawned and re-import this module
    raise SystemExit(main())
