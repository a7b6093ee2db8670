"""The OpenAI-compatible HTTP server over the library: the app, its scheduler, request limits and keys, the
playground."""
