"""OCI distribution pull API and the peer-to-peer mirror (Quart-Trio app, pure parsing cores)."""
