"""Stage 3: coming in a later stage (see the docs' stage map)."""
