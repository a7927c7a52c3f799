"""The lowest layer: helpers that know nothing of Darknet (atomic file writes, JSON, output folders, the progress
switch, PNG charts, reading input files with one-line errors)."""
