"""Domain: vault, crypto, key cache, sessions. Imports neither server nor cli."""
