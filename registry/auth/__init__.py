"""Who may ask: HTTP Basic credentials (Spegel's scheme) and the cluster key's peer credentials and
tag-answer proofs.

Owns: the credential checks the app makes before anything is looked up, and the headers peers send.
May import: nothing else of `registry`.
"""
