"""The template policy shared by the relay (rendering) and the operator (validation)."""
