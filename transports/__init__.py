"""Transport adapters: each owns its bytes on the socket and hands the client to a session."""
