from scratchlm.cli import main

# Guarded: worker processes (scratchlm.workers) are spawned, and Python skips re-running a
# package's __main__ in them only by convention.
if __name__ == "__main__":
    raise SystemExit(main())
