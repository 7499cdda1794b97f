"""Static assets of the debug page (`/debug/web`), shipped as package data."""
