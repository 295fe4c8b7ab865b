"""Online side of recstream: the faust worker, its state store, and the command line."""
