"""OCI distribution pull API and the peer-to-peer mirror logic (Quart-Trio app, pure parsing cores)."""
