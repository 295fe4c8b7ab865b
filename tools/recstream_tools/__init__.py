"""Development tooling for recstream, kept out of the worker's runtime package and image."""
