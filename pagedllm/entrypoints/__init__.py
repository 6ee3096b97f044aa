"""Ways in from outside Python: the OpenAI-compatible server and the command line."""
