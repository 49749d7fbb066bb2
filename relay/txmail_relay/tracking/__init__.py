"""Open and click tracking: token codec, link rewriting, the /o and /c endpoints."""
