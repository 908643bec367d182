"""Stage 2: coming in a later stage (see the docs' stage map)."""
